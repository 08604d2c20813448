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

**Two bounds (bidirectional Monte Carlo).** The forward run's :math:`\hat Z` is unbiased,
so by Jensen :math:`E[\log \hat Z] \le \log Z_\theta`: a stochastic *lower* bound. It
is too low, by more than its standard error shows, when the walkers never reach some of
the model's mass (a mode the base misses: the repeats agree with each other and all miss
it). The same kernel run backwards, :math:`\lambda: 1 \to 0`, from samples of
:math:`\rho_\theta` estimates :math:`Z_{\text{base}}/Z_\theta` without bias, so
:math:`\log Z_{\text{base}} - \log(\text{that})` is a stochastic *upper* bound (Grosse,
Ghahramani and Adams 2015, bidirectional Monte Carlo). Exact model samples are not
available for an EBM; the reverse run starts from the best approximations there are: the
data (when the model fits them) or a trained run's weighted walkers. When the two do not
confirm each other to within ``bounds_tolerance`` (they disagree beyond their Monte Carlo
error, so at least one is wrong, or that error is too large to tell),
:class:`LogNormalizerBoundsWarning` says so and what to change.
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

__all__ = [
    "ImproperEnergyWarning",
    "LogNormalizerBoundsWarning",
    "LogNormalizerEstimate",
    "estimate_log_normalizer",
]

_RAY_SCALES = (1e2, 1e4)  # the outward check looks at m + c (x - m) for these c


class ImproperEnergyWarning(RuntimeWarning):
    """The energy may not be normalisable (:math:`Z_\\theta = \\infty`): a log-normaliser
    estimate is then a finite number that means nothing."""


class LogNormalizerBoundsWarning(RuntimeWarning):
    """The forward (lower) and reverse (upper) estimates of :math:`\\log Z_\\theta` do not
    confirm each other: they disagree by more than their Monte Carlo error (at least one is
    wrong), or that error is too large to tell."""


class LogNormalizerEstimate(NamedTuple):
    """Result of :func:`estimate_log_normalizer`.

    log_normalizer
        Mean of the forward repeats' estimates of :math:`\\log Z_\\theta` (a stochastic
        lower bound; also :attr:`lower`).
    stderr
        Their standard error, ``std(ddof=1) / sqrt(num_repeats)`` (``nan`` for one repeat).
    estimates
        Each forward repeat's estimate, shape ``(num_repeats,)``.
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
    upper, upper_stderr, upper_estimates
        The reverse runs' estimate (a stochastic upper bound when they start from exact
        model samples), its standard error and each repeat's value; ``nan`` when there was
        no reverse run (no ``data`` and no ``model_samples``).
    reverse_state
        The reverse runs' final walkers (samples of the base), or ``None``.
    """

    log_normalizer: jax.Array
    stderr: jax.Array
    estimates: jax.Array
    state: JarzynskiState
    num_substeps: jax.Array
    num_potential_evaluations: jax.Array
    log_normalizer_base: jax.Array
    upper: jax.Array = jnp.nan
    upper_stderr: jax.Array = jnp.nan
    upper_estimates: jax.Array | None = None
    reverse_state: JarzynskiState | None = None

    @property
    def lower(self) -> jax.Array:
        """The forward estimate (``log_normalizer``), a stochastic lower bound."""
        return self.log_normalizer

    @property
    def gap(self) -> jax.Array:
        """``upper - lower``; its standard error is ``hypot(stderr, upper_stderr)``."""
        return self.upper - self.log_normalizer


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


def _reverse_start(model_samples, model_log_weights, data, event_shape, dtype):
    """``(samples, log_weights)`` the reverse runs start from: ``model_samples`` (with
    ``model_log_weights``), else ``data`` (equal weights), else ``None``."""
    if model_samples is None:
        if model_log_weights is not None:
            raise ValueError("`model_log_weights` given without `model_samples`")
        if data is None:
            return None
        model_samples = data
    n = _checks.leading_size("model_samples", model_samples)
    _checks.check_finite_tree("model_samples", model_samples)
    samples = jnp.asarray(model_samples, dtype)
    if tuple(samples.shape[1:]) != event_shape:
        raise ValueError(f"`model_samples` of shape {samples.shape} do not hold samples of "
                         f"event_shape {event_shape}")
    if model_log_weights is None:
        return samples, jnp.zeros((n,), dtype)
    log_w = jnp.asarray(model_log_weights, dtype)
    if log_w.shape != (n,):
        raise ValueError(f"`model_log_weights` must have shape ({n},), got {log_w.shape}")
    if _checks.is_concrete(log_w):
        invalid = bool(jnp.any(jnp.isnan(log_w) | (log_w == jnp.inf)))
        if invalid or not bool(jnp.any(jnp.isfinite(log_w))):
            raise ValueError("`model_log_weights` must be finite or -inf, with one finite")
    return samples, log_w


def _repeat_summary(estimates, num_repeats):
    stderr = jnp.std(estimates, ddof=1) / math.sqrt(num_repeats) if num_repeats > 1 else jnp.nan
    return jnp.mean(estimates), stderr


def _warn_if_bounds_disagree(result: LogNormalizerEstimate, tolerance: float, from_data: bool,
                             base_from_data: bool) -> None:
    r"""Warn (:class:`LogNormalizerBoundsWarning`) unless the two estimates confirm each
    other: :math:`|\text{gap}| + 2\sigma \le` ``tolerance``, with :math:`\text{gap} =
    \text{upper} - \text{lower}` and :math:`\sigma = \sqrt{s_l^2 + s_u^2}` (:math:`s` the
    repeats' standard errors; 0 with one repeat). If both are bounds, :math:`\log Z` lies
    in :math:`[\text{lower}, \text{upper}]` up to their noise, so that sum bounds the error
    of either. The message says whether they disagree (:math:`|\text{gap}| > 3\sigma`) or
    are too noisy to tell."""
    if not (_checks.is_concrete(result.upper) and _checks.is_concrete(result.log_normalizer)):
        return
    lower, upper = float(result.log_normalizer), float(result.upper)
    if not (math.isfinite(lower) and math.isfinite(upper)):
        return
    sigma = math.hypot(float(result.stderr), float(result.upper_stderr))
    sigma = sigma if math.isfinite(sigma) else 0.0
    gap = upper - lower
    if abs(gap) + 2 * sigma <= tolerance:
        return
    start = "the data" if from_data else "`model_samples`"
    more = ["a higher `target_ess` (more annealing sub-steps)",
            "more moves per sub-step (`num_mcmc_steps`)", "more `num_walkers`"]
    if abs(gap) <= 3 * sigma:
        what = (f"their Monte Carlo error ({sigma:.2g}) is too large for them to confirm each "
                "other")
        advice = more + ["more `num_repeats`"]
        if not base_from_data:
            advice.insert(0, "the data as the base (`data=`, no `base_mean`/`base_scale`)")
    elif gap > 0:
        what = ("they disagree beyond their Monte Carlo error: the forward run (from the base) "
                f"missed mass of the model that the reverse run (from {start}) starts in, or "
                "the reverse start is no sample of the model")
        advice = ["a wider base (`base_scale`)"] + more
        if not base_from_data:
            advice.insert(0, "the data as the base (`data=`, no `base_mean`/`base_scale`)")
    else:
        what = ("the upper estimate lies below the lower one beyond their Monte Carlo error: "
                f"{start} are no sample of the model (a model far from its data?)")
        advice = ["trained walkers as `model_samples`"] + more
    warnings.warn(
        f"estimate_log_normalizer: forward (lower) {lower:.4g} ± {float(result.stderr):.2g}, "
        f"reverse (upper) {upper:.4g} ± {float(result.upper_stderr):.2g}, gap {gap:+.3g} "
        f"nats (|gap| + 2 sigma > bounds_tolerance = {tolerance:g}): {what}. Try "
        f"{', '.join(advice)}",
        LogNormalizerBoundsWarning,
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
    model_samples: Any = None,
    model_log_weights: Any = None,
    reverse: bool = True,
    bounds_tolerance: float = 0.2,
    step_size: float | None = None,
    num_mcmc_steps: int = 10,
    target_ess: float = 0.5,
    max_substeps: int = 200,
    ess_threshold: float = 0.5,
    num_repeats: int = 4,
    dtype: Any = None,
) -> LogNormalizerEstimate:
    """Estimate :math:`\\log Z_\\theta` of ``potential_fn(params, .)`` by annealing between a
    Gaussian base and the model with the adaptive Jarzynski kernel, forward (a stochastic
    lower bound) and, when model samples are at hand, backward (an upper bound).

    What the estimate assumes and how it fails: the forward walkers start in the base and
    only find the model's mass the base (and the moves) lead them to; a mode the base misses
    is missed by every repeat alike, so the estimate is too low and its standard error does
    not show it. The reverse walkers start in the model's mass (the data or trained walkers)
    and are too high when that start misses some of the model's mass, or is no sample of the
    model at all. A mode missed by one direction is usually found by the other: the two then
    disagree and :class:`LogNormalizerBoundsWarning` fires. Both are right in the limit of
    many walkers only for a normalisable energy (:class:`ImproperEnergyWarning`).

    Parameters
    ----------
    potential_fn, params
        The EBM: ``potential_fn(params, x) -> scalar`` for one sample ``x`` (an array).
    rng_key
        PRNG key; forward repeat ``r`` uses ``jax.random.fold_in(rng_key, r)``.
    num_walkers
        Walkers per repeat and direction (>= 2).
    event_shape
        Shape of one sample; taken from ``data`` when given, else required.
    base
        Only ``"gaussian"``: :math:`N(m, \\mathrm{diag}(s^2))`.
    base_mean, base_scale
        :math:`m` and :math:`s` (scalars or arrays of ``event_shape``). Default: the mean
        and standard deviation of ``data`` per coordinate when given (the default for an
        EBM, which always has data: the base then covers the data's spread, and so the
        model's mass if the model fits the data), else 0 and 1. A base narrower than the
        model's mass, or one missing a far mode, biases the forward estimate low.
    data
        Training data (sample axis first): they set the default base and, without
        ``model_samples``, are the reverse runs' start.
    model_samples, model_log_weights
        Approximate samples of :math:`\\rho_\\theta` (e.g. a trained run's walkers
        ``result.state.particles`` with ``result.state.log_weights``) for the reverse
        runs; each repeat draws ``num_walkers`` of them by weight.
    reverse
        Run the reverse direction when a start is available (``False``: forward only, the
        result's ``upper`` is ``nan``).
    bounds_tolerance
        The error (nats) accepted on :math:`\\log Z`: the warning fires when
        ``|upper - lower| + 2 * hypot(stderr, upper_stderr)`` exceeds it.
    step_size
        ULA step size; default ``0.02 * min(s)**2`` (a fraction of the base variance: the
        model's modes are usually narrower than the base).
    num_mcmc_steps
        ULA moves per annealing sub-step (they let the walkers relax between sub-steps).
    target_ess, max_substeps, ess_threshold
        As in :func:`~numpyro_ebm.jarzynski_ula.build_adaptive_kernel`.
    num_repeats
        Independent repeats per direction (``lax.map``), for the standard errors.
    dtype
        Floating dtype of the walkers (default: that of ``data``, else JAX's default).

    Warns
    -----
    LogNormalizerBoundsWarning
        When the forward and reverse estimates do not confirm each other to within
        ``bounds_tolerance`` (they disagree beyond their Monte Carlo error, or that error is
        too large), with what to change.
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
    if not (isinstance(bounds_tolerance, int | float) and bounds_tolerance >= 0):
        raise ValueError(f"`bounds_tolerance` must be a number >= 0, got {bounds_tolerance!r}")
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
    start = _reverse_start(model_samples, model_log_weights, data, event_shape, dtype) if reverse else None
    if step_size is None:
        step_size = 0.02 * float(jnp.min(scale)) ** 2
    _checks.check_positive("step_size", step_size)
    _checks.check_scalar_potential(potential_fn, params, jnp.zeros(event_shape, dtype))

    log_z_base = jnp.sum(jnp.log(scale)) + 0.5 * math.prod(event_shape) * math.log(2 * math.pi)
    anneal = _annealer(potential_fn, params, mean, scale, step_size, num_mcmc_steps, target_ess,
                       max_substeps, ess_threshold, num_walkers, event_shape, dtype)
    states, substeps, evaluations = anneal(rng_key, num_repeats, None)
    estimates = log_z_base + states.log_normalizer
    _warn_if_improper(potential_fn, params, states, estimates, mean)
    mean_est, stderr = _repeat_summary(estimates, num_repeats)
    result = LogNormalizerEstimate(mean_est, stderr, estimates, states, substeps, evaluations + 1,
                                   log_z_base)
    if start is None:
        return result
    rev_states, _, _ = anneal(jax.random.fold_in(rng_key, 2**31 - 1), num_repeats, start)
    upper_estimates = log_z_base - rev_states.log_normalizer
    upper, upper_stderr = _repeat_summary(upper_estimates, num_repeats)
    result = result._replace(upper=upper, upper_stderr=upper_stderr,
                             upper_estimates=upper_estimates, reverse_state=rev_states)
    _warn_if_bounds_disagree(result, bounds_tolerance, model_samples is None,
                             data is not None and base_mean is None and base_scale is None)
    return result


def _annealer(potential_fn, params, mean, scale, step_size, num_mcmc_steps, target_ess,
              max_substeps, ess_threshold, num_walkers, event_shape, dtype):
    """``anneal(rng_key, num_repeats, start)``: ``num_repeats`` runs (``lax.map``) of the
    adaptive kernel along :math:`(1-\\lambda) U_{\\text{base}} + \\lambda U_\\theta`, forward
    (:math:`0 \\to 1`, walkers drawn from the base) when ``start`` is ``None``, else reverse
    (:math:`1 \\to 0`, walkers drawn by weight from ``start = (samples, log_weights)``).
    Returns the stacked final states, sub-steps and evaluations per repeat."""

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
    def run_one(x0, run_key, lam_from):
        state = init(x0, {"lam": lam_from, "theta": params}, path_potential)  # one evaluation
        state, info = kernel(run_key, state, {"lam": 1.0 - lam_from, "theta": params})
        return state, info.num_substeps, info.num_evaluations

    # one compiled function for both directions: they differ in values only
    run_all = jax.jit(lambda x0s, keys, lam_from: jax.lax.map(
        lambda a: run_one(a[0], a[1], lam_from), (x0s, keys)))

    def anneal(rng_key, num_repeats, start):
        keys = jax.vmap(lambda r: jax.random.split(jax.random.fold_in(rng_key, r)))(
            jnp.arange(num_repeats))
        shape = (num_walkers, *event_shape)
        if start is None:
            x0s = jax.vmap(lambda k: mean + scale * jax.random.normal(k, shape, dtype))(keys[:, 0])
        else:
            samples, log_w = start
            x0s = jax.vmap(lambda k: samples[jax.random.categorical(k, log_w, shape=(num_walkers,))])(
                keys[:, 0])
        return run_all(x0s, keys[:, 1], jnp.asarray(0.0 if start is None else 1.0, dtype))

    return anneal
