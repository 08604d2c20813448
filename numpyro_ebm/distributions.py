r"""A trained energy-based model as a NumPyro distribution.

:class:`EnergyBased` is :math:`\rho_\theta(x) = e^{-U_\theta(x)} / Z_\theta` with
:math:`\log Z_\theta` a Jarzynski estimate, and draws from the Jarzynski-weighted walkers.
It can be the prior of a latent variable in a NumPyro model (run with NUTS: :math:`\log Z`
is a constant there) or the likelihood of observed data.
:func:`energy_based_from_fit` builds it from a :class:`~numpyro_ebm.FitResult`; without
an exact :math:`\log Z_{\theta_0}` and with the data it anneals for :math:`\log Z_\theta`
in both directions (:func:`numpyro_ebm.normalizer.estimate_log_normalizer`) and keeps the
lower and upper estimates in ``log_normalizer_bounds``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from blackjax.smc.ess import ess
from jax.scipy.special import logsumexp
from numpyro.distributions import Distribution, constraints

from numpyro_ebm import _checks
from numpyro_ebm.normalizer import LogNormalizerEstimate, estimate_log_normalizer

__all__ = ["EnergyBased", "energy_based_from_fit"]


def _default_support(event_dim: int) -> constraints.Constraint:
    if event_dim == 0:
        return constraints.real
    if event_dim == 1:
        return constraints.real_vector
    return constraints.independent(constraints.real, event_dim)


def _check_log_weights(log_weights: Any) -> None:
    """Log weights must be finite or :math:`-\\infty` (weight 0), with one weight > 0.

    A NaN (e.g. from a diverged run) would make ``jax.random.categorical`` draw one walker
    over and over; :math:`+\\infty` is not a weight either. Skipped for traced values.
    """
    if not _checks.is_concrete(log_weights):
        return
    lw = np.asarray(log_weights, dtype=np.float64)
    bad = int(np.count_nonzero(np.isnan(lw) | (lw == np.inf)))
    if bad:
        raise ValueError(
            f"`log_weights` contains {bad} NaN or +inf value(s) out of {lw.size}: they are not "
            "weights (a diverged run?); -inf is allowed and means weight 0"
        )
    if lw.size and not np.any(np.isfinite(lw)):
        raise ValueError("`log_weights` are all -inf: every walker has weight 0")


class EnergyBased(Distribution):
    r"""The energy-based model :math:`\rho_\theta(x) = e^{-U_\theta(x)} / Z_\theta`.

    Parameters
    ----------
    potential_fn
        ``potential_fn(params, x) -> scalar``, the energy :math:`U_\theta` of ONE sample
        ``x`` of shape ``event_shape``.
    params
        The parameters :math:`\theta` (a pytree).
    log_normalizer
        An estimate of :math:`\log Z_\theta` (scalar), e.g.
        :math:`\log Z_{\theta_0} +` the Jarzynski ``state.log_normalizer``, or a
        :class:`~numpyro_ebm.normalizer.LogNormalizerEstimate` (its forward estimate is used,
        its lower and upper estimates kept in ``log_normalizer_bounds``). ``None``: the
        density is UNNORMALISED, :meth:`log_prob` returns :math:`-U_\theta(x)` (enough for
        MCMC over a latent with this prior, not for comparing models or for a likelihood
        whose :math:`\theta` varies).
    particles
        Walkers, shape ``(num_walkers, *event_shape)``; needed by :meth:`sample`.
    log_weights
        Their log weights, shape ``(num_walkers,)`` (normalised or not; ``None``: equal).
        :math:`-\\infty` means weight 0; NaN or :math:`+\\infty` raise ``ValueError``, as
        do weights that are all zero.
    event_shape
        Shape of one sample; default ``particles.shape[1:]``. Required without particles.
    support
        Default: ``real`` for scalar events, ``real_vector`` for vectors,
        ``independent(real, k)`` for ``k``-dimensional events.

    Attributes
    ----------
    log_normalizer_bounds
        ``[lower, upper]`` stochastic bounds on :math:`\log Z_\theta` when
        ``log_normalizer`` was a ``LogNormalizerEstimate`` (``upper`` is ``nan`` without a
        reverse run), else ``None``.

    Notes
    -----
    :meth:`log_prob` is :math:`-U_\theta(x) - \log Z_\theta` (vmapped over the batch axes
    of ``value``). :meth:`sample` resamples the walkers by weight: draws are i.i.d. from
    the weighted empirical measure :math:`\sum_i w_i \delta_{X^i}`, so they repeat walker
    positions (run more Jarzynski kernel steps for fresh walkers). Without ``particles``,
    :meth:`sample` raises ``ValueError``. ``mean``/``variance`` are the weighted walker
    moments. The batch shape is always ``()``.
    """

    pytree_data_fields = ("params", "log_normalizer", "particles", "log_weights",
                          "log_normalizer_bounds")
    pytree_aux_fields = ("potential_fn", "_support")

    def __init__(
        self,
        potential_fn,
        params: Any,
        log_normalizer: Any = None,
        particles: Any = None,
        log_weights: Any = None,
        *,
        event_shape: tuple[int, ...] | None = None,
        support: constraints.Constraint | None = None,
        validate_args: bool | None = None,
    ):
        if not callable(potential_fn):
            raise TypeError(f"`potential_fn` must be callable, got {type(potential_fn).__name__}")
        if particles is not None:
            if not hasattr(particles, "shape"):
                raise TypeError(
                    "`particles` must be one array of shape (num_walkers, *event_shape)"
                )
            n = _checks.leading_size("particles", particles)
            if event_shape is None:
                event_shape = tuple(particles.shape[1:])
            elif tuple(event_shape) != tuple(particles.shape[1:]):
                raise ValueError(
                    f"`event_shape` {tuple(event_shape)} disagrees with `particles` of shape "
                    f"{tuple(particles.shape)}"
                )
            if log_weights is not None and tuple(jnp.shape(log_weights)) != (n,):
                raise ValueError(
                    f"`log_weights` must have shape ({n},) to match `particles`, got "
                    f"{tuple(jnp.shape(log_weights))}"
                )
            if log_weights is not None:
                _check_log_weights(log_weights)
        elif log_weights is not None:
            raise ValueError("`log_weights` given without `particles`")
        if event_shape is None:
            raise ValueError("`event_shape` is required when no `particles` are given")
        bounds = None
        if isinstance(log_normalizer, LogNormalizerEstimate):
            bounds = jnp.stack([log_normalizer.lower, jnp.asarray(log_normalizer.upper,
                                                                 log_normalizer.lower.dtype)])
            log_normalizer = log_normalizer.log_normalizer
        if log_normalizer is not None and jnp.shape(log_normalizer) != ():
            raise ValueError(
                f"`log_normalizer` must be a scalar, got shape {jnp.shape(log_normalizer)}"
            )
        self.potential_fn = potential_fn
        self.params = params
        self.log_normalizer = log_normalizer
        self.log_normalizer_bounds = bounds
        self.particles = particles
        self.log_weights = log_weights
        self._support = support if support is not None else _default_support(len(event_shape))
        super().__init__(
            batch_shape=(), event_shape=tuple(event_shape), validate_args=validate_args
        )

    @property
    def support(self) -> constraints.Constraint:
        return self._support

    # -- density ---------------------------------------------------------------------
    def energy(self, value: jax.Array) -> jax.Array:
        """:math:`U_\\theta(x)` for ``value`` of shape ``batch + event_shape``."""
        value = jnp.asarray(value)
        k = len(self.event_shape)
        if tuple(value.shape[value.ndim - k :]) != self.event_shape or value.ndim < k:
            raise ValueError(
                f"`value` of shape {value.shape} does not end in event_shape {self.event_shape}"
            )
        batch = value.shape[: value.ndim - k]
        flat = value.reshape((-1, *self.event_shape))
        energies = jax.vmap(self.potential_fn, in_axes=(None, 0))(self.params, flat)
        return energies.reshape(batch)

    def log_prob(self, value: jax.Array) -> jax.Array:
        """:math:`-U_\\theta(x) - \\log Z_\\theta` (:math:`-U_\\theta(x)` when
        ``log_normalizer`` is ``None``)."""
        lp = -self.energy(value)
        if self.log_normalizer is not None:
            lp = lp - self.log_normalizer
        return lp

    # -- walkers ---------------------------------------------------------------------
    def _normalised_log_weights(self) -> jax.Array:
        if self.particles is None:
            raise ValueError(
                "EnergyBased has no walkers: pass `particles` (e.g. via "
                "energy_based_from_fit) to sample or to compute walker moments"
            )
        n = self.particles.shape[0]
        if self.log_weights is None:
            return jnp.full((n,), -jnp.log(n), self.particles.dtype)
        return self.log_weights - logsumexp(self.log_weights)

    def sample(self, key: jax.Array, sample_shape: tuple[int, ...] = ()) -> jax.Array:
        """``sample_shape`` draws of walkers, each chosen with probability :math:`w_i`."""
        log_w = self._normalised_log_weights()
        idx = jax.random.categorical(key, log_w, shape=tuple(sample_shape))
        return self.particles[idx]

    @property
    def mean(self) -> jax.Array:
        w = jnp.exp(self._normalised_log_weights())
        return jnp.tensordot(w, self.particles, axes=1)

    @property
    def variance(self) -> jax.Array:
        w = jnp.exp(self._normalised_log_weights())
        return jnp.tensordot(w, (self.particles - self.mean) ** 2, axes=1)

    @property
    def effective_sample_size(self) -> jax.Array:
        """Kish ESS of the walker weights, :math:`1 / \\sum_i w_i^2` (BlackJAX's ``ess``)."""
        return ess(self._normalised_log_weights())


def energy_based_from_fit(
    potential_fn, result: Any, log_z0: Any = None, *, support=None, data: Any = None,
    rng_key: jax.Array | None = None, **normalizer_options: Any,
) -> EnergyBased:
    r"""An :class:`EnergyBased` from a :func:`numpyro_ebm.fit` result.

    Uses ``result.params`` and the final walkers ``result.state.particles`` with their
    weights ``result.state.log_weights``. :math:`\log Z_{\theta_K}` comes from one of:

    * ``log_z0`` (:math:`\log Z_{\theta_0}` of the model the walkers started from, closed
      form when that is e.g. a standard normal): the training run's Jarzynski estimate,
      :math:`\log Z_{\theta_0} + \texttt{result.state.log\_normalizer}`. It is one
      forward path and carries no error bar; it is biased low by the feedback of the
      walkers' noise into :math:`\theta` (see ``docs/gmm.md``; about
      :math:`K\,\mathrm{lr}/\mathrm{ESS}` times the parameter-gradient variance). Only
      for ``"jarzynski"`` results (``ValueError`` otherwise).
    * ``data`` and ``rng_key``: annealing at :math:`\theta_K` in both directions
      (:func:`~numpyro_ebm.normalizer.estimate_log_normalizer`): forward from a Gaussian
      base fitted to ``data``, reverse from the walkers (with their weights) as
      approximate model samples, for any method. The forward estimate is used, the
      ``[lower, upper]`` pair is kept in ``log_normalizer_bounds``, and
      :class:`~numpyro_ebm.normalizer.LogNormalizerBoundsWarning` fires when they do not
      confirm each other. ``normalizer_options`` go to ``estimate_log_normalizer``
      (default ``num_walkers``: the run's, at most 2000).

    With neither, the distribution is unnormalised (``log_normalizer=None``).
    """
    if not (hasattr(result, "params") and hasattr(result, "state")):
        raise TypeError("`result` must be a FitResult (from numpyro_ebm.fit)")
    method = getattr(result, "method", "jarzynski")
    log_normalizer = None
    if data is not None:
        if log_z0 is not None:
            raise ValueError("give `log_z0` (the training run's estimate) or `data` (annealing "
                             "at the final parameters), not both")
        if rng_key is None:
            raise ValueError("`rng_key` is needed to estimate log Z from `data`")
        options = {"num_walkers": min(int(result.state.log_weights.shape[0]), 2000),
                   **normalizer_options}
        log_normalizer = estimate_log_normalizer(
            potential_fn, result.params, rng_key, data=data, model_samples=result.state.particles,
            model_log_weights=result.state.log_weights, **options)
    elif rng_key is not None or normalizer_options:
        raise ValueError("`rng_key` and estimate_log_normalizer options need `data`")
    if log_z0 is not None:
        if method != "jarzynski":
            raise ValueError(
                f"`log_z0` given but `result` comes from method {method!r}, which does not "
                "estimate log Z; only 'jarzynski' results can be normalised by `log_z0` (pass "
                "`data` and `rng_key` to anneal instead)"
            )
        if _checks.is_concrete(log_z0) and not np.isfinite(float(np.asarray(log_z0))):
            raise ValueError(f"`log_z0` must be finite, got {log_z0}")
        log_normalizer = jnp.asarray(log_z0, result.state.log_normalizer.dtype) + (
            result.state.log_normalizer
        )
    return EnergyBased(
        potential_fn,
        result.params,
        log_normalizer=log_normalizer,
        particles=result.state.particles,
        log_weights=result.state.log_weights,
        support=support,
    )
