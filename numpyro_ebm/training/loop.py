r"""``run``: the training loop, a ``lax.scan`` over chunks of iterations, with host-side
callbacks between chunks.

Iteration :math:`k` (absolute: ``state.iteration``) uses the key
``jax.random.fold_in(rng_key, k)``, so results depend neither on the chunk length nor on
where a run was interrupted and resumed. Data come as ``data`` (the whole set every
iteration) or ``data`` with ``data_batch_size`` :math:`B`: each epoch visits a random
permutation of the data in :math:`\lfloor n/B \rfloor` batches (the remainder is left out
of that epoch); the permutation of epoch :math:`e` is drawn once, from the first part of
the key of its first iteration, and carried through the scan.

Everything per iteration stays inside one jitted ``lax.scan``: the host sees the trace rows
(cheap reductions over the walkers) and, with snapshots, copies of the walkers, at chunk
boundaries only.
"""

from __future__ import annotations

import warnings
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from numpyro_ebm import _checks
from numpyro_ebm.distributed import to_host
from numpyro_ebm.errors import CallbackFailedWarning
from numpyro_ebm.training.trainer import Trainer, TrainInfo, TrainState

__all__ = ["run", "RunResult", "ChunkResult", "RunContext", "trace_row", "CallbackFailedWarning"]


class RunResult(NamedTuple):
    """``state``: the final :class:`TrainState`; ``trace``: dict of NumPy arrays, iteration
    axis first (and ``trace["snapshots"]`` with snapshots)."""

    state: TrainState
    trace: dict[str, Any]


class ChunkResult(NamedTuple):
    """One chunk, as callbacks see it (``on_chunk`` runs after its rows joined the trace):
    iterations ``start .. start + length - 1``, the state before and after, the chunk's
    trace rows (NumPy), its snapshots (or ``None``), and ``replay(m)``: the state after the
    first ``m`` iterations of the chunk."""

    start: int
    length: int
    start_state: TrainState
    state: TrainState
    rows: dict[str, Any]
    snapshots: dict[str, Any] | None
    replay: Any


class RunContext(NamedTuple):
    """What callbacks know about the run: the trainer, its key and data, the first and
    the end iteration, and ``trace_so_far()``."""

    trainer: Trainer
    rng_key: jax.Array
    data: Any
    start: int
    end: int
    initial_state: TrainState
    trace_so_far: Any


def trace_row(info: TrainInfo, num_walkers: int) -> dict[str, jax.Array]:
    """The per-iteration trace entries (cheap reductions) of one :class:`TrainInfo`."""
    row = {"grad_norm": info.grad_norm, "data_energy": info.data_energy,
           "max_abs_potential": info.max_abs_potential, "step_size": info.step_size,
           "num_nonfinite": info.num_nonfinite}
    if info.log_normalizer is not None:
        row["log_normalizer"] = info.log_normalizer
        row["ess"] = info.kernel_info.ess
        row["normalized_ess"] = info.kernel_info.ess / num_walkers
        row["max_weight"] = jnp.exp(jnp.max(info.log_weights_before_resampling))
        row["resampled"] = info.kernel_info.resampled
        row["num_lineages"] = info.num_lineages
        if hasattr(info.kernel_info, "num_substeps"):
            row["num_substeps"] = info.kernel_info.num_substeps
            row["substep_target_missed"] = info.kernel_info.target_missed
        if hasattr(info.kernel_info, "rejuvenated"):
            row["rejuvenated"] = info.kernel_info.rejuvenated
            row["mala_acceptance"] = info.kernel_info.mala_acceptance
    for name in ("cross_entropy", "acceptance", "probe_acceptance", "extra", "energy_penalty"):
        if getattr(info, name) is not None:
            row[name] = getattr(info, name)
    return row


def _batch_source(rng_key, data, data_batch_size):
    """``(first_order(k), next_batch(order, k))`` for full or per-epoch minibatches. The
    order is carried with the epoch it belongs to and drawn again only when a new epoch
    starts (one permutation per epoch)."""
    if data_batch_size is None:
        return (lambda k: None), (lambda order, k: (data, order))
    n = jax.tree.leaves(data)[0].shape[0]
    per_epoch = n // data_batch_size

    def order_of_epoch_at(k):
        first = k - k % per_epoch
        return jax.random.permutation(jax.random.split(jax.random.fold_in(rng_key, first), 3)[0], n)

    def first_order(k):  # none yet: the first iteration draws its epoch's order
        return jnp.zeros((n,), jnp.int32), jnp.asarray(-1, jnp.int32)

    def next_batch(carried, k):
        order, epoch = carried
        order = jax.lax.cond(k // per_epoch == epoch, lambda: order,
                             lambda: order_of_epoch_at(k).astype(jnp.int32))
        idx = jax.lax.dynamic_slice_in_dim(order, (k % per_epoch) * data_batch_size, data_batch_size)
        return jax.tree.map(lambda leaf: leaf[idx], data), (order, jnp.asarray(k // per_epoch, jnp.int32))

    return first_order, next_batch


def _chunk_functions(trainer: Trainer, rng_key, data_batch_size, num_walkers, weighted):
    """Jitted ``chunk(state, data, length)`` and ``snapshot_chunk(state, data, blocks,
    block_len)``."""

    def one_iteration(carry, data, next_batch):
        state, order = carry
        k = state.iteration
        batch, order = next_batch(order, k)
        state, info = trainer.step(jax.random.fold_in(rng_key, k), state, batch)
        return (state, order), trace_row(info, num_walkers), info.log_weights_before_resampling

    @partial(jax.jit, static_argnums=(2,))
    def chunk(state, data, length):
        first_order, next_batch = _batch_source(rng_key, data, data_batch_size)

        def body(carry, _):
            carry, row, _ = one_iteration(carry, data, next_batch)
            return carry, row

        (state, _), rows = jax.lax.scan(body, (state, first_order(state.iteration)), None, length)
        return state, rows

    @partial(jax.jit, static_argnums=(2, 3))
    def snapshot_chunk(state, data, num_blocks, block_len):
        first_order, next_batch = _batch_source(rng_key, data, data_batch_size)

        def block(carry, _):
            st = carry[0]
            block_start = st.iteration
            snap = {"particles": st.walkers.particles}
            if weighted:
                snap["log_weights"] = st.walkers.log_weights

            def body(inner, _):
                carry, first = inner
                k = carry[0].iteration
                carry, row, pre = one_iteration(carry, data, next_batch)
                if weighted:  # the block's first pre-resampling weights
                    first = jnp.where(k == block_start, pre, first)
                return (carry, first), row

            first0 = jnp.zeros_like(st.walkers.log_weights)
            (carry, first), rows = jax.lax.scan(body, (carry, first0), None, block_len)
            if weighted:
                snap["log_weights_before_resampling"] = first
            snap["iteration"] = block_start
            return carry, (rows, snap)

        (state, _), (rows, snaps) = jax.lax.scan(
            block, (state, first_order(state.iteration)), None, num_blocks
        )
        rows = jax.tree.map(lambda leaf: leaf.reshape(-1, *leaf.shape[2:]), rows)
        return state, rows, snaps

    return chunk, snapshot_chunk


def concat_trace(pieces: list[Any]) -> dict[str, Any]:
    """Concatenate trace pieces along the iteration axis (same structure)."""
    if not pieces:
        return {}
    treedef = jax.tree.structure(pieces[-1])
    leaves = [jax.tree.leaves(p) for p in pieces]
    return jax.tree.unflatten(
        treedef, [np.concatenate(parts, axis=0) for parts in zip(*leaves, strict=True)]
    )


def _settings(callbacks, chunk_size, num_to_run):
    every = [cb.every for cb in callbacks if getattr(cb, "every", None)]
    snaps = [cb.snapshot_every for cb in callbacks if getattr(cb, "snapshot_every", None)]
    if len(snaps) > 1:
        raise ValueError("only one callback may ask for snapshots (`snapshot_every`)")
    snapshot_every = snaps[0] if snaps else None
    for e in every:
        if snapshot_every is not None and e % snapshot_every:
            raise ValueError(f"a callback's `every` ({e}) must be a multiple of `snapshot_every` "
                             f"({snapshot_every})")
    return min(num_to_run, chunk_size or 250), every, snapshot_every


def run(
    rng_key: jax.Array,
    trainer: Trainer,
    state: TrainState,
    num_iterations: int,
    *,
    data: Any,
    data_batch_size: int | None = None,
    chunk_size: int | None = None,
    callbacks: tuple = (),
) -> RunResult:
    """Run ``trainer.step`` from ``state`` until iteration ``state.iteration +
    num_iterations``, in jitted chunks of ``chunk_size`` iterations (default
    ``min(num_iterations, 250)``; snapshot blocks longer than that run in pieces of at
    most ``chunk_size``), calling each callback's ``on_start``, ``on_chunk`` and
    ``on_end`` (:mod:`numpyro_ebm.training.callbacks`). A callback's ``on_start`` may return
    a ``(state, trace)`` to continue from (a restored checkpoint). A callback that fails in
    ``on_end`` (after training) gives a :class:`CallbackFailedWarning` and the result is
    returned."""
    _checks.check_int_at_least("num_iterations", num_iterations, 1)
    if chunk_size is not None:
        _checks.check_int_at_least("chunk_size", chunk_size, 1)
    callbacks = tuple(callbacks)
    start = int(state.iteration)
    end = start + num_iterations
    chunk, every, snapshot_every = _settings(callbacks, chunk_size, num_iterations)
    num_walkers = state.walkers.log_weights.shape[0]
    chunk_fn, snapshot_fn = _chunk_functions(trainer, rng_key, data_batch_size, num_walkers,
                                             trainer.kernel.weighted)
    rows, snaps = [], []

    def trace_so_far():
        trace = concat_trace(rows)
        if snaps:
            trace["snapshots"] = concat_trace(snaps)
        return trace

    ctx = RunContext(trainer, rng_key, data, start, end, state, trace_so_far)
    try:
        state = _start(ctx, callbacks, state, rows, snaps)
        pos = block_end = int(state.iteration)
        while pos < end:
            remaining = end - pos
            for e in every:
                remaining = min(remaining, e - pos % e)
            before = state
            snapshot, num_blocks, block_len, block_end = _next_piece(
                pos, remaining, chunk, snapshot_every, block_end)
            length = num_blocks * block_len
            if snapshot:
                state, chunk_rows, chunk_snaps = snapshot_fn(state, data, num_blocks, block_len)
                chunk_snaps = to_host(chunk_snaps)
            else:
                state, chunk_rows = chunk_fn(state, data, length)
                chunk_snaps = None
            chunk_rows = to_host(chunk_rows)
            rows.append(chunk_rows)
            if chunk_snaps is not None:
                snaps.append(chunk_snaps)
            pos += length
            replay = partial(_replay, chunk_fn, before, data)
            result = ChunkResult(pos - length, length, before, state, chunk_rows, chunk_snaps, replay)
            for cb in callbacks:  # in order: a stop (NonFiniteStop) before a checkpoint
                if hasattr(cb, "on_chunk"):
                    cb.on_chunk(ctx, result)
    finally:
        for cb in callbacks:
            if hasattr(cb, "close"):
                cb.close()
    return _finish(ctx, RunResult(state, trace_so_far()), callbacks)


def _next_piece(pos, remaining, chunk, snapshot_every, block_end):
    """``(snapshot, num_blocks, block_len, block_end)`` of the next jitted call, at most
    ``remaining`` iterations from ``pos``. Snapshot blocks no longer than a chunk go several
    to a call; a longer block (ending at ``block_end``) runs in near-equal pieces of at most
    ``chunk`` iterations, the first of which takes the snapshot, so that callbacks hear from
    the run every ``chunk`` iterations at least."""
    if snapshot_every is None:
        return False, 1, min(chunk, remaining), block_end
    if snapshot_every <= chunk:
        block_len = min(snapshot_every, remaining)
        return True, max(1, min(chunk // snapshot_every, remaining // block_len)), block_len, block_end
    snapshot = pos >= block_end
    if snapshot:
        block_end = pos + min(snapshot_every, remaining)
    left = block_end - pos
    pieces = -(-left // chunk)
    return snapshot, 1, -(-left // pieces), block_end


def _start(ctx, callbacks, state, rows, snaps):
    """Each callback's ``on_start``; a restored ``(state, trace)`` replaces the start."""
    for cb in callbacks:
        restored = cb.on_start(ctx) if hasattr(cb, "on_start") else None
        if restored is not None:
            state, saved = restored
            snap = saved.pop("snapshots", None)
            if saved:
                rows.append(saved)
            if snap:
                snaps.append(snap)
    if int(state.iteration) > ctx.end:
        raise ValueError(
            f"the restored state is at iteration {int(state.iteration)}, past this run's end "
            f"({ctx.end}): `num_iterations` must reach at least that iteration"
        )
    return state


def _replay(chunk_fn, state, data, length):
    return state if length == 0 else chunk_fn(state, data, length)[0]


def _finish(ctx, result, callbacks):
    for cb in callbacks:
        if not hasattr(cb, "on_end"):
            continue
        try:
            new = cb.on_end(ctx, result)
        except Exception as err:  # a diagnostic must not throw a finished run away
            warnings.warn(f"callback {type(cb).__name__} failed after training "
                          f"({type(err).__name__}: {err}); the result is returned without it",
                          CallbackFailedWarning, stacklevel=3)
            continue
        if new is not None:
            result = new
    return result
