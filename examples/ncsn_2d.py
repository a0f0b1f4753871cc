r"""Train a noise-conditional score network (NCSN) on a 2-D mixture and sample it (MATH.md D3, D4).

Data: a Gaussian mixture p = sum_k w_k N(mu_k, s^2 I). By default six modes on a ring of
radius 2.5, s = 0.45, with unequal weights w_k = k / 21 (k = 1..6, from 0.048 to 0.286);
``--mixture three_modes`` takes the widely separated mixture of ``annealed_langevin.py``
(modes 6.4 to 8 apart, w = 0.2 / 0.3 / 0.5, s = 0.5). Convolved with N(0, sigma^2 I) it stays a
mixture, so the score s*(x, sigma) = grad_x log p_sigma(x) that the network should learn is
known exactly at every noise level (``GaussianMixture.score``).

**Model.** A network s_theta(x, sigma) ~ s*(x, sigma) on a noise ladder sigma_1 < ... < sigma_L
(geometric, 0.05 to 10, L = 10), written as s_theta(x, sigma) = f_theta(x, 20 log sigma) / sigma
with f_theta a ``probdiff.nets.MLP`` (its sinusoidal "time" input gets 20 log sigma, so
neighbouring levels sit about 12 apart); dividing by sigma gives the output the scale of the
true score, |s*| ~ 1/sigma where the noised data live. It is a ``ScoreModel`` site:

    def model(x):
        net = eqx_module("score_net", net0)
        s = lambda y, sigma: net(y, 20 * jnp.log(sigma)) / sigma[..., None]
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("x", ScoreModel(s, (2,)), obs=x)

    svi = SVI(model, lambda x: None, optax.adam(cosine_decay(2e-3)), NCSNScoreMatching(sigmas))

**Objective** (Song & Ermon 2019; ``NCSNScoreMatching``, MATH.md D4), denoising score matching
(D3) at every level, weighted by sigma_i^2 so that every level counts alike:

$$ \mathcal L(\theta) = \frac1L\sum_{i=1}^{L}\sigma_i^2\;\mathbb{E}_{x\sim p,\ \epsilon\sim\mathcal N(0,I)}
   \tfrac12\Big\lVert s_\theta(x+\sigma_i\epsilon,\sigma_i) + \frac{\epsilon}{\sigma_i}\Big\rVert^2
   = \frac1L\sum_{i=1}^{L}\tfrac12\,\sigma_i^2\,\mathbb{E}_{p_{\sigma_i}}\big\lVert s_\theta(\cdot,\sigma_i)
     - s^\star(\cdot,\sigma_i)\big\rVert^2 + \mathcal L(s^\star), $$

estimated with one level i ~ U{1..L} per example (``probdiff.training.fit``, minibatches of
512, EMA of the parameters with decay 0.999 for sampling). The second form (Vincent 2011) says
that the loss exceeds its floor L(s*) by half the mean *Fisher error* F_i = sigma_i^2
E_{p_sigma_i} ||s_theta - s*||^2. Here L(s*) is computed by Monte Carlo with the exact score, and
the script checks the identity: ``eval_loss - loss_exact_score`` against ``mean(fisher_error)/2``.

**Sampler**: annealed Langevin dynamics (NCSN's Algorithm 1, ``samplers.annealed_langevin``,
D4): from x ~ N(0, sigma_L^2 I), for i = L, ..., 1, T steps of

$$ x \leftarrow x + \frac{\alpha_i}{2}\,s_\theta(x,\sigma_i) + \sqrt{\alpha_i}\,z,\qquad
   \alpha_i = \epsilon\,\frac{\sigma_i^2}{\sigma_1^2},\quad z\sim\mathcal N(0,I), $$

then one Tweedie step x + sigma_1^2 s_theta(x, sigma_1). The same sampler also runs on the
exact score s*, with the same keys, which separates the error of the network from the error of
the sampler.

**Metrics** (``metrics.json``): the per-example loss (means of the first and last 10% of the
steps, and on held-out points at every level next to the floor L(s*)), the Fisher error F_i per
level on freshly noised exact samples next to sigma_i^2 E||s*||^2 (the error of s = 0, about
D = 2 at large sigma), the squared MMD (``probdiff.data.mmd_rbf``, Gaussian
kernel of bandwidth 0.5 for the ring and 1.0 for three_modes, about the components' spread) of
the learned-score and exact-score samples to exact draws of p, next to the noise floor (MMD^2 of
pairs of independent exact sample sets), and the mode weights (the share of samples nearest
each mu_k) with binomial standard errors.

**Expected output** (defaults, about 30 s on 2 shared CPU cores, of which training is 15 s;
measured on 2026-11-21). Ring: the Fisher error is at most 0.0056 at every level (s = 0 scores
0.02 at sigma_1 and 0.5 to 1.9 from sigma = 0.3 up); the held-out loss sits 0.0011 above the
exact score's floor of 0.5656, matching half the mean Fisher error (0.0010); the learned-score
samples have MMD^2 0.0002 against a noise floor of five null pairs within +-0.0004 (the
exact-score sampler: -0.0002), and mode weights 0.040 / 0.100 / 0.151 / 0.191 / 0.247 / 0.272, all
within 2 SE of w. ``--mixture three_modes`` does as well: Fisher error at most 0.0062, MMD^2
-0.0001, weights 0.216 / 0.296 / 0.487 (SE 0.009 to 0.011), even though the network is far off in
the gaps between the modes, which the noised data do not visit at small sigma (sigma
||s_theta - s*|| of order 1 there against 0.01 to 0.03 on the modes: ``score_field.png``). The
mode weights are settled at the larger sigma, where the noised modes overlap and the network is
accurate. With 100 steps per level the sampler itself leaves the heaviest of the three modes
short by about 1.5% (exact score, 18000 samples: 0.213 / 0.302 / 0.485; this seed's 2000:
0.230 / 0.305 / 0.465, MMD^2 0.0016), as in ``annealed_langevin.py``; ``--steps-per-level 300``
removes it (exact score 0.206 / 0.292 / 0.501, learned 0.195 / 0.287 / 0.518, both MMD^2 inside
the noise floor).

**The step epsilon is tied to sigma_1.** A Langevin step's signal-to-noise ratio and its share of
the relaxation time depend on alpha_i / sigma_i^2 = epsilon / sigma_1^2, not on epsilon alone.
``annealed_langevin.py`` uses epsilon = 5e-5 with sigma_1 = 0.01 (epsilon / sigma_1^2 = 0.5);
here sigma_1 = 0.05 and epsilon = 1e-3 (0.4). Keeping epsilon = 5e-5 with sigma_1 = 0.05 (0.02,
``--step-size 5e-5``) gives the chains 20 times too little Langevin time at the levels where the
modes separate, and the mode weights stay near those of the broad start: three_modes
0.273 / 0.338 / 0.390 (MMD^2 0.032), ring MMD^2 0.012. The exact score fails in the same way
(0.277 / 0.334 / 0.390, MMD^2 0.028; ring 0.011), so it is the sampler, not the network: a
network that is accurate where the noised data live (Fisher error below 0.007 at every level)
samples the mixture, weights included, once the sampler is given enough Langevin time. The
``exact_score_sampler`` entry of ``metrics.json`` makes this check on every run.

Files in ``--out``: ``score_field.png`` (true and learned score per noise level, over the
density of p_sigma, with the error sigma ||s_theta - s*|| in colour), ``samples.png`` (learned-
and exact-score samples against exact draws, and the mode weights), ``loss.png`` (the loss and its
floor L(s*)) and ``metrics.json``.

Run: ``python examples/ncsn_2d.py --out out/ncsn_2d`` (``--mixture three_modes``), or tiny:
``python examples/ncsn_2d.py --tiny --out /tmp/ncsn``.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import numpyro  # noqa: E402
import optax  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402
from numpyro.contrib.module import eqx_module  # noqa: E402
from numpyro.handlers import substitute  # noqa: E402
from numpyro.infer import SVI  # noqa: E402

from probdiff import analytic, samplers  # noqa: E402
from probdiff._io import prepare_out_dir, write_json  # noqa: E402
from probdiff.data import mmd_rbf  # noqa: E402
from probdiff.infer import NCSNScoreMatching  # noqa: E402
from probdiff.nets import MLP  # noqa: E402
from probdiff.plotting import save_png  # noqa: E402
from probdiff.score import ScoreModel  # noqa: E402
from probdiff.training import fit  # noqa: E402

FILES = ("score_field.png", "samples.png", "loss.png", "metrics.json")
MIXTURES = ("ring", "three_modes")

# sizes of a full run and of --tiny (used by the tests); a flag given explicitly wins. Tiny keeps
# the ladder, trains a small network briefly (with a short EMA) and takes fewer, larger steps;
# step counts are multiples of fit's 100 steps per compiled call (one compilation).
FULL = {"steps": 4000, "batch_size": 512, "hidden": "128,128,128", "ema_decay": 0.999,
        "n": 2000, "steps_per_level": 100, "step_size": 1e-3, "null_pairs": 5, "eval_points": 4000}
TINY = {"steps": 200, "batch_size": 128, "hidden": "32,32", "ema_decay": 0.9,
        "n": 300, "steps_per_level": 20, "step_size": 2e-3, "null_pairs": 2, "eval_points": 2000}

TIME_SCALE = 20.0  # the network's "time" input is 20 log sigma
SHOWN_LEVELS = 4  # noise levels in score_field.png
ERR_LEVELS = 10.0 ** np.arange(-3.0, 1.01, 0.5)  # colour bands of sigma ||s_theta - s*||


def get_mixture(name):
    """(mixture, MMD bandwidth, plotting box (xmin, xmax, ymin, ymax))."""
    if name == "ring":
        return analytic.GaussianMixture.ring(), 0.5, (-4.5, 4.5, -4.5, 4.5)
    return analytic.GaussianMixture.three_modes(), 1.0, (-7.0, 7.0, -4.0, 8.0)


def make_model(net0):
    """The NumPyro model: every row of x is an observation of the score network's ScoreModel."""

    def model(x):
        net = eqx_module("score_net", net0)

        def s(y, sigma):
            return net(y, TIME_SCALE * jnp.log(sigma)) / sigma[..., None]

        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("x", ScoreModel(s, (2,)), obs=x)

    return model


def trained_score(net0, params):
    """s_theta(x, sigma) with the given parameters; sigma a scalar or one per row of x."""
    net = substitute(lambda: eqx_module("score_net", net0), params)()

    def score(x, sigma):
        sigma = jnp.broadcast_to(jnp.asarray(sigma, x.dtype), x.shape[:-1])
        return net(x, TIME_SCALE * jnp.log(sigma)) / sigma[..., None]

    return score


def per_level(score, mixture, x0, eps, sigmas):
    """Per level i: the loss term sigma^2/2 E||s + eps/sigma||^2 of ``score`` and of the exact
    score, the Fisher error sigma^2 E||s - s*||^2 and sigma^2 E||s*||^2, on x0 + sigma_i eps."""

    def one(sigma):
        x = x0 + sigma * eps
        s, s_star = score(x, sigma), mixture.score(x, sigma)
        return (0.5 * sigma**2 * jnp.mean(jnp.sum((s + eps / sigma) ** 2, -1)),
                0.5 * sigma**2 * jnp.mean(jnp.sum((s_star + eps / sigma) ** 2, -1)),
                sigma**2 * jnp.mean(jnp.sum((s - s_star) ** 2, -1)),
                sigma**2 * jnp.mean(jnp.sum(s_star**2, -1)))

    return [np.asarray(v, np.float64) for v in jax.jit(jax.vmap(one))(sigmas)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny sizes, about 15 s (for tests)")
    p.add_argument("--mixture", choices=MIXTURES, default="ring",
                   help="ring: six modes on a circle (default); three_modes: widely separated modes")
    p.add_argument("--data-size", type=int, default=20000, help="training points (default 20000)")
    p.add_argument("--steps", type=int, help=f"training steps (default {FULL['steps']})")
    p.add_argument("--batch-size", type=int, help=f"minibatch size (default {FULL['batch_size']})")
    p.add_argument("--hidden", help=f"hidden widths of the MLP (default {FULL['hidden']})")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate, cosine decay (default 2e-3)")
    p.add_argument("--ema-decay", type=float, help=f"EMA decay (default {FULL['ema_decay']})")
    p.add_argument("--levels", type=int, default=10, help="L, the noise levels (default 10)")
    p.add_argument("--sigma-min", type=float, default=0.05, help="sigma_1 (default 0.05)")
    p.add_argument("--sigma-max", type=float, default=10.0, help="sigma_L (default 10)")
    p.add_argument("--steps-per-level", type=int, help=f"T, Langevin steps per level (default {FULL['steps_per_level']})")
    p.add_argument("--step-size", type=float, help=f"epsilon, the step at sigma_1 (default {FULL['step_size']})")
    p.add_argument("--n", type=int, help=f"samples (default {FULL['n']})")
    p.add_argument("--null-pairs", type=int, help="pairs of exact sample sets for the noise floor")
    p.add_argument("--eval-points", type=int, help="exact points for the per-level Fisher error")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="out/ncsn_2d")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    for k, v in (TINY if args.tiny else FULL).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    try:
        hidden = tuple(int(h) for h in args.hidden.split(","))
    except ValueError:
        p.error(f"--hidden must be comma-separated widths, e.g. 128,128; got {args.hidden!r}")
    if (args.n < 2 or args.levels < 2 or args.steps < 1 or args.batch_size < 1 or args.steps_per_level < 1
            or args.null_pairs < 1 or args.eval_points < 2 or args.data_size < 1 or min(hidden) < 1):
        p.error("need --n >= 2, --levels >= 2, --eval-points >= 2 and positive sizes")
    if not 0 < args.sigma_min < args.sigma_max:
        p.error("need 0 < --sigma-min < --sigma-max")
    if not 0 <= args.ema_decay < 1:
        p.error("need 0 <= --ema-decay < 1")
    out = prepare_out_dir(args.out, FILES, overwrite=args.overwrite)

    t0 = time.time()
    mixture, bandwidth, box = get_mixture(args.mixture)
    w = np.asarray(mixture.weights, np.float64)
    sigmas = jnp.geomspace(args.sigma_min, args.sigma_max, args.levels)
    k_data, k_net, k_fit, k_eval, k_samp = jax.random.split(jax.random.key(args.seed), 5)
    # every exact draw of p in one call (one compilation), then cut: training data, points for
    # the Fisher error, the reference sample, and null_pairs pairs of sets for the noise floor
    n, m = args.n, args.eval_points
    pool = jax.jit(mixture.sample, static_argnums=1)(k_data, args.data_size + m + n * (1 + 2 * args.null_pairs))
    data, x_eval, exact = pool[: args.data_size], pool[args.data_size: args.data_size + m], pool[-n:]
    null_sets = pool[args.data_size + m: -n].reshape(args.null_pairs, 2, n, 2)

    # ---------------------------------------------------------------- training
    t_train = time.time()
    net0 = MLP(2, k_net, hidden=hidden)
    optim = optax.adam(optax.cosine_decay_schedule(args.lr, args.steps))
    svi = SVI(make_model(net0), lambda x: None, optim, NCSNScoreMatching(sigmas))
    res = fit(svi, data, args.steps, batch_size=args.batch_size, rng_key=k_fit,
              ema_decay=args.ema_decay, progress_bar=False)
    losses = res.losses / args.batch_size  # fit's loss is the sum over the minibatch
    train_seconds = time.time() - t_train
    score = trained_score(net0, res.state.ema)  # sample with the EMA of the parameters

    # ---------------------------------------------------------------- per-level errors
    eps_eval = jax.random.normal(k_eval, x_eval.shape)
    loss_i, loss_star_i, fisher_i, zero_fisher_i = per_level(score, mixture, x_eval, eps_eval, sigmas)

    # ---------------------------------------------------------------- sampling
    def sample_with(score_fn):
        sampler = samplers.annealed_langevin(score_fn, sigmas, step_size=args.step_size,
                                             steps_per_level=args.steps_per_level, denoise=True)
        return np.asarray(jax.jit(lambda k: samplers.run(sampler, k, (args.n, 2)))(k_samp))

    mmd2 = jax.jit(lambda x, y: mmd_rbf(x, y, bandwidth))
    x_learned = sample_with(score)
    x_exact_score = sample_with(mixture.score)  # the same sampler and keys on the exact score
    null = [float(mmd2(a, b)) for a, b in null_sets]
    tail = max(1, args.steps // 10)
    results = {
        "mixture": args.mixture, "n": args.n, "sigmas": [float(s) for s in sigmas], "bandwidth": bandwidth,
        "initial_loss": float(np.mean(losses[:tail])),
        "final_loss": float(np.mean(losses[-tail:])),
        "eval_loss": float(np.mean(loss_i)),
        "loss_exact_score": float(np.mean(loss_star_i)),
        "half_mean_fisher_error": float(0.5 * np.mean(fisher_i)),
        "fisher_error": fisher_i.tolist(),
        "fisher_error_of_zero_score": zero_fisher_i.tolist(),
        "true_weights": w.tolist(),
        "weight_se": np.sqrt(w * (1 - w) / args.n).tolist(),
        "mmd2_null": null,
        "mmd2_noise_floor": float(np.max(np.abs(null))),
        "train_seconds": train_seconds,
    }
    for name, x in (("learned", x_learned), ("exact_score_sampler", x_exact_score)):
        results[name] = {"mmd2": float(mmd2(jnp.asarray(x), exact)),
                         "mode_weights": mixture.mode_weights(x).tolist()}
    results["seconds"] = time.time() - t0

    plot_score_field(out / "score_field.png", score, mixture, sigmas, box, fisher_i)
    plot_samples(out / "samples.png", np.asarray(exact), results, x_learned, x_exact_score, mixture, box, args)
    plot_loss(out / "loss.png", losses, results)

    print(f"trained {args.steps} steps in {train_seconds:.1f} s; per-example loss {results['final_loss']:.4f} "
          f"(last 10%), held-out {results['eval_loss']:.4f}, exact score's floor {results['loss_exact_score']:.4f}, "
          f"half mean Fisher error {results['half_mean_fisher_error']:.4f}")
    print("Fisher error sigma^2 E||s - s*||^2 per level (that of s = 0 in brackets):")
    for s, f, f0 in zip(results["sigmas"], fisher_i, zero_fisher_i, strict=True):
        print(f"  sigma {s:7.3f}: {f:.5f}  ({f0:.3f})")
    print(f"{args.n} samples; squared MMD (bandwidth {bandwidth}) to {args.n} exact samples; noise floor "
          "(pairs of exact sets): " + ", ".join(f"{v:.5f}" for v in null))
    for name in ("learned", "exact_score_sampler"):
        r = results[name]
        print(f"  {name:20s} MMD^2 {r['mmd2']:.5f}; mode weights " + " / ".join(f"{v:.3f}" for v in r["mode_weights"]))
    print("  true weights " + " / ".join(f"{v:.3f}" for v in w) + " (SE "
          + " / ".join(f"{v:.3f}" for v in results["weight_se"]) + ")")
    write_json(out / "metrics.json", {"config": vars(args), "results": results})
    print(f"wrote {', '.join(str(out / f) for f in FILES)} in {time.time() - t0:.1f} s")
    return results


# -------------------------------------------------------------------- figures
def shown_levels(num_levels: int) -> list[int]:
    """The indices of SHOWN_LEVELS levels from sigma_1 to about sigma_L / 3, evenly in log sigma."""
    top = max(1, round(0.75 * (num_levels - 1)))
    return sorted({round(j * top / (SHOWN_LEVELS - 1)) for j in range(SHOWN_LEVELS)})


def plot_score_field(path, score, mixture, sigmas, box, fisher, grid=21, fine=120):
    """Row 1: the true score field per level over the density of p_sigma; row 2: the learned one,
    with sigma ||s_theta - s*|| in colour (log scale)."""
    shown = shown_levels(len(sigmas))
    xmin, xmax, ymin, ymax = box

    def mesh(m):
        xx, yy = np.meshgrid(np.linspace(xmin, xmax, m), np.linspace(ymin, ymax, m))
        return xx, yy, jnp.asarray(np.stack([xx, yy], -1).reshape(-1, 2), jnp.float32)

    _, _, g = mesh(grid)
    fx, fy, f = mesh(fine)

    @jax.jit
    def fields(sigma):
        err = sigma * jnp.linalg.norm(score(f, sigma) - mixture.score(f, sigma), axis=-1)
        return mixture.score(g, sigma), score(g, sigma), mixture.log_prob(f, sigma), err

    g = np.asarray(g)
    panel = 3.3 * (ymax - ymin) / (xmax - xmin)  # the height of a panel 3.3 inches wide
    fig, axes = plt.subplots(2, len(shown), figsize=(3.3 * len(shown), 2 * panel + 0.7), squeeze=False)
    cell = (xmax - xmin) / (grid - 1)
    image = None
    for col, i in enumerate(shown):
        sigma = float(sigmas[i])
        s_true, s_learn, dens, err = (np.asarray(a) for a in fields(sigmas[i]))
        dens, err = dens.reshape(fine, fine), err.reshape(fine, fine)
        # one arrow scale per level: the longest true arrow spans 1.5 grid cells; learned arrows
        # are drawn on the same scale, clipped at twice the longest true one
        top = float(np.max(np.linalg.norm(s_true, axis=-1)))
        for row, (s, title) in enumerate(((s_true, "true score $s^*$"), (s_learn, r"learned $s_\theta$"))):
            ax = axes[row, col]
            norm = np.linalg.norm(s, axis=-1, keepdims=True)
            s = s * np.minimum(1.0, 2 * top / np.maximum(norm, 1e-12))
            if row == 0:  # log p_sigma in six bands, down to e^-9 of its peak at most
                span = min(9.0, float(dens.max() - dens.min()))
                ax.contourf(fx, fy, dens - dens.max(), levels=np.linspace(-span, 0.0, 7), cmap="Greys",
                            extend="min", alpha=0.5)
            else:  # banded, so that the 256-colour PNG keeps the colour scale
                image = ax.contourf(fx, fy, np.clip(err, 1.01e-3, 9.9), levels=ERR_LEVELS, norm=LogNorm(1e-3, 10.0),
                                    cmap="viridis")
                ax.contour(fx, fy, dens, levels=[dens.max() - 9, dens.max() - 4.5], colors="w", linewidths=0.9)
            ax.quiver(g[:, 0], g[:, 1], s[:, 0], s[:, 1], color="tab:red" if row == 0 else "k",
                      angles="xy", scale_units="xy", scale=top / (1.5 * cell), width=0.004)
            label = rf"{title}, $\sigma$ = {sigma:.3g}"
            if row == 1:
                label += f"; Fisher error {fisher[i]:.4f}"
            ax.set_title(label, fontsize=8)
            ax.set_xlim(xmin, xmax)
            ax.set_ylim(ymin, ymax)
            ax.set_aspect("equal")
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(r"Top: the true score over $\log p_\sigma$ (grey).  Bottom: the learned score; colour "
                 r"$\sigma\,\|s_\theta - s^*\|$, white contours where $p_\sigma$ is $e^{-4.5}$ and $e^{-9}$ of its peak",
                 fontsize=8)
    fig.tight_layout(rect=(0, 0, 0.93, 0.97))
    cax = fig.add_axes((0.94, 0.08, 0.012, 0.38))
    fig.colorbar(image, cax=cax).ax.tick_params(labelsize=7)
    save_png(fig, path)


def plot_samples(path, exact, results, x_learned, x_exact_score, mixture, box, args):
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.9), gridspec_kw={"width_ratios": [1, 1, 1, 1.15]})
    panels = (("exact samples", exact, "0.3", None),
              (r"annealed Langevin, learned $s_\theta$", x_learned, "tab:blue", "learned"),
              (r"annealed Langevin, exact $s^*$", x_exact_score, "tab:green", "exact_score_sampler"))
    xmin, xmax, ymin, ymax = box
    for ax, (title, x, color, key) in zip(axes, panels, strict=False):
        ax.scatter(x[:, 0], x[:, 1], s=2, alpha=0.4, color=color, linewidths=0)
        if key is None:
            title += f"\nMMD$^2$ of two exact sets: |.| <= {results['mmd2_noise_floor']:.5f}"
        else:
            title += f"\nMMD$^2$ to exact samples {results[key]['mmd2']:.5f}"
        ax.set_title(title, fontsize=8)
        ax.set_xlim(xmin, xmax)
        ax.set_ylim(ymin, ymax)
        ax.set_aspect("equal")
    ax = axes[3]
    w = np.asarray(results["true_weights"])
    k = np.arange(len(w))
    ax.bar(k - 0.27, w, 0.27, color="0.5", label="true weight $w_k$")
    for off, name, color in ((0.0, "learned", "tab:blue"), (0.27, "exact_score_sampler", "tab:green")):
        ax.bar(k + off, results[name]["mode_weights"], 0.27, color=color, label=name.replace("_", " "),
               yerr=2 * np.asarray(results["weight_se"]), capsize=2)
    ax.set_xticks(k, [f"{i + 1}" for i in k], fontsize=8)
    ax.set_xlabel("mode", fontsize=8)
    ax.set_ylabel("share of samples nearest the mode")
    ax.set_title(rf"mode weights (bars: ±2 binomial SE); $\epsilon$ = {args.step_size:g}, T = {args.steps_per_level}",
                 fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_png(fig, path)


def plot_loss(path, losses, results):
    fig, ax = plt.subplots(figsize=(6, 3.6))
    steps = np.arange(1, len(losses) + 1)
    ax.plot(steps, losses, color="0.7", lw=0.5, label="per-example loss per step")
    window = max(1, len(losses) // 50)
    running = np.convolve(losses, np.ones(window) / window, mode="valid")
    ax.plot(steps[window - 1:], running, color="tab:blue", label=f"running mean ({window} steps)")
    ax.axhline(results["loss_exact_score"], color="k", ls="--", lw=1, label=r"floor $\mathcal{L}(s^*)$, exact score")
    lo = results["loss_exact_score"]
    ax.set_ylim(lo - 0.1 * abs(lo), max(lo + 0.6, float(np.percentile(losses[: max(1, len(losses) // 20)], 90))))
    ax.set_xlabel("step")
    ax.set_ylabel("NCSN loss per example")
    ax.set_title("NCSN objective (one level per example)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, path)


if __name__ == "__main__":
    main()
