"""Command line: ``numpyro-ebm gmm ...`` runs the paper's experiments and saves figures."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

__all__ = ["main"]


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {value}")
    return value


def _methods(text: str) -> tuple[str, ...]:
    from numpyro_ebm.train import METHODS

    methods = tuple(m.strip() for m in text.split(",") if m.strip())
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise argparse.ArgumentTypeError(f"methods must be a comma list from {METHODS}, got {text!r}")
    return methods


def _add_gmm(sub: argparse._SubParsersAction) -> None:
    from numpyro_ebm.experiments.gmm import GMMConfig

    d = GMMConfig()
    p = sub.add_parser(
        "gmm",
        help="the paper's two-mode Gaussian-mixture experiment (Jarzynski vs PCD vs CD)",
        description="Train a two-mode mixture on data from a teacher with masses 1/4, 3/4 "
        "and compare how Jarzynski, PCD and CD recover the small mass.",
    )
    p.add_argument("--dim", type=_positive_int, default=d.dim, help="dimension d (default %(default)s)")
    p.add_argument("--num-data", type=_positive_int, default=d.num_data, help="data points (default %(default)s)")
    p.add_argument("--num-walkers", type=_positive_int, default=d.num_walkers, help="walkers (default %(default)s)")
    p.add_argument(
        "--num-iterations", type=_positive_int, default=d.num_iterations,
        help="training iterations (default %(default)s)",
    )
    p.add_argument(
        "--step-size", type=_positive_float, default=d.step_size,
        help="ULA step size h (default %(default)s)",
    )
    p.add_argument(
        "--learning-rate", type=_positive_float, default=d.learning_rate,
        help="gradient-descent learning rate of the means (default %(default)s)",
    )
    p.add_argument(
        "--logit-learning-rate", type=_positive_float, default=d.logit_learning_rate,
        help="gradient-descent learning rate of the log-weights (default %(default)s)",
    )
    p.add_argument(
        "--methods", type=_methods, default=d.methods,
        help="comma-separated subset of jarzynski,pcd,cd (default all)",
    )
    p.add_argument("--seed", type=int, default=d.seed, help="PRNG seed (default %(default)s)")
    p.add_argument(
        "--float32", action="store_true", help="run in float32 (default float64, as the paper)"
    )
    p.add_argument(
        "--output-dir", default=os.path.join("results", "gmm"),
        help="where the PNG and JSON summary go (default %(default)s)",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def _run_gmm(args: argparse.Namespace) -> int:
    from numpyro_ebm.experiments import gmm

    config = gmm.GMMConfig(
        dim=args.dim,
        num_data=args.num_data,
        num_walkers=args.num_walkers,
        num_iterations=args.num_iterations,
        step_size=args.step_size,
        learning_rate=args.learning_rate,
        logit_learning_rate=args.logit_learning_rate,
        methods=args.methods,
        seed=args.seed,
        float64=not args.float32,
    )
    os.makedirs(args.output_dir, exist_ok=True)
    print(
        f"Gaussian mixture: d={config.dim}, {config.num_data} data points, "
        f"{config.num_walkers} walkers, {config.num_iterations} iterations, "
        f"methods {', '.join(config.methods)}",
        flush=True,
    )
    results = gmm.run(config, progress=not args.no_progress)
    table = gmm.format_table(results)
    print(table)
    png = os.path.join(args.output_dir, "gmm.png")
    gmm.plot(results, png)
    if "jarzynski" in results:
        from numpyro_ebm.diagnostics import plot_training

        plot_training(
            results["jarzynski"]["result"],
            exact_cross_entropy=results["jarzynski"]["exact_cross_entropy"],
            path=os.path.join(args.output_dir, "gmm_training_jarzynski.png"),
        )
    summary = {
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(config).items()},
        "methods": {
            m: {
                k: results[m][k]
                for k in (
                    "final_small_mass",
                    "final_exact_cross_entropy",
                    "final_cross_entropy_estimate",
                    "ce_estimate_error",
                    "max_abs_ce_estimate_error",
                    "num_resampling",
                    "wall_time",
                )
                if k in results[m]
            }
            for m in config.methods
        },
    }
    with open(os.path.join(args.output_dir, "gmm.json"), "w") as fh:
        json.dump(summary, fh, indent=2)
    with open(os.path.join(args.output_dir, "gmm.txt"), "w") as fh:
        fh.write(table + "\n")
    print(f"saved gmm.png, gmm_training_jarzynski.png, gmm.json and gmm.txt in {args.output_dir}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="numpyro-ebm",
        description="Train energy-based models with Jarzynski-weighted Langevin walkers.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_gmm(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "gmm":
        return _run_gmm(args)
    parser.error(f"unknown command {args.command!r}")  # pragma: no cover
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
