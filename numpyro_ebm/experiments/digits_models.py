r"""The networks and the classifier of the imbalanced-digits experiment
(:mod:`numpyro_ebm.experiments.digits`).

* :class:`MLPEnergy` and :class:`ConvEnergy`: Flax NNX energies
  :math:`U_\theta(x) = f_\theta\big((x - \mu)/\sigma_0\big) + |x - \mu|^2/(2\sigma_0^2)` whose
  network :math:`f_\theta` starts at zero, so that the initial model is exactly
  :math:`N(\mu, \sigma_0^2 I)`; :func:`make_energy` builds one for the training images.
* the classifiers that label the walkers live in
  :mod:`numpyro_ebm.experiments.digits_classifier` (re-exported here).

All these names are importable from :mod:`numpyro_ebm.experiments.digits` as well.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from numpyro_ebm.experiments.digits_classifier import (
    DigitClassifier,
    class_masses,
    train_classifier,
    train_cnn_classifier,
)
from numpyro_ebm.potentials import from_flax

if TYPE_CHECKING:
    from numpyro_ebm.experiments.digits_config import DigitsConfig

__all__ = [
    "MLPEnergy",
    "ConvEnergy",
    "make_energy",
    "DigitClassifier",
    "train_classifier",
    "train_cnn_classifier",
    "class_masses",
]


# ---------------------------------------------------------------------------------------
# energies
# ---------------------------------------------------------------------------------------


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
