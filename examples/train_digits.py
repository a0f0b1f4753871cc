r"""Train a diffusion model on scikit-learn's 8x8 digits and report bits per dimension.

MATH.md B2, C1-C4. The data are integer images k (17 grey levels, 8 x 8 x 1, channels last).
Uniform dequantisation is written as part of the probabilistic program: the noise u that turns
k into continuous pixels is a latent site of the model, and the guide draws it from U[0, 1):

    def model(k):                                           # k: integer images, (B, 8, 8, 1)
        net = eqx_module("eps_net", net0)                   # a UNet (probdiff.unet)
        with numpyro.plate("images", B):
            u = numpyro.sample("u", Uniform(0, 1).expand((8, 8, 1)).to_event(3))
            y = 2 * (k + u) / 17 - 1                        # dequantised, in [-1, 1)
            numpyro.sample("x", GaussianDiffusion(net, schedule, (8, 8, 1)), obs=y)
            numpyro.factor("jacobian", D * log(2 / 17))    # dy = (2/17)^D d(k + u)

    def guide(k):
        with numpyro.plate("images", B):
            numpyro.sample("u", Uniform(0, 1).expand((8, 8, 1)).to_event(3))

With ``DiffusionELBO("vlb")`` the loss is then an unbiased estimate of minus the ELBO of the
*discrete* images, log P(k) >= E_q[log p(k, u) - log q(u)], because log p(u) - log q(u) = 0
and the diffusion site gives the ELBO of y. Training uses ``DiffusionELBO("simple")`` (DDPM's
L_simple, which makes better samples), driven by [fit][probdiff.training.fit]: ``svi.update``
in a jitted ``lax.scan`` with an EMA of the parameters, a progress bar, a NaN guard, and
safetensors checkpoints that resume exactly (``--resume``).

Afterwards the script evaluates the EMA parameters on the held-out images with the full-T
ELBO (all 1000 steps, analytic KLs) and reports bits per dimension of the discrete images
(an upper bound; a model-free code needs log2 17 = 4.09 bits), and saves

* ``samples.png``: 64 ancestral samples (Algorithm 2) next to 64 held-out images;
* ``loss.png``: the training loss;
* ``checkpoint.safetensors``: the training state, with the config in its metadata;
* ``train_digits.json``: config and metrics.

Expected output (defaults: 3000 steps of batch 128, T = 1000, a UNet of widths 32/64; measured
on 2026-11-21 on 2 shared CPU cores, 10 minutes of training): recognisable digits of every
class; held-out bound 2.08 +- 0.02 bits/dim (a model-free code needs 4.09).

``--compute-dtype bfloat16`` runs the UNet in bf16 (the ELBO and the parameters stay float32;
see [MixedPrecision][probdiff.nets.MixedPrecision]); ``--devices all`` splits each batch over
every device (``fit(..., mesh=data_mesh())``, see the scaling page of the docs).

Run: ``python examples/train_digits.py``, or tiny:
``python examples/train_digits.py --steps 20 --T 20 --base 8 --out /tmp/digits``.
"""

from __future__ import annotations

import argparse
import math
import time

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import equinox as eqx  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import numpyro  # noqa: E402
import numpyro.distributions as dist  # noqa: E402
import optax  # noqa: E402
from numpyro.contrib.module import eqx_module  # noqa: E402
from numpyro.infer import SVI  # noqa: E402

from probdiff import GaussianDiffusion, data, schedules  # noqa: E402
from probdiff._io import prepare_out_dir, write_json  # noqa: E402
from probdiff.checkpoint import load_checkpoint  # noqa: E402
from probdiff.infer import DiffusionELBO  # noqa: E402
from probdiff.nets import MixedPrecision  # noqa: E402
from probdiff.parallel import data_mesh  # noqa: E402
from probdiff.plotting import tile_images  # noqa: E402
from probdiff.training import fit, init_state, save_state  # noqa: E402
from probdiff.unet import UNet  # noqa: E402

FILES = ("samples.png", "loss.png", "checkpoint.safetensors", "train_digits.json")
L = data.DIGITS_LEVELS
SHAPE = (8, 8, 1)
D = math.prod(SHAPE)


def make_model(net0, schedule, compute_dtype: str = "float32"):
    """The digits model and guide of the module docstring (the UNet in ``compute_dtype``)."""
    u_prior = dist.Uniform(0.0, 1.0).expand(SHAPE).to_event(3)

    def model(k):
        net = eqx_module("eps_net", net0)
        if compute_dtype != "float32":  # mixed precision: the parameters stay float32
            net = MixedPrecision(net, compute_dtype)
        with numpyro.plate("images", k.shape[0]):
            u = numpyro.sample("u", u_prior)
            y = 2.0 * (k + u) / L - 1.0
            numpyro.sample("x", GaussianDiffusion(net, schedule, SHAPE), obs=y)
            numpyro.factor("jacobian", jnp.full(k.shape[:1], D * math.log(2.0 / L)))

    def guide(k):
        with numpyro.plate("images", k.shape[0]):
            numpyro.sample("u", u_prior)

    return model, guide


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--T", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--base", type=int, default=32, help="UNet width at the first level")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weighting", choices=("simple", "vlb", "hybrid"), default="simple")
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--test", type=int, default=297, help="held-out images (the rest train)")
    p.add_argument("--checkpoint-every", type=int, default=1000)
    p.add_argument("--resume", default=None, help="continue from this checkpoint")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="out/train_digits")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--compute-dtype", choices=("float32", "bfloat16"), default="float32",
                   help="the UNet's arithmetic (bfloat16: mixed precision; the ELBO stays float32)")
    p.add_argument("--devices", default="1",
                   help="data-parallel: split each batch over this many devices, or 'all' (default 1)")
    args = p.parse_args(argv)
    meta = None
    if args.resume:  # the run continues with the checkpoint's settings (model, data stream)
        _, meta = load_checkpoint(args.resume)
        keep = {"steps", "out", "overwrite", "quiet", "resume", "checkpoint_every", "devices"}
        for name, value in meta["config"].items():
            if name not in keep:
                setattr(args, name, value)
    n_dev = len(jax.devices()) if args.devices == "all" else int(args.devices) if str(args.devices).isdigit() else 0
    if not 1 <= n_dev <= len(jax.devices()) or args.batch_size % n_dev:
        p.error(f"--devices must lie in 1..{len(jax.devices())} and divide --batch-size {args.batch_size}; "
                f"got {args.devices}")
    mesh = data_mesh(n_dev) if n_dev > 1 else None
    out = prepare_out_dir(args.out, FILES, overwrite=args.overwrite)

    images, _ = data.digits()
    perm = np.random.default_rng(args.seed).permutation(len(images))
    test, train = jnp.asarray(images[perm[: args.test]]), jnp.asarray(images[perm[args.test :]])
    key = jax.random.key(args.seed)
    k_net, k_fit, k_eval, k_samp = jax.random.split(key, 4)
    schedule = schedules.linear(args.T)
    groups = min(8, args.base)
    net0 = UNet(1, k_net, base=args.base, groups=groups)
    model, guide = make_model(net0, schedule, getattr(args, "compute_dtype", "float32"))
    svi = SVI(model, guide, optax.adam(args.lr), DiffusionELBO(args.weighting))

    state, losses = None, []
    if args.resume:
        like = init_state(svi, jax.random.key(0), train[: args.batch_size])
        state, _ = load_checkpoint(args.resume, like=like)
        losses = list(meta.get("losses", []))
        print(f"resumed at step {int(state.step)} from {args.resume}")
    done = start = 0 if state is None else int(state.step)
    bar = None
    if not args.quiet:
        from tqdm.auto import tqdm

        bar = tqdm(total=args.steps, initial=done, desc="training", unit="step")
    t0 = time.perf_counter()
    while done < args.steps:
        n = min(args.checkpoint_every, args.steps - done)
        result = fit(svi, train, n, batch_size=args.batch_size, rng_key=k_fit, state=state,
                     ema_decay=args.ema, steps_per_call=min(n, 250), progress_bar=bar or False,
                     mesh=mesh)
        state, done = result.state, done + n
        losses.extend((result.losses / args.batch_size).tolist())
        save_state(out / "checkpoint.safetensors", state, overwrite=True,
                   metadata={"config": vars(args), "losses": losses})
    train_seconds = time.perf_counter() - t0
    if bar is not None:
        bar.close()

    # Evaluate the EMA parameters: the full-T ELBO of dequantised held-out images.
    _, static = eqx.partition(net0, eqx.is_array)
    net = eqx.combine(state.ema["eps_net$params"], static)
    diffusion = GaussianDiffusion(net, schedule, SHAPE)
    k_u, k_e = jax.random.split(k_eval)
    y = data.dequantize(k_u, test, L)
    elbo = np.asarray(jax.jit(diffusion.elbo)(k_e, y), np.float64)
    bpd = np.asarray(data.discrete_bits_per_dim(elbo, D, L), np.float64)
    samples_y = np.asarray(jax.jit(lambda k: diffusion.sample(k, (64,)))(k_samp))
    samples = np.clip(np.floor((samples_y + 1.0) / 2.0 * L), 0, L - 1)

    metrics = {
        "bits_per_dim": float(bpd.mean()),
        "bits_per_dim_se": float(bpd.std(ddof=1) / math.sqrt(len(bpd))),
        "held_out_elbo_nats": float(elbo.mean()),
        "uniform_code_bits_per_dim": math.log2(L),
        "final_loss_mean_100": float(np.mean(losses[-100:])),
        "train_seconds": train_seconds,
        "steps_per_second": (args.steps - start) / max(train_seconds, 1e-9),
        "backend": jax.default_backend(),
    }
    print(f"held-out: {metrics['bits_per_dim']:.3f} +- {metrics['bits_per_dim_se']:.3f} bits/dim "
          f"(ELBO {metrics['held_out_elbo_nats']:.1f} nats per image; a model-free code needs "
          f"{math.log2(L):.2f}); {train_seconds:.0f} s of training")

    fig, axes = plt.subplots(1, 2, figsize=(8, 4.3))
    for ax, imgs, title in ((axes[0], samples, "samples"), (axes[1], np.asarray(test[:64]), "held-out data")):
        ax.imshow(tile_images(imgs, 8), cmap="gray_r", vmin=0, vmax=L - 1)
        ax.set_title(title)
        ax.axis("off")
    fig.suptitle(f"8x8 digits, T = {args.T}: {metrics['bits_per_dim']:.2f} bits/dim", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "samples.png", dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    w = max(1, len(losses) // 50)
    # For "vlb" the loss is -ELBO of the discrete image in nats; otherwise drop the constant
    # Jacobian term, which leaves the weighted loss of the diffusion site alone.
    shown = np.asarray(losses) + (0.0 if args.weighting == "vlb" else D * math.log(2.0 / L))
    ax.plot(np.convolve(shown, np.ones(w) / w, mode="valid"))
    ax.set_xlabel("step")
    ax.set_ylabel(f"{args.weighting} loss per image (running mean)")
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=120)
    plt.close(fig)
    write_json(out / "train_digits.json", {"config": vars(args), "metrics": metrics})
    print(f"wrote {', '.join(str(out / f) for f in FILES)}")
    return metrics


if __name__ == "__main__":
    main()
