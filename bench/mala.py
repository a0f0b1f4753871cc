"""MALA: probdiff against blackjax and NumPyro's NUTS, in effective samples per second.

Run from the repository root:

    python bench/mala.py                     # full run (~3.5 min on 2 CPU cores)
    python bench/mala.py --quick             # smoke run (~1 min; short blocks, 2 rounds)
    python bench/mala.py --out bench/results/mala.json

Needs ``blackjax`` (``pip install blackjax``, or the package's ``[blackjax]`` extra).

Targets (float32, as everything else in the package):

gauss50  a correlated Gaussian N(0, S) in D = 50: S = Q diag(lambda) Q^T with Q a fixed random
         rotation (QR of a Gaussian matrix, seed 0) and lambda geometric from 1/20 to 1, i.e.
         condition number 20. Given as ``potential_fn(z) = z^T S^-1 z / 2``. Exact moments:
         E z = 0, E z_i^2 = S_ii.
banana   x1 ~ N(0, 1), x2 | x1 ~ N((x1^2 - 1) / 2, 1), written as a NumPyro model (two sample
         sites). Exact moments: E x = 0, E x1^2 = 1, E x2^2 = 1 + Var(x1^2) / 4 = 1.5.

Step size. One pilot per target: probdiff's ``MALA(adapt_step_size=True)`` (dual averaging to
0.574) under ``MCMC``; eta is the geometric mean of the chains' final step sizes, rounded to two
significant digits (``--eta-gauss`` / ``--eta-banana`` override it). Every MALA variant then
uses that eta, fixed: probdiff's ``MALA(step_size=eta, adapt_step_size=False)`` and
``blackjax.mala(logdensity, eta / 2)`` (blackjax moves x + s grad log p + sqrt(2 s) eps, probdiff
x + eta/2 grad log p + sqrt(eta) eps: s = eta / 2 is the same chain law).

Variants (``--chains`` chains each, vectorised; every timed block draws ``--samples`` draws per
chain, continuing the chains of the previous block):

P        probdiff ``MALA`` under ``numpyro.infer.MCMC(..., num_chains=C, chain_method="vectorized",
         progress_bar=False)``; gauss50 through ``potential_fn``, banana through the model. A block
         is ``mcmc.post_warmup_state = mcmc.last_state; mcmc.run(key, extra_fields=("accept_prob",))``.
BJ       the reference: ``blackjax.mala(logdensity, eta / 2)``, its ``step`` ``jax.vmap``-ed over the
         chains inside a hand-written jitted ``jax.lax.scan`` over the steps (one key per step,
         split into one key per chain), collecting the positions and ``info.acceptance_rate``;
         compiled once with ``jit(...).lower(...).compile()``. For banana its log density is
         ``-potential_fn`` from ``numpyro.infer.util.initialize_model(key, model, dynamic_args=True)``
         (the recipe of blackjax's documentation for NumPyro models, and the same function P's
         kernel builds), on the same dict of sites.
BJ_numpyro  the same blackjax algorithm through ``probdiff.infer.BlackJAXKernel`` under ``MCMC``, run
         like P: the cost of the adapter plus NumPyro's driver.
NUTS     ``numpyro.infer.NUTS`` with its defaults (step size and diagonal mass matrix adapted
         during ``--nuts-warmup`` warm-up steps, target acceptance 0.8, max tree depth 10), run
         like P but with ``--nuts-samples`` draws per block (a NUTS draw costs tens of gradients).
P_scan   diagnostic, not a goal: probdiff's MALA *kernel* (``kernel.init`` then ``kernel.sample``,
         the function NumPyro's driver calls) inside the same hand-written scan as BJ. P - P_scan is
         the cost of NumPyro's driver, P_scan - BJ the cost of the kernel's own step.

All variants start from the same points. Untimed before the rounds: the MALA variants run one
block of burn-in (compiling), NUTS its warm-up plus one block.

**Timing, and NumPyro's recompilation.** ``MCMC.run`` with ``progress_bar=False`` calls
``numpyro.util.fori_collect``, which wraps its (cached) loop body in a fresh ``jax.jit`` on every
call and passes that wrapper as a static argument of the jitted loop ``_fori_collect_loop``;
``jax.jit(f) != jax.jit(f)``, so *every* ``mcmc.run`` -- also a second run of the same ``MCMC``
object from ``post_warmup_state`` -- retraces and recompiles the whole sampling loop (numpyro
0.22.0, jax 0.10.2; about 1-2 s for the MALA kernels and 2-6 s for NUTS here, independent of the
number of draws). A listener on ``jax.monitoring``'s compile events (``jaxpr_trace_duration``,
``jaxpr_to_mlir_module_duration``, ``backend_compile_duration``) records each event's interval;
the *sampling time* of a block is its wall time minus the union of those intervals, i.e. what is
left when compilation is taken out, NumPyro's Python-side work per run included. The JSON also
keeps the raw wall time and the compile time of every block. BJ and P_scan are compiled once and
never recompile (checked: no compile event inside their blocks). A block ends when its draws,
extra fields and last state are ready (``block_until_ready``); ESS and the checks are computed
afterwards, untimed.

**ESS.** ``numpyro.diagnostics.effective_sample_size`` (Geyer's initial monotone sequence,
across chains) on each block's draws, shape (chains, draws, D), per coordinate: min and median
over coordinates, and the min over coordinates of the ESS of x_i^2. ESS/s of a block = ESS /
sampling time; the summary gives the median over the blocks and the ratio of the medians, and
"pooled": the ESS of all blocks of a variant concatenated (they are consecutive stretches of the
same chains) over the summed sampling time. Ratios also come as the median of the per-round
ratios and as the ratio of the best blocks (the least contended block of each variant).
Draws/s (chains x draws / s) is reported too: P, BJ, BJ_numpyro and P_scan run the same chain
law, so their ESS differ only by Monte Carlo noise and draws/s is the noise-free part of their
comparison.

**Checks (same run).** Same chain law: one step of probdiff's MALA and of
``blackjax.mala(eta / 2)`` from 256 exact draws of p with the same Gaussian noise
(``jax.random.normal`` and ``blackjax.util.normal`` patched to return it; four noise draws) must
give the same acceptance probabilities and, where both accept, the same points (to 1e-4,
float32). On the pooled draws of every variant: z = (sample mean of f - exact) / MCSE,
MCSE = sd(f) / sqrt(ESS(f)), for f = x_i and f = x_i^2, every coordinate; pass if max |z| < 4.5
(the largest of ~100 standard normals is ~2.5-3.3). Acceptance: the mean acceptance probability
of P, BJ_numpyro and P_scan against BJ's, z = difference / sqrt(MCSE^2 + MCSE^2), MCSE by batch
means with one batch per chain and block; pass if |z| < 4. BJ and P_scan: no compile event
inside any of their blocks.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from _env import CompileClock, machine_info, timestamped_log, versions
from numpyro.diagnostics import effective_sample_size
from numpyro.infer import MCMC, NUTS
from numpyro.infer.util import initialize_model

from probdiff.infer import MALA, BlackJAXKernel

VARIANTS = ("P", "BJ", "BJ_numpyro", "NUTS", "P_scan")
Z_MOMENTS_MAX = 4.5
Z_ACCEPT_MAX = 4.0


# --------------------------------------------------------------------------- timing
def block_ready(x):
    return jax.tree_util.tree_map(lambda a: a.block_until_ready() if hasattr(a, "block_until_ready") else a, x)


# --------------------------------------------------------------------------- targets
@dataclass
class Target:
    name: str
    dim: int
    potential_fn: object = None  # U(z) on an array z (gauss50)
    model: object = None  # a NumPyro model (banana)
    sites: tuple = ()  # the model's sites, in the order of the coordinates
    exact_mean: np.ndarray = None
    exact_second: np.ndarray = None  # E z_i^2
    exact_draws: object = None  # (key, n) -> n exact draws, shape (n, D)
    info: dict = field(default_factory=dict)

    def to_array(self, z):
        """Draws as an array (..., D): the array itself, or the model's sites stacked."""
        if self.model is None:
            return np.asarray(z)
        return np.stack([np.asarray(z[s]) for s in self.sites], axis=-1)

    def init_params(self, key, chains, exact=False):
        """Starting points: N(0, I) (overdispersed in the Gaussian's short directions), or exact draws."""
        z = self.exact_draws(key, chains) if exact else jax.random.normal(key, (chains, self.dim))
        return z if self.model is None else {s: z[:, i] for i, s in enumerate(self.sites)}

    def logdensity_fn(self):
        """log p(z) for blackjax, on the same z (array, or dict of sites) as the kernels."""
        if self.model is None:
            pot = self.potential_fn
        else:
            pot = initialize_model(jax.random.key(0), self.model, dynamic_args=True).potential_fn()
        return lambda z: -pot(z)

    def kernel_kwargs(self):
        return {"potential_fn": self.potential_fn} if self.model is None else {"model": self.model}


def make_gauss(dim=50, cond=20.0, seed=0):
    rng = np.random.default_rng(seed)
    q, r = np.linalg.qr(rng.normal(size=(dim, dim)))
    q = q * np.sign(np.diag(r))  # a Haar-distributed rotation
    lam = np.geomspace(1.0 / cond, 1.0, dim)
    cov = (q * lam) @ q.T
    prec = (q / lam) @ q.T
    prec32 = jnp.asarray(prec, jnp.float32)

    def potential(z):
        return 0.5 * z @ (prec32 @ z)

    chol = jnp.asarray(np.linalg.cholesky(cov), jnp.float32)

    def draws(key, n):
        return jax.random.normal(key, (n, dim)) @ chol.T

    return Target(f"gauss{dim}", dim, potential_fn=potential, exact_mean=np.zeros(dim),
                  exact_second=np.diag(cov).copy(), exact_draws=draws,
                  info={"covariance": f"Q diag(geomspace(1/{cond:g}, 1, {dim})) Q^T, Q from QR of a "
                        f"N(0,1) {dim}x{dim} matrix (numpy seed {seed})", "condition_number": cond,
                        "diag_cov_min": float(np.diag(cov).min()), "diag_cov_max": float(np.diag(cov).max())})


def banana_model():
    x1 = numpyro.sample("x1", dist.Normal(0.0, 1.0))
    numpyro.sample("x2", dist.Normal(0.5 * (x1**2 - 1.0), 1.0))


def banana_draws(key, n):
    e = jax.random.normal(key, (n, 2))
    return jnp.stack([e[:, 0], 0.5 * (e[:, 0] ** 2 - 1.0) + e[:, 1]], axis=-1)


def make_banana():
    return Target("banana", 2, model=banana_model, sites=("x1", "x2"), exact_mean=np.zeros(2),
                  exact_second=np.array([1.0, 1.5]), exact_draws=banana_draws,
                  info={"model": "x1 ~ N(0, 1), x2 | x1 ~ N((x1^2 - 1) / 2, 1) (NumPyro model)"})


# --------------------------------------------------------------------------- variants
class NumpyroRunner:
    """A kernel under numpyro.infer.MCMC; blocks continue from the last state."""

    def __init__(self, kernel, target, chains, num_warmup, num_samples, extra_fields):
        self.target = target
        self.extra_fields = extra_fields
        self.mcmc = MCMC(kernel, num_warmup=num_warmup, num_samples=num_samples, num_chains=chains,
                         chain_method="vectorized", progress_bar=False)

    def warm(self, key, init_params):
        self.mcmc.run(key, init_params=init_params, extra_fields=self.extra_fields)
        block_ready((self.mcmc.get_samples(group_by_chain=True), self.mcmc.last_state))

    def block(self, key):
        self.mcmc.post_warmup_state = self.mcmc.last_state
        self.mcmc.run(key, extra_fields=self.extra_fields)
        out = (self.mcmc.get_samples(group_by_chain=True), self.mcmc.get_extra_fields(group_by_chain=True))
        block_ready((out, self.mcmc.last_state))
        return out

    def convert(self, out):
        z, extra = out
        acc = np.asarray(extra["accept_prob"], np.float64)
        steps = np.asarray(extra["num_steps"]) if "num_steps" in extra else None
        return self.target.to_array(z), acc, steps


class ScanRunner:
    """A step function vmapped over chains inside a hand-written jitted lax.scan (compiled once)."""

    def __init__(self, step_one, state, target, chains, num_samples):
        self.target = target

        def run(state, key):
            def body(s, k):
                s, (pos, acc) = step_one(s, k)
                return s, (pos, acc)

            keys = jax.random.split(key, num_samples)
            s, (pos, acc) = jax.lax.scan(body, state, keys)
            pos = jax.tree.map(lambda a: jnp.swapaxes(a, 0, 1), pos)  # (chains, draws, ...) as MCMC
            return s, pos, jnp.swapaxes(acc, 0, 1)

        t0 = time.perf_counter()
        self.fn = jax.jit(run).lower(state, jax.random.key(0)).compile()
        self.compile_s = time.perf_counter() - t0
        self.state = state

    def warm(self, key, init_params=None):
        self.state, _, _ = block_ready(self.fn(self.state, key))

    def block(self, key):
        self.state, pos, acc = block_ready(self.fn(self.state, key))
        return pos, acc

    def convert(self, out):
        pos, acc = out
        return self.target.to_array(pos), np.asarray(acc, np.float64), None


def make_bj(target, eta, chains, num_samples, init_params):
    import blackjax

    algorithm = blackjax.mala(target.logdensity_fn(), eta / 2.0)

    def step_one(states, key):
        keys = jax.random.split(key, chains)
        states, info = jax.vmap(algorithm.step)(keys, states)
        return states, (states.position, info.acceptance_rate)

    return ScanRunner(step_one, jax.vmap(algorithm.init)(init_params), target, chains, num_samples)


def make_p_scan(target, eta, chains, num_samples, init_params):
    kernel = MALA(**target.kernel_kwargs(), step_size=eta, adapt_step_size=False)
    state = kernel.init(jax.random.split(jax.random.key(7), chains), 0, init_params)

    def step_one(state, key):  # the key argument is unused: the kernel carries its own keys
        state = kernel.sample(state, (), {})
        return state, (state.z, state.accept_prob)

    return ScanRunner(step_one, state, target, chains, num_samples)


# --------------------------------------------------------------------------- statistics
def ess_stats(x, chunk=10):
    """x: (chains, draws, D) draws. ESS per coordinate of x and of x^2 (a few coordinates at a time)."""
    e1, e2 = [], []
    for j in range(0, x.shape[-1], chunk):
        xj = np.asarray(x[..., j:j + chunk], np.float64)
        e1.append(np.asarray(effective_sample_size(xj)))
        e2.append(np.asarray(effective_sample_size(xj**2)))
    return np.concatenate(e1), np.concatenate(e2)


def moment_check(x, target):
    """z-scores of the sample mean of x_i and x_i^2 against the exact values (MCSE from the ESS)."""
    e1, e2 = ess_stats(x)
    out = {}
    worst = 0.0
    for name, power, exact, ess in (("mean", 1, target.exact_mean, e1), ("second_moment", 2, target.exact_second, e2)):
        flat = np.asarray(x, np.float64).reshape(-1, x.shape[-1]) ** power
        est = flat.mean(0)
        mcse = flat.std(0) / np.sqrt(ess)
        z = (est - exact) / mcse
        worst = max(worst, float(np.max(np.abs(z))))
        out[name] = {"max_abs_z": float(np.max(np.abs(z))), "max_abs_err": float(np.max(np.abs(est - exact))),
                     "median_mcse": float(np.median(mcse))}
        if target.dim <= 4:
            out[name].update({"estimate": est.tolist(), "exact": np.asarray(exact).tolist(), "z": z.tolist()})
    out["max_abs_z"] = worst
    out["pass"] = worst < Z_MOMENTS_MAX
    return out, (e1, e2)


def accept_summary(blocks):
    """Mean acceptance probability and its MCSE by batch means: one batch per chain and block
    (a block is thousands of steps, far longer than the autocorrelation time)."""
    means = np.concatenate([b.mean(axis=1) for b in blocks])
    return float(means.mean()), float(means.std(ddof=1) / math.sqrt(means.size)), int(means.size)


# --------------------------------------------------------------------------- same proposal, same acceptance
@contextlib.contextmanager
def fixed_normal(xi):
    """Make probdiff's noise and blackjax's (blackjax.util.normal) equal xi.

    probdiff's MALA makes its noise as sqrt(2) erfinv(u) from one uniform draw per step (as
    jax.random.normal does internally), so jax.scipy.special.erfinv is replaced by xi / sqrt(2).
    """
    import blackjax.util as bju

    saved = jax.scipy.special.erfinv, bju.normal

    def fake_normal(key, shape=(), dtype=float):
        assert tuple(shape) == xi.shape, (shape, xi.shape)
        return xi.astype(dtype)

    def fake_erfinv(u):
        assert tuple(u.shape) == xi.shape, (u.shape, xi.shape)
        return (xi / np.sqrt(2.0)).astype(u.dtype)

    jax.scipy.special.erfinv, bju.normal = fake_erfinv, fake_normal
    try:
        yield
    finally:
        jax.scipy.special.erfinv, bju.normal = saved


def one_step_equivalence(target, eta, points=256, noises=4, seed=3):
    """One step of probdiff's MALA and of blackjax.mala(eta / 2) from the same points with the same
    Gaussian noise: the acceptance probabilities must agree, and so must the moved points where both
    accepted. Noise xi is shared by all points of a batch (four batches); the points are exact
    draws from p."""
    import blackjax

    key = jax.random.key(seed)
    k_x, k_xi, k_s = jax.random.split(key, 3)
    x0 = target.init_params(k_x, points, exact=True)  # points from p: typical acceptance
    kernel = MALA(**target.kernel_kwargs(), step_size=eta, adapt_step_size=False)
    state = kernel.init(jax.random.split(k_s, points), 0, x0)
    algorithm = blackjax.mala(target.logdensity_fn(), eta / 2.0)
    bstate = jax.vmap(algorithm.init)(x0)
    d_acc, d_pos, n_both, accs = 0.0, 0.0, 0, []
    for xi in jax.random.normal(k_xi, (noises, target.dim)):
        with fixed_normal(xi):
            new = kernel.sample(state, (), {})
            bnew, info = jax.vmap(algorithm.step)(jax.random.split(k_s, points), bstate)
        a_p, a_b = np.asarray(new.accept_prob), np.asarray(info.acceptance_rate)
        moved_p = target.to_array(new.z) != target.to_array(state.z)
        moved_b = target.to_array(bnew.position) != target.to_array(bstate.position)
        both = np.all(moved_p, -1) & np.all(moved_b, -1)
        d_acc = max(d_acc, float(np.max(np.abs(a_p - a_b))))
        if both.any():
            diff = np.abs(target.to_array(new.z)[both] - target.to_array(bnew.position)[both])
            d_pos = max(d_pos, float(diff.max()))
        n_both += int(both.sum())
        accs.append(float(a_p.mean()))
    return {"points": points, "noises": noises, "max_abs_diff_accept_prob": d_acc,
            "max_abs_diff_position_both_accepted": d_pos, "pairs_both_accepted": n_both,
            "mean_accept_prob": float(np.mean(accs)), "pass": d_acc < 1e-4 and d_pos < 1e-4}


# --------------------------------------------------------------------------- pilot
def pilot_eta(target, chains, warmup, samples, init_params, key):
    kernel = MALA(**target.kernel_kwargs(), step_size=0.01, adapt_step_size=True)
    mcmc = MCMC(kernel, num_warmup=warmup, num_samples=samples, num_chains=chains, chain_method="vectorized",
                progress_bar=False)
    mcmc.run(key, init_params=init_params, extra_fields=("accept_prob",))
    steps = np.asarray(mcmc.last_state.step_size, np.float64)
    eta_raw = float(np.exp(np.mean(np.log(steps))))
    eta = float(f"{eta_raw:.2g}")
    return eta, {"eta_raw": eta_raw, "eta_per_chain": steps.tolist(), "eta": eta, "warmup": warmup,
                 "samples": samples,
                 "pilot_accept_after_warmup": float(np.mean(mcmc.get_extra_fields()["accept_prob"]))}


# --------------------------------------------------------------------------- one target
def run_target(target, args, clock, log, seed):
    chains, n = args.chains, args.samples
    key = jax.random.key(seed)
    k_init, k_pilot, k_warm, k_rounds = jax.random.split(key, 4)
    init = target.init_params(k_init, chains)
    res = {"target": target.name, "dim": target.dim, "target_info": target.info}

    eta_override = getattr(args, f"eta_{target.name.rstrip('0123456789')}", None)
    if eta_override:
        eta, pilot = eta_override, {"eta": eta_override, "from": "command line"}
    else:
        t0 = time.perf_counter()
        eta, pilot = pilot_eta(target, chains, args.pilot_warmup, args.pilot_samples, init, k_pilot)
        pilot["wall_s"] = time.perf_counter() - t0
    res["eta"] = eta
    res["blackjax_step_size"] = eta / 2.0
    res["pilot"] = pilot
    log(f"{target.name}: eta = {eta:g} (blackjax step_size {eta / 2:g}); pilot {json.dumps(pilot)[:200]}")
    res["one_step_equivalence"] = one_step_equivalence(target, eta)
    log(f"{target.name}: one step, same noise, probdiff vs blackjax: {json.dumps(res['one_step_equivalence'])}")

    # ---- build and warm every variant (compile + burn-in), untimed
    runners, warm = {}, {}
    kk = jax.random.split(k_warm, len(VARIANTS))
    for i, name in enumerate(VARIANTS):
        t0 = time.perf_counter()
        if name == "P":
            r = NumpyroRunner(MALA(**target.kernel_kwargs(), step_size=eta, adapt_step_size=False), target,
                              chains, 0, n, ("accept_prob",))
        elif name == "BJ_numpyro":
            import blackjax

            kern = BlackJAXKernel(lambda lp: blackjax.mala(lp, eta / 2.0), **target.kernel_kwargs())
            r = NumpyroRunner(kern, target, chains, 0, n, ("accept_prob",))
        elif name == "NUTS":
            r = NumpyroRunner(NUTS(**target.kernel_kwargs()), target, chains, args.nuts_warmup,
                              args.nuts_samples, ("accept_prob", "num_steps"))
        elif name == "BJ":
            r = make_bj(target, eta, chains, n, init)
        else:
            r = make_p_scan(target, eta, chains, n, init)
        r.warm(kk[i], init)
        t1 = time.perf_counter()
        warm[name] = {"wall_s": t1 - t0, "compile_s": getattr(r, "compile_s", None) or clock.compile_seconds(t0, t1)}
        runners[name] = r
        log(f"{target.name}: warm-up {name}: {t1 - t0:.2f}s (compile {warm[name]['compile_s']:.2f}s)")
    res["warmup"] = warm

    # ---- interleaved rounds, order rotated
    raw = {v: {"wall_s": [], "compile_s": [], "compile_events": [], "sample_s": [], "ess_min": [],
               "ess_median": [], "ess_sq_min": [], "accept_mean": [], "draws": []} for v in VARIANTS}
    pooled = {v: {"x": [], "acc": [], "steps": []} for v in VARIANTS}
    names = list(VARIANTS)
    round_keys = jax.random.split(k_rounds, args.rounds)
    loadavg = []
    for rd in range(args.rounds):
        order = names[rd % len(names):] + names[: rd % len(names)]
        for name in order:
            runner = runners[name]
            k = jax.random.fold_in(round_keys[rd], VARIANTS.index(name))
            t0 = time.perf_counter()
            out = runner.block(k)
            t1 = time.perf_counter()
            comp = clock.compile_seconds(t0, t1)
            x, acc, steps = runner.convert(out)
            e1, e2 = ess_stats(x)
            sample_s = (t1 - t0) - comp
            d = raw[name]
            d["wall_s"].append(t1 - t0)
            d["compile_s"].append(comp)
            d["compile_events"].append(clock.count(t0, t1))
            d["sample_s"].append(sample_s)
            d["ess_min"].append(float(e1.min()))
            d["ess_median"].append(float(np.median(e1)))
            d["ess_sq_min"].append(float(e2.min()))
            d["accept_mean"].append(float(acc.mean()))
            d["draws"].append(int(x.shape[0] * x.shape[1]))
            pooled[name]["x"].append(x.astype(np.float32))
            pooled[name]["acc"].append(acc)
            if steps is not None:
                pooled[name]["steps"].append(steps)
        loadavg.append(os.getloadavg()[0])
        log(f"{target.name} round {rd + 1}/{args.rounds} (load {loadavg[-1]:.2f}): " + "  ".join(
            f"{v} {raw[v]['ess_min'][-1] / raw[v]['sample_s'][-1]:.0f} ESS/s "
            f"({raw[v]['sample_s'][-1]:.2f}s + compile {raw[v]['compile_s'][-1]:.2f}s)" for v in VARIANTS))
    res["rounds"] = raw
    res["loadavg_1min_after_each_round"] = loadavg

    # ---- summaries
    summ, checks = {}, {}
    for v in VARIANTS:
        d = raw[v]
        per = {m: [e / s for e, s in zip(d[m], d["sample_s"], strict=True)] for m in ("ess_min", "ess_median",
                                                                                     "ess_sq_min")}
        dps = [dr / s for dr, s in zip(d["draws"], d["sample_s"], strict=True)]
        x = np.concatenate(pooled[v]["x"], axis=1)
        checks[v] = {}
        checks[v]["moments"], (e1, e2) = moment_check(x, target)
        total_s = sum(d["sample_s"])
        s = {
            "ess_min_per_s": {"median": statistics.median(per["ess_min"]), "min": min(per["ess_min"]),
                              "max": max(per["ess_min"])},
            "ess_median_per_s": {"median": statistics.median(per["ess_median"])},
            "ess_sq_min_per_s": {"median": statistics.median(per["ess_sq_min"])},
            "draws_per_s": {"median": statistics.median(dps), "min": min(dps), "max": max(dps)},
            "sample_s": {"median": statistics.median(d["sample_s"]), "min": min(d["sample_s"]),
                         "max": max(d["sample_s"])},
            "wall_s_median": statistics.median(d["wall_s"]),
            "compile_s_median_per_block": statistics.median(d["compile_s"]),
            "pooled": {"draws": int(x.shape[0] * x.shape[1]), "sample_s": total_s,
                       "ess_min": float(e1.min()), "ess_median": float(np.median(e1)),
                       "ess_sq_min": float(e2.min()),
                       "ess_min_per_s": float(e1.min()) / total_s, "ess_median_per_s": float(np.median(e1)) / total_s,
                       "ess_sq_min_per_s": float(e2.min()) / total_s},
        }
        if v == "NUTS":
            steps = np.concatenate(pooled[v]["steps"], axis=1)
            s["grads_per_draw_mean"] = float(steps.mean())
            s["pooled"]["ess_min_per_1000_grads"] = 1000.0 * float(e1.min()) / float(steps.sum())
        else:
            s["grads_per_draw_mean"] = 1.0
            s["pooled"]["ess_min_per_1000_grads"] = 1000.0 * float(e1.min()) / x.shape[0] / x.shape[1]
        m, se, nb = accept_summary(pooled[v]["acc"])
        s["accept"] = {"mean": m, "mcse_batch_means": se, "batches": nb}
        s["us_per_step"] = 1e6 * statistics.median(d["sample_s"]) / (n if v != "NUTS" else args.nuts_samples)
        summ[v] = s
        del x
    for v in ("P", "BJ_numpyro", "P_scan"):
        a, b = summ[v]["accept"], summ["BJ"]["accept"]
        z = (a["mean"] - b["mean"]) / math.sqrt(a["mcse_batch_means"] ** 2 + b["mcse_batch_means"] ** 2)
        checks[v]["accept_vs_BJ"] = {"diff": a["mean"] - b["mean"], "z": z, "pass": abs(z) < Z_ACCEPT_MAX}
    res["summary"] = summ
    res["checks"] = checks

    def ratio(a, b, metric):
        pa, pb = raw[a], raw[b]
        if metric == "draws":
            ra = [x / s for x, s in zip(pa["draws"], pa["sample_s"], strict=True)]
            rb = [x / s for x, s in zip(pb["draws"], pb["sample_s"], strict=True)]
        else:
            ra = [x / s for x, s in zip(pa[metric], pa["sample_s"], strict=True)]
            rb = [x / s for x, s in zip(pb[metric], pb["sample_s"], strict=True)]
        return {"ratio_of_medians": statistics.median(ra) / statistics.median(rb),
                "median_of_round_ratios": statistics.median(x / y for x, y in zip(ra, rb, strict=True)),
                "ratio_of_best": max(ra) / max(rb)}

    ratios = {}
    for a, b in (("P", "BJ"), ("BJ_numpyro", "BJ"), ("P_scan", "BJ"), ("P", "P_scan"), ("P", "NUTS"),
                 ("BJ", "NUTS")):
        ratios[f"{a}/{b}"] = {m: ratio(a, b, m) for m in ("ess_min", "ess_median", "ess_sq_min", "draws")}
        ratios[f"{a}/{b}"]["pooled_ess_min"] = summ[a]["pooled"]["ess_min_per_s"] / summ[b]["pooled"]["ess_min_per_s"]
    res["ratios"] = ratios
    r = ratios["P/BJ"]["ess_min"]["ratio_of_medians"]
    res["goal"] = {"what": "P min-ESS/s over BJ min-ESS/s (ratio of medians) >= 1.0", "value": r, "pass": r >= 1.0}
    for v in ("BJ", "P_scan"):  # compiled once: no compile event may fall inside their blocks
        checks[v]["no_recompile"] = {"compile_events_in_blocks": sum(raw[v]["compile_events"]),
                                     "pass": sum(raw[v]["compile_events"]) == 0}
    res["all_checks_pass"] = all(c["moments"]["pass"] for c in checks.values()) and all(
        checks[v]["accept_vs_BJ"]["pass"] for v in ("P", "BJ_numpyro", "P_scan")) and all(
        checks[v]["no_recompile"]["pass"] for v in ("BJ", "P_scan")) and res["one_step_equivalence"]["pass"]
    return res


# --------------------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: short blocks, 2 rounds")
    ap.add_argument("--out", default="bench/results/mala.json")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 5, quick 2)")
    ap.add_argument("--samples", type=int, default=None, help="MALA draws per chain per block (default 20000, quick 1000)")
    ap.add_argument("--nuts-samples", type=int, default=None, help="NUTS draws per chain per block (default 1000, quick 200)")
    ap.add_argument("--nuts-warmup", type=int, default=None, help="NUTS warm-up steps (default 1000, quick 300)")
    ap.add_argument("--chains", type=int, default=8)
    ap.add_argument("--pilot-warmup", type=int, default=None, help="pilot warm-up steps (default 2000, quick 500)")
    ap.add_argument("--pilot-samples", type=int, default=500)
    ap.add_argument("--eta-gauss", type=float, default=None, help="fix eta for gauss50 (skips its pilot)")
    ap.add_argument("--eta-banana", type=float, default=None, help="fix eta for banana (skips its pilot)")
    ap.add_argument("--targets", default="gauss50,banana")
    args = ap.parse_args(argv)
    q = args.quick
    args.rounds = args.rounds or (2 if q else 5)
    args.samples = args.samples or (1000 if q else 20_000)
    args.nuts_samples = args.nuts_samples or (200 if q else 1000)
    args.nuts_warmup = args.nuts_warmup or (300 if q else 1000)
    args.pilot_warmup = args.pilot_warmup or (500 if q else 2000)
    t_start = time.perf_counter()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    log = timestamped_log()

    try:
        import blackjax
    except ImportError as err:
        print(f"bench/mala.py needs blackjax ({err}); pip install blackjax")
        return 1
    clock = CompileClock()
    ver = versions()
    ver["blackjax"] = blackjax.__version__
    result = {"benchmark": "MALA: probdiff vs blackjax vs NumPyro NUTS, ESS per second",
              "mode": "quick" if q else "full",
              "started_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
              "machine": machine_info(), "versions": ver,
              "parameters": {k: v for k, v in vars(args).items() if k != "out"},
              "timing": "sampling time = wall time of a block minus the union of JAX compile-event intervals "
                        "(NumPyro's MCMC.run recompiles its loop on every call); ESS by "
                        "numpyro.diagnostics.effective_sample_size; medians over interleaved rounds"}
    log(f"jax {jax.__version__}, numpyro {numpyro.__version__}, blackjax {blackjax.__version__}, "
        f"devices {jax.devices()}; {args.rounds} rounds, {args.chains} chains, {args.samples} MALA / "
        f"{args.nuts_samples} NUTS draws per chain per block")
    makers = {"gauss50": make_gauss, "banana": make_banana}
    result["targets"] = {}
    for i, name in enumerate(args.targets.split(",")):
        result["targets"][name] = run_target(makers[name](), args, clock, log, seed=10 + i)
        result["machine"][f"loadavg_after_{name}"] = os.getloadavg()
    result["machine"]["loadavg_end"] = os.getloadavg()
    result["wall_s"] = time.perf_counter() - t_start

    # ---- summary
    print(f"\n[{result['mode']}] {args.chains} chains, {args.rounds} interleaved rounds; ESS/s = min over "
          "coordinates of the ESS of one block / its sampling time (compile excluded), median over rounds")
    for name, res in result["targets"].items():
        print(f"\n{name} (D = {res['dim']}), eta = {res['eta']:g}")
        print(f"  {'variant':11s} {'minESS/s':>9s} {'medESS/s':>9s} {'minESS(x^2)/s':>14s} {'draws/s':>10s} "
              f"{'pooled minESS/s':>16s} {'accept':>7s} {'grads/draw':>10s} {'us/draw':>8s} {'compile/block':>13s}  max|z|")
        for v in VARIANTS:
            s = res["summary"][v]
            print(f"  {v:11s} {s['ess_min_per_s']['median']:9.0f} {s['ess_median_per_s']['median']:9.0f} "
                  f"{s['ess_sq_min_per_s']['median']:14.0f} {s['draws_per_s']['median']:10.0f} "
                  f"{s['pooled']['ess_min_per_s']:16.0f} {s['accept']['mean']:7.3f} {s['grads_per_draw_mean']:10.1f} "
                  f"{s['us_per_step']:8.1f} "
                  f"{s['compile_s_median_per_block']:12.2f}s  {res['checks'][v]['moments']['max_abs_z']:.2f}")
        for k, r in res["ratios"].items():
            print(f"  {k:14s} minESS/s {r['ess_min']['ratio_of_medians']:.2f} (rounds {r['ess_min']['median_of_round_ratios']:.2f})"
                  f"  pooled minESS/s {r['pooled_ess_min']:.2f}  draws/s {r['draws']['ratio_of_medians']:.2f} "
                  f"(rounds {r['draws']['median_of_round_ratios']:.2f}, best {r['draws']['ratio_of_best']:.2f})")
        acc = {v: round(res["checks"][v]["accept_vs_BJ"]["z"], 2) for v in ("P", "BJ_numpyro", "P_scan")}
        print(f"  acceptance vs BJ, z: {acc}; all checks pass: {res['all_checks_pass']}; "
              f"goal P/BJ >= 1.0: {res['goal']['value']:.2f} {'pass' if res['goal']['pass'] else 'FAIL'}")
    out.write_text(json.dumps(result, indent=1, default=str))
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
