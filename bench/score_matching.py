"""Score-matching losses: the cost of one training step relative to one network forward-backward.

Run from the repository root:

    python bench/score_matching.py              # full run (~3.5 min on 2 CPU cores, ~2.3 of them compiling)
    python bench/score_matching.py --quick      # smoke run (~2.5 min, compile-bound; short blocks, 2 rounds)
    python bench/score_matching.py --out bench/results/score_matching.json

Network: ``probdiff.nets.MLP(D, key, hidden=(256, 256, 256), time_dim=32)`` (SiLU), for D = 2 and
D = 64, batch 256, float32. Its last layer starts at zero in the library; here it is drawn at
random (scale 0.1 / sqrt(256)) so that s(x) and its Jacobian are not identically zero (the cost
does not depend on the values: no data-dependent control flow). The unconditional losses call
the network as ``s(x) = net(x, 0)``; NCSN as ``s(x, sigma) = net(x, sigma)`` (the sinusoidal
embedding of the float sigma); the time-conditional loss as ``s(x_t, t) = net(x_t, t)``. Same
architecture, same weights, so one forward-backward costs the same in every row.
Data: 8192 draws of N(0, I_D); minibatch k is ``data[randint(fold_in(key_data, k), (256,), 0, N)]``
(drawn inside the step, as ``probdiff.training.fit`` draws them).

Losses (rows):

baseline  J(x) = 1/2 ||s(x) + x||^2, plain regression on a fixed target (the score of N(0, I)):
          one forward and one backward pass of the network. Under SVI it is a subclass of
          ``DenoisingScoreMatching`` with ``objective`` replaced, i.e. the same SVI plumbing.
ISM       ``ImplicitScoreMatching()``: exact trace, one Jacobian-vector product per coordinate
          (D of them, under ``lax.map``).
SSM-1     ``SlicedScoreMatching(1, "rademacher")``.
SSM-4     ``SlicedScoreMatching(4, "rademacher")``.
DSM       ``DenoisingScoreMatching(0.1)``.
NCSN      ``NCSNScoreMatching(geomspace(0.01, 1, 10))``.
TC        ``TimeConditionalScoreMatching(schedules.linear(1000))``.

Paths (each runs K steps per timed block inside one jitted ``lax.scan``; K is set per row from a
rough cost guess so that a block takes ~0.2 s, ``block_steps``; steps/s = K / block time):

svi   the user path: ``model(x)`` registers the network with ``eqx_module`` and observes ``x`` in a
      plate through ``ScoreModel(score_fn, (D,))``; ``SVI(model, lambda x: None,
      optax.adam(1e-3), loss)``; ``svi.update`` in the scan.
hand  the same ``loss.objective(key, score_fn, x, 1)`` summed over the batch, called directly:
      ``jax.value_and_grad`` w.r.t. the network's arrays (``eqx.partition``) + ``optax.adam(1e-3)``.
      svi / hand is the overhead of SVI (model trace, param handling, the ELBO plumbing).

Costs are reported relative to the baseline of the same path and D: ratio of the median
per-step times (and the median of the per-round ratios). Next to it, a noise-free cost model:
the matmul FLOPs of one step, counted from the jaxpr (every ``dot_general``, 2 * output size *
contracted size, multiplied by the trip count of enclosing scans; XLA's own ``cost_analysis``
counts a loop body once, so it cannot see the D jvps of ISM).

Side measurement (``--no-side`` skips it): other formulations of the exact trace and of
Hutchinson's estimator, on the hand path, in the same interleaved rounds, each checked to give the
library's objective (same probes for SSM); compared with the library's row ("ISM hand", "SSM-4 hand"):

lin_map    ``s, lin = jax.linearize(score_fn, x)`` once, ``lax.map`` over ``lin`` (the proposed
           patch; ISM and SSM-4, D = 2 and 64).
vmap       ``jax.vmap`` of ``jax.jvp`` over the D basis vectors, all tangents at once (ISM, D = 64).
jacfwd     per example ``jax.vmap(jax.jacfwd(...))``: the full D x D Jacobian, then its trace
           (ISM, D = 64).

Rounds are interleaved in one process, the order rotated by one variant each round; medians of
the block times, ratios of medians. Every scanned block is compiled once (``lower().compile()``)
and run once untimed before the rounds.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import statistics
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import optax
from _env import machine_info, timestamped_log, versions, write_result
from numpyro.contrib.module import eqx_module
from numpyro.infer import SVI

from probdiff import schedules
from probdiff.infer import (
    DenoisingScoreMatching,
    ImplicitScoreMatching,
    NCSNScoreMatching,
    SlicedScoreMatching,
    TimeConditionalScoreMatching,
)
from probdiff.nets import MLP
from probdiff.score import ScoreModel

BATCH = 256
NUM_DATA = 8192
HIDDEN = (256, 256, 256)
DIMS = (2, 64)
SIGMAS = np.geomspace(0.01, 1.0, 10)
LOSS_NAMES = ("baseline", "ISM", "SSM-1", "SSM-4", "DSM", "NCSN", "TC")


# --------------------------------------------------------------------------- losses and networks
class Regression(DenoisingScoreMatching):
    """The baseline: J(x) = 1/2 ||s(x) + x||^2, one forward-backward; DSM's SVI plumbing, own objective."""

    def __init__(self):
        super().__init__(1.0)

    def objective(self, rng_key, score_fn, x, event_ndim: int = 1):
        return 0.5 * jnp.sum((score_fn(x) + x) ** 2, axis=tuple(range(x.ndim - event_ndim, x.ndim)))


def make_loss(name):
    """(loss, how the network is called: "x" -> net(x, 0), "sigma" -> net(x, sigma), "t" -> net(x, t))."""
    return {
        "baseline": (Regression(), "x"),
        "ISM": (ImplicitScoreMatching(), "x"),
        "SSM-1": (SlicedScoreMatching(1, "rademacher"), "x"),
        "SSM-4": (SlicedScoreMatching(4, "rademacher"), "x"),
        "DSM": (DenoisingScoreMatching(0.1), "x"),
        "NCSN": (NCSNScoreMatching(SIGMAS), "sigma"),
        "TC": (TimeConditionalScoreMatching(schedules.linear(1000)), "t"),
    }[name]


def score_of(net, kind):
    if kind == "x":
        return lambda y: net(y, 0)
    return net  # net(x, sigma) or net(x_t, t)


def make_net(D, seed=0):
    net = MLP(D, jax.random.key(seed), hidden=HIDDEN)
    w_last = 0.1 / math.sqrt(HIDDEN[-1]) * jax.random.normal(jax.random.key(seed + 100), net.weights[-1].shape)
    return eqx.tree_at(lambda n: n.weights[-1], net, w_last)


# ------------------------------------------------- ISM / SSM alternatives (the side measurement)
def _sum_last(a):
    return jnp.sum(a, axis=-1)


def ism_lin_map(rng_key, score_fn, x, event_ndim=1):
    """Exact trace: linearize once (one primal pass), then lax.map of the linear map over the basis."""
    basis = jnp.eye(x.shape[-1], dtype=x.dtype)
    s, lin = jax.linearize(score_fn, x)
    terms = jax.lax.map(lambda e: _sum_last(e * lin(jnp.broadcast_to(e, x.shape))), basis)
    return 0.5 * _sum_last(s**2) + jnp.sum(terms, axis=0)


def ism_vmap(rng_key, score_fn, x, event_ndim=1):
    """Exact trace: vmap of jvp over the D basis vectors (D tangents in one pass)."""
    basis = jnp.eye(x.shape[-1], dtype=x.dtype)
    s, jv = jax.vmap(lambda e: jax.jvp(score_fn, (x,), (jnp.broadcast_to(e, x.shape),)), out_axes=(None, 0))(basis)
    return 0.5 * _sum_last(s**2) + jnp.einsum("kbk->b", jv)


def ism_jacfwd(rng_key, score_fn, x, event_ndim=1):
    """Exact trace: per-example D x D Jacobian by jacfwd under vmap, then its trace."""

    def one(xi):
        o = score_fn(xi[None])[0]
        return o, o

    jac, s = jax.vmap(jax.jacfwd(one, has_aux=True))(x)
    return 0.5 * _sum_last(s**2) + jnp.trace(jac, axis1=-2, axis2=-1)


def ssm_lin_map(num_probes):
    """Hutchinson with Rademacher probes drawn as the library draws them, but linearize once + lax.map."""

    def objective(rng_key, score_fn, x, event_ndim=1):
        keys = jax.random.split(rng_key, num_probes)
        s, lin = jax.linearize(score_fn, x)

        def one_probe(key):
            v = jax.random.rademacher(key, x.shape, x.dtype)
            return _sum_last(v * lin(v))

        return 0.5 * _sum_last(s**2) + jnp.mean(jax.lax.map(one_probe, keys), axis=0)

    return objective


#: (D, loss, formulation) -> objective; measured on the hand path against the library's
#: (the main rows "ISM hand" / "SSM-4 hand"), whose objective each must reproduce.
SIDE = {
    (2, "ISM", "lin_map"): ism_lin_map,
    (2, "SSM-4", "lin_map"): ssm_lin_map(4),
    (64, "ISM", "lin_map"): ism_lin_map,
    (64, "ISM", "vmap"): ism_vmap,
    (64, "ISM", "jacfwd"): ism_jacfwd,
    (64, "SSM-4", "lin_map"): ssm_lin_map(4),
}


# --------------------------------------------------------------------------- cost model
def _subjaxprs(params):
    for v in params.values():
        for u in v if isinstance(v, list | tuple) else (v,):
            if hasattr(u, "eqns"):
                yield u
            elif hasattr(u, "jaxpr") and hasattr(u.jaxpr, "eqns"):
                yield u.jaxpr


def dot_flops(jaxpr) -> float:
    """Matmul FLOPs of a jaxpr: 2 * |out| * |contracted| per dot_general, times enclosing scan lengths."""
    total = 0.0
    for e in jaxpr.eqns:
        name = e.primitive.name
        if name == "dot_general":
            (lc, _), _ = e.params["dimension_numbers"]
            lhs = e.invars[0].aval.shape
            total += 2.0 * math.prod(e.outvars[0].aval.shape) * math.prod(lhs[i] for i in lc)
        elif name == "scan":
            total += e.params["length"] * dot_flops(e.params["jaxpr"].jaxpr)
        elif name == "cond":
            total += max(dot_flops(b.jaxpr) for b in e.params["branches"])
        else:  # jit, custom_jvp/vjp, remat, while (body counted once; none in these steps)
            total += sum(dot_flops(j) for j in _subjaxprs(e.params))
    return total


# --------------------------------------------------------------------------- steps
def block_steps(loss_name, D, k0):
    """Steps per block: k0 / (a rough cost guess in baselines), at least 1."""
    guess = {"ISM": 1 + 1.6 * D, "SSM-1": 2.0, "SSM-4": 7.0}.get(loss_name, 1.0)
    return max(1, round(k0 / guess))


class Setup:
    def __init__(self, D, seed=0):
        self.D = D
        self.net0 = make_net(D, seed)
        self.params0, self.static = eqx.partition(self.net0, eqx.is_inexact_array)
        self.data = jax.random.normal(jax.random.key(seed + 1), (NUM_DATA, D))
        self.key_data = jax.random.key(seed + 2)
        self.key_init = jax.random.key(seed + 3)

    def batch_at(self, step):
        idx = jax.random.randint(jax.random.fold_in(self.key_data, step), (BATCH,), 0, NUM_DATA)
        return self.data[idx]


def svi_variant(S: Setup, loss, kind, K):
    D = S.D

    def model(x):
        net = eqx_module("score_net", S.net0)
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("x", ScoreModel(score_of(net, kind), (D,)), obs=x)

    svi = SVI(model, lambda x: None, optax.adam(1e-3), loss)

    def body(carry, _):
        state, step = carry
        state, value = svi.update(state, S.batch_at(step))
        return (state, step + 1), value

    state0 = (svi.init(S.key_init, S.batch_at(0)), jnp.zeros((), jnp.int32))
    return jax.jit(lambda c: jax.lax.scan(body, c, None, length=K)), state0, (lambda c: body(c, None))


def hand_variant(S: Setup, objective, kind, K):
    opt = optax.adam(1e-3)

    def loss_fn(params, key, x):
        net = eqx.combine(params, S.static)
        return jnp.sum(objective(key, score_of(net, kind), x, 1))

    def body(carry, _):
        params, opt_state, key, step = carry
        key, sub = jax.random.split(key)
        value, grads = jax.value_and_grad(loss_fn)(params, sub, S.batch_at(step))
        updates, opt_state = opt.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state, key, step + 1), value

    state0 = (S.params0, opt.init(S.params0), jax.random.key(7), jnp.zeros((), jnp.int32))
    return jax.jit(lambda c: jax.lax.scan(body, c, None, length=K)), state0, (lambda c: body(c, None))


def block_ready(x):
    return jax.tree_util.tree_map(lambda a: a.block_until_ready() if hasattr(a, "block_until_ready") else a, x)


def prepare(variants, log):
    """Compile each scanned block, run it once untimed; return name -> [compiled, state, first losses]."""
    ready = {}
    for name, v in variants.items():
        t0 = time.perf_counter()
        compiled = v["fn"].lower(v["state0"]).compile()
        compile_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        state, losses = compiled(v["state0"])
        block_ready((state, losses))
        first_s = time.perf_counter() - t0
        v.update(compile_s=compile_s, warmup_block_s=first_s, first_block_losses=np.asarray(losses))
        ready[name] = [compiled, state]
        log(f"  {name:22s} K {v['K']:3d}  compile {compile_s:5.2f}s  warm-up block {first_s:6.3f}s  "
            f"({v['K'] / first_s:8.1f} steps/s)  matmul GFLOP/step {v['dot_flops'] / 1e9:7.3f}")
    return ready


def run_rounds(variants, ready, rounds, log, label):
    raw = {k: [] for k in variants}
    names = list(variants)
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]  # rotate: no variant always first
        for name in order:
            compiled, state = ready[name]
            t0 = time.perf_counter()
            state, losses = compiled(state)
            block_ready((state, losses))
            raw[name].append(time.perf_counter() - t0)
            ready[name][1] = state
        log(f"{label} round {r + 1}/{rounds}: "
            + "  ".join(f"{k} {variants[k]['K'] / v[-1]:.0f}" for k, v in raw.items()) + " steps/s")
    return raw


def per_step(raw, variants):
    """name -> list of seconds per step (block time / K)."""
    return {k: [t / variants[k]["K"] for t in v] for k, v in raw.items()}


def ratio_stats(ps, num, den):
    return {"ratio_of_medians": statistics.median(ps[num]) / statistics.median(ps[den]),
            "median_of_round_ratios": statistics.median(a / b for a, b in zip(ps[num], ps[den], strict=True))}


# --------------------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: short blocks, 2 rounds")
    ap.add_argument("--out", default="bench/results/score_matching.json")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--k0", type=int, default=None, help="steps per block of a 1x-baseline row")
    ap.add_argument("--no-side", action="store_true", help="skip the other formulations of ISM/SSM")
    args = ap.parse_args(argv)
    rounds = args.rounds or (2 if args.quick else 5)
    k0 = args.k0 or (8 if args.quick else 40)
    t_start = time.perf_counter()

    log = timestamped_log()

    result = {"benchmark": "probdiff score-matching losses: cost per training step",
              "started_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
              "machine": machine_info(), "versions": versions(),
              "parameters": {"quick": args.quick, "rounds": rounds, "k0": k0,
                             "batch": BATCH, "num_data": NUM_DATA, "hidden": HIDDEN, "dims": DIMS,
                             "dsm_sigma": 0.1, "ncsn_sigmas": SIGMAS.tolist(), "tc_schedule": "linear(1000)",
                             "optimizer": "optax.adam(1e-3)", "dtype": "float32"}}

    # ---- every loss, both paths, both dimensions; plus the side formulations (hand path)
    setups = {D: Setup(D) for D in DIMS}
    variants = {}
    for D in DIMS:
        S = setups[D]
        for lname in LOSS_NAMES:
            loss, kind = make_loss(lname)
            K = block_steps(lname, D, k0)
            for path in ("svi", "hand"):
                if path == "svi":
                    fn, st0, one = svi_variant(S, loss, kind, K)
                else:
                    fn, st0, one = hand_variant(S, loss.objective, kind, K)
                variants[f"D{D} {lname} {path}"] = {"fn": fn, "state0": st0, "one": one, "K": K, "D": D,
                                                    "loss": lname, "path": path}
    side_checks = {}
    if not args.no_side:
        key = jax.random.key(11)
        for (D, lname, form), obj in SIDE.items():
            S = setups[D]
            x, sfn = S.batch_at(0), score_of(S.net0, "x")
            j_alt, j_lib = obj(key, sfn, x, 1), make_loss(lname)[0].objective(key, sfn, x, 1)
            side_checks[f"D{D} {lname} {form}: max |J - J_lib| / max |J_lib|"] = float(
                jnp.max(jnp.abs(j_alt - j_lib)) / jnp.max(jnp.abs(j_lib)))
            K = block_steps(lname, D, k0)
            fn, st0, one = hand_variant(S, obj, "x", K)
            variants[f"D{D} {lname} {form}"] = {"fn": fn, "state0": st0, "one": one, "K": K, "D": D,
                                                "loss": lname, "path": form}
    log(f"matmul FLOPs of one step from the jaxpr of {len(variants)} variants ...")
    for v in variants.values():
        v["dot_flops"] = dot_flops(jax.make_jaxpr(v.pop("one"))(v["state0"]).jaxpr)
    log(f"compiling {len(variants)} scanned blocks ...")
    ready = prepare(variants, log)

    # checks: ISM and the baseline are deterministic given the batch, so SVI and the direct call must
    # give the same loss trajectory over the first block (same weights, batches and Adam); each side
    # formulation must give the library's objective (same probes for SSM).
    checks = {}
    for D in DIMS:
        for lname in ("baseline", "ISM"):
            a = variants[f"D{D} {lname} svi"]["first_block_losses"]
            b = variants[f"D{D} {lname} hand"]["first_block_losses"]
            checks[f"D{D} {lname}: max |loss_svi - loss_hand| / |loss| over block 1"] = float(
                np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-30)))
    checks.update(side_checks)
    for k, v in checks.items():
        log(f"  check {k} = {v:.2e}")

    raw = run_rounds(variants, ready, rounds, log, "")
    ps = per_step(raw, variants)
    summary = {}
    for name, v in variants.items():
        base = f"D{v['D']} baseline {'svi' if v['path'] == 'svi' else 'hand'}"
        entry = {"K": v["K"], "steps_per_s_median": 1.0 / statistics.median(ps[name]),
                 "steps_per_s_min": 1.0 / max(ps[name]), "steps_per_s_max": 1.0 / min(ps[name]),
                 "vs_baseline": ratio_stats(ps, name, base),
                 "dot_flops_per_step": v["dot_flops"],
                 "dot_flops_vs_baseline": v["dot_flops"] / variants[base]["dot_flops"],
                 "compile_s": v["compile_s"]}
        if v["path"] == "svi":
            entry["svi_over_hand_time"] = ratio_stats(ps, name, f"D{v['D']} {v['loss']} hand")
        elif v["path"] != "hand":
            entry["speedup_over_lib"] = ratio_stats(ps, f"D{v['D']} {v['loss']} hand", name)
        summary[name] = entry
    result.update({"checks": checks, "raw_s_per_block": raw, "summary": summary,
                   "variants": {k: {kk: (vv.tolist() if kk == "first_block_losses" else vv)
                                    for kk, vv in v.items() if kk not in ("fn", "state0")}
                                for k, v in variants.items()}})
    result["machine"]["loadavg_end"] = os.getloadavg()
    result["wall_s"] = time.perf_counter() - t_start

    # ---- print the summary
    print(f"\nmedian over {rounds} interleaved rounds, batch {BATCH}; x base = per-step time / baseline's "
          "(same path, same D), ratio of medians [median of round ratios]; flop x = matmul FLOPs / baseline's")
    for D in DIMS:
        print(f"\nD = {D}")
        print(f"{'loss':9s} {'svi steps/s':>12s} {'svi x base':>17s} {'hand steps/s':>13s} {'hand x base':>17s} "
              f"{'svi/hand time':>14s} {'flop x':>7s}")
        for lname in LOSS_NAMES:
            sv, hd = summary[f"D{D} {lname} svi"], summary[f"D{D} {lname} hand"]
            a, b = sv["vs_baseline"], hd["vs_baseline"]
            print(f"{lname:9s} {sv['steps_per_s_median']:12.1f} {a['ratio_of_medians']:7.2f} "
                  f"[{a['median_of_round_ratios']:6.2f}] {hd['steps_per_s_median']:13.1f} "
                  f"{b['ratio_of_medians']:7.2f} [{b['median_of_round_ratios']:6.2f}] "
                  f"{sv['svi_over_hand_time']['ratio_of_medians']:14.2f} {hd['dot_flops_vs_baseline']:7.2f}")
    side_rows = [k for k, v in variants.items() if v["path"] not in ("svi", "hand")]
    if side_rows:
        print("\nformulations of the trace (hand path); speed-up = library's per-step time / this one's")
        print(f"{'variant':20s} {'steps/s':>9s} {'x base':>8s} {'flop x':>7s} {'speed-up vs lib':>16s}")
        for name in side_rows:
            v = summary[name]
            print(f"{name:20s} {v['steps_per_s_median']:9.2f} {v['vs_baseline']['ratio_of_medians']:8.2f} "
                  f"{v['dot_flops_vs_baseline']:7.2f} {v['speedup_over_lib']['ratio_of_medians']:8.2f} "
                  f"[{v['speedup_over_lib']['median_of_round_ratios']:5.2f}]")
    log(f"wrote {write_result(args.out, result)}")


if __name__ == "__main__":
    main()
