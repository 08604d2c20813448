r"""The log normaliser of a trained EBM, by annealing from a Gaussian base.

The path :math:`U_\lambda(x) = (1 - \lambda) U_{\text{base}}(x) + \lambda U_\theta(x)`,
:math:`\lambda: 0 \to 1`, starts at a Gaussian :math:`N(m, \mathrm{diag}(s^2))` whose
normaliser is known, :math:`\log Z_{\text{base}} = \sum_j \log(\sqrt{2\pi} s_j)`, and ends
at the EBM. Walkers drawn from the base are carried along it by the adaptive Jarzynski
kernel (:func:`numpyro_ebm.jarzynski_ula.build_adaptive_kernel`), which picks the
:math:`\lambda` increments so that the conditional ESS of each sub-step stays at
``target_ess``; since :math:`U_\lambda` is linear in :math:`\lambda`, the increment
prediction is first-order accurate. Jarzynski's equality then gives

.. math::

   \log Z_\theta = \log Z_{\text{base}} + \log \frac{Z_\theta}{Z_{\text{base}}}, \qquad
   \log \frac{Z_\theta}{Z_{\text{base}}} \approx \text{the walkers' log\_normalizer}.

Independent repeats give the Monte Carlo standard error; the final walkers, with their
weights, are samples of :math:`\rho_\theta`.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from numpyro_ebm import _checks
from numpyro_ebm.jarzynski_ula import (
    JarzynskiState,
    PotentialFn,
    build_adaptive_kernel,
    init,
)

__all__ = ["ImproperEnergyWarning", "LogNormalizerEstimate", "estimate_log_normalizer"]

_RAY_SCALES = (1e2, 1e4)  # the outward check looks at m + c (x - m) for these c


class ImproperEnergyWarning(RuntimeWarning):
    """The energy may not be normalisable (:math:`Z_\\theta = \\infty`): a log-normaliser
    estimate is then a finite number that means nothing."""


class LogNormalizerEstimate(NamedTuple):
    """Result of :func:`estimate_log_normalizer`.

    log_normalizer
        Mean of the repeats' estimates of :math:`\\log Z_\\theta`.
    stderr
        Their standard error, ``std(ddof=1) / sqrt(num_repeats)`` (``nan`` for one repeat).
    estimates
        Each repeat's estimate, shape ``(num_repeats,)``.
    state
        The final walkers of every repeat, stacked: leading axis ``num_repeats``; the
        ``params`` field is the path's end point ``{"lam": 1, "theta": params}``.
    num_substeps
        Annealing sub-steps each repeat took, shape ``(num_repeats,)``.
    num_potential_evaluations
        Evaluations (value and gradient) of the path potential per walker, per repeat
        (the initial one included).
    log_normalizer_base
        :math:`\\log Z_{\\text{base}}`.
    """

    log_normalizer: jax.Array
    stderr: jax.Array
    estimates: jax.Array
    state: JarzynskiState
    num_substeps: jax.Array
    num_potential_evaluations: jax.Array
    log_normalizer_base: jax.Array


def _gaussian_base(base_mean, base_scale, data, event_shape, dtype):
    if data is not None:
        _checks.leading_size("data", data)
        _checks.check_finite_tree("data", data)
        data = jnp.asarray(data, dtype)
        mean = jnp.mean(data, axis=0) if base_mean is None else base_mean
        scale = jnp.std(data, axis=0) if base_scale is None else base_scale
    else:
        mean = 0.0 if base_mean is None else base_mean
        scale = 1.0 if base_scale is None else base_scale
    mean = jnp.broadcast_to(jnp.asarray(mean, dtype), event_shape)
    scale = jnp.broadcast_to(jnp.asarray(scale, dtype), event_shape)
    if _checks.is_concrete(scale) and not bool(jnp.all(scale > 0)):
        raise ValueError("`base_scale` must be > 0 in every coordinate")
    return mean, scale


def _outward_log_mass_ratio(potential_fn, params, particles, mean, c: float) -> jax.Array:
    """:math:`d \\log c - (U(m + c (x - m)) - U(x))` per walker (see
    :func:`_warn_if_improper`); NaN where an energy is NaN."""
    d = math.prod(mean.shape)

    def one(x):
        far = mean + c * (x - mean)
        return d * math.log(c) - (potential_fn(params, far) - potential_fn(params, x))

    batch = particles.shape[: particles.ndim - mean.ndim]  # (repeats, walkers)
    flat = particles.reshape((-1, *mean.shape))
    return jax.jit(jax.vmap(one))(flat).reshape(batch)


def _warn_if_improper(potential_fn, params, states: JarzynskiState, estimates, mean) -> None:
    r"""Warn (:class:`ImproperEnergyWarning`) when :math:`e^{-U_\theta}` looks non-integrable.

    Two signs. (1) An estimate is not finite. (2) The mass does not decay outward along
    the walkers: for a walker :math:`x`, the base mean :math:`m` and :math:`y = m + c(x -
    m)`, a small neighbourhood :math:`A` of :math:`x` and its image :math:`m + c(A - m)`
    (volume :math:`c^d` times larger) have masses in the ratio

    .. math:: r_c(x) = c^d e^{-U(y)} / e^{-U(x)}, \qquad
              \log r_c(x) = d \log c - (U(y) - U(x)).

    If :math:`e^{-U}` is integrable, the masses of the images for
    :math:`c = c_0, c_0^2, \dots` are summable, so :math:`r_c < 1` for large :math:`c`
    along the directions that carry mass. A flat energy (:math:`U = 0`: :math:`\log r_c = d
    \log c`), one bounded above at infinity, or one unbounded below (:math:`U = -|x|^2`)
    has :math:`\log r_c \ge 0` everywhere. The warning fires when
    :math:`\log r_c(x^i) \ge 0` at both :math:`c = 10^2` and :math:`c = 10^4` for walkers
    carrying at least half of the (final, normalised) weight, averaged over the repeats.
    It is a check on finitely many rays, not a proof: it tests what the walkers see.
    """
    if not (_checks.is_concrete(estimates) and _checks.is_concrete(states.particles)):
        return
    if not bool(jnp.all(jnp.isfinite(estimates))):
        warnings.warn(
            f"estimate_log_normalizer: non-finite log Z estimate(s) {np.asarray(estimates)}: "
            "the walkers ran away; the energy may not be normalisable (Z = infinity)",
            ImproperEnergyWarning,
            stacklevel=3,
        )
        return
    flat = [_outward_log_mass_ratio(potential_fn, params, states.particles, mean, c)
            for c in _RAY_SCALES]
    not_decaying = jnp.all(jnp.stack([f >= 0 for f in flat]), axis=0)
    weights = jax.nn.softmax(states.log_weights, axis=-1)
    fraction = float(jnp.mean(jnp.sum(jnp.where(not_decaying, weights, 0.0), axis=-1)))
    if fraction >= 0.5:
        warnings.warn(
            f"estimate_log_normalizer: the energy may not be normalisable (Z = infinity): "
            f"along the walkers carrying {fraction:.0%} of the weight, exp(-U) does not "
            "decay outward faster than the volume grows (U(m + c (x - m)) - U(x) <= "
            f"d log c at c = {_RAY_SCALES[0]:g} and {_RAY_SCALES[1]:g}); the estimate "
            f"{float(jnp.mean(estimates)):.4g} is then meaningless. A proper energy grows at "
            "infinity (e.g. add a weak quadratic term 0.5 |x|^2 / s^2)",
            ImproperEnergyWarning,
            stacklevel=3,
        )


def estimate_log_normalizer(
    potential_fn: PotentialFn,
    params: Any,
    rng_key: jax.Array,
    *,
    num_walkers: int,
    event_shape: tuple[int, ...] | None = None,
    base: str = "gaussian",
    base_mean: Any = None,
    base_scale: Any = None,
    data: Any = None,
    step_size: float | None = None,
    num_mcmc_steps: int = 10,
    target_ess: float = 0.5,
    max_substeps: int = 200,
    ess_threshold: float = 0.5,
    num_repeats: int = 4,
    dtype: Any = None,
) -> LogNormalizerEstimate:
    """Estimate :math:`\\log Z_\\theta` of ``potential_fn(params, .)`` by annealing from a
    Gaussian base with the adaptive Jarzynski kernel.

    Parameters
    ----------
    potential_fn, params
        The EBM: ``potential_fn(params, x) -> scalar`` for one sample ``x`` (an array).
    rng_key
        PRNG key; repeat ``r`` uses ``jax.random.fold_in(rng_key, r)``.
    num_walkers
        Walkers per repeat (>= 2).
    event_shape
        Shape of one sample; taken from ``data`` when given, else required.
    base
        Only ``"gaussian"``: :math:`N(m, \\mathrm{diag}(s^2))`.
    base_mean, base_scale
        :math:`m` and :math:`s` (scalars or arrays of ``event_shape``). Default: the mean
        and standard deviation of ``data`` per coordinate when given, else 0 and 1. The
        base should cover the EBM's mass: a base narrower than the model makes the
        annealing harder (more sub-steps), not biased.
    step_size
        ULA step size; default ``0.02 * min(s)**2`` (a fraction of the base variance: the
        model's modes are usually narrower than the base).
    num_mcmc_steps
        ULA moves per annealing sub-step (they let the walkers relax between sub-steps).
    target_ess, max_substeps, ess_threshold
        As in :func:`~numpyro_ebm.jarzynski_ula.build_adaptive_kernel`.
    num_repeats
        Independent repeats (``lax.map``), for the standard error.
    dtype
        Floating dtype of the walkers (default: that of ``data``, else JAX's default).

    Warns
    -----
    ImproperEnergyWarning
        When the energy looks non-normalisable (:math:`\\int e^{-U_\\theta} = \\infty`,
        e.g. :math:`U = 0` or :math:`U = -|x|^2`), where any finite estimate is
        meaningless: an estimate is not finite, or :math:`e^{-U_\\theta}` does not decay
        outward along the final walkers (see ``_warn_if_improper``). The check only
        evaluates :math:`U_\\theta` at the walkers and at points further out; the
        returned numbers are those without it.
    """
    if base != "gaussian":
        raise ValueError(f"`base` must be 'gaussian', got {base!r}")
    _checks.check_int_at_least("num_walkers", num_walkers, 2)
    _checks.check_key("rng_key", rng_key)
    _checks.check_int_at_least("num_repeats", num_repeats, 1)
    _checks.check_int_at_least("num_mcmc_steps", num_mcmc_steps, 1)
    _checks.check_fraction("target_ess", target_ess, closed_right=False)
    _checks.check_int_at_least("max_substeps", max_substeps, 1)
    if data is not None:
        shape = tuple(np.shape(data)[1:])
        if event_shape is not None and tuple(event_shape) != shape:
            raise ValueError(f"`event_shape` {tuple(event_shape)} disagrees with `data` {shape}")
        event_shape = shape
        dtype = dtype or jnp.asarray(data).dtype
    if event_shape is None:
        raise ValueError("`event_shape` is required when no `data` is given")
    event_shape = tuple(event_shape)
    dtype = jnp.dtype(dtype or jnp.zeros(()).dtype)
    params = jax.tree.map(jnp.asarray, params)  # Python numbers too (the path needs .dtype)
    mean, scale = _gaussian_base(base_mean, base_scale, data, event_shape, dtype)
    if step_size is None:
        step_size = 0.02 * float(jnp.min(scale)) ** 2
    _checks.check_positive("step_size", step_size)
    _checks.check_scalar_potential(potential_fn, params, jnp.zeros(event_shape, dtype))

    log_z_base = jnp.sum(jnp.log(scale)) + 0.5 * math.prod(event_shape) * math.log(2 * math.pi)

    def path_potential(p, x):
        u_base = 0.5 * jnp.sum(((x - mean) / scale) ** 2)
        return (1.0 - p["lam"]) * u_base + p["lam"] * potential_fn(p["theta"], x)

    kernel = build_adaptive_kernel(
        path_potential,
        step_size,
        target_ess=target_ess,
        max_substeps=max_substeps,
        ess_threshold=ess_threshold,
        num_mcmc_steps=num_mcmc_steps,
    )
    start = {"lam": jnp.zeros((), dtype), "theta": params}
    end = {"lam": jnp.ones((), dtype), "theta": params}

    def one_repeat(r):
        key = jax.random.fold_in(rng_key, r)
        init_key, run_key = jax.random.split(key)
        x0 = mean + scale * jax.random.normal(init_key, (num_walkers, *event_shape), dtype)
        state = init(x0, start, path_potential)  # one evaluation
        state, info = kernel(run_key, state, end)
        return state, info.num_substeps, info.num_evaluations

    states, substeps, evaluations = jax.jit(lambda rs: jax.lax.map(one_repeat, rs))(
        jnp.arange(num_repeats)
    )
    estimates = log_z_base + states.log_normalizer
    _warn_if_improper(potential_fn, params, states, estimates, mean)
    mean_est = jnp.mean(estimates)
    stderr = (
        jnp.std(estimates, ddof=1) / math.sqrt(num_repeats) if num_repeats > 1 else jnp.nan
    )
    return LogNormalizerEstimate(
        log_normalizer=mean_est,
        stderr=stderr,
        estimates=estimates,
        state=states,
        num_substeps=substeps,
        num_potential_evaluations=evaluations + 1,
        log_normalizer_base=log_z_base,
    )
