r"""What every walker kernel shares: the walker state, the record of one call, the
Jarzynski weight update and the resampling step (as ``blackjax/smc/base.py`` does for
BlackJAX's SMC kernels).

Walkers :math:`X^i` carry log weights :math:`A^i`. A move :math:`X \to X'` made by the ULA
kernel :math:`q_k` of :math:`\theta_k`, followed by a change of parameters to
:math:`\theta_{k+1}`, changes the log weights by

.. math::

   \Delta A = \log \frac{e^{-U_{k+1}(X')}\, q_{k+1}(X' \to X)}{e^{-U_k(X)}\, q_k(X \to X')}
            = a_k(X, X') - a_{k+1}(X', X),

   a_k(x, y) = U_k(x) + \tfrac12 (y - x)\cdot\nabla U_k(x) + \tfrac{h}{4} |\nabla U_k(x)|^2,

since :math:`-\log[e^{-U(x)} q(x \to y)] = a(x, y) + |y - x|^2 / 4h` + const and the last
term is the same in both directions (:func:`ula_transition_energy` is :math:`a`, the
paper's :math:`\alpha`). Storage: ``log_weights`` are kept normalised (``logsumexp == 0``)
and the removed normalisation is summed in ``log_normalizer``, the Jarzynski estimate of
:math:`\log Z_{\theta_k} / Z_{\theta_0}`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from blackjax.smc.ess import log_ess
from jax.scipy.special import logsumexp

__all__ = [
    "ArrayTree",
    "PotentialFn",
    "JarzynskiState",
    "JarzynskiInfo",
    "WalkerKernel",
    "ula_transition_energy",
    "log_weight_increment",
    "apply_move",
    "resample_if_degenerate",
    "resample_groups_if_degenerate",
    "gradient_weights",
]

ArrayTree = Any
PotentialFn = Callable[[ArrayTree, ArrayTree], jax.Array]


class JarzynskiState(NamedTuple):
    """State of the walkers.

    particles
        Walker positions, a pytree whose leaves have the walker axis first.
    log_weights
        Normalised log weights, shape ``(num_walkers,)``: ``logsumexp == 0`` (equal for
        unweighted walkers).
    params
        The parameters :math:`\\theta` the walkers are weighted for.
    potential
        :math:`U_\\theta` at the particles, shape ``(num_walkers,)`` (cached).
    grad
        :math:`\\nabla_x U_\\theta` at the particles, shaped like ``particles`` (cached).
    log_normalizer
        Running Jarzynski estimate of :math:`\\log Z_\\theta - \\log Z_{\\theta_0}` (0 for
        unweighted walkers).
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
    param_grad
        With ``build_kernel(..., param_grad=True)``: the walkers' weighted parameter
        gradient at the returned state, :math:`\\sum_i w_i \\nabla_\\theta U_\\theta(X^i)`
        (the second term of the next cross-entropy gradient); otherwise ``None``.
    """

    ess: jax.Array
    resampled: jax.Array
    ancestors: jax.Array
    log_normalizer_increment: jax.Array
    log_weight_increments: jax.Array
    num_nonfinite: jax.Array
    param_grad: ArrayTree = None


class WalkerKernel(NamedTuple):
    """A walker kernel as the trainer uses it: configuration only, the energy is given at
    each call (like an optax transformation, it holds no state).

    init
        ``init(potential_fn, particles, params) -> JarzynskiState``.
    step
        ``step(potential_fn, rng_key, state, params, step_size) -> (state, info)``: the
        move to ``params`` (:math:`\\theta_{k+1}`); ``info.param_grad`` is the walkers'
        weighted parameter gradient at the new state.
    restart
        ``None``, or ``restart(potential_fn, rng_key, state, params, batch, iteration) ->
        state``, applied before ``step`` (CD's restart from the data).
    weighted
        Whether the walkers carry Jarzynski weights (then the trainer records ESS, log
        normaliser and cross-entropy).
    step_size
        The default ULA step size :math:`h`.
    name
        A short name (``"jarzynski"``, ``"pcd"``, ``"cd"``, ``"adaptive_jarzynski"``).
    config
        The settings it was built with (recorded in checkpoints, compared on resume).
    """

    init: Callable
    step: Callable
    restart: Callable | None
    weighted: bool
    step_size: float
    name: str
    config: dict = {}


# ---------------------------------------------------------------------------------------
# Per-walker helpers
# ---------------------------------------------------------------------------------------


def sampling_algorithm(kernel: Callable, init: Callable, params: ArrayTree,
                       potential_fn: PotentialFn, batch_size: int | None, *step_args: Any):
    """``blackjax.SamplingAlgorithm(init_fn, step_fn)`` around a kernel: ``init_fn(position,
    rng_key=None)`` gives the walkers ``position`` equal weights for ``params``;
    ``step_fn(rng_key, state, params=None)`` is one kernel call (``step_args`` go between
    the state and the parameters, e.g. CD's data)."""
    from blackjax.base import SamplingAlgorithm

    def init_fn(position: ArrayTree, rng_key: jax.Array | None = None) -> JarzynskiState:
        del rng_key
        return init(position, params, potential_fn, batch_size)

    def step_fn(rng_key, state, params=None):
        return kernel(rng_key, state, *step_args, params)

    return SamplingAlgorithm(init_fn, step_fn)


def dtype_name(dtype: Any) -> str | None:
    """A dtype's name for a kernel's recorded settings (``None`` stays ``None``)."""
    return None if dtype is None else str(jnp.dtype(dtype))


def moves_info(record: Any, ess: jax.Array, resampled: jax.Array, ancestors: jax.Array,
               param_grad: ArrayTree) -> JarzynskiInfo:
    """The :class:`JarzynskiInfo` of a call whose moves left ``record`` (a
    :class:`~numpyro_ebm.kernels.langevin.MovesRecord`)."""
    return JarzynskiInfo(
        ess=ess,
        resampled=resampled,
        ancestors=ancestors,
        log_normalizer_increment=jnp.sum(record.log_normalizer_increments),
        log_weight_increments=record.log_weight_increments,
        num_nonfinite=jnp.sum(record.nonfinite).astype(jnp.int32),
        param_grad=param_grad,
    )


def num_walkers(state: JarzynskiState) -> int:
    return state.log_weights.shape[0]


def resolve_step_size(default: Any, override: Any, dtype: Any) -> jax.Array:
    """The step size of one kernel call: ``override`` when given (checked to be a finite
    number > 0 when it is concrete; a traced one is the caller's responsibility), else
    ``default``; as an array of ``dtype``."""
    if override is not None:
        from numpyro_ebm import _checks

        _checks.check_positive("step_size", override)
    return jnp.asarray(default if override is None else override, dtype)


def uniform_log_weights(n: int, dtype: Any) -> jax.Array:
    return jnp.full((n,), -jnp.log(jnp.asarray(n, dtype)), dtype)


def per_walker_dot(a: ArrayTree, b: ArrayTree) -> jax.Array:
    """:math:`a^i \\cdot b^i` for every walker ``i`` (sum over all non-walker axes)."""
    parts = [
        jnp.sum((la * lb).reshape(la.shape[0], -1), axis=1)
        for la, lb in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    ]
    return sum(parts[1:], parts[0])


def per_walker_finite(tree: ArrayTree) -> jax.Array:
    """True for walkers whose every entry in ``tree`` is finite, shape ``(num_walkers,)``."""
    parts = [
        jnp.all(jnp.isfinite(leaf.reshape(leaf.shape[0], -1)), axis=1)
        for leaf in jax.tree.leaves(tree)
    ]
    out = parts[0]
    for part in parts[1:]:
        out = out & part
    return out


def all_finite(tree: ArrayTree) -> jax.Array:
    """True when every entry of every leaf of ``tree`` is finite."""
    leaves = [jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)]
    out = leaves[0]
    for leaf in leaves[1:]:
        out = out & leaf
    return out


# ---------------------------------------------------------------------------------------
# Jarzynski weights
# ---------------------------------------------------------------------------------------


def ula_transition_energy(
    potential: jax.Array, grad: ArrayTree, x: ArrayTree, y: ArrayTree, step_size: jax.Array
) -> jax.Array:
    """:math:`a(x, y) = U(x) + \\tfrac12 (y - x)\\cdot\\nabla U(x) + \\tfrac h4 |\\nabla U(x)|^2`
    (the paper's :math:`\\alpha`): :math:`-\\log[e^{-U(x)} q(x \\to y)]` for the ULA kernel
    :math:`q`, less the term :math:`|y - x|^2/4h` that cancels between directions."""
    diff = optax.tree.sub(y, x)
    return potential + 0.5 * per_walker_dot(diff, grad) + 0.25 * step_size * per_walker_dot(
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
    """Jarzynski increment :math:`\\Delta A = a_k(X, X') - a_{k+1}(X', X)`.

    ``potential``/``grad`` are :math:`U_k, \\nabla U_k` at ``particles`` :math:`X`;
    ``new_potential``/``new_grad`` are :math:`U_{k+1}, \\nabla U_{k+1}` at
    ``new_particles`` :math:`X'`. Shape ``(num_walkers,)``.
    """
    forward = ula_transition_energy(potential, grad, particles, new_particles, step_size)
    backward = ula_transition_energy(new_potential, new_grad, new_particles, particles, step_size)
    return forward - backward


def apply_move(
    state: JarzynskiState,
    new_particles: ArrayTree,
    new_potential: jax.Array,
    new_grad: ArrayTree,
    params: ArrayTree,
    step_size: jax.Array,
    weighted: bool = True,
) -> tuple[JarzynskiState, jax.Array, jax.Array, jax.Array]:
    """The state after the move ``state.particles -> new_particles`` (with
    :math:`U_{k+1}, \\nabla U_{k+1}` at the new walkers given). ``weighted``: Jarzynski
    weight update, normalisation, and the log-normaliser increment
    :math:`\\log\\sum_i w_i e^{\\Delta A^i}`; otherwise the weights stay as they are
    (plain ULA walkers, increments 0).

    Walkers whose new position, energy, gradient or increment is not finite get weight
    zero (:math:`\\Delta A = -\\infty`) and keep their previous, finite position and
    cached values, so nothing non-finite enters the state; resampling replaces them. If
    no walker keeps a positive weight, the weights are left as they were and the
    log-normaliser estimate becomes NaN (training stops there). Returns the state, the
    increments, the log-normaliser increment and the mask of non-finite walkers.
    """
    finite = per_walker_finite(new_particles) & per_walker_finite(new_grad)
    finite = finite & jnp.isfinite(new_potential)
    if weighted:
        delta = log_weight_increment(
            state.potential, state.grad, state.particles,
            new_potential, new_grad, new_particles, step_size,
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


def _on_every_device(x: jax.Array) -> jax.Array:
    """``x`` copied to every device of the mesh in context (``jax.set_mesh``, which
    ``fit(mesh=)`` sets), so that resampling's cumulative sum runs on whole weights on each
    device: XLA partitions a cumulative sum over a split axis badly (2 s instead of 0.01 s
    at 10^5 walkers on 2 CPU devices). Without a mesh in context: ``x`` itself."""
    if jax.sharding.get_abstract_mesh().empty:
        return x
    return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec())


def resample_if_degenerate(
    rng_key: jax.Array,
    state: JarzynskiState,
    resampling_fn: Callable,
    ess_threshold: float,
    num_groups: int | None = None,
) -> tuple[JarzynskiState, jax.Array, jax.Array, jax.Array]:
    """Resample (``resampling_fn``, a BlackJAX resampling function) when
    :math:`\\mathrm{ESS}/N` < ``ess_threshold``, ESS by BlackJAX's ``log_ess``; the weights
    become equal and ``log_normalizer`` is carried across. With ``num_groups``
    (:func:`resample_groups_if_degenerate`) each of that many contiguous groups of walkers is
    resampled on its own. Returns ``(state, ess, resampled, ancestors)``."""
    if num_groups is not None:
        return resample_groups_if_degenerate(rng_key, state, resampling_fn, ess_threshold, num_groups)
    n = num_walkers(state)
    ess = jnp.exp(log_ess(state.log_weights))
    do_resample = ess < ess_threshold * n

    def resample(_):
        idx = resampling_fn(rng_key, _on_every_device(jnp.exp(state.log_weights)), n)
        new = take_walkers(state, idx)._replace(log_weights=uniform_log_weights(n, state.log_weights.dtype))
        return new, idx.astype(jnp.int32)

    def keep(_):
        return state, jnp.arange(n, dtype=jnp.int32)

    new_state, ancestors = jax.lax.cond(do_resample, resample, keep, None)
    return new_state, ess, do_resample, ancestors


def take_walkers(state: JarzynskiState, idx: jax.Array) -> JarzynskiState:
    """The walkers ``idx`` with their cached energies and gradients (log weights as given)."""
    take = lambda tree: jax.tree.map(lambda leaf: leaf[idx], tree)  # noqa: E731
    return state._replace(particles=take(state.particles), potential=state.potential[idx],
                          grad=take(state.grad), log_weights=state.log_weights[idx])


def check_num_groups(num_groups: int | None, num_walkers_: int | None = None) -> None:
    """``num_groups`` is ``None`` or an integer >= 2 that divides the number of walkers."""
    if num_groups is None:
        return
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 2:
        raise ValueError(f"`resampling_groups` must be None or an integer >= 2, got {num_groups!r}")
    if num_walkers_ is not None and num_walkers_ % num_groups:
        raise ValueError(f"`resampling_groups` ({num_groups}) must divide the number of walkers "
                         f"({num_walkers_})")


def check_heldout_groups(heldout_groups: int, num_groups: int | None) -> int:
    """``heldout_groups`` is an integer in ``[0, num_groups)``, and 0 without groups."""
    if isinstance(heldout_groups, bool) or not isinstance(heldout_groups, int) or heldout_groups < 0:
        raise ValueError(f"`heldout_groups` must be a non-negative integer, got {heldout_groups!r}")
    if heldout_groups and (num_groups is None or heldout_groups >= num_groups):
        raise ValueError(f"`heldout_groups` ({heldout_groups}) needs `resampling_groups` greater than it, "
                         f"got {num_groups}")
    return heldout_groups


def gradient_weights(log_weights: jax.Array, num_groups: int | None = None, heldout_groups: int = 0) -> jax.Array:
    r"""The normalised weights with which the walkers enter the parameter gradient: all of
    :math:`w = \mathrm{softmax}(A)`, or with ``heldout_groups`` :math:`H` (of ``num_groups``
    :math:`G` contiguous islands) those of the first :math:`G - H` groups, renormalised. The
    held-out groups move and are weighted like the others but never steer :math:`\theta`, so
    their Jarzynski estimate of :math:`\log Z` carries no feedback bias
    (:func:`numpyro_ebm.estimators.heldout_log_normalizer`)."""
    weights = jnp.exp(log_weights)
    if not heldout_groups:
        return weights
    n = weights.shape[0]
    keep = jnp.arange(n) < (n // num_groups) * (num_groups - heldout_groups)
    weights = jnp.where(keep, weights, 0.0)
    return weights / jnp.sum(weights)


def resample_groups_if_degenerate(
    rng_key: jax.Array,
    state: JarzynskiState,
    resampling_fn: Callable,
    ess_threshold: float,
    num_groups: int,
) -> tuple[JarzynskiState, jax.Array, jax.Array, jax.Array]:
    r"""Island resampling: the walkers form ``num_groups`` contiguous groups :math:`g` of
    :math:`M = N/G`; a group whose own ESS falls below ``ess_threshold`` :math:`\cdot M` is
    resampled within itself (``resampling_fn`` on the weights normalised in the group, one
    key per group), and its walkers then share its total weight
    :math:`W_g = \sum_{i\in g} w_i` equally, :math:`A^i = \log(W_g / M)`. The groups' totals,
    hence each group's own Jarzynski estimate :math:`\log Z + \log(G W_g)`, are unchanged by
    a resampling: the groups stay independent replicates of the run (their lineages never
    mix), so the spread of their estimates is an honest standard error
    (:func:`numpyro_ebm.estimators.group_log_normalizers` with ``resampled=None``). Every
    estimate :math:`\sum_i w_i f(X^i)` stays unbiased in the same sense as with one group.
    Returns ``(state, ess, resampled, ancestors)``: ``ess`` of all walkers, ``resampled``
    true when any group was."""
    n = num_walkers(state)
    check_num_groups(num_groups, n)
    m = n // num_groups
    log_w = state.log_weights.reshape(num_groups, m)
    group_total = logsumexp(log_w, axis=1)
    local = log_w - group_total[:, None]
    do_group = jnp.exp(jax.vmap(log_ess)(local)) < ess_threshold * m
    ess = jnp.exp(log_ess(state.log_weights))

    def resample(_):
        keys = jax.random.split(rng_key, num_groups)
        weights = _on_every_device(jnp.exp(local))
        idx = jax.vmap(resampling_fn, (0, 0, None))(keys, weights, m).astype(jnp.int32)
        idx = jnp.where(do_group[:, None], idx, jnp.arange(m, dtype=jnp.int32)[None])
        ancestors = (idx + m * jnp.arange(num_groups, dtype=jnp.int32)[:, None]).reshape(n)
        log_weights = jnp.where(do_group[:, None], (group_total - jnp.log(m))[:, None], log_w).reshape(n)
        return take_walkers(state, ancestors)._replace(log_weights=log_weights), ancestors

    def keep(_):
        return state, jnp.arange(n, dtype=jnp.int32)

    resampled = jnp.any(do_group)
    new_state, ancestors = jax.lax.cond(resampled, resample, keep, None)
    return new_state, ess, resampled, ancestors
