r"""A VAE on 8x8 digits, trained with ``svi.run`` (MATH.md G2), in bits per dimension.

**Model** (``probdiff.vae.VAE``): p(z) = N(0, I_16), p_theta(y | z) = N(mu_theta(z),
diag sigma_theta(z)^2) on the dequantised image y in [-1, 1)^64, and the amortised encoder
q_phi(z | y) = N(mu_phi(y), diag sigma_phi(y)^2), each a ``GaussianNet`` (two hidden layers of
256). The ELBO

$$ \mathrm{ELBO}(y) = \mathbb E_{q_\phi(z|y)}\log p_\theta(y\mid z) - \mathrm{KL}(q_\phi(z\mid y)\,\|\,\mathcal N(0, I)) $$

is maximised by ``SVI(vae.model, vae.guide, optax.adam(...), Trace_ELBO()).run(key, steps, y,
subsample_size=128)``: the reparameterised z = mu + sigma eps carries the gradient.

**Data**: scikit-learn's digits, levels 0..16 (L = 17), the 297-image held-out split of
``examples/train_digits.py``. Training images are dequantised (``probdiff.data.dequantize``)
into ``--copies`` copies with independent noise (the noise is then fixed during training); the
held-out images once, with fresh noise. Bits per dimension of the images follow
``probdiff.data.discrete_bits_per_dim`` (``docs/tutorials/likelihood.md`` explains the
log2(L / 2) offset).

**Measured** on the held-out images: the ELBO (16 draws of z per image) and the
importance-weighted log-likelihood (``VAE.log_likelihood``, 1000 draws), a tighter bound, both
in bits/dim of the images. For comparison (not recomputed here) ``examples/likelihood_digits.py``
reports 2.957 bits/dim for the negative ELBO of a diffusion model with an MLP eps-network; a code
with no model needs log2 17 = 4.087.

**Expected output** (defaults, 2026-11-21, 2 CPU cores shared with other jobs: 10000 steps in
33 s, 174 s in all): -ELBO 2.589 +- 0.052 bits/dim, importance-weighted 2.355 +- 0.038 (tighter
by 0.234). See docs/tutorials/vae.md.

Files in ``--out``: ``training.png`` (loss per step), ``samples.png`` (decoder means of z ~ N(0, I),
and reconstructions of held-out images) and ``metrics.json``.

Run: ``python examples/vae_digits.py --out out/vae_digits``, or tiny:
``python examples/vae_digits.py --tiny --out /tmp/vae``.
"""

from __future__ import annotations

import argparse
import math
import time

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from numpyro.infer import SVI, Trace_ELBO  # noqa: E402

from probdiff import data  # noqa: E402
from probdiff._io import parse_example_args, parse_widths, prepare_out_dir, write_json  # noqa: E402
from probdiff.plotting import save_png, tile_images  # noqa: E402
from probdiff.vae import VAE, GaussianNet  # noqa: E402

FILES = ("training.png", "samples.png", "metrics.json")
L, D = 17, 64
FULL = {"steps": 10000, "hidden": "256,256", "latent": 16, "batch_size": 128, "copies": 8, "elbo_draws": 16,
        "iw_draws": 1000, "n": 64}
TINY = {"steps": 30, "hidden": "16", "latent": 2, "batch_size": 32, "copies": 1, "elbo_draws": 2, "iw_draws": 4,
        "n": 8}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny sizes, for the tests (a few seconds)")
    p.add_argument("--steps", type=int, help=f"SVI steps (default {FULL['steps']})")
    p.add_argument("--hidden", help=f"hidden widths of encoder and decoder (default {FULL['hidden']})")
    p.add_argument("--latent", type=int, help=f"dimension of z (default {FULL['latent']})")
    p.add_argument("--batch-size", type=int, help=f"minibatch size (default {FULL['batch_size']})")
    p.add_argument("--copies", type=int, help=f"dequantised copies of each training image (default {FULL['copies']})")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate, cosine decay (default 1e-3)")
    p.add_argument("--min-std", type=float, default=0.01, help="smallest decoder standard deviation (default 0.01)")
    p.add_argument("--test", type=int, default=297, help="held-out images (default 297)")
    p.add_argument("--elbo-draws", type=int, help=f"z per image for the ELBO (default {FULL['elbo_draws']})")
    p.add_argument("--iw-draws", type=int, help=f"z per image for the IW log-likelihood (default {FULL['iw_draws']})")
    p.add_argument("--n", type=int, help=f"samples in the figure (default {FULL['n']})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="out/vae_digits")
    p.add_argument("--overwrite", action="store_true")
    args = parse_example_args(p, argv, FULL, TINY)
    hidden = parse_widths(p, args.hidden)
    if min(hidden) < 1 or min(args.steps, args.latent, args.batch_size, args.copies, args.elbo_draws,
                              args.iw_draws, args.n) < 1:
        p.error("need positive sizes")
    if not 2 <= args.test < 1797:
        p.error("need 2 <= --test < 1797")
    if not (args.lr > 0 and 0 < args.min_std < 1):
        p.error("need --lr > 0 and 0 < --min-std < 1")
    out = prepare_out_dir(args.out, FILES, overwrite=args.overwrite)

    t_start = time.time()
    images, _ = data.digits()
    flat = images.reshape(len(images), D)
    perm = np.random.default_rng(args.seed).permutation(len(images))
    test, train = jnp.asarray(flat[perm[: args.test]]), jnp.asarray(flat[perm[args.test:]])
    k_enc, k_dec, k_deq, k_test, k_svi, k_eval, k_samp = jax.random.split(jax.random.key(args.seed), 7)
    y_train = data.dequantize(k_deq, jnp.tile(train, (args.copies, 1)), L)
    y_test = data.dequantize(k_test, test, L)

    encoder = GaussianNet(D, args.latent, k_enc, hidden=hidden)
    decoder = GaussianNet(args.latent, D, k_dec, hidden=hidden, min_std=args.min_std)
    vae = VAE(encoder, decoder, args.latent, (D,))
    optimizer = optax.adam(optax.cosine_decay_schedule(args.lr, args.steps, alpha=0.05))
    svi = SVI(vae.model, vae.guide, optimizer, Trace_ELBO())
    t0 = time.time()
    res = svi.run(k_svi, args.steps, y_train, subsample_size=min(args.batch_size, y_train.shape[0]),
                  progress_bar=False)
    train_seconds = time.time() - t0
    losses = np.asarray(res.losses) / min(args.batch_size, y_train.shape[0])
    if not np.all(np.isfinite(losses)):
        raise SystemExit(f"training diverged: non-finite loss at step {int(np.argmin(np.isfinite(losses)))}")
    trained = vae.with_params(res.params)

    t0 = time.time()
    k1, k2 = jax.random.split(k_eval)
    elbo = np.asarray(jax.jit(lambda k, y: trained.elbo(k, y, args.elbo_draws))(k1, y_test), np.float64)
    iw = np.asarray(jax.jit(lambda k, y: trained.log_likelihood(k, y, args.iw_draws))(k2, y_test), np.float64)
    eval_seconds = time.time() - t0
    bpd_elbo = np.asarray(data.discrete_bits_per_dim(elbo, D, L), np.float64)
    bpd_iw = np.asarray(data.discrete_bits_per_dim(iw, D, L), np.float64)

    def summary(v):
        return {"mean": float(v.mean()), "se": float(v.std(ddof=1) / math.sqrt(v.size))}

    results = {
        "elbo_nats": summary(elbo), "iw_log_likelihood_nats": summary(iw),
        "elbo_bits_per_dim": summary(bpd_elbo), "iw_bits_per_dim": summary(bpd_iw),
        "iw_minus_elbo_bits_per_dim": summary(bpd_elbo - bpd_iw),
        "uniform_bits_per_dim": math.log2(L), "train_seconds": train_seconds, "eval_seconds": eval_seconds,
        "final_loss_per_image": float(losses[-200:].mean()),
    }
    print(f"digits, {args.test} held-out images, latent {args.latent}, {args.steps} steps of svi.run "
          f"({train_seconds:.0f} s)")
    print(f"  -ELBO ({args.elbo_draws} z per image):              {results['elbo_bits_per_dim']['mean']:.3f} "
          f"+- {results['elbo_bits_per_dim']['se']:.3f} bits/dim")
    print(f"  -IW log-likelihood ({args.iw_draws} z per image):    {results['iw_bits_per_dim']['mean']:.3f} "
          f"+- {results['iw_bits_per_dim']['se']:.3f} bits/dim "
          f"(tighter by {results['iw_minus_elbo_bits_per_dim']['mean']:.3f})")
    print(f"  uniform on [-1, 1]^64 (no model):          {math.log2(L):.3f} bits/dim")
    print(f"total {time.time() - t_start:.0f} s")

    to_levels = lambda s: np.clip(np.floor((np.asarray(s) + 1.0) / 2.0 * L), 0, L - 1)  # noqa: E731
    z = jax.random.normal(k_samp, (args.n, args.latent))
    means = trained.decode(z).mean
    recon = trained.decode(trained.encode(y_test[: args.n]).mean).mean
    plot_training(out / "training.png", losses)
    plot_samples(out / "samples.png", to_levels(means), to_levels(recon), np.asarray(test[: args.n]))
    write_json(out / "metrics.json", {"config": vars(args), "results": results})
    return results


def plot_training(path, losses):
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    k = max(1, len(losses) // 200)
    smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
    ax.plot(np.arange(len(smooth)) + k, smooth)
    ax.set_xlabel("step")
    ax.set_ylabel("-ELBO per image (nats, Trace_ELBO)")
    ax.set_title("VAE on digits: svi.run")
    fig.tight_layout()
    save_png(fig, path)


def plot_samples(path, samples, recon, test):
    rows = max(1, int(math.sqrt(len(samples))))
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.6))
    for ax, im, title in ((axes[0], samples, "decoder means of z ~ N(0, I)"),
                          (axes[1], recon, "reconstructions (encoder mean)"), (axes[2], test, "held-out images")):
        ax.imshow(tile_images(im, rows), cmap="gray_r", vmin=0, vmax=L - 1)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    save_png(fig, path)


if __name__ == "__main__":
    main()
