"""Figures of the imbalanced-digits experiment (:mod:`numpyro_ebm.experiments.digits`): the
class masses over training (:func:`plot`) and the PNGs of a run (:func:`save_figures`).

Both names are importable from :mod:`numpyro_ebm.experiments.digits` as well.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from numpyro_ebm.experiments.digits import DigitsConfig

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
    """Save a PNG: class masses over training per method against the truth, and the
    Jarzynski cross-entropy estimate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    config: DigitsConfig = results["config"]
    classes = results["data"].classes
    truth = results["truth"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    ax = axes[0]
    styles = {"jarzynski": "-", "pcd": "--", "cd": ":"}
    for method in config.methods:
        r = results[method]
        for j, c in enumerate(classes):
            ax.plot(
                r["snapshot_iterations"], r["snapshot_masses"][:, j], styles[method], color=f"C{j}",
                marker="o", ms=3, label=f"{method}: digit {c}",
            )
    for j in range(len(classes)):
        ax.axhline(truth[j], color=f"C{j}", lw=0.8, ls="-.", alpha=0.7)
    ax.set_xlabel("training iteration")
    ax.set_ylabel("class mass among walkers")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("class masses (dash-dot: truth)", fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    ax = axes[1]
    if "jarzynski" in config.methods:
        ce = results["jarzynski"]["cross_entropy"]
        ax.plot(np.arange(len(ce)), ce, color="C0", lw=0.8)
        ax.set_ylabel("Jarzynski cross-entropy estimate (nats)")
    ax.set_xlabel("training iteration")
    ax.set_title("cross-entropy estimate (Jarzynski)", fontsize=10)
    data = results["data"]
    fig.suptitle(
        f"{config.source}: digits {'/'.join(map(str, classes))} at "
        f"{':'.join(map(str, data.proportions))} ({', '.join(str(n) for n in data.counts.values())} images), "
        f"{config.num_walkers} walkers, h={config.step_size}, sgd({config.learning_rate}), clip {config.clip_norm}"
        + (f", data noise {config.noise_std} x{config.noise_copies}" if config.noise_std > 0 else ""),
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
