r"""The true reverse kernel q(x_{t-1} | x_t) is Gaussian only for small beta_t (MATH.md A5, Feller).

A diffusion model's reverse kernels p_theta(x_{t-1} | x_t) are Gaussian. The true reverse kernel of
the forward process,

    q(x_{t-1} | x_t) = q(x_{t-1}) q(x_t | x_{t-1}) / q(x_t),     q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t),

is not Gaussian in general: for data x_0 ~ sum_k w_k N(m_k, s_k^2) the marginal q(x_{t-1}) is the
exact noised mixture (``probdiff.analytic.noised_mixture_1d``) and the kernel is a mixture too
(``probdiff.analytic.reverse_kernel_mixture_1d``). But when beta_t is small the Gaussian
likelihood q(x_t | x_{t-1}), of width sqrt(beta_t), is much narrower than anything in q(x_{t-1})
and dominates Bayes' rule: the kernel is then close to Gaussian (Feller 1949; Sohl-Dickstein et
al. 2015). That is why T ~ 1000 small steps: each true reverse step can then be matched by a
Gaussian p_theta.

The script computes the kernel by Bayes' rule on a grid (``probdiff.analytic.reverse_kernel_on_grid``,
no Gaussian assumption anywhere) for data 0.3 N(-2, 0.4^2) + 0.7 N(1.5, 0.6^2), and measures its
distance to the best Gaussian, KL(q(x_{t-1}|x_t) || N(moment-matched)) =
min over Gaussians of KL (``probdiff.divergences.kl_to_best_gaussian_on_grid``), averaged over
x_t ~ q(x_t), for beta_t from 1e-4 to 0.9, at t = 1 (alpha_bar_{t-1} = 1: q(x_{t-1}) is the data)
and at alpha_bar_{t-1} = 0.5, in float64. Why beta_t^3: for small beta_t the kernel is
q(x_{t-1}) times a Gaussian of width sqrt(beta_t); expanding log q(x_{t-1}) around its centre, the
cubic term makes a skewness ~ beta_t^{3/2} and the KL to the best Gaussian ~ skewness^2 / 12 ~ beta_t^3.
A chain of T steps of size beta ~ 1/T then loses ~ T * T^-3 = T^-2 in total to Gaussian kernels.

Expected output (defaults, about 30 s on 2 shared CPU cores): at t = 1 the KL averaged over x_t
is 0.50 nats at beta_t = 0.9, 1.9e-3 at 0.1, 4.6e-6 at 0.011 (about DDPM's largest beta, 0.02) and
4e-12 at 1e-4: a fitted log-log slope of 2.96 (3.00 at alpha_bar_{t-1} = 0.5, where the noised
data are smoother and every KL is ~10x smaller). The least Gaussian kernel sits at x_t ~ -0.7,
between the two modes (max KL 0.67 at beta_t = 0.9). The grid's Bayes denominator matches the
exact q(x_t) to 1e-13. Figures ``feller_kernels.png`` (the kernel and its best Gaussian at small
and large beta_t) and ``feller_kl.png`` (KL against beta_t) and ``feller.json`` go to ``--out``.

Run: ``python examples/feller.py --out out/feller``, or tiny: ``python examples/feller.py --tiny --out /tmp/f``.
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

from probdiff._io import prepare_out_dir, write_json  # noqa: E402
from probdiff.analytic import noised_mixture_1d, reverse_kernel_mixture_1d, reverse_kernel_on_grid  # noqa: E402
from probdiff.divergences import kl_to_best_gaussian_on_grid  # noqa: E402
from probdiff.plotting import save_png  # noqa: E402

FILES = ("feller_kernels.png", "feller_kl.png", "feller.json")

W, MU, SD = (0.3, 0.7), (-2.0, 1.5), (0.4, 0.6)

FULL = {"betas": 30, "beta_min": 1e-4, "grid": 10001, "x_t_points": 241}
TINY = {"betas": 5, "beta_min": 1e-2, "grid": 1201, "x_t_points": 41}
HALF_WIDTH = 10.0  # the x_{t-1} grid is [-10, 10]
X_T_RANGE = 6.0  # x_t on [-6, 6]: beyond it q(x_t) < 1e-8 of its peak for every beta and alpha_bar here


def _x64():
    """float64 for the run: at small beta_t the KL is ~1e-9, below float32's resolution of the grid sums."""
    if hasattr(jax, "enable_x64"):
        return jax.enable_x64(True)
    from jax.experimental import enable_x64  # pragma: no cover - older JAX

    return enable_x64()


def kernel_kl(x_t, grid, alpha_bar_prev, beta):
    """KL(q(x_{t-1} | x_t) || best Gaussian) on the grid, and the log Bayes denominator."""
    k = reverse_kernel_on_grid(x_t, grid, W, MU, SD, alpha_bar_prev, beta)
    return kl_to_best_gaussian_on_grid(k.log_prob, grid).kl, k.log_evidence


def averaged_kl(grid, x_ts, alpha_bar_prev, beta):
    """E_{x_t ~ q(x_t)} KL, the max over x_t, and the largest error of the grid's q(x_t)."""
    kls, log_ev = jax.vmap(lambda x: kernel_kl(x, grid, alpha_bar_prev, beta))(x_ts)
    marg = noised_mixture_1d(W, MU, SD, alpha_bar_prev * (1.0 - beta))
    log_q = marg.log_prob(x_ts)
    w = jnp.exp(log_q - jnp.max(log_q))
    w = w / jnp.sum(w)
    return jnp.sum(w * kls), jnp.max(kls), jnp.max(jnp.abs(log_ev - log_q)), x_ts[jnp.argmax(kls)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="a few seconds: tiny sizes (for tests)")
    p.add_argument("--betas", type=int, help=f"number of beta_t values, log-spaced (default {FULL['betas']})")
    p.add_argument("--beta-min", type=float, help=f"smallest beta_t (default {FULL['beta_min']})")
    p.add_argument("--grid", type=int, help=f"points of the x_(t-1) grid on [-10, 10] (default {FULL['grid']})")
    p.add_argument("--x-t-points", type=int, help=f"x_t values averaged over (default {FULL['x_t_points']})")
    p.add_argument("--out", default="out/feller")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    for k, v in (TINY if args.tiny else FULL).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.betas < 2 or not 0 < args.beta_min < 0.9:
        p.error("--betas must be >= 2 and --beta-min in (0, 0.9)")
    out = prepare_out_dir(args.out, FILES, overwrite=args.overwrite)
    with _x64():
        return run(args, out)


def run(args, out):
    t0 = time.time()
    grid = jnp.linspace(-HALF_WIDTH, HALF_WIDTH, args.grid)
    x_ts = jnp.linspace(-X_T_RANGE, X_T_RANGE, args.x_t_points)
    betas = np.geomspace(args.beta_min, 0.9, args.betas)
    averaged = jax.jit(averaged_kl)
    results = {"config": vars(args), "data": {"weights": W, "means": MU, "stds": SD}, "curves": {}}
    curves = {}
    for ab in (1.0, 0.5):
        for b in betas:  # eager calls check the grid: fine enough for beta_t, wide enough at both ends of x_t
            for x in (-X_T_RANGE, X_T_RANGE):
                reverse_kernel_on_grid(x, grid, W, MU, SD, ab, float(b))
        rows = [tuple(float(v) for v in averaged(grid, x_ts, ab, float(b))) for b in betas]
        mean_kl = np.array([r[0] for r in rows])
        small = betas <= max(1e-2, float(betas[min(2, len(betas) - 1)]))
        slope = float(np.polyfit(np.log(betas[small]), np.log(mean_kl[small]), 1)[0]) if small.sum() >= 2 else float("nan")
        curves[ab] = mean_kl
        results["curves"][str(ab)] = {
            "beta": betas.tolist(), "mean_kl": mean_kl.tolist(), "max_kl": [r[1] for r in rows],
            "argmax_x_t": [r[3] for r in rows], "max_log_evidence_error": max(r[2] for r in rows),
            "small_beta_loglog_slope": slope,
        }
        print(f"alpha_bar_(t-1) = {ab}: beta_t | E_x_t KL(q(x_(t-1)|x_t) || best Gaussian) | max over x_t (at x_t)")
        for b, r in zip(betas, rows, strict=True):
            print(f"   {b:9.3g} | {r[0]:10.3g} | {r[1]:10.3g} (x_t = {r[3]:+.2f})")
        print(f"   log-log slope at small beta_t: {slope:.2f}; largest |log q(x_t) grid - exact|: "
              f"{results['curves'][str(ab)]['max_log_evidence_error']:.2g}")

    # the kernels themselves at t = 1 for three beta_t, at the x_t (between the modes) where the kernel at
    # beta_t ~ 0.1 is least Gaussian
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    mid = int(np.argmin(np.abs(np.log(betas / 0.1))))
    x_star = results["curves"]["1.0"]["argmax_x_t"][mid]
    shown = {}
    for ax, b in zip(axes, (max(0.01, float(betas[0])), 0.1, float(betas[-1])), strict=True):
        k = reverse_kernel_on_grid(x_star, grid, W, MU, SD, 1.0, b)
        fit = kl_to_best_gaussian_on_grid(k.log_prob, grid)
        mix = reverse_kernel_mixture_1d(x_star, W, MU, SD, 1.0, b)
        dens = np.exp(np.asarray(k.log_prob))
        g = np.asarray(grid)
        m, v = float(fit.mean), float(fit.var)
        sel = dens > 1e-4 * dens.max()
        ax.plot(g[sel], dens[sel], "k", lw=2, label="q(x_(t-1) | x_t), Bayes' rule on the grid")
        ax.plot(g[sel], np.exp(np.asarray(mix.log_prob(grid)))[sel], "y:", lw=2, label="closed-form mixture")
        ax.plot(g[sel], np.exp(-0.5 * (g[sel] - m) ** 2 / v) / np.sqrt(2 * np.pi * v), "tab:red", ls="--",
                label=f"best Gaussian: KL = {float(fit.kl):.2g}")
        ax.set_title(rf"t = 1, $\beta_t$ = {b:.3g}, $x_t$ = {x_star:+.2f}", fontsize=9)
        ax.set_xlabel("$x_{t-1}$")
        ax.legend(fontsize=7)
        shown[str(b)] = float(fit.kl)
    results["kernels_shown"] = {"x_t": x_star, "kl": shown}
    fig.tight_layout()
    save_png(fig, out / "feller_kernels.png")

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for ab, c in ((1.0, "tab:blue"), (0.5, "tab:green")):
        ax.loglog(betas, curves[ab], "o-", ms=3, color=c, label=rf"$\bar\alpha_{{t-1}}$ = {ab}")
    ref = curves[1.0][0] * (betas / betas[0]) ** 3
    ax.loglog(betas, ref, "k:", lw=1, label=r"$\propto\beta_t^3$")
    ax.set_xlabel(r"$\beta_t$")
    ax.set_ylabel(r"$\mathbb{E}_{x_t}$ KL(q($x_{t-1}|x_t$) || best Gaussian)")
    ax.set_title("how far the true reverse kernel is from Gaussian", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, out / "feller_kl.png")
    results["seconds"] = time.time() - t0
    write_json(out / "feller.json", results)
    print(f"wrote {', '.join(str(out / f) for f in FILES)} in {results['seconds']:.1f} s")
    return results


if __name__ == "__main__":
    main()
