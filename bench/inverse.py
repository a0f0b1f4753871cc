"""Posterior sampling on the Gaussian check: error against the closed form, per second and per NFE.

Run from the repository root:

    python bench/inverse.py            # default run (5-8 min on 2 shared CPU cores, 3/4 of it compiling)
    python bench/inverse.py --quick    # smoke run (50-75 s; D = 4, one budget per sampler, 1 round)
    python bench/inverse.py --out bench/results/inverse.json --plot bench/results/inverse.png

**Problem** (float32). Data N(mu, Sigma) in D dimensions, mu ~ N(0, I) and
Sigma = Q diag(geomspace(0.1, 1, D)) Q^T (Q a random rotation); a ``GaussianDiffusion`` whose
eps-function is the optimal affine one, ``analytic.optimal_eps_fn(mu, Sigma, schedule)``, on the
linear schedule of T = 100 steps with beta from 0.1 / T to 20 / T (as ``VPSDE().discretize(T)``;
DDPM's 1e-4 .. 0.02 at T = 1000; alpha_bar_T = 2e-5, so x_T ~ N(0, I) is the right start);
an observation y = A x + N(0, s^2 I_m), A (m x D) with N(0, 1 / D) entries, m = D / 2, y drawn
from one x ~ N(mu, Sigma) (numpy seed 100 + D). The model is the one of ``probdiff.inverse``:

    def model(y=None):
        x = numpyro.sample("x", prior)
        numpyro.sample("y", obs(x), obs=y)

Cases: ``D4`` and ``D16`` with s = 0.5 (every sampler, every budget), and ``D16_sharp``, the
same D = 16 problem with s = 0.2 (a sharper likelihood: TwistedSMC, DPS and one MALA budget).

**Exact references** (closed form, ``inverse.gaussian_posterior``, computed in one jitted call):

* TwistedSMC and DPS (``final_noise=False``): the posterior under the reverse chain's own output
  law, pm = ``analytic.affine_reverse_marginal(prior, final_noise=False)``; the evidence
  ``inverse.gaussian_evidence(pm.loc, pm.cov, obs, y)``.
* AnnealedLangevin (t_final = 1): the chain's target, the posterior under the noised prior
  q_1 = N(sqrt(ab_1) mu, ab_1 Sigma + (1 - ab_1) I), ab_1 = alpha_bar_1.

The JSON also records how far apart these two references and the posterior under N(mu, Sigma)
are (``reference_gaps``: model-level differences, below the Monte Carlo errors reached here).

**Samplers and budgets** (each budget is one call with R independent runs vectorised in it):

* ``TwistedSMC(model, K, num_chains=8)`` (defaults: ess_threshold 0.5, tempered twist), budget K
  particles. Estimates from the *weighted* particles (``get_extra_fields(group_by_chain=True)``,
  ``particles`` / ``log_weights`` normalised per run); the JSON also has the errors of the K
  resampled draws of ``get_samples``, the final and minimum ESS, the resampling count and
  log Z_hat per run.
* ``DPS(model, N, num_chains=4)`` (scale 1), budget N samples.
* MALA: ``MCMC(AnnealedLangevin(model), num_warmup=W, num_samples=N, num_chains=C * 8,
  chain_method="vectorized")``, W = 400 warm-up iterations (the first W / 2 annealing from T to
  1), kappa adapted by dual averaging to 0.574; budget N post-warm-up draws per chain; a run is
  C = 4 chains pooled (C N draws).
* ULA: the same with ``metropolis=False``: the warm-up (MALA's steps) tunes kappa, then the
  chain samples without the accept/reject step, so its covariance keeps ULA's O(eta) bias.

**Errors** (per run, then the root mean square over the runs of all rounds): ``mean_err`` =
||mean - m*|| / sqrt(tr S*), ``cov_err`` = ||cov - S*||_F / ||S*||_F, ``kl`` = KL(N(mean, cov) ||
N(m*, S*)) (median over runs; None if a run's cov is singular), and the iid-equivalent sample
size, 1 / mean_err^2 (n exact iid draws give E mean_err^2 = 1 / n). Log-log slopes of the RMS
errors against the budget, the time and the NFE per run (least squares over the ladder; -1/2 for
an exact sampler, 0 for a bias floor), and the time and NFE per run at which the error curve
first reaches ``--target-mean`` / ``--target-cov`` (log-log interpolation; None: not reached;
the smallest budget's value when that budget is already below the target: an upper bound).

**Timing.** ``TwistedSMC.run`` / ``DPS.run`` build and ``jax.jit`` a new function on every call
and NumPyro's ``MCMC.run`` recompiles its loop on every call (see the MALA benchmark), so every
call traces and compiles again. A listener on JAX's compile events (trace, lowering, backend
compile) records their intervals; the *sampling time* of a call is its wall time minus their
union (what is left: the sampling, the eager tracing of the model, Python). Round 1 compiles
cold (``compile_cold_s``); JAX's persistent compilation cache is on, in a fresh temporary
folder, so round 2 pays only the retrace and a cache load (``wall_warm_s``). Time per run =
sampling time of the call / R, median over the rounds.

**NFE** per run, counted from ``probdiff/infer/posterior.py`` (one evaluation = eps_fn on one x;
"with VJP" when its gradient is taken too): TwistedSMC T K, DPS T N (all with VJP); MALA
C (2 + W / 2 + 2 W + 2 N) (Simpson's rule, quadrature=3: two evaluations per step; the W / 2
annealing steps take three, two with VJP); ULA C (2 + W / 2 + W + N) (the annealing steps two,
with VJP; one per step after).
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
from _env import CompileClock, machine_info, timestamped_log, versions, write_result
from numpyro.diagnostics import effective_sample_size
from numpyro.infer import MCMC

from probdiff import GaussianDiffusion, analytic, inverse, schedules
from probdiff.infer import DPS, AnnealedLangevin, TwistedSMC

SAMPLERS = ("TwistedSMC", "DPS", "MALA", "ULA")


# --------------------------------------------------------------------------- timing
def timed(clock, fn):
    """Run fn(); return (its result, wall seconds, compile seconds)."""
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    t1 = time.perf_counter()
    return out, t1 - t0, clock.compile_seconds(t0, t1)


# --------------------------------------------------------------------------- the problem
def make_problem(dim, num_steps, noise, seed):
    rng = np.random.default_rng(seed)
    q, r = np.linalg.qr(rng.normal(size=(dim, dim)))
    q = q * np.sign(np.diag(r))
    lam = np.geomspace(0.1, 1.0, dim)
    sigma = ((q * lam) @ q.T).astype(np.float32)
    sigma = 0.5 * (sigma + sigma.T)
    mu = rng.normal(size=dim).astype(np.float32)
    m = dim // 2
    a = (rng.normal(size=(m, dim)) / math.sqrt(dim)).astype(np.float32)
    x_true = rng.multivariate_normal(mu, sigma)
    y = jnp.asarray(a @ x_true + noise * rng.normal(size=m), jnp.float32)

    schedule = schedules.linear(num_steps, beta_start=0.1 / num_steps, beta_end=20.0 / num_steps)
    prior = GaussianDiffusion(
        analytic.optimal_eps_fn(jnp.asarray(mu), jnp.asarray(sigma), schedule), schedule, (dim,)
    )
    obs = inverse.LinearObservation(jnp.asarray(a), noise)

    def model(y=None):
        x = numpyro.sample("x", prior)
        numpyro.sample("y", obs(x), obs=y)

    ab1 = float(schedule.alpha_bar[1])

    @jax.jit
    def references(mu, sigma, y):
        # one jitted program: run eagerly, affine_reverse_marginal alone compiles ~5 s of small ops
        pm = analytic.affine_reverse_marginal(
            GaussianDiffusion(analytic.optimal_eps_fn(mu, sigma, schedule), schedule, (dim,)),
            final_noise=False,
        )
        q1_cov = ab1 * sigma + (1.0 - ab1) * jnp.eye(dim, dtype=sigma.dtype)
        posts = {
            "chain": inverse.gaussian_posterior(pm.loc, pm.covariance_matrix, obs, y),
            "q1": inverse.gaussian_posterior(math.sqrt(ab1) * mu, q1_cov, obs, y),
            "data": inverse.gaussian_posterior(mu, sigma, obs, y),
        }
        posts = {k: (v.loc, v.covariance_matrix) for k, v in posts.items()}
        return posts, inverse.gaussian_evidence(pm.loc, pm.covariance_matrix, obs, y), pm.covariance_matrix

    posts, log_evidence, pm_cov = references(jnp.asarray(mu), jnp.asarray(sigma), y)
    refs = {k: (np.asarray(m_, np.float64), np.asarray(c_, np.float64)) for k, (m_, c_) in posts.items()}
    log_evidence = float(log_evidence)
    info = {
        "D": dim,
        "m": m,
        "T": num_steps,
        "schedule": f"linear, beta {0.1 / num_steps:g} .. {20.0 / num_steps:g}",
        "alpha_bar_1": ab1,
        "alpha_bar_T": float(schedule.alpha_bar[-1]),
        "noise_scale": noise,
        "Sigma_eigenvalues": f"geomspace(0.1, 1, {dim})",
        "exact_log_evidence": log_evidence,
        "posterior_trace_cov": float(np.trace(refs["chain"][1])),
        "prior_trace_cov": float(np.trace(np.asarray(pm_cov))),
        "reference_gaps": {
            f"{a}_vs_{b}": errors(refs[a][0], refs[a][1], refs[b])
            for a, b in (("q1", "chain"), ("data", "chain"), ("data", "q1"))
        },
    }
    if dim <= 4:
        info["posterior_mean"] = refs["chain"][0].tolist()
    return {"model": model, "y": y, "refs": refs, "log_evidence": log_evidence, "info": info, "dim": dim}


def errors(mean, cov, ref):
    """Relative mean and covariance errors, and KL(N(mean, cov) || N(ref)) when cov is positive definite."""
    m_star, s_star = ref
    d = mean - m_star
    out = {
        "mean_err": float(np.linalg.norm(d) / math.sqrt(np.trace(s_star))),
        "cov_err": float(np.linalg.norm(cov - s_star) / np.linalg.norm(s_star)),
        "kl": None,
    }
    try:
        lc = np.linalg.cholesky(cov)
    except np.linalg.LinAlgError:
        return out
    ls = np.linalg.cholesky(s_star)
    dim = len(mean)
    sinv_c = np.linalg.solve(s_star, cov)
    logdet = 2.0 * (np.sum(np.log(np.diag(ls))) - np.sum(np.log(np.diag(lc))))
    out["kl"] = float(0.5 * (np.trace(sinv_c) + d @ np.linalg.solve(s_star, d) - dim + logdet))
    return out


def weighted_moments(x, logw):
    w = np.exp(logw - logw.max())
    w /= w.sum()
    mean = w @ x
    xc = x - mean
    return mean, (w[:, None] * xc).T @ xc


def sample_moments(x):
    return x.mean(0), np.cov(x.T, ddof=1)


# --------------------------------------------------------------------------- one call per sampler
def call_smc(prob, k, runs, key, clock):
    smc = TwistedSMC(prob["model"], k, num_chains=runs)
    (samples, extra), wall, comp = timed(
        clock,
        lambda: (smc.run(key, y=prob["y"]).get_samples(group_by_chain=True)["x"], smc.get_extra_fields(True)),
    )
    samples = np.asarray(samples, np.float64)
    parts = np.asarray(extra["particles"], np.float64)
    logw = np.asarray(extra["log_weights"], np.float64)
    ref = prob["refs"]["chain"]
    rows = []
    for r in range(runs):
        row = errors(*weighted_moments(parts[r], logw[r]), ref)
        res = errors(*sample_moments(samples[r]), ref)
        row.update({f"resampled_{k_}": v for k_, v in res.items()})
        row["final_ess_frac"] = float(extra["final_ess"][r]) / k
        row["min_ess_frac"] = float(np.min(np.asarray(extra["ess"][r]))) / k
        row["resampling_steps"] = int(np.sum(np.asarray(extra["resampled"][r])))
        row["log_evidence"] = float(extra["log_evidence"][r])
        rows.append(row)
    return rows, wall, comp, {}


def call_dps(prob, n, runs, key, clock):
    dps = DPS(prob["model"], n, num_chains=runs)
    samples, wall, comp = timed(
        clock, lambda: dps.run(key, y=prob["y"]).get_samples(group_by_chain=True)["x"]
    )
    samples = np.asarray(samples, np.float64)
    rows = [errors(*sample_moments(samples[r]), prob["refs"]["chain"]) for r in range(runs)]
    return rows, wall, comp, {}


def call_langevin(prob, n, runs, key, clock, *, chains, warmup, metropolis):
    kw = {"metropolis": metropolis}
    mcmc = MCMC(
        AnnealedLangevin(prob["model"], **kw),
        num_warmup=warmup,
        num_samples=n,
        num_chains=chains * runs,
        chain_method="vectorized",
        progress_bar=False,
    )

    def go():
        mcmc.run(key, y=prob["y"], extra_fields=("accept_prob",))
        return mcmc.get_samples(group_by_chain=True)["x"], mcmc.get_extra_fields(group_by_chain=True)[
            "accept_prob"
        ]

    (samples, acc), wall, comp = timed(clock, go)
    dim = prob["dim"]
    samples = np.asarray(samples, np.float64).reshape(runs, chains, n, dim)
    acc = np.asarray(acc, np.float64).reshape(runs, chains, n)
    kappa = np.exp(np.asarray(mcmc.last_state.log_kappa, np.float64)).reshape(runs, chains)
    rows = []
    for r in range(runs):
        s = samples[r]
        finite = bool(np.all(np.isfinite(s)))
        row = (
            errors(*sample_moments(s.reshape(-1, dim)), prob["refs"]["q1"])
            if finite
            else {"mean_err": float("nan"), "cov_err": float("nan"), "kl": None}
        )
        row["finite"] = finite
        row["max_abs"] = float(np.max(np.abs(s))) if finite else float("inf")
        if finite and n >= 4:
            row["min_ess"] = float(np.min(np.asarray(effective_sample_size(s))))
        row["accept"] = float(acc[r].mean())
        row["kappa"] = float(np.median(kappa[r]))
        rows.append(row)
    return rows, wall, comp, {"kappa_median": float(np.median(kappa))}


# --------------------------------------------------------------------------- bookkeeping
def nfe_per_run(sampler, budget, args, T):
    """(network evaluations per run, of which with a VJP), counted from probdiff/infer/posterior.py."""
    if sampler in ("TwistedSMC", "DPS"):
        return T * budget, T * budget
    c, w = args.chains, args.warmup
    if sampler == "MALA":
        a = w // 2
        # init 1 (VJP); a annealing steps x 3 (2 VJP); entering t = 1: 3; w - a - 1 steps x 2; budget x 2
        return c * (1 + 3 * a + 3 + 2 * (w - a - 1) + 2 * budget), c * (1 + 2 * a)
    # ULA: init 1 (VJP); a annealing steps x 2 (VJP); entering t = 1: 2; w - a - 1 + budget steps x 1
    a = w // 2
    return c * (1 + 2 * a + 2 + (w - a - 1) + budget), c * (1 + 2 * a)


def samples_per_run(sampler, budget, args):
    return budget * args.chains if sampler in ("MALA", "ULA") else budget


def rms(values):
    v = [x for x in values if x is not None and np.isfinite(x)]
    return math.sqrt(sum(x * x for x in v) / len(v)) if v else None


def slope(xs, ys):
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys, strict=True) if x and y and x > 0 and y > 0]
    if len(pts) < 2:
        return None
    lx, ly = np.array(pts).T
    return float(np.polyfit(lx, ly, 1)[0])


def time_to_reach(times, errs, target):
    """First time at which the (log-log interpolated) error curve reaches target; None if it does not."""
    pts = [(t, e) for t, e in zip(times, errs, strict=True) if t and e]
    for i, (t, e) in enumerate(pts):
        if e <= target:
            if i == 0:
                return t
            t0, e0 = pts[i - 1]
            f = (math.log(target) - math.log(e0)) / (math.log(e) - math.log(e0))
            return math.exp(math.log(t0) + f * (math.log(t) - math.log(t0)))
    return None


def iid_equivalent(mean_err, cov_err, ref_cov):
    """The n for which n iid exact draws give these RMS errors: E mean_err^2 = 1 / n and
    E ||S_hat - S||_F^2 = (tr(S)^2 + tr(S^2)) / (n - 1) for the sample covariance S_hat."""
    tr, tr2 = np.trace(ref_cov), np.trace(ref_cov @ ref_cov)
    n_mean = 1.0 / mean_err**2 if mean_err else None
    n_cov = 1.0 + (tr**2 + tr2) / (cov_err**2 * tr2) if cov_err else None
    return n_mean, n_cov


def summarise(sampler, budget, calls, args, T, ref_cov):
    rows = [r for c in calls for r in c["rows"]]
    runs = args.runs[sampler]
    per_run = [c["sample_s"] / runs for c in calls]
    t_run = statistics.median(per_run)
    nfe, nvjp = nfe_per_run(sampler, budget, args, T)
    n_samp = samples_per_run(sampler, budget, args)
    kls = [r["kl"] for r in rows]
    s = {
        "budget": budget,
        "samples_per_run": n_samp,
        "runs": len(rows),
        "nfe_per_run": nfe,
        "nfe_with_vjp_per_run": nvjp,
        "time_per_run_s": t_run,
        "time_per_run_s_all": per_run,
        "call_sample_s": [c["sample_s"] for c in calls],
        "call_wall_s": [c["wall_s"] for c in calls],
        "call_compile_s": [c["compile_s"] for c in calls],
        "compile_cold_s": calls[0]["compile_s"],
        "wall_warm_s": statistics.median([c["wall_s"] for c in calls[1:]]) if len(calls) > 1 else None,
        "samples_per_s": n_samp / t_run,
        "mean_err_rms": rms([r["mean_err"] for r in rows]),
        "cov_err_rms": rms([r["cov_err"] for r in rows]),
        "mean_err_median": statistics.median(r["mean_err"] for r in rows),
        "cov_err_median": statistics.median(r["cov_err"] for r in rows),
        "kl_median": statistics.median(kls) if all(k is not None for k in kls) else None,
        "rows": rows,
    }
    s["iid_equivalent_n_mean"], s["iid_equivalent_n_cov"] = iid_equivalent(
        s["mean_err_rms"], s["cov_err_rms"], ref_cov
    )
    s["iid_equivalent_n_mean_per_s"] = s["iid_equivalent_n_mean"] / t_run
    if sampler == "TwistedSMC":
        lz = np.array([r["log_evidence"] for r in rows])
        s["resampled_mean_err_rms"] = rms([r["resampled_mean_err"] for r in rows])
        s["resampled_cov_err_rms"] = rms([r["resampled_cov_err"] for r in rows])
        s["final_ess_frac_mean"] = float(np.mean([r["final_ess_frac"] for r in rows]))
        s["min_ess_frac_mean"] = float(np.mean([r["min_ess_frac"] for r in rows]))
        s["resampling_steps_mean"] = float(np.mean([r["resampling_steps"] for r in rows]))
        s["log_mean_Z"] = float(np.logaddexp.reduce(lz) - math.log(len(lz)))
        s["log_Z_sd"] = float(np.std(lz, ddof=1))
        s["log_Z_mean"] = float(np.mean(lz))
    if sampler in ("MALA", "ULA"):
        ess = [r.get("min_ess") for r in rows]
        s["accept_mean"] = float(np.mean([r["accept"] for r in rows]))
        s["kappa_median"] = float(np.median([r["kappa"] for r in rows]))
        s["nonfinite_runs"] = sum(not r["finite"] for r in rows)
        if all(e is not None for e in ess):
            s["min_ess_median"] = statistics.median(ess)
            s["min_ess_per_s"] = s["min_ess_median"] / t_run
    return s


# --------------------------------------------------------------------------- plot
def plot(result, path):
    """Per case, RMS mean and covariance error against sampling time per run, and mean error against NFE."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["cases"])
    panels = (
        ("mean_err_rms", "time_per_run_s", "mean error vs time"),
        ("cov_err_rms", "time_per_run_s", "covariance error vs time"),
        ("mean_err_rms", "nfe_per_run", "mean error vs NFE"),
    )
    labels = {
        "mean_err_rms": "RMS ||mean - m*|| / sqrt(tr S*)",
        "cov_err_rms": "RMS ||cov - S*||_F / ||S*||_F",
        "time_per_run_s": "sampling time per run, s (compile excluded)",
        "nfe_per_run": "network evaluations per run",
    }
    fig, axes = plt.subplots(len(names), len(panels), figsize=(16, 4.0 * len(names)), squeeze=False)
    colors = {"TwistedSMC": "C0", "DPS": "C3", "MALA": "C2", "ULA": "C1"}
    for i, name in enumerate(names):
        case = result["cases"][name]
        p = case["problem"]
        for j, (metric, xkey, title) in enumerate(panels):
            ax = axes[i][j]
            for sampler, rows in case["samplers"].items():
                ax.loglog(
                    [r[xkey] for r in rows],
                    [r[metric] for r in rows],
                    "o-",
                    color=colors[sampler],
                    label=sampler,
                )
                for r in rows:
                    ax.annotate(
                        str(r["budget"]),
                        (r[xkey], r[metric]),
                        fontsize=7,
                        xytext=(3, 3),
                        textcoords="offset points",
                        color=colors[sampler],
                    )
            xs, ys = np.array(ax.get_xlim()), np.array(ax.get_ylim())
            x0, y0 = math.sqrt(xs[0] * xs[1]), math.sqrt(ys[0] * ys[1])
            ax.loglog(xs, y0 * (xs / x0) ** -0.5, "k:", lw=0.8, label="slope -1/2")
            ax.set_xlim(xs)
            ax.set_ylim(ys)
            ax.set_xlabel(labels[xkey])
            ax.set_ylabel(labels[metric])
            ax.set_title(f"{name} (D = {p['D']}, m = {p['m']}, s = {p['noise_scale']}): {title}", fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle(
        f"Posterior sampling on the Gaussian check, T = {result['parameters']['T']} "
        f"({result['mode']} run; point labels: budget)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# --------------------------------------------------------------------------- main
def ints(text):
    return [int(v) for v in text.split(",")]


def make_cases(args):
    """(name, D, s, ladders): the main cases at noise s, then the sharp one (TwistedSMC, DPS, MALA only)."""
    if args.quick:
        main_ladders = {"TwistedSMC": [64], "DPS": [512], "MALA": [500], "ULA": [500]}
    else:
        main_ladders = {
            "TwistedSMC": ints(args.smc),
            "DPS": ints(args.dps),
            "MALA": ints(args.mcmc),
            "ULA": ints(args.mcmc),
        }
    cases = [
        (f"D{d}", d, args.noise, main_ladders) for d in ints(args.dims or ("4" if args.quick else "4,16"))
    ]
    if not (args.quick or args.no_sharp):
        d = cases[-1][1]
        sharp = {
            "TwistedSMC": ints(args.sharp_smc),
            "DPS": ints(args.sharp_dps),
            "MALA": ints(args.sharp_mcmc),
        }
        cases.append((f"D{d}_sharp", d, args.sharp_noise, sharp))
    return cases


def run_call(sampler, prob, budget, key, args, clock):
    runs = args.runs[sampler]
    if sampler == "TwistedSMC":
        return call_smc(prob, budget, runs, key, clock)
    if sampler == "DPS":
        return call_dps(prob, budget, runs, key, clock)
    common = {"chains": args.chains, "warmup": args.warmup}
    return call_langevin(prob, budget, runs, key, clock, metropolis=sampler == "MALA", **common)


def main(argv=None):
    """Set up JAX's persistent compilation cache in a fresh folder, run, and remove the folder."""
    cache_dir = tempfile.mkdtemp(prefix="probdiff_inverse_cache_")
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    try:
        return run(argv)
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)


def run(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: D = 4, one budget per sampler, 1 round")
    ap.add_argument("--out", default="bench/results/inverse.json")
    ap.add_argument("--plot", default=None, help="PNG path (default: --out with .png)")
    ap.add_argument("--dims", default=None, help="D of the main cases (default 4,16; quick 4)")
    ap.add_argument("--steps", type=int, default=100, help="T")
    ap.add_argument("--noise", type=float, default=0.5, help="observation noise s of the main cases")
    ap.add_argument("--sharp-noise", type=float, default=0.2, help="s of the sharp case (last D)")
    ap.add_argument("--no-sharp", action="store_true", help="skip the sharp case")
    ap.add_argument("--rounds", type=int, default=None, help="rounds (default 2, quick 1)")
    ap.add_argument("--smc", default="16,64,256,1024", help="TwistedSMC particle ladder")
    ap.add_argument("--dps", default="64,512,4096", help="DPS sample ladder")
    ap.add_argument("--mcmc", default="100,1000,10000", help="MALA / ULA post-warm-up draws per chain")
    ap.add_argument("--sharp-smc", default="64,1024")
    ap.add_argument("--sharp-dps", default="4096")
    ap.add_argument("--sharp-mcmc", default="10000")
    ap.add_argument("--warmup", type=int, default=400, help="MALA / ULA warm-up iterations")
    ap.add_argument("--chains", type=int, default=4, help="MALA / ULA chains per run")
    ap.add_argument("--target-mean", type=float, default=0.05)
    ap.add_argument("--target-cov", type=float, default=0.1)
    args = ap.parse_args(argv)
    q = args.quick
    args.rounds = args.rounds or (1 if q else 2)
    args.runs = {"TwistedSMC": 8, "DPS": 4, "MALA": 8, "ULA": 8}
    cases = make_cases(args)
    plot_path = Path(args.plot) if args.plot else Path(args.out).with_suffix(".png")
    log = timestamped_log()
    clock = CompileClock()
    t_start = time.perf_counter()
    result = {
        "benchmark": "posterior sampling on the Gaussian check: TwistedSMC, DPS, annealed MALA / ULA",
        "mode": "quick" if q else "default",
        "started_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "versions": versions(),
        "parameters": {
            "cases": [{"name": n, "D": d, "noise": s, "ladders": lad} for n, d, s, lad in cases],
            "T": args.steps,
            "rounds": args.rounds,
            "runs_per_call": args.runs,
            "mcmc_chains_per_run": args.chains,
            "mcmc_warmup": args.warmup,
            "targets": {"mean_err": args.target_mean, "cov_err": args.target_cov},
        },
        "method": {
            "timing": "sampling time = wall time of a call minus the union of JAX compile-event intervals; "
            "time per run = that / runs per call (runs vectorised); median over rounds; round 1 compiles cold, "
            "later rounds hit the persistent compilation cache (fresh temporary folder)",
            "errors": "per run; RMS over all runs of all rounds; TwistedSMC from the weighted particles",
            "references": "TwistedSMC, DPS: posterior under affine_reverse_marginal(prior, final_noise=False); "
            "MALA, ULA: posterior under q_1 = N(sqrt(ab1) mu, ab1 Sigma + (1 - ab1) I)",
            "nfe": "network evaluations per run counted from the code (see the docstring)",
            "iid_equivalent_n": "the number of iid exact draws with the same expected squared error "
            "(mean: 1 / mean_err^2; covariance: 1 + (tr(S)^2 + tr(S^2)) / (cov_err^2 tr(S^2)))",
        },
        "cases": {},
    }
    log(
        f"jax {jax.__version__}, numpyro {numpyro.__version__}, devices {jax.devices()}; T {args.steps}, "
        f"{args.rounds} round(s); cases {[(n, d, s_, lad) for n, d, s_, lad in cases]}"
    )

    problems = {n: make_problem(d, args.steps, s_, seed=100 + d) for n, d, s_, _ in cases}
    calls = {n: {smp: {b: [] for b in lad[smp]} for smp in lad} for n, _, _, lad in cases}
    for rd in range(args.rounds):
        for name, d, _, lad in cases:
            prob = problems[name]
            for si, sampler in enumerate(SAMPLERS):
                for b in lad.get(sampler, []):
                    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(d), 1000 * si + rd), b)
                    rows, wall, comp, extra = run_call(sampler, prob, b, key, args, clock)
                    calls[name][sampler][b].append(
                        {"rows": rows, "wall_s": wall, "compile_s": comp, "sample_s": wall - comp, **extra}
                    )
                    log(
                        f"round {rd + 1} {name:10s} {sampler:10s} budget {b:6d}: wall {wall:6.2f}s compile "
                        f"{comp:6.2f}s sample {wall - comp:6.3f}s  mean_err {rms([r['mean_err'] for r in rows]):.4f} "
                        f"cov_err {rms([r['cov_err'] for r in rows]):.4f}"
                    )

        result["machine"].setdefault("loadavg_after_round", []).append(os.getloadavg())

    # ---- summaries
    for name, _, _, lad in cases:
        prob = problems[name]
        entry = {"problem": prob["info"], "samplers": {}, "slopes": {}}
        entry["time_to_target_s"], entry["nfe_to_target"] = {}, {}
        for sampler in SAMPLERS:
            if sampler not in lad:
                continue
            ref_cov = prob["refs"]["q1" if sampler in ("MALA", "ULA") else "chain"][1]
            rows = [
                summarise(sampler, b, calls[name][sampler][b], args, args.steps, ref_cov)
                for b in lad[sampler]
            ]
            entry["samplers"][sampler] = rows
            times = [r["time_per_run_s"] for r in rows]
            xs = {
                "budget": [r["samples_per_run"] for r in rows],
                "time": times,
                "nfe": [r["nfe_per_run"] for r in rows],
            }
            entry["slopes"][sampler] = {
                f"{m}_vs_{x}": slope(xv, [r[f"{m}_rms"] for r in rows])
                for m in ("mean_err", "cov_err")
                for x, xv in xs.items()
            }
            entry["time_to_target_s"][sampler] = {
                "mean_err": time_to_reach(times, [r["mean_err_rms"] for r in rows], args.target_mean),
                "cov_err": time_to_reach(times, [r["cov_err_rms"] for r in rows], args.target_cov),
            }
            entry["nfe_to_target"][sampler] = {
                "mean_err": time_to_reach(xs["nfe"], [r["mean_err_rms"] for r in rows], args.target_mean),
                "cov_err": time_to_reach(xs["nfe"], [r["cov_err_rms"] for r in rows], args.target_cov),
            }
        if "TwistedSMC" in lad:
            entry["evidence"] = {
                "exact_log_evidence": prob["log_evidence"],
                "by_K": {
                    r["budget"]: {
                        "log_mean_Z_minus_exact": r["log_mean_Z"] - prob["log_evidence"],
                        "mean_log_Z_minus_exact": r["log_Z_mean"] - prob["log_evidence"],
                        "log_Z_sd": r["log_Z_sd"],
                        "runs": r["runs"],
                    }
                    for r in entry["samplers"]["TwistedSMC"]
                },
            }
        result["cases"][name] = entry
    result["machine"]["loadavg_end"] = os.getloadavg()
    result["wall_s"] = time.perf_counter() - t_start
    out = write_result(args.out, result)
    plot(result, plot_path)
    print_summary(result, args)
    log(f"wrote {out} and {plot_path} ({result['wall_s']:.0f}s in all)")
    return 0


def print_summary(result, args):
    def fmt(v, spec):
        return "-" if v is None else format(v, spec)

    print(
        f"\n[{result['mode']}] T = {args.steps}; errors: RMS over runs; s/run: sampling time per run (median, "
        "compile excluded); n_iid: iid-equivalent draws from the mean error"
    )
    for name, e in result["cases"].items():
        p = e["problem"]
        print(
            f"\n{name}: D = {p['D']}, m = {p['m']}, s = {p['noise_scale']}; exact log p(y) = {p['exact_log_evidence']:.4f}"
        )
        print(
            f"  {'sampler':10s} {'budget':>6s} {'samples':>7s} {'NFE':>9s} {'s/run':>8s} {'samples/s':>10s} "
            f"{'mean_err':>9s} {'cov_err':>8s} {'KL':>8s} {'n_iid':>7s} {'compile':>8s} {'warm call':>9s}  extra"
        )
        for sampler, rows in e["samplers"].items():
            for r in rows:
                extra = ""
                if sampler == "TwistedSMC":
                    extra = (
                        f"ESS_final {r['final_ess_frac_mean']:.2f}K min {r['min_ess_frac_mean']:.2f}K, resamples "
                        f"{r['resampling_steps_mean']:.1f}, log mean Z - exact "
                        f"{r['log_mean_Z'] - p['exact_log_evidence']:+.3f} (sd {r['log_Z_sd']:.3f})"
                    )
                elif sampler in ("MALA", "ULA"):
                    extra = f"accept {r['accept_mean']:.2f}, kappa {r['kappa_median']:.3g}"
                    if "min_ess_median" in r:
                        extra += f", minESS {r['min_ess_median']:.0f}"
                print(
                    f"  {sampler:10s} {r['budget']:6d} {r['samples_per_run']:7d} {r['nfe_per_run']:9d} "
                    f"{r['time_per_run_s']:8.4f} {r['samples_per_s']:10.0f} {r['mean_err_rms']:9.4f} "
                    f"{r['cov_err_rms']:8.4f} {fmt(r['kl_median'], '8.2e'):>8s} {r['iid_equivalent_n_mean']:7.0f} "
                    f"{r['compile_cold_s']:7.1f}s {fmt(r['wall_warm_s'], '.2f'):>9s}  {extra}"
                )
        for sampler, sl in e["slopes"].items():
            tt = e["time_to_target_s"][sampler]
            print(
                f"  slopes {sampler:10s} mean_err vs budget {fmt(sl['mean_err_vs_budget'], '+.2f')} vs time "
                f"{fmt(sl['mean_err_vs_time'], '+.2f')}; cov_err vs budget {fmt(sl['cov_err_vs_budget'], '+.2f')} "
                f"vs time {fmt(sl['cov_err_vs_time'], '+.2f')}; time to mean_err {args.target_mean}: "
                f"{fmt(tt['mean_err'], '.3g')} s, to cov_err {args.target_cov}: {fmt(tt['cov_err'], '.3g')} s; "
                f"NFE to these: {fmt(e['nfe_to_target'][sampler]['mean_err'], '.3g')}, "
                f"{fmt(e['nfe_to_target'][sampler]['cov_err'], '.3g')}"
            )


if __name__ == "__main__":
    sys.exit(main())
