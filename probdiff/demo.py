r"""The Gaussian demo: every term of the ELBO next to the exact log-likelihood.

For data pi = N(mu, Sigma) and the optimal eps-function E[eps | x_t] (an affine map,
[probdiff.analytic][probdiff.analytic]) every quantity of the diffusion has a closed form. The
report puts side by side, averaged over a set of data points:

* the B2 terms of the ELBO estimated by Monte Carlo with
  [GaussianDiffusion.elbo_terms][probdiff.GaussianDiffusion.elbo_terms] (with standard errors)
  and their closed forms ([affine_elbo_terms][probdiff.analytic.affine_elbo_terms]);
* the same ELBO by ``numpyro.infer.Trace_ELBO`` on the diffusion's model and guide;
* the exact log p_theta(x_0) of the linear-Gaussian reverse chain, which the ELBO bounds, and
  the true data log-density log pi(x_0), which p_theta approximates.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from numpyro.infer import Trace_ELBO

from probdiff.analytic import GaussianData, affine_elbo_terms, affine_reverse_marginal, optimal_eps_fn
from probdiff.diffusion import GaussianDiffusion
from probdiff.schedules import Schedule

__all__ = ["gaussian_diffusion", "gaussian_elbo_report", "format_report"]


def gaussian_diffusion(data: GaussianData, schedule: Schedule, variance: str = "beta") -> GaussianDiffusion:
    """The diffusion whose eps-function is the exact optimum for ``data`` (see module docstring)."""
    return GaussianDiffusion(optimal_eps_fn(data.mu, data.cov, schedule), schedule, data.mu.shape, variance)


def _mean_se(per_draw):
    per_draw = np.asarray(per_draw, dtype=np.float64)
    return float(per_draw.mean()), float(per_draw.std(ddof=1) / math.sqrt(per_draw.shape[0]))


def gaussian_elbo_report(
    diffusion: GaussianDiffusion,
    data: GaussianData,
    x_0,
    rng_key,
    *,
    num_draws: int = 64,
    trace_draws: int = 16,
) -> dict:
    r"""ELBO terms (Monte Carlo and closed form) next to the exact log-likelihoods, in nats.

    All values are averages over the rows of ``x_0``. Monte-Carlo values come with the
    standard error of the mean over ``num_draws`` independent draws of the whole batch.

    Args:
        diffusion: a diffusion with an affine eps-function (e.g. from
            [gaussian_diffusion][probdiff.demo.gaussian_diffusion]).
        data: the data distribution, for the true log-density.
        x_0: points, shape ``(N, D)``.
        rng_key: a JAX PRNG key.
        num_draws: independent ELBO draws of the batch (>= 2).
        trace_draws: draws of ``Trace_ELBO`` on model/guide (>= 2; 0 skips it).

    Returns:
        A dict: ``rows`` maps a row name to ``{"monte_carlo", "se", "closed_form"}`` (absent
        entries are None), and ``denoising_by_t`` holds the per-t closed form and Monte-Carlo
        means of the denoising terms (t = 2..T).
    """
    if num_draws < 2:
        raise ValueError(f"num_draws must be >= 2 to give a standard error; got {num_draws}")
    if trace_draws == 1 or trace_draws < 0:
        raise ValueError(f"trace_draws must be 0 or >= 2; got {trace_draws}")
    x_0 = jnp.asarray(x_0)
    key_mc, key_tr = jax.random.split(rng_key)
    D = diffusion.event_size

    def one_draw(key):
        terms = diffusion.elbo_terms(key, x_0)
        den = terms.denoising_matching
        return (
            terms.reconstruction.mean(),
            terms.prior_matching.mean(),
            den.sum(-1).mean(),
            terms.total.mean(),
            den.mean(0),
        )

    rec, pri, den, tot, den_t = jax.jit(lambda ks: jax.lax.map(one_draw, ks))(jax.random.split(key_mc, num_draws))
    exact = affine_elbo_terms(diffusion, x_0)
    log_p_theta = affine_reverse_marginal(diffusion).log_prob(x_0)
    log_pi = data.log_prob(x_0)

    def row(mc, closed):
        m, se = (None, None) if mc is None else _mean_se(mc)
        return {"monte_carlo": m, "se": se, "closed_form": None if closed is None else float(closed)}

    rows = {
        "reconstruction  E log p(x_0|x_1)": row(rec, exact.reconstruction.mean()),
        "prior matching  KL(q(x_T|x_0) || p(x_T))": row(pri, exact.prior_matching.mean()),
        "denoising matching  sum_t E KL_t": row(den, exact.denoising_matching.sum(-1).mean()),
        "ELBO (B2: recon - prior - denoising)": row(tot, exact.total.mean()),
    }
    if trace_draws:
        n = x_0.shape[0]
        loss = Trace_ELBO()

        def trace_draw(key):
            return -loss.loss(key, {}, diffusion.model, diffusion.guide, x_0) / n

        tr = jax.jit(lambda ks: jax.lax.map(trace_draw, ks))(jax.random.split(key_tr, trace_draws))
        rows["ELBO by Trace_ELBO on model/guide"] = row(tr, None)
    rows["exact log p_theta(x_0)  (reverse chain)"] = row(None, log_p_theta.mean())
    rows["true log pi(x_0)  (data density)"] = row(None, log_pi.mean())
    rows["gap log p_theta - ELBO  (>= 0)"] = row(None, (log_p_theta - exact.total).mean())
    rows["-ELBO in bits/dim"] = row(-np.asarray(tot) / (D * math.log(2.0)), -exact.total.mean() / (D * math.log(2.0)))
    return {
        "rows": rows,
        "denoising_by_t": {
            "t": list(range(2, diffusion.num_steps + 1)),
            "closed_form": np.asarray(exact.denoising_matching.mean(0)).tolist(),
            "monte_carlo": np.asarray(den_t.mean(0)).tolist(),
        },
        "num_points": int(x_0.shape[0]),
        "num_draws": int(num_draws),
        "trace_draws": int(trace_draws),
    }


def format_report(report: dict) -> str:
    """The report's rows as a fixed-width text table."""
    lines = [
        f"{'quantity (nats per example, mean over ' + str(report['num_points']) + ' points)':<52}"
        f"{'Monte Carlo':>22}{'closed form':>14}",
        "-" * 88,
    ]
    for name, r in report["rows"].items():
        mc = "" if r["monte_carlo"] is None else f"{r['monte_carlo']:.4f} ± {r['se']:.4f}"
        cf = "" if r["closed_form"] is None else f"{r['closed_form']:.4f}"
        lines.append(f"{name:<52}{mc:>22}{cf:>14}")
    return "\n".join(lines)
