"""Imbalanced digits: Jarzynski vs PCD on scikit-learn's 8x8 digits 2/3/6 at 4:2:1.

The data are 140/70/35 images of the digits 2, 3 and 6 (exactly 4:2:1); the remaining
images of those digits train a logistic-regression classifier, which then labels the
walkers. The energy is a Flax NNX MLP plus a fixed quadratic confinement, so the initial
model is exactly N(mean, s0^2 I) (see ``numpyro_ebm.experiments.digits``). Jarzynski and PCD
are trained with the same budget; the table compares the class masses among the walkers
(weighted for Jarzynski) with the truth. With ``--data-dir DIR`` it reads MNIST IDX files
from DIR instead (a small CNN, 28x28).

    python examples/digits.py [--output-dir DIR] [--data-dir MNIST_DIR]
    NUMPYRO_EBM_SMOKE=1 python examples/digits.py      # tiny run (seconds)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

from numpyro_ebm.experiments import digits  # noqa: E402

SMOKE = os.environ.get("NUMPYRO_EBM_SMOKE") == "1"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="results/digits")
    parser.add_argument("--data-dir", default=None, help="MNIST IDX directory (default: scikit-learn digits)")
    parser.add_argument("--split", default="test", choices=("train", "test"))
    args = parser.parse_args(argv)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    config = digits.DigitsConfig() if args.data_dir is None else digits.mnist_defaults(args.data_dir)
    if args.data_dir is not None:
        config = dataclasses.replace(config, split=args.split)
    if SMOKE:
        config = dataclasses.replace(
            config, num_walkers=32, num_iterations=20, hidden=16, channels=4, num_snapshots=2,
            num_samples=70 if args.data_dir is not None else config.num_samples,
        )
    results = digits.run(config, progress=not SMOKE)
    print(digits.format_table(results))
    prefix = "digits" if args.data_dir is None else "mnist"
    paths = digits.save_figures(results, str(out), prefix=prefix)
    with open(out / f"{prefix}.json", "w") as fh:
        json.dump(digits.summary(results), fh, indent=2)
    print("saved " + ", ".join(paths))


if __name__ == "__main__":
    main()
