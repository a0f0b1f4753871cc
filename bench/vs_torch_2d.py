"""probdiff against PyTorch + Hugging Face diffusers on 2-D eight Gaussians (optional benchmark).

Run from the repository root:

    python bench/vs_torch_2d.py                 # full run: 6 rounds x 500 steps = 3000 steps each
    python bench/vs_torch_2d.py --quick         # smoke run (< 3 min; 3 x 100 steps, 2 sampling rounds)
    python bench/vs_torch_2d.py --out bench/results/vs_torch_2d.json

Optional: needs ``torch`` and ``diffusers`` (``pip install diffusers``; it does not pull another
torch when one is installed). Without them the script prints a message, writes a JSON with
``"skipped": true`` to ``--out`` (unless that file exists, e.g. from a run with torch) and
exits with status 0.

Same problem everywhere: 20000 points of ``probdiff.data.eight_gaussians(jax.random.key(0), 20000)``
(the same array, as numpy, for torch), batch 512, T = 1000, linear betas 1e-4 .. 0.02, L_simple
loss (sum over the batch of ||eps - eps_theta(x_t, t)||^2, which is what ``DiffusionELBO("simple")``
minimises), Adam lr 1e-3 (betas 0.9/0.999, eps 1e-8 in optax and torch alike). Same network:
``probdiff.nets.MLP(2, key, hidden=(256, 256, 256), time_dim=32)``, i.e.
h0 = W0 x + b0 + U e(t), three hidden layers of 256 with SiLU, sinusoidal e(t) of size 32
(max period 10000), last layer zero-initialised; the torch twin ``TorchMLP`` has the same layers
and parameter count (asserted, recorded) and starts from a copy of the same initial weights
(``recipe.net0``), so all variants start from identical networks.

Training variants (each timed block is ``--steps`` steps; rounds interleaved, order rotated):

A   probdiff: ``recipe = probdiff.recipes.build({})``, ``probdiff.training.fit(recipe.svi, data, steps,
    batch_size=512, rng_key=..., state=previous, steps_per_call=steps)`` (one jitted ``lax.scan``
    block per call, including fit's EMA and NaN guard). One untimed warm-up call compiles the block
    (``fit`` caches it per SVI object), the timed calls then continue from the initial state.
C   hand-written JAX + optax: the same equinox module called directly, t ~ U{1..T},
    eps ~ N(0, I), x_t = sqrt(ab_t) x_0 + sqrt(1 - ab_t) eps, ``jax.value_and_grad`` +
    ``optax.adam(1e-3)``, ``steps`` steps in one jitted ``lax.scan``; minibatches drawn exactly
    as ``fit`` draws them. No EMA.
P   PyTorch eager + diffusers: ``torch.randint`` minibatch, ``t ~ U{0..999}``,
    ``DDPMScheduler.add_noise(x0, noise, t)``, the twin MLP, ``loss.backward()``,
    ``torch.optim.Adam(lr=1e-3)``; ``torch.set_num_threads(os.cpu_count())`` (``--torch-threads``
    to change it). No EMA. Before the rounds, a warm-up on throw-away copies times 20 steps with
    1 thread and with the chosen count and warns when the latter is > 1.5x slower: that happens
    when another busy process shares the cores (OpenMP barriers then stall, 50x was seen), and
    P's timings are then meaningless. Run on a quiet machine.

Sampling: 2000 samples, 1000 steps of ancestral sampling (x_{t-1} = mu_theta(x_t, t) + sigma_t z,
sigma_t^2 = beta_t, no noise on the last step), from each variant's parameters after training:

A   ``jax.jit(lambda params, key: diffusion_from_params(recipe, params).sample(key, (2000,)))``
    (one ``lax.scan``; the parameters are an argument, so one compile serves every parameter set).
P   ``scheduler.set_timesteps(1000)`` and the usual diffusers loop under ``torch.no_grad()``:
    ``for t in scheduler.timesteps: x = scheduler.step(net(x, t + 1), t, x).prev_sample``.

**Timestep mapping.** probdiff counts t = 1..T (``schedule.alpha_bar[t]`` is alpha_bar_t, entry 0 is
the clean point); diffusers counts t_d = 0..T-1, with ``alphas_cumprod[t_d]`` = alpha_bar_{t_d + 1}.
So diffusers' t_d is probdiff's t = t_d + 1. The torch network is always fed t = t_d + 1 (both in
training and in sampling), so the two networks learn the same function eps_theta(x_t, t) of the
same noise level, and diffusers' last step (t_d = 0, no noise) is probdiff's t = 1 (z = 0).
The script checks the mapping: ``alphas_cumprod`` against ``alpha_bar[1:]``, and one
``scheduler.step`` at t_d = 999, 499, 0 against ``probdiff.distributions.mu_from_eps`` at t = t_d + 1.

**diffusers settings.** ``DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear",
beta_start=1e-4, beta_end=0.02, variance_type="fixed_large", clip_sample=False)``. Two defaults are
changed on purpose: ``clip_sample=True`` (the default) clamps the predicted x_0 to [-1, 1] at every
step, which would squash eight Gaussians of radius 2 onto the unit square; ``variance_type=
"fixed_small"`` (sigma_t^2 = beta_tilde_t) would differ from probdiff's default recipe
(``variance="beta"``, sigma_t^2 = beta_t), so ``"fixed_large"`` (beta_t) is used.

Quality (after rounds x steps training steps; 3000 in the full run): energy distance and the
unbiased RBF MMD^2 (``probdiff.data.energy_distance``, ``probdiff.data.mmd_rbf(x, y, 0.5)``)
between the 2000 samples of each sampling round and 2000 fresh data points (a key not used for
the training set). Bandwidth 0.5 lies between the width of one component (0.1) and the gap between
neighbouring means (2 * 2 sin(pi / 8) = 1.53): the kernel then sees mass between or off the modes
and unequal mode weights, where a much smaller h would give a noisy estimate and a much larger
one would only compare the overall mean and covariance. Noise floor: the same distances
between pairs of independent fresh data samples of 2000 (5 pairs). Reported for A's raw Adam
parameters (what P and C also use), and, for information, A's EMA (decay 0.999; after 3000
steps it still carries 0.999^3000 = 5% of the initial weights) and C.

Ratios are ratios of medians of steps/s (or samples/s); the per-round ratios' median is also in
the JSON. Absolute numbers depend on the (shared) machine; compare ratios from the same run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from _env import machine_info, timestamped_log, versions

from probdiff.data import eight_gaussians, energy_distance, mmd_rbf
from probdiff.distributions import mu_from_eps
from probdiff.recipes import build, diffusion_from_params
from probdiff.training import fit, init_state

BATCH = 512
NUM_DATA = 20_000
NUM_SAMPLES = 2000
T = 1000
LR = 1e-3
EMA_DECAY = 0.999
BANDWIDTH = 0.5
NOISE_FLOOR_PAIRS = 5


def block_ready(x):
    return jax.tree_util.tree_map(lambda a: a.block_until_ready() if hasattr(a, "block_until_ready") else a, x)


def optional_imports():
    """(torch, diffusers) or (None, reason) when either is missing."""
    try:
        import diffusers
        import torch
        from diffusers import DDPMScheduler  # noqa: F401  (the class this benchmark needs)
    except ImportError as err:
        return None, f"{type(err).__name__}: {err}"
    return (torch, diffusers), None


# --------------------------------------------------------------------------- the torch twin
def make_torch_twin(torch):
    """The TorchMLP class: probdiff.nets.MLP written in PyTorch, layer for layer."""
    nn = torch.nn

    class TorchMLP(nn.Module):
        """h0 = W0 x + b0 + U e(t); h_k = W_k SiLU(h_{k-1}) + b_k; eps = h_L (as probdiff.nets.MLP)."""

        def __init__(self, data_dim=2, hidden=(256, 256, 256), time_dim=32, max_period=10_000.0):
            super().__init__()
            sizes = (data_dim, *hidden, data_dim)
            self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:], strict=True))
            self.time_proj = nn.Linear(time_dim, hidden[0], bias=False)
            half = time_dim // 2
            freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
            self.register_buffer("freqs", freqs)  # a buffer, not a parameter (computed, as in JAX)

        def forward(self, x, t):
            angles = t.to(x.dtype)[:, None] * self.freqs
            emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)
            h = self.layers[0](x) + self.time_proj(emb)
            for layer in self.layers[1:]:
                h = layer(torch.nn.functional.silu(h))
            return h

        @torch.no_grad()
        def load_from_probdiff(self, net):
            """Copy the weights of a probdiff.nets.MLP (its W are (out, in), as torch's)."""
            for layer, w, b in zip(self.layers, net.weights, net.biases, strict=True):
                layer.weight.copy_(torch.from_numpy(np.array(w)))
                layer.bias.copy_(torch.from_numpy(np.array(b)))
            self.time_proj.weight.copy_(torch.from_numpy(np.array(net.time_proj)))
            return self

    return TorchMLP


def count_params(tree) -> int:
    return sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(eqx.filter(tree, eqx.is_array)))


# --------------------------------------------------------------------------- checks
def check_twin_and_schedule(torch, TorchMLP, scheduler, recipe):
    """Forward equivalence of the twin, and diffusers' schedule / reverse step against probdiff's."""
    out = {}
    # a network with a non-zero last layer (net0's is zero, which would make the check trivial)
    net = recipe.net0
    w_last = jax.random.normal(jax.random.key(11), net.weights[-1].shape) / 16.0
    net = eqx.tree_at(lambda n: n.weights[-1], net, w_last)
    twin = TorchMLP().load_from_probdiff(net)
    x = jax.random.normal(jax.random.key(12), (256, 2))
    t = jax.random.randint(jax.random.key(13), (256,), 1, T + 1)
    y_jax = np.asarray(net(x, t))
    with torch.no_grad():
        y_torch = twin(torch.from_numpy(np.array(x)), torch.from_numpy(np.array(t)).long()).numpy()
    out["twin_forward_max_abs_diff"] = float(np.max(np.abs(y_jax - y_torch)))
    out["twin_forward_max_abs_output"] = float(np.max(np.abs(y_jax)))

    s = recipe.schedule
    out["alphas_cumprod_vs_alpha_bar_max_abs_diff"] = float(
        np.max(np.abs(scheduler.alphas_cumprod.numpy() - np.asarray(s.alpha_bar[1:]))))
    out["betas_vs_beta_max_abs_diff"] = float(np.max(np.abs(scheduler.betas.numpy() - np.asarray(s.beta[1:]))))

    # one reverse step: diffusers at t_d against probdiff's mean at t = t_d + 1 (noise reproduced)
    scheduler.set_timesteps(T)
    xt = np.array(jax.random.normal(jax.random.key(14), (64, 2)))
    eps = np.array(jax.random.normal(jax.random.key(15), (64, 2)))
    steps = {}
    for t_d in (T - 1, T // 2 - 1, 0):
        gen = torch.Generator().manual_seed(t_d)
        with torch.no_grad():
            prev = scheduler.step(torch.from_numpy(eps), scheduler.timesteps[T - 1 - t_d],
                                  torch.from_numpy(xt), generator=gen).prev_sample.numpy()
        z = torch.randn((64, 2), generator=torch.Generator().manual_seed(t_d)).numpy() if t_d > 0 else 0.0
        mu = np.asarray(mu_from_eps(s, t_d + 1, jnp.asarray(xt), jnp.asarray(eps)))
        sigma = float(jnp.sqrt(s.beta[t_d + 1]))
        steps[f"t_d={t_d} (t={t_d + 1})"] = float(np.max(np.abs(prev - (mu + sigma * z))))
    out["reverse_step_vs_probdiff_max_abs_diff"] = steps
    return out


# --------------------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: fewer steps and rounds")
    ap.add_argument("--out", default="bench/results/vs_torch_2d.json")
    ap.add_argument("--rounds", type=int, default=None, help="training rounds (default 6, quick 3)")
    ap.add_argument("--steps", type=int, default=None, help="steps per timed block (default 500, quick 100)")
    ap.add_argument("--sample-rounds", type=int, default=None, help="sampling rounds (default 5, quick 2)")
    ap.add_argument("--torch-threads", type=int, default=None, help="torch.set_num_threads (default os.cpu_count())")
    args = ap.parse_args(argv)
    mode = "quick" if args.quick else "full"
    steps = args.steps or (100 if args.quick else 500)
    rounds = args.rounds or (3 if args.quick else 6)
    sample_rounds = args.sample_rounds or (2 if args.quick else 5)
    t_start = time.perf_counter()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    log = timestamped_log()

    result = {"benchmark": "probdiff vs PyTorch + diffusers, eight Gaussians 2-D", "mode": mode,
              "started_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
    mods, why = optional_imports()
    if mods is None:
        msg = f"skipped: torch and diffusers are optional and not importable here ({why})"
        print(msg)
        result.update({"skipped": True, "reason": why, "versions": versions()})
        if out.exists():  # keep the results of an earlier run with torch
            print(f"{out} exists and is left as it is")
            return 0
        out.write_text(json.dumps(result, indent=1, default=str))
        print(f"wrote {out}")
        return 0
    torch, diffusers = mods
    from diffusers import DDPMScheduler

    torch_threads = args.torch_threads or os.cpu_count()
    torch.set_num_threads(torch_threads)
    ver = versions()
    ver.update({"torch": torch.__version__, "diffusers": diffusers.__version__})
    result.update({"skipped": False, "machine": machine_info(), "versions": ver})
    result["machine"]["torch_num_threads"] = torch.get_num_threads()
    result["machine"]["torch_parallel_info"] = torch.__config__.parallel_info()
    result["parameters"] = {
        "quick": args.quick, "rounds": rounds, "steps_per_block": steps, "train_steps_total": rounds * steps,
        "sample_rounds": sample_rounds, "num_samples": NUM_SAMPLES, "batch": BATCH, "num_data": NUM_DATA,
        "T": T, "lr": LR, "torch_threads": torch_threads, "ema_decay": EMA_DECAY, "mmd_bandwidth": BANDWIDTH,
        "recipe": "probdiff.recipes.build({}) (DEFAULT_CONFIG)",
        "scheduler": "DDPMScheduler(num_train_timesteps=1000, beta_schedule='linear', beta_start=1e-4, "
                     "beta_end=0.02, variance_type='fixed_large', clip_sample=False)",
        "timestep_mapping": "diffusers t_d in 0..999 == probdiff t = t_d + 1; the torch net gets t_d + 1"}

    # ---- common setup
    recipe = build({})
    svi, schedule, net0 = recipe.svi, recipe.schedule, recipe.net0
    params0, static = eqx.partition(net0, eqx.is_array)
    data = eight_gaussians(jax.random.key(0), NUM_DATA)
    data_np = np.array(data)  # a writable copy for torch.from_numpy
    rng_fit = jax.random.key(1)  # fit's rng_key: (key_data, key_init) = split(rng_fit)
    key_data, key_init = jax.random.split(rng_fit)

    def batch_at(step):  # fit's minibatch of step k
        return data[jax.random.randint(jax.random.fold_in(key_data, step), (BATCH,), 0, NUM_DATA)]

    TorchMLP = make_torch_twin(torch)
    scheduler = DDPMScheduler(num_train_timesteps=T, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                              variance_type="fixed_large", clip_sample=False)
    n_jax = count_params(net0)
    n_torch = sum(p.numel() for p in TorchMLP().parameters())
    assert n_jax == n_torch, (n_jax, n_torch)
    result["param_count"] = {"probdiff_MLP": n_jax, "TorchMLP": n_torch}
    log(f"parameters: probdiff MLP {n_jax}, TorchMLP {n_torch}")
    checks = check_twin_and_schedule(torch, TorchMLP, scheduler, recipe)
    result["checks"] = checks
    log(f"checks: {json.dumps(checks)}")

    # ---- A: fit
    st0 = init_state(svi, key_init, batch_at(0))  # exactly what fit(state=None) would build
    t0 = time.perf_counter()
    block_ready(fit(svi, data, steps, batch_size=BATCH, rng_key=rng_fit, state=st0, ema_decay=EMA_DECAY,
                    steps_per_call=steps, progress_bar=False).state)
    warm = {"A: first fit call (compile + one block)": time.perf_counter() - t0}

    # ---- C: hand-written JAX + optax
    opt = optax.adam(LR)
    ab = schedule.alpha_bar

    def c_loss(params, key, x0):
        k_t, k_eps = jax.random.split(key)
        t = jax.random.randint(k_t, (x0.shape[0],), 1, T + 1)
        eps = jax.random.normal(k_eps, x0.shape, x0.dtype)
        a = ab[t][:, None]
        x_t = jnp.sqrt(a) * x0 + jnp.sqrt(1.0 - a) * eps
        return jnp.sum((eps - eqx.combine(params, static)(x_t, t)) ** 2)

    def c_step(carry, _):
        params, opt_state, key, step = carry
        key, sub = jax.random.split(key)
        loss, grads = jax.value_and_grad(c_loss)(params, sub, batch_at(step))
        updates, opt_state = opt.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state, key, step + 1), loss

    c0 = (params0, opt.init(params0), jax.random.key(2), jnp.zeros((), jnp.int32))
    t0 = time.perf_counter()
    c_block = jax.jit(lambda carry: jax.lax.scan(c_step, carry, None, length=steps)).lower(c0).compile()
    warm["C: compile of the block"] = time.perf_counter() - t0

    # ---- P: torch eager + diffusers add_noise
    data_t = torch.from_numpy(data_np)
    gen = torch.Generator().manual_seed(0)

    def make_p():
        net = TorchMLP().load_from_probdiff(net0)
        return net, torch.optim.Adam(net.parameters(), lr=LR)

    def p_train(net, adam, n):
        losses = []
        for _ in range(n):
            x0 = data_t[torch.randint(0, NUM_DATA, (BATCH,), generator=gen)]
            t_d = torch.randint(0, T, (BATCH,), generator=gen)  # diffusers' 0-based timesteps
            noise = torch.randn(x0.shape, generator=gen)
            x_t = scheduler.add_noise(x0, noise, t_d)
            loss = ((noise - net(x_t, t_d + 1)) ** 2).sum()  # the net sees probdiff's t = t_d + 1
            adam.zero_grad(set_to_none=True)
            loss.backward()
            adam.step()
            losses.append(loss.detach())
        return float(torch.stack(losses).mean())

    # warm-up on a throw-away copy (allocator, thread pool), which doubles as a probe of torch's
    # threading: on an oversubscribed machine (another process busy on the same cores) OpenMP's
    # barriers make multi-threaded torch steps many times slower than single-threaded ones.
    n_probe = 20
    probe = {}
    for nt in sorted({1, torch_threads}):
        torch.set_num_threads(nt)
        p_train(*make_p(), 5)
        t0 = time.perf_counter()
        p_train(*make_p(), n_probe)
        probe[nt] = (time.perf_counter() - t0) / n_probe * 1e3
    torch.set_num_threads(torch_threads)
    result["torch_thread_probe_ms_per_step"] = probe
    slow = probe[torch_threads] > 1.5 * probe[1]
    result["torch_thread_probe_warning"] = slow
    if slow:
        print(f"WARNING: torch with {torch_threads} threads took {probe[torch_threads]:.1f} ms/step against "
              f"{probe[1]:.1f} ms/step with 1 thread: the cores are probably shared with another busy "
              f"process, so P's timings are not representative (try --torch-threads 1 or a quiet machine)")
    warm["P: warm-up (5 + 20 steps per thread count, throw-away copies)"] = sum(probe.values()) * n_probe / 1e3
    p_net, p_adam = make_p()
    result["warmup_s"] = warm
    log("warm-up: " + ", ".join(f"{k} {v:.2f}s" for k, v in warm.items()))

    # ---- interleaved training rounds
    state_a, carry_c = st0, c0
    raw = {"A": [], "C": [], "P": []}
    mean_loss = {"A": [], "C": [], "P": []}
    names = list(raw)
    for r in range(rounds):
        for name in names[r % 3:] + names[: r % 3]:
            t0 = time.perf_counter()
            if name == "A":
                res = fit(svi, data, steps, batch_size=BATCH, rng_key=rng_fit, state=state_a,
                          ema_decay=EMA_DECAY, steps_per_call=steps, progress_bar=False)
                state_a = block_ready(res.state)
                loss = float(np.mean(res.losses))
            elif name == "C":
                carry_c, ls = c_block(carry_c)
                block_ready((carry_c, ls))
                loss = float(jnp.mean(ls))
            else:
                loss = p_train(p_net, p_adam, steps)
            raw[name].append(time.perf_counter() - t0)
            mean_loss[name].append(loss)
        log(f"train round {r + 1}/{rounds}: " + "  ".join(
            f"{k} {steps / v[-1]:.1f} steps/s (loss {mean_loss[k][-1]:.1f})" for k, v in raw.items()))

    sps = {k: steps / statistics.median(v) for k, v in raw.items()}

    def ratio(a, b):  # speed of a / speed of b (> 1: a is faster)
        return {"ratio_of_medians": sps[a] / sps[b],
                "median_of_round_ratios": statistics.median(tb / ta for ta, tb in zip(raw[a], raw[b], strict=True))}

    result["training"] = {
        "raw_s_per_block": raw, "mean_loss_per_block": mean_loss,
        "steps_per_s": {k: {"median": sps[k], "min": steps / max(v), "max": steps / min(v)} for k, v in raw.items()},
        "ratios": {"A/P": ratio("A", "P"), "C/P": ratio("C", "P"), "A/C": ratio("A", "C")}}

    # ---- sampling: 2000 samples x 1000 steps, probdiff vs diffusers
    params_a = svi.optim.get_params(state_a.svi_state.optim_state)
    params_sets = {"A": params_a, "A_ema": state_a.ema, "C": {"eps_net$params": carry_c[0]}}
    sample_jax = jax.jit(lambda params, key: diffusion_from_params(recipe, params).sample(key, (NUM_SAMPLES,)))
    t0 = time.perf_counter()
    sample_jax = sample_jax.lower(params_a, jax.random.key(0)).compile()
    compile_sample = time.perf_counter() - t0
    scheduler.set_timesteps(T)
    sample_gen = torch.Generator()

    @torch.no_grad()
    def sample_torch(seed):
        sample_gen.manual_seed(seed)
        x = torch.randn((NUM_SAMPLES, 2), generator=sample_gen)
        for t in scheduler.timesteps:  # 999, ..., 0 (diffusers' 0-based t)
            eps = p_net(x, (t + 1).expand(NUM_SAMPLES))
            x = scheduler.step(eps, t, x, generator=sample_gen).prev_sample
        return x.numpy()

    log(f"sampling: compile of the probdiff sampler {compile_sample:.2f}s")
    raw_s = {"A": [], "P": []}
    samples = {"A": [], "P": []}
    for r in range(sample_rounds):
        for name in (["A", "P"] if r % 2 == 0 else ["P", "A"]):
            t0 = time.perf_counter()
            if name == "A":
                x = np.asarray(block_ready(sample_jax(params_a, jax.random.key(100 + r))))
            else:
                x = sample_torch(100 + r)
            raw_s[name].append(time.perf_counter() - t0)
            samples[name].append(x)
        log(f"sample round {r + 1}/{sample_rounds}: A {raw_s['A'][-1]:.2f}s  P {raw_s['P'][-1]:.2f}s")
    extra = {k: np.asarray(sample_jax(params_sets[k], jax.random.key(200))) for k in ("A_ema", "C")}
    sps_s = {k: NUM_SAMPLES / statistics.median(v) for k, v in raw_s.items()}
    result["sampling"] = {
        "compile_s_probdiff": compile_sample, "raw_s": raw_s,
        "median_s": {k: statistics.median(v) for k, v in raw_s.items()},
        "samples_per_s": sps_s,
        "ratio_A/P": {"ratio_of_medians": sps_s["A"] / sps_s["P"],
                      "median_of_round_ratios": statistics.median(
                          p / a for a, p in zip(raw_s["A"], raw_s["P"], strict=True))}}

    # ---- quality: energy distance and MMD to fresh data
    fresh = eight_gaussians(jax.random.key(1000), NUM_SAMPLES)

    def dist(x, y):
        return {"energy": float(energy_distance(x, y)), "mmd_rbf": float(mmd_rbf(x, y, BANDWIDTH))}

    quality = {}
    for name in ("A", "P"):
        per = [dist(jnp.asarray(x), fresh) for x in samples[name]]
        finite = [bool(np.all(np.isfinite(x))) for x in samples[name]]
        quality[name] = {"per_sampling_round": per, "all_finite": all(finite),
                         "median": {m: statistics.median(d[m] for d in per) for m in ("energy", "mmd_rbf")}}
    for name, x in extra.items():
        d = dist(jnp.asarray(x), fresh)
        quality[name] = {"per_sampling_round": [d], "all_finite": bool(np.all(np.isfinite(x))), "median": d}
    floor = [dist(eight_gaussians(jax.random.key(2000 + i), NUM_SAMPLES), fresh) for i in range(NOISE_FLOOR_PAIRS)]
    quality["noise_floor_data_vs_data"] = {
        "per_pair": floor, "median": {m: statistics.median(d[m] for d in floor) for m in ("energy", "mmd_rbf")},
        "max_abs": {m: max(abs(d[m]) for d in floor) for m in ("energy", "mmd_rbf")}}
    quality["after_train_steps"] = rounds * steps
    result["quality"] = quality
    result["machine"]["loadavg_end"] = os.getloadavg()
    result["wall_s"] = time.perf_counter() - t_start

    # ---- summary
    tr = result["training"]
    print(f"\n[{mode}] training: steps/s, median over {rounds} interleaved rounds of {steps} steps "
          f"(batch {BATCH}, T = {T})")
    for k in raw:
        s = tr["steps_per_s"][k]
        print(f"  {k}  {s['median']:8.1f}  ({s['min']:.1f}-{s['max']:.1f})")
    for k, v in tr["ratios"].items():
        print(f"  {k}: {v['ratio_of_medians']:.2f}  (median of round ratios {v['median_of_round_ratios']:.2f})")
    sm = result["sampling"]
    print(f"sampling {NUM_SAMPLES} x {T} steps: probdiff {sm['median_s']['A']:.2f}s, diffusers "
          f"{sm['median_s']['P']:.2f}s, A/P speed {sm['ratio_A/P']['ratio_of_medians']:.2f} "
          f"(median of {sample_rounds} rounds)")
    print(f"quality after {rounds * steps} steps, vs {NUM_SAMPLES} fresh data points "
          f"(energy distance, MMD^2 RBF h={BANDWIDTH}):")
    for k in ("A", "P", "A_ema", "C"):
        q = quality[k]["median"]
        print(f"  {k:6s} energy {q['energy']:.4f}  mmd {q['mmd_rbf']:.5f}")
    q = quality["noise_floor_data_vs_data"]
    print(f"  floor  energy {q['median']['energy']:.4f} (max |.| {q['max_abs']['energy']:.4f})  "
          f"mmd {q['median']['mmd_rbf']:.5f} (max |.| {q['max_abs']['mmd_rbf']:.5f})")
    out.write_text(json.dumps(result, indent=1, default=str))
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
