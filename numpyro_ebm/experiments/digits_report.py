"""The text table and the JSON summary of an imbalanced-digits run
(:mod:`numpyro_ebm.experiments.digits`); both names are importable from there as well."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from numpyro_ebm.experiments.digits_config import peak_learning_rate

if TYPE_CHECKING:
    from numpyro_ebm.experiments.digits_config import DigitsConfig

__all__ = ["format_table", "summary"]


def format_table(results: dict[str, Any]) -> str:
    """Plain-text table: class masses of the walkers per method against the truth, at the end
    and averaged over the last 20% of iterations, with the long-run health figures."""
    config: DigitsConfig = results["config"]
    classes = results["data"].classes
    cols = "".join(f"{'digit ' + str(c):>9}" for c in classes)
    header = (f"{'':<28}{cols} {'max|err|':>9} {'worst>20%':>9} {'resampl.':>8} {'lineages':>8} "
              f"{'CE est.':>9} {'wall s':>7}")
    lines = [header, "-" * len(header)]
    lines.append(f"{'truth':<28}" + "".join(f"{m:>9.3f}" for m in results["truth"]))
    for method in config.methods:
        r = results[method]
        name = f"{method} ({'weighted' if method == 'jarzynski' else 'equal w.'})"
        ce = r.get("final_cross_entropy_estimate")
        lineages = r.get("min_lineage_fraction")
        lines.append(
            f"{name + ', final':<28}" + "".join(f"{m:>9.3f}" for m in r["masses"])
            + f" {r['mass_error']:>9.3f} {'':>9} "
            f"{(str(r['num_resampling']) if 'num_resampling' in r else 'n/a'):>8} "
            f"{(f'{lineages:.2f}' if lineages is not None else 'n/a'):>8} "
            f"{(f'{ce:.2f}' if ce is not None else 'n/a'):>9} {r['wall_time']:>7.1f}"
        )
        lines.append(f"{'  last 20% mean':<28}" + "".join(f"{m:>9.3f}" for m in r["tail_masses"])
                     + f" {r['tail_mass_error']:>9.3f} {r['worst_snapshot_error']:>9.3f}")
        lines.append(f"{'  MC standard error':<28}" + "".join(f"{m:>9.3f}" for m in r["tail_mass_standard_error"]))
        if len(results["classifiers"]) > 1:
            lines.append(f"{'  classifier spread, final':<28}" + "".join(f"{m:>9.3f}" for m in r["classifier_spread"])
                         + f"  (all {len(results['classifiers'])} agree on {r['classifier_agreement']:.0%} "
                         "of the weight)")
        if method == "jarzynski":
            lines.append(f"{'  unweighted, final':<28}" + "".join(f"{m:>9.3f}" for m in r["unweighted_masses"]))
    data = results["data"]
    clf = results["classifier"]
    lines.append(
        f"training subset: {', '.join(f'{c}: {n}' for c, n in data.counts.items())} images; "
        f"classifier: {clf.kind} over {list(classes)}, trained on {clf.num_train} other images, "
        f"held-out accuracy {clf.test_accuracy:.3f} ({clf.num_test} images). worst>20%: largest error "
        "of a snapshot after the first 20% of iterations; lineages: fewest distinct ancestors in a "
        "100-iteration window, over N; MC standard error: of one labelled iteration's masses, over the last "
        "20% (walkers as independent draws)"
    )
    if len(results["classifiers"]) > 1:
        accuracies = ", ".join(f"{c.test_accuracy:.3f}" for c in results["classifiers"])
        lines.append(
            f"classifier spread: largest minus smallest final mass across {len(results['classifiers'])} "
            f"classifiers trained with different seeds (held-out accuracies {accuracies}); an error below it "
            "is not resolved by the classifier"
        )
    return "\n".join(lines)


def summary(results: dict[str, Any]) -> dict[str, Any]:
    """JSON-ready summary of a run."""
    config: DigitsConfig = results["config"]
    data = results["data"]
    clf = results["classifier"]
    out = {
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(config).items()},
        "peak_learning_rate": peak_learning_rate(config),
        "counts": {str(c): n for c, n in data.counts.items()},
        "truth": results["truth"].tolist(),
        "classifier": {
            "kind": f"{clf.kind} over the training classes",
            "num_train": clf.num_train, "num_test": clf.num_test, "test_accuracy": clf.test_accuracy,
            "readout_test_accuracies": [c.test_accuracy for c in results["classifiers"]],
        },
        "log_z0": results["log_z0"],
        "methods": {},
    }
    for method in config.methods:
        r = results[method]
        out["methods"][method] = {
            k: (v.tolist() if isinstance(v, np.ndarray) else v)
            for k, v in r.items()
            if k in (
                "masses", "unweighted_masses", "mass_error", "unsure_fraction", "final_data_energy",
                "final_cross_entropy_estimate", "num_resampling", "min_normalized_ess",
                "mean_normalized_ess", "snapshot_iterations", "snapshot_masses", "wall_time",
                "tail_masses", "tail_mass_error", "worst_snapshot_error", "min_label_ess",
                "min_lineage_fraction", "tail_mass_standard_error", "masses_by_classifier",
                "classifier_spread", "classifier_agreement",
            )
        }
    return out
