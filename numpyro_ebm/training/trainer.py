r"""The trainer: a pure, jittable training step over a named state (NumPyro SVI's shape).

``build_trainer(potential_fn, optimizer, kernel) -> Trainer(init, step)``. One step
:math:`k`, ``step(rng_key, state, batch) -> (state, info)``:

1. the cross-entropy gradient at :math:`\theta_k`, data (mini)batch term minus the walker
   term, :math:`D_k = E_{\text{batch}}[\nabla_\theta U_k] - \sum_i w_i \nabla_\theta U_k(X^i)`;
   the walker term was computed by the previous kernel call from the same evaluation that
   gave :math:`U_k, \nabla_x U_k` at the walkers (``state.walker_grad``);
2. the optax update :math:`\theta_{k+1} = \theta_k + \text{optimizer}(D_k)`;
3. the kernel call: (CD: restart from the batch), ULA move under :math:`\theta_k`, one energy
   evaluation at :math:`\theta_{k+1}` (value, :math:`\nabla_x` and the next walker term),
   weight update and resampling for weighted kernels;
4. optional step-size adaptation from the move's acceptance proxy, or from MALA's acceptance
   of a probe proposal at :math:`\theta_{k+1}` every ``probe_every`` iterations
   (:mod:`numpyro_ebm.step_size`).

One evaluation of the energy at the batch and one at the walkers per step, for every
kernel. ``rng_key`` is the iteration's key: it is split in three, the first part left to the
data pipeline (:func:`numpyro_ebm.training.loop.run` draws minibatch orders from it), the
second for the kernel, the third for the kernel's restart (CD).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.scipy.special import logsumexp

from numpyro_ebm import _checks
from numpyro_ebm.estimators import ce_value_and_grad
from numpyro_ebm.kernels.base import JarzynskiState, PotentialFn, WalkerKernel, gradient_weights
from numpyro_ebm.kernels.evaluation import weighted_param_grad
from numpyro_ebm.kernels.jarzynski_ula import scaled
from numpyro_ebm.step_size import StepSizeAdaptation, StepSizeState, acceptance_proxy, probe_acceptance
from numpyro_ebm.training.penalties import EnergyPenalty, penalised_value_and_grad

__all__ = ["TrainState", "TrainInfo", "Trainer", "build_trainer", "missing_like"]


class TrainState(NamedTuple):
    """Everything a training run carries from one iteration to the next.

    params
        :math:`\\theta_k`.
    opt_state
        The optax state.
    walkers
        The walkers' :class:`~numpyro_ebm.kernels.base.JarzynskiState`, weighted for
        :math:`\\theta_k`.
    step_size_state
        The step-size adaptation state, or ``None`` (fixed step size).
    walker_grad
        :math:`\\sum_i w_i \\nabla_\\theta U_{\\theta_k}(X^i)`, the walker term of the next
        gradient (from the last kernel call).
    iteration
        :math:`k`, the number of steps taken (int32 scalar).
    lineage
        For each walker, the index of its ancestor at the start of the current lineage
        window (``lineage_window`` iterations; reset to ``arange(N)`` at each window start).
    num_lineages
        The number of distinct values in ``lineage``.
    """

    params: Any
    opt_state: Any
    walkers: JarzynskiState
    step_size_state: StepSizeState | None
    walker_grad: Any
    iteration: jax.Array
    lineage: jax.Array | None = None
    num_lineages: jax.Array | None = None


class TrainInfo(NamedTuple):
    """What one step did. Fields marked "weighted" are ``None`` for unweighted kernels.

    grad_norm, data_energy
        Global norm of :math:`D_k`; mean :math:`U_{\\theta_k}` over the batch.
    log_normalizer
        (weighted) :math:`\\widehat{\\log Z_{\\theta_k}/Z_{\\theta_0}}` at the start of the step.
    cross_entropy
        (weighted, with ``log_z0``) the cross-entropy estimate at :math:`\\theta_k`.
    max_abs_potential
        :math:`\\max_i |U_{\\theta_k}(X^i)|` over live walkers, before the move.
    step_size, num_nonfinite
        The move's :math:`h`; walkers with a non-finite evaluation in the move.
    log_weights_before_resampling
        (weighted) normalised log weights after the move, before resampling.
    acceptance
        With step-size adaptation: the move's weighted acceptance proxy.
    probe_acceptance
        With a probing step-size adaptation (``probe_every=m``): MALA's weighted acceptance
        of a probe proposal from the walkers at :math:`\\theta_{k+1}`, with the step size the
        next move uses, at the iterations :math:`k \\equiv 0 \\pmod m`; NaN at the others.
    extra
        ``trace_fn(params, walkers)`` at :math:`\\theta_k`, when given.
    num_lineages
        (weighted) distinct ancestors, at the start of the lineage window, of the walkers
        after the step: resampling from a few surviving lineages shows here long before the
        ESS (reset by each resampling) does.
    energy_penalty
        With an energy penalty: its value at :math:`\\theta_k` (batch and weighted walkers).
    kernel_info
        The kernel's own info (ESS, resampling, ancestors, ...).
    """

    grad_norm: jax.Array
    data_energy: jax.Array
    log_normalizer: jax.Array | None
    cross_entropy: jax.Array | None
    max_abs_potential: jax.Array
    step_size: jax.Array
    num_nonfinite: jax.Array
    log_weights_before_resampling: jax.Array | None
    acceptance: jax.Array | None
    probe_acceptance: jax.Array | None
    extra: Any
    num_lineages: jax.Array | None
    energy_penalty: jax.Array | None
    kernel_info: Any


class Trainer(NamedTuple):
    """``init(params, particles) -> TrainState``; ``step(rng_key, state, batch) ->
    (TrainState, TrainInfo)`` (pure, jittable); and what it was built from: the walker
    ``kernel``, the ``optimizer`` and the ``potential_fn``."""

    init: Callable
    step: Callable
    kernel: WalkerKernel
    optimizer: Any = None
    potential_fn: Any = None


def _check(potential_fn, optimizer, kernel, step_size_adaptation):
    if not callable(potential_fn):
        raise TypeError("`potential_fn` must be callable: potential_fn(params, x) -> scalar")
    if not (hasattr(optimizer, "init") and hasattr(optimizer, "update")):
        raise TypeError("`optimizer` must be an optax.GradientTransformation (init/update)")
    if not isinstance(kernel, WalkerKernel):
        raise TypeError(
            "`kernel` must be a WalkerKernel, e.g. numpyro_ebm.kernels.jarzynski_ula."
            f"walker_kernel(step_size), got {type(kernel).__name__}"
        )
    if step_size_adaptation is not None:
        if not isinstance(step_size_adaptation, StepSizeAdaptation):
            raise TypeError("`step_size_adaptation` must come from numpyro_ebm.step_size."
                            "step_size_adaptation(...)")
        if not kernel.weighted:
            raise ValueError("`step_size_adaptation` needs Jarzynski weights; the kernel "
                             f"{kernel.name!r} is unweighted")


def _move_weights(kernel_info, moved_log_weights):
    """``(before resampling, at the start of the last move)`` normalised log weights."""
    if hasattr(kernel_info, "log_weights_before_resampling"):  # adaptive schedule
        return kernel_info.log_weights_before_resampling, kernel_info.log_weights_before_last_substep
    unnormalised = moved_log_weights + kernel_info.log_weight_increments
    return unnormalised - logsumexp(unnormalised), moved_log_weights


def _probe_and_adapt(adaptation, potential_fn, rng_key, walkers, step_state, iteration, batch_size):
    """At iterations :math:`k \\equiv 0 \\pmod m`: :func:`~numpyro_ebm.step_size.probe_acceptance`
    at the new walkers with the next move's step size, and the adaptation's update from it;
    at the others (no evaluation): NaN and the state unchanged."""
    def probe(step_state):
        acceptance = probe_acceptance(rng_key, potential_fn, walkers, step_state.step_size.astype(
            walkers.potential.dtype), batch_size)
        return acceptance, adaptation.update(step_state, acceptance.astype(step_state.step_size.dtype))

    def skip(step_state):
        return jnp.full((), jnp.nan, walkers.potential.dtype), step_state

    return jax.lax.cond(iteration % adaptation.probe_every == 0, probe, skip, step_state)


def build_trainer(
    potential_fn: PotentialFn,
    optimizer: optax.GradientTransformation,
    kernel: WalkerKernel,
    *,
    log_z0: float | None = None,
    step_size_adaptation: StepSizeAdaptation | None = None,
    trace_fn: Callable[[Any, JarzynskiState], Any] | None = None,
    constrain_walkers: Callable[[JarzynskiState], JarzynskiState] | None = None,
    lineage_window: int = 100,
    energy_penalty: EnergyPenalty | None = None,
    trace_every: int = 1,
) -> Trainer:
    """Build the training step for ``potential_fn`` (the energy of ONE sample).

    ``kernel`` is a :class:`~numpyro_ebm.kernels.base.WalkerKernel` (e.g.
    ``kernels.jarzynski_ula.walker_kernel(0.1)``, ``kernels.ula.walker_kernel(0.1)`` for PCD,
    ``kernels.cd.walker_kernel(0.1)``). ``log_z0`` (:math:`\\log Z_{\\theta_0}`) adds the
    cross-entropy estimate to the info; ``step_size_adaptation``
    (:func:`numpyro_ebm.step_size.step_size_adaptation`) tunes :math:`h` from MALA's acceptance
    of a probe proposal every ``probe_every`` iterations, or from the weighted acceptance proxy
    at every one; ``trace_fn(params, walkers)`` is recorded in ``info.extra`` at the
    iterations :math:`k` with :math:`k \\bmod` ``trace_every`` :math:`= 0` and is not evaluated
    at the others, whose rows read as missing (:func:`missing_like`: NaN, the smallest integer,
    ``False``), for a ``trace_fn`` that costs as much as the step (e.g. a classifier);
    ``constrain_walkers`` is applied to the walker state after each kernel call (sharding
    constraints, :mod:`numpyro_ebm.sharding`).
    """
    _check(potential_fn, optimizer, kernel, step_size_adaptation)
    lineage_window = _checks.check_int_at_least("lineage_window", lineage_window, 1)
    trace_every = _checks.check_int_at_least("trace_every", trace_every, 1)
    if energy_penalty is not None and not isinstance(energy_penalty, EnergyPenalty):
        raise TypeError("`energy_penalty` must be an EnergyPenalty, e.g. "
                        "numpyro_ebm.training.penalties.squared_energy(0.01)")
    kernel_extra = {} if energy_penalty is None else {"param_grad_factor": energy_penalty.walker_factor}
    constrain = constrain_walkers or (lambda st: st)

    def init(params, particles) -> TrainState:
        walkers = kernel.init(potential_fn, particles, params)
        step_state = None
        if step_size_adaptation is not None:
            step_state = step_size_adaptation.init(jnp.asarray(kernel.step_size, walkers.potential.dtype))
        factor = None if energy_penalty is None else energy_penalty.walker_factor
        walker_grad = _initial_walker_grad(potential_fn, kernel, params, walkers, factor)
        n = walkers.log_weights.shape[0]
        return TrainState(params, optimizer.init(params), walkers, step_state, walker_grad,
                          jnp.asarray(0, jnp.int32), jnp.arange(n, dtype=jnp.int32),
                          jnp.asarray(n, jnp.int32))

    def step(rng_key, state: TrainState, batch) -> tuple[TrainState, TrainInfo]:
        params, walkers = state.params, state.walkers
        _, move_key, restart_key = jax.random.split(rng_key, 3)
        penalty = None
        if energy_penalty is None:
            data_energy, grads = ce_value_and_grad(potential_fn, params, batch, walkers,
                                                   state.walker_grad)
        else:
            data_energy, penalty, grads = penalised_value_and_grad(
                energy_penalty, potential_fn, params, batch, state.walker_grad)
            penalty = penalty + energy_penalty.walker_value(walkers.potential,
                                                            _gradient_weights(kernel, walkers))
        log_normalizer = cross_entropy = None
        if kernel.weighted:
            log_normalizer = walkers.log_normalizer
            if log_z0 is not None:
                cross_entropy = data_energy + log_z0 + walkers.log_normalizer
        extra = None if trace_fn is None else _traced(trace_fn, trace_every, params, walkers,
                                                      state.iteration)
        updates, opt_state = optimizer.update(grads, state.opt_state, params)
        new_params = optax.apply_updates(params, updates)
        if kernel.restart is not None:
            walkers = constrain(kernel.restart(potential_fn, restart_key, walkers, new_params, batch,
                                               state.iteration))
        moved_log_weights = walkers.log_weights
        step_state = state.step_size_state
        h = jnp.asarray(kernel.step_size if step_state is None else step_state.step_size,
                        walkers.potential.dtype)
        live = jnp.isfinite(walkers.log_weights)
        max_abs_potential = jnp.max(jnp.where(live, jnp.abs(walkers.potential), 0.0))
        walkers, kernel_info = kernel.step(potential_fn, move_key, walkers, new_params, h, **kernel_extra)
        walkers = constrain(walkers)
        pre = acceptance = probe = None
        if kernel.weighted:
            pre, start = _move_weights(kernel_info, moved_log_weights)
            if step_state is not None:
                acceptance = acceptance_proxy(start, kernel_info.log_weight_increments)
                if step_size_adaptation.probe_every is None:
                    step_state = step_size_adaptation.update(step_state, acceptance)
                else:
                    probe, step_state = _probe_and_adapt(
                        step_size_adaptation, potential_fn, jax.random.fold_in(move_key, 1), walkers,
                        step_state, state.iteration, kernel.config.get("walker_batch_size"))
        lineage, num_lineages = _follow_lineages(state, kernel_info.ancestors, kernel_info.resampled,
                                                 lineage_window)
        info = TrainInfo(optax.tree.norm(grads), data_energy, log_normalizer, cross_entropy,
                         max_abs_potential, h, kernel_info.num_nonfinite, pre, acceptance, probe, extra,
                         num_lineages if kernel.weighted else None, penalty,
                         kernel_info._replace(param_grad=None))
        new_state = TrainState(new_params, opt_state, walkers, step_state, kernel_info.param_grad,
                               state.iteration + 1, lineage, num_lineages)
        return new_state, info

    return Trainer(init, step, kernel, optimizer, potential_fn)


def missing_like(shapes):
    """Arrays shaped like ``shapes`` (a pytree of ``jax.ShapeDtypeStruct``) that read as
    missing: NaN (floating), the smallest value (integer), ``False`` (boolean)."""
    def fill(leaf):
        if jnp.issubdtype(leaf.dtype, jnp.inexact):
            value = jnp.nan
        elif jnp.issubdtype(leaf.dtype, jnp.integer):
            value = jnp.iinfo(leaf.dtype).min
        else:
            value = False
        return jnp.full(leaf.shape, value, leaf.dtype)

    return jax.tree.map(fill, shapes)


def _traced(trace_fn, every: int, params, walkers: JarzynskiState, iteration):
    """``trace_fn(params, walkers)`` when ``iteration % every == 0``, else missing values
    (a ``lax.cond``: the other iterations do not evaluate it)."""
    if every == 1:
        return trace_fn(params, walkers)
    shapes = jax.eval_shape(trace_fn, params, walkers)
    return jax.lax.cond(iteration % every == 0, lambda: trace_fn(params, walkers),
                        lambda: missing_like(shapes))


def _follow_lineages(state: TrainState, ancestors: jax.Array, resampled: jax.Array, window: int):
    """Lineage ids after the step (reset at each window start) and how many are distinct;
    recounted only when the walkers were resampled (otherwise nothing changed)."""
    n = ancestors.shape[0]
    reset = state.iteration % window == 0
    lineage = jnp.where(reset, jnp.arange(n, dtype=jnp.int32), state.lineage)
    count = jnp.where(reset, jnp.asarray(n, jnp.int32), state.num_lineages)

    def follow(_):
        followed = lineage[ancestors]
        return followed, jnp.sum(jnp.zeros(n, jnp.int32).at[followed].set(1), dtype=jnp.int32)

    return jax.lax.cond(resampled, follow, lambda _: (lineage, count), None)


def _gradient_weights(kernel, walkers):
    """The walkers' weights in the parameter gradient (held-out islands left out,
    :func:`numpyro_ebm.kernels.base.gradient_weights`)."""
    return gradient_weights(walkers.log_weights, kernel.config.get("resampling_groups"),
                            kernel.config.get("heldout_groups", 0))


def _initial_walker_grad(potential_fn, kernel, params, walkers, factor=None):
    batch_size = kernel.config.get("walker_batch_size")
    coefficients = scaled(_gradient_weights(kernel, walkers), walkers.potential, factor)
    return jax.jit(weighted_param_grad, static_argnums=(0, 4))(
        potential_fn, params, walkers.particles, coefficients, batch_size
    )
