r"""One Gaussian fitted to a two-Gaussian mixture by KL(p||q) and by KL(q||p) (MATH.md G1).

The opening question of the ``004_*`` notes: p is a mixture of two Gaussians, q a single Gaussian.

* **KL(p || q), mode covering.** KL(p||q) = -H(p) - E_p log q, and E_p log N(x; m, S) depends on
  p only through its first two moments, so the minimiser is moment matching (a closed form,
  ``probdiff.divergences.moment_match``): q sits between the modes, wide enough to cover both.
* **KL(q || p), mode seeking.** KL(q||p) = -H(q) - E_q log p punishes q wherever p is small, so q
  shrinks onto one mode. No closed form: ``probdiff.divergences.fit_reverse_kl`` runs Adam on the
  mean and log-std (the Cholesky factor in 2-D) with the KL evaluated by
  quadrature on a grid, from several starts. For well-separated modes there is a local minimum
  at each mode, with KL(q||p) just below -log w_k (p >= w_k N_k bounds it): the heavier mode wins,
  but a start near the lighter one stays there.

The script prints both fits with both KL values in both directions, the gradient norm and the
smallest Hessian eigenvalue at each reverse fit (> 0: a local minimum), in 1-D and in 2-D (the
notes' picture), and draws them. Expected output (defaults, about 70 s on 2 shared CPU cores,
mostly compiling): in 1-D, p = 0.35 N(-2.5, 0.7^2) + 0.65 N(2, 0.9^2); the forward fit is
N(0.425, 2.303^2) with KL(p||q) = 0.387 and KL(q||p) = 0.703; the reverse fits are
N(1.977, 0.933^2) (KL(q||p) = 0.424 <= -log 0.65 = 0.431; KL(p||q) = 3.41) and N(-2.472, 0.737^2)
(KL(q||p) = 1.039 <= -log 0.35 = 1.050; KL(p||q) = 11.4). The lighter mode's local minimum has a
larger KL(q||p) than the forward fit: a local minimum, not the global one. In 2-D
(0.5 N(mu_1, S_1) + 0.5 N(mu_2, S_2)) the forward fit has KL(p||q) = 0.577; the reverse fits find
both modes (KL(q||p) = 0.690 and 0.691, <= log 2) and, from 1 of 9 starts, a third local minimum
straddling both modes (KL(q||p) = 0.960, smallest Hessian eigenvalue 0.076 > 0). Figures
``kl_directions_1d.png``, ``kl_directions_2d.png`` and the numbers in ``kl_directions.json`` go to
``--out``.

Run: ``python examples/kl_directions.py --out out/kl_directions``, or tiny:
``python examples/kl_directions.py --tiny --out /tmp/kl``.
"""

from __future__ import annotations

import argparse
import math
import time
from functools import partial

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from probdiff._io import prepare_out_dir, write_json  # noqa: E402
from probdiff.divergences import (  # noqa: E402
    MixtureOfGaussians,
    fit_reverse_kl,
    kl_gaussian_mixture,
    kl_mixture_gaussian,
    moment_match,
)
from probdiff.plotting import save_png  # noqa: E402

FILES = ("kl_directions_1d.png", "kl_directions_2d.png", "kl_directions.json")

# sizes of a full run and of --tiny (used by the tests); a flag given explicitly wins
FULL = {"steps": 2000, "nodes": 801, "nodes_2d": 161, "starts": 9}
TINY = {"steps": 500, "nodes": 201, "nodes_2d": 41, "starts": 3}

P_1D = MixtureOfGaussians.from_stds([0.35, 0.65], [-2.5, 2.0], [0.7, 0.9])
P_2D = MixtureOfGaussians.create(
    [0.5, 0.5],
    [[-2.0, -1.0], [2.0, 1.5]],
    [[[0.6, 0.25], [0.25, 0.5]], [[0.5, -0.2], [-0.2, 0.8]]],
)


def both_kls(p, mean, cov, nodes):
    """(KL(p || q), KL(q || p)) for q = N(mean, cov)."""
    return (float(kl_mixture_gaussian(p, mean, cov, num_nodes=nodes)),
            float(kl_gaussian_mixture(mean, cov, p, num_nodes=nodes)))


def fit_all(p, starts, init_cov, args, nodes):
    """Forward fit, and reverse fits from every start, grouped into distinct local optima."""
    fwd_mean, fwd_cov = moment_match(p)
    fits = jax.jit(jax.vmap(lambda m: fit_reverse_kl(p, m, init_cov, steps=args.steps, num_nodes=nodes)))(starts)
    optima = []
    for i in range(starts.shape[0]):
        m = np.asarray(fits.mean[i])
        for o in optima:
            if np.max(np.abs(o["mean_np"] - m)) < 1e-2:
                o["starts"].append(np.asarray(starts[i]).tolist())
                break
        else:
            optima.append({"mean_np": m, "i": i, "starts": [np.asarray(starts[i]).tolist()]})
    rows = {"forward": _row(p, fwd_mean, fwd_cov, nodes)}
    rows["reverse"] = []
    for o in sorted(optima, key=lambda o: float(fits.kl[o["i"]])):
        i = o["i"]
        r = _row(p, fits.mean[i], fits.cov[i], nodes)
        r["grad_norm"] = float(fits.grad_norm[i])
        r["hessian_min_eig"] = hessian_min_eig(p, fits.mean[i], fits.cov[i], nodes)
        r["starts"] = o["starts"]
        dist = np.sqrt(np.sum((np.asarray(p.means) - np.asarray(fits.mean[i])) ** 2, 1))
        k = int(np.argmin(dist))
        # "at mode k" when the fit's mean lies within one standard deviation of component k's mean
        at_mode = dist[k] < math.sqrt(float(np.max(np.linalg.eigvalsh(np.asarray(p.covs[k])))))
        r["nearest_mode"] = k if at_mode else None
        r["minus_log_weight"] = -math.log(float(p.weights[k])) if at_mode else None
        rows["reverse"].append(r)
    return rows, fits


def hessian_min_eig(p, mean, cov, nodes):
    """Smallest eigenvalue of the Hessian of KL(q||p) in (m, Cholesky factor of S): > 0 at a local minimum."""
    rows, cols = np.tril_indices(mean.shape[0])
    v0 = jnp.concatenate([mean, jnp.linalg.cholesky(cov)[rows, cols]])
    return float(jnp.min(jnp.linalg.eigvalsh(_kl_hessian(p, v0, nodes))))


@partial(jax.jit, static_argnums=2)
def _kl_hessian(p, v0, nodes):
    D = p.means.shape[-1]
    rows, cols = np.tril_indices(D)

    def kl(v):
        L = jnp.zeros((D, D), v.dtype).at[rows, cols].set(v[D:])
        return kl_gaussian_mixture(v[:D], L @ L.T, p, num_nodes=nodes)

    return jax.hessian(kl)(v0)


def _row(p, mean, cov, nodes):
    kl_pq, kl_qp = both_kls(p, mean, cov, nodes)
    return {"mean": np.asarray(mean).tolist(), "cov": np.asarray(cov).tolist(),
            "kl_p_q": kl_pq, "kl_q_p": kl_qp}


def describe(r):
    m = np.asarray(r["mean"])
    c = np.asarray(r["cov"])
    if m.size == 1:
        return f"N({m[0]:.3f}, {math.sqrt(c[0, 0]):.3f}^2)"
    return f"N([{m[0]:.3f}, {m[1]:.3f}], [[{c[0, 0]:.3f}, {c[0, 1]:.3f}], [{c[1, 0]:.3f}, {c[1, 1]:.3f}]])"


def report(title, rows):
    print(title)
    f = rows["forward"]
    print(f"  KL(p||q) fit (moment matching): {describe(f)}   KL(p||q) = {f['kl_p_q']:.4f}   KL(q||p) = {f['kl_q_p']:.4f}")
    for r in rows["reverse"]:
        where = f"at mode {r['nearest_mode']}" if r["nearest_mode"] is not None else "between the modes"
        bound = f" (-log w = {r['minus_log_weight']:.4f})" if r["minus_log_weight"] is not None else ""
        print(f"  KL(q||p) local min {where} ({len(r['starts'])} starts): {describe(r)}   "
              f"KL(q||p) = {r['kl_q_p']:.4f}{bound}   KL(p||q) = {r['kl_p_q']:.4f}   "
              f"|grad| = {r['grad_norm']:.1e}, smallest Hessian eigenvalue {r['hessian_min_eig']:.3g}")


def plot_1d(p, rows, nodes):
    xx = np.linspace(-6.5, 6.5, 600)
    px = np.exp(np.asarray(p.log_prob(jnp.asarray(xx)[:, None])))
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    ax = axes[0]
    ax.fill_between(xx, px, color="0.85", label="p (mixture)")
    f = rows["forward"]

    def normal(m, v):
        return np.exp(-0.5 * (xx - m) ** 2 / v) / np.sqrt(2 * np.pi * v)

    ax.plot(xx, normal(f["mean"][0], f["cov"][0][0]), "tab:blue", lw=2,
            label=f"argmin KL(p||q): moments (KL(p||q) = {f['kl_p_q']:.2f})")
    for r, c in zip(rows["reverse"], ("tab:red", "tab:orange", "tab:purple", "tab:brown"), strict=False):
        ax.plot(xx, normal(r["mean"][0], r["cov"][0][0]), color=c, lw=2, ls="--",
                label=f"local min of KL(q||p) = {r['kl_q_p']:.2f}")
    ax.set_xlabel("x")
    ax.set_title("one Gaussian q fitted to a two-Gaussian mixture p", fontsize=9)
    ax.legend(fontsize=7, loc="upper left")

    # the two objectives along the mean, at the std of each fit
    ax = axes[1]
    ms = jnp.linspace(-5.0, 5.0, 201)
    s_rev = math.sqrt(rows["reverse"][0]["cov"][0][0])
    s_fwd = math.sqrt(f["cov"][0][0])
    kl_qp = jax.vmap(lambda m: kl_gaussian_mixture(m[None], jnp.eye(1) * s_rev**2, p, num_nodes=nodes))(ms)
    kl_pq = jax.vmap(lambda m: kl_mixture_gaussian(p, m[None], jnp.eye(1) * s_fwd**2, num_nodes=nodes))(ms)
    ax.plot(ms, kl_pq, "tab:blue", label=f"KL(p||q), std {s_fwd:.2f}: convex in m")
    ax.plot(ms, kl_qp, "tab:red", ls="--", label=f"KL(q||p), std {s_rev:.2f}: one minimum per mode")
    ax.set_ylim(0, 12)
    ax.set_xlabel("mean m of q")
    ax.set_ylabel("nats")
    ax.set_title("the two objectives as functions of q's mean", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_2d(p, rows, fits):
    g = np.linspace(-5, 5, 200)
    X, Y = np.meshgrid(g, g, indexing="ij")
    pts = jnp.asarray(np.stack([X.ravel(), Y.ravel()], -1))
    dens = np.exp(np.asarray(p.log_prob(pts))).reshape(X.shape)
    fig, ax = plt.subplots(figsize=(5.2, 4.8))
    ax.contourf(X, Y, dens, levels=12, cmap="Greys")
    t = np.linspace(0, 2 * np.pi, 200)
    circle = np.stack([np.cos(t), np.sin(t)])

    def ellipse(r, **kw):
        L = np.linalg.cholesky(np.asarray(r["cov"]))
        e = np.asarray(r["mean"])[:, None] + 2 * L @ circle
        ax.plot(e[0], e[1], **kw)

    ellipse(rows["forward"], color="tab:blue", lw=2, label=f"KL(p||q) fit, KL(p||q) = {rows['forward']['kl_p_q']:.2f}")
    for r, c in zip(rows["reverse"], ("tab:red", "tab:orange", "tab:purple", "tab:brown"), strict=False):
        ellipse(r, color=c, lw=2, ls="--", label=f"KL(q||p) local min, KL(q||p) = {r['kl_q_p']:.2f}")
    ax.set_aspect("equal")
    ax.set_xlabel("$x_1$")
    ax.set_ylabel("$x_2$")
    ax.set_title("2-sigma ellipses of the fits on p (grey)", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="a few seconds: tiny sizes (for tests)")
    p.add_argument("--steps", type=int, help=f"Adam steps per reverse-KL fit (default {FULL['steps']})")
    p.add_argument("--nodes", type=int, help=f"quadrature nodes in 1-D (default {FULL['nodes']})")
    p.add_argument("--nodes-2d", type=int, help=f"quadrature nodes per dimension in 2-D (default {FULL['nodes_2d']})")
    p.add_argument("--starts", type=int, help=f"starting means of the reverse-KL fits (default {FULL['starts']})")
    p.add_argument("--no-2d", action="store_true", help="skip the 2-D part")
    p.add_argument("--out", default="out/kl_directions")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    for k, v in (TINY if args.tiny else FULL).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.starts < 2 or args.steps < 1:
        p.error("--starts must be >= 2 and --steps >= 1")
    out = prepare_out_dir(args.out, FILES, overwrite=args.overwrite)
    t0 = time.time()

    starts_1d = jnp.linspace(-5.0, 5.0, args.starts)[:, None]
    rows_1d, _ = fit_all(P_1D, starts_1d, jnp.eye(1), args, args.nodes)
    report("1-D: p = 0.35 N(-2.5, 0.7^2) + 0.65 N(2, 0.9^2)", rows_1d)
    save_png(plot_1d(P_1D, rows_1d, args.nodes), out / "kl_directions_1d.png")
    results = {"config": vars(args), "one_d": rows_1d}

    if not args.no_2d:
        angles = jnp.linspace(0.0, 2 * jnp.pi, args.starts, endpoint=False)
        starts_2d = 4.0 * jnp.stack([jnp.cos(angles), jnp.sin(angles)], -1)
        rows_2d, fits = fit_all(P_2D, starts_2d, jnp.eye(2), args, args.nodes_2d)
        report("2-D: p = 0.5 N(mu_1, S_1) + 0.5 N(mu_2, S_2)", rows_2d)
        results["two_d"] = rows_2d
        fig = plot_2d(P_2D, rows_2d, fits)
    else:
        fig = plt.figure()
    save_png(fig, out / "kl_directions_2d.png")
    results["seconds"] = time.time() - t0
    write_json(out / "kl_directions.json", results)
    print(f"wrote {', '.join(str(out / f) for f in FILES)} in {results['seconds']:.1f} s")
    return results


if __name__ == "__main__":
    main()
