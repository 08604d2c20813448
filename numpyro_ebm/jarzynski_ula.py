r"""Jarzynski-weighted unadjusted Langevin walkers, as a BlackJAX SMC kernel.

This is Algorithm 1 of Carbone, Hua, Coste and Vanden-Eijnden, *Efficient Training of
Energy-Based Models Using Jarzynski Equality* (NeurIPS 2023), written as a BlackJAX
kernel: ``init``, ``build_kernel`` and ``as_top_level_api`` over a ``JarzynskiState``.

The model is :math:`\rho_\theta(x) = e^{-U_\theta(x)} / Z_\theta`. Walkers :math:`X^i`
carry log weights :math:`A^i`. One kernel call takes the walkers, weighted for
:math:`\theta_k`, to walkers weighted for :math:`\theta_{k+1}`:

1. ULA move under :math:`\theta_k` (the gradient is cached in the state, so no new
   evaluation is needed):

   .. math:: X' = X - h \nabla U_k(X) + \sqrt{2h}\,\xi, \qquad \xi \sim N(0, I).

2. One evaluation of :math:`U_{k+1}` and :math:`\nabla U_{k+1}` at :math:`X'` (cached for
   the next move) and the Jarzynski weight update

   .. math::

      A' = A + \alpha_k(X, X') - \alpha_{k+1}(X', X), \qquad
      \alpha_k(x, y) = U_k(x) + \tfrac12 (y - x)\cdot\nabla U_k(x)
                       + \tfrac{h}{4} |\nabla U_k(x)|^2 .

   :math:`\alpha_k(X, X') - \alpha_{k+1}(X', X)` is exactly
   :math:`\log[e^{-U_{k+1}(X')} q_{k+1}(X' \to X)] - \log[e^{-U_k(X)} q_k(X \to X')]`
   with :math:`q_k` the ULA transition density under :math:`\theta_k`; at fixed
   :math:`\theta` it is the log Metropolis ratio of MALA, which is why the weights remove
   ULA's discretisation bias.
3. With :math:`w = \mathrm{softmax}(A)`, :math:`\sum_i w_i f(X^i)` estimates
   :math:`E_{\rho_{\theta_{k+1}}}[f]`, and the Jarzynski equality gives
   :math:`\log \tfrac1N \sum_i e^{A^i} \approx \log Z_{\theta_{k+1}} / Z_{\theta_0}`.
4. When :math:`\mathrm{ESS}/N` drops below ``ess_threshold`` the walkers are resampled
   (BlackJAX's resampling functions) and the weights reset to equal; the log-normaliser
   estimate is carried across.

With ``num_steps > 1`` the further moves use :math:`\theta_{k+1}` on both sides (steps 1-2
at fixed parameters), then step 4 runs once.

Storage convention: ``log_weights`` are kept normalised (``logsumexp(log_weights) == 0``,
so ``exp(log_weights)`` are the weights :math:`w_i`), and the normalisation constant that
is removed at each update is accumulated in ``log_normalizer``. Together they hold the
same information as the raw :math:`A^i` (:math:`A^i = \log w_i + \log N +`
``log_normalizer``) without letting the raw values drift over a long run.

Potentials: ``potential_fn(params, x)`` returns the energy of ONE sample ``x`` (an array
or a pytree); it is vmapped over the leading (walker) axis of ``particles``.

A walker whose new position, energy or gradient is not finite gets weight zero and keeps
its last finite values, so it cannot poison the estimates; resampling replaces it.
:func:`build_adaptive_kernel` splits a large parameter move into sub-steps that keep the
conditional ESS at a target (the adaptive schedule).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from blackjax.base import SamplingAlgorithm
from blackjax.smc import resampling
from blackjax.smc.ess import log_ess
from blackjax.smc.solver import dichotomy
from jax.scipy.special import logsumexp

from numpyro_ebm import _checks

__all__ = [
    "JarzynskiState",
    "JarzynskiInfo",
    "AdaptiveJarzynskiInfo",
    "init",
    "build_kernel",
    "build_adaptive_kernel",
    "as_top_level_api",
    "potential_and_grad",
    "log_weight_increment",
    "ula_proposal",
]

ArrayTree = Any
PotentialFn = Callable[[ArrayTree, ArrayTree], jax.Array]


class JarzynskiState(NamedTuple):
    """State of the Jarzynski-weighted walkers.

    particles
        Walker positions, a pytree whose leaves have the walker axis first.
    log_weights
        Normalised log weights, shape ``(num_walkers,)``: ``logsumexp == 0``.
    params
        The parameters :math:`\\theta` the walkers are weighted for.
    potential
        :math:`U_\\theta` at the particles, shape ``(num_walkers,)`` (cached).
    grad
        :math:`\\nabla_x U_\\theta` at the particles, shaped like ``particles`` (cached).
    log_normalizer
        Running Jarzynski estimate of :math:`\\log Z_\\theta - \\log Z_{\\theta_0}`.
    """

    particles: ArrayTree
    log_weights: jax.Array
    params: ArrayTree
    potential: jax.Array
    grad: ArrayTree
    log_normalizer: jax.Array


class JarzynskiInfo(NamedTuple):
    """What one kernel call did.

    ess
        Effective sample size (in walkers) after the weight update, before resampling.
    resampled
        Whether the walkers were resampled.
    ancestors
        Index of each new walker's parent (``arange(N)`` when not resampled).
    log_normalizer_increment
        Change of the log-normaliser estimate, :math:`\\log \\sum_i w_i e^{\\Delta A^i}`
        summed over the call's moves.
    log_weight_increments
        :math:`\\Delta A^i`, summed over the call's moves, per walker (before resampling);
        :math:`-\\infty` for a walker whose evaluation was not finite.
    num_nonfinite
        Walkers whose new position, energy or gradient was not finite in some move of the
        call: they got weight zero and kept their last finite values.
    """

    ess: jax.Array
    resampled: jax.Array
    ancestors: jax.Array
    log_normalizer_increment: jax.Array
    log_weight_increments: jax.Array
    num_nonfinite: jax.Array


# ---------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------


def potential_and_grad(
    potential_fn: PotentialFn, params: ArrayTree, particles: ArrayTree
) -> tuple[jax.Array, ArrayTree]:
    """:math:`U_\\theta(X^i)` and :math:`\\nabla_x U_\\theta(X^i)` for every walker: ONE
    vmapped forward/backward evaluation of ``potential_fn``."""
    return jax.vmap(jax.value_and_grad(potential_fn, argnums=1), in_axes=(None, 0))(
        params, particles
    )


def _per_walker_dot(a: ArrayTree, b: ArrayTree) -> jax.Array:
    """:math:`a^i \\cdot b^i` for every walker ``i`` (sum over all non-walker axes)."""
    parts = [
        jnp.sum((la * lb).reshape(la.shape[0], -1), axis=1)
        for la, lb in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    ]
    return sum(parts[1:], parts[0])


def _alpha(
    potential: jax.Array, grad: ArrayTree, x: ArrayTree, y: ArrayTree, step_size: jax.Array
) -> jax.Array:
    """:math:`\\alpha(x, y) = U(x) + \\tfrac12 (y - x)\\cdot\\nabla U(x) + \\tfrac h4 |\\nabla U(x)|^2`."""
    diff = jax.tree.map(jnp.subtract, y, x)
    return potential + 0.5 * _per_walker_dot(diff, grad) + 0.25 * step_size * _per_walker_dot(
        grad, grad
    )


def log_weight_increment(
    potential: jax.Array,
    grad: ArrayTree,
    particles: ArrayTree,
    new_potential: jax.Array,
    new_grad: ArrayTree,
    new_particles: ArrayTree,
    step_size: jax.Array,
) -> jax.Array:
    """Jarzynski increment :math:`\\Delta A = \\alpha_k(X, X') - \\alpha_{k+1}(X', X)`.

    ``potential``/``grad`` are :math:`U_k, \\nabla U_k` at ``particles`` :math:`X`;
    ``new_potential``/``new_grad`` are :math:`U_{k+1}, \\nabla U_{k+1}` at
    ``new_particles`` :math:`X'`. Shape ``(num_walkers,)``.
    """
    forward = _alpha(potential, grad, particles, new_particles, step_size)
    backward = _alpha(new_potential, new_grad, new_particles, particles, step_size)
    return forward - backward


def ula_proposal(
    rng_key: jax.Array, particles: ArrayTree, grad: ArrayTree, step_size: jax.Array
) -> ArrayTree:
    """One unadjusted Langevin move :math:`X' = X - h\\nabla U(X) + \\sqrt{2h}\\,\\xi`."""
    leaves, treedef = jax.tree.flatten(particles)
    keys = jax.random.split(rng_key, len(leaves))
    noise = [jax.random.normal(k, leaf.shape, leaf.dtype) for k, leaf in zip(keys, leaves, strict=True)]
    noise = jax.tree.unflatten(treedef, noise)
    return jax.tree.map(
        lambda x, g, xi: x - step_size * g + jnp.sqrt(2.0 * step_size) * xi,
        particles,
        grad,
        noise,
    )


def _num_walkers(state: JarzynskiState) -> int:
    return state.log_weights.shape[0]


def _uniform_log_weights(n: int, dtype: Any) -> jax.Array:
    return jnp.full((n,), -jnp.log(jnp.asarray(n, dtype)), dtype)


# ---------------------------------------------------------------------------------------
# BlackJAX interface
# ---------------------------------------------------------------------------------------


def init(particles: ArrayTree, params: ArrayTree, potential_fn: PotentialFn) -> JarzynskiState:
    """Walkers with equal weights for ``params`` (they should be draws from
    :math:`\\rho_\\theta`); evaluates :math:`U_\\theta` and :math:`\\nabla_x U_\\theta` once per
    walker and sets the log-normaliser estimate to 0."""
    n = _checks.leading_size("particles", particles)
    if n < 2:
        raise ValueError(f"`particles` must hold at least 2 walkers, got {n}")
    _checks.check_finite_tree("particles", particles)
    _checks.check_scalar_potential(
        potential_fn, params, jax.tree.map(lambda leaf: leaf[0], particles)
    )
    potential, grad = potential_and_grad(potential_fn, params, particles)
    dtype = potential.dtype
    return JarzynskiState(
        particles=particles,
        log_weights=_uniform_log_weights(n, dtype),
        params=params,
        potential=potential,
        grad=grad,
        log_normalizer=jnp.zeros((), dtype),
    )


def _per_walker_finite(tree: ArrayTree) -> jax.Array:
    """True for walkers whose every entry in ``tree`` is finite, shape ``(num_walkers,)``."""
    parts = [
        jnp.all(jnp.isfinite(leaf.reshape(leaf.shape[0], -1)), axis=1)
        for leaf in jax.tree.leaves(tree)
    ]
    out = parts[0]
    for part in parts[1:]:
        out = out & part
    return out


def _reweight(
    state: JarzynskiState,
    new_particles: ArrayTree,
    new_potential: jax.Array,
    new_grad: ArrayTree,
    params: ArrayTree,
    step_size: jax.Array,
    reweight: bool = True,
) -> tuple[JarzynskiState, jax.Array, jax.Array, jax.Array]:
    """The state after the move ``state.particles -> new_particles`` (with
    :math:`U_{k+1}, \\nabla U_{k+1}` at the new walkers given): Jarzynski weight update,
    normalisation, and the log-normaliser increment :math:`\\log\\sum_i w_i e^{\\Delta A^i}`.

    Walkers whose new position, energy, gradient or increment is not finite get weight
    zero (:math:`\\Delta A = -\\infty`) and keep their previous, finite position and
    cached values, so nothing non-finite enters the state; resampling replaces them. If
    no walker keeps a positive weight, the weights are left as they were and the
    log-normaliser estimate becomes NaN (``fit`` stops there). Returns the state, the
    increments, the log-normaliser increment and the mask of non-finite walkers.
    """
    finite = _per_walker_finite(new_particles) & _per_walker_finite(new_grad)
    finite = finite & jnp.isfinite(new_potential)
    if reweight:
        delta = log_weight_increment(
            state.potential,
            state.grad,
            state.particles,
            new_potential,
            new_grad,
            new_particles,
            step_size,
        )
        finite = finite & jnp.isfinite(delta)
        delta = jnp.where(finite, delta, -jnp.inf)
        unnormalised = state.log_weights + delta
        increment = logsumexp(unnormalised)
        alive = jnp.isfinite(increment)
        log_weights = jnp.where(alive, unnormalised - increment, state.log_weights)
        increment = jnp.where(alive, increment, jnp.nan)
    else:
        delta = jnp.zeros_like(state.log_weights)
        increment = jnp.zeros_like(state.log_normalizer)
        log_weights = state.log_weights

    def keep_finite(new, old):
        mask = finite.reshape(finite.shape + (1,) * (new.ndim - 1))
        return jnp.where(mask, new, old)

    new_state = JarzynskiState(
        particles=jax.tree.map(keep_finite, new_particles, state.particles),
        log_weights=log_weights,
        params=params,
        potential=jnp.where(finite, new_potential, state.potential),
        grad=jax.tree.map(keep_finite, new_grad, state.grad),
        log_normalizer=state.log_normalizer + increment,
    )
    return new_state, delta, increment, ~finite


def _move(
    rng_key: jax.Array,
    state: JarzynskiState,
    params: ArrayTree,
    potential_fn: PotentialFn,
    step_size: jax.Array,
    reweight: bool,
) -> tuple[JarzynskiState, jax.Array, jax.Array, jax.Array]:
    """One ULA move under ``state.params`` followed by re-weighting to ``params``."""
    new_particles = ula_proposal(rng_key, state.particles, state.grad, step_size)
    new_potential, new_grad = potential_and_grad(potential_fn, params, new_particles)
    return _reweight(state, new_particles, new_potential, new_grad, params, step_size, reweight)


def _maybe_resample(
    rng_key: jax.Array,
    state: JarzynskiState,
    resampling_fn: Callable,
    ess_threshold: float,
) -> tuple[JarzynskiState, jax.Array, jax.Array, jax.Array]:
    n = _num_walkers(state)
    ess = jnp.exp(log_ess(state.log_weights))
    do_resample = ess < ess_threshold * n

    def resample(_):
        idx = resampling_fn(rng_key, jnp.exp(state.log_weights), n)
        take = lambda tree: jax.tree.map(lambda leaf: leaf[idx], tree)  # noqa: E731
        new = state._replace(
            particles=take(state.particles),
            potential=state.potential[idx],
            grad=take(state.grad),
            log_weights=_uniform_log_weights(n, state.log_weights.dtype),
        )
        return new, idx.astype(jnp.int32)

    def keep(_):
        return state, jnp.arange(n, dtype=jnp.int32)

    new_state, ancestors = jax.lax.cond(do_resample, resample, keep, None)
    return new_state, ess, do_resample, ancestors


def _build_kernel(
    potential_fn: PotentialFn,
    step_size: float,
    resampling_fn: Callable,
    ess_threshold: float,
    num_steps: int,
    reweight: bool,
) -> Callable:
    """The kernel; ``reweight=False`` gives plain (unweighted) ULA walkers, as PCD uses."""
    default_step_size = step_size

    def kernel(
        rng_key: jax.Array,
        state: JarzynskiState,
        params: ArrayTree | None = None,
        step_size: jax.Array | float | None = None,
    ) -> tuple[JarzynskiState, JarzynskiInfo]:
        params = state.params if params is None else params
        h = default_step_size if step_size is None else step_size
        h = jnp.asarray(h, state.potential.dtype)
        move_key, resample_key = jax.random.split(rng_key)

        def one_move(carry, key):
            st, delta_sum, bad_any = carry
            st, delta, increment, bad = _move(key, st, params, potential_fn, h, reweight)
            return (st, delta_sum + delta, bad_any | bad), increment

        n_walkers = _num_walkers(state)
        (state, delta_sum, bad_any), increments = jax.lax.scan(
            one_move,
            (state, jnp.zeros_like(state.log_weights), jnp.zeros((n_walkers,), bool)),
            jax.random.split(move_key, num_steps),
        )
        if reweight:
            state, ess, resampled, ancestors = _maybe_resample(
                resample_key, state, resampling_fn, ess_threshold
            )
        else:
            n = _num_walkers(state)
            ess = jnp.asarray(n, state.log_weights.dtype)
            resampled = jnp.asarray(False)
            ancestors = jnp.arange(n, dtype=jnp.int32)
        info = JarzynskiInfo(
            ess=ess,
            resampled=resampled,
            ancestors=ancestors,
            log_normalizer_increment=jnp.sum(increments),
            log_weight_increments=delta_sum,
            num_nonfinite=jnp.sum(bad_any).astype(jnp.int32),
        )
        return state, info

    return kernel


def _check_kernel_args(step_size, resampling_fn, ess_threshold, num_steps) -> int:
    _checks.check_positive("step_size", step_size)
    _checks.check_fraction("ess_threshold", ess_threshold)
    if not callable(resampling_fn):
        raise TypeError("`resampling_fn` must be callable (rng_key, weights, num_samples)")
    return _checks.check_int_at_least("num_steps", num_steps, 1)


def build_kernel(
    potential_fn: PotentialFn,
    step_size: float,
    resampling_fn: Callable = resampling.systematic,
    ess_threshold: float = 0.5,
    num_steps: int = 1,
) -> Callable:
    """Build the Jarzynski-weighted ULA kernel.

    Parameters
    ----------
    potential_fn
        ``potential_fn(params, x) -> scalar``, the energy :math:`U_\\theta(x)` of one sample.
    step_size
        ULA step size :math:`h > 0`.
    resampling_fn
        A BlackJAX resampling function ``(rng_key, weights, num_samples) -> indices``.
    ess_threshold
        Resample when :math:`\\mathrm{ESS}/N` falls below this value, in (0, 1].
    num_steps
        ULA moves per call; the first re-weights :math:`\\theta_k \\to \\theta_{k+1}`, the
        others run at :math:`\\theta_{k+1}`.

    Returns
    -------
    ``kernel(rng_key, state, params=None, step_size=None) -> (JarzynskiState, JarzynskiInfo)``.
    ``params`` is :math:`\\theta_{k+1}` (``None`` keeps ``state.params``); ``step_size``
    overrides the default for this call (e.g. from an adaptation scheme).
    """
    num_steps = _check_kernel_args(step_size, resampling_fn, ess_threshold, num_steps)
    return _build_kernel(
        potential_fn, step_size, resampling_fn, ess_threshold, num_steps, reweight=True
    )


def as_top_level_api(
    potential_fn: PotentialFn,
    params: ArrayTree,
    step_size: float,
    resampling_fn: Callable = resampling.systematic,
    ess_threshold: float = 0.5,
    num_steps: int = 1,
) -> SamplingAlgorithm:
    """Jarzynski-weighted ULA as a ``blackjax.SamplingAlgorithm``.

    ``init(position, rng_key=None)`` weights the walkers ``position`` equally for
    ``params``; ``step(rng_key, state, params=None)`` runs one kernel call. Called with
    ``params=None`` at every step it samples the fixed EBM :math:`\\rho_\\theta`, and the
    weighted walkers are free of ULA's discretisation bias. Works with
    ``blackjax.util.run_inference_algorithm``.
    """
    kernel = build_kernel(potential_fn, step_size, resampling_fn, ess_threshold, num_steps)

    def init_fn(position: ArrayTree, rng_key: jax.Array | None = None) -> JarzynskiState:
        del rng_key
        return init(position, params, potential_fn)

    def step_fn(
        rng_key: jax.Array, state: JarzynskiState, params: ArrayTree | None = None
    ) -> tuple[JarzynskiState, JarzynskiInfo]:
        return kernel(rng_key, state, params)

    return SamplingAlgorithm(init_fn, step_fn)


# ---------------------------------------------------------------------------------------
# Adaptive schedule: ESS-controlled sub-steps along the parameter path
# ---------------------------------------------------------------------------------------


class AdaptiveJarzynskiInfo(NamedTuple):
    """What one adaptive kernel call did (fields of :class:`JarzynskiInfo`, plus the
    sub-step record).

    ess
        ESS (in walkers) after the last sub-step's weight update, before its resampling.
    resampled
        Whether the walkers were resampled in any sub-step.
    ancestors
        Index of each final walker's ancestor at the start of the call (composed over
        sub-steps).
    log_normalizer_increment
        Change of the log-normaliser estimate over the whole call.
    log_weight_increments
        :math:`\\Delta A^i` of the last sub-step.
    num_substeps
        Number of sub-steps taken (1 when the whole step kept the ESS above target).
    min_ess
        Smallest ESS after any sub-step's weight update (before its resampling).
    min_conditional_ess
        Smallest realised conditional ESS fraction (:func:`conditional_log_ess`) of the
        parameter moves, the quantity the sub-steps hold at ``target_ess`` or above.
    num_resampled
        Number of sub-steps that resampled.
    num_evaluations
        Potential evaluations (value and gradient) per walker made by the call.
    log_weights_before_resampling
        Normalised log weights after the last sub-step's update, before its resampling.
    log_weights_before_last_substep
        Normalised log weights the last sub-step started from (with
        ``log_weight_increments`` they give its acceptance proxy).
    num_nonfinite
        Largest number of walkers with a non-finite evaluation in one sub-step.
    """

    ess: jax.Array
    resampled: jax.Array
    ancestors: jax.Array
    log_normalizer_increment: jax.Array
    log_weight_increments: jax.Array
    num_substeps: jax.Array
    min_ess: jax.Array
    min_conditional_ess: jax.Array
    num_resampled: jax.Array
    num_evaluations: jax.Array
    log_weights_before_resampling: jax.Array
    log_weights_before_last_substep: jax.Array
    num_nonfinite: jax.Array


def conditional_log_ess(log_weights: jax.Array, increments: jax.Array) -> jax.Array:
    """Log of the conditional ESS fraction
    :math:`\\mathrm{CESS}/N = (\\sum_i w_i e^{s_i})^2 / \\sum_i w_i e^{2 s_i} \\in (0, 1]`
    of re-weighting normalised weights ``w = exp(log_weights)`` by ``exp(increments)``
    (Zhou, Johansen and Aston 2016). It is 1 when the increments are equal and does not
    depend on how degenerate ``w`` already is, so it measures the damage of one step."""
    return 2 * logsumexp(log_weights + increments) - logsumexp(log_weights + 2 * increments)


def build_adaptive_kernel(
    potential_fn: PotentialFn,
    step_size: float,
    target_ess: float = 0.5,
    max_substeps: int = 10,
    resampling_fn: Callable = resampling.systematic,
    ess_threshold: float = 0.5,
    num_steps: int = 1,
    max_backtracks: int = 6,
) -> Callable:
    """Jarzynski kernel that splits a large parameter move into ESS-controlled sub-steps.

    The move :math:`\\theta_k \\to \\theta_{k+1}` follows the straight path
    :math:`\\theta(\\lambda) = \\theta_k + \\lambda(\\theta_{k+1} - \\theta_k)`. One sub-step
    from :math:`\\lambda_j`:

    1. ULA move :math:`X \\to X'` under :math:`\\theta(\\lambda_j)` (cached gradient);
    2. one evaluation of :math:`U_{\\theta_{k+1}}, \\nabla U_{\\theta_{k+1}}` at :math:`X'`;
    3. prediction of the Jarzynski increment for going the fraction :math:`f` of the
       remaining way: :math:`U` and :math:`\\nabla U` at :math:`X'` are interpolated
       linearly in :math:`f` between :math:`\\theta(\\lambda_j)` (first-order extrapolation
       from the cached values at :math:`X`) and :math:`\\theta_{k+1}` (step 2), and put into
       :math:`\\Delta A(f) = \\alpha_j(X, X') - \\alpha_f(X', X)`;
    4. :math:`f \\in (0, 1]` is the largest fraction whose predicted conditional ESS
       (:func:`conditional_log_ess`) stays at ``target_ess``, found with BlackJAX's
       ``dichotomy`` root solver;
    5. the exact increment at :math:`\\theta(\\lambda_j + f(1 - \\lambda_j))` (when
       :math:`f = 1` the evaluation of step 2 is reused, otherwise one more evaluation);
       while its realised conditional ESS is below target, :math:`f` is halved and the
       evaluation repeated (at most ``max_backtracks`` times), since the prediction is
       only first order;
    6. the Jarzynski update to :math:`\\theta(\\lambda_{j+1})`,
       :math:`\\lambda_{j+1} = \\lambda_j + f(1 - \\lambda_j)`, then ``num_steps - 1``
       further moves there and resampling when ESS/N < ``ess_threshold``.

    The sub-steps run in a ``lax.while_loop`` until :math:`\\lambda = 1`; the
    ``max_substeps``-th goes to :math:`\\lambda = 1` whatever the prediction. When the
    whole move keeps the conditional ESS above target, the call costs exactly what a
    :func:`build_kernel` call costs: one evaluation per walker per move; each sub-step
    costs one more, and each backtrack one more. The weights are exact whatever the
    prediction does; the prediction only chooses the path. The realised conditional ESS of
    every sub-step is at least ``target_ess`` unless the ULA move alone breaks it (then
    the step size is too large) or the backtracks or sub-steps run out.

    Returns ``kernel(rng_key, state, params=None, step_size=None) ->
    (JarzynskiState, AdaptiveJarzynskiInfo)``, on the same state as :func:`build_kernel`.
    """
    _checks.check_fraction("target_ess", target_ess, closed_right=False)
    max_substeps = _checks.check_int_at_least("max_substeps", max_substeps, 1)
    num_steps = _check_kernel_args(step_size, resampling_fn, ess_threshold, num_steps)
    max_backtracks = _checks.check_int_at_least("max_backtracks", max_backtracks, 0)
    log_target = jnp.log(target_ess)
    default_step_size = step_size

    def kernel(
        rng_key: jax.Array,
        state: JarzynskiState,
        params: ArrayTree | None = None,
        step_size: jax.Array | float | None = None,
    ) -> tuple[JarzynskiState, AdaptiveJarzynskiInfo]:
        start = state.params
        target = start if params is None else params
        dtype = state.log_weights.dtype
        h = jnp.asarray(default_step_size if step_size is None else step_size, dtype)
        n = _num_walkers(state)

        def path(lam):  # exactly `target` at lam == 1
            return jax.tree.map(
                lambda a, b: jnp.where(lam >= 1.0, b, a + (lam * (b - a)).astype(a.dtype)),
                start,
                target,
            )

        def substep(st, lam, count, key):
            move_key, more_key, resample_key = jax.random.split(key, 3)
            x_new = ula_proposal(move_key, st.particles, st.grad, h)
            u_target, g_target = potential_and_grad(potential_fn, target, x_new)
            # theta(lam_j) at x_new, first order from the cached values at x
            diff = jax.tree.map(jnp.subtract, x_new, st.particles)
            u_here = st.potential + _per_walker_dot(st.grad, diff)
            forward = _alpha(st.potential, st.grad, st.particles, x_new, h)

            def predicted(f):
                u_f = (1 - f) * u_here + f * u_target
                g_f = jax.tree.map(lambda a, b: (1 - f) * a + f * b, st.grad, g_target)
                return forward - _alpha(u_f, g_f, x_new, st.particles, h)

            def excess(f):  # > 0 while the conditional ESS stays above target
                return conditional_log_ess(st.log_weights, predicted(f)) - log_target

            fraction = dichotomy(excess, jnp.asarray(0.0, dtype), jnp.asarray(1.0, dtype))
            remaining = jnp.maximum(max_substeps - count, 1).astype(dtype)
            # even the move alone breaks the target: advance an equal share of the rest
            fraction = jnp.where(jnp.isfinite(fraction), fraction, 1.0 / remaining)
            last = count + 1 >= max_substeps
            fraction = jnp.where(last, 1.0, fraction)

            def evaluate(f):
                lam_f = jnp.where(f >= 1.0, 1.0, lam + f * (1.0 - lam))
                return jax.lax.cond(
                    lam_f >= 1.0,
                    lambda _: (u_target, g_target),
                    lambda _: potential_and_grad(potential_fn, path(lam_f), x_new),
                    None,
                )

            def realised_ok(u, g):
                inc = forward - _alpha(u, g, x_new, st.particles, h)
                return conditional_log_ess(st.log_weights, inc) >= log_target

            # backtracking: halve the fraction until the realised conditional ESS meets
            # the target (the prediction is only first order), at most max_backtracks times
            def bt_cond(c):
                f, _, _, ok, tries = c
                return jnp.logical_and(~ok, tries < max_backtracks)

            def bt_body(c):
                f, _, _, _, tries = c
                f = 0.5 * f
                u, g = evaluate(f)
                return f, u, g, realised_ok(u, g) | last, tries + 1

            u0, g0 = evaluate(fraction)
            evaluations = 1 + (fraction < 1.0).astype(jnp.int32) + (num_steps - 1)
            fraction, u_new, g_new, _, tries = jax.lax.while_loop(
                bt_cond, bt_body, (fraction, u0, g0, realised_ok(u0, g0) | last, 0)
            )
            evaluations = evaluations + tries
            new_lam = jnp.where(fraction >= 1.0, 1.0, lam + fraction * (1.0 - lam))
            new_params = path(new_lam)
            cess = jnp.exp(conditional_log_ess(
                st.log_weights, forward - _alpha(u_new, g_new, x_new, st.particles, h)
            ))
            st, delta, inc, bad = _reweight(st, x_new, u_new, g_new, new_params, h)

            def further(carry, k):
                s, d, i, b = carry
                s, d2, i2, b2 = _move(k, s, new_params, potential_fn, h, True)
                return (s, d + d2, i + i2, b | b2), None

            if num_steps > 1:
                (st, delta, inc, bad), _ = jax.lax.scan(
                    further, (st, delta, inc, bad), jax.random.split(more_key, num_steps - 1)
                )
            pre_resampling = st.log_weights
            st, ess, resampled, ancestors = _maybe_resample(
                resample_key, st, resampling_fn, ess_threshold
            )
            return (st, new_lam, ess, resampled, ancestors, inc, delta, cess, evaluations,
                    pre_resampling, jnp.sum(bad).astype(jnp.int32))

        def cond(carry):
            _, lam, count, *_ = carry
            return jnp.logical_and(lam < 1.0, count < max_substeps)

        def body(carry):
            (st, lam, count, key, ancestors, min_ess, min_cess, n_res, log_z_inc, _, _, n_eval, _, _,
             n_bad) = carry
            key, step_key = jax.random.split(key)
            before = st.log_weights
            st, lam, ess, resampled, anc, inc, delta, cess, evals, pre, bad = substep(
                st, lam, count, step_key
            )
            return (
                st,
                lam,
                count + 1,
                key,
                ancestors[anc],
                jnp.minimum(min_ess, ess),
                jnp.minimum(min_cess, cess),
                n_res + resampled.astype(jnp.int32),
                log_z_inc + inc,
                ess,
                delta,
                n_eval + evals,
                pre,
                before,
                jnp.maximum(n_bad, bad),
            )

        init_carry = (
            state,
            jnp.asarray(0.0, dtype),
            jnp.asarray(0, jnp.int32),
            rng_key,
            jnp.arange(n, dtype=jnp.int32),
            jnp.asarray(n, dtype),
            jnp.asarray(1.0, dtype),
            jnp.asarray(0, jnp.int32),
            jnp.zeros((), dtype),
            jnp.asarray(n, dtype),
            jnp.zeros((n,), dtype),
            jnp.asarray(0, jnp.int32),
            state.log_weights,
            state.log_weights,
            jnp.asarray(0, jnp.int32),
        )
        (st, _, count, _, ancestors, min_ess, min_cess, n_res, log_z_inc, ess, increments,
         n_eval, pre_resampling, before_last, n_bad) = jax.lax.while_loop(cond, body, init_carry)
        info = AdaptiveJarzynskiInfo(
            ess=ess,
            resampled=n_res > 0,
            ancestors=ancestors,
            log_normalizer_increment=log_z_inc,
            log_weight_increments=increments,
            num_substeps=count,
            min_ess=min_ess,
            min_conditional_ess=min_cess,
            num_resampled=n_res,
            num_evaluations=n_eval,
            log_weights_before_resampling=pre_resampling,
            log_weights_before_last_substep=before_last,
            num_nonfinite=n_bad,
        )
        return st, info

    return kernel
