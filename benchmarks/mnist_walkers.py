"""Look at the final walkers of a long MNIST job (issue 13): how noisy they are, where their
energies lie against the data's, and whether the class masses change when each walker is
first taken down the model's energy (temperature 0) before it is labelled.

    python benchmarks/long_digits_runs.py --out DIR --mnist-dir M --only mnist_seed0 --save-walkers
    python benchmarks/mnist_walkers.py --walkers DIR/mnist_seed0_walkers.npz --mnist-dir M [--seed 0]

Prints, per method: ESS/N, the parameter norm, the rms of ``x + 1`` over the 3-pixel border
(where every training image is -1, so this is the walkers' pixel noise there), the range of
the walkers' pixels (the data lie in [-1, 1]), the weighted class masses, each class's mean
energy at the data and at the walkers labelled as it, and the masses after ``--descent-steps``
steps ``x <- x - eta grad U(x)``.
"""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--walkers", required=True, help="<job>_walkers.npz")
    parser.add_argument("--mnist-dir", required=True)
    parser.add_argument("--seed", type=int, default=0, help="the job's seed (data subset and classifier)")
    parser.add_argument("--classes", default="2,3,6")
    parser.add_argument("--descent-steps", type=int, default=300)
    parser.add_argument("--descent-rate", type=float, default=0.002)
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp

    from numpyro_ebm.experiments import digits
    from numpyro_ebm.experiments.digits_classifier import class_masses

    classes = tuple(int(c) for c in args.classes.split(","))
    config = dataclasses.replace(digits.mnist_defaults(args.mnist_dir), seed=args.seed, classes=classes)
    data = digits.load_data(config)
    classifier = digits.make_classifier(config, data)
    potential_fn, template, _ = digits.make_energy(config, data.images)
    stored = np.load(args.walkers)
    border = np.zeros(data.images.shape[1:], bool)
    border[:3] = border[-3:] = True
    border[:, :3] = border[:, -3:] = True
    data_class = np.searchsorted(classes, data.labels)
    for method in config.methods:
        if f"{method}_particles" not in stored:
            continue
        x, log_w = stored[f"{method}_particles"], stored[f"{method}_log_weights"]
        leaves = [jnp.asarray(stored[f"{method}_param_{i}"]) for i in range(len(jax.tree.leaves(template)))]
        params = jax.tree.unflatten(jax.tree.structure(template), leaves)
        energy = jax.jit(jax.vmap(lambda xi, p=params: potential_fn(p, xi)))
        grad = jax.jit(jax.vmap(jax.grad(lambda xi, p=params: potential_fn(p, xi))))
        w = np.exp(log_w - log_w.max())
        w /= w.sum()
        proba = classifier.predict_proba(x)
        labels = proba.argmax(1)
        data_energy, walker_energy = np.asarray(energy(jnp.asarray(data.images))), np.asarray(energy(jnp.asarray(x)))
        norm = np.sqrt(sum(float(np.sum(np.square(leaf))) for leaf in leaves))
        print(f"== {method}: ESS/N {1 / np.sum(w**2) / len(w):.3f}, |theta| {norm:.2f}, border noise rms "
              f"{np.sqrt(np.mean((x[:, border] + 1) ** 2)):.3f}, pixels in [{x.min():.2f}, {x.max():.2f}]")
        print(f"   masses {np.round(class_masses(proba, log_w), 3)} (unweighted {np.round(class_masses(proba), 3)})")
        for c, digit in enumerate(classes):
            mine = labels == c
            print(f"   digit {digit}: energy at its data {data_energy[data_class == c].mean():8.1f}, at its walkers "
                  f"{walker_energy[mine].mean() if mine.any() else float('nan'):8.1f} ({mine.sum()} walkers)")
        y = jnp.asarray(x)
        for _ in range(args.descent_steps):
            y = y - args.descent_rate * grad(y)
        descended = classifier.predict_proba(np.asarray(y))
        print(f"   after {args.descent_steps} descent steps: masses {np.round(class_masses(descended, log_w), 3)}, "
              f"labels changed {np.mean(descended.argmax(1) != labels):.3f}, "
              f"mean energy {float(np.mean(energy(y))):.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
