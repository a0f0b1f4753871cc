r"""Annealed against plain Langevin dynamics on a mixture with separated modes (MATH.md D1, D4).

Data: p = 0.2 N((-4, 0), 0.5^2 I) + 0.3 N((4, 0), 0.5^2 I) + 0.5 N((0, 5), 0.5^2 I), three
modes 6.4 to 8 apart and unequal weights. Convolving with N(0, sigma^2 I) keeps it a mixture,

    p_sigma(x) = sum_k w_k N(x; mu_k, (0.5^2 + sigma^2) I),

so the score s(x, sigma) = grad_x log p_sigma(x) is exact here (``jax.grad`` of that log-density):
no network, only the sampler is on trial.

* **Plain Langevin** (D1) runs x <- x + eta/2 grad log p(x) + sqrt(eta) eps on the data score
  (sigma = 0.01, so p_sigma is p) from a broad start x ~ N(0, 10^2 I). Each chain rolls into the
  basin it starts in and, with valleys between the modes at most e^{-20} of their peaks, never
  leaves: the samples look right locally, but the mode weights are those of the basins of the
  start, not w.
* **Annealed Langevin** (D4, NCSN's Algorithm 1, ``probdiff.samplers.annealed_langevin``) runs
  the same step on s(x, sigma_i) for the levels i = L, ..., 1 of a ladder
  sigma_1 < ... < sigma_L, with step alpha_i = epsilon sigma_i^2 / sigma_1^2 and T steps per level,
  starting from N(0, sigma_L^2 I). At sigma_L = 10 the modes are merged into one broad bump, so
  the chains spread over them in proportion to their weights; as sigma shrinks each chain is
  refined inside its mode. A final Tweedie step x + sigma_1^2 s(x, sigma_1) removes the sigma_1
  noise (``denoise=True``).

Both take the same number of Langevin steps (L T = 1000). The script reports the squared MMD
(``probdiff.data.mmd_rbf``, Gaussian kernel of bandwidth 1) of each to exact samples, next to the
MMD of pairs of exact sample sets (the noise floor: the unbiased estimator scatters around 0),
and the mode weights (the share of samples nearest to each mu_k) against w, with binomial
standard errors sqrt(w (1 - w) / n).

Expected output (defaults, about 10 s on 2 shared CPU cores; measured on 2026-11-21): annealed
MMD^2 -0.0002, inside the noise floor (five null MMD^2 between -0.0005 and 0.0003); plain MMD^2
0.053, a hundred times the floor. Plain Langevin's mode weights are those of the basins of its
start, 0.37 / 0.37 / 0.27 against w = 0.2 / 0.3 / 0.5. Annealed Langevin's are 0.21 / 0.32 / 0.47
(binomial SE 0.01): close, but the heaviest mode is short by about 2.5% on every seed (with
24000 samples: 0.216 / 0.308 / 0.477). That is the schedule, not the sample size: the weights
are settled at the levels where the modes separate (sigma between 1 and 5 here), and 100 steps of
epsilon = 5e-5 there are too short a Langevin time to balance the mass between them. Three times
the steps (``--steps-per-level 300``: 0.206 / 0.304 / 0.491) or twice the levels (``--levels 20``:
0.207 / 0.300 / 0.494) remove most of it; a larger epsilon instead makes it worse (1.5e-4:
0.222 / 0.309 / 0.469, ULA's own O(eta) bias). Files: ``annealed_langevin.png`` (samples next
to exact samples, and the mode weights), ``trajectory.png`` (the annealed chains at the end of
some levels) and ``metrics.json`` in ``--out``.

Run: ``python examples/annealed_langevin.py --out out/annealed_langevin``, or tiny:
``python examples/annealed_langevin.py --tiny --out /tmp/al``.
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

from probdiff import analytic, samplers  # noqa: E402
from probdiff._io import prepare_out_dir, write_json  # noqa: E402
from probdiff.data import mmd_rbf  # noqa: E402
from probdiff.plotting import save_png  # noqa: E402

FILES = ("annealed_langevin.png", "trajectory.png", "metrics.json")

# sizes of a full run and of --tiny (used by the tests); a flag given explicitly wins. Tiny keeps
# the ladder and the step sizes and takes fewer steps per level, so its epsilon is raised.
FULL = {"n": 2000, "steps_per_level": 100, "step_size": 5e-5, "null_pairs": 5}
TINY = {"n": 400, "steps_per_level": 20, "step_size": 2.5e-4, "null_pairs": 2}

# three separated modes, weights 0.2 / 0.3 / 0.5, scale 0.5; its score at every sigma is exact:
# s(x, sigma) = sum_k r_k(x) (mu_k - x) / (0.5^2 + sigma^2)
MIXTURE = analytic.GaussianMixture.three_modes()
MU, W = MIXTURE.means, MIXTURE.weights
BANDWIDTH = 1.0  # MMD kernel scale: between one component's spread (0.5) and the gaps (8)
mixture_score = MIXTURE.score
mixture_samples = MIXTURE.sample
mode_weights = MIXTURE.mode_weights


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="a few seconds: tiny sizes (for tests)")
    p.add_argument("--n", type=int, help=f"samples per method (default {FULL['n']})")
    p.add_argument("--levels", type=int, default=10, help="L, the noise levels (default 10)")
    p.add_argument("--sigma-min", type=float, default=0.01, help="sigma_1 (default 0.01)")
    p.add_argument("--sigma-max", type=float, default=10.0, help="sigma_L (default 10)")
    p.add_argument("--steps-per-level", type=int, help=f"T (default {FULL['steps_per_level']})")
    p.add_argument("--step-size", type=float, help=f"epsilon, the step at sigma_1 (default {FULL['step_size']})")
    p.add_argument("--plain-step-size", type=float, default=0.05, help="eta of plain Langevin (default 0.05)")
    p.add_argument("--null-pairs", type=int, help="pairs of exact sample sets for the noise floor")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="out/annealed_langevin")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    for k, v in (TINY if args.tiny else FULL).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.n < 2 or args.levels < 2 or args.steps_per_level < 1 or args.null_pairs < 1:
        p.error("need --n >= 2, --levels >= 2, --steps-per-level >= 1 and --null-pairs >= 1")
    if not 0 < args.sigma_min < args.sigma_max:
        p.error("need 0 < --sigma-min < --sigma-max")
    out = prepare_out_dir(args.out, FILES, overwrite=args.overwrite)

    t0 = time.time()
    k_ann, k_plain, k_init, k_exact, k_null = jax.random.split(jax.random.key(args.seed), 5)
    n, num_steps = args.n, args.levels * args.steps_per_level
    sigmas = jnp.geomspace(args.sigma_min, args.sigma_max, args.levels)

    annealed = samplers.annealed_langevin(mixture_score, sigmas, step_size=args.step_size,
                                          steps_per_level=args.steps_per_level, denoise=True)
    res = jax.jit(lambda k: samplers.run(annealed, k, (n, 2), return_trajectory=True))(k_ann)
    x_annealed, trajectory = np.asarray(res.x), np.asarray(res.trajectory)

    # plain Langevin: one level at sigma_1, as many steps, from N(0, sigma_L^2 I) as well
    plain = samplers.annealed_langevin(mixture_score, sigmas[:1], step_size=args.plain_step_size,
                                       steps_per_level=num_steps)
    x0 = args.sigma_max * jax.random.normal(k_init, (n, 2))
    x_plain = np.asarray(jax.jit(lambda k: samplers.run(plain, k, (n, 2), x_init=x0))(k_plain))

    exact = mixture_samples(k_exact, n)
    null = [float(mmd_rbf(mixture_samples(jax.random.fold_in(k_null, 2 * i), n),
                          mixture_samples(jax.random.fold_in(k_null, 2 * i + 1), n), BANDWIDTH))
            for i in range(args.null_pairs)]
    w = np.asarray(W)
    results = {
        "n": n, "sigmas": [float(s) for s in sigmas], "bandwidth": BANDWIDTH,
        "true_weights": w.tolist(),
        "weight_se": np.sqrt(w * (1 - w) / n).tolist(),
        "mmd2_null": null,
        "mmd2_noise_floor": float(np.max(np.abs(null))),
    }
    for name, x in (("annealed", x_annealed), ("plain", x_plain)):
        results[name] = {"mmd2": float(mmd_rbf(jnp.asarray(x), exact, BANDWIDTH)),
                         "mode_weights": mode_weights(x).tolist(),
                         "score_evaluations": num_steps}
    results["seconds"] = time.time() - t0

    # ---------------------------------------------------------------- figures
    exact_np = np.asarray(exact)
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.9), gridspec_kw={"width_ratios": [1, 1, 1, 1.15]})
    panels = (("exact samples", exact_np, "0.3", None),
              (f"annealed Langevin, L = {args.levels}, T = {args.steps_per_level}", x_annealed, "tab:blue", "annealed"),
              (rf"plain Langevin, $\eta$ = {args.plain_step_size}, {num_steps} steps", x_plain, "tab:red", "plain"))
    for ax, (title, x, color, key) in zip(axes, panels, strict=False):
        ax.scatter(x[:, 0], x[:, 1], s=2, alpha=0.4, color=color, linewidths=0)
        if key is not None:
            title += f"\nMMD$^2$ to exact samples {results[key]['mmd2']:.4f}"
        else:
            title += f"\nMMD$^2$ of two exact sets: |.| <= {results['mmd2_noise_floor']:.4f}"
        ax.set_title(title, fontsize=8)
        ax.set_xlim(-7, 7)
        ax.set_ylim(-4, 8)
        ax.set_aspect("equal")
    ax = axes[3]
    k = np.arange(len(w))
    ax.bar(k - 0.27, w, 0.27, color="0.5", label="true weight $w_k$")
    for off, name, color in ((0.0, "annealed", "tab:blue"), (0.27, "plain", "tab:red")):
        ax.bar(k + off, results[name]["mode_weights"], 0.27, color=color, label=name,
               yerr=2 * np.asarray(results["weight_se"]), capsize=2)
    ax.set_xticks(k, [f"mode {i + 1}\n({float(m[0]):g}, {float(m[1]):g})" for i, m in enumerate(MU)], fontsize=8)
    ax.set_ylabel("share of samples nearest the mode")
    ax.set_title("mode weights (bars: ±2 binomial SE)", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_png(fig, out / "annealed_langevin.png")

    # the annealed chains at the start and at the end of some levels: the top four, the middle, sigma_1
    T = args.steps_per_level
    L = args.levels
    shown = sorted({L - 1, L - 2, L - 3, L - 4, L // 3, 0} & set(range(L)), reverse=True)
    cols = [(0, args.sigma_max, rf"start: N(0, {args.sigma_max:g}$^2$ I)")]
    cols += [((L - i) * T, float(sigmas[i]), rf"after level {i + 1}: $\sigma$ = {float(sigmas[i]):.3g}") for i in shown]
    cols += [(trajectory.shape[0] - 1, 0.0, "after the Tweedie step")]
    m = min(n, 1000)
    fig, axes = plt.subplots(1, len(cols), figsize=(2.1 * len(cols), 2.5))
    for ax, (s, sigma, title) in zip(axes, cols, strict=True):
        ax.scatter(exact_np[:m, 0], exact_np[:m, 1], s=1, color="0.75", linewidths=0)
        ax.scatter(trajectory[s, :m, 0], trajectory[s, :m, 1], s=1.5, alpha=0.5, color="tab:blue", linewidths=0)
        ax.set_title(title, fontsize=7)
        lim = min(7.5 + 2.5 * sigma, 7.5 + 2.5 * args.sigma_max)  # the spread of p_sigma
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim + 1, lim + 1)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("annealed Langevin: grey = exact samples of p; the axes widen with the spread of "
                 r"$p_\sigma$", fontsize=8)
    fig.tight_layout()
    save_png(fig, out / "trajectory.png")

    print(f"{n} samples each; squared MMD (bandwidth {BANDWIDTH}) to {n} exact samples")
    print(f"  noise floor: MMD^2 of {args.null_pairs} pairs of exact sets: "
          + ", ".join(f"{v:.5f}" for v in null))
    for name in ("annealed", "plain"):
        r = results[name]
        print(f"  {name:9s} MMD^2 {r['mmd2']:.5f}; mode weights "
              + " / ".join(f"{v:.3f}" for v in r["mode_weights"])
              + "  (true " + " / ".join(f"{v:.2f}" for v in w) + ", SE "
              + " / ".join(f"{v:.3f}" for v in results["weight_se"]) + ")")
    write_json(out / "metrics.json", {"config": vars(args), "results": results})
    print(f"wrote {', '.join(str(out / f) for f in FILES)} in {time.time() - t0:.1f} s")
    return results


if __name__ == "__main__":
    main()
