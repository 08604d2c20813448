"""Command line: ``numpyro-ebm gmm|digits|mnist ...`` runs the paper's experiments and saves figures."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Sequence

from numpyro_ebm._cli_types import (
    _acceptance_or_none,
    _classes,
    _int_at_least,
    _nonnegative_float,
    _nonnegative_int,
    _positive_float,
    _positive_int,
    _positive_int_or_none,
    _seed,
)

__all__ = ["main"]


def _check_output_dir(parser: argparse.ArgumentParser, path: str) -> None:
    """Create ``path`` and write a scratch file in it, before any training: an unusable
    output directory fails at once (exit 2, naming ``--output-dir``), not after the run."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        parser.error(f"argument --output-dir: cannot create or write to {path!r}: {err}")


def _methods(text: str) -> tuple[str, ...]:
    from numpyro_ebm.train import METHODS

    methods = tuple(m.strip() for m in text.split(",") if m.strip())
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise argparse.ArgumentTypeError(f"methods must be a comma list from {METHODS}, got {text!r}")
    return methods


def _add_training_options(
    p: argparse.ArgumentParser, d, *, output_dir: str, learning_rate_help: str, methods_help: str
) -> None:
    """Options every experiment command shares; defaults from its config ``d``."""
    p.add_argument(
        "--num-walkers", type=_int_at_least(2), default=d.num_walkers, help="walkers, >= 2 (default %(default)s)"
    )
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
        help=learning_rate_help + (" (default %(default)s)" if d.learning_rate is not None else ""),
    )
    p.add_argument("--methods", type=_methods, default=d.methods, help=methods_help)
    p.add_argument("--seed", type=_seed, default=d.seed, help="PRNG seed (default %(default)s)")
    p.add_argument(
        "--output-dir", default=output_dir,
        help="where the PNGs, JSON summary and table go (default %(default)s)",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.add_argument(
        "--compilation-cache", default=os.environ.get("NUMPYRO_EBM_COMPILATION_CACHE"), metavar="DIR",
        help="JAX's persistent compilation cache in DIR: a second run with the same settings loads "
        "its compiled code instead of compiling again (default $NUMPYRO_EBM_COMPILATION_CACHE, or none)",
    )


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
    _add_training_options(
        p, d, output_dir=os.path.join("results", "gmm"),
        learning_rate_help="gradient-descent learning rate of the means",
        methods_help="comma-separated subset of jarzynski,pcd,cd (default all)",
    )
    p.add_argument(
        "--logit-learning-rate", type=_positive_float, default=d.logit_learning_rate,
        help="gradient-descent learning rate of the log-weights (default %(default)s)",
    )
    p.add_argument(
        "--float32", action="store_true", help="run in float32 (default float64, as the paper)"
    )
    p.add_argument(
        "--no-island-resampling", action="store_true",
        help="resample all walkers together (default: 10 groups resampled on their own, which "
        "makes the cross-entropy standard error honest; needs walkers divisible by 10)",
    )
    p.add_argument(
        "--heldout-groups", type=int, default=0,
        help="of the 10 island groups, this many (2-9) are left out of the gradient and give a "
        "cross-entropy estimate without feedback bias (default 0)",
    )
    _add_run_output_options(p)
    _add_process_options(p)


def _add_process_options(p: argparse.ArgumentParser) -> None:
    """How this process joins the others (numpyro_ebm.distributed); read before anything
    else (``_join_processes``), since JAX must not have started."""
    g = p.add_argument_group(
        "several processes or devices",
        "with --coordinator (or the environment variables NUMPYRO_EBM_COORDINATOR, "
        "NUMPYRO_EBM_NUM_PROCESSES, NUMPYRO_EBM_PROCESS_ID) or --cpu-devices the walkers are "
        "split over every device of every process; every process runs the same command",
    )
    g.add_argument("--coordinator", metavar="HOST:PORT", default=None,
                   help="address of process 0, where the processes meet")
    g.add_argument("--num-processes", type=_positive_int, default=None, help="number of processes")
    g.add_argument("--process-id", type=_int_at_least(0), default=None, help="this process, 0 .. P-1")
    g.add_argument("--cpu-devices", type=_positive_int, default=None,
                   help="split the CPU into this many devices per process (for tests)")


def _add_run_output_options(p: argparse.ArgumentParser) -> None:
    """Checkpoints and the final walkers."""
    p.add_argument("--checkpoint-dir", default=None,
                   help="Orbax checkpoints of each method in DIR/<method> (shared by all processes)")
    p.add_argument("--checkpoint-every", type=_positive_int, default=None,
                   help="checkpoint interval in iterations, rounded down to a multiple of the snapshot "
                   "interval (default: every 250-iteration chunk)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoints in --checkpoint-dir")
    p.add_argument("--save-state", action="store_true",
                   help="also save the final parameters and walkers as gmm_<method>_state.npz")


_PROCESS_ENV = {"coordinator": "NUMPYRO_EBM_COORDINATOR", "num_processes": "NUMPYRO_EBM_NUM_PROCESSES",
                "process_id": "NUMPYRO_EBM_PROCESS_ID"}


def _join_processes(argv: Sequence[str] | None) -> bool:
    """Join the other processes (or split the CPU) as the process options say, before JAX
    starts; True when the walkers are to be split over several devices."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] != "gmm":  # the other commands run on one device
        return False
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    _add_process_options(pre)
    known, _ = pre.parse_known_args(argv)
    launch = {k: getattr(known, k) for k in _PROCESS_ENV}
    if all(v is None for v in launch.values()) and not any(os.environ.get(e) for e in _PROCESS_ENV.values()):
        if known.cpu_devices is None:
            return False
        import jax

        jax.config.update("jax_num_cpu_devices", known.cpu_devices)
        return True
    from numpyro_ebm import distributed

    distributed.initialize(launch["coordinator"], launch["num_processes"], launch["process_id"],
                           cpu_devices=known.cpu_devices)
    return True


def _save_state(results, path_of) -> None:
    """``gmm_<method>_state.npz``: final parameters, walkers, log-weights, log normaliser."""
    import numpy as np

    for method in results["config"].methods:
        result = results[method]["result"]
        arrays = {f"params_{k}": np.asarray(v) for k, v in result.params.items()}
        arrays.update(particles=np.asarray(result.state.particles),
                      log_weights=np.asarray(result.state.log_weights),
                      log_normalizer=np.asarray(result.state.log_normalizer),
                      resampled=np.asarray(result.trace.get("resampled", [])))
        np.savez(path_of(f"gmm_{method}_state.npz"), **arrays)


def _gmm_config(gmm, args: argparse.Namespace):
    return gmm.GMMConfig(
        dim=args.dim, num_data=args.num_data, num_walkers=args.num_walkers,
        num_iterations=args.num_iterations, step_size=args.step_size,
        learning_rate=args.learning_rate, logit_learning_rate=args.logit_learning_rate,
        methods=args.methods, seed=args.seed, float64=not args.float32,
        island_resampling=not args.no_island_resampling, heldout_groups=args.heldout_groups,
    )


def _run_gmm(args: argparse.Namespace) -> int:
    from numpyro_ebm.experiments import gmm

    try:
        config = _gmm_config(gmm, args)
    except ValueError as err:
        print(f"numpyro-ebm gmm: error: {err}", file=sys.stderr)
        return 2
    mesh, main = None, True
    if getattr(args, "split_walkers", False):
        from numpyro_ebm import distributed

        mesh, main = distributed.global_mesh(), distributed.is_main_process()
    if args.resume and args.checkpoint_dir is None:
        print("numpyro-ebm gmm: error: --resume needs --checkpoint-dir", file=sys.stderr)
        return 2
    if main:
        os.makedirs(args.output_dir, exist_ok=True)
        where = "" if mesh is None else f", split over {mesh.size} devices of {_num_processes(mesh)} process(es)"
        print(
            f"Gaussian mixture: d={config.dim}, {config.num_data} data points, "
            f"{config.num_walkers} walkers{where}, {config.num_iterations} iterations, "
            f"methods {', '.join(config.methods)}",
            flush=True,
        )
    try:
        results = gmm.run(config, progress=main and not args.no_progress, mesh=mesh,
                          checkpoint_dir=args.checkpoint_dir, checkpoint_every=args.checkpoint_every,
                          resume=args.resume)
    except ValueError as err:  # a bad setting, processes that disagree, another run's checkpoint
        print(f"numpyro-ebm gmm: error: {err}", file=sys.stderr)
        return 2
    if not main:  # process 0 writes the files
        return 0
    if args.save_state:
        _save_state(results, lambda name: os.path.join(args.output_dir, name))
    _write_gmm_outputs(args.output_dir, config, results)
    return 0


_GMM_SUMMARY_KEYS = (
    "final_small_mass", "final_exact_cross_entropy", "final_cross_entropy_estimate", "ce_estimate_error",
    "max_abs_ce_estimate_error", "final_cross_entropy_corrected", "ce_corrected_error",
    "final_cross_entropy_stderr", "num_resampling", "wall_time",
)


def _write_gmm_outputs(output_dir: str, config, results: dict) -> None:
    """Print the table and write gmm.png, gmm_training_jarzynski.png, gmm.json, gmm.txt."""
    from numpyro_ebm.experiments import gmm

    table = gmm.format_table(results)
    print(table)
    gmm.plot(results, os.path.join(output_dir, "gmm.png"))
    if "jarzynski" in results:
        from numpyro_ebm.diagnostics import plot_training

        plot_training(
            results["jarzynski"]["result"],
            exact_cross_entropy=results["jarzynski"]["exact_cross_entropy"],
            path=os.path.join(output_dir, "gmm_training_jarzynski.png"),
        )
    summary = {
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(config).items()},
        "methods": {m: {k: results[m][k] for k in _GMM_SUMMARY_KEYS if k in results[m]} for m in config.methods},
    }
    with open(os.path.join(output_dir, "gmm.json"), "w") as fh:
        json.dump(summary, fh, indent=2)
    with open(os.path.join(output_dir, "gmm.txt"), "w") as fh:
        fh.write(table + "\n")
    print(f"saved gmm.png, gmm_training_jarzynski.png, gmm.json and gmm.txt in {output_dir}")


def _digits_subparser(sub: argparse._SubParsersAction, name: str, d) -> argparse.ArgumentParser:
    """The ``digits`` or ``mnist`` subcommand; ``mnist`` with its data and network options."""
    if name != "mnist":
        return sub.add_parser(
            "digits",
            help="the imbalanced-digits experiment on scikit-learn's 8x8 digits (Jarzynski vs PCD)",
            description="Train an MLP energy on scikit-learn's 8x8 digits in unequal proportions with "
            "Jarzynski and PCD and compare the class masses among the walkers with the truth.",
        )
    p = sub.add_parser(
        "mnist",
        help="the imbalanced-digits experiment on MNIST (28x28) from a directory of IDX files",
        description="Train a small convolutional energy on MNIST digits in unequal proportions with "
        "Jarzynski and PCD and compare the class masses among the walkers with the truth.",
    )
    p.add_argument("--data-dir", required=True, help="directory with the MNIST IDX files (gzipped or not)")
    p.add_argument(
        "--split", choices=("train", "test"), default=d.split,
        help="which IDX files to read: train-* or t10k-* (default %(default)s)",
    )
    p.add_argument("--model", choices=("mlp", "conv"), default=d.model, help="energy network (default %(default)s)")
    p.add_argument(
        "--channels", type=_positive_int, default=d.channels,
        help="channels of the first convolution (default %(default)s)",
    )
    return p


def _add_digit_subset_options(p: argparse.ArgumentParser, d) -> None:
    """Which digits, in which proportions, how many training images."""
    p.add_argument("--classes", type=_classes, default=d.classes, help="comma list of digits (default 2,3,6)")
    p.add_argument(
        "--proportions", type=_classes, default=d.proportions,
        help="comma list of integer proportions (default 4,2,1)",
    )
    p.add_argument(
        "--num-samples", type=_positive_int, default=d.num_samples,
        help="training images, a multiple of the proportions' sum (default %(default)s)",
    )


def _add_sgd_options(p: argparse.ArgumentParser, d) -> None:
    """Weight decay and gradient clipping of the SGD optimiser."""
    p.add_argument(
        "--weight-decay", type=_nonnegative_float, default=d.weight_decay,
        help="weight decay, an L2 penalty on the parameters that changes the objective (default %(default)s)",
    )
    p.add_argument(
        "--clip-norm", type=_positive_float, default=d.clip_norm,
        help="gradient clipping: largest global norm of the cross-entropy gradient (default %(default)s)",
    )


def _add_moves_and_data_options(p: argparse.ArgumentParser, d) -> None:
    """ULA moves per iteration, the noisy copies of the images and the data minibatch."""
    p.add_argument(
        "--num-mcmc-steps", "--num-steps", dest="num_mcmc_steps", type=_positive_int,
        default=d.num_mcmc_steps,
        help="ULA moves per training iteration (default %(default)s; --num-steps is the old name)",
    )
    p.add_argument(
        "--noise-std", type=_nonnegative_float, default=d.noise_std,
        help="pixel noise of the fixed noisy copies of the training images, 0: none (default %(default)s)",
    )
    p.add_argument(
        "--noise-copies", type=_positive_int, default=d.noise_copies,
        help="noisy copies of every training image (default %(default)s)",
    )
    p.add_argument(
        "--data-batch-size", "--batch-size", dest="data_batch_size", type=_positive_int,
        default=d.data_batch_size,
        help="data minibatch (default %(default)s: all images)",
    )


def _add_long_run_options(p: argparse.ArgumentParser, d) -> None:
    """What keeps long runs healthy (issue 13): learning-rate decay, step-size adaptation,
    rejuvenation, an optional energy penalty, and the classifier that measures the masses."""
    p.add_argument("--optimizer", choices=("sgd", "adam"), default=d.optimizer,
                   help="after clipping and weight decay: SGD, or Adam (per-coordinate steps of about the "
                   "learning rate; scale it down accordingly) (default %(default)s)")
    p.add_argument("--learning-rate-schedule", choices=("constant", "linear"), default=d.learning_rate_schedule,
                   help="constant, or linear decay to 0 at the last iteration (default %(default)s)")
    p.add_argument("--target-acceptance", type=_acceptance_or_none, default=d.target_acceptance,
                   help="adapt the ULA step size so that MALA's acceptance approaches this; "
                   "'none': fixed step size (default %(default)s)")
    p.add_argument("--acceptance-probe-every", type=_positive_int_or_none, default=d.acceptance_probe_every,
                   help="measure that acceptance with a probe proposal every this many iterations (one "
                   "extra walker evaluation each time); 'none': from the weights' free proxy, which "
                   "noisy parameter updates pull down (default %(default)s)")
    p.add_argument("--rejuvenation-moves", type=_nonnegative_int, default=d.rejuvenation_moves,
                   help="MALA moves at fixed parameters after each resampling, 0: none (default %(default)s)")
    p.add_argument("--energy-penalty", type=_nonnegative_float, default=d.energy_penalty,
                   help="alpha of the squared-energy penalty, which CHANGES THE OBJECTIVE; 0: none "
                   "(default %(default)s)")
    p.add_argument("--classifier", choices=("logistic", "cnn"), default=d.classifier,
                   help="classifier that labels the walkers (default %(default)s)")
    p.add_argument("--num-classifiers", type=_positive_int, default=d.num_classifiers,
                   help="classifiers (different seeds) that read the final walkers; the spread of their masses "
                   "is reported beside the error (default %(default)s)")
    p.add_argument("--label-every", type=_positive_int, default=d.label_every,
                   help="label the walkers every this many iterations (default %(default)s)")
    p.add_argument("--preset", choices=("theory", "authors"), default="theory",
                   help="'authors': the settings of the paper authors' public MNIST code, OUTSIDE THE THEORY "
                   "(tempered subset moves, energy penalty, Adam; see experiments.digits.authors_preset); they "
                   "replace the step size, learning rate, optimiser, penalty, walkers, batch, moves and "
                   "resampling options; the other options apply (default %(default)s)")


def _add_digits_like(sub: argparse._SubParsersAction, name: str) -> None:
    from numpyro_ebm.experiments.digits import DigitsConfig, mnist_defaults

    d = mnist_defaults() if name == "mnist" else DigitsConfig()
    p = _digits_subparser(sub, name, d)
    _add_digit_subset_options(p, d)
    p.add_argument("--hidden", type=_positive_int, default=d.hidden, help="hidden units (default %(default)s)")
    _add_training_options(
        p, d, output_dir=os.path.join("results", name),
        learning_rate_help="SGD learning rate at the first iteration"
        + ("" if d.learning_rate is not None else " (default: 0.005 up to 8000 iterations, 40/iterations up to "
           "16 000, 0.0025 beyond; experiments.digits.peak_learning_rate)"),
        methods_help="comma-separated subset of jarzynski,pcd,cd (default jarzynski,pcd)",
    )
    _add_sgd_options(p, d)
    _add_moves_and_data_options(p, d)
    _add_long_run_options(p, d)


def _run_digits_like(args: argparse.Namespace) -> int:
    import dataclasses

    from numpyro_ebm.experiments import digits

    mnist = args.command == "mnist"
    base = digits.mnist_defaults() if mnist else digits.DigitsConfig()
    changes = dict(
        classes=args.classes, proportions=args.proportions, num_samples=args.num_samples,
        hidden=args.hidden, num_walkers=args.num_walkers, num_iterations=args.num_iterations,
        step_size=args.step_size, learning_rate=args.learning_rate, weight_decay=args.weight_decay,
        clip_norm=args.clip_norm, num_mcmc_steps=args.num_mcmc_steps, noise_std=args.noise_std,
        noise_copies=args.noise_copies, data_batch_size=args.data_batch_size, methods=args.methods, seed=args.seed,
        learning_rate_schedule=args.learning_rate_schedule, target_acceptance=args.target_acceptance,
        acceptance_probe_every=args.acceptance_probe_every, optimizer=args.optimizer,
        rejuvenation_moves=args.rejuvenation_moves, energy_penalty=args.energy_penalty, classifier=args.classifier,
        num_classifiers=args.num_classifiers, label_every=args.label_every,
    )
    if mnist:
        changes.update(data_dir=args.data_dir, split=args.split, model=args.model, channels=args.channels)
    try:
        config = dataclasses.replace(base, **changes)
        if args.preset == "authors":
            config = digits.authors_preset(config)
        data = digits.load_data(config)
    except (ValueError, FileNotFoundError) as err:
        print(f"numpyro-ebm {args.command}: error: {err}", file=sys.stderr)
        return 2
    os.makedirs(args.output_dir, exist_ok=True)
    print(
        f"{args.command}: digits {config.classes} at {config.proportions} "
        f"({', '.join(f'{c}: {n}' for c, n in data.counts.items())} training images), "
        f"{config.num_walkers} walkers, {config.num_iterations} iterations, methods {', '.join(config.methods)}",
        flush=True,
    )
    results = digits.run(config, progress=not args.no_progress, data=data)
    print(f"classifier held-out accuracy: {results['classifier'].test_accuracy:.3f}")
    table = digits.format_table(results)
    print(table)
    name = args.command
    saved = digits.save_figures(results, args.output_dir, prefix=name)
    with open(os.path.join(args.output_dir, f"{name}.json"), "w") as fh:
        json.dump(digits.summary(results), fh, indent=2)
    with open(os.path.join(args.output_dir, f"{name}.txt"), "w") as fh:
        fh.write(table + "\n")
    names = ", ".join(os.path.basename(f) for f in saved)
    print(f"saved {names}, {name}.json and {name}.txt in {args.output_dir}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="numpyro-ebm",
        description="Train energy-based models with Jarzynski-weighted Langevin walkers.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_gmm(sub)
    _add_digits_like(sub, "digits")
    _add_digits_like(sub, "mnist")
    return parser


def _use_compilation_cache(path: str | None) -> None:
    """Switch on JAX's persistent compilation cache in ``path`` (every compilation cached,
    however short), or leave it off when ``path`` is ``None``."""
    if path:
        import jax

        os.makedirs(path, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def _num_processes(mesh) -> int:
    return len({device.process_index for device in mesh.devices.flat})


def main(argv: Sequence[str] | None = None) -> int:
    try:
        split_walkers = _join_processes(argv)
    except (ValueError, RuntimeError) as err:
        print(f"numpyro-ebm: error: {err}", file=sys.stderr)
        return 2
    parser = build_parser()
    args = parser.parse_args(argv)
    args.split_walkers = split_walkers
    _check_output_dir(parser, args.output_dir)
    _use_compilation_cache(args.compilation_cache)
    if args.command == "gmm":
        return _run_gmm(args)
    if args.command in ("digits", "mnist"):
        return _run_digits_like(args)
    parser.error(f"unknown command {args.command!r}")  # pragma: no cover
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
