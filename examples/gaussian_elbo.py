r"""The ELBO of a diffusion model, term by term, against the exact log-likelihood.

MATH.md A2, A4, B1, B2, B3, C2, C4. Data x_0 ~ N(mu, Sigma) in 2-D. With the optimal
eps-function

    eps*(x_t, t) = E[eps | x_t] = sqrt(1 - alpha_bar_t) C_t^{-1} (x_t - sqrt(alpha_bar_t) mu),
    C_t = alpha_bar_t Sigma + (1 - alpha_bar_t) I,

the reverse chain p_theta(x_{0:T}) is linear-Gaussian, so its marginal p_theta(x_0) and every
term of the ELBO

    ELBO = E log p(x_0|x_1) - KL(q(x_T|x_0) || p(x_T)) - sum_{t>=2} E KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t))

have closed forms. This script prints, for both reverse variances (sigma_t^2 = beta_t and
beta_tilde_t):

1. each term estimated by Monte Carlo (``GaussianDiffusion.elbo_terms``) next to its closed
   form, the same ELBO from ``numpyro.infer.Trace_ELBO`` on the model/guide pair, the exact
   log p_theta(x_0) and the true log pi(x_0);
2. the B2 and B3 decompositions side by side: same mean, different spread per draw;
3. the gap log p_theta(x_0) - ELBO = KL(q(x_{1:T}|x_0) || p_theta(x_{1:T}|x_0)) as T grows.

Expected output (defaults): the Monte-Carlo and closed-form columns agree within a few
standard errors; ELBO < log p_theta(x_0) by a few thousandths of a nat at T = 1000; the gap
shrinks roughly like 1/T. Figures and numbers go to ``--out`` (default ``out/gaussian_elbo``).

Run: ``python examples/gaussian_elbo.py`` (about a minute), or tiny:
``python examples/gaussian_elbo.py --steps 20 --points 50 --draws 4 --out /tmp/g``.
"""

from __future__ import annotations

import argparse
import math

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from probdiff import schedules  # noqa: E402
from probdiff._io import prepare_out_dir, write_json  # noqa: E402
from probdiff.analytic import GaussianData, affine_elbo_terms, affine_reverse_marginal  # noqa: E402
from probdiff.demo import format_report, gaussian_diffusion, gaussian_elbo_report  # noqa: E402

FILES = ("gaussian_elbo.json", "elbo_gap_vs_T.png", "b2_vs_b3.png")


def b2_vs_b3(diffusion, x_0, key, draws):
    """Per-draw ELBO of the whole batch by the B2 and B3 decompositions (mean over points)."""

    def both(k):
        return (
            diffusion.elbo_terms(k, x_0).total.mean(),
            diffusion.elbo_consistency_terms(k, x_0).total.mean(),
        )

    b2, b3 = jax.jit(lambda ks: jax.lax.map(both, ks))(jax.random.split(key, draws))
    return np.asarray(b2), np.asarray(b3)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=1000, help="T (default 1000)")
    p.add_argument("--points", type=int, default=1000, help="data points (default 1000)")
    p.add_argument("--draws", type=int, default=32, help="Monte-Carlo draws (default 32)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="out/gaussian_elbo")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    out = prepare_out_dir(args.out, FILES, overwrite=args.overwrite)

    data = GaussianData.default_2d()
    key = jax.random.key(args.seed)
    k_data, k_rep, k_b3 = jax.random.split(key, 3)
    x_0 = data.sample(k_data, args.points)
    schedule = schedules.linear(args.steps)
    results = {"steps": args.steps, "points": args.points, "draws": args.draws, "variances": {}}

    for variance in ("beta", "beta_tilde"):
        d = gaussian_diffusion(data, schedule, variance)
        report = gaussian_elbo_report(d, data, x_0, k_rep, num_draws=args.draws, trace_draws=max(2, args.draws // 8))
        print(f"\n== sigma_t^2 = {variance}, {schedule}")
        print(format_report(report))
        b2, b3 = b2_vs_b3(d, x_0, k_b3, args.draws)
        print(
            f"B2 (denoising matching): mean {b2.mean():.4f}, spread per draw {b2.std(ddof=1):.4f}\n"
            f"B3 (consistency terms):  mean {b3.mean():.4f}, spread per draw {b3.std(ddof=1):.4f}"
        )
        report.pop("denoising_by_t")
        results["variances"][variance] = {
            "report": report,
            "b2": {"mean": float(b2.mean()), "std": float(b2.std(ddof=1))},
            "b3": {"mean": float(b3.mean()), "std": float(b3.std(ddof=1))},
        }
        if variance == "beta":
            fig, ax = plt.subplots(figsize=(5, 3.2))
            bins = np.linspace(min(b2.min(), b3.min()), max(b2.max(), b3.max()), 30)
            ax.hist(b2, bins=bins, alpha=0.6, label="B2: denoising matching")
            ax.hist(b3, bins=bins, alpha=0.6, label="B3: consistency")
            ax.axvline(report["rows"]["ELBO (B2: recon - prior - denoising)"]["closed_form"], color="k", ls="--", label="closed form")
            ax.set_xlabel(f"ELBO estimate, mean over {args.points} points (nats)")
            ax.legend(fontsize=8)
            fig.tight_layout()
            fig.savefig(out / "b2_vs_b3.png", dpi=120)

    # The gap log p_theta(x_0) - ELBO as T grows, at a fixed total amount of noise: DDPM's
    # 1e-4..0.02 range scaled by 1000 / T (clipped below 1 for the smallest T), so alpha_bar_T
    # stays near 4e-5 while each step gets smaller.
    Ts = sorted({t for t in (5, 10, 20, 50, 100, 200, 500, 1000) if t <= max(args.steps, 5)})
    gaps, elbos, logps = [], [], []
    for T in Ts:
        scale = 1000.0 / T
        s = schedules.linear(T, min(1e-4 * scale, 0.5), min(0.02 * scale, 0.999))
        d = gaussian_diffusion(data, s)
        e = affine_elbo_terms(d, x_0).total
        lp = affine_reverse_marginal(d).log_prob(x_0)
        elbos.append(float(e.mean()))
        logps.append(float(lp.mean()))
        gaps.append(float((lp - e).mean()))
    print("\nT, ELBO, log p_theta(x_0), gap (closed forms, mean over points):")
    for row in zip(Ts, elbos, logps, gaps, strict=True):
        print("  {:5d}  {:9.4f}  {:9.4f}  {:.5f}".format(*row))
    results["gap_vs_T"] = {"T": Ts, "elbo": elbos, "log_p_theta": logps, "gap": gaps,
                           "true_log_pi": float(data.log_prob(x_0).mean())}
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.loglog(Ts, gaps, "o-", label=r"$\log p_\theta(x_0) - \mathrm{ELBO}$")
    ax.loglog(Ts, [gaps[-1] * Ts[-1] / T for T in Ts], "k--", lw=0.8, label=r"$\propto 1/T$ (through the last point)")
    ax.set_xlabel("T (betas scaled by 1000/T)")
    ax.set_ylabel("nats per example")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "elbo_gap_vs_T.png", dpi=120)
    results["true_log_pi_check"] = float(jnp.mean(data.log_prob(x_0)))
    write_json(out / "gaussian_elbo.json", results)
    print(f"\nwrote {', '.join(str(out / f) for f in FILES)}")
    assert all(math.isfinite(g) for g in gaps)
    return results


if __name__ == "__main__":
    main()
