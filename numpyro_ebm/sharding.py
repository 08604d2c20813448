r"""Walkers sharded over devices.

The walker axis (the leading axis of ``particles``, ``log_weights``, ``potential`` and
``grad``) is split over the devices of a :class:`jax.sharding.Mesh`; parameters are
replicated. Everything else is left to XLA's sharding propagation (GSPMD) inside the
jitted loop: the ULA moves and energy evaluations run where their walkers live, while the
quantities that couple the walkers stay global:

* the normalisation :math:`\log\sum_i e^{A^i}` of the weights, the ESS and the
  log-normaliser increment are reductions over all walkers (an all-reduce);
* the weighted parameter gradient :math:`\sum_i w_i \nabla_\theta U(X^i)` is a sum over
  all walkers (an all-reduce of one parameter-sized tree);
* resampling draws global ancestor indices from all the weights and gathers the chosen
  walkers across devices.

JAX's default PRNG (``threefry`` with ``jax_threefry_partitionable``, the default) draws
the same numbers whatever the sharding, so a sharded run reproduces the single-device run
with the same key up to the order of floating-point reductions.

With several processes (hosts, or one process per GPU), call
:func:`numpyro_ebm.distributed.initialize` on each process first; a ``Mesh`` over
``jax.devices()`` (all processes' devices, :func:`numpyro_ebm.distributed.global_mesh`)
then shards the walkers over every device of every process and the same code runs
unchanged. Host arrays are then placed with :func:`jax.make_array_from_callback`, so
each process copies only the rows its own devices hold (see the docs page "Scale").
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from numpyro_ebm.distributed import spans_processes
from numpyro_ebm.kernels.base import JarzynskiState

__all__ = [
    "walker_sharding", "replicated", "shard_state", "constrain_state", "check_mesh",
    "place_for_training", "spans_processes", "place", "place_walkers", "place_train_state",
]


def check_mesh(mesh: Any, num_walkers: int) -> Mesh:
    """``mesh`` if it is a :class:`jax.sharding.Mesh` whose size divides ``num_walkers``;
    otherwise a clear error naming the argument."""
    if not isinstance(mesh, Mesh):
        raise TypeError(f"`mesh` must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    if num_walkers % mesh.size:
        raise ValueError(
            f"`num_walkers` ({num_walkers}) must be a multiple of the number of devices in "
            f"`mesh` ({mesh.size}) to shard the walkers evenly"
        )
    return mesh


def place(tree: Any, sharding: Any) -> Any:
    """``tree`` on ``sharding`` (one :class:`NamedSharding`, or a tree of them matching
    ``tree``). On one process: :func:`jax.device_put`. Over several processes, each leaf
    becomes one global array: a host or single-device array (the same on every process)
    through :func:`jax.make_array_from_callback`, so each process copies only the part its
    devices hold; an array already spread over the processes is resharded inside ``jit``."""
    mesh = sharding.mesh if isinstance(sharding, NamedSharding) else jax.tree.leaves(sharding)[0].mesh
    if not spans_processes(mesh):
        return jax.device_put(tree, sharding)

    def put(leaf, target):
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            if leaf.sharding == target:
                return leaf
            return jax.jit(lambda x: x, out_shardings=target)(leaf)
        host = np.asarray(leaf)
        return jax.make_array_from_callback(host.shape, target, lambda index: host[index])

    if isinstance(sharding, NamedSharding):
        return jax.tree.map(lambda leaf: put(leaf, sharding), tree)
    return jax.tree.map(put, tree, sharding)


def place_train_state(state: Any, mesh: Mesh) -> Any:
    """A :class:`~numpyro_ebm.training.trainer.TrainState` on ``mesh``: the walker state as
    :func:`shard_state` places it, the lineage split the same way, everything else
    (parameters, optimiser state, cached walker gradient, counters) copied to every device.
    A state restored from a checkpoint takes this placement too."""
    split = walker_sharding(mesh)
    rest = place(state._replace(walkers=None, lineage=None), replicated(mesh))
    walkers = place(state.walkers, _state_shardings(state.walkers, mesh))
    lineage = None if state.lineage is None else place(state.lineage, split)
    return rest._replace(walkers=walkers, lineage=lineage)


def place_walkers(particles: Any, mesh: Mesh) -> Any:
    """The walkers' positions split over ``mesh`` (:func:`place`)."""
    return place(particles, walker_sharding(mesh))


def walker_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (walker) axis split over all axes of ``mesh``, other axes whole."""
    return NamedSharding(mesh, PartitionSpec(tuple(mesh.axis_names)))


def replicated(mesh: Mesh) -> NamedSharding:
    """A full copy on every device of ``mesh``."""
    return NamedSharding(mesh, PartitionSpec())


def _state_shardings(state: JarzynskiState, mesh: Mesh) -> JarzynskiState:
    split, whole = walker_sharding(mesh), replicated(mesh)
    per_walker = lambda tree: jax.tree.map(lambda _: split, tree)  # noqa: E731
    return JarzynskiState(
        particles=per_walker(state.particles),
        log_weights=split,
        params=jax.tree.map(lambda _: whole, state.params),
        potential=split,
        grad=per_walker(state.grad),
        log_normalizer=whole,
    )


def shard_state(state: JarzynskiState, mesh: Mesh) -> JarzynskiState:
    """Place ``state`` on ``mesh``: walkers split, parameters and log normaliser copied."""
    return jax.device_put(state, _state_shardings(state, mesh))


def constrain_state(state: JarzynskiState, mesh: Mesh) -> JarzynskiState:
    """Inside ``jit``: ask XLA to keep ``state`` sharded as :func:`shard_state` places it."""
    return jax.lax.with_sharding_constraint(state, _state_shardings(state, mesh))


def place_for_training(mesh: Mesh, data: Any, params: Any, num_walkers: int | None):
    """``(data, params, constrain)`` for a training run on ``mesh``: parameters
    replicated, data split when their number is a multiple of the mesh size (otherwise
    replicated), and ``constrain(walkers)`` for inside ``jit``."""
    if num_walkers is not None:
        check_mesh(mesh, num_walkers)
    elif not isinstance(mesh, Mesh):
        raise TypeError(f"`mesh` must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    num_data = jax.tree.leaves(data)[0].shape[0]
    whole = replicated(mesh)
    params = place(params, whole)
    data = place(data, walker_sharding(mesh) if num_data % mesh.size == 0 else whole)
    return data, params, lambda state: constrain_state(state, mesh)
