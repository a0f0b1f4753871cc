"""Foundation benchmarks for probdiff: compile time, full-T ELBO and ancestral sampling.

Run from the repository root:

    python bench/foundation.py                 # full run (several minutes on 2 CPU cores)
    python bench/foundation.py --quick         # smoke run (< 1 minute; fewer repetitions, smaller T)
    python bench/foundation.py --out bench/results/foundation.json

What is measured (see bench/README.md for the reasoning):

(a) compile time of ``jax.jit(d.elbo).lower(...).compile()`` on a batch of 64 2-D points and of
    ``jax.jit(Trace_ELBO().loss(key, {}, d.model, d.guide, x))``, each the median of several
    fresh compiles (``jax.clear_caches()`` before each), at T = 100, 1000, 4000.
(b) full-T ``d.elbo`` of 1000 2-D points against T evaluations of eps_fn on the same points in a
    jitted ``lax.scan`` (the irreducible work of an ELBO), for several ``chunk_size``.
(c) ``d.sample(key, (4096,))`` against a hand-written jitted ``lax.scan`` of the reverse update
    with the same eps_fn.

A and B runs are interleaved (A B A B ...) in one process, so slow drift of a shared machine
hits both; every timing is wall time of a jitted call with ``block_until_ready`` after a
warm-up call. The JSON keeps the raw timings; the ratios are ratios of medians.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import resource
import statistics
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from _env import machine_info, versions
from numpyro.infer import Trace_ELBO

from probdiff import GaussianDiffusion, schedules
from probdiff.distributions.kernels import mu_from_eps, reverse_variance

# ----------------------------------------------------------------------------- the eps-network


class MLP(eqx.Module):
    """eps_theta(x_t, t): 2 -> 3 hidden layers of 256 (SiLU) -> 2, with a time embedding.

    The sinusoidal embedding of t (``emb_dim`` features) goes through a linear map to the
    hidden width and is added to the first layer's pre-activation. ``x`` has shape
    ``(..., 2)``; ``t`` is an integer scalar or has the batch shape of ``x`` (e.g. ``(N,)``).
    """

    layers: list
    time_proj: eqx.nn.Linear
    freqs: jax.Array

    def __init__(self, key, data_dim: int = 2, hidden: int = 256, emb_dim: int = 32):
        k0, k1, k2, k3, kt = jax.random.split(key, 5)
        self.layers = [
            eqx.nn.Linear(data_dim, hidden, key=k0),
            eqx.nn.Linear(hidden, hidden, key=k1),
            eqx.nn.Linear(hidden, hidden, key=k2),
            eqx.nn.Linear(hidden, data_dim, key=k3),
        ]
        self.time_proj = eqx.nn.Linear(emb_dim, hidden, use_bias=False, key=kt)
        half = emb_dim // 2
        self.freqs = jnp.exp(-math.log(10_000.0) * jnp.arange(half) / half)

    @staticmethod
    def _dense(layer, h):
        out = h @ layer.weight.T
        return out if layer.bias is None else out + layer.bias

    def __call__(self, x, t):
        angles = jnp.asarray(t, x.dtype)[..., None] * self.freqs  # (..., emb_dim / 2)
        emb = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)
        h = self._dense(self.layers[0], x) + self._dense(self.time_proj, emb)
        for layer in self.layers[1:]:
            h = self._dense(layer, jax.nn.silu(h))
        return h


# ----------------------------------------------------------------------------- timing helpers


def _rusage():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime, r.ru_minflt


def summarize(xs):
    return {"min": min(xs), "median": statistics.median(xs), "max": max(xs), "n": len(xs)}


def interleaved(variants: dict, reps: int, log=print):
    """Time each variant ``reps`` times, round-robin (A B C A B C ...), after one warm-up each.

    ``variants`` maps a name to a zero-argument callable that runs a jitted computation and
    blocks on its result. Returns per-variant raw wall times plus CPU-time and page-fault
    counts of the process over each call (a diagnostic for memory-bound variants).
    """
    for name, fn in variants.items():
        t0 = time.perf_counter()
        fn()
        log(f"    warm-up {name}: {time.perf_counter() - t0:.2f} s")
    raw = {name: {"wall_s": [], "user_s": [], "sys_s": [], "minor_faults": []} for name in variants}
    for r in range(reps):
        for name, fn in variants.items():
            u0, s0, f0 = _rusage()
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            u1, s1, f1 = _rusage()
            raw[name]["wall_s"].append(dt)
            raw[name]["user_s"].append(u1 - u0)
            raw[name]["sys_s"].append(s1 - s0)
            raw[name]["minor_faults"].append(f1 - f0)
        log(f"    round {r + 1}/{reps}: " + "  ".join(f"{n}={raw[n]['wall_s'][-1]:.3f}s" for n in variants))
    return raw


def _summaries(raw):
    out = {}
    for name, r in raw.items():
        out[name] = summarize(r["wall_s"])
        out[name]["median_sys_s"] = statistics.median(r["sys_s"])
        out[name]["median_minor_faults"] = statistics.median(r["minor_faults"])
    return out


def ratio_entry(raw, a: str, b: str, goal: float | None):
    """Ratio of medians a / b, plus the median of the per-round ratios a_i / b_i."""
    wa, wb = raw[a]["wall_s"], raw[b]["wall_s"]
    ratio = statistics.median(wa) / statistics.median(wb)
    entry = {
        "numerator": a,
        "denominator": b,
        "ratio_of_medians": ratio,
        "median_of_paired_ratios": statistics.median(x / y for x, y in zip(wa, wb, strict=True)),
        # On a contended machine the fastest run of each is the least disturbed one.
        "ratio_of_mins": min(wa) / min(wb),
    }
    if goal is not None:
        entry["goal"] = f"<= {goal}"
        entry["pass"] = bool(ratio <= goal)
    return entry


def time_compile(make_fn, args, reps: int):
    """Wall time of ``jax.jit(fn).lower(*args)`` and ``.compile()`` over ``reps`` fresh compiles."""
    lower_s, compile_s, total_s = [], [], []
    for _ in range(reps):
        jax.clear_caches()
        fn = make_fn()
        t0 = time.perf_counter()
        lowered = jax.jit(fn).lower(*args)
        t1 = time.perf_counter()
        compiled = lowered.compile()
        t2 = time.perf_counter()
        lower_s.append(t1 - t0)
        compile_s.append(t2 - t1)
        total_s.append(t2 - t0)
        del compiled
    return {"lower_s": lower_s, "compile_s": compile_s, "total_s": total_s, "total": summarize(total_s)}


# ----------------------------------------------------------------------------- benchmarks


def bench_compile(net, p, log):
    """(a) compile time of d.elbo and of Trace_ELBO().loss on 64 points, across T."""
    x = jax.random.normal(jax.random.key(11), (p["compile_batch"], 2))
    key = jax.random.key(12)
    out = {}
    for T in p["compile_Ts"]:
        sched = schedules.linear(T)
        for cs in p["compile_chunk_sizes"]:
            d = GaussianDiffusion(net, sched, (2,), chunk_size=cs)
            makers = {
                "elbo": lambda d=d: lambda k, x: d.elbo(k, x),
                "trace_elbo_loss": lambda d=d: lambda k, x: Trace_ELBO().loss(k, {}, d.model, d.guide, x),
            }
            for name, make in makers.items():
                label = f"{name}/T={T}/chunk_size={cs}"
                res = time_compile(make, (key, x), p["compile_reps"])
                out[label] = {"fn": name, "T": T, "chunk_size": cs, **res}
                log(
                    f"    {label}: median {res['total']['median']:.2f} s  (raw {np.round(res['total_s'], 2).tolist()})"
                )
    jax.clear_caches()

    goals = {}
    T_main = p["compile_goal_T"]
    for name in ("elbo", "trace_elbo_loss"):
        for cs in p["compile_chunk_sizes"]:
            med = out[f"{name}/T={T_main}/chunk_size={cs}"]["total"]["median"]
            goals[f"compile_{name}_T{T_main}_chunk{cs}"] = {
                "median_s": med,
                "goal": f"<= {p['compile_goal_s']} s",
                "pass": bool(med <= p["compile_goal_s"]),
            }
            lo, hi = min(p["compile_Ts"]), max(p["compile_Ts"])
            growth = (
                out[f"{name}/T={hi}/chunk_size={cs}"]["total"]["median"]
                / out[f"{name}/T={lo}/chunk_size={cs}"]["total"]["median"]
            )
            goals[f"compile_growth_{name}_chunk{cs}_T{lo}_to_T{hi}"] = {
                "ratio": growth,
                "T_ratio": hi / lo,
                "goal": f"<= {p['compile_growth_goal']} (an unrolled loop would grow ~{hi / lo:.0f}x)",
                "pass": bool(growth <= p["compile_growth_goal"]),
            }
    return {"runs": out, "goals": goals}


def bench_elbo(net, p, log):
    """(b) full-T d.elbo of n points against T eps_fn evaluations in a lax.scan."""
    T, n = p["T"], p["elbo_points"]
    sched = schedules.linear(T)
    x = jax.random.normal(jax.random.key(21), (n, 2))
    key = jax.random.key(22)
    scale = jnp.sqrt(sched.alpha_bar)  # a per-t scalar, so the loop body is not loop-invariant

    @jax.jit
    def baseline_scan(x):
        # T evaluations of eps_fn on the same n points, one per t, accumulated so nothing is
        # dead code. x * sqrt(alpha_bar_t) (2n multiplies) keeps XLA from hoisting the first
        # layer out of the loop, as it cannot in the ELBO, where x_t differs for every t.
        def step(acc, t):
            return acc + net(x * scale[t], t), None

        acc, _ = jax.lax.scan(step, jnp.zeros_like(x), jnp.arange(1, T + 1))
        return acc

    @jax.jit
    def baseline_vmap(x):
        # Diagnostic: the same T evaluations, all t in one vmapped batch (what chunk_size=None does).
        return jnp.sum(jax.vmap(lambda t: net(x * scale[t], t))(jnp.arange(1, T + 1)), axis=0)

    variants = {"baseline_scan": lambda: jax.block_until_ready(baseline_scan(x))}
    if p["elbo_vmap_baseline"]:
        variants["baseline_vmap"] = lambda: jax.block_until_ready(baseline_vmap(x))
    elbo_values = {}
    for cs in p["elbo_chunk_sizes"]:
        d = GaussianDiffusion(net, sched, (2,), chunk_size=cs)
        f = jax.jit(lambda k, x, d=d: d.elbo(k, x))
        name = f"elbo_chunk{cs}"
        variants[name] = lambda f=f: jax.block_until_ready(f(key, x))
        elbo_values[name] = float(jnp.mean(f(key, x)))
    raw = interleaved(variants, p["elbo_reps"], log)
    ratios = {}
    for cs in p["elbo_chunk_sizes"]:
        ratios[f"elbo_chunk{cs}/baseline_scan"] = ratio_entry(
            raw, f"elbo_chunk{cs}", "baseline_scan", p["elbo_goal"]
        )
        if p["elbo_vmap_baseline"]:
            ratios[f"elbo_chunk{cs}/baseline_vmap"] = ratio_entry(
                raw, f"elbo_chunk{cs}", "baseline_vmap", None
            )
    if p["elbo_vmap_baseline"]:
        ratios["baseline_vmap/baseline_scan"] = ratio_entry(raw, "baseline_vmap", "baseline_scan", None)
    return {
        "T": T,
        "points": n,
        "mean_elbo_nats": elbo_values,
        "raw": raw,
        "summary": _summaries(raw),
        "ratios": ratios,
    }


def bench_sample(net, p, log):
    """(c) d.sample(key, (n,)) against a hand-written lax.scan of the reverse update."""
    T, n = p["T"], p["sample_points"]
    sched = schedules.linear(T)
    d = GaussianDiffusion(net, sched, (2,))
    key = jax.random.key(31)

    @jax.jit
    def library(key):
        return d.sample(key, (n,))

    @jax.jit
    def baseline(key):
        # Algorithm 2 of Ho et al.: x_{t-1} = mu_theta(x_t, t) + sigma_t z, z = 0 at t = 1,
        # with the same key use as the library, so the samples must agree.
        key_T, key_steps = jax.random.split(key)
        sigma = jnp.sqrt(reverse_variance(sched, "beta")).at[1].set(0.0)

        def step(x_t, t):
            mean = mu_from_eps(sched, t, x_t, net(x_t, t))
            z = jax.random.normal(jax.random.fold_in(key_steps, t), x_t.shape, x_t.dtype)
            return mean + sigma[t] * z, None

        x_T = jax.random.normal(key_T, (n, 2), sched.dtype)
        x_0, _ = jax.lax.scan(step, x_T, jnp.arange(T, 0, -1))
        return x_0

    max_abs_diff = float(jnp.max(jnp.abs(library(key) - baseline(key))))
    variants = {
        "sample": lambda: jax.block_until_ready(library(key)),
        "baseline_scan": lambda: jax.block_until_ready(baseline(key)),
    }
    raw = interleaved(variants, p["sample_reps"], log)
    return {
        "T": T,
        "points": n,
        "max_abs_diff_library_vs_baseline": max_abs_diff,
        "raw": raw,
        "summary": _summaries(raw),
        "ratios": {"sample/baseline_scan": ratio_entry(raw, "sample", "baseline_scan", p["sample_goal"])},
    }


# ----------------------------------------------------------------------------- environment


def parameters(quick: bool):
    p = {
        "quick": quick,
        "schedule": "linear (beta 1e-4 .. 0.02)",
        "eps_fn": "MLP 2 -> 3x256 SiLU -> 2, 32-dim sinusoidal time embedding projected and added",
        "dtype": "float32",
        "T": 1000,
        "compile_batch": 64,
        "compile_Ts": [100, 1000, 4000],
        "compile_chunk_sizes": ["auto", None, 100],
        "compile_reps": 3,
        "compile_goal_T": 1000,
        "compile_goal_s": 15.0,
        "compile_growth_goal": 2.0,
        "elbo_points": 1000,
        "elbo_chunk_sizes": ["auto", None, 100, 10, 1],
        "elbo_vmap_baseline": True,
        "elbo_reps": 7,
        "elbo_goal": 1.2,
        "sample_points": 4096,
        "sample_reps": 5,
        "sample_goal": 1.1,
    }
    if quick:
        # A smoke run: one compile each at two T, and the runtime benchmarks at T = 100.
        p.update(
            T=100,
            compile_Ts=[100, 1000],
            compile_chunk_sizes=["auto"],
            compile_reps=1,
            elbo_chunk_sizes=["auto", None],
            elbo_vmap_baseline=False,
            elbo_reps=2,
            sample_reps=2,
        )
    return p


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: fewer repetitions, T = 100 for runtimes")
    ap.add_argument("--out", default="bench/results/foundation.json", help="where to write the JSON results")
    args = ap.parse_args(argv)

    def log(msg):
        print(msg, flush=True)

    p = parameters(args.quick)
    started = datetime.datetime.now(datetime.UTC)
    result = {
        "benchmark": "probdiff foundation",
        "started_utc": started.isoformat(timespec="seconds"),
        "machine": machine_info(),
        "versions": versions(),
        "parameters": p,
        "loadavg_start": os.getloadavg(),
    }
    log(
        f"probdiff foundation benchmark ({'quick' if args.quick else 'full'}) on {result['machine']['jax_devices']}, "
        f"{result['machine']['cpu_count']} CPUs, load {result['loadavg_start']}"
    )
    net = MLP(jax.random.key(0))

    t0 = time.perf_counter()
    log("(a) compile time")
    result["compile"] = bench_compile(net, p, log)
    log(f"(b) full-T ELBO, T={p['T']}, {p['elbo_points']} points")
    result["elbo"] = bench_elbo(net, p, log)
    log(f"(c) ancestral sampling, T={p['T']}, {p['sample_points']} points")
    result["sample"] = bench_sample(net, p, log)
    result["loadavg_end"] = os.getloadavg()
    result["wall_s_total"] = time.perf_counter() - t0

    goals = dict(result["compile"]["goals"])
    for sec in ("elbo", "sample"):
        for k, v in result[sec]["ratios"].items():
            if "goal" in v:
                goals[f"{sec}:{k}"] = {"ratio": v["ratio_of_medians"], "goal": v["goal"], "pass": v["pass"]}
    result["goals"] = goals

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))

    log("\nsummary (medians; ratios are ratios of medians)")
    for k, v in goals.items():
        val = v.get("median_s", v.get("ratio"))
        unit = " s" if "median_s" in v else ""
        log(f"  {'PASS' if v['pass'] else 'FAIL'}  {k}: {val:.3f}{unit}  (goal {v['goal']})")
    for sec in ("elbo", "sample"):
        for k, v in result[sec]["summary"].items():
            log(
                f"  time  {sec}:{k}: median {v['median']:.3f} s (min {v['min']:.3f}, max {v['max']:.3f}); "
                f"median sys {v['median_sys_s']:.2f} s, {v['median_minor_faults']:.0f} minor page faults per call"
            )
        for k, v in result[sec]["ratios"].items():
            if "goal" not in v:
                log(f"  info  {sec}:{k}: {v['ratio_of_medians']:.3f}")
    log(f"wrote {out} ({result['wall_s_total']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
