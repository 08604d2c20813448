r"""Walkers over several processes (hosts, GPUs) with JAX's multi-controller runtime.

Every process runs the same program: it calls :func:`initialize` (``jax.distributed``),
builds the :func:`global_mesh` over the devices of *all* processes, and calls
:func:`numpyro_ebm.fit` with the same arguments and ``mesh=``. The walkers are split over
every device of every process; parameters and optimiser state are copies on each device.
What couples the walkers is computed over all of them, across processes, by XLA's
collectives inside the one jitted loop:

* the normalised weights :math:`w_i = e^{A^i} / \sum_j e^{A^j}`, the ESS
  :math:`(\sum_i w_i)^2 / \sum_i w_i^2` and the log-normaliser increment
  :math:`\log \sum_i e^{A^i}` are reductions over all :math:`N` walkers (all-reduce);
* the walker term :math:`\sum_i w_i \nabla_\theta U_\theta(X^i)` of the gradient is an
  all-reduce of a parameter-sized tree, so every process takes the same optimiser step;
* resampling draws :math:`N` global ancestor indices from all the weights (the same
  draw on every process: the key is the same) and gathers the chosen walkers, which may
  live on another process.

JAX's default generator (``threefry``, partitionable) draws the same numbers whatever
the split, so a run on P processes equals the single-device run with the same key up to
the order of floating-point sums (``tests/test_distributed.py``).

Each process feeds only its own part of the walkers (and of the data, when their number
divides evenly): host arrays given to ``fit`` are placed with
:func:`jax.make_array_from_callback` (each process copies only the rows of its devices),
default initial walkers are drawn on the devices that hold them, and data already split
over the processes can be passed as one global array (:func:`shard_data`). Results leave
the devices with :func:`to_host` (a collective: call it on every process); files are
written by process 0 (:func:`is_main_process`); checkpoints go through Orbax, which
coordinates the processes itself (every process calls save and restore, the directory
must be shared).

Before training, ``fit`` compares its settings across processes
(:func:`check_same_settings`): processes that disagree would otherwise compile different
programs and wait on each other for ever.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

__all__ = [
    "initialize", "global_mesh", "is_main_process", "shard_data", "to_host", "check_same_settings",
    "setting_digest", "spans_processes", "global_checksum", "ENV_COORDINATOR", "ENV_NUM_PROCESSES",
    "ENV_PROCESS_ID",
]

ENV_COORDINATOR = "NUMPYRO_EBM_COORDINATOR"
ENV_NUM_PROCESSES = "NUMPYRO_EBM_NUM_PROCESSES"
ENV_PROCESS_ID = "NUMPYRO_EBM_PROCESS_ID"


def spans_processes(mesh: Mesh) -> bool:
    """True when ``mesh`` holds devices of more than one process."""
    return len({device.process_index for device in mesh.devices.flat}) > 1


def _from_env(value: Any, name: str, convert=str):
    if value is not None or os.environ.get(name) in (None, ""):
        return value
    try:
        return convert(os.environ[name])
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got "
                         f"{os.environ[name]!r}") from None


def _check_launch(coordinator_address, num_processes, process_id):
    if coordinator_address is not None:
        host, _, port = str(coordinator_address).rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"`coordinator_address` must be HOST:PORT (e.g. node0:12355), got "
                             f"{coordinator_address!r}")
    if num_processes is not None and (isinstance(num_processes, bool) or int(num_processes) < 1):
        raise ValueError(f"`num_processes` must be an integer >= 1, got {num_processes!r}")
    if process_id is not None:
        if num_processes is None:
            raise ValueError("`process_id` needs `num_processes`")
        if not 0 <= int(process_id) < int(num_processes):
            raise ValueError(f"`process_id` must lie in [0, num_processes) = [0, {num_processes}), "
                             f"got {process_id}")


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    cpu_devices: int | None = None,
    cpu_collectives: str = "gloo",
    initialization_timeout: int = 300,
    heartbeat_timeout_seconds: int = 100,
) -> None:
    """Join this process to the others (:func:`jax.distributed.initialize`); call it first,
    before anything touches a device.

    ``coordinator_address`` (``HOST:PORT`` of process 0), ``num_processes`` and
    ``process_id`` default to the environment variables ``NUMPYRO_EBM_COORDINATOR``,
    ``NUMPYRO_EBM_NUM_PROCESSES`` and ``NUMPYRO_EBM_PROCESS_ID``; what is still unset JAX
    finds itself on Slurm, Open MPI and Cloud TPU (and ``JAX_COORDINATOR_ADDRESS``).
    ``cpu_devices`` splits a CPU into that many devices per process (``jax_num_cpu_devices``;
    for tests); ``cpu_collectives`` is the cross-process collective library of CPU devices
    (``"gloo"``; GPUs use NCCL). A second call with the same layout does nothing."""
    coordinator_address = _from_env(coordinator_address, ENV_COORDINATOR)
    num_processes = _from_env(num_processes, ENV_NUM_PROCESSES, int)
    process_id = _from_env(process_id, ENV_PROCESS_ID, int)
    _check_launch(coordinator_address, num_processes, process_id)
    if jax.distributed.is_initialized():
        same = (num_processes in (None, jax.process_count())
                and process_id in (None, jax.process_index()))
        if not same:
            raise RuntimeError(
                f"jax.distributed is already initialised as process {jax.process_index()} of "
                f"{jax.process_count()}, not {process_id} of {num_processes}")
        return
    if cpu_devices is not None:
        if isinstance(cpu_devices, bool) or int(cpu_devices) < 1:
            raise ValueError(f"`cpu_devices` must be an integer >= 1, got {cpu_devices!r}")
        jax.config.update("jax_num_cpu_devices", int(cpu_devices))
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    jax.distributed.initialize(
        coordinator_address, num_processes, process_id,
        initialization_timeout=initialization_timeout,
        heartbeat_timeout_seconds=heartbeat_timeout_seconds,
    )


def global_mesh(axis_name: str = "walkers") -> Mesh:
    """A one-axis mesh over every device of every process (``jax.devices()``, process 0's
    devices first): pass it as ``fit(..., mesh=)``."""
    return Mesh(np.array(jax.devices()), (axis_name,))


def is_main_process() -> bool:
    """True on process 0, the one that writes files and prints."""
    return jax.process_index() == 0


def shard_data(local_data: Any, mesh: Mesh) -> Any:
    """One global array per leaf from each process's own rows
    (:func:`jax.make_array_from_process_local_data`): process ``p`` passes the ``p``-th
    contiguous part, of ``n / P`` rows, of ``n`` data in all (``n`` a multiple of the mesh
    size). Pass the result as ``fit``'s ``data``: no process then holds all the data."""
    from numpyro_ebm.sharding import walker_sharding  # (loads the kernels: after initialize)

    sharding = walker_sharding(mesh)
    return jax.tree.map(lambda leaf: jax.make_array_from_process_local_data(sharding, np.asarray(leaf)),
                        local_data)


def _leaf_to_host(leaf: Any) -> Any:
    if not isinstance(leaf, jax.Array):
        return leaf
    if leaf.is_fully_addressable or leaf.is_fully_replicated:
        return np.asarray(leaf)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))


def to_host(tree: Any) -> Any:
    """``tree`` with every array as a NumPy array on every process: arrays split over
    processes are gathered (a collective: every process must call it), the others copied.
    With one process it is :func:`jax.device_get`."""
    leaves = [leaf for leaf in jax.tree.leaves(tree) if isinstance(leaf, jax.Array)]
    if all(leaf.is_fully_addressable for leaf in leaves):
        return jax.device_get(tree)
    return jax.tree.map(_leaf_to_host, tree)


def global_checksum(x: jax.Array) -> str:
    r"""A fingerprint of the values of an array spread over processes that does not depend
    on how it is split: with :math:`b_j` the array's bits as 32-bit words (in row-major
    order) and :math:`m_j` a mix of the position :math:`j`, the two sums
    :math:`\sum_j b_j m_j` and :math:`\sum_j (b_j \oplus m_j)` modulo :math:`2^{32}` (a
    global reduction, exact in any order), with the shape and dtype."""
    import jax.numpy as jnp

    def sums(x):
        words = jax.lax.bitcast_convert_type(x, jnp.uint32).reshape(-1)  # 8-byte: 2 words each
        pos = jnp.arange(words.shape[0], dtype=jnp.uint32)
        mix = (pos * jnp.uint32(0x9E3779B1)) ^ (pos >> 15) ^ jnp.uint32(0x7F4A7C15)
        return jnp.stack([jnp.sum(words * (mix | 1), dtype=jnp.uint32),
                          jnp.sum(words ^ mix, dtype=jnp.uint32)])

    if x.dtype.itemsize not in (4, 8):
        x = x.astype(jnp.float32)
    value = np.asarray(jax.jit(sums)(x))
    return f"{tuple(x.shape)}{x.dtype}:{int(value[0]):08x}{int(value[1]):08x}"


def setting_digest(value: Any) -> np.ndarray:
    """Two 32-bit words of a SHA-256 of ``value``: arrays by shape, dtype and bytes (arrays
    already split over processes by shape, dtype and sharding only), other values by
    ``repr``; pytrees leaf by leaf."""
    digest = hashlib.sha256()
    digest.update(str(jax.tree.structure(value)).encode())
    for leaf in jax.tree.leaves(value):
        if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        if isinstance(leaf, jax.Array) and not (leaf.is_fully_addressable or leaf.is_fully_replicated):
            digest.update(f"global{leaf.shape}{leaf.dtype}{leaf.sharding.spec}".encode())
        elif isinstance(leaf, np.ndarray | jax.Array | np.generic):
            arr = np.ascontiguousarray(np.asarray(leaf))
            digest.update(f"{arr.shape}{arr.dtype}".encode() + arr.tobytes())
        else:
            digest.update(repr(leaf).encode())
    return np.frombuffer(digest.digest()[:8], np.uint32)


def check_same_settings(settings: dict[str, Any], caller: str = "fit") -> None:
    """Raise ``ValueError`` on every process, naming the settings that differ, when the
    processes were given different ``settings`` (a dict with the same keys everywhere).
    One all-gather of two words per setting; nothing with one process."""
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    names = sorted(settings)
    mine = np.stack([setting_digest(name) for name in names]
                    + [setting_digest(settings[name]) for name in names])
    everyone = np.asarray(multihost_utils.process_allgather(mine))  # (P, 2K, 2)
    differs = np.any(everyone != everyone[:1], axis=(0, 2))
    if differs[: len(names)].any():
        raise ValueError(f"the {jax.process_count()} processes run different versions of "
                         f"`{caller}` (its settings have other names): use one installation")
    bad = [name for name, d in zip(names, differs[len(names):], strict=True) if d]
    if bad:
        procs = np.flatnonzero(np.any(everyone[:, len(names):] != everyone[:1, len(names):], axis=(1, 2)))
        here = ", ".join(f"{name}={_short(settings[name])}" for name in bad)
        raise ValueError(
            f"the {jax.process_count()} processes called `{caller}` with different settings: "
            f"{', '.join(bad)} differ between process 0 and process(es) "
            f"{', '.join(map(str, procs))} (here, process {jax.process_index()}: {here}). Every "
            f"process must call `{caller}` with the same arguments and the same `rng_key`.")


def _short(value: Any) -> str:
    text = repr(value) if not hasattr(value, "shape") else f"array{tuple(value.shape)}"
    return text if len(text) <= 60 else text[:57] + "..."
