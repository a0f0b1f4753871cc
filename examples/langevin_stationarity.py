r"""Langevin dynamics leaves p stationary (MATH.md E1) and needs no normalising constant (D1).

One Langevin step, in the notes' notation, is

    x <- x + eta/2 grad log p(x) + sqrt(eta) eps,        eps ~ N(0, I),

the Euler-Maruyama step of the Langevin SDE dx = 1/2 grad log p(x) dt + dw. Its Fokker-Planck
equation d p_t/dt = div(1/2 p_t grad log p_t - 1/2 p_t grad log p) = 1/2 div(p_t grad log(p_t / p))
vanishes at p_t = p: **p is stationary** (E1), and any start flows toward it. The discrete step is
exact only as eta -> 0. ULA (``probdiff.infer.ULA``) takes the step as it is; MALA
(``probdiff.infer.MALA``) uses it as a Metropolis-Hastings proposal, which makes p exactly
stationary at every eta. On N(0, 1) the ULA step is x' = (1 - eta/2) x + sqrt(eta) eps, so the
variance obeys v_n = (1 - eta/2)^2 v_{n-1} + eta and settles at

    v_eta = 1 / (1 - eta/4)                (not 1: ULA's stationary law p_eta is biased by O(eta)).

The step only uses grad log p, and MALA's acceptance ratio p(x')/p(x) only differences of log p,
so for an energy-based model p(x) = exp(-E(x)) / Z the unknown log Z never enters (D1): with
``potential_fn = E + c`` the chains are the same for every constant c.

The script has two parts.

(a) E1 on a 1-D two-component mixture p = 0.3 N(-1.5, 0.6^2) + 0.7 N(1.5, 0.7^2), whose CDF is
    exact. Many chains start (i) exactly at draws of p and (ii) at the point mass x = -3.5; ULA
    and MALA run with the same eta. The figure shows the histograms over chains at steps 0, k and
    10k against the exact density; the Kolmogorov-Smirnov distance sup_x |F_n(x) - F(x)| over
    chains is computed at every step (its noise floor for n exact draws is about 0.87/sqrt(n)).
    Then ULA and MALA start at exact N(0, 1) draws for a few eta: ULA's variance drifts to
    1 / (1 - eta/4), MALA's stays at 1.
(b) D1 on a tilted ring, E(x) = (|x| - 2)^2 / (2 * 0.3^2) - x_1 / 2, known only up to log Z.
    MALA runs on E, on E + log Z (the exactly normalised -log p, with log Z from quadrature on a
    grid) and on E + 100, from the same start and key, with 1000 steps of burn-in. The grid also
    gives the exact moments E[x_1], E[x_1^2], E[x_2^2], E|x|, which the samples reproduce within a
    few standard errors (from numpyro's effective sample size).

Expected output (defaults, about 35 s on 2 shared CPU cores, most of it JAX compiling the eleven
MCMC runs; measured on 2026-11-21): with 3000 chains per start the KS noise floor is 0.016
(95% quantile 0.025). From p the KS distance stays there at steps 0, 100 and 1000 (ULA 0.017,
0.019, 0.021; MALA 0.017, 0.013, 0.013); from the point mass it falls from 1.00 to 0.51 at
step 100 and to the floor by step 1000 (ULA 0.023, MALA 0.010). ULA's variance on N(0, 1) is
1.063, 1.144, 1.335 (± 0.004) at eta = 0.25, 0.5, 1 against the closed form 1.067, 1.143, 1.333;
MALA's is 0.997, 1.001, 1.001. On the ring, log Z = 2.498, and the sample moments of all three
runs match the quadrature ones within one standard error (E[x_1] 0.955 ± 0.015 against 0.956,
E|x| 2.0654 ± 0.0004 against 2.0650). The runs on E and E + log Z are identical; on E + 100, 2 of
6000 chains part from the others: float32 rounds E + 100 to about 1e-5, which once in a few
million steps flips an accept/reject decision (in exact arithmetic they would be identical
too). Files: ``stationarity.png``, ``ebm.png``, ``metrics.json`` in ``--out``.

Run: ``python examples/langevin_stationarity.py --out out/langevin_stationarity``, or tiny:
``python examples/langevin_stationarity.py --tiny --out /tmp/ls``.
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
from jax.scipy.special import logsumexp  # noqa: E402
from jax.scipy.stats import norm  # noqa: E402
from numpyro.diagnostics import effective_sample_size  # noqa: E402
from numpyro.infer import MCMC  # noqa: E402

from probdiff._io import prepare_out_dir, write_json  # noqa: E402
from probdiff.infer import MALA, ULA  # noqa: E402
from probdiff.plotting import save_png  # noqa: E402

FILES = ("stationarity.png", "ebm.png", "metrics.json")

# sizes of a full run and of --tiny (used by the tests); a flag given explicitly wins
FULL = {"chains": 3000, "steps": 1000, "etas": [0.25, 0.5, 1.0], "var_steps": 200,
        "ebm_burn": 1000, "ebm_samples": 200}
TINY = {"chains": 200, "steps": 50, "etas": [0.5], "var_steps": 60,
        "ebm_burn": 50, "ebm_samples": 50}

# ----------------------------------------------------------------------------- (a) a 1-D mixture
W = np.array([0.3, 0.7])
MU = np.array([-1.5, 1.5])
SD = np.array([0.6, 0.7])
X_START = -3.5  # the point mass, in the tail of the lighter mode


def mixture_log_prob(x):
    """log p(x) = log sum_k w_k N(x; mu_k, sd_k^2), for scalar x."""
    return logsumexp(jnp.log(W) + norm.logpdf(x, MU, SD))


def mixture_cdf(x):
    return np.sum(W * np.asarray(norm.cdf(np.asarray(x, np.float64)[..., None], MU, SD)), -1)


def mixture_potential(z):
    """U(z) = -log p(z) for z of shape (1,)."""
    return -mixture_log_prob(z[0])


def mixture_sample(key, n):
    k1, k2 = jax.random.split(key)
    c = jax.random.choice(k1, 2, (n,), p=jnp.asarray(W))
    return jnp.asarray(MU)[c] + jnp.asarray(SD)[c] * jax.random.normal(k2, (n,))


def ks_by_step(xs, cdf):
    """sup_x |F_n(x) - F(x)| over the chains (axis 0), for every step (axis 1)."""
    xs = np.sort(np.asarray(xs, np.float64), axis=0)
    n = xs.shape[0]
    f = cdf(xs)
    i = np.arange(1, n + 1)[:, None]
    return np.maximum(np.max(i / n - f, 0), np.max(f - (i - 1) / n, 0))


def run_chains(kernel, key, init, steps, *, burn=0, extra_fields=()):
    """Vectorised chains: x after each of ``steps`` steps, shape (chains, steps) + event."""
    mcmc = MCMC(kernel, num_warmup=burn, num_samples=steps, num_chains=init.shape[0],
                chain_method="vectorized", progress_bar=False)
    mcmc.run(key, init_params=init, extra_fields=extra_fields)
    return mcmc


def part_a(args, key):
    k_p, k_ula, k_mala, k_var = jax.random.split(key, 4)
    n, steps = args.chains, args.steps
    snaps = [0, steps // 10, steps]  # steps 0, k and 10k
    # one run of 2n chains per kernel: n start at draws of p, n at the point mass
    init = jnp.concatenate([mixture_sample(k_p, n), jnp.full((n,), X_START)])[:, None]
    runs = {}
    for name, kernel, k in (("ULA", ULA(potential_fn=mixture_potential, step_size=args.eta), k_ula),
                            ("MALA", MALA(potential_fn=mixture_potential, step_size=args.eta,
                                          adapt_step_size=False), k_mala)):
        mcmc = run_chains(kernel, k, init, steps, extra_fields=("accept_prob",))
        xs = np.asarray(mcmc.get_samples(group_by_chain=True))[..., 0]  # (2n, steps)
        xs = np.concatenate([np.asarray(init), xs], axis=1)  # column s is x after s steps
        acc = float(np.mean(mcmc.get_extra_fields()["accept_prob"]))
        runs[name] = {"from_p": xs[:n], "from_point_mass": xs[n:], "accept": acc}

    mean = float(np.sum(W * MU))
    var = float(np.sum(W * (SD**2 + MU**2)) - mean**2)
    results = {"k": snaps[1], "snapshot_steps": snaps, "eta": args.eta, "chains": n,
               "exact_mean": mean, "exact_var": var,
               "ks_noise_floor_mean": 0.8687 / math.sqrt(n),  # E sup|F_n - F| -> sqrt(pi/2) ln 2 / sqrt(n)
               "ks_noise_floor_95": 1.358 / math.sqrt(n)}
    ks_curves = {}
    for name, r in runs.items():
        out = {"accept_prob": r["accept"]}
        for start in ("from_p", "from_point_mass"):
            ks = ks_by_step(r[start], mixture_cdf)
            ks_curves[name, start] = ks
            xs = r[start]
            out[start] = {
                "ks": [float(ks[s]) for s in snaps],
                "mean_error": [float(xs[:, s].mean() - mean) for s in snaps],
                "var": [float(xs[:, s].var()) for s in snaps],
            }
        results[name] = out

    # ULA's biased stationary law on N(0, 1) against its closed form; MALA is exact
    def std_normal(z):
        return 0.5 * jnp.sum(z**2)

    burn = args.var_steps // 4
    # 2n chains again: the same shapes as above, so JAX reuses the compiled set-up code
    x0 = jax.random.normal(jax.random.fold_in(k_var, 0), (2 * n, 1))
    variance = {"eta": args.etas, "closed_form_ula": [1.0 / (1.0 - e / 4.0) for e in args.etas]}
    transient = {}
    for name in ("ULA", "MALA"):
        vs, ses = [], []
        for j, eta in enumerate(args.etas):
            kernel = ULA(potential_fn=std_normal, step_size=eta) if name == "ULA" else \
                MALA(potential_fn=std_normal, step_size=eta, adapt_step_size=False)
            xs = np.asarray(run_chains(kernel, jax.random.fold_in(k_var, j + 1), x0, args.var_steps)
                            .get_samples(group_by_chain=True))[..., 0]
            sq = xs[:, burn:] ** 2
            vs.append(float(sq.mean()))
            ses.append(float(sq.std() / math.sqrt(float(effective_sample_size(sq[..., None])[0]))))
            transient[name, eta] = np.concatenate([[float(np.mean(np.asarray(x0) ** 2))], (xs**2).mean(0)])
        variance[name] = vs
        variance[name + "_se"] = ses
    variance["burn_in"] = burn
    variance["chains"] = 2 * n
    variance["steps"] = args.var_steps
    results["variance_on_standard_normal"] = variance
    return results, runs, ks_curves, transient


def plot_a(results, runs, ks_curves, transient, args):
    snaps = results["snapshot_steps"]
    xx = np.linspace(-4.5, 4.5, 400)
    px = np.exp(np.asarray(jax.vmap(mixture_log_prob)(jnp.asarray(xx))))
    bins = np.linspace(-4.5, 4.5, 61)
    colors = ("tab:blue", "tab:orange", "tab:green")
    fig, axes = plt.subplots(2, 3, figsize=(13, 7.2))

    def hist_panel(ax, name, start, title):
        for s, c in zip(snaps, colors, strict=True):
            ks = results[name][start]["ks"][snaps.index(s)]
            ax.hist(runs[name][start][:, s], bins=bins, density=True, histtype="step", lw=1.3, color=c,
                    label=f"step {s}: KS {ks:.3f}")
        ax.plot(xx, px, "k--", lw=1.2, label="exact p")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("x")
        ax.legend(fontsize=7, loc="upper left")

    eta = results["eta"]
    hist_panel(axes[0, 0], "ULA", "from_p", rf"ULA, $\eta$={eta}, chains started at draws of p")
    hist_panel(axes[0, 1], "MALA", "from_p", rf"MALA, $\eta$={eta}, chains started at draws of p")
    hist_panel(axes[1, 0], "MALA", "from_point_mass", rf"MALA, $\eta$={eta}, chains started at x = {X_START}")
    axes[1, 0].set_ylim(0, 1.0)

    ax = axes[0, 2]
    num = len(next(iter(ks_curves.values())))
    s = np.unique(np.geomspace(1, num, 150).astype(int)) - 1  # log-spaced steps
    for (name, start), ks in ks_curves.items():
        ls = "-" if start == "from_p" else "--"
        ax.plot(s + 1, ks[s], ls, lw=1, color="tab:blue" if name == "ULA" else "tab:red",
                label=f"{name}, {start.replace('_', ' ')}")
    ax.axhline(results["ks_noise_floor_mean"], color="0.4", lw=0.8, ls=":", label="noise floor (exact draws)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("step + 1")
    ax.set_ylabel(r"KS distance $\sup_x|F_n(x)-F(x)|$")
    ax.set_title(f"KS distance to p over {results['chains']} chains", fontsize=9)
    ax.legend(fontsize=7)

    v = results["variance_on_standard_normal"]
    ax = axes[1, 1]
    ee = np.linspace(0.0, max(v["eta"]) * 1.1, 100)
    ax.plot(ee, 1 / (1 - ee / 4), "k--", lw=1, label=r"ULA closed form $1/(1-\eta/4)$")
    ax.errorbar(v["eta"], v["ULA"], yerr=2 * np.array(v["ULA_se"]), fmt="o", color="tab:blue", label="ULA (±2 SE)")
    ax.errorbar(v["eta"], v["MALA"], yerr=2 * np.array(v["MALA_se"]), fmt="s", color="tab:red", label="MALA (±2 SE)")
    ax.axhline(1.0, color="0.5", lw=0.8)
    ax.set_xlabel(r"step size $\eta$")
    ax.set_ylabel("stationary variance")
    ax.set_title("p = N(0, 1): ULA's stationary law is biased, MALA's is not", fontsize=9)
    ax.legend(fontsize=7)

    ax = axes[1, 2]
    eta_t = 0.5 if 0.5 in v["eta"] else v["eta"][-1]
    n_t = len(transient["ULA", eta_t])
    v_n = [1.0]
    for _ in range(n_t - 1):
        v_n.append((1 - eta_t / 2) ** 2 * v_n[-1] + eta_t)
    ax.plot(transient["ULA", eta_t], color="tab:blue", lw=1, label="ULA, mean of $x^2$ over chains")
    ax.plot(v_n, "k--", lw=1, label=r"$v_n=(1-\eta/2)^2v_{n-1}+\eta$, $v_0=1$")
    ax.plot(transient["MALA", eta_t], color="tab:red", lw=1, label="MALA")
    ax.set_xlabel("step n")
    ax.set_ylabel("variance")
    ax.set_title(rf"started exactly at p = N(0, 1), $\eta$ = {eta_t}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------- (b) an energy-based model
R_RING, S_RING, TILT = 2.0, 0.3, 0.5


def ring_energy(z):
    """E(x) = (|x| - 2)^2 / (2 * 0.3^2) - x_1 / 2: p(x) = exp(-E(x)) / Z with Z unknown."""
    r = jnp.sqrt(jnp.sum(z**2))
    return (r - R_RING) ** 2 / (2 * S_RING**2) - TILT * z[0]


def ring_quadrature(half_width=4.0, points=801):
    """log Z and the exact moments of p = exp(-E) / Z by the midpoint rule on a grid."""
    g = np.linspace(-half_width, half_width, points)
    h = g[1] - g[0]
    x1, x2 = np.meshgrid(g, g, indexing="ij")
    r = np.sqrt(x1**2 + x2**2)
    e = (r - R_RING) ** 2 / (2 * S_RING**2) - TILT * x1
    w = np.exp(-(e - e.min()))
    log_z = float(np.log(w.sum() * h * h) - e.min())
    w = w / w.sum()
    moments = {"E[x1]": x1, "E[x2]": x2, "E[x1^2]": x1**2, "E[x2^2]": x2**2, "E|x|": r}
    return log_z, {k: float(np.sum(w * f)) for k, f in moments.items()}, (g, np.exp(-e))


def sample_moments(z):
    """Sample moments of z (chains, draws, 2) with standard errors from the effective sample size."""
    x1, x2 = z[..., 0], z[..., 1]
    fs = {"E[x1]": x1, "E[x2]": x2, "E[x1^2]": x1**2, "E[x2^2]": x2**2, "E|x|": np.hypot(x1, x2)}
    out = {}
    for k, f in fs.items():
        ess = float(effective_sample_size(np.asarray(f, np.float64)[..., None])[0])
        out[k] = (float(f.mean()), float(f.std() / math.sqrt(ess)))
    return out


def part_b(args, key):
    log_z, exact, grid = ring_quadrature()
    k_init, k_run = jax.random.split(key)
    # 2n chains, as in part (a): JAX reuses the set-up code compiled for that many chains
    init = jax.random.uniform(k_init, (2 * args.chains, 2), minval=-3.0, maxval=3.0)
    draws = {}
    accept = {}
    for label, c in (("E", 0.0), ("E + log Z", log_z), ("E + 100", 100.0)):
        kernel = MALA(potential_fn=lambda z, c=c: ring_energy(z) + c, step_size=args.ebm_eta, adapt_step_size=False)
        mcmc = run_chains(kernel, k_run, init, args.ebm_samples, burn=args.ebm_burn, extra_fields=("accept_prob",))
        draws[label] = np.asarray(mcmc.get_samples(group_by_chain=True))
        accept[label] = float(np.mean(mcmc.get_extra_fields()["accept_prob"]))
    ref = draws["E"]
    results = {"log_Z_quadrature": log_z, "eta": args.ebm_eta, "chains": 2 * args.chains,
               "burn_in": args.ebm_burn, "samples_per_chain": args.ebm_samples, "exact_moments": exact, "runs": {}}
    for label, z in draws.items():
        diff = np.abs(z - ref).max(axis=(1, 2))  # per chain
        m = sample_moments(z)
        results["runs"][label] = {
            "accept_prob": accept[label],
            "moments": {k: v[0] for k, v in m.items()},
            "moments_se": {k: v[1] for k, v in m.items()},
            "z_scores": {k: (m[k][0] - exact[k]) / m[k][1] for k in exact},
            "max_abs_diff_vs_E": float(diff.max()),
            "chains_differing_from_E_run": int(np.sum(diff >= 1e-4)),
        }
    return results, draws, grid


def plot_b(results, draws, grid):
    g, dens = grid
    h = g[1] - g[0]
    fig, axes = plt.subplots(1, 3, figsize=(12.5, 4.2))
    levels = dens.max() * np.exp(-np.array([6.0, 4.0, 2.0, 1.0, 0.5, 0.1]))  # log-spaced contours
    for ax, label in zip(axes[:2], ("E", "E + 100"), strict=True):
        pts = draws[label][:, -1]  # the last draw of every chain
        ax.contour(g, g, dens.T, levels=levels, colors="k", linewidths=0.6)
        ax.scatter(pts[:, 0], pts[:, 1], s=3, alpha=0.6, color="tab:purple", linewidths=0)
        r = results["runs"][label]
        ax.set_title(f"MALA on the potential {label}: last draw of each chain\n"
                     f"chains that differ from the run on E: {r['chains_differing_from_E_run']} of {results['chains']}",
                     fontsize=8)
        ax.set_aspect("equal")
        ax.set_xlim(-3.2, 3.2)
        ax.set_ylim(-3.2, 3.2)
        ax.set_xlabel("$x_1$")
    axes[0].set_ylabel("$x_2$")
    ax = axes[2]
    bins = np.linspace(-3.2, 3.2, 65)
    for label, c in zip(draws, ("tab:purple", "tab:green", "tab:orange"), strict=True):
        ax.hist(draws[label][..., 0].ravel(), bins=bins, density=True, histtype="step", lw=1.2, color=c,
                label=f"MALA on {label}: " + r"$E[x_1]$" + f" = {results['runs'][label]['moments']['E[x1]']:.3f}")
    marginal = dens.sum(1) / (dens.sum() * h)
    ax.plot(g, marginal, "k--", lw=1, label=f"quadrature: {results['exact_moments']['E[x1]']:.3f}")
    ax.set_xlabel("$x_1$")
    ax.set_title(r"marginal of $x_1$: samples against quadrature on a grid", fontsize=8)
    ax.legend(fontsize=7, loc="upper left")
    fig.suptitle(r"energy-based model $p(x)=e^{-E(x)}/Z$, $E(x)=(|x|-2)^2/(2\cdot 0.3^2)-x_1/2$; "
                 f"log Z = {results['log_Z_quadrature']:.3f} is never used by the sampler", fontsize=9)
    fig.tight_layout()
    return fig


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="a few seconds: tiny sizes (for tests)")
    p.add_argument("--chains", type=int, help=f"n: n chains start at p, n at the point mass (default {FULL['chains']})")
    p.add_argument("--steps", type=int, help=f"10k, the last snapshot (default {FULL['steps']})")
    p.add_argument("--eta", type=float, default=0.05, help="eta for ULA and MALA in part (a)")
    p.add_argument("--etas", type=float, nargs="+", help=f"eta on N(0, 1) (default {FULL['etas']})")
    p.add_argument("--var-steps", type=int, help=f"steps on N(0, 1), a quarter of them burn-in (default {FULL['var_steps']})")
    p.add_argument("--ebm-eta", type=float, default=0.1, help="MALA's fixed eta on the ring")
    p.add_argument("--ebm-burn", type=int)
    p.add_argument("--ebm-samples", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="out/langevin_stationarity")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    for k, v in (TINY if args.tiny else FULL).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.steps < 10 or args.chains < 2:
        p.error("--steps must be >= 10 and --chains >= 2")
    out = prepare_out_dir(args.out, FILES, overwrite=args.overwrite)

    t0 = time.time()
    key_a, key_b = jax.random.split(jax.random.key(args.seed))
    res_a, runs, ks_curves, transient = part_a(args, key_a)
    fig = plot_a(res_a, runs, ks_curves, transient, args)
    save_png(fig, out / "stationarity.png")
    res_b, draws, grid = part_b(args, key_b)
    fig = plot_b(res_b, draws, grid)
    save_png(fig, out / "ebm.png")

    print(f"(a) E1 on 0.3 N(-1.5, 0.6^2) + 0.7 N(1.5, 0.7^2), eta = {args.eta}, {args.chains} chains; "
          f"KS noise floor {res_a['ks_noise_floor_mean']:.4f} (95%: {res_a['ks_noise_floor_95']:.4f})")
    for name in ("ULA", "MALA"):
        for start in ("from_p", "from_point_mass"):
            r = res_a[name][start]
            cells = ", ".join(f"step {s}: KS {ks:.4f} var {v:.3f}"
                              for s, ks, v in zip(res_a["snapshot_steps"], r["ks"], r["var"], strict=True))
            print(f"  {name:4s} {start:16s} {cells}   (exact var {res_a['exact_var']:.3f})")
    v = res_a["variance_on_standard_normal"]
    print("    N(0, 1): eta | ULA variance | closed form 1/(1 - eta/4) | MALA variance")
    for j, eta in enumerate(v["eta"]):
        print(f"    {eta:5.2f} | {v['ULA'][j]:.4f} ± {v['ULA_se'][j]:.4f} | {v['closed_form_ula'][j]:.4f} "
              f"| {v['MALA'][j]:.4f} ± {v['MALA_se'][j]:.4f}")
    print(f"(b) D1 on the tilted ring: log Z = {res_b['log_Z_quadrature']:.4f} by quadrature; "
          f"MALA eta = {args.ebm_eta}, {2 * args.chains} chains x {args.ebm_samples} draws")
    for label, r in res_b["runs"].items():
        cells = ", ".join(f"{k} {r['moments'][k]:.4f}±{r['moments_se'][k]:.4f} (exact {res_b['exact_moments'][k]:.4f})"
                          for k in res_b["exact_moments"])
        print(f"  {label:10s} accept {r['accept_prob']:.3f}; {cells}")
        print(f"  {'':10s} chains that differ from the run on E: {r['chains_differing_from_E_run']} "
              f"of {res_b['chains']} (largest difference {r['max_abs_diff_vs_E']:.2e})")
    results = {"config": vars(args), "stationarity": res_a, "energy_based_model": res_b,
               "seconds": time.time() - t0}
    write_json(out / "metrics.json", results)
    print(f"wrote {', '.join(str(out / f) for f in FILES)} in {results['seconds']:.1f} s")
    return results


if __name__ == "__main__":
    main()
