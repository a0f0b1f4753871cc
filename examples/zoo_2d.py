r"""The zoo: VAE, MHVAE, diffusion, normalizing flow and CNF on the same 2-D data, in nats (MATH.md B4, E5, F, G2).

Every model is trained on the same 20000 draws of the ring of six Gaussians
(``probdiff.analytic.GaussianMixture.ring()``, whose density is known) and evaluated on the same
held-out points. Each row gives what that model family can compute about log p_theta(x):

* **VAE** (``probdiff.vae.VAE``, latent dimension 2): the ELBO, and the importance-weighted bound
  with K = 1000 (a lower bound that tightens to log p_theta as K grows);
* **MHVAE** with the diffusion's restrictions but a learned Gaussian decoder (T = 20, stage D of
  ``examples/hierarchical_vae_equivalence.py``): the ELBO and the importance-weighted bound;
* **diffusion** (``GaussianDiffusion``, T = 1000, eps-network trained by L_simple): the B2 ELBO,
  a bound on the discrete chain, and the exact log-likelihood of its probability-flow ODE
  (``ProbabilityFlow.from_diffusion``, exact trace), a different model made from the same network;
* **RealNVP** (``probdiff.flows``, 8 affine couplings): the exact log-likelihood by the change of
  variables;
* **CNF** (``probdiff.ode.CNF``, trained by maximum likelihood with Hutchinson's trace): the
  exact log-likelihood by the instantaneous change of variables (exact trace).

All are trained by ``SVI`` with ``Trace_ELBO`` (``DiffusionELBO("simple")`` for the diffusion),
minibatches of 256, Adam with cosine decay; the VAEs are evaluated at their last parameters, the
others at an EMA of them (decay 0.999; averaging hurts the VAEs' coupled encoder and decoder). "excess" is
NLL - true NLL on the same points (paired, with its SE), an estimate of KL(p || p_theta) for
exact likelihoods and an upper bound on it for the bounds.

**Expected output** (defaults, 2026-11-21, 169 s on 2 CPU cores), NLL or -bound in nats, true
2.859: VAE 3.991 (ELBO = IW bound: posterior collapse), MHVAE ELBO 3.004 and IW 2.905, diffusion
-ELBO 3.008 and ODE 3.127, RealNVP 2.984, CNF 2.897. See docs/tutorials/zoo.md.

Files in ``--out``: ``zoo.png`` (samples of every model next to the data) and ``metrics.json``.
The table goes to docs/tutorials/zoo.md.

Run: ``python examples/zoo_2d.py --out out/zoo``, or tiny: ``python examples/zoo_2d.py --tiny --out /tmp/zoo``.
"""

from __future__ import annotations

import argparse
import math
import time

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import equinox as eqx  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import numpyro  # noqa: E402
import optax  # noqa: E402
from numpyro import handlers  # noqa: E402
from numpyro.contrib.module import eqx_module  # noqa: E402
from numpyro.infer import SVI, Trace_ELBO  # noqa: E402

from probdiff import GaussianDiffusion, analytic, schedules  # noqa: E402
from probdiff._io import parse_example_args, parse_widths, prepare_out_dir, write_json  # noqa: E402
from probdiff.flows import ActNorm, AffineCoupling, Flow, checkerboard_mask  # noqa: E402
from probdiff.infer import DiffusionELBO  # noqa: E402
from probdiff.nets import MLP  # noqa: E402
from probdiff.ode import CNF, ProbabilityFlow  # noqa: E402
from probdiff.plotting import save_png  # noqa: E402
from probdiff.training import fit  # noqa: E402
from probdiff.vae import MHVAE, VAE, GaussianNet, LinearGaussianEncoder  # noqa: E402

FILES = ("zoo.png", "metrics.json")
FULL = {"steps": 3000, "cnf_steps": 600, "hidden": "128,128", "eval_points": 500, "iw_draws": 1000,
        "elbo_draws": 32, "n": 1000}
TINY = {"steps": 10, "cnf_steps": 4, "hidden": "8", "eval_points": 8, "iw_draws": 4, "elbo_draws": 2, "n": 16}
BATCH, T_MHVAE, T_DIFF, TIME_SCALE = 256, 20, 1000, 100.0


def train(svi, x, steps, key, ema_decay=0.999):
    """SVI steps by ``fit``; the EMA of the parameters (``ema_decay=0``: the last parameters)."""
    res = fit(svi, x, steps, batch_size=BATCH, rng_key=key, ema_decay=ema_decay if steps >= 1000 else 0.0,
              steps_per_call=min(500, steps), progress_bar=False)
    return res.state.ema


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny sizes, for the tests")
    p.add_argument("--steps", type=int, help=f"training steps per model (default {FULL['steps']})")
    p.add_argument("--cnf-steps", type=int, help=f"training steps of the CNF (default {FULL['cnf_steps']})")
    p.add_argument("--hidden", help=f"hidden widths of every network (default {FULL['hidden']})")
    p.add_argument("--eval-points", type=int, help=f"held-out points (default {FULL['eval_points']})")
    p.add_argument("--iw-draws", type=int, help=f"draws of the importance-weighted bounds (default {FULL['iw_draws']})")
    p.add_argument("--elbo-draws", type=int, help=f"draws of the VAE/MHVAE ELBOs (default {FULL['elbo_draws']})")
    p.add_argument("--n", type=int, help=f"samples per model in the figure (default {FULL['n']})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="out/zoo_2d")
    p.add_argument("--overwrite", action="store_true")
    args = parse_example_args(p, argv, FULL, TINY)
    hidden = parse_widths(p, args.hidden)
    if min(args.steps, args.cnf_steps, args.iw_draws, args.n) < 1 or args.eval_points < 2 or args.elbo_draws < 1:
        p.error("need positive sizes and at least 2 held-out points")
    out = prepare_out_dir(args.out, FILES, overwrite=args.overwrite)

    t_start = time.time()
    mixture = analytic.GaussianMixture.ring()
    keys = dict(zip(("data", "eval", "net", "fit", "score", "sample"), jax.random.split(jax.random.key(args.seed), 6), strict=True))
    x_train = mixture.sample(keys["data"], 20000)
    x_eval = mixture.sample(keys["eval"], args.eval_points)
    true_lp = np.asarray(mixture.log_prob(x_eval), np.float64)
    opt = optax.adam(optax.cosine_decay_schedule(2e-3, args.steps, alpha=0.05))
    kn = jax.random.split(keys["net"], 8)
    rows, samples, seconds = {}, {}, {}

    def record(name, what, log_values):
        v = np.asarray(log_values, np.float64)
        d = true_lp - v
        rows[f"{name}: {what}"] = {"nll": float(-v.mean()), "nll_se": float(v.std(ddof=1) / math.sqrt(v.size)),
                                   "excess": float(d.mean()), "excess_se": float(d.std(ddof=1) / math.sqrt(d.size))}

    # ---------------------------------------------------------------- VAE
    t0 = time.time()
    vae = VAE(GaussianNet(2, 2, kn[0], hidden=hidden), GaussianNet(2, 2, kn[1], hidden=hidden), 2, (2,))
    prm = train(SVI(vae.model, vae.guide, opt, Trace_ELBO()), x_train, args.steps, jax.random.fold_in(keys["fit"], 0), 0.0)
    vae = vae.with_params(prm)
    record("VAE", "ELBO", jax.jit(lambda k, x: vae.elbo(k, x, args.elbo_draws))(keys["score"], x_eval))
    record("VAE", f"importance-weighted (K = {args.iw_draws})",
           jax.jit(lambda k, x: vae.log_likelihood(k, x, args.iw_draws))(keys["score"], x_eval))
    samples["VAE"] = np.asarray(jax.jit(lambda k: vae.sample(k, (args.n,)))(keys["sample"]))
    seconds["VAE"] = time.time() - t0

    # ---------------------------------------------------------------- MHVAE (restricted encoder)
    t0 = time.time()
    enc = LinearGaussianEncoder.from_schedule(schedules.cosine(T_MHVAE))
    dec = (GaussianNet(2, 2, kn[2], hidden=hidden), GaussianNet(2, 2, kn[3], hidden=hidden, time_dim=16))
    mh = MHVAE(enc, dec, T_MHVAE, 2, (2,))
    prm = train(SVI(mh.model, mh.guide, opt, Trace_ELBO()), x_train, args.steps, jax.random.fold_in(keys["fit"], 1), 0.0)
    mh = mh.with_params(prm)
    record("MHVAE (T = 20)", "ELBO", jax.jit(lambda k, x: mh.elbo(k, x, args.elbo_draws))(keys["score"], x_eval))
    record("MHVAE (T = 20)", f"importance-weighted (K = {args.iw_draws})",
           jax.jit(lambda k, x: mh.log_likelihood(k, x, args.iw_draws))(keys["score"], x_eval))
    samples["MHVAE"] = np.asarray(jax.jit(lambda k: mh.sample(k, (args.n,)))(keys["sample"]))
    seconds["MHVAE"] = time.time() - t0

    # ---------------------------------------------------------------- diffusion
    t0 = time.time()
    schedule = schedules.linear(T_DIFF)
    eps0 = MLP(2, kn[4], hidden=hidden)
    static = eqx.partition(eps0, eqx.is_array)[1]

    def eps_fn(net):
        return lambda x_t, i: net(x_t, jnp.asarray(i, x_t.dtype) * (TIME_SCALE / T_DIFF))

    def diff_model(x):
        net = eqx_module("eps_net", eps0)
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("x", GaussianDiffusion(eps_fn(net), schedule, (2,)), obs=x)

    prm = train(SVI(diff_model, lambda x: None, opt, DiffusionELBO("simple")), x_train, args.steps,
                jax.random.fold_in(keys["fit"], 2))["eps_net$params"]

    def diffusion(p_):
        return GaussianDiffusion(eps_fn(eqx.combine(p_, static)), schedule, (2,))

    record("diffusion (T = 1000)", "ELBO (B2)", jax.jit(lambda p_, k, x: diffusion(p_).elbo(k, x))(prm, keys["score"], x_eval))
    ll = jax.jit(lambda p_, x: ProbabilityFlow.from_diffusion(diffusion(p_), trace="exact", rtol=1e-5, atol=1e-5)
                 .log_likelihood(x))(prm, x_eval)
    record("diffusion (T = 1000)", "probability-flow ODE, exact", ll.log_prob)
    samples["diffusion"] = np.asarray(jax.jit(lambda p_, k: diffusion(p_).sample(k, (args.n,)))(prm, keys["sample"]))
    seconds["diffusion"] = time.time() - t0

    # ---------------------------------------------------------------- RealNVP
    t0 = time.time()
    actnorm0 = ActNorm.initialize(x_train)
    nets0 = [MLP(2, k, hidden=hidden, learn_variance=True) for k in jax.random.split(kn[5], 8)]

    def build():
        layers = [ActNorm(numpyro.param("actnorm_shift", actnorm0.shift),
                          log_scale=numpyro.param("actnorm_log_scale", actnorm0.log_abs_scale))]
        for i, net0 in enumerate(nets0):
            layers.append(AffineCoupling(eqx_module(f"coupling{i}", net0), mask=checkerboard_mask((2,), i % 2)))
        return Flow(layers, (2,))

    def flow_model(x):
        flow = build()
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("x", flow, obs=x)

    prm = train(SVI(flow_model, lambda x: None, opt, Trace_ELBO()), x_train, args.steps, jax.random.fold_in(keys["fit"], 3))

    def flow_at(p_):
        with handlers.substitute(data=p_):
            return build()

    record("RealNVP (8 couplings)", "exact", jax.jit(lambda p_, x: flow_at(p_).log_prob(x))(prm, x_eval))
    samples["RealNVP"] = np.asarray(jax.jit(lambda p_, k: flow_at(p_).sample(k, (args.n,)))(prm, keys["sample"]))
    seconds["RealNVP"] = time.time() - t0

    # ---------------------------------------------------------------- CNF
    t0 = time.time()
    v0 = MLP(2, kn[6], hidden=(64, 64))
    v_static = eqx.partition(v0, eqx.is_array)[1]

    def cnf_model(x):
        v = eqx_module("v", v0)
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("x", CNF(lambda y, t: v(y, t), (2,), rtol=1e-3, atol=1e-3), obs=x)

    cnf_opt = optax.adam(optax.cosine_decay_schedule(3e-3, args.cnf_steps, alpha=0.1))
    prm = train(SVI(cnf_model, lambda x: None, cnf_opt, Trace_ELBO()), x_train, args.cnf_steps,
                jax.random.fold_in(keys["fit"], 4))["v$params"]

    def cnf_at(p_, **kw):
        net = eqx.combine(p_, v_static)
        return CNF(lambda y, t: net(y, t), (2,), **kw)

    ll = jax.jit(lambda p_, x: cnf_at(p_, trace="exact", rtol=1e-5, atol=1e-5).log_likelihood(x))(prm, x_eval)
    record("CNF", "exact", ll.log_prob)
    samples["CNF"] = np.asarray(jax.jit(lambda p_, k: cnf_at(p_, rtol=1e-4, atol=1e-4).sample(k, (args.n,)))(
        prm, keys["sample"]))
    seconds["CNF"] = time.time() - t0

    # ---------------------------------------------------------------- report
    true = {"nll": float(-true_lp.mean()), "nll_se": float(true_lp.std(ddof=1) / math.sqrt(true_lp.size))}
    print(f"\nring of six Gaussians, {args.eval_points} held-out points, {args.steps} steps per model "
          f"({args.cnf_steps} for the CNF); nats per point")
    print(f"{'model: quantity':62s} {'NLL or -bound':>16s} {'excess':>16s}")
    print(f"{'true density':62s} {true['nll']:8.3f} +- {true['nll_se']:.3f}")
    for name, r in rows.items():
        print(f"{name:62s} {r['nll']:8.3f} +- {r['nll_se']:.3f} {r['excess']:8.3f} +- {r['excess_se']:.3f}")
    print("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()) + f"; total {time.time() - t_start:.0f}")
    plot_samples(out / "zoo.png", np.asarray(x_eval), samples)
    results = {"true": true, "rows": rows, "seconds": seconds}
    write_json(out / "metrics.json", {"config": vars(args), "results": results})
    return results


def plot_samples(path, x_ref, samples):
    fig, axes = plt.subplots(1, len(samples) + 1, figsize=(2.4 * (len(samples) + 1), 2.6), sharex=True, sharey=True)
    axes[0].scatter(x_ref[:, 0], x_ref[:, 1], s=1, color="0.4")
    axes[0].set_title("held-out data", fontsize=8)
    for ax, (name, x) in zip(axes[1:], samples.items(), strict=True):
        ax.scatter(x[:, 0], x[:, 1], s=1, color="tab:blue")
        ax.set_title(name, fontsize=8)
    for ax in axes:
        ax.set_xlim(-4.5, 4.5)
        ax.set_ylim(-4.5, 4.5)
        ax.set_aspect("equal")
    fig.tight_layout()
    save_png(fig, path)


if __name__ == "__main__":
    main()
