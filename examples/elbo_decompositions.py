r"""The same ELBO by two decompositions, B2 and B3: equal means, very different variances.

MATH.md B2, B3. For a diffusion model the ELBO can be grouped two ways (``004_*``):

    B2: E log p(x_0|x_1) - KL(q(x_T|x_0) || p(x_T)) - sum_{t>=2} E_{q(x_t|x_0)} KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t))
    B3: E log p(x_0|x_1) - E KL(q(x_T|x_{T-1}) || p(x_T)) - sum_{t=1}^{T-1} E [log q(x_t|x_{t-1}) - log p(x_t|x_{t+1})]

(``GaussianDiffusion.elbo_terms`` and ``GaussianDiffusion.elbo_consistency_terms``). Both are
unbiased: their means agree with each other and with the exact ELBO, which
``probdiff.analytic.affine_elbo_terms`` gives in closed form for an affine eps-function. B2
integrates x_{t-1} out analytically and draws only x_t; each B3 term depends on two random
neighbours x_{t-1} and x_{t+1} of x_t, so it spreads far more. The script draws both estimators
many times (``probdiff.divergences.elbo_estimates``) for two models of Gaussian data N(mu, Sigma)
in 2-D:

* ``optimal``: the exact E[eps | x_t] (``probdiff.analytic.optimal_eps_fn``);
* ``misspecified``: the optimal eps of the wrong data N(mu + 0.5, 2 Sigma), still affine, so its
  ELBO is still exact.

It prints, for each model, the exact ELBO and the two Monte-Carlo means with standard errors,
the variance of each term (paired by the latent x_s they concern) and of the totals.

What it shows: term by term, B3 is far noisier. Each consistency term is a difference of two
Gaussian log-densities at random points, with variance ~ D = 2 nats^2 at every t, while the B2
term of the same latent is a KL whose only randomness is x_t, with variance falling from ~0.3 at
s = 1 to ~1e-16 at s = T. Summed over the terms, B3's variances add up to ~2000 against ~1 for B2.
But the B3 terms of one chain are strongly negatively correlated (x_t enters two neighbouring
terms with opposite signs): the B3 *total* varies *less* than B2's (its variance ~1.0 against
~2.0 here, mostly the reconstruction term). So "B3 has larger variance" holds for the terms,
which is what a per-t stochastic objective samples, not for the single-chain total.

Expected output (defaults: T = 1000, 4 points, 2000 draws; about 70 s on 2 shared CPU cores,
mostly compiling): for both models both means within 1 SE of the exact ELBO (-1.6635 and
-2.2477); per-term variance ratio B3/B2 6.9 at s = 1, ~1e4 at s = 99, ~2e7 (optimal) and ~4e6 at s = 499; summed term
variances B2 0.99, B3 1994; variances of the totals B2 1.99, B3 1.04. Figures
``elbo_decompositions_var.png`` (variance per latent) and ``elbo_decompositions_hist.png``
(histograms of the totals) and ``elbo_decompositions.json`` go to ``--out``.

Run: ``python examples/elbo_decompositions.py --out out/elbo_decompositions``, or tiny:
``python examples/elbo_decompositions.py --tiny --out /tmp/ed``.
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

from probdiff import GaussianDiffusion, schedules  # noqa: E402
from probdiff._io import prepare_out_dir, write_json  # noqa: E402
from probdiff.analytic import GaussianData, affine_elbo_terms, optimal_eps_fn  # noqa: E402
from probdiff.divergences import elbo_estimates  # noqa: E402
from probdiff.plotting import save_png  # noqa: E402

FILES = ("elbo_decompositions_var.png", "elbo_decompositions_hist.png", "elbo_decompositions.json")

FULL = {"steps": 1000, "points": 4, "draws": 2000}
TINY = {"steps": 20, "points": 2, "draws": 64}


def models(data, schedule):
    """The optimal affine eps and a misspecified one (optimal for N(mu + 0.5, 2 Sigma))."""
    return {
        "optimal": GaussianDiffusion(optimal_eps_fn(data.mu, data.cov, schedule), schedule, (2,)),
        "misspecified": GaussianDiffusion(optimal_eps_fn(data.mu + 0.5, 2.0 * data.cov, schedule), schedule, (2,)),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="a few seconds: tiny sizes (for tests)")
    p.add_argument("--steps", type=int, help=f"T (default {FULL['steps']})")
    p.add_argument("--points", type=int, help=f"data points x_0 (default {FULL['points']})")
    p.add_argument("--draws", type=int, help=f"draws of each estimator (default {FULL['draws']})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="out/elbo_decompositions")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    for k, v in (TINY if args.tiny else FULL).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.steps < 2 or args.draws < 2 or args.points < 1:
        p.error("--steps and --draws must be >= 2, --points >= 1")
    out = prepare_out_dir(args.out, FILES, overwrite=args.overwrite)
    t0 = time.time()

    data = GaussianData.default_2d()
    k_data, k_est = jax.random.split(jax.random.key(args.seed))
    x_0 = data.sample(k_data, args.points)
    schedule = schedules.linear(args.steps)
    results = {"config": vars(args), "models": {}}
    stats = {}
    for name, d in models(data, schedule).items():
        exact = float(jnp.mean(jax.jit(lambda x, d=d: affine_elbo_terms(d, x).total)(x_0)))
        est = elbo_estimates(d, x_0, jax.random.fold_in(k_est, len(stats)), args.draws)
        s = est.summary()
        s["exact_elbo"] = exact
        for b in ("b2", "b3"):
            s[b]["z_vs_exact"] = (s[b]["mean"] - exact) / s[b]["se"]
        ratio = np.asarray(s["b3"]["var_by_latent"]) / np.asarray(s["b2"]["var_by_latent"])
        at = sorted({1, max(1, (args.steps - 1) // 10), max(1, (args.steps - 1) // 2)})
        s["var_ratio_by_latent"] = {"min": float(ratio.min()), "all_above_1": bool(np.all(ratio > 1)),
                                    "at": {str(i): float(ratio[i - 1]) for i in at}}
        stats[name] = (s, np.asarray(est.b2_total).mean(1), np.asarray(est.b3_total).mean(1))
        results["models"][name] = s
        print(f"== {name} eps, T = {args.steps}, {args.points} points, {args.draws} draws (ELBO in nats, mean over points)")
        print(f"   exact ELBO (affine_elbo_terms):       {exact:.4f}")
        for b, label in (("b2", "B2 (denoising matching)"), ("b3", "B3 (consistency terms)")):
            print(f"   {label:24s} mean {s[b]['mean']:.4f} ± {s[b]['se']:.4f}  "
                  f"(z = {s[b]['z_vs_exact']:+.2f})   variance of one draw {s[b]['var']:.4g}")
        r = s["var_ratio_by_latent"]
        cells = ", ".join(f"{v:.3g} at s = {k}" for k, v in r["at"].items())
        print(f"   variance of each term, B3/B2 for the same latent x_s: {cells}; smallest {r['min']:.3g}")
        print(f"   sum of the term variances: B2 {s['b2']['sum_var_terms']:.4g}, B3 {s['b3']['sum_var_terms']:.4g}; "
              f"variance of the totals: B2 {s['b2']['var']:.4g}, B3 {s['b3']['var']:.4g} "
              f"(ratio B3/B2 {s['var_ratio_b3_over_b2']:.2f}: B3's terms cancel along the chain)")

    # figures: per-latent variance, and histograms of the totals
    fig, ax = plt.subplots(figsize=(6, 3.8))
    s_axis = np.arange(1, args.steps)
    for (name, (s, _, _)), c in zip(stats.items(), ("tab:blue", "tab:red"), strict=True):
        ax.plot(s_axis, s["b2"]["var_by_latent"], color=c, lw=1.2, label=f"{name}: B2 denoising term of t = s + 1")
        ax.plot(s_axis, s["b3"]["var_by_latent"], color=c, lw=1.2, ls="--", label=f"{name}: B3 consistency term of t = s")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("latent index s (the term involving $x_s$)")
    ax.set_ylabel("variance over draws (nats$^2$)")
    ax.set_title(f"per-term variance, T = {args.steps}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_png(fig, out / "elbo_decompositions_var.png")

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, (name, (s, b2, b3)) in zip(axes, stats.items(), strict=True):
        lo, hi = np.percentile(np.concatenate([b2, b3]), [0.5, 99.5])
        bins = np.linspace(lo, hi, 60)
        ax.hist(b3, bins=bins, alpha=0.6, color="tab:orange", label=f"B3: var {s['b3']['var']:.3g}")
        ax.hist(b2, bins=bins, alpha=0.7, color="tab:blue", label=f"B2: var {s['b2']['var']:.3g}")
        ax.axvline(s["exact_elbo"], color="k", ls="--", lw=1, label=f"exact ELBO {s['exact_elbo']:.3f}")
        ax.set_title(f"{name} eps: one draw of each estimator", fontsize=9)
        ax.set_xlabel(f"ELBO estimate, mean over {args.points} points (nats)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_png(fig, out / "elbo_decompositions_hist.png")
    results["seconds"] = time.time() - t0
    write_json(out / "elbo_decompositions.json", results)
    print(f"wrote {', '.join(str(out / f) for f in FILES)} in {results['seconds']:.1f} s")
    return results


if __name__ == "__main__":
    main()
