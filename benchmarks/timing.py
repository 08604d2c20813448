"""A timing method that holds on a GPU as on a CPU: time a compiled multi-iteration step.

Every per-iteration figure of the benchmarks comes from here:

* the timed function is ``fit``'s own jitted chunk (``lax.scan`` over ``K`` training
  iterations, trace rows included; ``numpyro_ebm.training.loop``), compiled ahead of time
  (``jit(...).lower(...).compile()``), so compilation is measured on its own and never
  enters a per-iteration time;
* one warm-up call, then each repeat is one call followed by ``jax.block_until_ready`` on
  its outputs (JAX dispatches asynchronously: without the block a GPU timing measures the
  dispatch only), and the figure is the median over repeats of (time / K);
* several variants are timed interleaved (A, B, A, B, ...), so that load from other jobs
  falls on all of them alike.

This replaces the former run-length differencing ((t(N2) - t(N1)) / (N2 - N1) over two
whole ``fit`` calls), which mixed host work, callbacks and caching into the difference and
gave noisy, even negative, times on a GPU.

Compile time of a whole ``fit`` call comes from JAX's own monitoring events
(:class:`CompileClock`: tracing, lowering and XLA compilation durations).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import jax

__all__ = ["CompileClock", "compile_chunk", "chunk_runner", "time_interleaved", "time_calls"]

# jax.monitoring event names whose durations make up "compile time"
_COMPILE_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)


class CompileClock:
    """``with CompileClock() as clock: ...`` sums the tracing, lowering and XLA compile
    durations JAX reports (``jax.monitoring``) while the block runs: ``clock.seconds``,
    ``clock.by_event`` and ``clock.count`` (compilations)."""

    def __init__(self):
        self.by_event: dict[str, float] = {}
        self.count = 0
        self._active = False

    def _listen(self, event: str, duration: float, **_: Any) -> None:
        if self._active and event in _COMPILE_EVENTS:
            self.by_event[event] = self.by_event.get(event, 0.0) + duration
            if event.endswith("backend_compile_duration"):
                self.count += 1

    def __enter__(self) -> CompileClock:
        if not getattr(CompileClock, "_registered", False):
            jax.monitoring.register_event_duration_secs_listener(CompileClock._dispatch)
            CompileClock._registered = True
        CompileClock._current = self
        self._active = True
        return self

    def __exit__(self, *exc) -> None:
        self._active = False
        CompileClock._current = None

    @staticmethod
    def _dispatch(event: str, duration: float, **kw: Any) -> None:
        clock = getattr(CompileClock, "_current", None)
        if clock is not None:
            clock._listen(event, duration, **kw)

    @property
    def seconds(self) -> float:
        return sum(self.by_event.values())


def chunk_runner(trainer, rng_key: jax.Array, num_walkers: int, data_batch_size: int | None = None):
    """``fit``'s jitted chunk ``chunk(state, data, length) -> (state, rows)`` for ``trainer``
    (full batch unless ``data_batch_size``)."""
    from numpyro_ebm.training.loop import _chunk_functions

    chunk, _ = _chunk_functions(trainer, rng_key, data_batch_size, num_walkers, trainer.kernel.weighted)
    return chunk


def compile_chunk(chunk: Callable, state: Any, data: Any, length: int) -> tuple[Callable, float]:
    """``(compiled, seconds)``: the chunk of ``length`` iterations compiled ahead of time,
    and the time lowering and compiling took."""
    t0 = time.perf_counter()
    compiled = chunk.lower(state, data, length).compile()
    return compiled, time.perf_counter() - t0


def time_calls(fn: Callable, *args: Any, repeats: int = 5) -> list[float]:
    """Seconds per call of ``fn(*args)`` after one warm-up call, each call ended by
    ``jax.block_until_ready`` on its outputs."""
    jax.block_until_ready(fn(*args))
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        out.append(time.perf_counter() - t0)
    return out


def time_interleaved(variants: dict[str, tuple[Callable, tuple, int]], repeats: int = 5) -> dict[str, dict]:
    """Time ``{name: (fn, args, iterations_per_call)}`` interleaved: one warm-up call each,
    then ``repeats`` rounds calling every variant once (blocked). Returns per variant
    ``{"ms_per_iteration": median, "repeats_ms": [...]}``."""
    for fn, args, _ in variants.values():
        jax.block_until_ready(fn(*args))
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, (fn, args, k) in variants.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(1e3 * (time.perf_counter() - t0) / k)
    return {name: {"ms_per_iteration": statistics.median(v), "repeats_ms": v} for name, v in times.items()}
