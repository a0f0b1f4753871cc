r"""Bits per dimension of 8x8 digits: the negative ELBO and the probability-flow ODE of one model (MATH.md B2, E5).

Data: scikit-learn's 8x8 digits (``probdiff.data.digits``), integer pixels k in 0..16 (L = 17
levels), D = 64 pixels; 297 images held out (the split of ``examples/train_digits.py``).

**Dequantisation.** A density needs continuous data; uniform dequantisation
(``probdiff.data.dequantize``) maps each level k to y = 2 (k + u) / L - 1 with u ~ U[0, 1), so
level k owns the cell [2k/L - 1, 2(k+1)/L - 1) of width 2 / L and y lives in [-1, 1)^D. For any
density p of y, Jensen's inequality gives a bound on the probability of the discrete image
(Theis et al. 2016):

$$ \log P(k) \ge \mathbb{E}_u\big[\log p(y)\big] + D\log\frac{2}{L},\qquad
   \text{bits/dim} = -\frac{\log p(y) + D\log(2/L)}{D\log 2}
   = \underbrace{-\frac{\log p(y)}{D\log 2}}_{\text{bits/dim of } y} + \log_2\frac{L}{2} $$

(``probdiff.data.discrete_bits_per_dim``). The offset log2(L/2) = log2(8.5) = 3.09 bits per
dimension is the log-volume of a cell: a density *uniform* on [-1, 1]^D has log p(y) = -D log 2,
so 1 bit/dim on y, and log2 L = 4.09 bits/dim on the images, the cost of writing every pixel
down without a model. Numbers quoted "in bits/dim" for data scaled to [-1, 1] without the
Jacobian differ from the bits of the discrete images by exactly log2(L/2) per dimension
(log2(128) = 7 for 8-bit images), and can even be negative; the table prints both.

**Model.** A [GaussianDiffusion][probdiff.GaussianDiffusion] (T = 1000, DDPM's linear schedule)
whose eps-network is a ``probdiff.nets.MLP`` on the flattened 64-vector (three hidden layers of
512), trained for 4000 steps of L_simple with the dequantisation noise u as a latent site, as in
``examples/train_digits.py``. Why not that script's UNet: time. It trains at about 5 steps per
second on 2 CPU cores (3000 steps in 10 minutes), and every one of the several hundred ODE
evaluations per likelihood would be a UNet forward and backward pass over the batch; the MLP
trains 4000 steps in about two minutes, and its held-out bound is about 0.9 bits/dim worse than
the UNet's 2.08. The ODE also calls the network at float times t T, which the MLP takes. As in
``examples/likelihood_2d.py`` the network's time input is
100 t in [0, 100] (``eps(y_i, i) = net(y_i, 100 i / T)``): with 1000 t the sinusoidal embedding
makes the ODE's vector field oscillate along t and the adaptive solver takes about four times
as many steps for the same likelihood.

**Measured** per held-out image, on one dequantised y per image (the same y for every row):

* the negative ELBO (B2, all 1000 terms, analytic KLs, ``diffusion.elbo``): an upper bound on
  -log p_theta(y) of the discrete chain, so with the offset an upper bound on the bits of the
  image under that chain;
* the ODE NLL through ``ProbabilityFlow.from_diffusion`` (Tsit5, rtol = atol = 1e-5): with
  D = 64 the exact trace costs 64 products with the Jacobian per evaluation, so the trace is
  Hutchinson's, tr A ~ eps^T A eps with one Rademacher probe per image held fixed along the path,
  an unbiased estimate of log p_theta(y). Run ``--probe-sets`` times (default 3) with independent
  probes; the Monte-Carlo SE over probes of the mean is sqrt(mean_i var_i / (R N)), with var_i
  the variance of image i's estimates over the R runs, and is printed next to the SE over
  images;
* the NFE (function evaluations of the solver; each is one network call and one product with its Jacobian).

Like ``examples/likelihood_2d.py`` explains, the ODE NLL need not be below the negative ELBO:
the ODE is a different model from the discrete chain, built from the same imperfect network,
and L_simple trains it for samples, not likelihood.

**Expected output** (defaults, measured on 2026-11-21 on 2 CPU cores shared with other jobs,
178 s of which 100 s training): on all 297 held-out images, -ELBO 2.957 +- 0.018 bits/dim of the
images (-0.131 of y), ODE 3.032 +- 0.017 (-0.055 of y; Monte-Carlo SE over probes 0.0065, one
probe's SD per image 0.19) at 293 NFE; the ODE is 0.076 +- 0.013 bits/dim above the -ELBO, image
by image; a model-free code needs 4.087. See ``docs/tutorials/likelihood.md``.

Files in ``--out``: ``bits_per_dim.png`` (per-image ODE against -ELBO bits/dim, and their
histograms), ``samples.png`` (ancestral and probability-flow ODE samples next to held-out
images), ``loss.png`` and ``metrics.json``.

Run: ``python examples/likelihood_digits.py --out out/likelihood_digits``, or tiny:
``python examples/likelihood_digits.py --tiny --out /tmp/likdigits``.
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
from probdiff._io import parse_example_args, parse_widths, prepare_out_dir, write_json  # noqa: E402
from probdiff.infer import DiffusionELBO  # noqa: E402
from probdiff.nets import MLP  # noqa: E402
from probdiff.ode import ProbabilityFlow  # noqa: E402
from probdiff.plotting import save_png, tile_images  # noqa: E402
from probdiff.training import fit  # noqa: E402

FILES = ("bits_per_dim.png", "samples.png", "loss.png", "metrics.json")
L = data.DIGITS_LEVELS
D = 64

# sizes of a full run and of --tiny (used by the tests); a flag given explicitly wins
FULL = {"steps": 4000, "batch_size": 128, "hidden": "512,512,512", "eval_images": 297, "probe_sets": 3,
        "rtol": 1e-5, "sample_rtol": 1e-4, "n": 64}
TINY = {"steps": 20, "batch_size": 32, "hidden": "32", "eval_images": 8, "probe_sets": 2,
        "rtol": 1e-3, "sample_rtol": 1e-3, "n": 8}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny sizes, for the tests (about 20 s)")
    p.add_argument("--steps", type=int, help=f"training steps (default {FULL['steps']})")
    p.add_argument("--batch-size", type=int, help=f"minibatch size (default {FULL['batch_size']})")
    p.add_argument("--hidden", help=f"hidden widths of the MLP (default {FULL['hidden']})")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate, cosine decay (default 2e-3)")
    p.add_argument("--ema-decay", type=float, default=0.999, help="EMA decay of the parameters (default 0.999)")
    p.add_argument("--T", type=int, default=1000, help="diffusion steps (default 1000)")
    p.add_argument("--time-scale", type=float, default=100.0,
                   help="the network's time input is time_scale * t, t in [0, 1] (default 100)")
    p.add_argument("--test", type=int, default=297, help="held-out images (default 297)")
    p.add_argument("--eval-images", type=int, help=f"held-out images evaluated (default {FULL['eval_images']})")
    p.add_argument("--probe-sets", type=int, help=f"independent Hutchinson runs, >= 2 (default {FULL['probe_sets']})")
    p.add_argument("--rtol", type=float, help=f"rtol = atol of the likelihood solve (default {FULL['rtol']:g})")
    p.add_argument("--sample-rtol", type=float, help=f"rtol = atol of ODE sampling (default {FULL['sample_rtol']:g})")
    p.add_argument("--n", type=int, help=f"samples per sampler (default {FULL['n']})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="out/likelihood_digits")
    p.add_argument("--overwrite", action="store_true")
    args = parse_example_args(p, argv, FULL, TINY)
    hidden = parse_widths(p, args.hidden)
    if min(hidden) < 1 or args.steps < 1 or args.batch_size < 1 or args.n < 1 or args.T < 2:
        p.error("need positive sizes and --T >= 2")
    if not 2 <= args.eval_images <= args.test < 1797:
        p.error("need 2 <= --eval-images <= --test < 1797")
    if args.probe_sets < 2:
        p.error("--probe-sets must be >= 2 (the SE over probes needs two runs)")
    if not (args.rtol > 0 and args.sample_rtol > 0 and args.time_scale > 0):
        p.error("tolerances and --time-scale must be > 0")
    if not 0 <= args.ema_decay < 1:
        p.error("need 0 <= --ema-decay < 1")
    out = prepare_out_dir(args.out, FILES, overwrite=args.overwrite)

    t_start = time.time()
    images, _ = data.digits()
    flat = images.reshape(len(images), D)
    perm = np.random.default_rng(args.seed).permutation(len(images))
    test, train = jnp.asarray(flat[perm[: args.test]]), jnp.asarray(flat[perm[args.test:]])
    k_net, k_fit, k_deq, k_elbo, k_probe, k_samp = jax.random.split(jax.random.key(args.seed), 6)
    schedule = schedules.linear(args.T)
    net0 = MLP(D, k_net, hidden=hidden, time_dim=64)
    static = eqx.partition(net0, eqx.is_array)[1]

    def eps_fn(net):
        return lambda y_t, i: net(y_t, jnp.asarray(i, y_t.dtype) * (args.time_scale / args.T))

    def diffusion(params):
        return GaussianDiffusion(eps_fn(eqx.combine(params, static)), schedule, (D,))

    # ------------------------------------------------------------------ training
    u_prior = dist.Uniform(0.0, 1.0).expand((D,)).to_event(1)

    def model(k):
        net = eqx_module("eps_net", net0)
        with numpyro.plate("images", k.shape[0]):
            u = numpyro.sample("u", u_prior)  # the dequantisation noise, a latent site
            numpyro.sample("x", GaussianDiffusion(eps_fn(net), schedule, (D,)), obs=2.0 * (k + u) / L - 1.0)

    def guide(k):
        with numpyro.plate("images", k.shape[0]):
            numpyro.sample("u", u_prior)

    svi = SVI(model, guide, optax.adam(optax.cosine_decay_schedule(args.lr, args.steps)), DiffusionELBO("simple"))
    t0 = time.time()
    res = fit(svi, train, args.steps, batch_size=args.batch_size, rng_key=k_fit, ema_decay=args.ema_decay,
              steps_per_call=min(250, args.steps), progress_bar=False)
    train_seconds = time.time() - t0
    params = res.state.ema["eps_net$params"]
    losses = res.losses / args.batch_size

    # ------------------------------------------------------------------ bits per dimension
    y = data.dequantize(k_deq, test[: args.eval_images], L)  # one dequantised y per image, for every row
    t0 = time.time()
    elbo = np.asarray(jax.jit(lambda prm, k, y: diffusion(prm).elbo(k, y))(params, k_elbo, y), np.float64)
    elbo_seconds = time.time() - t0

    @jax.jit
    def ode_ll(prm, y, key):
        flow = ProbabilityFlow.from_diffusion(diffusion(prm), trace="hutchinson", probe="rademacher",
                                              num_probes=1, rtol=args.rtol, atol=args.rtol)
        return flow.log_likelihood(y, rng_key=key)

    t0 = time.time()
    runs = [ode_ll(params, y, k) for k in jax.random.split(k_probe, args.probe_sets)]
    ode_seconds = time.time() - t0
    lp_runs = np.stack([np.asarray(r.log_prob, np.float64) for r in runs])  # (R, N)
    nfe = np.concatenate([np.asarray(r.nfe) for r in runs])
    lp = lp_runs.mean(0)

    def bpd_discrete(log_p):
        return np.asarray(data.discrete_bits_per_dim(jnp.asarray(log_p), D, L), np.float64)

    n_img, R = args.eval_images, args.probe_sets
    offset = math.log2(L / 2)
    bpd_elbo, bpd_ode = bpd_discrete(elbo), bpd_discrete(lp)
    probe_var = lp_runs.var(0, ddof=1) / (D * math.log(2.0)) ** 2  # per image, in bits/dim squared
    rows = {
        "uniform on [-1, 1]^D (no model)": {"discrete": math.log2(L), "se": 0.0},
        "-ELBO (B2, T terms)": {"discrete": float(bpd_elbo.mean()),
                                "se": float(bpd_elbo.std(ddof=1) / math.sqrt(n_img)), "nfe": float(args.T)},
        "ODE NLL (Hutchinson)": {"discrete": float(bpd_ode.mean()),
                                 "se": float(bpd_ode.std(ddof=1) / math.sqrt(n_img)),
                                 "probe_se": float(math.sqrt(probe_var.mean() / (R * n_img))),
                                 "probe_sd_per_image": float(math.sqrt(probe_var.mean())),
                                 "nfe": float(nfe.mean()), "nfe_max": int(nfe.max())},
    }
    for r in rows.values():
        r["continuous"] = r["discrete"] - offset  # bits/dim of the dequantised y in [-1, 1)^D
    d = bpd_ode - bpd_elbo
    results = {
        "eval_images": n_img, "probe_sets": R, "levels": L, "dims": D, "offset_bits_per_dim": offset,
        "rows": rows,
        "ode_minus_elbo_bits_per_dim": float(d.mean()),
        "ode_minus_elbo_se": float(d.std(ddof=1) / math.sqrt(n_img)),
        "ode_worse_than_elbo": bool(d.mean() > 0),
        "final_loss": float(np.mean(losses[-max(1, len(losses) // 10):])),
        "seconds": {"train": train_seconds, "elbo": elbo_seconds, "ode": ode_seconds},
    }

    # ------------------------------------------------------------------ samples
    t0 = time.time()
    k_anc, k_ode = jax.random.split(k_samp)
    anc = jax.jit(lambda prm, k: diffusion(prm).sample(k, (args.n,)))(params, k_anc)
    ode = jax.jit(lambda prm, k: ProbabilityFlow.from_diffusion(
        diffusion(prm), rtol=args.sample_rtol, atol=args.sample_rtol).sample(k, (args.n,)))(params, k_ode)
    to_levels = lambda s: np.clip(np.floor((np.asarray(s) + 1.0) / 2.0 * L), 0, L - 1)  # noqa: E731
    results["seconds"]["sample"] = time.time() - t0
    results["seconds"]["total"] = time.time() - t_start

    plot_bits(out / "bits_per_dim.png", bpd_elbo, bpd_ode, rows)
    plot_samples(out / "samples.png", to_levels(anc), to_levels(ode), np.asarray(test[: args.n]))
    plot_loss(out / "loss.png", losses)
    write_json(out / "metrics.json", {"config": vars(args), "results": results})

    print(f"\n{n_img} held-out images, one dequantised y each; bits/dim of the discrete images (= bits/dim of y "
          f"+ log2(L/2) = {offset:.3f})")
    print(f"{'':34s} {'images':>8s} {'y':>8s} {'SE':>6s} {'probe SE':>9s} {'NFE':>6s}")
    for label, r in rows.items():
        probe = f"{r['probe_se']:9.4f}" if "probe_se" in r else " " * 9
        nfe_s = f"{r['nfe']:6.0f}" if "nfe" in r else ""
        print(f"{label:34s} {r['discrete']:8.3f} {r['continuous']:8.3f} {r['se']:6.3f} {probe} {nfe_s}")
    o = rows["ODE NLL (Hutchinson)"]
    print(f"ODE - (-ELBO), paired: {results['ode_minus_elbo_bits_per_dim']:+.3f} +- {results['ode_minus_elbo_se']:.3f} "
          f"bits/dim; Hutchinson's SD per image {o['probe_sd_per_image']:.4f} bits/dim with one probe")
    if results["ode_worse_than_elbo"]:
        print("The ODE's NLL is above the chain's -ELBO: the ODE is a different model from the discrete chain that\n"
              "the ELBO bounds, and its error from an imperfect (L_simple-trained) network is not corrected by noise.")
    print("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in results["seconds"].items()))
    return results


def plot_bits(path, bpd_elbo, bpd_ode, rows):
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    ax = axes[0]
    ax.scatter(bpd_elbo, bpd_ode, s=8, alpha=0.6)
    lo, hi = min(bpd_elbo.min(), bpd_ode.min()), max(bpd_elbo.max(), bpd_ode.max())
    ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="ODE = -ELBO")
    ax.set_xlabel("-ELBO, bits/dim of the image")
    ax.set_ylabel("ODE NLL (Hutchinson), bits/dim")
    ax.legend(fontsize=8)
    ax.set_title("per held-out image", fontsize=9)
    ax = axes[1]
    bins = np.linspace(lo, max(hi, math.log2(L)) + 0.05, 30)
    ax.hist(bpd_elbo, bins, alpha=0.6, label=f"-ELBO, mean {rows['-ELBO (B2, T terms)']['discrete']:.3f}")
    ax.hist(bpd_ode, bins, alpha=0.6, label=f"ODE, mean {rows['ODE NLL (Hutchinson)']['discrete']:.3f}")
    ax.axvline(math.log2(L), color="k", ls=":", label=f"no model, log2 {L} = {math.log2(L):.2f}")
    ax.set_xlabel("bits/dim of the discrete image")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_png(fig, path)


def plot_samples(path, anc, ode, held_out):
    rows = max(1, int(math.sqrt(len(anc))))
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.7))
    for ax, imgs, title in ((axes[0], anc, "ancestral (T steps)"), (axes[1], ode, "probability-flow ODE"),
                            (axes[2], held_out, "held-out images")):
        ax.imshow(tile_images(imgs, rows), cmap="gray_r", vmin=0, vmax=L - 1)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    save_png(fig, path)


def plot_loss(path, losses):
    fig, ax = plt.subplots(figsize=(5, 3.2))
    w = max(1, len(losses) // 50)
    ax.plot(losses, color="0.8", lw=0.5)
    ax.plot(np.arange(w - 1, len(losses)), np.convolve(losses, np.ones(w) / w, mode="valid"))
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("L_simple per image")
    fig.tight_layout()
    save_png(fig, path)


if __name__ == "__main__":
    main()
