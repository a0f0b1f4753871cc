r"""RealNVP and NICE on a 2-D mixture, trained by maximum likelihood under SVI (MATH.md F1, F2).

Data: the six-mode ring ``GaussianMixture.ring()`` (radius 2.5, s = 0.45, weights k / 21), whose
exact log-density gives the true NLL of the held-out points.

**Models.** Both flows map the data x to a latent z = f(x) ~ N(0, I) through layers
f = f_K o ... o f_1 (``probdiff.flows``), and the change of variables (F1) gives

$$ \log p_\theta(x) = \log\mathcal N\big(f(x); 0, I\big) + \sum_k \log\Big|\det\frac{\partial f_k}{\partial h_{k-1}}\Big| . $$

* RealNVP: an ActNorm (data-dependent initialisation: the training data leave it with zero mean
  and unit variance per coordinate), then K affine couplings (F2)
  y_B = x_B exp(s(x_A)) + t(x_A), s = 3 tanh(r / 3), with alternating masks (x_A = x_1 then
  x_2: the permutation between couplings); log|det| = sum s.
* NICE: the same ActNorm, K additive couplings y_B = x_B + t(x_A) (log|det| = 0), and a final
  diagonal scaling (an ActNorm on vectors), the only layer besides the first that changes volume.

Every t and (t, r) is a ``probdiff.nets.MLP`` (its time input unused, its last layer zero, so
both flows start as the ActNorm alone), registered with ``numpyro.contrib.module.eqx_module``.
The model is one observed site, so ``Trace_ELBO`` is minus the log-likelihood:

    def model(x):
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("x", Flow(layers(), (2,)), obs=x)

    svi = SVI(model, lambda x: None, optax.adam(lr), Trace_ELBO())

with Adam's learning rate decaying from ``--lr`` to a tenth of it (cosine); ``probdiff.training.fit``
runs the steps on minibatches of 256 with an EMA of the parameters (decay 0.99).

**Evaluation.** The held-out NLL (nats, and bits per dimension -log p / (2 log 2)) of the EMA
parameters on ``--eval-points`` points, next to the true NLL of the same points (the difference
estimates KL(p || p_theta) >= 0, with its paired standard error) and the NLL of the initial
flow; samples (z ~ N(0, I) through f^{-1}) and their energy distance to held-out data, next to
the distance between two exact sample sets; exp(log p_theta) on a grid.

**Expected output** (defaults, measured on 2026-11-21 on 2 CPU cores heavily shared with other
jobs, 103-108 s in all, 44-48 s of training per flow): both flows start at a held-out NLL of 3.966
nats (the ActNorm alone: a Gaussian fit) against the true 2.879 +- 0.024 of the same 2000 points.
RealNVP ends at 2.930, 0.050 +- 0.007 nats above the truth (2.113 against 2.077 bits/dim), and
puts its mass on the six modes, joined by thin filaments where the flow folds the Gaussian;
NICE ends at 3.020, 0.141 +- 0.010 above: its couplings cannot change volume locally (only
the two ActNorms do), so it cannot shrink the space between the modes and leaves ridges of
density there. The energy distances of 2000 samples to held-out data (-0.0004 and 0.0022) are
at the noise level of two exact sample sets (-0.0017). See ``docs/api/flows.md``.

Files in ``--out``: ``density.png`` (the true density next to exp log p of both flows),
``samples.png`` (held-out data next to samples of both flows) and ``metrics.json``.

Run: ``python examples/flow_2d.py --out out/flow_2d``, or tiny: ``python examples/flow_2d.py --tiny --out /tmp/flow``.
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
import numpyro  # noqa: E402
import optax  # noqa: E402
from numpyro import handlers  # noqa: E402
from numpyro.contrib.module import eqx_module  # noqa: E402
from numpyro.infer import SVI, Trace_ELBO  # noqa: E402

from probdiff import analytic  # noqa: E402
from probdiff._io import parse_example_args, parse_widths, prepare_out_dir, write_json  # noqa: E402
from probdiff.data import energy_distance  # noqa: E402
from probdiff.flows import ActNorm, AdditiveCoupling, AffineCoupling, Flow, checkerboard_mask  # noqa: E402
from probdiff.nets import MLP  # noqa: E402
from probdiff.plotting import save_png  # noqa: E402
from probdiff.training import fit, init_state  # noqa: E402

FILES = ("density.png", "samples.png", "metrics.json")
KINDS = ("realnvp", "nice")
NAMES = {"realnvp": "RealNVP", "nice": "NICE"}

# sizes of a full run and of --tiny (used by the tests); a flag given explicitly wins
FULL = {"steps": 6000, "batch_size": 256, "hidden": "64,64", "layers": 8, "eval_points": 2000, "n": 2000, "grid": 80}
TINY = {"steps": 20, "batch_size": 64, "hidden": "8", "layers": 1, "eval_points": 64, "n": 64, "grid": 8}


def make_flow_builder(kind, nets0, actnorm0):
    """A function that builds the flow inside a model (or under ``handlers.substitute``) from NumPyro parameters."""

    def build():
        # the data-dependent initialisation only sets the starting values of these parameters
        layers = [ActNorm(numpyro.param("actnorm_shift", actnorm0.shift),
                          log_scale=numpyro.param("actnorm_log_scale", actnorm0.log_abs_scale))]
        for k, net0 in enumerate(nets0):
            net = eqx_module(f"coupling{k}", net0)
            mask = checkerboard_mask((2,), k % 2)  # x_A alternates between x_1 and x_2
            layers.append(AffineCoupling(net, mask=mask) if kind == "realnvp" else AdditiveCoupling(net, mask=mask))
        if kind == "nice":  # NICE's diagonal scaling layer
            layers.append(ActNorm(jnp.zeros(2), log_scale=numpyro.param("scaling_log_s", jnp.zeros(2))))
        return Flow(layers, (2,))

    return build


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny sizes, for the tests (seconds)")
    p.add_argument("--data-size", type=int, default=20000, help="training points (default 20000)")
    p.add_argument("--steps", type=int, help=f"training steps per flow (default {FULL['steps']})")
    p.add_argument("--batch-size", type=int, help=f"minibatch size (default {FULL['batch_size']})")
    p.add_argument("--layers", type=int, help=f"couplings per flow (default {FULL['layers']})")
    p.add_argument("--hidden", help=f"hidden widths of each coupling's MLP (default {FULL['hidden']})")
    p.add_argument("--lr", type=float, default=2e-3, help="Adam's initial learning rate, cosine-decayed to a tenth (default 2e-3)")
    p.add_argument("--ema-decay", type=float, default=0.99, help="EMA decay of the parameters (default 0.99)")
    p.add_argument("--eval-points", type=int, help=f"held-out points for the NLL (default {FULL['eval_points']})")
    p.add_argument("--n", type=int, help=f"samples per flow (default {FULL['n']})")
    p.add_argument("--grid", type=int, help=f"grid points per axis of the density maps (default {FULL['grid']})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="out/flow_2d")
    p.add_argument("--overwrite", action="store_true")
    args = parse_example_args(p, argv, FULL, TINY)
    hidden = parse_widths(p, args.hidden)
    if (min(hidden) < 1 or args.steps < 1 or args.batch_size < 1 or args.layers < 1 or args.eval_points < 2
            or args.n < 2 or args.grid < 2 or args.data_size < 2):
        p.error("need positive sizes, and at least 2 points for every evaluation and sample set")
    if not args.lr > 0:
        p.error("--lr must be > 0")
    if not 0 <= args.ema_decay < 1:
        p.error("need 0 <= --ema-decay < 1")
    out = prepare_out_dir(args.out, FILES, overwrite=args.overwrite)

    t_start = time.time()
    mixture, half_width = analytic.GaussianMixture.ring(), 4.2
    k_data, k_net, k_fit, k_samp = jax.random.split(jax.random.key(args.seed), 4)
    pool = jax.jit(mixture.sample, static_argnums=1)(k_data, args.data_size + args.eval_points + 3 * args.n)
    x_train, rest = pool[: args.data_size], pool[args.data_size:]
    x_eval, x_ref, null_a, null_b = (rest[: args.eval_points], rest[args.eval_points: args.eval_points + args.n],
                                     rest[-2 * args.n: -args.n], rest[-args.n:])
    true_lp = np.asarray(mixture.log_prob(x_eval), np.float64)
    actnorm0 = ActNorm.initialize(x_train)  # zero mean, unit variance per coordinate on the training data

    g = np.linspace(-half_width, half_width, args.grid)
    gx, gy = np.meshgrid(g, g)
    pts = jnp.asarray(np.stack([gx.ravel(), gy.ravel()], 1), jnp.float32)
    x_eval_grid = jnp.concatenate([x_eval, pts])
    dens = {"true": np.exp(np.asarray(mixture.log_prob(pts), np.float64)).reshape(gx.shape)}
    cell = (g[1] - g[0]) ** 2
    ed = jax.jit(energy_distance)
    results = {"eval_points": args.eval_points, "true_nll": float(-true_lp.mean()),
               "true_nll_se": float(true_lp.std(ddof=1) / math.sqrt(len(true_lp))),
               "energy_distance_null": float(ed(null_a, null_b)), "flows": {}}
    samples = {}
    for i, kind in enumerate(KINDS):
        t0 = time.time()
        keys = jax.random.split(jax.random.fold_in(k_net, i), args.layers)
        nets0 = [MLP(2, key, hidden=hidden, learn_variance=(kind == "realnvp")) for key in keys]
        build = make_flow_builder(kind, nets0, actnorm0)

        def model(x, build=build):
            flow = build()
            with numpyro.plate("data", x.shape[0]):
                numpyro.sample("x", flow, obs=x)

        def flow_at(params, build=build):
            with handlers.substitute(data=params):
                return build()

        lr = optax.cosine_decay_schedule(args.lr, args.steps, alpha=0.1)  # decays to lr / 10
        svi = SVI(model, lambda x: None, optax.adam(lr), Trace_ELBO())
        # one compiled evaluation: held-out points and grid together
        log_prob = jax.jit(lambda prm, x, flow_at=flow_at: flow_at(prm).log_prob(x))
        # compiled: faster than running the model eagerly (the key is fit's own split, as it would init)
        state0 = jax.jit(lambda k, b, svi=svi: init_state(svi, k, b))(jax.random.split(k_fit)[1], x_train[: args.batch_size])
        res = fit(svi, x_train, args.steps, batch_size=args.batch_size, rng_key=k_fit, state=state0,
                  ema_decay=args.ema_decay, steps_per_call=min(args.steps, 500), progress_bar=False)
        params = res.state.ema
        train_seconds = time.time() - t0

        lp0 = np.asarray(log_prob(state0.ema, x_eval_grid), np.float64)[: args.eval_points]
        lp_all = np.asarray(log_prob(params, x_eval_grid), np.float64)
        lp, lp_grid = lp_all[: args.eval_points], lp_all[args.eval_points:]
        diff = true_lp - lp
        samples[kind] = np.asarray(jax.jit(lambda prm, k, flow_at=flow_at: flow_at(prm).sample(k, (args.n,)))(
            params, jax.random.fold_in(k_samp, i)))
        dens[kind] = np.exp(lp_grid).reshape(gx.shape)
        losses = np.asarray(res.losses) / args.batch_size
        tail = max(1, len(losses) // 10)
        results["flows"][kind] = {
            "layers": len(flow_at(params).bijectors),
            "parameters": int(sum(np.size(v) for v in jax.tree_util.tree_leaves(params))),
            "nll": float(-lp.mean()),
            "nll_se": float(lp.std(ddof=1) / math.sqrt(len(lp))),
            "minus_true": float(diff.mean()),
            "minus_true_se": float(diff.std(ddof=1) / math.sqrt(len(diff))),
            "initial_nll": float(-lp0.mean()),
            "bits_per_dim": float(-lp.mean() / (2 * math.log(2.0))),
            "initial_loss": float(losses[:tail].mean()),
            "final_loss": float(losses[-tail:].mean()),
            "energy_distance": float(ed(jnp.asarray(samples[kind]), x_ref)),
            "grid_mass": float(dens[kind].sum() * cell),
            "seconds": time.time() - t0,
            "train_seconds": train_seconds,
        }
        r = results["flows"][kind]
        print(f"{NAMES[kind]}: {args.steps} steps in {train_seconds:.0f} s; held-out NLL {r['initial_nll']:.3f} -> "
              f"{r['nll']:.3f} (true {results['true_nll']:.3f})", flush=True)
    results["true_bits_per_dim"] = results["true_nll"] / (2 * math.log(2.0))
    results["grid_mass_true"] = float(dens["true"].sum() * cell)
    results["seconds"] = time.time() - t_start

    plot_density(out / "density.png", dens, results, half_width)
    plot_samples(out / "samples.png", np.asarray(x_ref), samples, results, half_width)
    write_json(out / "metrics.json", {"config": vars(args), "results": results})

    print(f"\nring: {args.eval_points} held-out points; NLL in nats (bits/dim = NLL / (2 log 2))")
    print(f"{'':22s} {'NLL':>7s} {'SE':>6s} {'bits/dim':>8s} {'- true':>7s} {'SE':>6s} {'initial':>8s} "
          f"{'energy d.':>9s} {'params':>7s}")
    print(f"{'true density':22s} {results['true_nll']:7.3f} {results['true_nll_se']:6.3f} "
          f"{results['true_bits_per_dim']:8.3f} {'':7s} {'':6s} {'':8s} {results['energy_distance_null']:9.4f}")
    for kind, r in results["flows"].items():
        label = f"{NAMES[kind]} ({args.layers} couplings)"
        print(f"{label:22s} {r['nll']:7.3f} {r['nll_se']:6.3f} {r['bits_per_dim']:8.3f} {r['minus_true']:7.3f} "
              f"{r['minus_true_se']:6.3f} {r['initial_nll']:8.3f} {r['energy_distance']:9.4f} {r['parameters']:7d}")
    print("(energy distance of the true density's row: between two exact sample sets, the noise floor)")
    print(f"seconds: total {results['seconds']:.0f}, " + ", ".join(
        f"{NAMES[k]} {r['seconds']:.0f}" for k, r in results["flows"].items()))
    return results


def plot_density(path, dens, results, half_width):
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.7))
    top = float(dens["true"].max())
    titles = {"true": f"true density\nheld-out NLL {results['true_nll']:.3f}"}
    for kind, r in results["flows"].items():
        titles[kind] = f"{NAMES[kind]}: exp log p\nheld-out NLL {r['nll']:.3f}"
    for ax, (name, d) in zip(axes, dens.items(), strict=True):
        ax.imshow(d, origin="lower", extent=(-half_width, half_width, -half_width, half_width), cmap="viridis",
                  vmin=0, vmax=top)
        ax.set_title(titles[name], fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    save_png(fig, path)


def plot_samples(path, x_ref, samples, results, half_width):
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.7))
    panels = [("held-out data", x_ref, "0.4")] + [
        (f"{NAMES[k]} samples, energy distance {results['flows'][k]['energy_distance']:.4f}\n"
         f"(two exact sets: {results['energy_distance_null']:.4f})", s, c)
        for (k, s), c in zip(samples.items(), ("tab:blue", "tab:orange"), strict=True)]
    for ax, (title, x, color) in zip(axes, panels, strict=True):
        ax.scatter(x[:, 0], x[:, 1], s=1, alpha=0.5, color=color, linewidths=0)
        ax.set_title(title, fontsize=8)
        ax.set_xlim(-half_width, half_width)
        ax.set_ylim(-half_width, half_width)
        ax.set_aspect("equal")
    fig.tight_layout()
    save_png(fig, path)


if __name__ == "__main__":
    main()
