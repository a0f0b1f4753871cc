"""The ``probdiff`` command: ``demo``, ``train``, ``sample``, ``evaluate``.

``probdiff demo`` builds a diffusion on the built-in 2-D Gaussian data set with the exact
optimal eps-function, prints the ELBO terms next to the exact log-likelihood, and writes
``demo.png`` (forward chain and reverse samples), ``denoising_terms.png`` and
``metrics.json`` to ``--out`` (default ``probdiff-demo``). Existing files are never
overwritten unless ``--overwrite`` is given.
"""

from __future__ import annotations

import argparse
import sys
import time

__all__ = ["main", "build_parser"]

DEMO_FILES = ("demo.png", "denoising_terms.png", "metrics.json")


def _positive_int(name):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer; got {text!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"{name} must be >= 1; got {value}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``probdiff`` command."""
    parser = argparse.ArgumentParser(
        prog="probdiff", description="Diffusion models as probabilistic programs in NumPyro."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser(
        "demo",
        help="ELBO terms against the exact log-likelihood on built-in 2-D Gaussian data",
        description=__doc__.split("\n\n")[1],
    )
    demo.add_argument("--out", default="probdiff-demo", help="output folder (default: probdiff-demo)")
    demo.add_argument("--steps", type=_positive_int("--steps"), default=1000, help="T, diffusion steps (default 1000)")
    demo.add_argument(
        "--schedule", choices=("linear", "cosine", "sigmoid"), default="linear", help="noise schedule (default linear)"
    )
    demo.add_argument(
        "--variance", choices=("beta", "beta_tilde"), default="beta", help="reverse variance sigma_t^2 (default beta)"
    )
    demo.add_argument("--points", type=_positive_int("--points"), default=1000, help="data points (default 1000)")
    demo.add_argument("--draws", type=_positive_int("--draws"), default=64, help="Monte-Carlo draws (default 64)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    demo.add_argument("--overwrite", action="store_true", help="replace existing output files")
    from probdiff.cli_train import add_parsers

    add_parsers(sub, _positive_int)
    return parser


def run_demo(args) -> int:
    """Run ``probdiff demo`` with parsed arguments; returns the exit status."""
    import jax
    import numpy as np

    from probdiff import schedules
    from probdiff._io import prepare_out_dir, write_json
    from probdiff.analytic import GaussianData
    from probdiff.demo import format_report, gaussian_diffusion, gaussian_elbo_report
    from probdiff.plotting import plot_chains, plot_denoising_terms

    if args.draws < 2:
        raise SystemExit("probdiff demo: --draws must be >= 2 to give a standard error")
    out = prepare_out_dir(args.out, DEMO_FILES, overwrite=args.overwrite)
    start = time.perf_counter()
    schedule = getattr(schedules, args.schedule)(args.steps)
    data = GaussianData.default_2d()
    diffusion = gaussian_diffusion(data, schedule, args.variance)
    key = jax.random.key(args.seed)
    k_data, k_report, k_fwd, k_rev = jax.random.split(key, 4)
    x_0 = data.sample(k_data, args.points)

    print(f"probdiff demo: data N(mu, Sigma) in 2-D, {schedule}, variance={args.variance!r}")
    print(f"device: {jax.devices()[0].platform}; the eps-function is the exact E[eps | x_t]\n")
    report = gaussian_elbo_report(diffusion, data, x_0, k_report, num_draws=args.draws, trace_draws=8)
    print(format_report(report))

    T = schedule.num_steps
    times = sorted({0, max(1, T // 20), max(1, T // 10), T // 4, T // 2, T})
    from probdiff.distributions import q_marginal

    fwd = [np.asarray(x_0)] + [
        np.asarray(q_marginal(schedule, t, x_0).sample(jax.random.fold_in(k_fwd, t))) for t in times[1:]
    ]
    result = jax.jit(lambda k: diffusion.sample(k, (args.points,), return_trajectory=True))(k_rev)
    traj = np.asarray(result.trajectory)  # traj[k] = x_{T-k}
    rev = [traj[T - t] for t in times]
    fig = plot_chains(np.stack(fwd), np.stack(rev), times, data=np.asarray(x_0))
    fig.savefig(out / "demo.png", dpi=120)
    den = report["denoising_by_t"]
    fig2 = plot_denoising_terms(den["monte_carlo"], exact=den["closed_form"]) if T > 1 else None
    if fig2 is not None:
        fig2.savefig(out / "denoising_terms.png", dpi=120)

    samples = np.asarray(result.x_0)
    metrics = {
        "command": "probdiff demo",
        "schedule": repr(schedule),
        "variance": args.variance,
        "num_steps": T,
        "seed": args.seed,
        "report": report,
        "samples": {
            "mean": samples.mean(0).tolist(),
            "cov": np.cov(samples.T).tolist(),
            "data_mean": np.asarray(data.mu).tolist(),
            "data_cov": np.asarray(data.cov).tolist(),
        },
        "seconds": time.perf_counter() - start,
    }
    write_json(out / "metrics.json", metrics)
    written = [name for name in DEMO_FILES if (out / name).exists()]
    print(f"\nwrote {', '.join(str(out / n) for n in written)} in {metrics['seconds']:.1f} s")
    return 0


def main(argv=None) -> int:
    """Entry point of the ``probdiff`` command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    from probdiff._io import OutputExistsError
    from probdiff.checkpoint import CheckpointError
    from probdiff.cli_train import dispatch

    try:
        if args.command == "demo":
            return run_demo(args)
        status = dispatch(args)
        if status is not None:
            return status
    except (OutputExistsError, NotADirectoryError, FileNotFoundError, CheckpointError, ValueError) as err:
        print(f"probdiff {args.command}: {err}", file=sys.stderr)
        return 1
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
