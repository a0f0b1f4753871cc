"""``probdiff train``, ``probdiff sample`` and ``probdiff evaluate``.

``probdiff train`` with no arguments trains the default recipe ([probdiff.recipes][probdiff.recipes]:
an MLP eps-network, T = 1000, L_simple, Adam) on the built-in eight-Gaussians data set and
writes to the current folder ``checkpoint.safetensors``, ``loss.png``, ``samples.png`` and
``metrics.json`` (held-out ELBO in nats and bits per dimension, energy distance of samples to
held-out data). Existing files are never overwritten unless ``--overwrite`` is given.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

TRAIN_FILES = ("checkpoint.safetensors", "loss.png", "samples.png", "metrics.json")
HELD_OUT = 2000


def add_parsers(sub, positive_int) -> None:
    """Register the train, sample and evaluate subcommands on ``sub``."""
    from probdiff.recipes import DEFAULT_CONFIG as D

    tr = sub.add_parser("train", help="train a diffusion model (default: 2-D eight Gaussians, ~2 minutes on CPU)",
                        description=__doc__.split("\n\n")[1])
    tr.add_argument("--data", default=D["data"],
                    help="eight_gaussians, two_moons, swiss_roll, or a .npy/.npz file of rows (default eight_gaussians)")
    tr.add_argument("--steps", type=positive_int("--steps"), default=D["steps"], help=f"SVI steps (default {D['steps']})")
    tr.add_argument("--batch-size", type=positive_int("--batch-size"), default=D["batch_size"])
    tr.add_argument("--T", type=positive_int("--T"), default=D["T"], help="diffusion steps (default 1000)")
    tr.add_argument("--schedule", choices=("linear", "cosine", "sigmoid"), default=D["schedule"])
    tr.add_argument("--weighting", choices=("simple", "vlb", "hybrid"), default=D["weighting"])
    tr.add_argument("--t-sampling", choices=("uniform", "importance"), default=D["t_sampling"],
                    help="how t is drawn (importance: improved DDPM's loss-aware proposal)")
    tr.add_argument("--variance", choices=("beta", "beta_tilde", "learned"), default=D["variance"],
                    help="sigma_t^2 of the reverse kernels (learned: needs --weighting hybrid or vlb)")
    tr.add_argument("--parameterization", choices=("eps", "x0", "v"), default=D["parameterization"],
                    help="what the network predicts")
    tr.add_argument("--hidden", default=",".join(map(str, D["hidden"])), help="hidden widths (default 256,256,256)")
    tr.add_argument("--lr", type=float, default=D["learning_rate"], help="Adam learning rate (default 1e-3)")
    tr.add_argument("--seed", type=int, default=D["seed"])
    tr.add_argument("--compute-dtype", choices=("float32", "bfloat16"), default=D["compute_dtype"],
                    help="dtype of the network's arithmetic (bfloat16: mixed precision, the ELBO stays float32)")
    tr.add_argument("--devices", default="1",
                    help="data-parallel training: split each batch over this many devices, or 'all' (default 1)")
    tr.add_argument("--checkpoint-every", type=positive_int("--checkpoint-every"), default=2000)
    tr.add_argument("--resume", default=None, help="continue from this checkpoint (its config is used)")
    tr.add_argument("--out", default=".", help="output folder (default: the current folder)")
    tr.add_argument("--overwrite", action="store_true", help="replace existing output files")

    sa = sub.add_parser("sample", help="draw samples from a trained checkpoint")
    sa.add_argument("--checkpoint", required=True)
    sa.add_argument("--num", type=positive_int("--num"), default=2000)
    sa.add_argument("--seed", type=int, default=1)
    sa.add_argument("--out", default=".")
    sa.add_argument("--overwrite", action="store_true")

    ev = sub.add_parser("evaluate", help="held-out ELBO and energy distance of a trained checkpoint")
    ev.add_argument("--checkpoint", required=True)
    ev.add_argument("--data", default=None, help="data to evaluate on (default: the checkpoint's data set)")
    ev.add_argument("--num", type=positive_int("--num"), default=HELD_OUT)
    ev.add_argument("--seed", type=int, default=2)


def _load_data(spec: str, config: dict, key, num: int):
    """Training and held-out rows of a built-in data set or a user file."""
    import jax

    from probdiff import data

    if spec in data.DATASETS:
        k_train, k_test = jax.random.split(key)
        return data.load(spec, k_train, num), data.load(spec, k_test, HELD_OUT)
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(
            f"--data {spec}: neither a built-in data set ({', '.join(sorted(data.DATASETS))}) nor a file"
        )
    rows = data.load_array(path)
    if rows.ndim != 2:
        raise ValueError(f"--data {spec}: the default recipe needs rows of vectors, shape (N, D); got {rows.shape}")
    if rows.shape[0] < 10:
        raise ValueError(f"--data {spec}: need at least 10 rows to hold some out; got {rows.shape[0]}")
    perm = jax.random.permutation(key, rows.shape[0])
    n_test = max(1, rows.shape[0] // 10)
    return rows[perm[n_test:]], rows[perm[:n_test]]


def _evaluate(diffusion, held_out, key, num_samples: int):
    import jax
    import numpy as np

    from probdiff.data import energy_distance

    k_elbo, k_samp = jax.random.split(key)
    elbo = np.asarray(jax.jit(diffusion.elbo)(k_elbo, held_out), np.float64)
    samples = jax.jit(lambda k: diffusion.sample(k, (num_samples,)))(k_samp)
    D = diffusion.event_size
    metrics = {
        "held_out_points": int(held_out.shape[0]),
        "elbo_nats": float(elbo.mean()),
        "elbo_nats_se": float(elbo.std(ddof=1) / math.sqrt(len(elbo))) if len(elbo) > 1 else None,
        "bits_per_dim": float(-elbo.mean() / (D * math.log(2.0))),
        "energy_distance": float(energy_distance(samples, held_out)),
    }
    return metrics, np.asarray(samples)


def _plot_samples(samples, reference, path, title):
    from probdiff.plotting import plt

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.scatter(reference[:, 0], reference[:, 1], s=2, alpha=0.3, color="0.5", label="held-out data")
    ax.scatter(samples[:, 0], samples[:, 1], s=2, alpha=0.5, color="tab:orange", label="samples")
    ax.set_aspect("equal")
    ax.legend(fontsize=8, markerscale=4)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_loss(losses, path, weighting):
    import numpy as np

    from probdiff.plotting import plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(losses, lw=0.3, alpha=0.4, label="per step")
    w = max(1, len(losses) // 100)
    if len(losses) >= w:
        smooth = np.convolve(losses, np.ones(w) / w, mode="valid")
        ax.plot(np.arange(w - 1, len(losses)), smooth, lw=1.2, label=f"mean of {w}")
    ax.set_xlabel("step")
    ax.set_ylabel(f"loss ({weighting})")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _mesh(devices: str, batch_size: int):
    """The data-parallel mesh of ``--devices`` (None for one device)."""
    import jax

    from probdiff.parallel import data_mesh

    available = len(jax.devices())
    if devices == "all":
        n = available
    else:
        try:
            n = int(devices)
        except ValueError:
            n = 0
        if not 1 <= n <= available:
            raise SystemExit(f"probdiff train: --devices must be 'all' or an integer in 1..{available} "
                             f"(the devices JAX sees); got {devices!r}")
    if n == 1:
        return None
    if batch_size % n:
        raise SystemExit(f"probdiff train: the batch size {batch_size} must be a multiple of --devices ({n})")
    return data_mesh(n)


def run_train(args) -> int:
    import jax
    import numpy as np

    from probdiff._io import prepare_out_dir, write_json
    from probdiff.checkpoint import load_checkpoint
    from probdiff.recipes import build, diffusion_from_params
    from probdiff.training import NonFiniteLossError, fit, init_state, save_state

    if args.resume:
        _, meta = load_checkpoint(args.resume)
        config = dict(meta["config"])
        config["steps"] = args.steps
        done_losses = list(meta.get("losses", []))
    else:
        try:
            hidden = [int(h) for h in args.hidden.split(",")]
        except ValueError:
            raise SystemExit(f"probdiff train: --hidden must be comma-separated integers; got {args.hidden!r}") from None
        if args.variance == "learned" and args.weighting == "simple":
            raise SystemExit("probdiff train: --variance learned needs --weighting hybrid or vlb "
                             "(L_simple gives the variance no gradient)")
        config = {"data": args.data, "T": args.T, "schedule": args.schedule, "weighting": args.weighting,
                  "t_sampling": args.t_sampling, "variance": args.variance,
                  "parameterization": args.parameterization,
                  "hidden": hidden, "learning_rate": args.lr, "batch_size": args.batch_size,
                  "steps": args.steps, "seed": args.seed, "compute_dtype": args.compute_dtype}
        done_losses = []
    from probdiff.recipes import DEFAULT_CONFIG

    mesh = _mesh(args.devices, int(config.get("batch_size", DEFAULT_CONFIG["batch_size"])))
    out = prepare_out_dir(args.out, TRAIN_FILES, overwrite=args.overwrite)
    ckpt = out / "checkpoint.safetensors"
    key = jax.random.key(int(config.get("seed", 0)))
    k_data, k_fit, k_eval = jax.random.split(key, 3)
    train, held_out = _load_data(config["data"], config, k_data, int(config.get("num_data", DEFAULT_CONFIG["num_data"])))
    config["data_dim"] = int(train.shape[-1])
    recipe = build(config)
    c = recipe.config
    state = None
    if args.resume:
        like = init_state(recipe.svi, jax.random.key(0), train[: c["batch_size"]])
        state, _ = load_checkpoint(args.resume, like=like)
    start_step = 0 if state is None else int(state.step)
    print(f"probdiff train: {c['data']} ({train.shape[0]} rows, {held_out.shape[0]} held out), "
          f"{recipe.schedule}, MLP {c['hidden']}, {c['weighting']} loss, batch {c['batch_size']}, "
          f"steps {start_step} -> {c['steps']} on "
          + (f"{jax.devices()[0].platform}" if mesh is None else f"{mesh.devices.size} {jax.devices()[0].platform} devices")
          + ("" if c["compute_dtype"] == "float32" else f", network in {c['compute_dtype']}"))
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    losses = list(done_losses)
    step = start_step
    bar = tqdm(total=c["steps"], initial=start_step, desc="training", unit="step")
    try:
        while step < c["steps"]:
            n = min(args.checkpoint_every, c["steps"] - step)
            result = fit(recipe.svi, train, n, batch_size=c["batch_size"], rng_key=k_fit, state=state,
                         ema_decay=c["ema_decay"], steps_per_call=min(500, n), progress_bar=bar,
                         mesh=mesh)
            state, step = result.state, int(result.state.step)
            losses.extend(result.losses.tolist())
            save_state(ckpt, state, metadata={"config": c, "losses": losses}, overwrite=True)
    except NonFiniteLossError as err:
        bar.close()
        print(f"probdiff train: {err}; the last good checkpoint is {ckpt if ckpt.exists() else 'not written yet'}",
              file=sys.stderr)
        return 1
    bar.close()
    train_s = time.perf_counter() - t0
    diffusion = diffusion_from_params(recipe, state.ema)
    metrics, samples = _evaluate(diffusion, held_out, k_eval, HELD_OUT)
    if c["data"] == "eight_gaussians":
        from probdiff.data import eight_gaussians_log_prob

        # The true log-density of the held-out points, the ceiling of any ELBO on them.
        metrics["data_log_prob_nats"] = float(np.mean(np.asarray(eight_gaussians_log_prob(held_out))))
    metrics.update({"steps": step, "train_seconds": train_s,
                    "steps_per_second": (step - start_step) / train_s if step > start_step else None,
                    "config": c, "final_loss_mean_100": float(np.mean(losses[-100:])) if losses else None})
    write_json(out / "metrics.json", metrics)
    _plot_loss(np.asarray(losses), out / "loss.png", c["weighting"])
    _plot_samples(samples, np.asarray(held_out), out / "samples.png",
                  f"{c['data']}: {HELD_OUT} samples (EMA), energy distance {metrics['energy_distance']:.4f}")
    truth = metrics.get("data_log_prob_nats")
    print(f"held-out ELBO {metrics['elbo_nats']:.4f} nats ({metrics['bits_per_dim']:.4f} bits/dim)"
          + ("" if truth is None else f", true log-density {truth:.4f} nats")
          + f", energy distance {metrics['energy_distance']:.4f}; {train_s:.0f} s of training")
    print(f"wrote {', '.join(str(out / f) for f in TRAIN_FILES)}")
    return 0


def _from_checkpoint(path):
    import jax

    from probdiff.checkpoint import load_checkpoint
    from probdiff.recipes import build, diffusion_from_params
    from probdiff.training import init_state

    _, meta = load_checkpoint(path)
    if "config" not in meta:
        raise ValueError(f"{path}: a probdiff checkpoint, but not one written by probdiff train (no config)")
    recipe = build(meta["config"])
    dim = int(recipe.config["data_dim"])
    like = init_state(recipe.svi, jax.random.key(0), jax.numpy.zeros((2, dim)))
    state, _ = load_checkpoint(path, like=like)
    return recipe, diffusion_from_params(recipe, state.ema)


def run_sample(args) -> int:
    import jax
    import numpy as np

    from probdiff._io import prepare_out_dir

    out = prepare_out_dir(args.out, ("samples.npy", "samples.png"), overwrite=args.overwrite)
    recipe, diffusion = _from_checkpoint(args.checkpoint)
    x = np.asarray(jax.jit(lambda k: diffusion.sample(k, (args.num,)))(jax.random.key(args.seed)))
    np.save(out / "samples.npy", x, allow_pickle=False)
    if x.shape[-1] == 2:
        _plot_samples(x, x[:0], out / "samples.png", f"{args.num} samples from {args.checkpoint}")
    print(f"wrote {out / 'samples.npy'} ({x.shape})")
    return 0


def run_evaluate(args) -> int:
    import json

    import jax

    recipe, diffusion = _from_checkpoint(args.checkpoint)
    spec = args.data or recipe.config["data"]
    key = jax.random.key(args.seed)
    _, held_out = _load_data(spec, recipe.config, key, args.num)
    metrics, _ = _evaluate(diffusion, held_out[: args.num], key, args.num)
    print(json.dumps(metrics, indent=2))
    return 0


def dispatch(args) -> int | None:
    """Run a train/sample/evaluate command, or return None for other commands."""
    return {"train": run_train, "sample": run_sample, "evaluate": run_evaluate}.get(args.command, lambda a: None)(args)
