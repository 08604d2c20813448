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
clipping), walkers, step size, keys and number of iterations. ``weight_decay`` adds
:math:`\tfrac{\lambda}{2}|\theta|^2` to the objective (added after the gradient clip: the step
gains :math:`-\mathrm{lr}\,\lambda\,\theta`); it is off by default: it biased the class
masses of the trained model (``docs/digits.md``, run 9). By default
the model is fitted to ``noise_copies`` fixed noisy copies of every training image (pixel
noise ``noise_std``; the class proportions are unchanged), which smooths the energy; the
gradient clip at norm 1 bounds the parameter move per iteration, and with it the Jarzynski
weight increments (see ``docs/digits.md``). A digit classifier
(scikit-learn logistic regression restricted to the training classes) is trained on images
of those classes that are *not* in the energy model's training subset; its held-out accuracy
is reported. The class masses of the model are measured as the classifier's hard labels of
the walkers, weighted by the Jarzynski weights (Jarzynski) or equally (PCD), and set beside
the truth (the requested proportions). ``num_classifiers`` classifiers, trained with
different seeds, read the final walkers; the spread of their masses is reported beside the
error, since an error smaller than it is not resolved by the classifier.

The settings are defined in :mod:`numpyro_ebm.experiments.digits_config`, the energies in
:mod:`numpyro_ebm.experiments.digits_models`, the classifiers in
:mod:`numpyro_ebm.experiments.digits_classifier`, the figures in
:mod:`numpyro_ebm.experiments.digits_figures`; their names are importable from this module
as well.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from numpyro_ebm import kernels
from numpyro_ebm.datasets import DigitSubset, load_digits, load_mnist
from numpyro_ebm.experiments.digits_classifier import (
    DigitClassifier,
    class_masses,
    mass_readout,
    train_classifier,
    train_cnn_classifier,
)
from numpyro_ebm.experiments.digits_config import (
    EXPERIMENT_METHODS,
    DigitsConfig,
    authors_preset,
    learning_rate,
    make_optimizer,
    mnist_defaults,
    peak_learning_rate,
)
from numpyro_ebm.experiments.digits_figures import plot, save_figures
from numpyro_ebm.experiments.digits_models import ConvEnergy, MLPEnergy, make_energy
from numpyro_ebm.experiments.digits_report import format_table, summary
from numpyro_ebm.step_size import step_size_adaptation
from numpyro_ebm.training.callbacks import Snapshots
from numpyro_ebm.training.fit import FitResult, fit
from numpyro_ebm.training.labels import label_mass_standard_error, label_trace
from numpyro_ebm.training.penalties import squared_energy

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
    "authors_preset",
    "make_kernel",
    "make_classifier",
    "make_classifiers",
    "mass_readout",
    "learning_rate",
    "peak_learning_rate",
    "make_optimizer",
    "EXPERIMENT_METHODS",
]

# ---------------------------------------------------------------------------------------
# data
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


# ---------------------------------------------------------------------------------------
# the experiment
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _FitInputs:
    """What the ``fit`` of every method shares: energy, data, optimiser, walkers and key."""

    potential_fn: Callable
    params: Any
    train_images: jax.Array
    optimizer: optax.GradientTransformation
    init_particles: Callable
    data_batch_size: int | None
    snapshot_every: int
    rng_key: jax.Array
    log_z0: float


def _training_images(config: DigitsConfig, images: np.ndarray) -> jax.Array:
    """The images the model is fitted to: ``noise_copies`` fixed noisy copies of every image
    (same class proportions) when ``noise_std > 0``, else the images themselves."""
    train_images = jnp.asarray(images)
    if config.noise_std > 0:
        noise_key = jax.random.fold_in(jax.random.key(config.seed), 2)
        copies = jnp.repeat(train_images, config.noise_copies, axis=0)
        train_images = copies + config.noise_std * jax.random.normal(noise_key, copies.shape, copies.dtype)
    return train_images


def _fit_inputs(config: DigitsConfig, potential_fn: Callable, params: Any, base: dict,
                images: np.ndarray) -> _FitInputs:
    """The shared ``fit`` inputs; the walkers start as exact draws from the initial model."""
    mean = jnp.asarray(base["mean"], jnp.float32)
    scale = base["scale"]

    def init_particles(key, n):  # exact draws from rho_0 = N(mean, scale^2 I)
        return mean + scale * jax.random.normal(key, (n, *mean.shape), mean.dtype)

    train_images = _training_images(config, images)
    optimizer = make_optimizer(config)
    batch_size = None
    if config.data_batch_size is not None and config.data_batch_size < len(train_images):
        batch_size = config.data_batch_size
    return _FitInputs(
        potential_fn=potential_fn, params=params, train_images=train_images, optimizer=optimizer,
        init_particles=init_particles, data_batch_size=batch_size,
        snapshot_every=max(1, config.num_iterations // config.num_snapshots),
        rng_key=jax.random.fold_in(jax.random.key(config.seed), 1), log_z0=base["log_z0"],
    )


def make_kernel(config: DigitsConfig, method: str) -> kernels.WalkerKernel:
    """The walker kernel of ``method`` with ``config``'s settings; Jarzynski kernels get
    ``config.rejuvenation_moves`` MALA moves after each resampling. With ``preset="authors"``
    the authors' moves (:mod:`numpyro_ebm.kernels.authors_ula`), weighted for Jarzynski."""
    if config.preset == "authors":
        return kernels.authors_ula.walker_kernel(
            config.step_size, num_mcmc_steps=config.num_mcmc_steps, ess_threshold=config.ess_threshold,
            subset_size=min(256, config.num_walkers), weighted=method == "jarzynski",
        )
    kernel = kernels.for_method(
        method, config.step_size, ess_threshold=config.ess_threshold, num_mcmc_steps=config.num_mcmc_steps,
        schedule=config.schedule, target_ess=config.target_ess, max_substeps=config.max_substeps,
    )
    if kernel.weighted and config.rejuvenation_moves > 0:
        kernel = kernels.rejuvenation.with_rejuvenation(kernel, config.rejuvenation_moves)
    return kernel


def _fit_method(config: DigitsConfig, method: str, inputs: _FitInputs, classifier: DigitClassifier,
                progress: bool) -> tuple[FitResult, float]:
    """``(result, wall time in seconds)`` of training with ``method``, compilation included;
    the classifier's weighted class masses and per-class ESS are traced every iteration."""
    kernel = make_kernel(config, method)
    penalty = squared_energy(config.energy_penalty) if config.energy_penalty > 0 else None
    adaptation = None
    if kernel.weighted and config.target_acceptance is not None:
        adaptation = step_size_adaptation(config.target_acceptance, probe_every=config.acceptance_probe_every)
    t0 = time.perf_counter()
    result: FitResult = fit(
        inputs.potential_fn, inputs.params, inputs.train_images, optimizer=inputs.optimizer, kernel=kernel,
        num_walkers=config.num_walkers, num_iterations=config.num_iterations, rng_key=inputs.rng_key,
        init_particles=inputs.init_particles, data_batch_size=inputs.data_batch_size,
        log_z0=inputs.log_z0 if method == "jarzynski" else None,
        trace_fn=label_trace(classifier.label_fn, len(config.classes)), trace_every=config.label_every,
        energy_penalty=penalty,
        step_size_adaptation=adaptation,
        callbacks=[Snapshots(inputs.snapshot_every)], progress=progress,
    )
    jax.block_until_ready(result.params)
    return result, time.perf_counter() - t0


def _snapshot_masses(classifier: DigitClassifier, snaps: dict[str, Any], weighted: bool) -> np.ndarray:
    """Class masses of the walkers at each snapshot, shape ``(num_snapshots, num_classes)``."""
    return np.stack([
        class_masses(classifier.predict_proba(p), lw if weighted else None)
        for p, lw in zip(
            snaps["particles"], snaps.get("log_weights", [None] * len(snaps["particles"])), strict=True
        )
    ])


def _tail_figures(config: DigitsConfig, entry: dict[str, Any], truth: np.ndarray) -> dict[str, Any]:
    """The long-run figures: class masses averaged over the last 20% of iterations, the worst
    snapshot error after the first 20%, the smallest per-class ESS after the first 20%, and
    the Monte Carlo standard error of one labelled iteration's masses averaged over the last
    20% (the tail average's own error is at most this: it is this when no walker changes
    class over the tail, smaller when they do)."""
    iterations = entry["mass_trace_iterations"]
    in_tail = iterations >= np.floor(0.8 * config.num_iterations)
    if in_tail.any():
        tail = entry["mass_trace"][in_tail]
        tail_se = np.asarray(label_mass_standard_error(tail, entry["label_ess_trace"][in_tail]))
    else:  # no labelled iteration there (run() has warned): NaN figures
        tail = tail_se = np.full((1, len(truth)), np.nan)
    after = entry["snapshot_iterations"] >= 0.2 * config.num_iterations
    snapshot_errors = np.max(np.abs(entry["snapshot_masses"][after] - truth), axis=1)
    label_ess = entry["label_ess_trace"][iterations >= np.floor(0.2 * config.num_iterations)]
    return {
        "tail_masses": tail.mean(0),
        "tail_mass_error": float(np.max(np.abs(tail.mean(0) - truth))),
        "tail_mass_standard_error": tail_se.mean(0),
        "worst_snapshot_error": float(snapshot_errors.max()) if snapshot_errors.size else float("nan"),
        "min_label_ess": float(label_ess.min()) if label_ess.size else float("nan"),
    }


def _method_entry(config: DigitsConfig, method: str, result: FitResult, wall: float,
                  classifiers: list[DigitClassifier], truth: np.ndarray) -> dict[str, Any]:
    """The per-method part of :func:`run`'s output (see there)."""
    classifier = classifiers[0]
    weighted = method == "jarzynski"
    particles = np.asarray(result.state.particles)
    log_weights = np.asarray(result.state.log_weights) if weighted else None
    probas = [c.predict_proba(particles) for c in classifiers]
    proba = probas[0]
    masses = class_masses(proba, log_weights)
    w = np.full(len(particles), 1.0 / len(particles)) if log_weights is None else np.exp(log_weights)
    trace = result.trace
    snaps = trace["snapshots"]
    entry = {
        "result": result,
        "masses": masses,
        "unweighted_masses": class_masses(proba),
        "mass_error": float(np.max(np.abs(masses - truth))),
        "unsure_fraction": float(np.sum(w * (proba.max(1) < config.unsure_threshold))),
        "snapshot_iterations": np.asarray(snaps["iteration"]),
        "snapshot_masses": _snapshot_masses(classifier, snaps, weighted),
        # the labelled iterations only (every config.label_every-th)
        "mass_trace": np.asarray(trace["extra"]["label_mass"], np.float64)[::config.label_every],
        "label_ess_trace": np.asarray(trace["extra"]["label_ess"], np.float64)[::config.label_every],
        "mass_trace_iterations": np.arange(0, config.num_iterations, config.label_every),
        "final_data_energy": float(trace["data_energy"][-1]),
        "wall_time": wall,
    }
    entry.update(mass_readout(probas, log_weights))
    entry.update(_tail_figures(config, entry, truth))
    if weighted:
        entry["cross_entropy"] = np.asarray(trace["cross_entropy"])
        entry["final_cross_entropy_estimate"] = float(trace["cross_entropy"][-1])
        entry["num_resampling"] = int(np.sum(trace["resampled"]))
        entry["min_normalized_ess"] = float(np.min(trace["normalized_ess"]))
        entry["mean_normalized_ess"] = float(np.mean(trace["normalized_ess"]))
        entry["min_lineage_fraction"] = float(np.min(trace["num_lineages"])) / config.num_walkers
    return entry


def make_classifier(config: DigitsConfig, data: DigitSubset, seed: int | None = None) -> DigitClassifier:
    """The classifier ``config.classifier`` names, trained on the images outside the subset,
    with ``seed`` (its train/test split and, for the CNN, its initialisation; default
    ``config.seed``)."""
    train = train_cnn_classifier if config.classifier == "cnn" else train_classifier
    return train(data.rest_images, data.rest_labels, data.classes,
                 test_fraction=config.classifier_test_fraction, seed=config.seed if seed is None else seed)


def make_classifiers(config: DigitsConfig, data: DigitSubset) -> list[DigitClassifier]:
    """``config.num_classifiers`` classifiers, with seeds ``config.seed + 10 i``; the first
    (:func:`make_classifier`'s) labels the walkers during training, all of them read the
    final walkers (:func:`mass_readout`)."""
    return [make_classifier(config, data, config.seed + 10 * i) for i in range(config.num_classifiers)]


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
    (class masses over training), ``mass_trace`` and ``label_ess_trace`` (the weighted class masses and per-class ESS,
    from the classifier inside the loop, at the iterations ``mass_trace_iterations``: every
    ``config.label_every``-th),
    ``tail_masses`` and ``tail_mass_error`` (masses averaged over the last 20% of iterations),
    ``worst_snapshot_error`` (after the first 20%), ``min_label_ess``, ``num_resampling``,
    ``min_normalized_ess``, ``min_lineage_fraction`` (fewest distinct ancestors over a
    lineage window, over N), ``wall_time`` (seconds, compilation included), and the final
    walkers read by all ``config.num_classifiers`` classifiers (``classifiers``, the first
    being ``classifier``; :func:`mass_readout`): ``masses_by_classifier``,
    ``classifier_spread`` (per class; a mass error below it is not resolved by these
    classifiers) and ``classifier_agreement`` (the weight of walkers that all label alike).
    """
    if (config.num_iterations - 1) // config.label_every * config.label_every < np.floor(0.8 * config.num_iterations):
        warnings.warn(
            f"no labelled iteration falls in the last 20% of the run (`label_every`={config.label_every}, "
            f"`num_iterations`={config.num_iterations}): the tail figures will be NaN; label more often or "
            "run longer", UserWarning, stacklevel=2,
        )
    if data is None:
        data = load_data(config)
    t0 = time.perf_counter()
    classifiers = make_classifiers(config, data)
    classifier = classifiers[0]
    classifier_time = time.perf_counter() - t0
    potential_fn, params0, base = make_energy(config, data.images)
    inputs = _fit_inputs(config, potential_fn, params0, base, data.images)
    out: dict[str, Any] = {
        "config": config,
        "data": data,
        "truth": data.fractions,
        "classifier": classifier,
        "classifiers": classifiers,
        "classifier_time": classifier_time,
        "base": base,
        "log_z0": base["log_z0"],
        "potential_fn": potential_fn,
    }
    for method in config.methods:
        result, wall = _fit_method(config, method, inputs, classifier, progress)
        out[method] = _method_entry(config, method, result, wall, classifiers, data.fractions)
    return out
