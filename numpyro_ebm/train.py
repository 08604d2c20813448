r"""Training an EBM by its cross-entropy: Jarzynski, PCD and CD on one code path.

One iteration :math:`k` (everything inside one jitted ``lax.scan`` over a chunk of
iterations):

1. the cross-entropy gradient at :math:`\theta_k`, data (mini)batch term minus the walkers'
   weighted term, :math:`D_k = E_{\text{data}}[\nabla_\theta U_k] - \sum_i w_i \nabla_\theta U_k(X^i)`;
   the walker term was computed by the previous kernel call, from the same evaluation that
   gave :math:`U_k, \nabla_x U_k` at the walkers (one evaluation per walker per iteration);
2. optax update :math:`\theta_{k+1} = \theta_k + \text{optimizer}(D_k)`;
3. kernel call: ULA move under :math:`\theta_k`, one energy evaluation at
   :math:`\theta_{k+1}` (value, :math:`\nabla_x` and the walker term of :math:`D_{k+1}`),
   Jarzynski weight update, resampling when the ESS is low;
4. a trace row.

Everything recorded per iteration is a cheap reduction over the walkers, so it stays inside
the jitted scan. Walker snapshots (``snapshot_every``) are taken inside the same scan, once
per block of ``snapshot_every`` iterations. Host code (progress bar, the weight-degeneracy
check of :func:`fit` and, when asked for, the Pareto :math:`\hat k` callback) runs only
between chunks and after the run.

The methods differ only in step 3:

* ``"jarzynski"``: weighted walkers (:mod:`numpyro_ebm.jarzynski_ula`);
* ``"pcd"``: the same walkers and moves, weights kept equal (persistent contrastive
  divergence);
* ``"cd"``: as PCD, but the walkers restart from random data points every
  ``cd_restart_every`` iterations (contrastive divergence).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from blackjax.smc import resampling
from jax.scipy.special import logsumexp

from numpyro_ebm import _checks
from numpyro_ebm.estimators import ce_value_and_grad
from numpyro_ebm.jarzynski_ula import (
    JarzynskiState,
    PotentialFn,
    _build_kernel,
    build_adaptive_kernel,
    init,
    weighted_param_grad,
)
from numpyro_ebm.schedule import acceptance_proxy, step_size_adaptation

__all__ = [
    "fit",
    "FitResult",
    "METHODS",
    "WeightDegeneracyWarning",
    "EnergyDivergenceWarning",
    "NonFiniteError",
]

METHODS = ("jarzynski", "pcd", "cd")


class WeightDegeneracyWarning(RuntimeWarning):
    """Issued by :func:`fit` (once per run) when the Jarzynski weights stay degenerate."""


class EnergyDivergenceWarning(RuntimeWarning):
    """Issued by :func:`fit` (once per run) when the energies grow without bound."""


class NonFiniteError(FloatingPointError):
    """Raised by :func:`fit` when training cannot go on; ``result`` holds the last good
    state (a :class:`FitResult`)."""

    def __init__(self, message: str, result: FitResult):
        super().__init__(message)
        self.result = result


class FitResult(NamedTuple):
    """What :func:`fit` returns.

    params
        :math:`\\theta_K` after ``num_iterations`` iterations.
    state
        The final :class:`~numpyro_ebm.jarzynski_ula.JarzynskiState` (walkers weighted for
        :math:`\\theta_K`; equal weights for PCD and CD).
    trace
        ``dict`` of NumPy arrays with the iteration axis first. Row ``k`` holds, at
        :math:`\\theta_k` (start of iteration ``k``): ``grad_norm`` (global norm of
        :math:`D_k`), ``data_energy`` (mean :math:`U_{\\theta_k}` over the batch) and, for
        ``"jarzynski"``, ``log_normalizer`` (:math:`\\widehat{\\log Z_{\\theta_k}/Z_{\\theta_0}}`)
        and ``cross_entropy`` (when ``log_z0`` is given); from the move
        :math:`\\theta_k \\to \\theta_{k+1}`, before resampling (``"jarzynski"`` only):
        ``ess`` (:math:`(\\sum_i w_i)^2 / \\sum_i w_i^2`), ``normalized_ess``
        (``ess / num_walkers``), ``max_weight`` (largest normalised weight) and
        ``resampled``; ``step_size`` (the ULA step size :math:`h` of the move, every
        method); with ``schedule="adaptive"``, ``num_substeps``; with
        ``adapt_step_size``, ``acceptance`` (the weighted acceptance proxy of the move).
        ``extra`` holds what ``trace_fn(params, state)`` returned at :math:`\\theta_k`, when
        given. With ``snapshot_every``, ``snapshots`` is a dict with the snapshot axis
        first: ``iteration`` (the iterations :math:`k = 0, m, 2m, \\dots`), ``particles``
        and, for ``"jarzynski"``, ``log_weights`` (the walkers and normalised log weights
        used by the gradient at :math:`\\theta_k`), ``log_weights_before_resampling``
        (after the move :math:`\\theta_k \\to \\theta_{k+1}`, the weights ``ess[k]``
        describes) and ``pareto_k`` (when ``khat_fn`` is given). Fields that do not apply
        to a method are absent.
    opt_state
        The optimiser state after the last update.
    method
        The training method.
    """

    params: Any
    state: JarzynskiState
    trace: dict[str, Any]
    opt_state: Any
    method: str


def _take(tree: Any, idx: jax.Array) -> Any:
    return jax.tree.map(lambda leaf: leaf[idx], tree)


def _validate(
    potential_fn, params, data, optimizer, method, num_walkers, step_size, num_iterations,
    batch_size, log_z0, ess_threshold, num_steps, cd_restart_every, chunk_size,
) -> int:
    if method not in METHODS:
        raise ValueError(f"`method` must be one of {METHODS}, got {method!r}")
    if not (hasattr(optimizer, "init") and hasattr(optimizer, "update")):
        raise TypeError("`optimizer` must be an optax.GradientTransformation (init/update)")
    if not callable(potential_fn):
        raise TypeError("`potential_fn` must be callable: potential_fn(params, x) -> scalar")
    _checks.check_int_at_least("num_walkers", num_walkers, 2)
    _checks.check_int_at_least("num_iterations", num_iterations, 1)
    _checks.check_int_at_least("num_steps", num_steps, 1)
    _checks.check_int_at_least("cd_restart_every", cd_restart_every, 1)
    if chunk_size is not None:
        _checks.check_int_at_least("chunk_size", chunk_size, 1)
    _checks.check_positive("step_size", step_size)
    _checks.check_fraction("ess_threshold", ess_threshold)
    num_data = _checks.leading_size("data", data)
    _checks.check_finite_tree("data", data)
    if batch_size is not None:
        _checks.check_int_at_least("batch_size", batch_size, 1)
        if batch_size > num_data:
            raise ValueError(
                f"`batch_size` ({batch_size}) exceeds the number of data points ({num_data})"
            )
    if log_z0 is not None and not math.isfinite(float(log_z0)):
        raise ValueError(f"`log_z0` must be finite, got {log_z0}")
    _checks.check_finite_tree("params", params)
    _checks.check_scalar_potential(potential_fn, params, _take(data, 0))
    return num_data


def fit(
    potential_fn: PotentialFn,
    params: Any,
    data: Any,
    *,
    optimizer: optax.GradientTransformation,
    method: str = "jarzynski",
    num_walkers: int,
    step_size: float,
    num_iterations: int,
    rng_key: jax.Array,
    init_particles: Any = None,
    batch_size: int | None = None,
    log_z0: float | None = None,
    resampling_fn: Callable = resampling.systematic,
    ess_threshold: float = 0.5,
    num_steps: int = 1,
    cd_restart_every: int = 1,
    trace_fn: Callable[[Any, JarzynskiState], Any] | None = None,
    chunk_size: int | None = None,
    progress: bool = False,
    snapshot_every: int | None = None,
    khat_fn: Callable[[np.ndarray], float] | None = None,
    warn_ess_floor: float | None = 0.05,
    warn_khat: float | None = 0.7,
    warn_patience: int = 20,
    schedule: str = "fixed",
    target_ess: float = 0.5,
    max_substeps: int = 10,
    adapt_step_size: bool = False,
    target_acceptance: float = 0.7,
    divergence_factor: float | None = 1e4,
    checkpoint_dir: str | None = None,
    checkpoint_every: int | None = None,
    resume: bool = False,
    walker_batch_size: int | None = None,
    mesh: Any = None,
    noise_dtype: Any = None,
) -> FitResult:
    """Train ``potential_fn`` on ``data`` by its cross-entropy.

    Parameters
    ----------
    potential_fn
        ``potential_fn(params, x) -> scalar``: energy :math:`U_\\theta(x)` of one sample.
    params
        Initial parameters :math:`\\theta_0` (a pytree).
    data
        Training data with the sample axis first (an array or a pytree of arrays).
    optimizer
        An ``optax.GradientTransformation``; it is fed the cross-entropy gradient.
    method
        ``"jarzynski"`` (weighted walkers), ``"pcd"`` or ``"cd"``.
    num_walkers
        Number of walkers :math:`N \\ge 2`.
    step_size
        ULA step size :math:`h > 0`.
    num_iterations
        Number of training iterations.
    rng_key
        PRNG key. It is split into an initialisation key and a loop key; iteration ``k``
        uses ``jax.random.fold_in(loop_key, k)``, so results do not depend on
        ``chunk_size``.
    init_particles
        Initial walkers, shape ``(num_walkers, *data.shape[1:])``, or a callable
        ``(rng_key, num_walkers) -> particles``. For ``"jarzynski"`` they must be draws
        from the initial model :math:`\\rho_{\\theta_0}` (the weights start equal). Default:
        standard normal draws for ``"jarzynski"``/``"pcd"`` (right only when
        :math:`\\rho_{\\theta_0}` is close to :math:`N(0, I)`), random data points for
        ``"cd"``.
    batch_size
        Data minibatch size per iteration (``None``: the whole data set).
    log_z0
        :math:`\\log Z_{\\theta_0}`; when given, the trace holds the cross-entropy estimate.
    resampling_fn, ess_threshold, num_steps
        As in :func:`numpyro_ebm.jarzynski_ula.build_kernel`.
    cd_restart_every
        For ``"cd"``: restart the walkers from data every this many iterations.
    trace_fn
        Optional ``trace_fn(params, state) -> pytree`` recorded per iteration (at
        :math:`\\theta_k`) under ``trace["extra"]``.
    chunk_size
        Iterations per jitted ``lax.scan`` chunk (default ``min(num_iterations, 250)``);
        progress is reported between chunks.
    progress
        Show a progress bar (tqdm), updated per chunk with the chunk's smallest normalised
        ESS (and the last cross-entropy estimate).
    snapshot_every
        Record the walkers every this many iterations :math:`m` (at :math:`k = 0, m, 2m,
        \\dots`), inside the jitted loop, into ``trace["snapshots"]``; a chunk then holds a
        whole number of snapshot intervals. Host memory grows as
        ``num_iterations / m`` copies of the walkers. ``None``: no snapshots.
    khat_fn
        ``khat_fn(log_weights) -> float``, a Pareto :math:`\\hat k` of one vector of
        normalised log weights (e.g. :func:`numpyro_ebm.diagnostics.pareto_khat`). Called on
        the host, after the run, on each snapshot's ``log_weights_before_resampling``
        ("jarzynski" with ``snapshot_every`` only); the values go to
        ``trace["snapshots"]["pareto_k"]`` and into the degeneracy check. The core does
        not depend on ArviZ, hence the callback.
    warn_ess_floor, warn_khat, warn_patience
        After a ``"jarzynski"`` run, one :class:`WeightDegeneracyWarning` is issued when
        the normalised ESS stays below ``warn_ess_floor`` for at least ``warn_patience``
        consecutive iterations, or when :math:`\\hat k` stays above ``warn_khat`` on
        consecutive snapshots spanning at least ``warn_patience`` iterations (at least one
        snapshot), or when the walkers were resampled in at least half of some
        ``max(5 * warn_patience, 100)`` consecutive iterations (each resampling resets the
        ESS, so a run can degenerate without the ESS staying low). The message gives the
        iteration range and what to change. ``warn_ess_floor=None`` switches the ESS and
        resampling-rate checks off, ``warn_khat=None`` the :math:`\\hat k` check.
    schedule, target_ess, max_substeps
        ``"fixed"``: one kernel call per iteration. ``"adaptive"`` (``"jarzynski"`` only):
        the move :math:`\\theta_k \\to \\theta_{k+1}` is split into sub-steps that keep the
        conditional ESS at ``target_ess`` (in (0, 1)), at most ``max_substeps`` (>= 1) of
        them (:func:`numpyro_ebm.jarzynski_ula.build_adaptive_kernel`); the trace records
        ``num_substeps``.
    adapt_step_size, target_acceptance
        Adapt :math:`h` by dual averaging so that the weighted acceptance proxy
        :math:`\\sum_i w_i \\min(1, e^{\\Delta A^i - c})` (:mod:`numpyro_ebm.schedule`) reaches
        ``target_acceptance`` (``"jarzynski"`` only; ``step_size`` is the starting value).
        The trace records ``step_size`` and ``acceptance``. Off by default.
    divergence_factor
        One :class:`EnergyDivergenceWarning` is issued when the largest walker energy
        :math:`\\max_i |U_{\\theta_k}(X^i)|` or the mean data energy exceeds this factor
        times its size at the start (at least 1). ``None`` switches the check off.
    checkpoint_dir, checkpoint_every, resume
        With ``checkpoint_dir``, an Orbax checkpoint (parameters, optimiser state, walker
        state, step-size state, trace, and a record of the run and its PRNG key) is
        written every ``checkpoint_every`` iterations (default: every chunk) and at the
        end; the last three are kept. ``resume=True`` continues from the latest one: the
        result equals that of an uninterrupted run. A checkpoint of another run (other
        method, walker count, shapes or key) or an unreadable one raises ``ValueError``
        and is left as it is. With ``snapshot_every``, ``checkpoint_every`` must be a
        multiple of it.
    walker_batch_size
        Evaluate the walkers in chunks of this many (``lax.map``/``lax.scan``), so that the
        memory of an evaluation is that of one chunk (e.g. 10^6 walkers). The parameter
        gradient at the walkers is then a second chunked pass instead of sharing the
        forward pass of the move (see "One evaluation per walker" below). ``None``
        (default): all walkers at once.
    mesh
        A :class:`jax.sharding.Mesh`: the walkers are split over its devices
        (:mod:`numpyro_ebm.sharding`), the parameters and optimiser state are replicated,
        and the data are split too when their number is a multiple of the mesh size. The
        weights, ESS, log normaliser and resampling stay global; with the same key the
        result equals the single-device one up to floating-point reduction order.
        ``num_walkers`` must be a multiple of ``mesh.size``.
    noise_dtype
        dtype of the ULA noise (:func:`numpyro_ebm.jarzynski_ula.ula_proposal`); default
        the walkers' dtype. ``jnp.float32`` with float64 walkers draws the noise at about
        half the cost; the weights remain exact for the moves made.

    One evaluation per walker
    -------------------------
    Iteration :math:`k` evaluates the energy once at the data (mini)batch (forward and
    backward in :math:`\\theta`) and once at the walkers. The walkers' evaluation at
    :math:`(\\theta_{k+1}, X_{k+1})` made by the kernel for the weight update and the next
    ULA move also gives the walker term :math:`\\sum_i w_i \\nabla_\\theta U_{k+1}(X^i)` of
    the next gradient :math:`D_{k+1}`: one forward pass and one backward pass with unit
    cotangents (which is all for PCD and CD, whose weights are equal), plus, for
    Jarzynski, a second backward pass from the same forward pass with the new weights as
    cotangents (the weights depend on :math:`\\nabla_x U_{k+1}`, so they exist only after
    the first backward pass). The result is the same gradient as
    :func:`numpyro_ebm.estimators.ce_grad` at the new state.

    Raises
    ------
    NonFiniteError
        When every walker's energy or gradient became non-finite, or the gradient did, at
        some iteration ``k``. The message names ``k``; ``error.result`` is the
        :class:`FitResult` at the start of iteration ``k`` (the last good parameters and
        walkers, the trace up to ``k``). Walkers that become non-finite one by one only
        lose their weight (``trace["num_nonfinite"]``) and are replaced at resampling.
    """
    num_data = _validate(
        potential_fn, params, data, optimizer, method, num_walkers, step_size, num_iterations,
        batch_size, log_z0, ess_threshold, num_steps, cd_restart_every, chunk_size,
    )
    if snapshot_every is not None:
        _checks.check_int_at_least("snapshot_every", snapshot_every, 1)
    if walker_batch_size is not None:
        _checks.check_int_at_least("walker_batch_size", walker_batch_size, 1)
    if noise_dtype is not None:
        _checks.check_float_dtype("noise_dtype", noise_dtype)
    if mesh is not None:
        from numpyro_ebm.sharding import check_mesh

        check_mesh(mesh, num_walkers)
    if khat_fn is not None and not callable(khat_fn):
        raise TypeError("`khat_fn` must be callable: khat_fn(log_weights) -> float")
    if warn_ess_floor is not None:
        _checks.check_fraction("warn_ess_floor", warn_ess_floor)
    if warn_khat is not None and not math.isfinite(float(warn_khat)):
        raise ValueError(f"`warn_khat` must be finite, got {warn_khat}")
    _checks.check_int_at_least("warn_patience", warn_patience, 1)
    weighted = method == "jarzynski"
    if schedule not in ("fixed", "adaptive"):
        raise ValueError(f"`schedule` must be 'fixed' or 'adaptive', got {schedule!r}")
    adaptive = schedule == "adaptive"
    if adaptive:
        _checks.check_fraction("target_ess", target_ess, closed_right=False)
        _checks.check_int_at_least("max_substeps", max_substeps, 1)
    if adapt_step_size:
        _checks.check_fraction("target_acceptance", target_acceptance, closed_right=False)
    if (adaptive or adapt_step_size) and not weighted:
        raise ValueError(
            f"`schedule='adaptive'` and `adapt_step_size` need the Jarzynski weights; "
            f"`method` is {method!r}"
        )
    init_key, loop_key = jax.random.split(rng_key)
    if init_particles is None:
        if method == "cd":
            idx = jax.random.randint(init_key, (num_walkers,), 0, num_data)
            init_particles = _take(data, idx)
        else:
            init_particles = jax.tree.map(
                lambda leaf: jax.random.normal(
                    init_key, (num_walkers, *leaf.shape[1:]), leaf.dtype
                ),
                data,
            )
    elif callable(init_particles):
        init_particles = init_particles(init_key, num_walkers)
    n_init = _checks.leading_size("init_particles", init_particles)
    if n_init != num_walkers:
        raise ValueError(
            f"`init_particles` holds {n_init} walkers but `num_walkers` is {num_walkers}"
        )
    _checks.check_same_event_shape("init_particles", init_particles, "data", data)
    constrain = lambda st: st  # noqa: E731
    if mesh is not None:
        from numpyro_ebm import sharding

        init_particles = jax.device_put(init_particles, sharding.walker_sharding(mesh))
        whole = sharding.replicated(mesh)
        params = jax.device_put(params, whole)
        data = jax.device_put(
            data, sharding.walker_sharding(mesh) if num_data % mesh.size == 0 else whole
        )
        constrain = lambda st: sharding.constrain_state(st, mesh)  # noqa: E731
    state = init(init_particles, params, potential_fn, walker_batch_size)
    opt_state = optimizer.init(params)

    if adaptive:
        adaptive_kernel = build_adaptive_kernel(
            potential_fn, step_size, target_ess, max_substeps, resampling_fn, ess_threshold,
            num_steps, batch_size=walker_batch_size, noise_dtype=noise_dtype,
        )

        def kernel(key, state, params, h):
            state, info = adaptive_kernel(key, state, params, h)
            walker_grad = weighted_param_grad(
                potential_fn, params, state.particles, jnp.exp(state.log_weights),
                walker_batch_size,
            )
            return state, info, walker_grad
    else:
        kernel = _build_kernel(
            potential_fn, step_size, resampling_fn, ess_threshold, num_steps, reweight=weighted,
            batch_size=walker_batch_size, param_grad=True, noise_dtype=noise_dtype,
        )
    step_control = step_size_adaptation(target_acceptance) if adapt_step_size else None

    def iteration_with_weights(carry, iteration):
        """One iteration; also returns the normalised log weights before resampling."""
        params, opt_state, state, step_state, walker_grad = carry
        key = jax.random.fold_in(loop_key, iteration)
        batch_key, move_key, restart_key = jax.random.split(key, 3)
        if batch_size is None:
            batch = data
        else:
            batch = _take(data, jax.random.choice(batch_key, num_data, (batch_size,), False))
        # D_k = data term - walker term; the walker term came with the last evaluation
        data_energy, grads = ce_value_and_grad(potential_fn, params, batch, state, walker_grad)
        row = {"grad_norm": optax.tree.norm(grads), "data_energy": data_energy}
        if weighted:
            row["log_normalizer"] = state.log_normalizer
            if log_z0 is not None:
                row["cross_entropy"] = data_energy + log_z0 + state.log_normalizer
        if trace_fn is not None:
            row["extra"] = trace_fn(params, state)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        if method == "cd":
            restart = iteration % cd_restart_every == 0

            def from_data(_):
                idx = jax.random.randint(restart_key, (num_walkers,), 0, num_data)
                return constrain(init(_take(data, idx), new_params, potential_fn, walker_batch_size))

            state = jax.lax.cond(restart, from_data, lambda _: state, None)
        moved_log_weights = state.log_weights
        h = jnp.asarray(step_size if step_state is None else step_state.step_size,
                        state.potential.dtype)
        live = jnp.isfinite(state.log_weights)
        row["max_abs_potential"] = jnp.max(jnp.where(live, jnp.abs(state.potential), 0.0))
        state, info, walker_grad = kernel(move_key, state, new_params, h)
        state = constrain(state)
        row["step_size"] = h
        row["num_nonfinite"] = info.num_nonfinite
        pre_log_weights = None
        if weighted:
            if adaptive:
                pre_log_weights = info.log_weights_before_resampling
                start_log_weights = info.log_weights_before_last_substep
                row["num_substeps"] = info.num_substeps
            else:
                # weights after the move, before resampling: softmax(A + sum of increments)
                unnormalised = moved_log_weights + info.log_weight_increments
                pre_log_weights = unnormalised - logsumexp(unnormalised)
                start_log_weights = moved_log_weights
            row["ess"] = info.ess
            row["normalized_ess"] = info.ess / num_walkers
            row["max_weight"] = jnp.exp(jnp.max(pre_log_weights))
            row["resampled"] = info.resampled
            if step_state is not None:
                acceptance = acceptance_proxy(start_log_weights, info.log_weight_increments)
                row["acceptance"] = acceptance
                step_state = step_control.update(step_state, acceptance)
        return (new_params, opt_state, state, step_state, walker_grad), row, pre_log_weights

    def one_iteration(carry, iteration):
        carry, row, _ = iteration_with_weights(carry, iteration)
        return carry, row

    @partial(jax.jit, static_argnums=(2,))
    def run_chunk(carry, start, length):
        iterations = start + jnp.arange(length)
        carry, rows = jax.lax.scan(one_iteration, carry, iterations)
        return carry, rows, None

    @partial(jax.jit, static_argnums=(2, 3))
    def run_snapshot_chunk(carry, start, num_blocks, block_len):
        """``num_blocks`` blocks of ``block_len`` iterations, a snapshot at each block start."""

        def block(carry, block_start):
            state = carry[2]
            iterations = block_start + jnp.arange(block_len)
            snap = {"particles": state.particles}
            if not weighted:
                carry, rows = jax.lax.scan(one_iteration, carry, iterations)
                return carry, (rows, snap)
            snap["log_weights"] = state.log_weights

            def step(inner, iteration):
                # keep the block's first pre-resampling weights in the carry (one select
                # of N numbers per iteration; the body is traced once)
                carry, first = inner
                carry, row, pre_log_weights = iteration_with_weights(carry, iteration)
                first = jnp.where(iteration == block_start, pre_log_weights, first)
                return (carry, first), row

            (carry, first), rows = jax.lax.scan(
                step, (carry, jnp.zeros_like(state.log_weights)), iterations
            )
            snap["log_weights_before_resampling"] = first
            return carry, (rows, snap)

        block_starts = start + block_len * jnp.arange(num_blocks)
        carry, (rows, snaps) = jax.lax.scan(block, carry, block_starts)
        rows = jax.tree.map(lambda leaf: leaf.reshape(-1, *leaf.shape[2:]), rows)
        snaps["iteration"] = block_starts
        return carry, rows, snaps

    chunk = min(num_iterations, chunk_size or 250)
    step_state = None if step_control is None else step_control.init(
        jnp.asarray(step_size, state.potential.dtype)
    )
    walker_grad = jax.jit(weighted_param_grad, static_argnums=(0, 4))(
        potential_fn, params, state.particles, jnp.exp(state.log_weights), walker_batch_size
    )
    carry = (params, opt_state, state, step_state, walker_grad)
    rows, snaps = [], []

    checkpointer = None
    if checkpoint_every is not None:
        _checks.check_int_at_least("checkpoint_every", checkpoint_every, 1)
        if checkpoint_dir is None:
            raise ValueError("`checkpoint_every` needs `checkpoint_dir`")
        if snapshot_every is not None and checkpoint_every % snapshot_every:
            raise ValueError(
                f"`checkpoint_every` ({checkpoint_every}) must be a multiple of "
                f"`snapshot_every` ({snapshot_every})"
            )
    if resume and checkpoint_dir is None:
        raise ValueError("`resume=True` needs `checkpoint_dir`")
    start = 0
    if checkpoint_dir is not None:
        from numpyro_ebm.checkpoint import Checkpointer, run_metadata

        checkpointer = Checkpointer(
            checkpoint_dir,
            run_metadata(
                method=method, num_walkers=num_walkers, params=params,
                particles=state.particles, data=data, rng_key=rng_key,
                options={
                    "schedule": schedule, "adapt_step_size": adapt_step_size,
                    "snapshot_every": snapshot_every, "trace_fn": trace_fn is not None,
                    "num_steps": num_steps, "batch_size": batch_size,
                },
            ),
        )
        if resume:
            restored = checkpointer.restore(carry)
            if restored is not None:
                start, carry, saved = restored
                saved_snaps = saved.pop("snapshots", None)
                if start > 0:
                    rows.append(saved)
                    if saved_snaps is not None:
                        snaps.append(saved_snaps)
        elif checkpointer.latest_iteration() is not None:
            raise ValueError(
                f"`checkpoint_dir` {checkpoint_dir!r} already holds checkpoints: pass "
                "`resume=True` to continue that run, or choose another directory"
            )
    every = checkpoint_every or chunk

    def trace_so_far():
        trace = _concat_trace(rows)
        if snaps:
            trace["snapshots"] = _concat_trace(snaps)
        return trace

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=num_iterations, initial=min(start, num_iterations),
                   desc=f"fit[{method}]", unit="it")
    try:
        while start < num_iterations:
            remaining = num_iterations - start
            if checkpointer is not None:
                remaining = min(remaining, every - start % every)
            chunk_start_carry = carry
            if snapshot_every is None:
                length = min(chunk, remaining)
                carry, chunk_rows, chunk_snaps = run_chunk(carry, jnp.asarray(start), length)
            else:
                # whole snapshot intervals per chunk; a last, shorter interval at the end
                block_len = min(snapshot_every, remaining)
                num_blocks = max(1, min(chunk // snapshot_every, remaining // block_len))
                length = num_blocks * block_len
                carry, chunk_rows, chunk_snaps = run_snapshot_chunk(
                    carry, jnp.asarray(start), num_blocks, block_len
                )
            chunk_rows = jax.device_get(chunk_rows)
            bad = _first_failure(chunk_rows, num_walkers)
            if bad is not None:
                good = chunk_start_carry
                if bad > 0:
                    good = run_chunk(chunk_start_carry, jnp.asarray(start), bad)[0]
                    rows.append(jax.tree.map(lambda leaf, b=bad: leaf[:b], chunk_rows))
                p_good, o_good, s_good, *_ = good
                partial_trace = trace_so_far() if rows else {}
                raise NonFiniteError(
                    _failure_message(chunk_rows, bad, start + bad, num_walkers),
                    FitResult(params=p_good, state=s_good, trace=partial_trace,
                              opt_state=o_good, method=method),
                )
            if chunk_snaps is not None:
                snaps.append(jax.device_get(chunk_snaps))
            rows.append(chunk_rows)
            start += length
            if checkpointer is not None and (start % every == 0 or start == num_iterations):
                checkpointer.save(start, carry, trace_so_far())
            if bar is not None:
                bar.update(length)
                if weighted:
                    postfix = {"min_ess/N": f"{float(np.min(chunk_rows['normalized_ess'])):.3f}"}
                    if "cross_entropy" in chunk_rows:
                        postfix["CE"] = f"{float(chunk_rows['cross_entropy'][-1]):.4g}"
                    bar.set_postfix(postfix)
    finally:
        if bar is not None:
            bar.close()
    trace = trace_so_far()
    if "snapshots" in trace and weighted and khat_fn is not None:
        trace["snapshots"]["pareto_k"] = np.asarray(
            [float(khat_fn(lw)) for lw in trace["snapshots"]["log_weights_before_resampling"]]
        )
    if divergence_factor is not None:
        message = _divergence_message(trace, divergence_factor)
        if message is not None:
            warnings.warn(message, EnergyDivergenceWarning, stacklevel=2)
    if weighted:
        message = _degeneracy_message(trace, warn_ess_floor, warn_khat, warn_patience)
        if message is not None:
            warnings.warn(message, WeightDegeneracyWarning, stacklevel=2)
    params, opt_state, state, *_ = carry
    return FitResult(params=params, state=state, trace=trace, opt_state=opt_state, method=method)


def _concat_trace(pieces: list[Any]) -> dict[str, Any]:
    """Concatenate trace pieces (chunks, or a restored checkpoint and chunks) along the
    iteration axis; pieces share leaf order, the last one gives the structure."""
    treedef = jax.tree.structure(pieces[-1])
    leaves = [jax.tree.leaves(p) for p in pieces]
    return jax.tree.unflatten(
        treedef, [np.concatenate(parts, axis=0) for parts in zip(*leaves, strict=True)]
    )


def _first_failure(rows: dict[str, Any], num_walkers: int) -> int | None:
    """Index of the first row whose gradient is not finite or whose move lost every
    walker, or ``None``."""
    bad = ~np.isfinite(rows["grad_norm"]) | (rows["num_nonfinite"] >= num_walkers)
    if "log_normalizer" in rows:
        bad |= ~np.isfinite(rows["log_normalizer"])
    idx = np.flatnonzero(bad)
    return int(idx[0]) if idx.size else None


def _failure_message(rows: dict[str, Any], bad: int, iteration: int, num_walkers: int) -> str:
    if not np.isfinite(rows["grad_norm"][bad]):
        what = "the cross-entropy gradient is not finite"
    else:
        what = f"all {num_walkers} walkers' energies or gradients became non-finite"
    if "log_normalizer" in rows and not np.isfinite(rows["log_normalizer"][bad]):
        what = f"all {num_walkers} walkers lost their weight (non-finite energies)"
    return (
        f"training stopped at iteration {iteration}: {what}. The error's `result` holds the "
        f"parameters and walkers at the start of iteration {iteration}. Lower the learning "
        "rate or clip gradients (optax.clip_by_global_norm), lower `step_size`, or add a "
        "confining term to the energy."
    )


def _divergence_message(trace: dict[str, Any], factor: float) -> str | None:
    """Text of the energy-divergence warning, or ``None``."""
    findings = []
    for name, label in (("max_abs_potential", "largest |walker energy|"),
                        ("data_energy", "|mean data energy|")):
        values = np.abs(np.asarray(trace[name], np.float64))
        if values.size == 0:
            continue
        reference = max(1.0, float(values[0]))
        over = np.flatnonzero(values > factor * reference)
        if over.size:
            findings.append(
                f"{label} grew from {values[0]:.3g} to {values[over[0]]:.3g} by iteration "
                f"{int(over[0])} (max {values.max():.3g})"
            )
    if not findings:
        return None
    return (
        "energies diverge: " + "; ".join(findings) + ". The model is running away from "
        "the data (often a too-large learning rate or an energy with no confining term). "
        "Lower the learning rate, clip gradients (optax.clip_by_global_norm), add a "
        "confining term such as |x|^2 / (2 sigma^2) or weight decay."
    )


def _first_long_run(mask: np.ndarray, min_length: int) -> tuple[int, int] | None:
    """``(first, last)`` indices of the first run of ``True`` at least ``min_length`` long."""
    padded = np.concatenate([[False], np.asarray(mask, bool), [False]])
    edges = np.flatnonzero(np.diff(padded.astype(np.int8)))
    for first, stop in zip(edges[::2], edges[1::2], strict=True):
        if stop - first >= min_length:
            return int(first), int(stop - 1)
    return None


def _degeneracy_message(
    trace: dict[str, Any], ess_floor: float | None, khat_max: float | None, patience: int
) -> str | None:
    """Text of the weight-degeneracy warning, or ``None`` when the weights stayed healthy."""
    findings = []
    if ess_floor is not None:
        low = trace["normalized_ess"] < ess_floor
        found = _first_long_run(low, patience)
        if found is not None:
            first, last = found
            findings.append(
                f"normalised ESS < {ess_floor:g} over iterations {first}-{last} "
                f"({int(low.sum())} iterations in all)"
            )
    # resampling at a high rate: each resampling only lasts a few iterations, so the ESS
    # never stays low for long, yet the walkers are being rebuilt from a few ancestors
    resampled = np.asarray(trace.get("resampled", []), np.int64)
    window = max(5 * patience, 100)
    if ess_floor is not None and resampled.size >= window:
        counts = np.convolve(resampled, np.ones(window, np.int64), mode="valid")
        first = int(np.argmax(counts >= window // 2))
        if counts[first] >= window // 2:
            findings.append(
                f"resampled in {int(counts[first])} of the {window} iterations {first}-"
                f"{first + window - 1} ({int(resampled.sum())} resamplings in all): the "
                "weights cannot keep up with the parameter moves"
            )
    snapshots = trace.get("snapshots", {})
    if khat_max is not None and "pareto_k" in snapshots:
        iterations = snapshots["iteration"]
        every = int(iterations[1] - iterations[0]) if len(iterations) > 1 else patience
        high = snapshots["pareto_k"] > khat_max
        found = _first_long_run(high, max(1, math.ceil(patience / every)))
        if found is not None:
            first, last = found
            findings.append(
                f"Pareto k-hat > {khat_max:g} at every snapshot from iteration "
                f"{int(iterations[first])} to {int(iterations[last])} "
                f"({int(high.sum())} of {len(high)} snapshots in all)"
            )
    if not findings:
        return None
    return (
        "Jarzynski weights degenerate: "
        + "; ".join(findings)
        + ". The weighted estimates (gradient, log-normaliser, cross-entropy) are unreliable "
        "there. Try a smaller learning rate or a gradient clip (optax.clip_by_global_norm: "
        "the weight increments grow with the parameter step), more walkers "
        "(`num_walkers`), a smaller `step_size`, `schedule='adaptive'`, or more frequent "
        "resampling (a higher `ess_threshold`)."
    )
