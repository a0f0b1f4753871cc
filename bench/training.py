"""Training throughput of probdiff's default recipe against a hand-written JAX + optax loop.

Run from the repository root:

    python bench/training.py                    # full run (~5-8 min on 2 CPU cores)
    python bench/training.py --quick            # smoke run (< 2 min; fewer steps and rounds)
    python bench/training.py --out bench/results/training.json

Model: the default recipe (``probdiff.recipes.build({})``): ``MLP(2, key, hidden=(256, 256, 256),
time_dim=32)`` registered with ``eqx_module``, ``GaussianDiffusion(net, schedules.linear(1000), (2,))``
observed in a plate, ``SVI(model, lambda x: None, optax.adam(1e-3), DiffusionELBO("simple"))``.
Data: 20000 points of ``probdiff.data.eight_gaussians``; minibatches of 512 drawn exactly as
``probdiff.training.fit`` draws them (``data[randint(fold_in(key_data, step), (512,), 0, N)]``).

Variants (each runs ``--steps`` steps per timed block, inside one jitted ``lax.scan``):

A       ``probdiff.training.fit(svi, data, 2 * steps, steps_per_call=steps, state=...)``, continuing
        from the previous round's state. ``fit`` jits a fresh closure on every call, so its first
        block recompiles; the steady-state time is that of the second block, read from the
        progress bar (a tqdm stand-in records the time of each ``bar.update``, which ``fit`` calls
        after ``np.asarray(block_losses)``, i.e. after the block finished).
A_rep   fit's ``one_step`` (svi.update + EMA + ``jnp.where`` NaN guard), copied here and jitted
        once; checked to give the same state as ``fit``.
B       plain ``svi.update`` in a jitted ``lax.scan`` (no EMA, no NaN guard).
B_simple  ``SVI`` with the same optimiser but a custom ELBO whose loss is only
        sum_i ||eps_i - net(x_t, t_i)||^2 (no trace of the model, no ``step_terms``).
C       hand-written: same MLP weights and forward (the equinox module called directly),
        t ~ U{1..T}, eps ~ N(0, I), loss = sum over the batch of ||eps - net(x_t, t)||^2,
        ``jax.value_and_grad`` + ``optax.adam(1e-3)``.
C_ema   C plus fit's EMA and NaN guard (attributes A - B).

Rounds are interleaved in one process, the order rotated by one variant each round (so no
variant is always first after the previous round's fit call); the summary
reports medians of steps/s and ratios of medians.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import statistics
import time
from collections import Counter

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from _env import machine_info, timestamped_log, versions, write_result
from numpyro.infer import SVI
from numpyro.infer.elbo import ELBO

from probdiff.data import eight_gaussians
from probdiff.recipes import build
from probdiff.training import TrainState, fit

BATCH = 512
NUM_DATA = 20_000
EMA_DECAY = 0.999


# --------------------------------------------------------------------------- helpers
def block_ready(x):
    return jax.tree_util.tree_map(lambda a: a.block_until_ready() if hasattr(a, "block_until_ready") else a, x)


def hlo_stats(fn, *args):
    """Op counts of the optimised HLO of jit(fn)(*args), plus XLA's flop estimate."""
    t0 = time.perf_counter()
    lowered = jax.jit(fn).lower(*args)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    pre = lowered.as_text()
    post = compiled.as_text()
    ops_pre = Counter(re.findall(r"=\s*(?:\"?)(stablehlo\.[a-z_]+|func\.call|call)", pre))
    ops_post = Counter(m for m in re.findall(r"=\s*[a-z0-9\[\]{},\s]*?\s([a-z\-]+)\(", post))
    try:
        cost = compiled.cost_analysis()
        if isinstance(cost, list):
            cost = cost[0]
        flops = float(cost.get("flops", float("nan")))
        bytes_accessed = float(cost.get("bytes accessed", float("nan")))
    except Exception:  # noqa: BLE001
        flops = bytes_accessed = float("nan")
    return {
        "lower_s": t1 - t0,
        "compile_s": t2 - t1,
        "stablehlo_lines": pre.count("\n"),
        "stablehlo_dot_general": ops_pre.get("stablehlo.dot_general", 0),
        "stablehlo_ops_total": sum(ops_pre.values()),
        "hlo_lines_optimised": post.count("\n"),
        "hlo_dot": ops_post.get("dot", 0) + ops_post.get("convolution", 0),
        "hlo_fusion": ops_post.get("fusion", 0),
        "hlo_custom_call": ops_post.get("custom-call", 0),
        "hlo_rng": sum(v for k, v in ops_post.items() if "rng" in k or "random" in k),
        "hlo_top_ops": dict(ops_post.most_common(12)),
        "xla_flops": flops,
        "xla_bytes_accessed": bytes_accessed,
    }


# --------------------------------------------------------------------------- setup
class Setup:
    def __init__(self, steps: int, seed: int = 0):
        self.recipe = build({})
        self.svi = self.recipe.svi
        self.schedule = self.recipe.schedule
        self.T = self.schedule.num_steps
        self.net0 = self.recipe.net0
        self.params0, self.static = eqx.partition(self.net0, eqx.is_array)
        self.data = eight_gaussians(jax.random.key(seed + 1), NUM_DATA)
        self.rng_key = jax.random.key(seed)
        self.key_data, self.key_init = jax.random.split(self.rng_key)
        self.steps = steps

    def batch_at(self, step):
        idx = jax.random.randint(jax.random.fold_in(self.key_data, step), (BATCH,), 0, self.data.shape[0])
        return self.data[idx]


def simple_loss(params, static, schedule, key, x0):
    """sum_i ||eps_i - net(x_t, t_i)||^2 with t_i ~ U{1..T}, the hand-written DDPM loss."""
    net = eqx.combine(params, static)
    k_t, k_eps = jax.random.split(key)
    T = schedule.num_steps
    t = jax.random.randint(k_t, (x0.shape[0],), 1, T + 1)
    eps = jax.random.normal(k_eps, x0.shape, x0.dtype)
    ab = schedule.alpha_bar[t][:, None]
    x_t = jnp.sqrt(ab) * x0 + jnp.sqrt(1.0 - ab) * eps
    return jnp.sum((eps - net(x_t, t)) ** 2)


class SimpleOnlyELBO(ELBO):
    """An ELBO for SVI whose loss is only the simple term (no model trace, no step_terms)."""

    def __init__(self, static, schedule):
        super().__init__()
        self.static = static
        self.schedule = schedule

    def loss_with_mutable_state(self, rng_key, param_map, model, guide, *args, **kwargs):
        (x0,) = args
        return {"loss": simple_loss(param_map["eps_net$params"], self.static, self.schedule, rng_key, x0),
                "mutable_state": None}


def ema_and_guard(st_old, svi_state_or_params, params, loss, make_new):
    ema = jax.tree_util.tree_map(lambda e, p: EMA_DECAY * e + (1.0 - EMA_DECAY) * p, st_old.ema, params)
    new = make_new(svi_state_or_params, ema, st_old.step + 1)
    ok = jnp.isfinite(loss)
    return jax.tree_util.tree_map(lambda a, b: jnp.where(ok, a, b), new, st_old)


def make_variants(S: Setup):
    svi = S.svi
    K = S.steps

    # ---- A_rep: fit's one_step, copied
    def a_step(st, _):
        svi_state, loss = svi.update(st.svi_state, S.batch_at(st.step))
        params = svi.optim.get_params(svi_state.optim_state)
        return ema_and_guard(st, svi_state, params, loss, TrainState), loss

    # ---- B: plain svi.update
    def b_step(carry, _):
        svi_state, step = carry
        svi_state, loss = svi.update(svi_state, S.batch_at(step))
        return (svi_state, step + 1), loss

    # ---- B_simple: SVI machinery, simple-only loss
    svi_simple = SVI(S.recipe.model, lambda x: None, optax.adam(1e-3), SimpleOnlyELBO(S.static, S.schedule))

    def bs_step(carry, _):
        svi_state, step = carry
        svi_state, loss = svi_simple.update(svi_state, S.batch_at(step))
        return (svi_state, step + 1), loss

    # ---- C: hand-written
    opt = optax.adam(1e-3)

    def c_update(params, opt_state, key, step):
        loss, grads = jax.value_and_grad(simple_loss)(params, S.static, S.schedule, key, S.batch_at(step))
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    def c_step(carry, _):
        params, opt_state, key, step = carry
        key, sub = jax.random.split(key)
        params, opt_state, loss = c_update(params, opt_state, sub, step)
        return (params, opt_state, key, step + 1), loss

    class CState(eqx.Module):
        params: dict
        opt_state: tuple
        key: jax.Array
        ema: dict
        step: jax.Array

    def c_ema_step(st, _):
        key, sub = jax.random.split(st.key)
        params, opt_state, loss = c_update(st.params, st.opt_state, sub, st.step)

        def make_new(po, ema, step):
            p, o = po
            return CState(p, o, key, ema, step)

        return ema_and_guard(st, (params, opt_state), params, loss, make_new), loss

    def scanned(step_fn):
        return jax.jit(lambda carry: jax.lax.scan(step_fn, carry, None, length=K))

    # initial states (same initial weights everywhere: recipe.net0)
    svi_state0 = svi.init(S.key_init, S.batch_at(0))
    st0 = TrainState(svi_state0, svi.optim.get_params(svi_state0.optim_state), jnp.zeros((), jnp.int32))
    simple_state0 = svi_simple.init(S.key_init, S.batch_at(0))
    c0 = (S.params0, opt.init(S.params0), jax.random.key(7), jnp.zeros((), jnp.int32))
    c_ema0 = CState(S.params0, opt.init(S.params0), jax.random.key(7), S.params0, jnp.zeros((), jnp.int32))

    variants = {
        "A_rep": (scanned(a_step), st0),
        "B": (scanned(b_step), (svi_state0, jnp.zeros((), jnp.int32))),
        "B_simple": (scanned(bs_step), (simple_state0, jnp.zeros((), jnp.int32))),
        "C": (scanned(c_step), c0),
        "C_ema": (scanned(c_ema_step), c_ema0),
    }
    one_step = {
        "A_rep": (lambda st: a_step(st, None), st0),
        "B": (lambda c: b_step(c, None), (svi_state0, jnp.zeros((), jnp.int32))),
        "B_simple": (lambda c: bs_step(c, None), (simple_state0, jnp.zeros((), jnp.int32))),
        "C": (lambda c: c_step(c, None), c0),
        "C_ema": (lambda st: c_ema_step(st, None), c_ema0),
    }
    # the loss alone (forward only) and value_and_grad of the loss, library vs hand-written
    x = S.batch_at(0)
    params_unc = svi.optim.get_params(svi_state0.optim_state)
    key = jax.random.key(3)

    def lib_loss(p, k):
        return svi.loss.loss(k, svi.constrain_fn(p), svi.model, svi.guide, x)

    def hand_loss(p, k):
        return simple_loss(p["eps_net$params"], S.static, S.schedule, k, x)

    losses = {
        "loss_lib_fwd": (lambda p, k: lib_loss(p, k), (params_unc, key)),
        "loss_hand_fwd": (lambda p, k: hand_loss(p, k), (params_unc, key)),
        "loss_lib_grad": (jax.value_and_grad(lib_loss), (params_unc, key)),
        "loss_hand_grad": (jax.value_and_grad(hand_loss), (params_unc, key)),
    }
    return variants, one_step, losses, st0


class _TimedBar:
    """A tqdm stand-in that records the time of every update (fit calls it after each block)."""

    stamps: list = []

    def __init__(self, *a, **k):
        _TimedBar.stamps = [time.perf_counter()]

    def update(self, n):
        _TimedBar.stamps.append(time.perf_counter())

    def set_postfix(self, **k):
        pass

    def close(self):
        pass


def run_fit(S: Setup, state):
    """One call of probdiff.training.fit with 2 blocks; returns state and (total, block1, block2) s."""
    import tqdm.auto

    orig = tqdm.auto.tqdm
    tqdm.auto.tqdm = _TimedBar
    try:
        t0 = time.perf_counter()
        res = fit(S.svi, S.data, 2 * S.steps, batch_size=BATCH, rng_key=S.rng_key, state=state,
                  ema_decay=EMA_DECAY, steps_per_call=S.steps, progress_bar=True)
        block_ready(res.state)
        t1 = time.perf_counter()
    finally:
        tqdm.auto.tqdm = orig
    s = _TimedBar.stamps
    return res.state, (t1 - t0, s[1] - s[0], s[2] - s[1])


# --------------------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: fewer steps and rounds")
    ap.add_argument("--out", default="bench/results/training.json")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    args = ap.parse_args(argv)
    steps = args.steps or (100 if args.quick else 500)
    rounds = args.rounds or (2 if args.quick else 7)
    t_start = time.perf_counter()

    log = timestamped_log()

    result = {"benchmark": "probdiff training throughput",
              "started_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
              "machine": machine_info(), "versions": versions(),
              "parameters": {"quick": args.quick, "steps_per_block": steps, "rounds": rounds, "batch": BATCH,
                             "num_data": NUM_DATA, "T": 1000, "ema_decay": EMA_DECAY,
                             "recipe": "probdiff.recipes.build({}) (DEFAULT_CONFIG)"}}
    S = Setup(steps)
    variants, one_step, losses, st0 = make_variants(S)

    # ---- HLO statistics and compile times of one step / of the loss (fresh compile each)
    log("HLO statistics ...")
    hlo = {}
    for name, (fn, arg) in {**one_step, **losses}.items():
        jax.clear_caches()
        hlo[name] = hlo_stats(fn, *((arg,) if name in one_step else arg))
        h = hlo[name]
        log(f"  {name:15s} compile {h['lower_s'] + h['compile_s']:.2f}s  dots {h['hlo_dot']:3d}  "
            f"fusions {h['hlo_fusion']:3d}  hlo lines {h['hlo_lines_optimised']:5d}  "
            f"stablehlo ops {h['stablehlo_ops_total']:5d}  flops {h['xla_flops']:.3g}")
    result["hlo"] = hlo

    # ---- compile (first call) times of the scanned blocks
    log("compiling scanned blocks (first call = trace + compile + one block) ...")
    compile_s = {}
    states = {}
    for name, (fn, st) in variants.items():
        t0 = time.perf_counter()
        lowered = fn.lower(st)
        compiled = lowered.compile()
        t1 = time.perf_counter()
        compile_s[name] = t1 - t0
        new, ls = compiled(st)
        block_ready(new)
        states[name] = (compiled, new)
        log(f"  {name:9s} compile {compile_s[name]:.2f}s  mean loss of block 1 {float(jnp.mean(ls)):.4f}")
    # fit: first call includes the compile of its freshly jitted block
    st_fit, (tot, b1, b2) = run_fit(S, st0)
    compile_s["A (fit, 1st block incl. compile - steady block)"] = b1 - b2
    log(f"  A (fit)   first call {tot:.2f}s (block 1 {b1:.2f}s incl. compile, block 2 {b2:.2f}s)")

    # ---- check: A_rep reproduces fit exactly (same start state, same steps)
    a_rep_fn = variants["A_rep"][0]
    ref, _ = a_rep_fn(st0)
    ref, _ = a_rep_fn(ref)
    diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in
               zip(jax.tree_util.tree_leaves(ref.ema), jax.tree_util.tree_leaves(st_fit.ema), strict=True))
    result["check_A_rep_vs_fit_max_abs_diff_ema"] = diff
    log(f"  check: |EMA(A_rep) - EMA(fit)| max = {diff:.3g} after {2 * steps} steps")

    # ---- interleaved rounds
    raw = {k: [] for k in ["A", *variants]}
    raw_fit_call = []
    names = list(raw)
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]  # rotate: no variant always first
        for name in order:
            if name == "A":
                st_fit, (tot, b1, b2) = run_fit(S, st_fit)
                raw["A"].append(b2)
                raw_fit_call.append({"total_s": tot, "block1_s": b1, "block2_s": b2})
                continue
            compiled, st = states[name]
            t0 = time.perf_counter()
            new, ls = compiled(st)
            block_ready((new, ls))
            raw[name].append(time.perf_counter() - t0)
            states[name] = (compiled, new)
        log(f"round {r + 1}/{rounds}: " + "  ".join(f"{k} {steps / v[-1]:.1f}" for k, v in raw.items())
            + " steps/s" + f"   (fit call {tot:.1f}s, block 1 {b1:.1f}s)")

    med = {k: statistics.median(v) for k, v in raw.items()}
    sps = {k: steps / v for k, v in med.items()}
    summary = {}
    for k in raw:
        summary[k] = {"median_s_per_block": med[k], "min_s": min(raw[k]), "max_s": max(raw[k]),
                      "steps_per_s_median": sps[k], "ratio_to_C": sps[k] / sps["C"],
                      "median_of_round_ratios_to_C": statistics.median(
                          c / a for a, c in zip(raw[k], raw["C"], strict=True))}
    result.update({"raw_s_per_block": raw, "raw_fit_calls": raw_fit_call, "compile_s": compile_s,
                   "summary": summary,
                   "goals": {k: {"ratio": sps[k] / sps["C"], "goal": 0.95, "pass": sps[k] / sps["C"] >= 0.95}
                             for k in ("A", "B")}})
    result["machine"]["loadavg_end"] = os.getloadavg()
    result["wall_s"] = time.perf_counter() - t_start

    print(f"\nsteps/s (median over {rounds} interleaved rounds of {steps} steps, batch {BATCH}, T = 1000)")
    print(f"{'variant':10s} {'steps/s':>9s} {'min-max':>15s} {'/ C':>6s} {'compile s':>10s}")
    for k in raw:
        lo, hi = steps / max(raw[k]), steps / min(raw[k])
        cs = compile_s.get(k, compile_s.get("A (fit, 1st block incl. compile - steady block)"))
        print(f"{k:10s} {sps[k]:9.1f} {lo:7.1f}-{hi:<7.1f} {sps[k] / sps['C']:6.3f} {cs:10.2f}")
    log(f"wrote {write_result(args.out, result)}")


if __name__ == "__main__":
    main()
