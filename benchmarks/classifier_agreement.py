"""How far the class masses of trained walkers depend on the classifier that reads them.

Trains the experiment's classifier (the CNN for MNIST, the logistic regression for the 8x8
digits; on the images outside the EBM's subset) with several seeds (each a different
train/test split, and for the CNN a different initialisation), labels the final walkers
saved by ``long_digits_runs.py --save-walkers`` with each, and reports per classifier:
held-out accuracy, the masses it gives the EBM's own training subset (truth up to its
errors), and the weighted and unweighted masses of the walkers; then the fraction of
walkers (and of their weight) on which the classifiers' labels differ. A spread of the
walker masses across equally accurate classifiers is a floor under any mass error that the
classifier can resolve.

    python benchmarks/classifier_agreement.py --walkers DIR/<job>_walkers.npz \\
        --mnist-dir ../shared/data/mnist --seed 1 --out DIR/<job>_classifiers
    python benchmarks/classifier_agreement.py --source digits --classes 2,3,6 --walkers ... --seed 1 --out ...
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json

import numpy as np


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--walkers", required=True, help="a <job>_walkers.npz of long_digits_runs.py")
    parser.add_argument("--source", choices=("mnist", "digits"), default="mnist")
    parser.add_argument("--mnist-dir", default=None, help="with --source mnist")
    parser.add_argument("--classes", default="2,3,6", help="the job's digits, comma list (4:2:1)")
    parser.add_argument("--seed", type=int, required=True, help="the job's seed (it draws the subset)")
    parser.add_argument("--method", default="jarzynski")
    parser.add_argument("--classifier-seeds", default=None, help="comma list (default: seed, seed+10, seed+20)")
    parser.add_argument("--classifier-noise", type=float, default=None,
                        help="pixel noise of the classifiers' training augmentation (default: the "
                        "experiment's, 0.1 for the CNN); e.g. the data noise of a job fitted to noisy copies")
    parser.add_argument("--out", required=True, help="prefix of the .json and .png written")
    args = parser.parse_args()
    if args.source == "mnist" and not args.mnist_dir:
        parser.error("--source mnist needs --mnist-dir")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from numpyro_ebm.experiments import digits
    from numpyro_ebm.experiments.digits_classifier import (
        class_masses,
        mass_readout,
        train_classifier,
        train_cnn_classifier,
    )

    saved = np.load(args.walkers)
    x, log_w = saved[f"{args.method}_particles"], saved.get(f"{args.method}_log_weights")
    base = digits.mnist_defaults(args.mnist_dir) if args.source == "mnist" else digits.DigitsConfig()
    config = dataclasses.replace(base, seed=args.seed, classes=tuple(int(c) for c in args.classes.split(",")))
    train = train_cnn_classifier if config.classifier == "cnn" else train_classifier
    if args.classifier_noise is not None:
        if config.classifier != "cnn":
            parser.error("--classifier-noise applies to the MNIST CNN only")
        train = functools.partial(train_cnn_classifier, noise_std=args.classifier_noise)
    data = digits.load_data(config)
    seeds = ([int(s) for s in args.classifier_seeds.split(",")] if args.classifier_seeds
             else [args.seed, args.seed + 10, args.seed + 20])
    rows, labels, probas = [], [], []
    for seed in seeds:
        clf = train(data.rest_images, data.rest_labels, data.classes,
                    test_fraction=config.classifier_test_fraction, seed=seed)
        proba = clf.predict_proba(x)
        probas.append(proba)
        labels.append(proba.argmax(1))
        rows.append({"classifier_seed": seed, "test_accuracy": clf.test_accuracy,
                     "subset_masses": class_masses(clf.predict_proba(np.asarray(data.images))).tolist(),
                     "walker_masses": class_masses(proba, log_w).tolist(),
                     "unweighted_walker_masses": class_masses(proba).tolist()})
        print(json.dumps(rows[-1]), flush=True)
    labels = np.stack(labels)
    agree = np.all(labels == labels[0], axis=0)
    readout = mass_readout(probas, log_w)
    summary = {"walkers": args.walkers, "seed": args.seed, "classes": list(data.classes),
               "truth": (np.array(data.proportions) / np.sum(data.proportions)).tolist(),
               "classifier_noise": args.classifier_noise, "classifiers": rows, "fraction_agreeing": float(agree.mean()),
               "weight_disagreeing": 1.0 - readout["classifier_agreement"],
               "walker_mass_spread": readout["classifier_spread"].tolist()}
    with open(args.out + ".json", "w") as fh:
        json.dump(summary, fh, indent=1)
    print(json.dumps({k: v for k, v in summary.items() if k != "classifiers"}))

    shown = list(np.where(~agree)[0][:16]) + list(np.where(agree)[0][:16])
    fig, axes = plt.subplots(4, 8, figsize=(10, 6))
    for ax in axes.flat:
        ax.set_axis_off()
    for ax, j in zip(axes.flat, shown, strict=False):
        ax.imshow(x[j], cmap="gray")
        ax.set_title("/".join(str(data.classes[c]) for c in labels[:, j]), fontsize=8)
    fig.suptitle(f"final walkers; rows 1-2: the {len(seeds)} classifiers disagree, rows 3-4: they agree\n"
                 f"(titles: labels by classifier seeds {', '.join(map(str, seeds))})", fontsize=9)
    fig.savefig(args.out + ".png", dpi=90, bbox_inches="tight")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
