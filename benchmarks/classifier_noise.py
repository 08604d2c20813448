"""Does pixel noise bias the class masses that the MNIST classifier measures? (issue 13)

The long MNIST runs measure the model's class masses by labelling the walkers with a CNN
(``experiments.digits_classifier``). Walkers at temperature 1 are noisy images, so this
script labels the EBM's own training images (true labels known, proportions 4:2:1) with
Gaussian pixel noise of several standard deviations added (pixels in [-1, 1]) and reports the
measured masses against the true ones, with the accuracy:

    python benchmarks/classifier_noise.py --mnist-dir ../shared/data/mnist [--seed 0] [--classes 2,3,6]
"""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mnist-dir", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--classes", default="2,3,6")
    parser.add_argument("--sigmas", default="0,0.1,0.2,0.3,0.5,0.7,1.0")
    parser.add_argument("--draws", type=int, default=3, help="noise draws per sigma")
    args = parser.parse_args()

    from numpyro_ebm.experiments import digits
    from numpyro_ebm.experiments.digits_classifier import class_masses

    classes = tuple(int(c) for c in args.classes.split(","))
    config = dataclasses.replace(digits.mnist_defaults(args.mnist_dir), seed=args.seed, classes=classes)
    data = digits.load_data(config)
    classifier = digits.make_classifier(config, data)
    labels = np.searchsorted(classes, data.labels)
    truth = np.bincount(labels, minlength=len(classes)) / len(labels)
    print(f"classes {classes}, seed {args.seed}: classifier held-out accuracy {classifier.test_accuracy:.4f}; "
          f"{len(labels)} EBM training images, pixel std {data.images.std():.3f}; truth {np.round(truth, 3)}")
    rng = np.random.default_rng(args.seed)
    for sigma in (float(s) for s in args.sigmas.split(",")):
        masses, accuracy = [], []
        for _ in range(args.draws):
            noisy = data.images + sigma * rng.standard_normal(data.images.shape).astype(np.float32)
            proba = classifier.predict_proba(noisy)
            masses.append(class_masses(proba))
            accuracy.append(np.mean(proba.argmax(1) == labels))
        m = np.mean(masses, 0)
        print(f"noise sd {sigma:.1f}: masses {np.round(m, 3)}, max error {np.abs(m - truth).max():.3f}, "
              f"accuracy {np.mean(accuracy):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
