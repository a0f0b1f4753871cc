"""Scaling of training, the full-T ELBO and sampling with T, batch, dimension, precision and devices.

``python bench/scaling.py`` (~5 min on 2 CPU cores; ``--quick`` ~2 min) writes
``bench/results/scaling.json`` and ``scaling.png``. Sections:

* **T** (100, 250, 1000, 4000): one training step (``fit``'s compiled block of SVI steps with
  L_simple and sampled t), the exact full-T ELBO (``GaussianDiffusion.elbo``, streamed over t in
  chunks, ``chunk_size="auto"``; ``chunk_size=None`` evaluates all t in one ``vmap``) and
  ancestral sampling: compile time, run time and the compiled program's memory.
* **batch** (64 .. 4096) and **dimension** D (2 .. 256): training steps/s and examples/s.
* **precision**: float32 against ``compute_dtype="bfloat16"`` for the MLP and a small UNet.
* **devices** (1, 2, 4 host devices, one child process each, ``--xla_force_host_platform_device_count``):
  data-parallel training with ``fit(mesh=data_mesh())``, global batch fixed (strong scaling) and
  per-device batch fixed (weak scaling).

Memory is XLA's own account of the compiled program (``compiled.memory_analysis()``): arguments +
outputs + temporaries - aliased buffers, the bytes the program needs at its peak; it is the same
number on every run, so no noise. On a GPU the device's ``peak_bytes_in_use`` is recorded as well.

Timing: every variant is compiled first (compile time = ``lower().compile()`` wall time), then
the variants of one section run round-robin for ``--rounds`` rounds; the JSON keeps every time
and the median.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _env import machine_info, timestamped_log, versions, write_result  # noqa: E402

log = timestamped_log()


def memory_bytes(compiled) -> dict:
    """XLA's memory account of a compiled program; ``peak`` = args + outputs + temps - aliases."""
    m = compiled.memory_analysis()
    if m is None:
        return {}
    out = {k: int(getattr(m, f"{k}_size_in_bytes", 0)) for k in ("argument", "output", "temp", "alias")}
    out["peak"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
    return out


def device_peak():
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def timed(fn, *args):
    import jax

    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - t0


def compile_timed(jitted, *args):
    t0 = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    return compiled, time.perf_counter() - t0


def train_variant(config: dict, n_data: int, steps: int, mesh=None):
    """The compiled ``fit`` block of ``steps`` SVI steps for a recipe config, with its inputs."""
    import jax
    import jax.numpy as jnp

    from probdiff.recipes import build
    from probdiff.training import _block_fn, init_state

    r = build(config)
    c = r.config
    data = jax.random.normal(jax.random.key(0), (n_data, int(c["data_dim"])))
    key_data = jax.random.key(1)
    state = init_state(r.svi, jax.random.key(2), data[: c["batch_size"]])
    if mesh is not None:
        from probdiff.parallel import replicate

        data, state, key_data = replicate((data, state, key_data), mesh)
    block = _block_fn(r.svi, int(c["batch_size"]), 0.999, mesh)
    args = (state, data, key_data, jnp.zeros((steps,)))
    compiled, compile_s = compile_timed(block, *args)
    return {"fn": compiled, "args": args, "compile_s": compile_s, "memory": memory_bytes(compiled),
            "steps": steps, "batch": int(c["batch_size"])}


def run_rounds(variants: dict, rounds: int) -> dict:
    """Round-robin timing of ``{name: variant}``; adds ``times`` and ``median_s`` to each."""
    for v in variants.values():
        timed(v["fn"], *v["args"])  # warm-up
        v["times"] = []
    for _ in range(rounds):
        for v in variants.values():
            v["times"].append(timed(v["fn"], *v["args"]))
    for v in variants.values():
        v["median_s"] = statistics.median(v["times"])
        if "steps" in v:
            v["steps_per_s"] = v["steps"] / v["median_s"]
            v["examples_per_s"] = v["steps"] * v["batch"] / v["median_s"]
    return variants


def public(variants: dict) -> dict:
    return {k: {kk: vv for kk, vv in v.items() if kk not in ("fn", "args")} for k, v in variants.items()}


BASE = {"hidden": [256, 256, 256], "time_dim": 32, "learning_rate": 1e-3}


def section_T(Ts, rounds, steps, elbo_points, sample_points):
    import jax

    from probdiff import GaussianDiffusion
    from probdiff.recipes import build
    from probdiff.training import init_state

    out = {}
    train, elbo_auto, elbo_none, sample = {}, {}, {}, {}
    for T in Ts:
        log(f"T = {T}: compiling")
        cfg = {**BASE, "T": T, "batch_size": 512}
        train[T] = train_variant(cfg, 20_000, steps)
        r = build(cfg)
        params = r.svi.optim.get_params(init_state(r.svi, jax.random.key(0), jax.numpy.zeros((8, 2))).svi_state.optim_state)
        from probdiff.recipes import diffusion_from_params

        d = diffusion_from_params(r, params)
        x = jax.random.normal(jax.random.key(3), (elbo_points, 2))
        key = jax.random.key(4)
        d_auto = GaussianDiffusion(d.eps_fn, d.schedule, (2,), chunk_size="auto")
        d_none = GaussianDiffusion(d.eps_fn, d.schedule, (2,), chunk_size=None)
        c, s = compile_timed(jax.jit(d_auto.elbo), key, x)
        elbo_auto[T] = {"fn": c, "args": (key, x), "compile_s": s, "memory": memory_bytes(c)}
        c, s = compile_timed(jax.jit(d_none.elbo), key, x)
        elbo_none[T] = {"fn": c, "args": (key, x), "compile_s": s, "memory": memory_bytes(c)}
        fn = jax.jit(lambda k, d=d_auto: d.sample(k, (sample_points,)))
        c, s = compile_timed(fn, key)
        sample[T] = {"fn": c, "args": (key,), "compile_s": s, "memory": memory_bytes(c)}
    log("T: timing")
    run_rounds({f"train/{T}": v for T, v in train.items()}, rounds)
    run_rounds({f"elbo/{T}": v for T, v in elbo_auto.items()}, rounds)
    # all-t vmap: time it only where its temporaries stay small (memory is reported for all T)
    small = {T: v for T, v in elbo_none.items() if v["memory"].get("peak", 0) < 2e9}
    run_rounds({f"elbo_none/{T}": v for T, v in small.items()}, rounds)
    run_rounds({f"sample/{T}": v for T, v in sample.items()}, rounds)
    out["train"] = {str(T): v for T, v in public(train).items()}
    out["elbo_chunked"] = {str(T): v for T, v in public(elbo_auto).items()}
    out["elbo_all_t"] = {str(T): v for T, v in public(elbo_none).items()}
    out["sample"] = {str(T): v for T, v in public(sample).items()}
    out["parameters"] = {"train_batch": 512, "train_steps_per_call": steps, "elbo_points": elbo_points,
                         "sample_points": sample_points, "net": "MLP 2 -> 3x256 -> 2", "loss": "L_simple, t ~ U{1..T}"}
    return out


def section_batch(batches, rounds, steps):
    variants = {}
    for b in batches:
        log(f"batch = {b}: compiling")
        variants[str(b)] = train_variant({**BASE, "T": 1000, "batch_size": b}, 20_000, steps)
    run_rounds(variants, rounds)
    return public(variants)


def section_dim(dims, rounds, steps):
    variants = {}
    for dim in dims:
        log(f"D = {dim}: compiling")
        variants[str(dim)] = train_variant({**BASE, "T": 1000, "batch_size": 512, "data_dim": dim}, 20_000, steps)
    run_rounds(variants, rounds)
    return public(variants)


def unet_variant(dtype: str, batch: int, steps: int):
    import jax
    import jax.numpy as jnp
    import numpyro
    import optax
    from numpyro.contrib.module import eqx_module
    from numpyro.infer import SVI

    from probdiff import GaussianDiffusion, schedules
    from probdiff.infer import DiffusionELBO
    from probdiff.nets import MixedPrecision
    from probdiff.training import _block_fn, init_state
    from probdiff.unet import UNet

    net0 = UNet(1, jax.random.key(0), base=32, mults=(1, 2), time_dim=64)
    sched = schedules.linear(1000)

    def model(x):
        net = eqx_module("eps_net", net0)
        if dtype != "float32":
            net = MixedPrecision(net, dtype)
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("x", GaussianDiffusion(net, sched, (8, 8, 1)), obs=x)

    svi = SVI(model, lambda x: None, optax.adam(2e-4), DiffusionELBO())
    data = jax.random.normal(jax.random.key(1), (2048, 8, 8, 1))
    state = init_state(svi, jax.random.key(2), data[:batch])
    block = _block_fn(svi, batch, 0.999, None)
    args = (state, data, jax.random.key(3), jnp.zeros((steps,)))
    compiled, compile_s = compile_timed(block, *args)
    return {"fn": compiled, "args": args, "compile_s": compile_s, "memory": memory_bytes(compiled),
            "steps": steps, "batch": batch}


def section_precision(rounds, steps, unet_steps):
    variants = {}
    for dtype in ("float32", "bfloat16"):
        log(f"precision {dtype}: compiling")
        variants[f"mlp/{dtype}"] = train_variant({**BASE, "T": 1000, "batch_size": 512, "compute_dtype": dtype},
                                                 20_000, steps)
        variants[f"unet/{dtype}"] = unet_variant(dtype, 64, unet_steps)
    run_rounds(variants, rounds)
    return public(variants)


CHILD = r"""
import json, sys
sys.path.insert(0, {bench!r})
from scaling import train_variant, run_rounds, public
from probdiff.parallel import data_mesh
import jax
n = {n}
if n > len(jax.devices()):
    print("RESULT" + json.dumps({{"devices": n, "error": f"only {{len(jax.devices())}} devices"}}))
    raise SystemExit(0)
mesh = data_mesh(n) if n > 1 else None
v = {{
    "strong": train_variant({{"hidden": [256, 256, 256], "T": 1000, "batch_size": {strong}}}, 20000, {steps}, mesh),
    "weak": train_variant({{"hidden": [256, 256, 256], "T": 1000, "batch_size": {weak} * n}}, 20000, {steps}, mesh),
}}
run_rounds(v, {rounds})
print("RESULT" + json.dumps({{"devices": n, **public(v)}}))
"""


def section_devices(counts, rounds, steps, strong, weak):
    out = {}
    bench = str(Path(__file__).resolve().parent)
    for n in counts:
        log(f"devices = {n}: child process")
        # CPU devices are simulated; on a machine with accelerators data_mesh(n) takes n of them
        flags = os.environ.get("XLA_FLAGS", "")
        env = {**os.environ, "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count={n}".strip()}
        code = CHILD.format(bench=bench, strong=strong, weak=weak, steps=steps, rounds=rounds, n=n)
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        if proc.returncode:
            out[str(n)] = {"error": proc.stderr[-2000:]}
            continue
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")][-1]
        out[str(n)] = json.loads(line[len("RESULT"):])
    return {"runs": out, "parameters": {"strong_global_batch": strong, "weak_batch_per_device": weak,
                                        "steps_per_call": steps, "T": 1000, "net": "MLP 2 -> 3x256 -> 2"}}


def plot(result: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    sT = result["T"]
    Ts = sorted(int(t) for t in sT["train"])

    ax = axes[0, 0]
    ax.plot(Ts, [sT["train"][str(t)]["steps_per_s"] for t in Ts], "o-", label="training (sampled t)")
    ax.set(xscale="log", xlabel="T", ylabel="training steps / s", title="training speed against T (batch 512)")
    ax.set_ylim(bottom=0)
    ax.legend()

    ax = axes[0, 1]
    for key, label in (("train", "training step"), ("elbo_chunked", "full-T ELBO, chunked"),
                       ("elbo_all_t", "full-T ELBO, all t at once"), ("sample", "ancestral sampling")):
        ys = [sT[key][str(t)]["memory"].get("peak", float("nan")) / 2**20 for t in Ts]
        ax.plot(Ts, ys, "o-", label=label)
    ax.set(xscale="log", yscale="log", xlabel="T", ylabel="compiled peak memory (MiB)",
           title="memory against T")
    ax.legend(fontsize=8)

    ax = axes[0, 2]
    for key, label in (("elbo_chunked", f"full-T ELBO ({sT['parameters']['elbo_points']} points)"),
                       ("sample", f"ancestral sampling ({sT['parameters']['sample_points']} points)")):
        ax.plot(Ts, [sT[key][str(t)]["median_s"] for t in Ts], "o-", label=label)
    ax.plot(Ts, [sT["elbo_chunked"][str(Ts[0])]["median_s"] * t / Ts[0] for t in Ts], "k:", lw=1, label="proportional to T")
    ax.set(xscale="log", yscale="log", xlabel="T", ylabel="seconds", title="full-T work against T")
    ax.legend(fontsize=8)

    ax = axes[1, 0]
    b = result["batch"]
    bs = sorted(int(k) for k in b)
    ax.plot(bs, [b[str(k)]["examples_per_s"] for k in bs], "o-")
    ax.set(xscale="log", yscale="log", xlabel="batch size", ylabel="examples / s", title="training throughput against batch (T = 1000)")

    ax = axes[1, 1]
    dd = result["dim"]
    ds = sorted(int(k) for k in dd)
    ax.plot(ds, [dd[str(k)]["steps_per_s"] for k in ds], "o-")
    ax.set(xscale="log", xlabel="data dimension D", ylabel="training steps / s", title="training speed against D (batch 512)")
    ax.set_ylim(bottom=0)

    ax = axes[1, 2]
    runs = {int(k): v for k, v in result["devices"]["runs"].items() if "error" not in v}
    ns = sorted(runs)
    if ns:
        base_s = runs[ns[0]]["strong"]["steps_per_s"]
        base_w = runs[ns[0]]["weak"]["examples_per_s"]
        ax.plot(ns, [runs[n]["strong"]["steps_per_s"] / base_s for n in ns], "o-", label="strong (global batch fixed)")
        ax.plot(ns, [runs[n]["weak"]["examples_per_s"] / base_w for n in ns], "s-", label="weak (batch per device fixed)")
        ax.plot(ns, ns, "k:", lw=1, label="ideal")
    backend = result["machine"]["jax_backend"]
    where = (f"simulated CPU devices sharing {result['machine']['cpu_count']} cores" if backend == "cpu"
             else backend)
    ax.set(xlabel="devices", ylabel="throughput relative to 1 device", title=f"data-parallel scaling ({where})")
    ax.legend(fontsize=8)
    fig.suptitle(f"probdiff scaling on {result['machine'].get('cpu_model', result['machine']['jax_backend'])}, "
                 f"{result['machine']['cpu_count']} cores", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: fewer T, batches, dims and rounds")
    ap.add_argument("--out", default="bench/results/scaling.json")
    ap.add_argument("--rounds", type=int, default=None)
    args = ap.parse_args(argv)
    q = args.quick
    rounds = args.rounds or (2 if q else 5)
    result = {"benchmark": "probdiff scaling: T, batch, dimension, precision, devices",
              "mode": "quick" if q else "full",
              "started_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
              "machine": machine_info(), "versions": versions()}
    t0 = time.perf_counter()
    result["T"] = section_T([100, 1000] if q else [100, 250, 1000, 4000], rounds, 20 if q else 50,
                            128, 256)
    result["batch"] = section_batch([64, 512] if q else [64, 256, 1024, 4096], rounds, 10 if q else 20)
    result["dim"] = section_dim([2, 64] if q else [2, 16, 64, 256], rounds, 10 if q else 20)
    result["precision"] = section_precision(rounds, 10 if q else 20, 2 if q else 5)
    result["devices"] = section_devices([1, 2] if q else [1, 2, 4], rounds, 10 if q else 20, 512, 128)
    peak = device_peak()
    if peak is not None:
        result["device_peak_bytes_in_use"] = peak
    result["machine"]["loadavg_end"] = os.getloadavg()
    result["wall_s"] = time.perf_counter() - t0
    out = write_result(args.out, result)
    plot(result, out.with_suffix(".png"))
    log(f"wrote {out} and {out.with_suffix('.png')}")
    return result


if __name__ == "__main__":
    main()
