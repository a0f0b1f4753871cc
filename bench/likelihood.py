"""Likelihood through the probability-flow ODE: cost, NFE, Hutchinson's noise, the exact-trace crossover.

Run from the repository root:

    python bench/likelihood.py              # full run: 13.5 min at load 2-5 on 2 shared cores (10.4 min CPU)
    python bench/likelihood.py --quick      # smoke run, compile-bound (~70 programs, most of 4-12 s): 2 rounds, no UNet
    python bench/likelihood.py --out bench/results/likelihood.json

Everything is float32 on CPU, at the library's defaults rtol = atol = 1e-5, t_min = 1e-5 (Tsit5 with
a PID controller, one adaptive solve per example under ``jax.vmap``).

Models (eps-networks trained briefly with DDPM's L_simple, discrete t ~ U{1..1000}, linear betas,
Adam; then ``GaussianDiffusion(net, schedules.linear(1000), event_shape)`` and
``ProbabilityFlow.from_diffusion``, i.e. the ScheduleSDE and s = -eps(x, tT) / sqrt(1 - alpha_bar(t))):

mlp2      ``MLP(2, key, hidden=(256, 256, 256))`` on ``GaussianMixture.ring()`` (6 modes, radius 2.5,
          scale 0.45), batch 256.
gmm2      the same mixture's exact score under the same ScheduleSDE (closed form, no network):
          ``ProbabilityFlow(sde, score, (2,))``. Deterministic; its exact-trace log-likelihood is
          checked against the mixture's closed-form log-density.
mlp64     ``MLP(64, ...)`` on the flattened 8 x 8 digits (``probdiff.data.digits``, dequantised to
          [-1, 1) with 17 levels), batch 256.
unet64    ``probdiff.unet.UNet(1, key, base=16, mults=(1, 2), time_dim=32, groups=4)`` on (8, 8, 1)
          digits (full mode only, ``--no-unet`` skips it), through ``ProbabilityFlow.from_diffusion``
          exactly as shipped: the UNet takes the float t * T that ``score_from_diffusion`` passes,
          and both traces are vector-Jacobian products, which its custom_vjp convolutions support.

Sections:

1. cost   seconds per likelihood (per example) for the exact trace and Hutchinson with 1 and 4
          Rademacher / Gaussian probes, NFE (``LogLikelihood.nfe``: mean over the examples, and the
          batch maximum, which is what a vmapped adaptive solve pays), solver steps, compile time
          (separately). mlp2, gmm2: 64 distinct points, batch 64 for every variant. mlp64: the exact
          trace on 8 points (batch 8), Hutchinson on the same 8 points repeated 8 times (batch 64).
          unet64: exact on 1 image, Hutchinson (1 Rademacher probe) on 8; one round.
2. noise  the same calls: every round draws fresh probes for every row, so after R rounds each point
          has R (mlp2, gmm2) or 8 R (mlp64) independent Hutchinson estimates. Reported: the sd of
          Hutchinson minus exact over draws (root mean square over points), in nats and bits/dim, and
          the pooled mean of Hutchinson minus exact with its standard error (unbiasedness check).
3. cross  the crossover in D: for D in (2, 3, 4, 6, 8, 16, 32, ..., 256) a synthetic field of fixed
          width, VPSDE, s(x, t) = -x + net(x, t) with ``MLP(D, key, hidden=(256, 256, 256))`` (last
          layer N(0, 1/256), so the field is not trivial), data N(0, I_D); time per likelihood for
          the exact trace and Hutchinson with 1 and with 4 Rademacher probes; batch 64 (16 for
          D >= 128). Two interleaved groups: D <= 16 (where the crossover lies; cheap calls) for
          10 rounds, D >= 32 for 3. D* (the rule ``EXACT_TRACE_MAX_DIM`` should encode): the
          largest grid D such that at it and at every smaller grid D the exact trace's median time
          per likelihood is at most that of 4 Rademacher probes; also the old rule (at most 2x one
          probe). The noise of the same Hutchinson estimates is read off the same batch: sd over
          the examples of (Hutchinson - exact). The same compiled D = 2 one-probe program also
          gives the NFE against the time input's scale (net(x, c t), c = 1, 10, 100, 1000:
          c = 1000 is what from_diffusion feeds a DDPM network).
4. rhs    per-evaluation cost of the augmented field (v and its trace) at D = 2, 8, 32, batch 64:
          the library's forms (``jax.vjp`` once, then ``vmap`` of VJPs over the basis or the probe,
          copied from ``probdiff.ode._solve_with_trace``) against the JVP forms it used before
          (``jax.linearize`` + ``vmap`` of JVPs; one ``jax.jvp``), ``jax.jacfwd`` then the trace,
          and the plain field; 20 calls per timing.
5. sde    ``reverse_sde_sample`` for mlp2 (time, 1000 samples) and gmm2 (quality only, 4000 samples):
          euler with E steps against shark with E / 2 steps (2 score evaluations per step), E = 50
          and 500, energy distance to 4000 exact mixture draws; the probability-flow ODE as a
          sampler (NFE, time; 256 samples for mlp2, 4000 for gmm2) through ``probdiff.ode._solve``
          (the call ``transform_back`` makes, keeping the step count, which the public API drops).

Timing: each program is compiled ahead of time (``jit(f).lower(...).compile()``, timed and reported
separately), then the variants of a section run round-robin (the order rotated each round) and
every call is timed to ``block_until_ready``. Medians; ratios are ratios of medians (and the median
of per-round ratios). The network weights are arguments of the compiled programs, not constants.
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
import optax
from _env import machine_info, timestamped_log, versions, write_result

from probdiff import GaussianDiffusion, schedules
from probdiff.analytic import GaussianMixture
from probdiff.data import dequantize, digits, discrete_bits_per_dim, energy_distance
from probdiff.nets import MLP
from probdiff.ode import (
    _TSIT5_EVALS_PER_STEP,
    _TSIT5_START_EVALS,
    ProbabilityFlow,
    _single,
    _solve,
    reverse_sde_sample,
    score_from_diffusion,
)
from probdiff.sde import VPSDE, ScheduleSDE
from probdiff.unet import UNet

T = 1000
SCHED = schedules.linear(T)
TOL = 1e-5
HIDDEN = (256, 256, 256)
CROSS_DIMS = (2, 3, 4, 6, 8, 16, 32, 64, 128, 256)
CROSS_SMALL_MAX = 16  # D <= 16: the crossover group, cheap calls, more rounds
RHS_DIMS = (2, 8, 32)
TIME_SCALES = (1.0, 10.0, 100.0, 1000.0)
SDE_EVALS = (50, 500)


# --------------------------------------------------------------------------- models
def train_eps(net, data, steps, batch, lr, seed):
    """DDPM's L_simple (discrete t, linear betas) with Adam, ``steps`` steps in one jitted scan."""
    params, static = eqx.partition(net, eqx.is_inexact_array)
    ab = jnp.asarray(SCHED.alpha_bar)
    opt = optax.adam(lr)
    nd = data.ndim - 1

    def loss(p, key, x0):
        k1, k2 = jax.random.split(key)
        t = jax.random.randint(k1, (x0.shape[0],), 1, T + 1)
        e = jax.random.normal(k2, x0.shape)
        a = ab[t].reshape((-1,) + (1,) * nd)
        xt = jnp.sqrt(a) * x0 + jnp.sqrt(1 - a) * e
        err = e - eqx.combine(p, static)(xt, t)
        return jnp.mean(jnp.sum(err**2, axis=tuple(range(1, nd + 1))))

    def body(c, k):
        p, s = c
        ki, kb = jax.random.split(k)
        x0 = data[jax.random.randint(ki, (batch,), 0, data.shape[0])]
        val, g = jax.value_and_grad(loss)(p, kb, x0)
        u, s = opt.update(g, s, p)
        return (optax.apply_updates(p, u), s), val

    t0 = time.perf_counter()
    (p, _), losses = jax.jit(lambda c, ks: jax.lax.scan(body, c, ks))(
        (params, opt.init(params)), jax.random.split(jax.random.key(seed), steps))
    losses = np.asarray(losses)
    info = {"steps": steps, "batch": batch, "lr": lr, "wall_s_incl_compile": time.perf_counter() - t0,
            "loss_first_50": float(losses[:50].mean()), "loss_last_100": float(losses[-100:].mean())}
    return p, static, info


def gmm_score(sde, mix):
    """The exact score of the mixture under the VP SDE: sum_k w_k N(m(t) mu_k, (m^2 s^2 + sigma(t)^2) I)."""
    mu = jnp.asarray(mix.means)
    logw = jnp.log(jnp.asarray(mix.weights))

    def score(x, t):
        t = jnp.broadcast_to(jnp.asarray(t, x.dtype), x.shape[:-1])
        m = sde.mean_coef(t)[..., None]
        v = m**2 * mix.scale**2 + sde.marginal_std(t)[..., None] ** 2
        mk = m[..., None] * mu
        sq = jnp.sum((x[..., None, :] - mk) ** 2, -1)
        r = jax.nn.softmax(-0.5 * sq / v + logw, axis=-1)
        return (jnp.sum(r[..., None] * mk, -2) - x) / v

    return score


def diffusion_of(static, event_shape):
    """params -> GaussianDiffusion of the trained eps-network (built inside the compiled program)."""
    return lambda p: GaussianDiffusion(eqx.combine(p, static), SCHED, event_shape)


def ll_program(make_flow, trace, probe="rademacher", num_probes=1):
    """(params, x, key) -> LogLikelihood through ProbabilityFlow with these trace options."""
    opts = dict(trace=trace, probe=probe, num_probes=num_probes, rtol=TOL, atol=TOL)

    def f(p, x, key):
        return make_flow(p, opts).log_likelihood(x, rng_key=key)

    return jax.jit(f)


# --------------------------------------------------------------------------- timing
def compile_ll(fn, args, log, name):
    t0 = time.perf_counter()
    c = fn.lower(*args).compile()
    dt = time.perf_counter() - t0
    log(f"  compiled {name:34s} {dt:6.2f}s")
    return c, dt


def interleave(variants, rounds, log, label, warmup=()):
    """variants: name -> (callable(round) -> result). Round-robin, order rotated; name -> [s], [results].

    The variants named in ``warmup`` are called once untimed first (the first call after an
    ahead-of-time compile can take ~0.5 s more); the expensive ones are not, and the median over
    the rounds absorbs that one slow call."""
    for name in warmup:
        jax.block_until_ready(variants[name](rounds))
    names = list(variants)
    times = {k: [] for k in names}
    results = {k: [] for k in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            t0 = time.perf_counter()
            out = jax.block_until_ready(variants[name](r))
            times[name].append(time.perf_counter() - t0)
            results[name].append(out)
        log(f"{label} round {r + 1}/{rounds}: " + "  ".join(f"{k} {v[-1]:.3f}s" for k, v in times.items()))
    return times, results


def ratio(times, a, b):
    return {"ratio_of_medians": statistics.median(times[a]) / statistics.median(times[b]),
            "median_of_round_ratios": statistics.median(x / y for x, y in zip(times[a], times[b], strict=True))}


def ll_stats(r, batch, times, compile_s):
    nfe = np.asarray(r.nfe)
    return {"batch": batch, "s_per_call_median": statistics.median(times), "s_per_call": times,
            "s_per_example_median": statistics.median(times) / batch, "compile_s": compile_s,
            "nfe_mean": float(nfe.mean()), "nfe_max": int(nfe.max()),
            "steps_mean": float(np.asarray(r.num_steps).mean()),
            "log_prob_mean": float(np.asarray(r.log_prob).mean()),
            "bits_per_dim_mean": float(np.asarray(r.bits_per_dim).mean())}


# --------------------------------------------------------------------------- sections 1 + 2
HUTCH_VARIANTS = {"hutch-rad-1": ("rademacher", 1), "hutch-gauss-1": ("gaussian", 1),
                  "hutch-rad-4": ("rademacher", 4), "hutch-gauss-4": ("gaussian", 4)}


def noise_stats(diffs, idx, D):
    """Hutchinson minus exact, ``diffs`` of shape (rounds, rows), ``idx[row]`` the point of each row."""
    d = np.asarray(diffs)
    pts = np.unique(idx)
    groups = [d[:, idx == i].ravel() for i in pts]
    var = np.array([np.var(g, ddof=1) for g in groups])
    n = np.array([g.size for g in groups])
    mean_p = np.array([g.mean() for g in groups])
    with np.errstate(divide="ignore", invalid="ignore"):  # a 2-D Rademacher estimate takes two values: var may be 0
        z_p = np.where(var > 0, mean_p / np.sqrt(var / n), np.nan)
    total = d.size
    se = math.sqrt(float(np.sum(var * n))) / total
    sd = float(np.sqrt(var.mean()))
    return {"points": int(pts.size), "draws_per_point": int(n.min()), "sd_nats_rms": sd,
            "sd_bits_per_dim_rms": sd / (D * math.log(2)), "sd_of_sd_estimate_rel": 1 / math.sqrt(2 * float(np.sum(n - 1))),
            "mean_minus_exact_nats": float(d.mean()), "se_of_mean_nats": se, "z_pooled": float(d.mean()) / se,
            # per-point z only with enough draws per point to mean something
            "per_point_abs_z_below_2": int(np.sum(np.abs(z_p) < 2)) if n.min() >= 10 else None,
            "per_point_max_abs_z": float(np.nanmax(np.abs(z_p))) if n.min() >= 10 else None}


def model_section(name, make_flow, params, exact_x, hutch_x, idx, D, log, *, rounds, variants, chunk=None, warmup=False):
    """Cost of the exact trace and of Hutchinson's variants on one model, and Hutchinson's noise.

    ``exact_x``: the P distinct points (exact trace, in chunks of ``chunk`` rows, each chunk one
    call); ``hutch_x``: the Hutchinson batch, row j holding point ``idx[j]``. Every round calls every
    variant once, Hutchinson with a fresh key, so after R rounds each row has R independent draws.
    """
    key = jax.random.key(100)
    chunk = chunk or exact_x.shape[0]
    compiled, compile_s = {}, {}
    log(f"[{name}] compiling {1 + len(variants)} programs")
    compiled["exact"], compile_s["exact"] = compile_ll(ll_program(make_flow, "exact"), (params, exact_x[:chunk], key), log,
                                                       f"{name} exact (batch {chunk})")
    for v in variants:
        pr, m = HUTCH_VARIANTS[v]
        compiled[v], compile_s[v] = compile_ll(ll_program(make_flow, "hutchinson", pr, m), (params, hutch_x, key), log,
                                               f"{name} {v} (batch {hutch_x.shape[0]})")
    nchunks = exact_x.shape[0] // chunk

    def call(v, i):
        if v == "exact":
            return lambda r: compiled["exact"](params, exact_x[(r % nchunks) * chunk:(r % nchunks + 1) * chunk], key)
        return lambda r: compiled[v](params, hutch_x, jax.random.fold_in(jax.random.key(200 + i), r))

    names = ["exact", *variants]
    times, results = interleave({v: call(v, i) for i, v in enumerate(names)}, rounds, log, f"[{name}]",
                                warmup=names if warmup else ())
    batch = {"exact": chunk, **{v: hutch_x.shape[0] for v in variants}}
    out = {"cost": {v: ll_stats(results[v][-1], batch[v], times[v], compile_s[v]) for v in names},
           "ratios_per_example": {f"{v} / exact": {k: val * chunk / hutch_x.shape[0] for k, val in ratio(times, v, "exact").items()}
                                  for v in variants}}
    exact_lp = np.full(exact_x.shape[0], np.nan)
    for r in range(rounds):
        c = r % nchunks
        exact_lp[c * chunk:(c + 1) * chunk] = np.asarray(results["exact"][r].log_prob)
    have = ~np.isnan(exact_lp)
    out["exact_points_evaluated"] = int(have.sum())
    rows = np.array([i < have.size and bool(have[i]) for i in idx])
    if rows.sum() >= 2:
        out["noise"] = {v: noise_stats([np.asarray(res.log_prob)[rows] - exact_lp[idx[rows]] for res in results[v]], idx[rows], D)
                        for v in variants}
    out["exact_log_prob"] = exact_lp.tolist()
    return out, results


# --------------------------------------------------------------------------- section 3
def cross_net(D):
    net = MLP(D, jax.random.key(0), hidden=HIDDEN)
    w = jax.random.normal(jax.random.key(1), net.weights[-1].shape) / math.sqrt(HIDDEN[-1])
    return eqx.partition(eqx.tree_at(lambda n: n.weights[-1], net, w), eqx.is_inexact_array)


CROSS_VARIANTS = {"exact": ("exact", 1), "hutch-1": ("hutchinson", 1), "hutch-4": ("hutchinson", 4)}  # Rademacher probes


def cross_program(static, D, trace, num_probes=1):
    sde = VPSDE()

    def f(p, x, key, scale):
        net = eqx.combine(p, static)
        flow = ProbabilityFlow(sde, lambda y, t: -y + net(y, scale * t), (D,), trace=trace, num_probes=num_probes,
                               rtol=TOL, atol=TOL)
        return flow.log_likelihood(x, rng_key=key)

    return jax.jit(f)


def crossover_section(dims, rounds, rounds_small, log, small_max=CROSS_SMALL_MAX):
    """Exact trace against Hutchinson with 1 and 4 Rademacher probes on the synthetic field, per D.

    Two interleaved groups: D <= ``small_max`` (cheap calls, ``rounds_small`` rounds, which is where
    the crossover lies) and the larger D (``rounds`` rounds). Within a group every round calls every
    (D, variant) once, in rotated order, Hutchinson with a fresh key."""
    key = jax.random.key(3)
    progs, data, comp = {}, {}, {}
    log(f"[cross] compiling {len(CROSS_VARIANTS) * len(dims)} programs")
    for D in dims:
        params, static = cross_net(D)
        b = 64 if D <= 64 else 16
        x = jax.random.normal(jax.random.fold_in(key, D), (b, D))
        data[D] = (params, x, b)
        for v, (tr, m) in CROSS_VARIANTS.items():
            progs[(D, v)], comp[(D, v)] = compile_ll(cross_program(static, D, tr, m), (params, x, key, jnp.float32(1.0)), log,
                                                     f"cross D={D} {v} (batch {b})")

    def call(D, v):
        params, x, _ = data[D]
        return lambda r: progs[(D, v)](params, x, jax.random.fold_in(key, r), jnp.float32(1.0))

    times, results, group_rounds = {}, {}, {}
    for label, group, nr in (("small", [D for D in dims if D <= small_max], rounds_small),
                             ("large", [D for D in dims if D > small_max], rounds)):
        if not group:
            continue
        variants = {f"D{D} {v}": call(D, v) for D in group for v in CROSS_VARIANTS}
        t, res = interleave(variants, nr, log, f"[cross {label}]", warmup=[k for k in variants if int(k.split()[0][1:]) <= 64])
        times.update(t)
        results.update(res)
        group_rounds.update({D: nr for D in group})
    rows = {}
    for D in dims:
        b = data[D][2]
        e, h1, h4 = (results[f"D{D} {v}"][-1] for v in CROSS_VARIANTS)
        row = {"batch": b, "rounds": group_rounds[D],
               "exact": ll_stats(e, b, times[f"D{D} exact"], comp[(D, "exact")]),
               "hutchinson": ll_stats(h1, b, times[f"D{D} hutch-1"], comp[(D, "hutch-1")]),
               "hutchinson_4": ll_stats(h4, b, times[f"D{D} hutch-4"], comp[(D, "hutch-4")]),
               "exact_over_hutch": ratio(times, f"D{D} exact", f"D{D} hutch-1"),
               "exact_over_hutch4": ratio(times, f"D{D} exact", f"D{D} hutch-4"),
               "hutch4_over_hutch": ratio(times, f"D{D} hutch-4", f"D{D} hutch-1"),
               "rounds_exact_at_most_hutch4": sum(x <= y for x, y in zip(times[f"D{D} exact"], times[f"D{D} hutch-4"], strict=True))}
        for suffix, h in (("", h1), ("_4", h4)):
            diff = np.asarray(h.log_prob) - np.asarray(e.log_prob)
            sd = float(np.std(diff, ddof=1))
            row.update({f"hutch{suffix}_minus_exact_sd_nats": sd, f"hutch{suffix}_minus_exact_sd_bits_per_dim": sd / (D * math.log(2)),
                        f"hutch{suffix}_minus_exact_mean_nats": float(diff.mean())})
        rows[D] = row
    # NFE against the time input's scale (same compiled D = 2 program)
    scales = {}
    if 2 in dims:
        params, x, b = data[2]
        for c in TIME_SCALES:
            t0 = time.perf_counter()
            r = jax.block_until_ready(progs[(2, "hutch-1")](params, x, key, jnp.float32(c)))
            scales[c] = {"s_per_call": time.perf_counter() - t0, "nfe_mean": float(np.asarray(r.nfe).mean()),
                         "nfe_max": int(np.asarray(r.nfe).max())}
            log(f"[cross] D=2 time scale {c:6.0f}: NFE {scales[c]['nfe_mean']:.0f} (max {scales[c]['nfe_max']})")
    return rows, scales


def _d_star(dims, r, limit):
    """The largest D of the grid such that r[D'] <= limit at D and at every smaller grid D' (0 if none)."""
    d_star = 0
    for D in dims:
        if r[D] > limit:
            break
        d_star = D
    return d_star


def _crossing(dims, r, limit):
    """Log-linear interpolation of the first D where r crosses ``limit`` upwards (None if it does not)."""
    for a, b in zip(dims[:-1], dims[1:], strict=True):
        if r[a] <= limit < r[b]:
            f = (math.log(limit) - math.log(r[a])) / (math.log(r[b]) - math.log(r[a]))
            return math.exp(math.log(a) + f * (math.log(b) - math.log(a)))
    return None


def crossover_rules(rows, noise_target_bpd=0.01):
    """D* by the 4-probe rule (primary), by the old 2x rule, and by the equal-precision rule; see the README."""
    dims = sorted(rows)
    r1 = {D: rows[D]["exact_over_hutch"]["ratio_of_medians"] for D in dims}
    r4 = {D: rows[D]["exact_over_hutch4"]["ratio_of_medians"] for D in dims}
    r4_rounds = {D: rows[D]["exact_over_hutch4"]["median_of_round_ratios"] for D in dims}
    r1_rounds = {D: rows[D]["exact_over_hutch"]["median_of_round_ratios"] for D in dims}
    probes = {}
    for D in dims:
        sd = rows[D]["hutch_minus_exact_sd_nats"]
        probes[D] = max(1, math.ceil((sd / (noise_target_bpd * D * math.log(2))) ** 2))
    return {"ratio_exact_over_hutch1": r1, "ratio_exact_over_hutch4": r4,
            "d_star_4probe": _d_star(dims, r4, 1.0), "d_cross_4probe_interpolated": _crossing(dims, r4, 1.0),
            "d_star_4probe_by_round_ratios": _d_star(dims, r4_rounds, 1.0),
            "d_star_2x": _d_star(dims, r1, 2.0), "d_cross_2x_interpolated": _crossing(dims, r1, 2.0),
            "d_star_2x_by_round_ratios": _d_star(dims, r1_rounds, 2.0),
            "noise_target_bits_per_dim": noise_target_bpd, "probes_for_target": probes,
            "d_star_equal_precision": _d_star(dims, {D: r1[D] / probes[D] for D in dims}, 1.0)}


# --------------------------------------------------------------------------- section 4
RHS_FORMS = ("exact-vjp (library)", "exact-linearize (before)", "exact-jacfwd", "hutch-vjp (library)", "hutch-jvp (before)",
             "plain field")


def rhs_section(dims, rounds, log, calls=20):
    """Per-evaluation cost of the augmented field (v and its trace), one Rademacher probe for Hutchinson.

    The library's forms (``jax.vjp`` once, then vmapped VJPs over the basis or the probe, copied from
    ``probdiff.ode._solve_with_trace``) against the JVP forms it used before (``jax.linearize`` +
    vmapped JVPs; one ``jax.jvp``), ``jax.jacfwd`` and the plain field."""
    out = {}
    variants, fns = {}, {}
    for D in dims:
        params, static = cross_net(D)
        net = eqx.combine(params, static)
        one = _single(lambda y, t, net=net: -y + net(y, t))

        def vjp_exact(y, t, e, one=one):  # copied from probdiff.ode._solve_with_trace
            v, vjp = jax.vjp(lambda z: one(z, t), y)
            basis = jnp.eye(y.size, dtype=y.dtype).reshape((y.size,) + y.shape)
            return v, jnp.sum(jax.vmap(lambda b: jnp.vdot(vjp(b)[0], b))(basis))

        def lin(y, t, e, one=one):  # the library's exact trace before the change
            v, jvp = jax.linearize(lambda z: one(z, t), y)
            basis = jnp.eye(y.size, dtype=y.dtype).reshape((y.size,) + y.shape)
            return v, jnp.sum(jax.vmap(lambda b: jnp.vdot(b, jvp(b)))(basis))

        def jacfwd(y, t, e, one=one):
            jac, v = jax.jacfwd(lambda z: (one(z, t), one(z, t)), has_aux=True)(y)
            return v, jnp.trace(jac)

        def hutch_vjp(y, t, e, one=one):  # copied from probdiff.ode._solve_with_trace (probes of shape (1, D))
            v, vjp = jax.vjp(lambda z: one(z, t), y)
            return v, jnp.mean(jax.vmap(lambda p: jnp.vdot(vjp(p)[0], p))(e[None]))

        def hutch_jvp(y, t, e, one=one):
            v, jv = jax.jvp(lambda z: one(z, t), (y,), (e,))
            return v, jnp.vdot(e, jv)

        def plain(y, t, e, one=one):
            return one(y, t), jnp.zeros((), y.dtype)

        x = jax.random.normal(jax.random.key(2), (64, D))
        e = jax.random.rademacher(jax.random.key(3), (64, D), jnp.float32)
        forms = dict(zip(RHS_FORMS, (vjp_exact, lin, jacfwd, hutch_vjp, hutch_jvp, plain), strict=True))
        vals = {}
        for fname, f in forms.items():
            c = jax.jit(jax.vmap(f, in_axes=(0, None, 0))).lower(x, jnp.float32(0.3), e).compile()
            vals[fname] = np.asarray(c(x, jnp.float32(0.3), e)[1])
            fns[(D, fname)] = c

            def run(r, c=c, x=x, e=e):
                res = None
                for _ in range(calls):
                    res = c(x, jnp.float32(0.3), e)
                    jax.block_until_ready(res)
                return res

            variants[f"D{D} {fname}"] = run
        ex = vals["exact-vjp (library)"]
        out[D] = {"max_abs_diff_vjp_vs_linearize": float(np.max(np.abs(ex - vals["exact-linearize (before)"]))),
                  "max_abs_diff_vjp_vs_jacfwd": float(np.max(np.abs(ex - vals["exact-jacfwd"]))),
                  "max_abs_diff_hutch_vjp_vs_jvp": float(np.max(np.abs(vals["hutch-vjp (library)"] - vals["hutch-jvp (before)"])))}
    log(f"[rhs] compiled {len(variants)} programs")
    times, _ = interleave(variants, rounds, log, "[rhs]", warmup=list(variants))
    for D in dims:
        base = f"D{D} hutch-vjp (library)"
        for fname in RHS_FORMS:
            k = f"D{D} {fname}"
            out[D][fname] = {"ms_per_eval_batch64": 1e3 * statistics.median(times[k]) / calls,
                             "over_hutchinson": ratio(times, k, base)}
        out[D]["vjp_over_linearize"] = ratio(times, f"D{D} exact-vjp (library)", f"D{D} exact-linearize (before)")
        out[D]["vjp_over_jacfwd"] = ratio(times, f"D{D} exact-vjp (library)", f"D{D} exact-jacfwd")
        out[D]["hutch_vjp_over_jvp"] = ratio(times, f"D{D} hutch-vjp (library)", f"D{D} hutch-jvp (before)")
    return out


# --------------------------------------------------------------------------- section 5
def sde_section(mlp2, mix, rounds, log, num=1000, num_quality=4000, num_ode_mlp=256):
    """Reverse-SDE samplers (euler / shark at equal score evaluations) and the ODE sampler."""
    params, static = mlp2
    make_d = diffusion_of(static, (2,))
    sched_sde = ScheduleSDE(SCHED)
    gscore = gmm_score(sched_sde, mix)
    ref = mix.sample(jax.random.key(99), num_quality)
    key = jax.random.key(5)
    compiled, comp = {}, {}
    for E in SDE_EVALS:
        for solver, steps in (("euler", E), ("shark", E // 2)):
            def f_mlp(p, k, steps=steps, solver=solver):
                sde, score = score_from_diffusion(make_d(p))
                return reverse_sde_sample(sde, score, k, (num, 2), num_steps=steps, solver=solver)

            def f_gmm(k, steps=steps, solver=solver):
                return reverse_sde_sample(sched_sde, gscore, k, (num_quality, 2), num_steps=steps, solver=solver)

            t0 = time.perf_counter()
            compiled[("mlp", solver, E)] = jax.jit(f_mlp).lower(params, key).compile()
            comp[("mlp", solver, E)] = time.perf_counter() - t0
            compiled[("gmm", solver, E)] = jax.jit(f_gmm).lower(key).compile()
    log(f"[sde] compiled {len(compiled)} samplers")
    variants = {f"{solver} E={E}": (lambda r, c=compiled[("mlp", solver, E)]: c(params, jax.random.fold_in(key, r)))
                for E in SDE_EVALS for solver in ("euler", "shark")}
    times, results = interleave(variants, rounds, log, "[sde]")
    out = {"samples_timed": num, "samples_quality_exact_score": num_quality}
    for E in SDE_EVALS:
        for solver in ("euler", "shark"):
            k = f"{solver} E={E}"
            g = compiled[("gmm", solver, E)](jax.random.key(11))
            out[k] = {"num_steps": E if solver == "euler" else E // 2, "score_evals": E + 1,
                      "s_per_1000_samples_median": statistics.median(times[k]) * 1000 / num, "s_per_call": times[k],
                      "compile_s_mlp": comp[("mlp", solver, E)],
                      "energy_distance_mlp_vs_mixture": float(energy_distance(results[k][-1], ref)),
                      "energy_distance_exact_score_vs_mixture": float(energy_distance(g, ref))}
        out[f"shark/euler time E={E}"] = ratio(times, f"shark E={E}", f"euler E={E}")
    out["energy_distance_floor_exact_draws"] = {
        "n=1000": float(energy_distance(mix.sample(jax.random.key(12), num), ref)),
        f"n={num_quality}": float(energy_distance(mix.sample(jax.random.key(13), num_quality), ref))}

    # the probability-flow ODE as a sampler: NFE and time, trained model (256 samples) and exact score (4000)
    for label, make_field, args, n in (
        ("mlp", lambda p: ProbabilityFlow.from_diffusion(make_d(p), rtol=TOL, atol=TOL).field, (params,), num_ode_mlp),
        ("gmm", lambda: ProbabilityFlow(sched_sde, gscore, (2,), rtol=TOL, atol=TOL).field, (), num_quality),
    ):
        def f(*a, k, make_field=make_field, n=n):
            field = make_field(*a)
            z = jax.random.normal(k, (n, 2))
            return jax.vmap(lambda z1: _solve(field, z1, 1.0, 1e-5, rtol=TOL, atol=TOL, max_steps=4096))(z)

        t0 = time.perf_counter()
        c = jax.jit(lambda *a, k, f=f: f(*a, k=k)).lower(*args, k=key).compile()
        cs = time.perf_counter() - t0
        t0 = time.perf_counter()
        x, steps = jax.block_until_ready(c(*args, k=key))
        dt = time.perf_counter() - t0
        nfe = _TSIT5_EVALS_PER_STEP * np.asarray(steps) + _TSIT5_START_EVALS  # as LogLikelihood.nfe counts
        out[f"ode_sampler_{label}"] = {"samples": n, "s_per_1000_samples": dt * 1000 / n, "compile_s": cs,
                                       "nfe_mean": float(nfe.mean()), "nfe_max": int(nfe.max()),
                                       "energy_distance_vs_mixture": float(energy_distance(x, ref))}
        log(f"[sde] ODE sampler {label}: NFE {nfe.mean():.0f} (max {nfe.max()}), {dt:.2f}s for {n}")
    return out


# --------------------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 rounds, short training, no UNet")
    ap.add_argument("--out", default="bench/results/likelihood.json")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--no-unet", action="store_true")
    args = ap.parse_args(argv)
    rounds = args.rounds or (2 if args.quick else 3)
    rounds_cheap = 3 if args.quick else 10  # gmm2 (no network, a call takes milliseconds) and the crossover at D <= 16
    train_steps = 200 if args.quick else 1000
    unet = not (args.quick or args.no_unet)
    t_start = time.perf_counter()
    log = timestamped_log()
    result = {"benchmark": "probdiff probability-flow ODE likelihood: cost, NFE, Hutchinson noise, exact-trace crossover",
              "started_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
              "machine": machine_info(), "versions": versions(),
              "parameters": {"quick": args.quick, "rounds": rounds, "rounds_gmm2": rounds_cheap, "rounds_cross_small_d": rounds_cheap, "train_steps": train_steps,
                             "rtol": TOL, "atol": TOL, "t_min": 1e-5, "hidden": HIDDEN, "schedule": "linear(1000)",
                             "cross_dims": CROSS_DIMS, "cross_small_max": CROSS_SMALL_MAX, "rhs_dims": RHS_DIMS, "sde_evals": SDE_EVALS, "unet": unet,
                             "dtype": "float32"}}
    loads = {"start": os.getloadavg()}

    # ---- models
    mix = GaussianMixture.ring()
    data2 = mix.sample(jax.random.key(1), 20000)
    p2, s2, info2 = train_eps(MLP(2, jax.random.key(0), hidden=HIDDEN), data2, train_steps, 256, 1e-3, 0)
    log(f"trained mlp2: loss {info2['loss_first_50']:.3f} -> {info2['loss_last_100']:.3f} ({info2['wall_s_incl_compile']:.1f}s)")
    images, _ = digits()
    dig = dequantize(jax.random.key(2), jnp.asarray(images), 17)  # (1797, 8, 8, 1) in [-1, 1)
    p64, s64, info64 = train_eps(MLP(64, jax.random.key(0), hidden=HIDDEN), dig.reshape(-1, 64), train_steps, 256, 1e-3, 1)
    log(f"trained mlp64: loss {info64['loss_first_50']:.3f} -> {info64['loss_last_100']:.3f} ({info64['wall_s_incl_compile']:.1f}s)")
    result["training"] = {"mlp2": info2, "mlp64": info64}

    sched_sde = ScheduleSDE(SCHED)
    gscore = gmm_score(sched_sde, mix)
    x2 = mix.sample(jax.random.key(3), 64)
    test = dequantize(jax.random.key(5), jnp.asarray(images[-64:]), 17)  # the last 64 digits
    all4 = tuple(HUTCH_VARIANTS)

    def flow_from(static, shape):
        md = diffusion_of(static, shape)
        return lambda p, opts: ProbabilityFlow.from_diffusion(md(p), **opts)

    sections = {}
    loads["models"] = os.getloadavg()
    ar64 = np.arange(64)
    sections["mlp2"], _ = model_section("mlp2", flow_from(s2, (2,)), p2, x2, x2, ar64, 2, log, rounds=rounds, variants=all4)
    sections["gmm2"], resg = model_section(
        "gmm2", lambda p, opts: ProbabilityFlow(sched_sde, gscore, (2,), **opts), {}, x2, x2, ar64, 2, log,
        rounds=rounds_cheap, variants=("hutch-rad-1", "hutch-gauss-1"), warmup=True)
    # exact trace against the closed form: log p_0(x); the solve ends at N(0, I) while the true p_1 is the
    # mixture with means m(1) mu_k, so also with log pi(z) swapped for the true log p_1(z) (solver error only)
    e = resg["exact"][-1]
    m1 = float(sched_sde.mean_coef(1.0))
    s1 = float(sched_sde.marginal_std(1.0))
    p1 = GaussianMixture(m1 * jnp.asarray(mix.means), mix.weights, math.sqrt(m1**2 * mix.scale**2 + s1**2))
    closed = np.asarray(mix.log_prob(x2))
    swapped = np.asarray(e.delta_log_prob) + np.asarray(p1.log_prob(e.z))
    sections["gmm2"]["exact_minus_closed_form_max_abs_nats"] = float(np.max(np.abs(np.asarray(e.log_prob) - closed)))
    sections["gmm2"]["exact_with_true_p1_minus_closed_form_max_abs_nats"] = float(np.max(np.abs(swapped - closed)))
    xt = test.reshape(-1, 64)
    sections["mlp64"], res64 = model_section("mlp64", flow_from(s64, (64,)), p64, xt[:8], jnp.repeat(xt[:8], 8, axis=0),
                                             np.repeat(np.arange(8), 8), 64, log, rounds=rounds, variants=all4)
    sections["mlp64"]["discrete_bits_per_dim_exact"] = float(jnp.mean(discrete_bits_per_dim(res64["exact"][-1].log_prob, 64, 17)))
    if unet:
        loads["unet"] = os.getloadavg()
        # the library's UNet as shipped: float t * T from score_from_diffusion, custom_vjp convolutions under the VJP traces
        net = UNet(1, jax.random.key(0), base=16, mults=(1, 2), time_dim=32, groups=4)
        pu, su, infou = train_eps(net, dig, 150, 64, 2e-3, 2)
        log(f"trained unet64: loss {infou['loss_first_50']:.3f} -> {infou['loss_last_100']:.3f} ({infou['wall_s_incl_compile']:.1f}s)")
        result["training"]["unet64"] = infou
        sections["unet64"], _ = model_section("unet64", flow_from(su, (8, 8, 1)), pu, test[:1], test[:8], np.arange(8), 64, log,
                                              rounds=1, variants=("hutch-rad-1",))
    result["models"] = sections

    loads["cross"] = os.getloadavg()
    rows, scales = crossover_section(CROSS_DIMS, rounds, rounds_cheap, log)
    rules = crossover_rules(rows)
    result["crossover"] = {"rows": rows, "nfe_vs_time_scale_D2": scales, "rules": rules}
    loads["rhs"] = os.getloadavg()
    result["rhs"] = rhs_section(RHS_DIMS, 3 if args.quick else 7, log)
    loads["sde"] = os.getloadavg()
    result["sde"] = sde_section((p2, s2), mix, rounds, log)
    loads["end"] = os.getloadavg()
    result["machine"]["loadavg_end"] = loads["end"]
    result["loadavg"] = loads
    result["wall_s"] = time.perf_counter() - t_start
    written = write_result(args.out, result)

    # ---- summary
    print("\n1. cost per likelihood (median ms per example; NFE mean / batch max; compile s)")
    for m, sec in sections.items():
        for v, c in sec["cost"].items():
            print(f"  {m:7s} {v:14s} batch {c['batch']:3d} {c['s_per_example_median'] * 1e3:9.2f} ms  "
                  f"NFE {c['nfe_mean']:7.1f} / {c['nfe_max']:5d}  steps {c['steps_mean']:6.1f}  "
                  f"bpd {c['bits_per_dim_mean']:7.3f}  compile {c['compile_s']:5.1f}s")
        for v, rr in sec["ratios_per_example"].items():
            print(f"  {m:7s} {v}: {rr['ratio_of_medians']:.3f} [{rr['median_of_round_ratios']:.3f}]")
    print("\n2. Hutchinson minus exact: sd over probe draws (rms over points), nats [bits/dim]; pooled mean / SE")
    for m, sec in sections.items():
        for v, n in sec.get("noise", {}).items():
            print(f"  {m:7s} {v:14s} {n['sd_nats_rms']:8.4f} [{n['sd_bits_per_dim_rms']:.5f}]  "
                  f"mean {n['mean_minus_exact_nats']:+.4f} +- {n['se_of_mean_nats']:.4f} (z {n['z_pooled']:+.2f})  "
                  f"{n['points']} points x {n['draws_per_point']} draws, per-point |z|<2: {n['per_point_abs_z_below_2']}")
    g = sections["gmm2"]
    print(f"  gmm2 exact - closed form: max {g['exact_minus_closed_form_max_abs_nats']:.2e} nats; "
          f"with the true p_1 as prior {g['exact_with_true_p1_minus_closed_form_max_abs_nats']:.2e}")
    print("\n3. crossover: ms per example (exact, 1 and 4 Rademacher probes), exact / hutch-4 and exact / hutch-1 "
          "(ratio of medians [median of round ratios]), NFE exact / h1 / h4, sd of (Hutchinson - exact)")
    for D, row in rows.items():
        r4, r1 = row["exact_over_hutch4"], row["exact_over_hutch"]
        ms = [row[k]["s_per_example_median"] * 1e3 for k in ("exact", "hutchinson", "hutchinson_4")]
        nfe = "/".join(f"{row[k]['nfe_mean']:.0f}" for k in ("exact", "hutchinson", "hutchinson_4"))
        print(f"  D {D:4d} ({row['rounds']:2d} rounds)  exact {ms[0]:8.2f}  h1 {ms[1]:7.2f}  h4 {ms[2]:7.2f}  "
              f"e/h4 {r4['ratio_of_medians']:5.2f} [{r4['median_of_round_ratios']:5.2f}] (e <= h4 in {row['rounds_exact_at_most_hutch4']}/{row['rounds']})  "
              f"e/h1 {r1['ratio_of_medians']:6.2f} [{r1['median_of_round_ratios']:6.2f}]  NFE {nfe}  "
              f"sd h1 {row['hutch_minus_exact_sd_nats']:.3f} h4 {row['hutch_4_minus_exact_sd_nats']:.3f} nats  "
              f"probes for {rules['noise_target_bits_per_dim']} bpd: {rules['probes_for_target'][D]}")
    print(f"  D* (exact <= 4 probes) = {rules['d_star_4probe']} (by round ratios {rules['d_star_4probe_by_round_ratios']}; "
          f"interpolated crossing {rules['d_cross_4probe_interpolated']});  D* (old 2x rule) = {rules['d_star_2x']} "
          f"(interpolated {rules['d_cross_2x_interpolated']});  D* (equal precision) = {rules['d_star_equal_precision']}")
    for c, v in scales.items():
        print(f"  D=2 net(x, {c:g} t): NFE {v['nfe_mean']:.0f} (max {v['nfe_max']})")
    print("\n4. augmented field, ms per evaluation (batch 64)")
    for D, row in result["rhs"].items():
        print(f"  D {D:3d}  " + "  ".join(f"{k} {row[k]['ms_per_eval_batch64']:.3f}" for k in RHS_FORMS)
              + "".join(f"  {k} {row[k]['ratio_of_medians']:.2f} [{row[k]['median_of_round_ratios']:.2f}]"
                        for k in ("vjp_over_linearize", "vjp_over_jacfwd", "hutch_vjp_over_jvp")))
    print("\n5. reverse SDE and ODE sampling")
    for k, v in result["sde"].items():
        if isinstance(v, dict) and "s_per_call" in v:
            v = {kk: vv for kk, vv in v.items() if kk != "s_per_call"}
        print(f"  {k}: {v}")
    print(f"\nload average: {loads}")
    log(f"wrote {written}")


if __name__ == "__main__":
    main()
