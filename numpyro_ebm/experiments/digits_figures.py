"""Figures of the imbalanced-digits experiment (:mod:`numpyro_ebm.experiments.digits`): the
class masses over training (:func:`plot`) and the PNGs of a run (:func:`save_figures`).

Both names are importable from :mod:`numpyro_ebm.experiments.digits` as well.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from numpyro_ebm.experiments.digits_config import peak_learning_rate

if TYPE_CHECKING:
    from numpyro_ebm.experiments.digits_config import DigitsConfig

__all__ = ["save_figures", "plot"]


def save_figures(results: dict[str, Any], directory: str, prefix: str = "digits") -> list[str]:
    """Save the PNGs of a run into ``directory``: ``{prefix}_masses.png`` (:func:`plot`),
    ``{prefix}_walkers_{method}.png`` (the heaviest walkers, and for PCD the first ones)
    and ``{prefix}_training_{method}.png`` (:func:`numpyro_ebm.diagnostics.plot_training`).
    Returns the paths."""
    import os

    import matplotlib.pyplot as plt

    from numpyro_ebm.diagnostics import plot_samples, plot_training

    config: DigitsConfig = results["config"]
    paths = [os.path.join(directory, f"{prefix}_masses.png")]
    plot(results, paths[0])
    for method in config.methods:
        r = results[method]
        path = os.path.join(directory, f"{prefix}_walkers_{method}.png")
        masses = ", ".join(f"{c}: {m:.2f}" for c, m in zip(results["data"].classes, r["masses"], strict=True))
        fig = plot_samples(
            r["result"], max_images=64,
            title=f"{method}: final walkers{' (heaviest first)' if method == 'jarzynski' else ''}; "
            f"class masses {masses}",
            path=path,
        )
        plt.close(fig)
        paths.append(path)
        path = os.path.join(directory, f"{prefix}_training_{method}.png")
        plt.close(plot_training(r["result"], path=path))
        paths.append(path)
    path = os.path.join(directory, f"{prefix}_data.png")
    plt.close(plot_samples(results["data"].images[:: max(1, len(results["data"].images) // 64)], max_images=64,
                           title="training images (every k-th)", path=path))
    paths.append(path)
    return paths


def plot(results: dict[str, Any], path: str) -> None:
    """Save a PNG: the class masses over training per method (every iteration, from the
    classifier in the loop) against the truth; the Jarzynski walkers' health (ESS/N, distinct
    lineages over N, resamplings, the step size); and the Jarzynski cross-entropy estimate.
    Without a Jarzynski run, the last two panels show each method's mean energy at the data
    and gradient norm (before clipping), where an energy that runs away shows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    config: DigitsConfig = results["config"]
    classes = results["data"].classes
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4))
    _plot_masses(axes[0], results, config, classes)
    if "jarzynski" in config.methods:
        _plot_health(axes[1], results["jarzynski"]["result"].trace, config.num_walkers)
        ce = results["jarzynski"]["cross_entropy"]
        axes[2].plot(np.arange(len(ce)), ce, color="C0", lw=0.8)
        axes[2].set_ylabel("Jarzynski cross-entropy estimate (nats)")
        axes[2].set_title("cross-entropy estimate (Jarzynski)", fontsize=10)
    else:
        _plot_training_signals(axes[1:], results, config)
    axes[2].set_xlabel("training iteration")
    data = results["data"]
    fig.suptitle(
        f"{config.source}: digits {'/'.join(map(str, classes))} at "
        f"{':'.join(map(str, data.proportions))} ({', '.join(str(n) for n in data.counts.values())} images), "
        f"{config.num_walkers} walkers, h={config.step_size}, sgd({peak_learning_rate(config):.4g}, "
        f"{config.learning_rate_schedule}), clip {config.clip_norm}"
        + (f", rejuvenation {config.rejuvenation_moves}"
           if config.rejuvenation_moves and "jarzynski" in config.methods else "")
        + (f", energy penalty {config.energy_penalty}" if config.energy_penalty else "")
        + (f", data noise {config.noise_std} x{config.noise_copies}" if config.noise_std > 0 else ""),
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_masses(ax, results, config, classes):
    styles = {"jarzynski": "-", "pcd": "--", "cd": ":"}
    for method in config.methods:
        masses = results[method]["mass_trace"]
        iterations = results[method]["mass_trace_iterations"]
        for j, c in enumerate(classes):
            ax.plot(iterations, masses[:, j], styles[method], color=f"C{j}", lw=0.7,
                    label=f"{method}: digit {c}")
    for j in range(len(classes)):
        ax.axhline(results["truth"][j], color=f"C{j}", lw=0.8, ls="-.", alpha=0.7)
    num_iterations = config.num_iterations
    ax.axvspan(0.8 * num_iterations, num_iterations, color="0.9", zorder=0, label="last 20%")
    title = "class masses (dash-dot: truth)"
    num_classifiers = len(results.get("classifiers", ()))
    if num_classifiers > 1:  # how far classifiers trained with other seeds read the final walkers
        for k, method in enumerate(config.methods):
            by_classifier = results[method]["masses_by_classifier"]
            x = num_iterations * (1.0 + 0.015 * (k + 1))
            for j in range(len(classes)):
                ax.vlines(x, by_classifier[:, j].min(), by_classifier[:, j].max(), color=f"C{j}", lw=3)
        title += f"\nbars: final masses read by {num_classifiers} classifiers ({', '.join(config.methods)})"
    ax.set_xlabel("training iteration")
    ax.set_ylabel("class mass among walkers")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title, fontsize=9 if num_classifiers > 1 else 10)
    ax.legend(fontsize=7, ncol=2)


def _plot_training_signals(axes, results, config):
    for method in config.methods:
        trace = results[method]["result"].trace
        iterations = np.arange(len(trace["data_energy"]))
        axes[0].plot(iterations, trace["data_energy"], lw=0.8, label=method)
        axes[1].semilogy(iterations, trace["grad_norm"], lw=0.8, label=method)
    axes[0].set_title("mean energy at the data", fontsize=10)
    axes[1].set_title("gradient norm before clipping", fontsize=10)
    for ax in axes:
        ax.set_xlabel("training iteration")
        ax.legend(fontsize=7)


def _plot_health(ax, trace, num_walkers):
    iterations = np.arange(len(trace["normalized_ess"]))
    ax.plot(iterations, trace["normalized_ess"], color="C0", lw=0.6, label="ESS / N")
    ax.plot(iterations, np.asarray(trace["num_lineages"]) / num_walkers, color="C3", lw=1.0,
            label="distinct lineages / N (100-iteration windows)")
    resampled = np.flatnonzero(np.asarray(trace["resampled"]))
    ax.plot(resampled, np.full(len(resampled), -0.03), "|", color="k", ms=6,
            label=f"resampling ({len(resampled)})")
    if "label_ess" in trace.get("extra", {}):
        label_ess = np.asarray(trace["extra"]["label_ess"]).min(1) / num_walkers
        ax.plot(iterations, label_ess, color="C2", lw=0.6, label="smallest per-class ESS / N")
    ax.axhline(0.05, color="0.5", lw=0.8, ls=":")
    ax.set_ylim(-0.06, 1.02)
    ax.set_xlabel("training iteration")
    ax.set_title("Jarzynski walkers' health", fontsize=10)
    step = ax.twinx()  # an adapted step size that collapses freezes the walkers: show it
    step.semilogy(iterations, np.asarray(trace["step_size"]), color="C4", lw=0.8, label="step size h (right)")
    step.set_ylabel("ULA step size h", color="C4", fontsize=8)
    handles, labels = ax.get_legend_handles_labels()
    more_handles, more_labels = step.get_legend_handles_labels()
    ax.legend(handles + more_handles, labels + more_labels, fontsize=7)
