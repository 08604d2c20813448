r"""Host-side callbacks of :func:`numpyro_ebm.training.loop.run`, each a small object.

A callback may define ``on_start(ctx)`` (may return ``(state, trace)`` to continue from),
``on_chunk(ctx, chunk)`` (after each jitted chunk; raising stops the run), ``on_end(ctx,
result)`` (may return a new :class:`~numpyro_ebm.training.loop.RunResult`) and ``close()``
(always called). ``every`` makes the loop end a chunk at each multiple of that many
iterations, ``snapshot_every`` asks the loop for walker snapshots. Callbacks run in the
order given.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

from numpyro_ebm import _checks
from numpyro_ebm.errors import (
    EnergyDivergenceWarning,
    NonFiniteError,
    SubstepLimitWarning,
    WeightDegeneracyWarning,
)
from numpyro_ebm.training.loop import ChunkResult, RunContext, RunResult

__all__ = [
    "WeightDegeneracyWarning",
    "EnergyDivergenceWarning",
    "NonFiniteError",
    "ProgressBar",
    "Snapshots",
    "ParetoKhat",
    "Checkpoint",
    "NonFiniteStop",
    "DegeneracyCheck",
    "DivergenceCheck",
]


class ProgressBar:
    """A tqdm progress bar, updated per chunk with the chunk's smallest normalised ESS and
    the last cross-entropy estimate."""

    def __init__(self, desc: str | None = None):
        self.desc, self._bar = desc, None

    def on_start(self, ctx: RunContext):
        from numpyro_ebm._optional import require

        tqdm = require("tqdm.auto", "The progress bar").tqdm

        self._bar = tqdm(total=ctx.end, initial=ctx.start, unit="it",
                         desc=self.desc or f"fit[{ctx.trainer.kernel.name}]")

    def on_chunk(self, ctx: RunContext, chunk: ChunkResult):
        self._bar.update(chunk.length)
        if "normalized_ess" in chunk.rows:
            postfix = {"min_ess/N": f"{float(np.min(chunk.rows['normalized_ess'])):.3f}"}
            if "cross_entropy" in chunk.rows:
                postfix["CE"] = f"{float(chunk.rows['cross_entropy'][-1]):.4g}"
            self._bar.set_postfix(postfix)

    def close(self):
        if self._bar is not None:
            self._bar.close()


class Snapshots:
    """Record the walkers every ``every`` iterations (at :math:`k = 0, m, 2m, \\dots`) inside
    the jitted loop into ``trace["snapshots"]``: ``iteration``, ``particles`` and, for
    weighted kernels, ``log_weights`` (used by the gradient at :math:`\\theta_k`) and
    ``log_weights_before_resampling`` (after the move :math:`\\theta_k \\to \\theta_{k+1}`).
    Host memory grows as ``num_iterations / every`` copies of the walkers."""

    def __init__(self, every: int):
        self.snapshot_every = _checks.check_int_at_least("every", every, 1)


class ParetoKhat:
    """After the run, ``khat_fn(log_weights)`` (e.g.
    :func:`numpyro_ebm.diagnostics.pareto_khat`) on each snapshot's
    ``log_weights_before_resampling`` into ``trace["snapshots"]["pareto_k"]`` (weighted
    kernels with :class:`Snapshots`). Place it before :class:`DegeneracyCheck`."""

    def __init__(self, khat_fn: Callable[[np.ndarray], float]):
        if not callable(khat_fn):
            raise TypeError("`khat_fn` must be callable: khat_fn(log_weights) -> float")
        self.khat_fn = khat_fn

    def on_end(self, ctx: RunContext, result: RunResult):
        snaps = result.trace.get("snapshots", {})
        if "log_weights_before_resampling" in snaps:
            snaps["pareto_k"] = np.asarray(
                [float(self.khat_fn(lw)) for lw in snaps["log_weights_before_resampling"]]
            )


class Checkpoint:
    """Orbax checkpoints of the :class:`~numpyro_ebm.training.trainer.TrainState` and the
    trace every ``every`` iterations (default: every chunk) and at the end; the last three
    are kept. A record of the run (kernel and its settings, walker count, shapes, key, and
    ``metadata``, fingerprints of the data and of the optimiser's first update) is stored
    beside it. ``resume=True`` continues from the latest checkpoint (the result equals an
    uninterrupted run's); a checkpoint of another run (any recorded setting differs: the
    error names it), or an unreadable one, raises ``ValueError`` before anything is written,
    so no checkpoint of the other run is rotated away. A run asked for fewer iterations than
    the checkpoint holds raises ``ValueError``."""

    def __init__(self, directory: str | os.PathLike, every: int | None = None, resume: bool = False,
                 metadata: dict[str, Any] | None = None):
        if every is not None:
            _checks.check_int_at_least("every", every, 1)
        directory = os.fspath(directory)
        if os.path.exists(directory) and not os.path.isdir(directory):
            raise NotADirectoryError(f"Checkpoint `directory` {directory!r} exists and is not a directory")
        self.directory, self.every, self.resume = directory, every, resume
        self.metadata = dict(metadata or {})
        self._checkpointer = None

    def on_start(self, ctx: RunContext):
        from numpyro_ebm.checkpoint import Checkpointer, run_metadata

        state = ctx.initial_state
        kernel = ctx.trainer.kernel
        fingerprints = {**_data_fingerprint(ctx.data),
                        "optimizer_probe_sha256": _optimizer_probe(ctx.trainer.optimizer, state.params)}
        meta = run_metadata(method=kernel.name, num_walkers=state.walkers.log_weights.shape[0],
                            params=state.params, particles=state.walkers.particles, data=ctx.data,
                            rng_key=ctx.rng_key,
                            options={**kernel.config, **fingerprints, **self.metadata})
        self._checkpointer = Checkpointer(self.directory, meta)
        if self.resume:
            restored = self._checkpointer.restore(state)
            if restored is not None and restored[0] > 0:
                return restored[1], restored[2]
        elif self._checkpointer.latest_iteration() is not None:
            raise ValueError(
                f"Checkpoint `directory` {self.directory!r} already holds checkpoints: pass "
                "`resume=True` to continue that run, or choose another directory"
            )
        return None

    def on_chunk(self, ctx: RunContext, chunk: ChunkResult):
        pos = chunk.start + chunk.length
        if self.every is None or pos % self.every == 0 or pos == ctx.end:
            self._checkpointer.save(pos, chunk.state, ctx.trace_so_far())

    def close(self):
        """Stop Orbax's background threads (also when training failed)."""
        if self._checkpointer is not None:
            self._checkpointer.close()
            self._checkpointer = None


def _data_fingerprint(data: Any) -> dict[str, str]:
    """``{"data_sha256": ...}``; for data split over several processes (not fetchable by one)
    ``{"data_checksum": ...}``, a global reduction
    (:func:`numpyro_ebm.distributed.global_checksum`) that does not depend on the split."""
    import jax

    leaves = jax.tree.leaves(data)
    if all(not isinstance(leaf, jax.Array) or leaf.is_fully_addressable or leaf.is_fully_replicated
           for leaf in leaves):
        return {"data_sha256": _sha256(data)}
    from numpyro_ebm.distributed import global_checksum

    return {"data_checksum": ";".join(global_checksum(jax.numpy.asarray(leaf)) for leaf in leaves)}


def _sha256(tree: Any) -> str:
    """A fingerprint of the values of ``tree`` (its leaves' bytes, shapes and dtypes)."""
    import hashlib

    import jax

    digest = hashlib.sha256()
    for leaf in jax.tree.leaves(jax.device_get(tree)):
        leaf = np.ascontiguousarray(leaf)
        digest.update(f"{leaf.shape}{leaf.dtype}".encode())
        digest.update(leaf.tobytes())
    return digest.hexdigest()


def _optimizer_probe(optimizer: Any, params: Any) -> str:
    """A fingerprint of the optimiser's hyper-parameters: its first update of a fixed
    probe gradient (ones) from its initial state. Another learning rate, clip or decay
    gives another update."""
    import jax

    if optimizer is None:
        return "unknown"
    ones = jax.tree.map(lambda leaf: np.ones(np.shape(leaf), np.asarray(leaf).dtype), params)
    updates, _ = optimizer.update(ones, optimizer.init(params), params)
    return _sha256(updates)


class NonFiniteStop:
    """Stop with :class:`NonFiniteError` at the first iteration whose gradient is not
    finite or whose move lost every walker; ``error.result`` holds the state at the start
    of that iteration and the trace up to it. Place it before :class:`Checkpoint`."""

    def on_chunk(self, ctx: RunContext, chunk: ChunkResult):
        num_walkers = chunk.state.walkers.log_weights.shape[0]
        bad = _first_failure(chunk.rows, num_walkers)
        if bad is None:
            return
        trace = ctx.trace_so_far()
        snaps = trace.pop("snapshots", None)
        keep = len(trace["grad_norm"]) - chunk.length + bad
        trace = {k: v for k, v in trace.items()}
        trace = _truncate(trace, keep)
        if snaps is not None:
            trace["snapshots"] = _truncate(snaps, int(np.sum(snaps["iteration"] < chunk.start)))
        iteration = chunk.start + bad
        good = RunResult(chunk.replay(bad), trace if keep else {})
        raise NonFiniteError(_failure_message(chunk.rows, bad, iteration, num_walkers), good)


def _truncate(tree: dict[str, Any], n: int) -> dict[str, Any]:
    import jax

    return jax.tree.map(lambda leaf: leaf[:n], tree)


class DegeneracyCheck:
    """After a weighted run, one :class:`WeightDegeneracyWarning` when the normalised ESS
    stays below ``ess_floor`` for ``patience`` consecutive iterations, when :math:`\\hat k`
    stays above ``khat`` on consecutive snapshots spanning ``patience`` iterations, or when
    the walkers were resampled in half of some ``max(5 * patience, 100)`` consecutive
    iterations (each resampling resets the ESS), or when the walkers descend from fewer than
    ``lineage_floor`` N walkers of the start of their lineage window
    (``trace["num_lineages"]``). ``None`` switches a check off. With the
    adaptive kernel, a :class:`~numpyro_ebm.errors.SubstepLimitWarning` when some iteration
    missed the schedule's conditional-ESS target (``trace["substep_target_missed"]``)."""

    def __init__(self, ess_floor: float | None = 0.05, khat: float | None = 0.7, patience: int = 20,
                 lineage_floor: float | None = 0.05):
        if ess_floor is not None:
            _checks.check_fraction("ess_floor", ess_floor)
        if khat is not None and not math.isfinite(float(khat)):
            raise ValueError(f"`khat` must be finite, got {khat}")
        if lineage_floor is not None:
            _checks.check_fraction("lineage_floor", lineage_floor)
        self.ess_floor, self.khat, self.lineage_floor = ess_floor, khat, lineage_floor
        self.patience = _checks.check_int_at_least("patience", patience, 1)

    def on_end(self, ctx: RunContext, result: RunResult):
        if "normalized_ess" not in result.trace:
            return
        num_walkers = ctx.initial_state.walkers.log_weights.shape[0]
        message = degeneracy_message(result.trace, self.ess_floor, self.khat, self.patience,
                                     self.lineage_floor, num_walkers)
        if message is not None:
            warnings.warn(message, WeightDegeneracyWarning, stacklevel=4)
        missed = np.asarray(result.trace.get("substep_target_missed", []), bool)
        if missed.any():
            warnings.warn(
                f"the adaptive schedule missed its conditional-ESS target at {int(missed.sum())} "
                f"iterations (first: {int(np.argmax(missed))}): `max_substeps` or the backtracks "
                "ran out, or the ULA move alone breaks the target. Raise `max_substeps`, lower the "
                "learning rate, or lower `step_size`.", SubstepLimitWarning, stacklevel=4)


class DivergenceCheck:
    """After the run, one :class:`EnergyDivergenceWarning` when the largest walker energy
    or the mean data energy exceeds ``factor`` times its size at the start (at least 1);
    ``factor=math.inf`` switches the check off."""

    def __init__(self, factor: float = 1e4):
        factor = float(factor)
        if math.isnan(factor) or factor <= 0:
            raise ValueError(f"`factor` must be a number > 0 (math.inf switches the check off), got {factor}")
        self.factor = factor

    def on_end(self, ctx: RunContext, result: RunResult):
        message = divergence_message(result.trace, self.factor)
        if message is not None:
            warnings.warn(message, EnergyDivergenceWarning, stacklevel=4)


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


def divergence_message(trace: dict[str, Any], factor: float) -> str | None:
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


def _resampling_rate_finding(trace, patience):
    resampled = np.asarray(trace.get("resampled", []), np.int64)
    window = max(5 * patience, 100)
    if resampled.size < window:
        return None
    counts = np.convolve(resampled, np.ones(window, np.int64), mode="valid")
    first = int(np.argmax(counts >= window // 2))
    if counts[first] < window // 2:
        return None
    return (f"resampled in {int(counts[first])} of the {window} iterations {first}-"
            f"{first + window - 1} ({int(resampled.sum())} resamplings in all): the "
            "weights cannot keep up with the parameter moves")


def _lineage_finding(trace, lineage_floor, num_walkers):
    lineages = np.asarray(trace.get("num_lineages", []))
    if lineage_floor is None or num_walkers is None or lineages.size == 0:
        return None
    low = np.flatnonzero(lineages < lineage_floor * num_walkers)
    if low.size == 0:
        return None
    return (f"the walkers descend from only {int(lineages[low[0]])} of {num_walkers} lineages at "
            f"iteration {int(low[0])} (fewest: {int(lineages.min())}): resampling is redrawing "
            "the walkers from a few survivors")


def degeneracy_message(
    trace: dict[str, Any], ess_floor: float | None, khat_max: float | None, patience: int,
    lineage_floor: float | None = None, num_walkers: int | None = None,
) -> str | None:
    """Text of the weight-degeneracy warning, or ``None`` when the weights stayed healthy."""
    findings = []
    lineage = _lineage_finding(trace, lineage_floor, num_walkers)
    if lineage is not None:
        findings.append(lineage)
    if ess_floor is not None:
        low = trace["normalized_ess"] < ess_floor
        found = _first_long_run(low, patience)
        if found is not None:
            findings.append(f"normalised ESS < {ess_floor:g} over iterations {found[0]}-{found[1]} "
                            f"({int(low.sum())} iterations in all)")
        rate = _resampling_rate_finding(trace, patience)
        if rate is not None:
            findings.append(rate)
    snapshots = trace.get("snapshots", {})
    if khat_max is not None and "pareto_k" in snapshots:
        iterations = snapshots["iteration"]
        every = int(iterations[1] - iterations[0]) if len(iterations) > 1 else patience
        high = snapshots["pareto_k"] > khat_max
        found = _first_long_run(high, max(1, math.ceil(patience / every)))
        if found is not None:
            findings.append(
                f"Pareto k-hat > {khat_max:g} at every snapshot from iteration "
                f"{int(iterations[found[0]])} to {int(iterations[found[1]])} "
                f"({int(high.sum())} of {len(high)} snapshots in all)"
            )
    if not findings:
        return None
    return (
        "Jarzynski weights degenerate: " + "; ".join(findings)
        + ". The weighted estimates (gradient, log-normaliser, cross-entropy) are unreliable "
        "there. Try a smaller learning rate or a gradient clip (optax.clip_by_global_norm: "
        "the weight increments grow with the parameter step), more walkers, a smaller "
        "`step_size`, the adaptive schedule (kernels.adaptive_jarzynski_ula), rejuvenation "
        "after resampling (kernels.rejuvenation.with_rejuvenation), or more frequent "
        "resampling (a higher `ess_threshold`)."
    )


