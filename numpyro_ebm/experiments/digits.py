r"""The paper's imbalanced-digits experiment (Carbone et al. 2023, Sec. 4.2), at CPU size.

Data: images of a few digits (default 2, 3 and 6) drawn exactly in proportions 4:2:1
(:mod:`numpyro_ebm.datasets`): scikit-learn's 8x8 digits by default, MNIST (28x28) from a
directory of IDX files.

Energy (Flax NNX, :func:`numpyro_ebm.potentials.from_flax`):

.. math::

   U_\theta(x) = f_\theta\big((x - \mu)/\sigma_0\big) + \frac{|x - \mu|^2}{2\sigma_0^2},

with :math:`\mu` the per-pixel mean and :math:`\sigma_0` the pixel standard deviation of the
training images (fixed), and :math:`f_\theta` an MLP (8x8) or a small CNN (28x28) whose last
layer starts at zero. The initial model is therefore exactly :math:`N(\mu, \sigma_0^2 I)`:
the walkers start as exact draws from it and
:math:`\log Z_{\theta_0} = \tfrac D2 \log(2\pi\sigma_0^2)` is known, so the Jarzynski
cross-entropy estimate is meaningful.

Jarzynski and PCD are trained side by side with the same optimiser (plain SGD with gradient
clipping and weight decay), walkers, step size, keys and number of iterations. By default
the model is fitted to ``noise_copies`` fixed noisy copies of every training image (pixel
noise ``noise_std``; the class proportions are unchanged), which smooths the energy; the
gradient clip at norm 1 bounds the parameter move per iteration, and with it the Jarzynski
weight increments (see ``docs/digits.md``). A digit classifier
(scikit-learn logistic regression restricted to the training classes) is trained on images
of those classes that are *not* in the energy model's training subset; its held-out accuracy
is reported. The class masses of the model are measured as the classifier's hard labels of
the walkers, weighted by the Jarzynski weights (Jarzynski) or equally (PCD), and set beside
the truth (the requested proportions).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from numpyro_ebm import kernels
from numpyro_ebm.datasets import DigitSubset, load_digits, load_mnist
from numpyro_ebm.potentials import from_flax
from numpyro_ebm.training.callbacks import Snapshots
from numpyro_ebm.training.fit import FitResult, fit

__all__ = [
    "DigitsConfig",
    "MLPEnergy",
    "ConvEnergy",
    "load_data",
    "make_energy",
    "DigitClassifier",
    "train_classifier",
    "class_masses",
    "run",
    "format_table",
    "summary",
    "plot",
    "save_figures",
    "mnist_defaults",
]

EXPERIMENT_METHODS = ("jarzynski", "pcd")


@dataclasses.dataclass(frozen=True)
class DigitsConfig:
    """Settings of the experiment. Defaults: scikit-learn digits 2/3/6 at 4:2:1 (8x8)."""

    source: str = "digits"
    data_dir: str | None = None
    split: str = "test"
    classes: tuple[int, ...] = (2, 3, 6)
    proportions: tuple[int, ...] = (4, 2, 1)
    num_samples: int | None = 245
    model: str = "mlp"
    hidden: int = 128
    channels: int = 16
    num_walkers: int = 2000
    num_iterations: int = 8000
    step_size: float = 0.01
    learning_rate: float = 0.005
    clip_norm: float = 1.0
    weight_decay: float = 0.05
    noise_std: float = 0.15
    noise_copies: int = 4
    data_batch_size: int | None = None
    num_mcmc_steps: int = 1
    schedule: str = "fixed"
    target_ess: float = 0.5
    max_substeps: int = 10
    ess_threshold: float = 0.5
    num_snapshots: int = 10
    classifier_test_fraction: float = 0.3
    unsure_threshold: float = 0.5
    methods: tuple[str, ...] = EXPERIMENT_METHODS
    seed: int = 0

    def __post_init__(self):
        if self.source not in ("digits", "mnist"):
            raise ValueError(f"`source` must be 'digits' or 'mnist', got {self.source!r}")
        if self.source == "mnist" and self.data_dir is None:
            raise ValueError("`data_dir` is required when `source` is 'mnist'")
        if self.schedule not in ("fixed", "adaptive"):
            raise ValueError(f"`schedule` must be 'fixed' or 'adaptive', got {self.schedule!r}")
        if not 0.0 < self.target_ess < 1.0:
            raise ValueError(f"`target_ess` must lie in (0, 1), got {self.target_ess}")
        if self.model not in ("mlp", "conv"):
            raise ValueError(f"`model` must be 'mlp' or 'conv', got {self.model!r}")
        if self.weight_decay < 0 or self.noise_std < 0:
            raise ValueError("`weight_decay` and `noise_std` must be non-negative")
        for name in (
            "hidden", "channels", "num_iterations", "num_snapshots", "noise_copies", "num_mcmc_steps", "max_substeps",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {getattr(self, name)}")
        if self.num_walkers < 2:
            raise ValueError(f"`num_walkers` must be at least 2, got {self.num_walkers}")
        for name in ("step_size", "learning_rate", "clip_norm"):
            if not getattr(self, name) > 0:
                raise ValueError(f"`{name}` must be positive, got {getattr(self, name)}")
        if not 0.0 < self.classifier_test_fraction < 1.0:
            raise ValueError(
                f"`classifier_test_fraction` must lie in (0, 1), got {self.classifier_test_fraction}"
            )
        unknown = set(self.methods) - {"jarzynski", "pcd", "cd"}
        if unknown or not self.methods:
            raise ValueError(f"`methods` must be a non-empty subset of jarzynski, pcd, cd; got {self.methods}")


# ---------------------------------------------------------------------------------------
# data and energies
# ---------------------------------------------------------------------------------------


def load_data(config: DigitsConfig) -> DigitSubset:
    """The training subset (and the rest) that ``config`` asks for."""
    key = jax.random.fold_in(jax.random.key(config.seed), 0)
    if config.source == "digits":
        return load_digits(config.classes, config.proportions, num_samples=config.num_samples, rng_key=key)
    return load_mnist(
        config.data_dir, config.classes, config.proportions, split=config.split,
        num_samples=config.num_samples, rng_key=key,
    )


class MLPEnergy(nnx.Module):
    """:math:`f_\\theta(z) + |z|^2/2` with :math:`z = (x - \\mu)/\\sigma_0` and an MLP
    :math:`f_\\theta` (two SiLU layers) whose output layer starts at zero."""

    def __init__(self, mean: np.ndarray, scale: float, hidden: int, *, rngs: nnx.Rngs):
        dim = int(np.size(mean))
        self.mean = nnx.Variable(jnp.asarray(mean).reshape(-1))
        self.scale = float(scale)
        self.l1 = nnx.Linear(dim, hidden, rngs=rngs)
        self.l2 = nnx.Linear(hidden, hidden, rngs=rngs)
        self.out = nnx.Linear(hidden, 1, kernel_init=nnx.initializers.zeros, rngs=rngs)

    def __call__(self, x):
        z = (x.reshape(-1) - self.mean[...]) / self.scale
        h = nnx.silu(self.l2(nnx.silu(self.l1(z))))
        return self.out(h)[0] + 0.5 * jnp.sum(z**2)


class ConvEnergy(nnx.Module):
    """As :class:`MLPEnergy` with a small CNN: two stride-2 3x3 convolutions, a dense
    SiLU layer and a zero-initialised output layer."""

    def __init__(self, mean: np.ndarray, scale: float, channels: int, hidden: int, *, rngs: nnx.Rngs):
        height, width = np.shape(mean)
        self.mean = nnx.Variable(jnp.asarray(mean))
        self.scale = float(scale)
        self.c1 = nnx.Conv(1, channels, (3, 3), strides=(2, 2), rngs=rngs)
        self.c2 = nnx.Conv(channels, 2 * channels, (3, 3), strides=(2, 2), rngs=rngs)
        flat = 2 * channels * math.ceil(math.ceil(height / 2) / 2) * math.ceil(math.ceil(width / 2) / 2)
        self.l1 = nnx.Linear(flat, hidden, rngs=rngs)
        self.out = nnx.Linear(hidden, 1, kernel_init=nnx.initializers.zeros, rngs=rngs)

    def __call__(self, x):
        z = (x - self.mean[...]) / self.scale
        h = nnx.silu(self.c1(z[None, :, :, None]))
        h = nnx.silu(self.c2(h))
        h = nnx.silu(self.l1(h.reshape(-1)))
        return self.out(h)[0] + 0.5 * jnp.sum(z**2)


def make_energy(config: DigitsConfig, images: np.ndarray) -> tuple[Any, Any, dict]:
    """``(potential_fn, params, base)``: the energy for ``images`` (the training subset) and
    its exact initial model ``base = {"mean", "scale", "log_z0"}``."""
    mean = np.asarray(images, np.float64).mean(0)
    scale = float(np.sqrt(np.mean((np.asarray(images, np.float64) - mean) ** 2)))
    rngs = nnx.Rngs(config.seed)
    if config.model == "mlp":
        module = MLPEnergy(mean.astype(np.float32), scale, config.hidden, rngs=rngs)
    else:
        module = ConvEnergy(mean.astype(np.float32), scale, config.channels, config.hidden, rngs=rngs)
    potential_fn, params = from_flax(module)
    dim = mean.size
    base = {"mean": mean, "scale": scale, "log_z0": 0.5 * dim * math.log(2 * math.pi * scale**2)}
    return potential_fn, params, base


# ---------------------------------------------------------------------------------------
# classifier
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class DigitClassifier:
    """A logistic-regression digit classifier over ``classes`` and its held-out accuracy."""

    model: Any
    classes: tuple[int, ...]
    test_accuracy: float
    num_train: int
    num_test: int

    def predict_proba(self, images: Any) -> np.ndarray:
        """Class probabilities, shape ``(n, len(classes))``, columns in the order of ``classes``."""
        x = np.asarray(images, np.float64).reshape(np.shape(images)[0], -1)
        proba = self.model.predict_proba(x)
        order = [list(self.model.classes_).index(c) for c in self.classes]
        return proba[:, order]


def train_classifier(
    images: np.ndarray, labels: np.ndarray, classes: tuple[int, ...], *, test_fraction: float = 0.3,
    seed: int = 0,
) -> DigitClassifier:
    """Fit a logistic regression on a stratified ``1 - test_fraction`` of ``images`` and
    measure its accuracy on the rest."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    x = np.asarray(images, np.float64).reshape(len(images), -1)
    y = np.asarray(labels)
    missing = sorted(set(classes) - set(y.tolist()))
    if missing:
        raise ValueError(f"no classifier images of class(es) {missing}")
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction, stratify=y, random_state=seed)
    model = LogisticRegression(C=0.1, max_iter=2000, class_weight="balanced")
    model.fit(x_tr, y_tr)
    accuracy = float(np.mean(model.predict(x_te) == y_te))
    return DigitClassifier(model, tuple(classes), accuracy, len(y_tr), len(y_te))


def class_masses(proba: np.ndarray, log_weights: Any = None) -> np.ndarray:
    """Weighted share of the walkers labelled as each class (hard labels: the argmax of
    ``proba``); equal weights when ``log_weights`` is ``None``."""
    proba = np.asarray(proba)
    n, k = proba.shape
    if log_weights is None:
        w = np.full(n, 1.0 / n)
    else:
        lw = np.asarray(log_weights, np.float64)
        w = np.exp(lw - lw.max())
        w /= w.sum()
    return np.bincount(np.argmax(proba, axis=1), weights=w, minlength=k)


# ---------------------------------------------------------------------------------------
# the experiment
# ---------------------------------------------------------------------------------------


def mnist_defaults(data_dir: str | None = None) -> DigitsConfig:
    """Defaults of the MNIST (28x28) run: a small CNN and a CPU-sized budget."""
    return DigitsConfig(
        source="mnist", data_dir=data_dir if data_dir is not None else "", split="test",
        num_samples=1400, model="conv", hidden=64, channels=8, num_walkers=300,
        num_iterations=1000, step_size=0.01, learning_rate=0.005, weight_decay=0.05, clip_norm=1.0,
        noise_std=0.0, noise_copies=1, data_batch_size=100,
    )


def run(
    config: DigitsConfig = DigitsConfig(), *, progress: bool = False, data: DigitSubset | None = None
) -> dict[str, Any]:
    """Run the experiment for each method of ``config.methods``.

    Returns a dict with ``config``, ``data`` (the :class:`DigitSubset`), ``classifier``,
    ``base`` (the initial model), ``log_z0`` and per method: ``result`` (the
    :class:`~numpyro_ebm.FitResult`), ``masses`` (final class masses of the walkers, weighted
    for Jarzynski), ``unweighted_masses``, ``mass_error`` (largest absolute error against the
    truth), ``unsure_fraction`` (weighted share of walkers whose top class probability is
    below ``config.unsure_threshold``), ``snapshot_iterations`` and ``snapshot_masses``
    (class masses over training), ``num_resampling``, ``min_normalized_ess``, and
    ``wall_time`` (seconds, compilation included).
    """
    if data is None:
        data = load_data(config)
    truth = data.fractions
    t0 = time.perf_counter()
    classifier = train_classifier(
        data.rest_images, data.rest_labels, data.classes, test_fraction=config.classifier_test_fraction,
        seed=config.seed,
    )
    classifier_time = time.perf_counter() - t0
    potential_fn, params0, base = make_energy(config, data.images)
    mean = jnp.asarray(base["mean"], jnp.float32)
    scale = base["scale"]
    train_images = jnp.asarray(data.images)
    if config.noise_std > 0:  # fixed noisy copies of every image: same class proportions
        noise_key = jax.random.fold_in(jax.random.key(config.seed), 2)
        copies = jnp.repeat(train_images, config.noise_copies, axis=0)
        train_images = copies + config.noise_std * jax.random.normal(noise_key, copies.shape, copies.dtype)

    def init_particles(key, n):  # exact draws from rho_0 = N(mean, scale^2 I)
        return mean + scale * jax.random.normal(key, (n, *mean.shape), mean.dtype)

    optimizer = optax.chain(
        optax.clip_by_global_norm(config.clip_norm),
        optax.add_decayed_weights(config.weight_decay),
        optax.sgd(config.learning_rate),
    )
    batch_size = None
    if config.data_batch_size is not None and config.data_batch_size < len(train_images):
        batch_size = config.data_batch_size
    snapshot_every = max(1, config.num_iterations // config.num_snapshots)
    fit_key = jax.random.fold_in(jax.random.key(config.seed), 1)
    out: dict[str, Any] = {
        "config": config,
        "data": data,
        "truth": truth,
        "classifier": classifier,
        "classifier_time": classifier_time,
        "base": base,
        "log_z0": base["log_z0"],
        "potential_fn": potential_fn,
    }
    for method in config.methods:
        kernel = kernels.for_method(
            method, config.step_size, ess_threshold=config.ess_threshold, num_mcmc_steps=config.num_mcmc_steps,
            schedule=config.schedule, target_ess=config.target_ess, max_substeps=config.max_substeps,
        )
        t0 = time.perf_counter()
        result: FitResult = fit(
            potential_fn, params0, train_images, optimizer=optimizer, kernel=kernel,
            num_walkers=config.num_walkers, num_iterations=config.num_iterations, rng_key=fit_key,
            init_particles=init_particles, data_batch_size=batch_size,
            log_z0=base["log_z0"] if method == "jarzynski" else None,
            callbacks=[Snapshots(snapshot_every)], progress=progress,
        )
        jax.block_until_ready(result.params)
        wall = time.perf_counter() - t0
        weighted = method == "jarzynski"
        particles = np.asarray(result.state.particles)
        log_weights = np.asarray(result.state.log_weights) if weighted else None
        proba = classifier.predict_proba(particles)
        masses = class_masses(proba, log_weights)
        w = np.full(len(particles), 1.0 / len(particles)) if log_weights is None else np.exp(log_weights)
        snaps = result.trace["snapshots"]
        snap_masses = np.stack([
            class_masses(classifier.predict_proba(p), lw if weighted else None)
            for p, lw in zip(
                snaps["particles"], snaps.get("log_weights", [None] * len(snaps["particles"])), strict=True
            )
        ])
        entry = {
            "result": result,
            "masses": masses,
            "unweighted_masses": class_masses(proba),
            "mass_error": float(np.max(np.abs(masses - truth))),
            "unsure_fraction": float(np.sum(w * (proba.max(1) < config.unsure_threshold))),
            "snapshot_iterations": np.asarray(snaps["iteration"]),
            "snapshot_masses": snap_masses,
            "final_data_energy": float(result.trace["data_energy"][-1]),
            "wall_time": wall,
        }
        if weighted:
            trace = result.trace
            entry["cross_entropy"] = np.asarray(trace["cross_entropy"])
            entry["final_cross_entropy_estimate"] = float(trace["cross_entropy"][-1])
            entry["num_resampling"] = int(np.sum(trace["resampled"]))
            entry["min_normalized_ess"] = float(np.min(trace["normalized_ess"]))
            entry["mean_normalized_ess"] = float(np.mean(trace["normalized_ess"]))
        out[method] = entry
    return out


def format_table(results: dict[str, Any]) -> str:
    """Plain-text table: class masses of the walkers per method against the truth."""
    config: DigitsConfig = results["config"]
    classes = results["data"].classes
    cols = "".join(f"{'digit ' + str(c):>9}" for c in classes)
    header = f"{'':<22}{cols} {'max|err|':>9} {'unsure':>7} {'resampl.':>8} {'CE est.':>9} {'wall s':>7}"
    lines = [header, "-" * len(header)]
    lines.append(f"{'truth':<22}" + "".join(f"{m:>9.3f}" for m in results["truth"]))
    for method in config.methods:
        r = results[method]
        name = f"{method} ({'weighted' if method == 'jarzynski' else 'equal w.'})"
        ce = r.get("final_cross_entropy_estimate")
        lines.append(
            f"{name:<22}" + "".join(f"{m:>9.3f}" for m in r["masses"])
            + f" {r['mass_error']:>9.3f} {r['unsure_fraction']:>7.3f} "
            f"{(str(r['num_resampling']) if 'num_resampling' in r else 'n/a'):>8} "
            f"{(f'{ce:.2f}' if ce is not None else 'n/a'):>9} {r['wall_time']:>7.1f}"
        )
        if method == "jarzynski":
            lines.append(f"{'  jarzynski unweighted':<22}" + "".join(f"{m:>9.3f}" for m in r["unweighted_masses"]))
    data = results["data"]
    clf = results["classifier"]
    lines.append(
        f"training subset: {', '.join(f'{c}: {n}' for c, n in data.counts.items())} images; "
        f"classifier: logistic regression over {list(classes)}, trained on {clf.num_train} other images, "
        f"held-out accuracy {clf.test_accuracy:.3f} ({clf.num_test} images)"
    )
    return "\n".join(lines)


def summary(results: dict[str, Any]) -> dict[str, Any]:
    """JSON-ready summary of a run."""
    config: DigitsConfig = results["config"]
    data = results["data"]
    clf = results["classifier"]
    out = {
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(config).items()},
        "counts": {str(c): n for c, n in data.counts.items()},
        "truth": results["truth"].tolist(),
        "classifier": {
            "kind": "logistic regression over the training classes",
            "num_train": clf.num_train, "num_test": clf.num_test, "test_accuracy": clf.test_accuracy,
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
            )
        }
    return out


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
