"""Draw one method of a ``long_digits_runs.py`` job from its JSON record: the class masses
over training (with the final masses as read by the job's classifiers, when it recorded
them), the mean energy at the data and the gradient norm before clipping (every 10th
iteration). For jobs whose own figure lacks these panels.

    python benchmarks/plot_long_job.py --json DIR/<job>.json --method pcd --out FIGURE.png
"""

from __future__ import annotations

import argparse
import json

import numpy as np


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True, help="a <job>.json of long_digits_runs.py")
    parser.add_argument("--method", default="pcd")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    record = json.load(open(args.json))
    if args.method not in record["methods"]:
        parser.error(f"--method {args.method!r} is not in the job (it has {', '.join(record['methods'])})")
    entry, config, truth = record["methods"][args.method], record["config"], record["truth"]
    num_iterations = config["num_iterations"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4))
    iterations, masses = np.array(entry["mass_trace_iterations"]), np.array(entry["mass_trace"])
    title = "class masses (dash-dot: truth)"
    for j, c in enumerate(config["classes"]):
        axes[0].plot(iterations, masses[:, j], "--", color=f"C{j}", lw=0.7, label=f"{args.method}: digit {c}")
        axes[0].axhline(truth[j], color=f"C{j}", lw=0.8, ls="-.", alpha=0.7)
        if "masses_by_classifier" in entry:
            by_classifier = np.array(entry["masses_by_classifier"])[:, j]
            axes[0].vlines(num_iterations * 1.015, by_classifier.min(), by_classifier.max(), color=f"C{j}", lw=3)
    if "masses_by_classifier" in entry:
        title += f"\nbars: final masses read by {len(entry['masses_by_classifier'])} classifiers"
    axes[0].axvspan(0.8 * num_iterations, num_iterations, color="0.9", zorder=0, label="last 20%")
    axes[0].set(ylim=(-0.02, 1.02), ylabel="class mass among walkers")
    axes[0].set_title(title, fontsize=9)
    axes[0].legend(fontsize=7)
    every_10 = np.arange(0, num_iterations, 10)
    axes[1].plot(every_10, entry["data_energy_every_10"], lw=0.8)
    axes[1].set_title("mean energy at the data", fontsize=10)
    axes[2].semilogy(every_10, entry["grad_norm_every_10"], lw=0.8)
    axes[2].set_title("gradient norm before clipping", fontsize=10)
    for ax in axes:
        ax.set_xlabel("training iteration")
    fig.suptitle(f"{record['job']}: {args.method}, {config['num_walkers']} walkers, {num_iterations} iterations, "
                 f"seed {config['seed']} (from the job's JSON)", fontsize=10)
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
