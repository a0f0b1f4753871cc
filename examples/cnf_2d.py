r"""An FFJORD-style continuous normalizing flow on a 2-D mixture, trained by maximum likelihood under SVI (MATH.md E5).

Data: the six-mode ring ``GaussianMixture.ring()`` (radius 2.5, s = 0.45, weights k / 21), or
``--data eight_gaussians`` (s = 0.1, much sharper); both have an exact log-density.

**Model.** A vector field v_theta(x, t), a ``probdiff.nets.MLP`` with the float time t in [0, 1]
as its (sinusoidal) time input, moves the data at t = 0 to a standard normal at t = 1. The
instantaneous change of variables gives the log-density of the flow (Chen et al. 2018,
Grathwohl et al. 2019):

$$ \frac{dx}{dt} = v_\theta(x, t),\qquad
   \log p_\theta(x) = \log\mathcal N\big(x(1); 0, I\big)
   + \int_0^1 \operatorname{tr}\frac{\partial v_\theta}{\partial x}(x(t), t)\,dt,\qquad x(0) = x . $$

``probdiff.ode.CNF`` is this density as a NumPyro distribution, so the whole training script is
a model with an observed site and an empty guide:

    def model(x):
        v = eqx_module("v", net0)
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("x", CNF(v, (2,), rtol=1e-3, atol=1e-3), obs=x)

    svi = SVI(model, lambda x: None, optax.adam(3e-3), Trace_ELBO())

With no latent sites, ``Trace_ELBO`` is minus the log-likelihood, sum_i -log p_theta(x_i).
During training the trace is Hutchinson's estimate tr A = E[eps^T A eps] with one Rademacher
probe per example held fixed along the path (FFJORD): one product with the Jacobian per
evaluation instead of D, and an unbiased estimate of log p_theta, so an unbiased gradient of the
log-likelihood (up to the solver's error at rtol = atol = 1e-3; gradients go through the solver's
steps). ``probdiff.training.fit`` runs the steps in ``lax.scan`` on minibatches of 128 with an
EMA of the parameters (decay 0.99).

**Evaluation.** Every ``--eval-every`` steps the held-out NLL of the EMA parameters, with the
exact trace at the training tolerance, on 256 held-out points; at the end the held-out NLL with
the exact trace at rtol = atol = 1e-5 on 500 points, next to the true NLL of the same points
(their difference estimates KL(p || p_theta) >= 0), in nats and bits per dimension
(-log p / (2 log 2)), with the solver's function evaluations (NFE); 2000 samples (the ODE
integrated back from N(0, I)) and their energy distance to held-out data, next to the noise
floor (the largest |distance| between four pairs of exact sample sets); exp(log p_theta) on a grid.

**Expected output** (defaults, measured on 2026-11-21 on 2 CPU cores shared with other jobs,
101 s of which 73 s training): the flow finds all six modes with their weights; its held-out NLL
is 2.946 nats against the true 2.915 (difference 0.031 +- 0.010) at 39 NFE, far closer than the
probability-flow ODEs of the diffusion models in ``examples/likelihood_2d.py``, which are not
trained for the ODE's likelihood; the NFE at the training tolerance grows from 19 to 26 as the
field learns to fold the Gaussian into the ring; the samples' energy distance is 0.0026 against a
noise floor of 0.0021. See ``docs/tutorials/likelihood.md``.

Files in ``--out``: ``training.png`` (the training loss, the held-out NLL and the NFE per
evaluation), ``samples.png`` (flow samples next to held-out data), ``density.png`` (exp log p of
the flow on a grid next to the true density) and ``metrics.json``.

Run: ``python examples/cnf_2d.py --out out/cnf_2d``, or tiny: ``python examples/cnf_2d.py --tiny --out /tmp/cnf``.
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
from numpyro.contrib.module import eqx_module  # noqa: E402
from numpyro.infer import SVI, Trace_ELBO  # noqa: E402

from probdiff import analytic  # noqa: E402
from probdiff._io import parse_example_args, parse_widths, prepare_out_dir, write_json  # noqa: E402
from probdiff.data import energy_distance  # noqa: E402
from probdiff.nets import MLP  # noqa: E402
from probdiff.ode import CNF  # noqa: E402
from probdiff.plotting import save_png  # noqa: E402
from probdiff.training import fit  # noqa: E402

FILES = ("training.png", "samples.png", "density.png", "metrics.json")
DATASETS = ("ring", "eight_gaussians")

# sizes of a full run and of --tiny (used by the tests); a flag given explicitly wins
FULL = {"steps": 600, "batch_size": 128, "hidden": "64,64", "eval_every": 100, "curve_points": 256,
        "eval_points": 500, "n": 2000, "null_pairs": 4, "grid": 40, "train_rtol": 1e-3, "rtol": 1e-5}
TINY = {"steps": 20, "batch_size": 32, "hidden": "16,16", "eval_every": 10, "curve_points": 16,
        "eval_points": 16, "n": 100, "null_pairs": 2, "grid": 8, "train_rtol": 1e-2, "rtol": 1e-3}


def get_mixture(name):
    """(mixture with exact log_prob, plotting half-width)."""
    if name == "ring":
        return analytic.GaussianMixture.ring(), 4.2
    angle = 2 * np.pi * np.arange(8) / 8  # probdiff.data.eight_gaussians: radius 2, scale 0.1, equal weights
    means = 2.0 * np.stack([np.cos(angle), np.sin(angle)], axis=1)
    return analytic.GaussianMixture(jnp.asarray(means, jnp.float32), jnp.full((8,), 1 / 8, jnp.float32), 0.1), 2.8


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny sizes, for the tests (about 20 s)")
    p.add_argument("--data", choices=DATASETS, default="ring")
    p.add_argument("--data-size", type=int, default=20000, help="training points (default 20000)")
    p.add_argument("--steps", type=int, help=f"training steps (default {FULL['steps']})")
    p.add_argument("--batch-size", type=int, help=f"minibatch size (default {FULL['batch_size']})")
    p.add_argument("--hidden", help=f"hidden widths of the MLP field (default {FULL['hidden']})")
    p.add_argument("--lr", type=float, default=3e-3, help="Adam's learning rate (default 3e-3)")
    p.add_argument("--ema-decay", type=float, default=0.99, help="EMA decay of the parameters (default 0.99)")
    p.add_argument("--train-rtol", type=float, help=f"rtol = atol while training (default {FULL['train_rtol']:g})")
    p.add_argument("--eval-every", type=int, help=f"steps between held-out evaluations (default {FULL['eval_every']})")
    p.add_argument("--curve-points", type=int, help=f"held-out points per evaluation (default {FULL['curve_points']})")
    p.add_argument("--eval-points", type=int, help=f"held-out points at the end (default {FULL['eval_points']})")
    p.add_argument("--rtol", type=float, help=f"rtol = atol of the final evaluation (default {FULL['rtol']:g})")
    p.add_argument("--n", type=int, help=f"samples (default {FULL['n']})")
    p.add_argument("--null-pairs", type=int, help=f"pairs of exact sets for the noise floor (default {FULL['null_pairs']})")
    p.add_argument("--grid", type=int, help=f"grid points per axis of the density map (default {FULL['grid']})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="out/cnf_2d")
    p.add_argument("--overwrite", action="store_true")
    args = parse_example_args(p, argv, FULL, TINY)
    hidden = parse_widths(p, args.hidden)
    if (min(hidden) < 1 or args.steps < 1 or args.batch_size < 1 or args.eval_every < 1 or args.curve_points < 2
            or args.eval_points < 2 or args.n < 2 or args.grid < 2 or args.data_size < 1 or args.null_pairs < 1):
        p.error("need positive sizes, and at least 2 points for every evaluation and sample set")
    if not (args.rtol > 0 and args.train_rtol > 0 and args.lr > 0):
        p.error("tolerances and --lr must be > 0")
    if not 0 <= args.ema_decay < 1:
        p.error("need 0 <= --ema-decay < 1")
    out = prepare_out_dir(args.out, FILES, overwrite=args.overwrite)

    t_start = time.time()
    mixture, half_width = get_mixture(args.data)
    k_data, k_net, k_fit, k_samp = jax.random.split(jax.random.key(args.seed), 4)
    n_pool = args.data_size + args.curve_points + args.eval_points + args.n * (1 + 2 * args.null_pairs)
    pool = jax.jit(mixture.sample, static_argnums=1)(k_data, n_pool)
    x_train, rest = pool[: args.data_size], pool[args.data_size:]
    x_curve, rest = rest[: args.curve_points], rest[args.curve_points:]
    x_eval, x_ref = rest[: args.eval_points], rest[-args.n:]
    null_sets = rest[args.eval_points: -args.n].reshape(args.null_pairs, 2, args.n, 2)
    true_curve = float(-jnp.mean(mixture.log_prob(x_curve)))
    true_lp = np.asarray(mixture.log_prob(x_eval), np.float64)

    net0 = MLP(2, k_net, hidden=hidden)
    static = eqx.partition(net0, eqx.is_array)[1]

    def model(x):
        v = eqx_module("v", net0)
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("x", CNF(v, (2,), rtol=args.train_rtol, atol=args.train_rtol), obs=x)

    svi = SVI(model, lambda x: None, optax.adam(args.lr), Trace_ELBO())

    def field(prm):
        # The flow is built inside jit from traced parameters: one compilation serves every
        # parameter set. The field goes in as a plain function, not as the equinox module itself:
        # probdiff.ode compiles its solve with the flow's field as a static argument, and a
        # module holding (traced) arrays there cannot be compared with the one of a previous call.
        net = eqx.combine(prm, static)
        return lambda x, t: net(x, t)

    def nll_fn(rtol):
        return jax.jit(lambda prm, x: CNF(field(prm), (2,), trace="exact", rtol=rtol, atol=rtol).log_likelihood(x))

    # ------------------------------------------------------------------ training
    curve_nll = nll_fn(args.train_rtol)
    state, losses, curve = None, [], []
    t0 = time.time()
    done = 0
    while done < args.steps:
        size = min(args.eval_every, args.steps - done)
        res = fit(svi, x_train, size, batch_size=args.batch_size, rng_key=k_fit, state=state,
                  ema_decay=args.ema_decay, steps_per_call=size, progress_bar=False)
        state, done = res.state, done + size
        losses.extend((res.losses / args.batch_size).tolist())
        ll = curve_nll(state.ema["v$params"], x_curve)
        curve.append({"step": done, "nll": float(-jnp.mean(ll.log_prob)), "nfe": float(jnp.mean(ll.nfe)),
                      "seconds": time.time() - t0})
        print(f"step {done:5d}: training loss {np.mean(losses[-size:]):.3f}, held-out NLL {curve[-1]['nll']:.3f} "
              f"(true {true_curve:.3f}), NFE {curve[-1]['nfe']:.0f}, {curve[-1]['seconds']:.0f} s", flush=True)
    train_seconds = time.time() - t0
    params = state.ema["v$params"]

    # ------------------------------------------------------------------ final evaluation
    t0 = time.time()
    final_nll = nll_fn(args.rtol)
    ll = final_nll(params, x_eval)
    lp = np.asarray(ll.log_prob, np.float64)
    diff = -lp + true_lp
    eval_seconds = time.time() - t0

    t0 = time.time()
    samples = jax.jit(lambda prm, k: CNF(field(prm), (2,), rtol=args.rtol, atol=args.rtol).sample(k, (args.n,)))(
        params, k_samp)
    ed = jax.jit(energy_distance)
    null = [float(ed(a, b)) for a, b in null_sets]
    sample_seconds = time.time() - t0

    t0 = time.time()
    g = np.linspace(-half_width, half_width, args.grid)
    gx, gy = np.meshgrid(g, g)
    pts = jnp.asarray(np.stack([gx.ravel(), gy.ravel()], 1), jnp.float32)
    chunk = args.eval_points  # chunks of the evaluation set's shape reuse its compilation
    padded = jnp.concatenate([pts, jnp.zeros((-len(pts) % chunk, 2), pts.dtype)])
    grid_lp = np.concatenate([np.asarray(final_nll(params, padded[i: i + chunk]).log_prob)
                              for i in range(0, len(padded), chunk)])[: len(pts)]
    dens = {"true": np.exp(np.asarray(mixture.log_prob(pts), np.float64)).reshape(gx.shape),
            "cnf": np.exp(grid_lp.astype(np.float64)).reshape(gx.shape)}
    cell = (g[1] - g[0]) ** 2
    grid_seconds = time.time() - t0

    tail = max(1, len(losses) // 10)
    results = {
        "data": args.data,
        "eval_points": args.eval_points,
        "true_nll": float(-true_lp.mean()),
        "true_nll_se": float(true_lp.std(ddof=1) / math.sqrt(len(true_lp))),
        "cnf_nll": float(-lp.mean()),
        "cnf_nll_se": float(lp.std(ddof=1) / math.sqrt(len(lp))),
        "cnf_minus_true": float(diff.mean()),
        "cnf_minus_true_se": float(diff.std(ddof=1) / math.sqrt(len(diff))),
        "nfe": float(np.mean(ll.nfe)),
        "nfe_max": int(np.max(ll.nfe)),
        "initial_loss": float(np.mean(losses[:tail])),
        "final_loss": float(np.mean(losses[-tail:])),
        "curve": curve,
        "true_nll_curve_points": true_curve,
        "energy_distance": float(ed(samples, x_ref)),
        "energy_distance_null": null,
        "energy_distance_noise_floor": float(np.max(np.abs(null))),
        "grid_mass": {k: float(v.sum() * cell) for k, v in dens.items()},
        "seconds": {"train": train_seconds, "eval": eval_seconds, "sample": sample_seconds, "grid": grid_seconds,
                    "total": time.time() - t_start},
    }
    for k in ("true_nll", "cnf_nll"):
        results[k.replace("nll", "bits_per_dim")] = results[k] / (2 * math.log(2.0))

    plot_training(out / "training.png", losses, curve, true_curve)
    plot_samples(out / "samples.png", np.asarray(samples), np.asarray(x_ref), results, half_width)
    plot_density(out / "density.png", dens, results, half_width)
    write_json(out / "metrics.json", {"config": vars(args), "results": results})

    r = results
    print(f"\n{args.data}: {args.eval_points} held-out points, exact trace, rtol = atol = {args.rtol:g}")
    print(f"{'':26s} {'NLL nats':>9s} {'SE':>6s} {'bits/dim':>9s} {'NFE':>6s}")
    print(f"{'true density':26s} {r['true_nll']:9.3f} {r['true_nll_se']:6.3f} {r['true_bits_per_dim']:9.3f}")
    print(f"{'CNF':26s} {r['cnf_nll']:9.3f} {r['cnf_nll_se']:6.3f} {r['cnf_bits_per_dim']:9.3f} {r['nfe']:6.0f}")
    print(f"CNF - true (estimates KL(p || p_theta)): {r['cnf_minus_true']:.3f} +- {r['cnf_minus_true_se']:.3f} nats")
    print(f"energy distance of {args.n} samples to held-out data {r['energy_distance']:.4f} (noise floor, the "
          f"largest |distance| between pairs of exact sets: {r['energy_distance_noise_floor']:.4f}); "
          f"grid mass true {r['grid_mass']['true']:.3f}, "
          f"CNF {r['grid_mass']['cnf']:.3f}")
    print("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in r["seconds"].items()))
    return results


def plot_training(path, losses, curve, true_nll):
    fig, ax = plt.subplots(figsize=(6.5, 4.4))
    steps = np.arange(1, len(losses) + 1)
    ax.plot(steps, losses, color="0.75", lw=0.5, label="training loss (Hutchinson, per example)")
    w = max(1, len(losses) // 30)
    ax.plot(steps[w - 1:], np.convolve(losses, np.ones(w) / w, mode="valid"), color="tab:blue",
            label=f"running mean ({w} steps)")
    cs = [c["step"] for c in curve]
    ax.plot(cs, [c["nll"] for c in curve], "o-", color="tab:orange", label="held-out NLL (exact trace, EMA)")
    ax.axhline(true_nll, color="k", ls="--", lw=1, label="true NLL of the held-out points")
    hi = np.percentile(losses, 98)
    ax.set_ylim(true_nll - 0.3, max(hi, max(c["nll"] for c in curve)) + 0.1)
    ax.set_xlabel("step")
    ax.set_ylabel("nats per point")
    ax2 = ax.twinx()
    ax2.plot(cs, [c["nfe"] for c in curve], "s:", color="tab:green", label="NFE per held-out point")
    ax2.set_ylabel("NFE", color="tab:green")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)
    ax.set_title("CNF trained by SVI (Trace_ELBO = -log-likelihood)", fontsize=9)
    fig.tight_layout()
    save_png(fig, path)


def plot_samples(path, samples, x_ref, results, half_width):
    fig, axes = plt.subplots(1, 2, figsize=(7, 3.6))
    for ax, x, title, color in ((axes[0], x_ref, "held-out data", "0.4"),
                                (axes[1], samples, f"CNF samples, energy distance {results['energy_distance']:.4f}\n"
                                 f"(noise floor {results['energy_distance_noise_floor']:.4f})", "tab:blue")):
        ax.scatter(x[:, 0], x[:, 1], s=1, alpha=0.5, color=color, linewidths=0)
        ax.set_title(title, fontsize=8)
        ax.set_xlim(-half_width, half_width)
        ax.set_ylim(-half_width, half_width)
        ax.set_aspect("equal")
    fig.tight_layout()
    save_png(fig, path)


def plot_density(path, dens, results, half_width):
    fig, axes = plt.subplots(1, 2, figsize=(7, 3.6))
    top = max(float(v.max()) for v in dens.values())
    titles = {"true": f"true density\nheld-out NLL {results['true_nll']:.3f}",
              "cnf": f"CNF: exp log p, exact trace\nheld-out NLL {results['cnf_nll']:.3f}"}
    for ax, (name, d) in zip(axes, dens.items(), strict=True):
        ax.imshow(d, origin="lower", extent=(-half_width, half_width, -half_width, half_width), cmap="viridis",
                  vmin=0, vmax=top)
        ax.set_title(titles[name] + f", mass on grid {results['grid_mass'][name]:.3f}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    save_png(fig, path)


if __name__ == "__main__":
    main()
