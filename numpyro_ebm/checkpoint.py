"""Checkpoints of a :func:`numpyro_ebm.fit` run, written with Orbax.

A checkpoint at iteration ``k`` holds everything the loop carries (parameters, optimiser
state, the walker state, the step-size adaptation state), the trace rows ``0 .. k-1``
(and walker snapshots), and a JSON record of the run: method, walker count, shapes of
the parameters, walkers and data, and the PRNG key. Since iteration ``k`` draws its
randomness from ``fold_in(loop_key, k)``, a run resumed from iteration ``k`` ends with
exactly the result of an uninterrupted run.

Orbax's ``CheckpointManager`` writes each checkpoint atomically into its own step folder
and keeps the last ``max_to_keep``; a checkpoint that cannot be read, or that belongs to
another run, raises ``ValueError`` and nothing on disk is touched.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np

__all__ = ["Checkpointer", "run_metadata"]

FORMAT_VERSION = 2  # 2: the TrainState of numpyro_ebm.training


def _shapes(tree: Any) -> list[list]:
    return [[list(np.shape(leaf)), str(leaf.dtype if hasattr(leaf, "dtype") else np.asarray(leaf).dtype)]
            for leaf in jax.tree.leaves(tree)]


def run_metadata(
    *, method: str, num_walkers: int, params: Any, particles: Any, data: Any, rng_key: Any,
    options: dict[str, Any],
) -> dict[str, Any]:
    """What identifies a run: resuming checks every entry against the checkpoint's."""
    try:
        key_data = np.asarray(jax.random.key_data(rng_key)).tolist()
    except (TypeError, ValueError):
        key_data = np.asarray(rng_key).tolist()
    return {
        "format": FORMAT_VERSION,
        "method": method,
        "num_walkers": int(num_walkers),
        "params_structure": str(jax.tree.structure(params)),
        "params_shapes": _shapes(params),
        "particles_shapes": _shapes(particles),
        "data_shapes": _shapes(data),
        "rng_key": key_data,
        **{k: (v if isinstance(v, bool | int | float | str | type(None)) else str(v))
           for k, v in options.items()},
    }


class Checkpointer:
    """Save and restore the state of one ``fit`` run in ``directory``."""

    def __init__(self, directory: str | os.PathLike, metadata: dict[str, Any], max_to_keep: int = 3):
        from numpyro_ebm._optional import require

        ocp = require("orbax.checkpoint", "Checkpointing")

        self._ocp = ocp
        self.directory = os.path.abspath(os.fspath(directory))
        self.metadata = metadata
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        )

    def close(self) -> None:
        """Wait for pending writes and stop Orbax's background threads."""
        self._manager.wait_until_finished()
        self._manager.close()

    def latest_iteration(self) -> int | None:
        return self._manager.latest_step()

    def save(self, iteration: int, carry: Any, trace: dict[str, Any]) -> None:
        ocp = self._ocp
        self._manager.save(
            iteration,
            args=ocp.args.Composite(
                carry=ocp.args.StandardSave(carry),
                trace=ocp.args.PyTreeSave(trace),
                meta=ocp.args.JsonSave({**self.metadata, "iteration": int(iteration)}),
            ),
            force=True,
        )
        self._manager.wait_until_finished()

    def restore(self, target_carry: Any) -> tuple[int, Any, dict[str, Any]] | None:
        """``(iteration, carry, trace)`` of the latest checkpoint, or ``None`` when the
        directory holds none. Raises ``ValueError`` for another run's checkpoint or one
        that cannot be read."""
        ocp = self._ocp
        step = self._manager.latest_step()
        if step is None:
            return None
        where = f"checkpoint at iteration {step} in {self.directory}"
        try:
            meta = self._manager.restore(
                step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
            ).meta
        except Exception as err:  # orbax raises several types for unreadable files
            raise ValueError(
                f"could not read the {where} ({type(err).__name__}: {err}); remove or move "
                "that step folder to resume from an earlier checkpoint"
            ) from err
        diffs = [
            f"{k}: checkpoint {meta.get(k)!r} vs this run {v!r}"
            for k, v in self.metadata.items()
            if meta.get(k) != v
        ]
        if diffs:
            raise ValueError(f"the {where} belongs to another run: " + "; ".join(diffs))
        try:
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    carry=ocp.args.StandardRestore(target_carry),
                    trace=ocp.args.PyTreeRestore(),
                ),
            )
        except Exception as err:
            raise ValueError(
                f"could not read the {where} ({type(err).__name__}: {err}); remove or move "
                "that step folder to resume from an earlier checkpoint"
            ) from err
        return int(step), restored.carry, restored.trace
