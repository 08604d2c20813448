r"""The classifiers that label the walkers of the imbalanced-digits experiment
(:mod:`numpyro_ebm.experiments.digits`), and the class masses they give.

Both classifiers are trained on images of the training classes that are **not** in the energy
model's training subset (``DigitSubset.rest_images``), on a stratified ``1 - test_fraction``
of them, and report their accuracy on the rest:

* :func:`train_classifier`: a logistic regression (scikit-learn), enough for the 8x8 digits;
* :func:`train_cnn_classifier`: a small convolutional network (Flax NNX, trained with Adam in
  one ``jit``-compiled ``lax.scan``), for 28x28 MNIST.

Each gives a :class:`DigitClassifier` whose ``logits_fn`` is a pure JAX function, so the
walkers can be labelled inside the training loop
(:func:`numpyro_ebm.training.labels.label_trace`): the class masses are then recorded at
every iteration, not only at snapshots. The model's mass of class :math:`c` is estimated by
:math:`m_c = \sum_i w_i [\hat c(X^i) = c]` (:func:`class_masses`), with the Jarzynski weights
:math:`w` (equal weights for PCD) and the classifier's hard label :math:`\hat c`.

That estimate is only as good as the labels. Walkers of a model still being trained are
often not clean digits, and classifiers that agree on real images can split such walkers
differently. :func:`mass_readout` takes the same walkers' class probabilities from several
classifiers, each trained with its own seed, and reports how far their masses spread. A
mass error smaller than that spread cannot be resolved with these classifiers.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

__all__ = ["DigitClassifier", "train_classifier", "train_cnn_classifier", "class_masses", "mass_readout"]


@dataclasses.dataclass
class DigitClassifier:
    """A digit classifier over ``classes``: ``logits_fn(images) -> (n, len(classes))`` logits
    (pure JAX, columns in the order of ``classes``), its ``kind`` and held-out accuracy."""

    logits_fn: Callable[[Any], jax.Array]
    classes: tuple[int, ...]
    test_accuracy: float
    num_train: int
    num_test: int
    kind: str = "logistic regression"

    def __post_init__(self):
        self._proba = jax.jit(lambda x: jax.nn.softmax(self.logits_fn(x), axis=-1))

    def predict_proba(self, images: Any, batch_size: int = 1024) -> np.ndarray:
        """Class probabilities, shape ``(n, len(classes))``, columns in the order of ``classes``."""
        images = np.asarray(images, np.float32)
        parts = [np.asarray(self._proba(images[i:i + batch_size]), np.float64)
                 for i in range(0, len(images), batch_size)]
        return np.concatenate(parts) if parts else np.zeros((0, len(self.classes)))

    def label_fn(self, images: jax.Array) -> jax.Array:
        """Hard labels (indices into ``classes``), jittable."""
        return jnp.argmax(self.logits_fn(images), axis=-1)


def _split(images, labels, classes, test_fraction, seed):
    from sklearn.model_selection import train_test_split

    x = np.asarray(images, np.float32)
    y = np.asarray(labels)
    missing = sorted(set(classes) - set(y.tolist()))
    if missing:
        raise ValueError(f"no classifier images of class(es) {missing}")
    position = {c: j for j, c in enumerate(classes)}
    unknown = sorted(set(y.tolist()) - set(position))
    if unknown:
        raise ValueError(f"classifier images of class(es) {unknown} outside `classes` {tuple(classes)}")
    y = np.asarray([position[v] for v in y.tolist()], np.int32)  # index into `classes`
    return train_test_split(x, y, test_size=test_fraction, stratify=y, random_state=seed)


def train_classifier(
    images: np.ndarray, labels: np.ndarray, classes: tuple[int, ...], *, test_fraction: float = 0.3,
    seed: int = 0,
) -> DigitClassifier:
    """Fit a logistic regression (balanced class weights, L2 with ``C = 0.1``) on a stratified
    ``1 - test_fraction`` of ``images`` and measure its accuracy on the rest."""
    from sklearn.linear_model import LogisticRegression

    x_tr, x_te, y_tr, y_te = _split(images, labels, classes, test_fraction, seed)
    model = LogisticRegression(C=0.1, max_iter=2000, class_weight="balanced")
    model.fit(x_tr.reshape(len(x_tr), -1).astype(np.float64), y_tr)
    accuracy = float(np.mean(model.predict(x_te.reshape(len(x_te), -1).astype(np.float64)) == y_te))
    coef = jnp.asarray(model.coef_.T, jnp.float32)
    intercept = jnp.asarray(model.intercept_, jnp.float32)
    if coef.shape[1] == 1:  # scikit-learn's binary case: one column of log-odds
        coef, intercept = jnp.concatenate([-coef, coef], 1) / 2, jnp.stack([-intercept[0], intercept[0]]) / 2

    def logits_fn(x):
        return jnp.reshape(jnp.asarray(x, jnp.float32), (jnp.shape(x)[0], -1)) @ coef + intercept

    return DigitClassifier(logits_fn, tuple(classes), accuracy, len(y_tr), len(y_te))


class _ConvNet(nnx.Module):
    """Three 3x3 convolutions (16, 32, 32 channels; the last two stride 2), a 64-unit dense
    layer and the class logits."""

    def __init__(self, height: int, width: int, num_classes: int, *, rngs: nnx.Rngs):
        self.c1 = nnx.Conv(1, 16, (3, 3), rngs=rngs)
        self.c2 = nnx.Conv(16, 32, (3, 3), strides=(2, 2), rngs=rngs)
        self.c3 = nnx.Conv(32, 32, (3, 3), strides=(2, 2), rngs=rngs)
        flat = 32 * math.ceil(math.ceil(height / 2) / 2) * math.ceil(math.ceil(width / 2) / 2)
        self.l1 = nnx.Linear(flat, 64, rngs=rngs)
        self.out = nnx.Linear(64, num_classes, rngs=rngs)

    def __call__(self, x):
        h = jax.nn.relu(self.c1(x[..., None]))
        h = jax.nn.relu(self.c2(h))
        h = jax.nn.relu(self.c3(h))
        return self.out(jax.nn.relu(self.l1(h.reshape(h.shape[0], -1))))


def train_cnn_classifier(
    images: np.ndarray, labels: np.ndarray, classes: tuple[int, ...], *, test_fraction: float = 0.3,
    seed: int = 0, num_epochs: int = 20, batch_size: int = 64, learning_rate: float = 1e-3,
    noise_std: float = 0.1, max_shift: int = 2,
) -> DigitClassifier:
    """Train :class:`_ConvNet` with Adam on a stratified ``1 - test_fraction`` of ``images``
    and measure its accuracy on the clean rest.

    The loss is the class-balanced cross-entropy (each class weighted by the inverse of its
    frequency: the images left out of an imbalanced subset are imbalanced the other way).
    Each batch is augmented by a random shift of up to ``max_shift`` pixels and fresh Gaussian
    pixel noise of std ``noise_std`` (the walkers it will label are noisy images)."""
    x_tr, x_te, y_tr, y_te = _split(images, labels, classes, test_fraction, seed)
    height, width = x_tr.shape[1:]
    graphdef, params = nnx.split(_ConvNet(height, width, len(classes), rngs=nnx.Rngs(seed)))
    optimizer = optax.adam(learning_rate)
    batch_size = min(batch_size, len(x_tr))
    steps_per_epoch = max(1, len(x_tr) // batch_size)
    class_weight = jnp.asarray(len(y_tr) / (len(classes) * np.bincount(y_tr, minlength=len(classes))), jnp.float32)
    x_tr, y_tr = jnp.asarray(x_tr), jnp.asarray(y_tr)

    def loss(params, x, y):
        logits = nnx.merge(graphdef, params)(x)
        return jnp.mean(class_weight[y] * optax.softmax_cross_entropy_with_integer_labels(logits, y))

    def augment(x, key):
        shift_key, noise_key = jax.random.split(key)
        shift = jax.random.randint(shift_key, (2,), -max_shift, max_shift + 1)
        x = jnp.roll(x, (shift[0], shift[1]), axis=(1, 2))
        return x + noise_std * jax.random.normal(noise_key, x.shape)

    def epoch(carry, key):
        order = jax.random.permutation(key, len(x_tr))[: steps_per_epoch * batch_size]

        def step(carry, idx_and_key):
            params, opt_state = carry
            idx, batch_key = idx_and_key
            x = augment(x_tr[idx], batch_key)
            grads = jax.grad(loss)(params, x, y_tr[idx])
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), None

        keys = jax.random.split(jax.random.fold_in(key, 1), steps_per_epoch)
        return jax.lax.scan(step, carry, (order.reshape(steps_per_epoch, batch_size), keys))[0], None

    keys = jax.random.split(jax.random.key(seed), num_epochs)
    (params, _), _ = jax.jit(lambda c: jax.lax.scan(epoch, c, keys))((params, optimizer.init(params)))

    def logits_fn(x):
        return nnx.merge(graphdef, params)(jnp.asarray(x, jnp.float32))

    classifier = DigitClassifier(logits_fn, tuple(classes), 0.0, len(y_tr), len(y_te), kind="CNN")
    classifier.test_accuracy = float(np.mean(classifier.predict_proba(x_te).argmax(1) == y_te))
    return classifier


def class_masses(proba: np.ndarray, log_weights: Any = None) -> np.ndarray:
    """Weighted share of the walkers labelled as each class (hard labels: the argmax of
    ``proba``); equal weights when ``log_weights`` is ``None``."""
    proba = np.asarray(proba)
    n, k = proba.shape
    return np.bincount(np.argmax(proba, axis=1), weights=_normalized_weights(n, log_weights), minlength=k)


def mass_readout(probas: list[np.ndarray], log_weights: Any = None) -> dict[str, Any]:
    r"""The class masses of the same images (weighted by ``log_weights``; equal weights when
    ``None``) as each classifier reads them: ``probas[j]`` is classifier ``j``'s
    :meth:`DigitClassifier.predict_proba` of the images.

    Returns ``masses_by_classifier`` (shape ``(len(probas), num_classes)``: the
    :math:`m_c` of :func:`class_masses` per classifier), ``classifier_spread`` (per class, the
    largest minus the smallest of those masses) and ``classifier_agreement`` (the weight
    :math:`\sum_i w_i` of the images that every classifier gives the same label)."""
    if not len(probas):
        raise ValueError("`probas` must hold the probabilities of at least one classifier")
    masses = np.stack([class_masses(p, log_weights) for p in probas])
    labels = np.stack([p.argmax(1) for p in probas])
    alike = np.all(labels == labels[0], axis=0)
    return {
        "masses_by_classifier": masses,
        "classifier_spread": masses.max(0) - masses.min(0),
        "classifier_agreement": float(np.sum(_normalized_weights(len(alike), log_weights)[alike])),
    }


def _normalized_weights(n: int, log_weights: Any) -> np.ndarray:
    if log_weights is None:
        return np.full(n, 1.0 / n)
    lw = np.asarray(log_weights, np.float64)
    w = np.exp(lw - lw.max())
    return w / w.sum()
