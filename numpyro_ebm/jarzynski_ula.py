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

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from blackjax.base import SamplingAlgorithm
from blackjax.smc import resampling
from blackjax.smc.ess import log_ess
from blackjax.smc.solver import dichotomy
from jax.extend.random import threefry_2x32
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
    "weighted_param_grad",
    "standard_normal",
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
    potential_fn: PotentialFn,
    params: ArrayTree,
    particles: ArrayTree,
    batch_size: int | None = None,
) -> tuple[jax.Array, ArrayTree]:
    """:math:`U_\\theta(X^i)` and :math:`\\nabla_x U_\\theta(X^i)` for every walker: ONE
    forward/backward evaluation of ``potential_fn`` per walker, vmapped over all walkers at
    once (``batch_size=None``) or over chunks of ``batch_size`` walkers with ``lax.map``
    (memory bounded by one chunk)."""
    value_and_grad = jax.value_and_grad(potential_fn, argnums=1)
    if batch_size is None:
        return jax.vmap(value_and_grad, in_axes=(None, 0))(params, particles)
    return jax.lax.map(lambda x: value_and_grad(params, x), particles, batch_size=batch_size)


def _split_chunks(tree: ArrayTree, batch_size: int) -> tuple[ArrayTree, ArrayTree]:
    """``(full, rest)``: the first ``n // batch_size * batch_size`` walkers reshaped to
    ``(n // batch_size, batch_size, ...)``, and the remaining walkers."""
    n = jax.tree.leaves(tree)[0].shape[0]
    m = n // batch_size * batch_size
    full = jax.tree.map(lambda leaf: leaf[:m].reshape(n // batch_size, batch_size, *leaf.shape[1:]), tree)
    rest = jax.tree.map(lambda leaf: leaf[m:], tree)
    return full, rest


def weighted_param_grad(
    potential_fn: PotentialFn,
    params: ArrayTree,
    particles: ArrayTree,
    weights: jax.Array,
    batch_size: int | None = None,
) -> ArrayTree:
    """:math:`\\sum_i c_i \\nabla_\\theta U_\\theta(X^i)` for fixed coefficients ``weights``
    :math:`c_i`, taken as the gradient of the one weighted sum
    :math:`\\nabla_\\theta \\sum_i c_i U_\\theta(X^i)`: per-walker parameter gradients are
    never materialised. With ``batch_size`` the sum runs over chunks of walkers in a
    ``lax.scan`` (memory bounded by one chunk)."""

    def weighted_sum(p, x, c):
        return jnp.sum(c * jax.vmap(potential_fn, in_axes=(None, 0))(p, x))

    grad = jax.grad(weighted_sum)
    if batch_size is None:
        return grad(params, particles, weights)
    (full_x, full_c), (rest_x, rest_c) = _split_chunks((particles, weights), batch_size)

    def add_chunk(total, chunk):
        return jax.tree.map(jnp.add, total, grad(params, *chunk)), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    total, _ = jax.lax.scan(add_chunk, zeros, (full_x, full_c))
    if rest_c.shape[0]:
        total = jax.tree.map(jnp.add, total, grad(params, rest_x, rest_c))
    return total


def _fused_evaluation(
    potential_fn: PotentialFn, params: ArrayTree, particles: ArrayTree
) -> tuple[jax.Array, ArrayTree, ArrayTree, Callable[[jax.Array], ArrayTree]]:
    """One forward pass over the walkers and its backward pass with unit cotangents:
    ``(U, grad_x U, sum_i grad_theta U(X^i), param_vjp)``. ``param_vjp(c)`` reuses the
    forward pass (``jax.vjp``) to give :math:`\\sum_i c_i \\nabla_\\theta U(X^i)` for
    coefficients that are only known after the first backward pass (the Jarzynski
    weights); the unused halves of each backward pass are removed by XLA."""

    def energies(p, x):
        return jax.vmap(potential_fn, in_axes=(None, 0))(p, x)

    potential, vjp_fn = jax.vjp(energies, params, particles)
    param_sum, grad = vjp_fn(jnp.ones_like(potential))
    return potential, grad, param_sum, lambda c: vjp_fn(c)[0]


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


def _is_threefry(rng_key: jax.Array) -> bool:
    if jnp.issubdtype(rng_key.dtype, jax.dtypes.prng_key):
        return str(jax.random.key_impl(rng_key)) == "threefry2x32"
    return rng_key.shape == (2,) and jax.config.jax_default_prng_impl == "threefry2x32"


def standard_normal(rng_key: jax.Array, shape: tuple[int, ...], dtype: Any) -> jax.Array:
    """Standard normal draws, as ``jax.random.normal`` makes them, faster for float32.

    ``jax.random.normal`` turns uniforms on (-1, 1) into normals by
    :math:`\\sqrt2\\,\\mathrm{erf}^{-1}(u)`. For float32 and a threefry key this function
    does the same with the same 23-bit uniforms, but takes both 32-bit words of each
    threefry-2x32 block (``jax.extend.random.threefry_2x32`` over a counter), where
    ``jax.random.bits`` spends one block per word: half the generator work. The ULA noise
    is the largest single cost of an iteration on a CPU (``benchmarks/``). Other dtypes
    and key types use ``jax.random.normal``. The numbers differ from
    ``jax.random.normal``'s for the same key; their distribution does not, and they do not
    depend on how the walkers are sharded.
    """
    dtype = jnp.dtype(dtype)
    size = math.prod(shape)
    if dtype != jnp.float32 or not _is_threefry(rng_key) or not 0 < size < 2**32:
        return jax.random.normal(rng_key, shape, dtype)
    key_words = jax.random.key_data(rng_key) if jnp.issubdtype(
        rng_key.dtype, jax.dtypes.prng_key) else rng_key
    words = threefry_2x32(key_words, jax.lax.iota(jnp.uint32, size))
    one = jnp.asarray(1.0, jnp.float32)
    mantissa = jax.lax.shift_right_logical(words, jnp.uint32(9))
    unit = jax.lax.bitcast_convert_type(
        mantissa | jax.lax.bitcast_convert_type(one, jnp.uint32), jnp.float32
    ) - one  # [0, 1) on a 2^-23 grid
    low = jnp.nextafter(jnp.asarray(-1.0, jnp.float32), jnp.asarray(0.0, jnp.float32))
    u = jnp.maximum(low, unit * (one - low) + low)  # (-1, 1)
    normal = jnp.asarray(math.sqrt(2.0), jnp.float32) * jax.lax.erf_inv(u)
    return normal.reshape(shape)


def ula_proposal(
    rng_key: jax.Array,
    particles: ArrayTree,
    grad: ArrayTree,
    step_size: jax.Array,
    noise_dtype: Any = None,
) -> ArrayTree:
    """One unadjusted Langevin move :math:`X' = X - h\\nabla U(X) + \\sqrt{2h}\\,\\xi`.

    :math:`\\xi` is drawn in ``noise_dtype`` (default: each leaf's own dtype) by
    :func:`standard_normal`; e.g. float32 noise for float64 walkers halves the cost of the
    noise. The weights stay exact for the move that was made, since :math:`\\Delta A` is
    computed from :math:`X` and :math:`X'` in the walkers' precision; only the proposal's
    tails are cut at the float32 generator's :math:`\\pm 5.4\\sigma`.
    """
    leaves, treedef = jax.tree.flatten(particles)
    keys = jax.random.split(rng_key, len(leaves))
    noise = [
        standard_normal(k, leaf.shape, leaf.dtype if noise_dtype is None else noise_dtype).astype(
            leaf.dtype
        )
        for k, leaf in zip(keys, leaves, strict=True)
    ]
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


def init(
    particles: ArrayTree,
    params: ArrayTree,
    potential_fn: PotentialFn,
    batch_size: int | None = None,
) -> JarzynskiState:
    """Walkers with equal weights for ``params`` (they should be draws from
    :math:`\\rho_\\theta`); evaluates :math:`U_\\theta` and :math:`\\nabla_x U_\\theta` once per
    walker (in chunks of ``batch_size`` walkers when given) and sets the log-normaliser
    estimate to 0."""
    n = _checks.leading_size("particles", particles)
    if n < 2:
        raise ValueError(f"`particles` must hold at least 2 walkers, got {n}")
    _checks.check_finite_tree("particles", particles)
    _checks.check_scalar_potential(
        potential_fn, params, jax.tree.map(lambda leaf: leaf[0], particles)
    )
    if batch_size is not None:
        _checks.check_int_at_least("batch_size", batch_size, 1)
    potential, grad = potential_and_grad(potential_fn, params, particles, batch_size)
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
    batch_size: int | None = None,
    noise_dtype: Any = None,
) -> tuple[JarzynskiState, jax.Array, jax.Array, jax.Array]:
    """One ULA move under ``state.params`` followed by re-weighting to ``params``."""
    new_particles = ula_proposal(rng_key, state.particles, state.grad, step_size, noise_dtype)
    new_potential, new_grad = potential_and_grad(potential_fn, params, new_particles, batch_size)
    return _reweight(state, new_particles, new_potential, new_grad, params, step_size, reweight)


def _fused_move(
    rng_key: jax.Array,
    state: JarzynskiState,
    params: ArrayTree,
    potential_fn: PotentialFn,
    step_size: jax.Array,
    reweight: bool,
    noise_dtype: Any = None,
) -> tuple[JarzynskiState, jax.Array, jax.Array, jax.Array, ArrayTree, Callable]:
    """:func:`_move` whose evaluation also serves the next cross-entropy gradient: returns
    the sum of the walkers' parameter gradients and a ``param_vjp`` (see
    :func:`_fused_evaluation`) as well."""
    new_particles = ula_proposal(rng_key, state.particles, state.grad, step_size, noise_dtype)
    new_potential, new_grad, param_sum, param_vjp = _fused_evaluation(
        potential_fn, params, new_particles
    )
    new_state, delta, increment, bad = _reweight(
        state, new_particles, new_potential, new_grad, params, step_size, reweight
    )
    return new_state, delta, increment, bad, param_sum, param_vjp


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


def _all_finite(tree: ArrayTree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)]
    out = leaves[0]
    for leaf in leaves[1:]:
        out = out & leaf
    return out


def _build_kernel(
    potential_fn: PotentialFn,
    step_size: float,
    resampling_fn: Callable,
    ess_threshold: float,
    num_steps: int,
    reweight: bool,
    batch_size: int | None = None,
    param_grad: bool = False,
    noise_dtype: Any = None,
) -> Callable:
    """The kernel; ``reweight=False`` gives plain (unweighted) ULA walkers, as PCD uses.

    With ``param_grad=True`` the kernel returns a third value, the walkers' weighted
    parameter gradient at the new state, :math:`\\sum_i w_i \\nabla_\\theta U_{\\theta_{k+1}}(X^i)`
    with the final (after resampling) walkers and weights: exactly the second term of the
    next cross-entropy gradient. Without ``batch_size`` it comes from the same evaluation
    as :math:`U_{k+1}, \\nabla_x U_{k+1}` at the new walkers (:func:`_fused_evaluation`): one
    forward pass, and one backward pass with unit cotangents that gives
    :math:`\\nabla_x U` and, for equal weights, the parameter gradient too. The Jarzynski
    weights are only known after :math:`\\nabla_x U`, so for them the forward pass is reused
    by a second backward pass with cotangents :math:`c_i` (the new weights, or
    ``count_i / N`` when the walkers were resampled, ``count_i`` being how many copies of
    walker ``i`` resampling made). If an evaluation of the last move was not finite, the
    gradient is recomputed at the kept walkers, so the result always equals
    :func:`weighted_param_grad` at the returned state. With ``batch_size`` (walkers
    evaluated in chunks) the parameter gradient is a separate chunked pass.
    """
    default_step_size = step_size

    def kernel(
        rng_key: jax.Array,
        state: JarzynskiState,
        params: ArrayTree | None = None,
        step_size: jax.Array | float | None = None,
    ):
        params = state.params if params is None else params
        h = default_step_size if step_size is None else step_size
        h = jnp.asarray(h, state.potential.dtype)
        move_key, resample_key = jax.random.split(rng_key)
        n = _num_walkers(state)
        fused = param_grad and batch_size is None
        num_plain = num_steps - 1 if fused else num_steps
        move_keys = jax.random.split(move_key, num_steps)

        def one_move(carry, key):
            st, delta_sum, bad_any = carry
            st, delta, increment, bad = _move(
                key, st, params, potential_fn, h, reweight, batch_size, noise_dtype
            )
            return (st, delta_sum + delta, bad_any | bad), increment

        carry = (state, jnp.zeros_like(state.log_weights), jnp.zeros((n,), bool))
        increments = jnp.zeros((0,), state.log_weights.dtype)
        if num_plain:
            carry, increments = jax.lax.scan(one_move, carry, move_keys[:num_plain])
        state, delta_sum, bad_any = carry
        if fused:
            state, delta, increment, bad, param_sum, param_vjp = _fused_move(
                move_keys[-1], state, params, potential_fn, h, reweight, noise_dtype
            )
            delta_sum, bad_any = delta_sum + delta, bad_any | bad
            increments = jnp.concatenate([increments, increment[None]])
        pre_resampling = state.log_weights
        if reweight:
            state, ess, resampled, ancestors = _maybe_resample(
                resample_key, state, resampling_fn, ess_threshold
            )
        else:
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
        if not param_grad:
            return state, info
        weights = jnp.exp(state.log_weights)
        if not fused:
            return state, info, weighted_param_grad(
                potential_fn, params, state.particles, weights, batch_size
            )
        if reweight:
            counts = jnp.zeros((n,), weights.dtype).at[ancestors].add(1.0) / n
            coefficients = jnp.where(resampled, counts, jnp.exp(pre_resampling))
            walker_grad = param_vjp(coefficients)
        else:
            walker_grad = jax.tree.map(lambda g: g / n, param_sum)
        # a walker whose last evaluation was not finite kept its old position: recompute there
        ok = ~jnp.any(bad) & _all_finite(walker_grad)

        def recompute_at_kept_walkers():
            return weighted_param_grad(potential_fn, params, state.particles, weights)

        walker_grad = jax.lax.cond(ok, lambda: walker_grad, recompute_at_kept_walkers)
        return state, info, walker_grad

    return kernel


def _check_kernel_args(
    step_size, resampling_fn, ess_threshold, num_steps, batch_size=None, noise_dtype=None
) -> int:
    _checks.check_positive("step_size", step_size)
    if noise_dtype is not None:
        _checks.check_float_dtype("noise_dtype", noise_dtype)
    if batch_size is not None:
        _checks.check_int_at_least("batch_size", batch_size, 1)
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
    batch_size: int | None = None,
    noise_dtype: Any = None,
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
    batch_size
        Evaluate the walkers in chunks of this many with ``lax.map`` (as BlackJAX's SMC
        does), bounding the memory of the evaluation by one chunk; ``None`` (default)
        vmaps over all walkers at once.
    noise_dtype
        dtype in which the ULA noise is drawn (:func:`ula_proposal`); default: the
        walkers' dtype. ``jnp.float32`` for float64 walkers roughly halves the cost of the
        noise and keeps the weights exact for the moves made.

    Returns
    -------
    ``kernel(rng_key, state, params=None, step_size=None) -> (JarzynskiState, JarzynskiInfo)``.
    ``params`` is :math:`\\theta_{k+1}` (``None`` keeps ``state.params``); ``step_size``
    overrides the default for this call (e.g. from an adaptation scheme).
    """
    num_steps = _check_kernel_args(
        step_size, resampling_fn, ess_threshold, num_steps, batch_size, noise_dtype
    )
    return _build_kernel(
        potential_fn, step_size, resampling_fn, ess_threshold, num_steps, reweight=True,
        batch_size=batch_size, noise_dtype=noise_dtype,
    )


def as_top_level_api(
    potential_fn: PotentialFn,
    params: ArrayTree,
    step_size: float,
    resampling_fn: Callable = resampling.systematic,
    ess_threshold: float = 0.5,
    num_steps: int = 1,
    batch_size: int | None = None,
    noise_dtype: Any = None,
) -> SamplingAlgorithm:
    """Jarzynski-weighted ULA as a ``blackjax.SamplingAlgorithm``.

    ``init(position, rng_key=None)`` weights the walkers ``position`` equally for
    ``params``; ``step(rng_key, state, params=None)`` runs one kernel call. Called with
    ``params=None`` at every step it samples the fixed EBM :math:`\\rho_\\theta`, and the
    weighted walkers are free of ULA's discretisation bias. Works with
    ``blackjax.util.run_inference_algorithm``. ``batch_size`` and ``noise_dtype`` as in
    :func:`build_kernel`.
    """
    kernel = build_kernel(
        potential_fn, step_size, resampling_fn, ess_threshold, num_steps, batch_size, noise_dtype
    )

    def init_fn(position: ArrayTree, rng_key: jax.Array | None = None) -> JarzynskiState:
        del rng_key
        return init(position, params, potential_fn, batch_size)

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
    batch_size: int | None = None,
    noise_dtype: Any = None,
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

    ``batch_size`` and ``noise_dtype`` as in :func:`build_kernel`.

    Returns ``kernel(rng_key, state, params=None, step_size=None) ->
    (JarzynskiState, AdaptiveJarzynskiInfo)``, on the same state as :func:`build_kernel`.
    """
    _checks.check_fraction("target_ess", target_ess, closed_right=False)
    max_substeps = _checks.check_int_at_least("max_substeps", max_substeps, 1)
    num_steps = _check_kernel_args(
        step_size, resampling_fn, ess_threshold, num_steps, batch_size, noise_dtype
    )
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
            x_new = ula_proposal(move_key, st.particles, st.grad, h, noise_dtype)
            u_target, g_target = potential_and_grad(potential_fn, target, x_new, batch_size)
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
                    lambda _: potential_and_grad(potential_fn, path(lam_f), x_new, batch_size),
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
                s, d2, i2, b2 = _move(k, s, new_params, potential_fn, h, True, batch_size, noise_dtype)
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
