r"""KL(p(x) || p_theta(x)) <= KL(p(x,z) || p_theta(x,z)), and minimising KL(p||p_theta) is MLE (MATH.md B5).

The ``003_*`` notes bound the marginal divergence by the joint one: with p(x, z) = p(x) q(z|x)
for any encoder q(z|x),

    KL(p(x,z) || p_theta(x,z)) = KL(p(x) || p_theta(x)) + E_{p(x)} KL(q(z|x) || p_theta(z|x))  >=  KL(p(x) || p_theta(x)),

with equality when q(z|x) = p_theta(z|x) (the E-step of EM, G3). And since
KL(p || p_theta) = -H(p) - E_p log p_theta(x), the average negative log-likelihood of data from p
is KL(p || p_theta) + H(p): minimising the KL over theta *is* maximum likelihood, H(p) a constant.

Part 1, a linear-Gaussian model where everything is a closed form
(``probdiff.divergences.joint_kl_bound``): data p(x) = N(mu, Sigma) in 2-D; model
p_theta(x, z) = N(z; 0, 1) N(x; s u z + mu, 0.3 I) with u the top eigenvector of Sigma and
theta = s a scale; a fixed encoder q(z|x) = p_theta(s0)(z|x) at s0 = 0.5. Along s the joint KL
lies above the marginal KL, touches it at s = s0, and its minimiser lies between s0 and the
marginal's minimiser (one M-step of EM). Monte Carlo over (x, z) ~ p(x) q(z|x) checks each closed
form, and the average NLL of data from p minus H(p) traces the KL curve.

Part 2, mixtures with their labels (``probdiff.divergences.mixture_joint_kl``): the joint KL in
closed form, the marginal by quadrature. Swapping the model's component labels leaves
KL(p(x) || p_theta(x)) unchanged but makes the joint KL large: the bound is loose when the latent
variables are matched badly.

Expected output (defaults, about 25 s on 2 shared CPU cores): in part 1 the closed forms agree
with Monte Carlo over 20000 draws within 2 SE at s = 0.25, 0.5, 1, 1.044, 1.75 (e.g. at s = 1:
marginal 0.2174 against 0.2211 ± 0.0033, joint 0.5284 against 0.5345 ± 0.0085); joint - marginal
equals the separately computed gap to 8e-6 (float32) and to 2e-7 when q = p_theta(z|x);
H(p) = 1.8548; argmin_s KL(p || p_theta) = 1.044 = argmin_s of the average NLL of the 20000 draws,
whose curve minus H(p) lies on the KL curve (mean offset -0.004, the sampling error of the draws);
with q fixed at s0 = 0.5 the joint KL is minimised at s = 0.752, between s0 and 1.044. In part 2
the marginal KL is 0.0520 for both labellings; the joint KL is 0.0813 with matched labels and
12.30 with swapped ones, and in both cases joint - marginal = E KL(p(z|x) || p_theta(z|x)).
Figures ``kl_joint_bound.png`` and ``kl_joint_bound.json`` go to ``--out``.

Run: ``python examples/kl_joint_bound.py --out out/kl_joint_bound``, or tiny:
``python examples/kl_joint_bound.py --tiny --out /tmp/kj``.
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from probdiff._io import prepare_out_dir, write_json  # noqa: E402
from probdiff.analytic import GaussianData  # noqa: E402
from probdiff.divergences import (  # noqa: E402
    LinearGaussianModel,
    MixtureOfGaussians,
    gaussian_entropy,
    joint_kl_bound,
    mixture_joint_kl,
)
from probdiff.plotting import save_png  # noqa: E402

FILES = ("kl_joint_bound.png", "kl_joint_bound.json")

FULL = {"samples": 20000, "scales": 201}
TINY = {"samples": 2000, "scales": 41}
PSI = 0.3  # the model's fixed observation variance (not the data's: the family does not contain p)
S0 = 0.5  # the scale whose posterior is the fixed encoder


def model_at(s, data):
    lam, U = jnp.linalg.eigh(data.cov)
    u = U[:, -1:]  # top eigenvector, shape (2, 1)
    return LinearGaussianModel(s * u, data.mu, PSI * jnp.eye(2))


def monte_carlo(key, data, encoder, model, n):
    """Mean and SE of log p(x) - log p_theta(x), of log p(x) q(z|x) - log p_theta(x, z) and of -log p_theta(x)."""
    draws = _draws(key, data, encoder, model, n)
    return {k: (float(v.mean()), float(np.std(np.asarray(v, np.float64), ddof=1) / np.sqrt(n)))
            for k, v in zip(("marginal", "joint", "nll"), draws, strict=True)}


@partial(jax.jit, static_argnums=2)
def _sample(data, key, n):
    return data.sample(key, n)


@partial(jax.jit, static_argnums=4)
def _draws(key, data, encoder, model, n):
    kx, kz = jax.random.split(key)
    x = data.sample(kx, n)  # x ~ p(x), z ~ q(z|x)
    z = encoder.sample(kz, x)
    log_p = data.log_prob(x)
    return log_p - model.log_marginal(x), log_p + encoder.log_prob(z, x) - model.log_joint(x, z), -model.log_marginal(x)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="a few seconds: tiny sizes (for tests)")
    p.add_argument("--samples", type=int, help=f"Monte-Carlo draws of (x, z) (default {FULL['samples']})")
    p.add_argument("--scales", type=int, help=f"values of s on [0.05, 2] (default {FULL['scales']})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="out/kl_joint_bound")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    for k, v in (TINY if args.tiny else FULL).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.samples < 10 or args.scales < 3:
        p.error("--samples must be >= 10 and --scales >= 3")
    out = prepare_out_dir(args.out, FILES, overwrite=args.overwrite)
    t0 = time.time()

    # ---------------------------------------------------------------- part 1: linear-Gaussian
    data = GaussianData.default_2d()
    encoder = jax.jit(lambda d: model_at(S0, d).posterior())(data)
    scales = jnp.linspace(0.05, 2.0, args.scales)
    curves = jax.jit(jax.vmap(lambda s: joint_kl_bound(data.mu, data.cov, encoder, model_at(s, data))))(scales)
    own = jax.jit(jax.vmap(lambda s: joint_kl_bound(data.mu, data.cov, model_at(s, data).posterior(),
                                                    model_at(s, data))))(scales)
    H = float(gaussian_entropy(data.cov))
    sc = np.asarray(scales)
    s_marg = float(sc[np.argmin(np.asarray(curves.marginal))])
    s_joint = float(sc[np.argmin(np.asarray(curves.joint))])
    print("Part 1: p(x) = N(mu, Sigma), p_theta(x, z) = N(z; 0, 1) N(x; s u z + mu, 0.3 I), "
          f"q(z|x) = p_theta(z|x) at s0 = {S0}")
    print(f"  H(p) = {H:.4f} nats; argmin_s KL(p(x)||p_theta(x)) = {s_marg:.3f} "
          f"(KL {float(np.min(np.asarray(curves.marginal))):.4f}); argmin_s KL(p(x,z)||p_theta(x,z)) with q fixed = {s_joint:.3f}")
    gap_err = float(np.max(np.abs(np.asarray(curves.joint - curves.marginal - curves.gap))))
    own_gap = float(np.max(np.abs(np.asarray(own.joint - own.marginal))))
    print(f"  max |joint - marginal - E KL(q(z|x)||p_theta(z|x))| over s: {gap_err:.1e}; "
          f"with q = p_theta(z|x) at each s, max |joint - marginal| = {own_gap:.1e}")
    print("  s     | KL marginal: closed  MC ± SE         | KL joint: closed  MC ± SE          | avg NLL - H(p) ± SE")
    checks = []
    key = jax.random.key(args.seed)
    for i, s in enumerate((0.25, S0, 1.0, s_marg, 1.75)):
        m = model_at(s, data)
        b = joint_kl_bound(data.mu, data.cov, encoder, m)
        mc = monte_carlo(jax.random.fold_in(key, i), data, encoder, m, args.samples)
        row = {"s": s, "marginal": float(b.marginal), "joint": float(b.joint), "gap": float(b.gap),
               "mc": mc, "nll_minus_H": mc["nll"][0] - H}
        row["z_marginal"] = (mc["marginal"][0] - row["marginal"]) / mc["marginal"][1]
        row["z_joint"] = (mc["joint"][0] - row["joint"]) / mc["joint"][1]
        checks.append(row)
        print(f"  {s:5.3f} | {row['marginal']:8.4f}  {mc['marginal'][0]:8.4f} ± {mc['marginal'][1]:.4f} "
              f"| {row['joint']:8.4f}  {mc['joint'][0]:8.4f} ± {mc['joint'][1]:.4f} "
              f"| {row['nll_minus_H']:8.4f} ± {mc['nll'][1]:.4f}")
    # the average NLL on one fixed data set, along s: MLE
    x = _sample(data, jax.random.fold_in(key, 99), args.samples)
    nll = np.asarray(jax.jit(jax.vmap(lambda s: -jnp.mean(model_at(s, data).log_marginal(x))))(scales))
    s_mle = float(sc[np.argmin(nll)])
    print(f"  argmin_s average NLL on {args.samples} draws of p: {s_mle:.3f} (argmin_s KL: {s_marg:.3f}); "
          f"mean of NLL - H(p) - KL over s: {float(np.mean(nll - H - np.asarray(curves.marginal))):.4f}")

    # ---------------------------------------------------------------- part 2: mixtures with labels
    p_mix = MixtureOfGaussians.from_stds([0.4, 0.6], [-2.0, 1.5], [0.6, 0.8])
    q_mix = MixtureOfGaussians.from_stds([0.5, 0.5], [-1.8, 1.7], [0.7, 0.7])
    q_swap = MixtureOfGaussians(q_mix.weights[::-1], q_mix.means[::-1], q_mix.covs[::-1])
    mix = {}
    print("Part 2: p = 0.4 N(-2, 0.6^2) + 0.6 N(1.5, 0.8^2), p_theta = 0.5 N(-1.8, 0.7^2) + 0.5 N(1.7, 0.7^2)")
    for label, q in (("matched labels", q_mix), ("swapped labels", q_swap)):
        r = mixture_joint_kl(p_mix, q)
        mix[label] = {"marginal": float(r.marginal), "joint": float(r.joint), "gap": float(r.gap)}
        print(f"  {label:15s}: KL(p(x)||p_theta(x)) = {float(r.marginal):.4f} <= KL(p(x,z)||p_theta(x,z)) = "
              f"{float(r.joint):.4f}; joint - marginal = {float(r.joint - r.marginal):.4f}, "
              f"E KL(p(z|x)||p_theta(z|x)) = {float(r.gap):.4f}")

    # ---------------------------------------------------------------- figure
    fig, axes = plt.subplots(1, 2, figsize=(11.5, 4.0), gridspec_kw={"width_ratios": [2, 1]})
    ax = axes[0]
    ax.plot(sc, np.asarray(curves.joint), "tab:red", label=f"KL(p(x,z) || p_theta(x,z)), q = p_theta(z|x) at s0 = {S0}")
    ax.plot(sc, np.asarray(curves.marginal), "tab:blue", lw=2, label="KL(p(x) || p_theta(x))")
    ax.plot(sc, nll - H, "k:", label=f"average NLL of {args.samples} draws of p, minus H(p)")
    ax.errorbar([r["s"] for r in checks], [r["mc"]["joint"][0] for r in checks],
                yerr=[2 * r["mc"]["joint"][1] for r in checks], fmt="o", color="tab:red", ms=4, label="Monte Carlo (±2 SE)")
    ax.errorbar([r["s"] for r in checks], [r["mc"]["marginal"][0] for r in checks],
                yerr=[2 * r["mc"]["marginal"][1] for r in checks], fmt="s", color="tab:blue", ms=4)
    ax.axvline(S0, color="0.5", lw=0.8, ls="--")
    ax.axvline(s_joint, color="tab:red", lw=0.8, ls="--")
    ax.axvline(s_marg, color="tab:blue", lw=0.8, ls="--")
    ax.set_ylim(0, max(3.0, float(np.asarray(curves.marginal)[np.argmin(np.abs(sc - 1.0))]) * 4))
    ax.set_xlabel("model scale s")
    ax.set_ylabel("nats")
    ax.set_title("linear-Gaussian model: the joint KL bounds the marginal KL, touching at s0", fontsize=9)
    ax.legend(fontsize=7)
    ax = axes[1]
    labels = list(mix)
    xs = np.arange(len(labels))
    ax.bar(xs - 0.18, [mix[k]["marginal"] for k in labels], 0.36, color="tab:blue", label="KL(p(x) || p_theta(x))")
    ax.bar(xs + 0.18, [mix[k]["joint"] for k in labels], 0.36, color="tab:red", label="KL(p(x,z) || p_theta(x,z))")
    ax.set_xticks(xs, labels)
    ax.set_yscale("log")
    ax.set_ylabel("nats")
    ax.set_title("mixtures: the labels matter only to the joint", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_png(fig, out / "kl_joint_bound.png")

    results = {"config": vars(args), "entropy_p": H, "argmin_marginal": s_marg, "argmin_joint_fixed_q": s_joint,
               "argmin_nll": s_mle, "max_gap_identity_error": gap_err, "max_own_posterior_gap": own_gap,
               "checks": checks, "mixtures": mix,
               "nll_minus_H_minus_kl": {"mean": float(np.mean(nll - H - np.asarray(curves.marginal))),
                                        "std_over_s": float(np.std(nll - H - np.asarray(curves.marginal)))},
               "seconds": time.time() - t0}
    write_json(out / "kl_joint_bound.json", results)
    print(f"wrote {', '.join(str(out / f) for f in FILES)} in {results['seconds']:.1f} s")
    return results


if __name__ == "__main__":
    main()
