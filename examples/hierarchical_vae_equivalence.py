r"""A diffusion model is a Markovian hierarchical VAE with three restrictions (MATH.md B4, B1, B2).

Start from an MHVAE with T latent layers, a learned encoder and a learned decoder,

    p(x, z_{1:T}) = N(z_T; 0, I) prod_{t>=2} p(z_{t-1} | z_t) p(x | z_1),
    q(z_{1:T} | x) = q(z_1 | x) prod_{t>=2} q(z_t | z_{t-1}),

all conditionals diagonal Gaussians from networks (``probdiff.vae.MHVAE``), and impose the
restrictions one at a time, training each model by ``SVI`` with ``Trace_ELBO`` on the same 2-D data:

A. the MHVAE as it is: latent dimension 4 (twice the data's), encoder and decoder learned;
B. restriction 1: latent dimension = data dimension (2);
C. restriction 2: the encoder fixed and linear-Gaussian, q(z_t | z_{t-1}) = N(a_t z_{t-1}, v_t I),
   here a_t = 1, v_t = 0.02 (a random walk: q(z_T | x) = N(x, 0.02 T I) stays near the data, so
   the prior N(0, I) does not match it);
D. restriction 3: the schedule a_t = sqrt(1 - beta_t), v_t = beta_t (cosine, alpha_bar_T ~ 0),
   so that q(z_T | x) = N(sqrt(alpha_bar_T) x, (1 - alpha_bar_T) I) is N(0, I);
E. the decoder of D written as DDPM writes it: p(z_{t-1} | z_t) = N(mu_theta(z_t, t), beta_t I),
   mu_theta = (z_t - beta_t / sqrt(1 - alpha_bar_t) eps_theta(z_t, t)) / sqrt(alpha_t), with an
   eps-network. This MHVAE *is* ``GaussianDiffusion(eps_theta, schedule, (2,))``: the script builds
   that object from the same trained network and compares, on the same held-out points,

   * the B2 form of the ELBO, computed by the MHVAE from its encoder alone (the posterior
     q(z_{t-1} | z_t, x) by Gaussian conditioning of a_t, v_t: ``MHVAE.elbo_terms``) and by
     ``GaussianDiffusion.elbo_terms`` (its closed-form mu_tilde_t, beta_tilde_t), with the same key:
     equal number for number;
   * the plain Monte-Carlo ELBO, log p(x, z) - log q(z | x) on one trajectory, of the MHVAE's model
     and guide against the diffusion's ``model`` and ``guide`` under ``Trace_ELBO``, on the same
     trajectories: equal number for number.

For every model the table gives the held-out ELBO (nats; 64 trajectories per point) and the
importance-weighted log-likelihood (1000 trajectories), next to the true log-density of the data.
Restriction 1 costs a little; restriction 2 costs a lot with a poorly chosen schedule (the prior
matching term), and restriction 3 restores it: the ELBO of D matches B's with no encoder to learn.

Measured (ring of six Gaussians, T = 20, 2500 steps per model, 500 held-out points, 2026-11-21,
666 s on 2 CPU cores under load), held-out ELBO / IW log-likelihood in nats: A -3.992 / -3.991
and B -3.991 / -3.991 (posterior collapse: the learned encoder ignores x), C -4.841 / -3.655 (the
prior does not match q(z_T | x)), D -3.029 / -2.909, E -3.378 / -3.246, true -2.859; E against
GaussianDiffusion: B2 ELBOs within 1.1e-5 nats, model/guide log-ratios within 9.5e-6 (float32).
See docs/tutorials/vae.md.

Files in ``--out``: ``elbo_by_stage.png`` (held-out ELBO and IW log-likelihood per stage),
``samples.png`` (samples of each model next to the data), ``terms.png`` (the denoising KL per t
of D/E, MHVAE against GaussianDiffusion) and ``metrics.json``.

Run: ``python examples/hierarchical_vae_equivalence.py --out out/hvae``, or tiny:
``python examples/hierarchical_vae_equivalence.py --tiny --out /tmp/hvae``.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import equinox as eqx  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from numpyro import handlers  # noqa: E402
from numpyro.infer import SVI, Trace_ELBO  # noqa: E402

from probdiff import GaussianDiffusion, analytic, schedules  # noqa: E402
from probdiff._io import parse_example_args, parse_widths, prepare_out_dir, write_json  # noqa: E402
from probdiff.nets import MLP  # noqa: E402
from probdiff.plotting import save_png  # noqa: E402
from probdiff.training import fit  # noqa: E402
from probdiff.vae import MHVAE, GaussianNet, LinearGaussianEncoder  # noqa: E402

FILES = ("elbo_by_stage.png", "samples.png", "terms.png", "metrics.json")
FULL = {"steps": 2500, "hidden": "128,128", "batch_size": 256, "T": 20, "eval_points": 500, "elbo_draws": 32,
        "iw_draws": 256, "n": 2000}
TINY = {"steps": 30, "hidden": "16", "batch_size": 64, "T": 4, "eval_points": 32, "elbo_draws": 4, "iw_draws": 8,
        "n": 64}
STAGES = {
    "A": "MHVAE: latent dim 4, encoder and decoder learned",
    "B": "+ latent dim = data dim (2)",
    "C": "+ fixed linear-Gaussian encoder (a_t = 1, v_t = 0.02)",
    "D": "+ schedule with q(z_T | x) = N(0, I) (cosine)",
    "E": "D's decoder as DDPM's eps-network = GaussianDiffusion",
}


class EpsDecoder(eqx.Module):
    r"""p(z_{t-1} | z_t) = N(mu_theta(z_t, t), beta_t I) from an eps-network (DDPM's decoder, t = 1..T).

    mu_theta(z_t, t) = (z_t - beta_t / sqrt(1 - alpha_bar_t) eps_theta(z_t, t)) / sqrt(alpha_t);
    written out here from the betas alone, independently of probdiff's own kernels.
    """

    eps_net: MLP
    betas: tuple = eqx.field(static=True)  # beta_1..beta_T as floats: fixed, never trained

    def __call__(self, z_t, t):
        beta = jnp.asarray(self.betas, z_t.dtype)
        alpha_bar = jnp.cumprod(1.0 - beta)
        b, ab = beta[t - 1][..., None], alpha_bar[t - 1][..., None]
        mean = (z_t - b / jnp.sqrt(1.0 - ab) * self.eps_net(z_t, t)) / jnp.sqrt(1.0 - b)
        return mean, jnp.sqrt(b)

    def first(self, z_1):
        """p(x | z_1), the t = 1 step."""
        return self(z_1, jnp.ones(z_1.shape[:-1], jnp.int32))


def build(stage, T, hidden, key):
    """The untrained MHVAE of a stage (and, for E, its eps-network and schedule)."""
    ks = jax.random.split(key, 4)
    d = 4 if stage == "A" else 2
    cosine = schedules.cosine(T)
    if stage in ("A", "B"):
        encoder = (GaussianNet(2, d, ks[0], hidden=hidden), GaussianNet(d, d, ks[1], hidden=hidden, time_dim=16))
    elif stage == "C":
        encoder = LinearGaussianEncoder(jnp.ones(T), jnp.full(T, 0.02))
    else:
        encoder = LinearGaussianEncoder.from_schedule(cosine)
    if stage == "E":
        decoder = EpsDecoder(MLP(2, ks[2], hidden=hidden), tuple(float(b) for b in np.asarray(cosine.beta[1:])))
    else:
        decoder = (GaussianNet(d, 2, ks[2], hidden=hidden), GaussianNet(d, d, ks[3], hidden=hidden, time_dim=16))
    return MHVAE(encoder, decoder, T, d, (2,), name=f"stage{stage}"), cosine


def trace_elbo_of(model, guide, key, x):
    """log p - log q of one run of model and guide under the same key, per example (what Trace_ELBO averages)."""
    guide_tr = handlers.trace(handlers.seed(guide, key)).get_trace(x)
    model_tr = handlers.trace(handlers.replay(handlers.seed(model, key), guide_tr)).get_trace(x)

    def site_sum(tr):
        return sum(s["fn"].log_prob(s["value"]) for s in tr.values() if s["type"] == "sample")

    return site_sum(model_tr) - site_sum(guide_tr)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny sizes, for the tests (about 20 s)")
    p.add_argument("--steps", type=int, help=f"training steps per model (default {FULL['steps']})")
    p.add_argument("--T", type=int, help=f"latent layers = diffusion steps (default {FULL['T']})")
    p.add_argument("--hidden", help=f"hidden widths of every network (default {FULL['hidden']})")
    p.add_argument("--batch-size", type=int, help=f"minibatch size (default {FULL['batch_size']})")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate, cosine decay (default 2e-3)")
    p.add_argument("--eval-points", type=int, help=f"held-out points (default {FULL['eval_points']})")
    p.add_argument("--elbo-draws", type=int, help=f"trajectories per point for the ELBO (default {FULL['elbo_draws']})")
    p.add_argument("--iw-draws", type=int, help=f"trajectories per point for the IW log-likelihood (default {FULL['iw_draws']})")
    p.add_argument("--n", type=int, help=f"samples per model for the figure (default {FULL['n']})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="out/hierarchical_vae_equivalence")
    p.add_argument("--overwrite", action="store_true")
    args = parse_example_args(p, argv, FULL, TINY)
    hidden = parse_widths(p, args.hidden)
    if min(hidden) < 1 or args.steps < 1 or args.T < 2 or args.batch_size < 1 or args.eval_points < 2 \
            or args.elbo_draws < 2 or args.iw_draws < 1 or args.n < 1:
        p.error("need positive sizes, T >= 2, and at least 2 held-out points and ELBO draws")
    if not args.lr > 0:
        p.error("--lr must be > 0")
    out = prepare_out_dir(args.out, FILES, overwrite=args.overwrite)

    t_start = time.time()
    mixture = analytic.GaussianMixture.ring()
    k_data, k_eval, k_net, k_fit, k_samp = jax.random.split(jax.random.key(args.seed), 5)
    x_train = mixture.sample(k_data, 20000)
    x_eval = mixture.sample(k_eval, args.eval_points)
    true_lp = np.asarray(mixture.log_prob(x_eval), np.float64)
    optimizer = optax.adam(optax.cosine_decay_schedule(args.lr, args.steps, alpha=0.05))

    results, models, samples = {}, {}, {}
    for i, stage in enumerate(STAGES):
        t0 = time.time()
        mhvae, schedule = build(stage, args.T, hidden, jax.random.fold_in(k_net, i))
        svi = SVI(mhvae.model, mhvae.guide, optimizer, Trace_ELBO())
        res = fit(svi, x_train, args.steps, batch_size=args.batch_size, rng_key=jax.random.fold_in(k_fit, i),
                  ema_decay=0.0, steps_per_call=min(args.steps, 500), progress_bar=False)
        model_ = mhvae.with_params(svi.get_params(res.state.svi_state))
        elbo = jax.jit(lambda k, x, m=model_: m.elbo(k, x, args.elbo_draws))(jax.random.fold_in(k_eval, 10 + i), x_eval)
        iw = jax.jit(lambda k, x, m=model_: m.log_likelihood(k, x, args.iw_draws))(jax.random.fold_in(k_eval, 20 + i), x_eval)
        elbo, iw = np.asarray(elbo, np.float64), np.asarray(iw, np.float64)
        samples[stage] = np.asarray(model_.sample(jax.random.fold_in(k_samp, i), (args.n,)))
        models[stage] = (model_, schedule)
        results[stage] = {
            "description": STAGES[stage], "elbo": float(elbo.mean()), "elbo_se": float(elbo.std(ddof=1) / np.sqrt(elbo.size)),
            "iw_log_likelihood": float(iw.mean()), "final_loss": float(np.mean(res.losses[-100:]) / args.batch_size),
            "seconds": time.time() - t0,
        }
        if model_.linear_encoder is not None:  # the B2 form, exact KLs, one z_t per t
            b2 = np.asarray(model_.elbo_terms(jax.random.fold_in(k_eval, 30 + i), x_eval).total, np.float64)
            results[stage]["elbo_b2"] = float(b2.mean())
            results[stage]["elbo_b2_se"] = float(b2.std(ddof=1) / np.sqrt(b2.size))
        print(f"{stage}: {STAGES[stage]:55s} ELBO {results[stage]['elbo']:.3f} +- {results[stage]['elbo_se']:.3f}, "
              f"IW {results[stage]['iw_log_likelihood']:.3f} ({results[stage]['seconds']:.0f} s)", flush=True)

    # ------------------------------------------------ E is GaussianDiffusion, number for number
    model_e, schedule = models["E"]
    diffusion = GaussianDiffusion(model_e.decoder.eps_net, schedule, (2,), variance="beta", chunk_size=None)
    key = jax.random.fold_in(k_eval, 99)
    terms_m = model_e.elbo_terms(key, x_eval)
    terms_d = diffusion.elbo_terms(key, x_eval)
    b2_diff = np.abs(np.asarray(terms_m.total) - np.asarray(terms_d.total))
    mc_m = np.asarray(trace_elbo_of(model_e.model, model_e.guide, key, x_eval))
    # the diffusion's model and guide on the same trajectories: substitute the MHVAE guide's z_{1:T}
    z = handlers.trace(handlers.seed(model_e.guide, key)).get_trace(x_eval)[f"{model_e.name}_z"]["value"]

    def diff_guide(x):
        return handlers.substitute(diffusion.guide, data={"x_1:T": z})(x)

    guide_tr = handlers.trace(handlers.seed(diff_guide, key)).get_trace(x_eval)
    model_tr = handlers.trace(handlers.replay(handlers.seed(diffusion.model, key), guide_tr)).get_trace(x_eval)
    mc_d = np.asarray(sum(s["fn"].log_prob(s["value"]) for s in model_tr.values() if s["type"] == "sample")
                      - guide_tr["x_1:T"]["fn"].log_prob(guide_tr["x_1:T"]["value"]))
    mc_diff = np.abs(mc_m - mc_d)
    scale = float(np.mean(np.abs(np.asarray(terms_d.total))))
    results["equivalence"] = {
        "b2_max_abs_diff": float(b2_diff.max()), "b2_mean": float(np.mean(terms_d.total)),
        "trace_elbo_max_abs_diff": float(mc_diff.max()), "trace_elbo_mean": float(mc_d.mean()),
        "relative_to": scale, "dtype": str(x_eval.dtype),
    }
    results["true_log_prob"] = {"mean": float(true_lp.mean()), "se": float(true_lp.std(ddof=1) / np.sqrt(true_lp.size))}

    # ------------------------------------------------------------------ report
    print(f"\nring of six Gaussians, T = {args.T}, {args.steps} steps per model, {args.eval_points} held-out points")
    print(f"{'stage':5s} {'model':55s} {'ELBO':>16s} {'B2 form':>8s} {'IW (K=' + str(args.iw_draws) + ')':>12s}")
    for stage in STAGES:
        r = results[stage]
        b2 = f"{r['elbo_b2']:8.3f}" if "elbo_b2" in r else " " * 8
        print(f"{stage:5s} {r['description']:55s} {r['elbo']:8.3f} +- {r['elbo_se']:.3f} {b2} {r['iw_log_likelihood']:12.3f}")
    print(f"{'':5s} {'true log-density':55s} {results['true_log_prob']['mean']:8.3f} +- {results['true_log_prob']['se']:.3f}")
    e = results["equivalence"]
    print(f"\nE against GaussianDiffusion on the same points and key ({e['dtype']}):")
    print(f"  B2 ELBO, MHVAE.elbo_terms vs GaussianDiffusion.elbo_terms: mean {e['b2_mean']:.4f}, "
          f"max |difference| {e['b2_max_abs_diff']:.1e}")
    print(f"  one-trajectory log p - log q, MHVAE model/guide vs diffusion model/guide: mean {e['trace_elbo_mean']:.4f}, "
          f"max |difference| {e['trace_elbo_max_abs_diff']:.1e}")
    print(f"total {time.time() - t_start:.0f} s")

    plot_stages(out / "elbo_by_stage.png", results, true_lp.mean())
    plot_samples(out / "samples.png", samples, np.asarray(x_eval))
    plot_terms(out / "terms.png", np.asarray(terms_m.denoising_matching), np.asarray(terms_d.denoising_matching))
    write_json(out / "metrics.json", {"config": vars(args), "results": results})
    return results


def plot_stages(path, results, true_mean):
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    xs = np.arange(len(STAGES))
    ax.errorbar(xs, [results[s]["elbo"] for s in STAGES], yerr=[2 * results[s]["elbo_se"] for s in STAGES],
                fmt="o", label="ELBO (held-out)")
    ax.plot(xs, [results[s]["iw_log_likelihood"] for s in STAGES], "s", label="importance-weighted log-likelihood")
    ax.axhline(true_mean, color="k", ls="--", lw=1, label="true log-density")
    ax.set_xticks(xs, [f"{s}\n{STAGES[s].split(':')[0][:18]}" for s in STAGES], fontsize=7)
    ax.set_ylabel("nats per point")
    ax.set_title("From an MHVAE to a diffusion model, one restriction at a time")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_png(fig, path)


def plot_samples(path, samples, x_ref):
    fig, axes = plt.subplots(1, len(samples) + 1, figsize=(2.4 * (len(samples) + 1), 2.6), sharex=True, sharey=True)
    axes[0].scatter(x_ref[:, 0], x_ref[:, 1], s=1, color="0.4")
    axes[0].set_title("held-out data", fontsize=8)
    for ax, (stage, x) in zip(axes[1:], samples.items(), strict=True):
        ax.scatter(x[:, 0], x[:, 1], s=1, color="tab:blue")
        ax.set_title(f"stage {stage}", fontsize=8)
    for ax in axes:
        ax.set_xlim(-4.5, 4.5)
        ax.set_ylim(-4.5, 4.5)
        ax.set_aspect("equal")
    fig.tight_layout()
    save_png(fig, path)


def plot_terms(path, kl_m, kl_d):
    t = np.arange(2, kl_m.shape[-1] + 2)
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    ax.plot(t, kl_d.mean(0), "o-", label="GaussianDiffusion.elbo_terms", ms=6)
    ax.plot(t, kl_m.mean(0), "x", color="k", label="MHVAE.elbo_terms", ms=6)
    ax.set_xlabel("t")
    ax.set_ylabel("E KL(q(z_{t-1}|z_t,x) || p(z_{t-1}|z_t))")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, path)


if __name__ == "__main__":
    main()
