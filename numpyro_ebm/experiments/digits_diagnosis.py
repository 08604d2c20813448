r"""Diagnosis of a digits run: which part of the log-weight increment degenerates the weights.

:func:`increment_split_run` trains the Jarzynski walkers of a
:class:`~numpyro_ebm.experiments.digits.DigitsConfig` exactly as
:func:`~numpyro_ebm.experiments.digits.run` does (same energy, optimiser, kernel, keys and
data batches), through :func:`numpyro_ebm.training.increments.with_increment_split`, which
records at every iteration the weighted variance of the parameter part
:math:`p_i = U_k(X^i) - U_{k+1}(X^i)` and of the move part :math:`m_i` of the increment
(see that module). Since :math:`\log(\mathrm{ESS}'/\mathrm{ESS}) \approx -\mathrm{Var}_w(p + m)`,
and :func:`~numpyro_ebm.training.increments.accumulated_split` rebuilds the spread of the two
parts accumulated since the last resampling; :func:`plot_increment_split` draws both, and
shows which part drives the resamplings.

``python -m numpyro_ebm.experiments.digits_diagnosis --source mnist --data-dir DIR --out DIR``
runs it (``--help`` for the settings) and writes a JSON summary and the figure.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from typing import Any

import jax
import numpy as np

from numpyro_ebm.experiments import digits
from numpyro_ebm.step_size import step_size_adaptation
from numpyro_ebm.training.increments import accumulated_split, with_increment_split
from numpyro_ebm.training.loop import run as run_loop
from numpyro_ebm.training.trainer import build_trainer

__all__ = ["increment_split_run", "summarize_split", "plot_increment_split"]


def increment_split_run(config: digits.DigitsConfig, data=None) -> dict[str, Any]:
    """Train Jarzynski walkers with ``config`` while recording the increment split; returns
    the trace (``trace["extra"]["increment_split"]`` holds ``param_var``, ``move_var``,
    ``param_move_cov``, ``param_mean``, ``move_mean`` per iteration) and the wall time."""
    data = digits.load_data(config) if data is None else data
    potential_fn, params, base = digits.make_energy(config, data.images)
    inputs = digits._fit_inputs(config, potential_fn, params, base, data.images)
    kernel = digits.make_kernel(config, "jarzynski")
    adaptation = None if config.target_acceptance is None else step_size_adaptation(
        config.target_acceptance, probe_every=config.acceptance_probe_every)
    trainer = with_increment_split(build_trainer(potential_fn, inputs.optimizer, kernel, log_z0=inputs.log_z0,
                                                 step_size_adaptation=adaptation), per_walker=True)
    init_key, loop_key = jax.random.split(inputs.rng_key)  # as fit splits its key
    state = trainer.init(params, inputs.init_particles(init_key, config.num_walkers))
    t0 = time.perf_counter()
    result = run_loop(loop_key, trainer, state, config.num_iterations, data=inputs.train_images,
                      data_batch_size=inputs.data_batch_size)
    jax.block_until_ready(result.state.params)
    return {"config": config, "trace": result.trace, "wall_time": time.perf_counter() - t0}


def summarize_split(trace: dict[str, Any], window: int = 500) -> dict[str, Any]:
    """Per ``window`` iterations and over the run: the resamplings, and the means of the
    accumulated spreads (:func:`~numpyro_ebm.training.increments.accumulated_split`) just
    before each resampling (or over all iterations of a window without one): which part the
    log-weight variance that triggers a resampling consists of."""
    acc = accumulated_split(trace)
    resampled = np.asarray(trace["resampled"]).astype(bool)
    per_iteration = {k: np.asarray(v, np.float64) for k, v in trace["extra"]["increment_split"].items()
                     if k in ("param_var", "move_var")}

    def means(sl):
        at = resampled[sl] if resampled[sl].any() else np.ones_like(resampled[sl])
        return {name: float(np.mean(acc[name][sl][at])) for name in ("param_var", "move_var", "twice_cov")}

    n = len(resampled)
    rows = [{"iterations": [start, min(n, start + window)], "resamplings": int(resampled[start:start + window].sum()),
             **means(slice(start, start + window))} for start in range(0, n, window)]
    overall = means(slice(0, n))
    total = overall["param_var"] + overall["move_var"] + overall["twice_cov"]
    return {
        "resamplings": int(resampled.sum()),
        "accumulated_at_resampling": overall,
        "param_share": overall["param_var"] / total if total > 0 else float("nan"),
        "per_iteration_sum": {k: float(np.nansum(v)) for k, v in per_iteration.items()},
        "windows": rows,
    }


def plot_increment_split(trace: dict[str, Any], path: str, title: str = "") -> None:
    """Save a PNG: the spread of the parameter and move parts accumulated since the last
    resampling (left, with the resamplings), and each iteration's weighted variances (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc = accumulated_split(trace)
    split = {k: np.asarray(v, np.float64) for k, v in trace["extra"]["increment_split"].items()
             if k in ("param_var", "move_var")}
    it = np.arange(len(acc["param_var"]))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    ax = axes[0]
    ax.plot(it, acc["param_var"], color="C0", lw=0.7, label="Var(P): parameter parts since last resampling")
    ax.plot(it, acc["move_var"], color="C1", lw=0.7, label="Var(M): move parts since last resampling")
    ax.plot(it, acc["twice_cov"], color="C2", lw=0.5, label="2 Cov(P, M)")
    resampled = np.flatnonzero(np.asarray(trace["resampled"]))
    ax.plot(resampled, np.zeros(len(resampled)), "|", color="k", ms=8, label=f"resampling ({len(resampled)})")
    ax.set_xlabel("training iteration")
    ax.set_ylabel("spread of the accumulated log weights (nats^2)")
    ax.legend(fontsize=7)
    ax = axes[1]
    ax.semilogy(it, np.maximum(split["param_var"], 1e-12), color="C0", lw=0.5, label="Var_w(p), one iteration")
    ax.semilogy(it, np.maximum(split["move_var"], 1e-12), color="C1", lw=0.5, label="Var_w(m), one iteration")
    ax.set_xlabel("training iteration")
    ax.set_title("per-iteration weighted variance of the increment's parts", fontsize=10)
    ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Split the Jarzynski log-weight increments of a digits run "
                                     "into their parameter and move parts.")
    parser.add_argument("--source", choices=("digits", "mnist"), default="digits")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--set", nargs="*", default=[], metavar="NAME=VALUE",
                        help="DigitsConfig fields to change, e.g. num_walkers=1024 num_iterations=4000")
    args = parser.parse_args(argv)
    config = digits.mnist_defaults(args.data_dir) if args.source == "mnist" else digits.DigitsConfig()
    changes = {}
    for item in args.set:
        name, value = item.split("=", 1)
        if not hasattr(config, name):
            parser.error(f"--set: DigitsConfig has no field {name!r}")
        kind = type(getattr(config, name))
        changes[name] = None if value.lower() == "none" else (int(value) if kind is type(None) else kind(value))
    config = dataclasses.replace(config, methods=("jarzynski",), **changes)
    out = increment_split_run(config)
    os.makedirs(args.out, exist_ok=True)
    summary = summarize_split(out["trace"])
    summary["wall_time"] = out["wall_time"]
    summary["config"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(config).items()}
    with open(os.path.join(args.out, "increment_split.json"), "w") as fh:
        json.dump(summary, fh, indent=1)
    plot_increment_split(out["trace"], os.path.join(args.out, "increment_split.png"),
                         title=f"{config.source}, {config.num_walkers} walkers, {config.num_iterations} iterations, "
                         f"lr {digits.peak_learning_rate(config):.4g} ({config.learning_rate_schedule})")
    print(json.dumps({k: v for k, v in summary.items() if k not in ("windows", "config")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
