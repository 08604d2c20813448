r"""``fit``: the convenience entry point, :func:`~numpyro_ebm.training.build_trainer` plus
:func:`~numpyro_ebm.training.run` plus the default callbacks.

Everything ``fit`` does is reachable piece by piece: the kernel object
(:mod:`numpyro_ebm.kernels`), the pure step (:func:`~numpyro_ebm.training.build_trainer`),
the loop (:func:`~numpyro_ebm.training.run`) and the callbacks
(:mod:`numpyro_ebm.training.callbacks`).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from numpyro_ebm import _checks
from numpyro_ebm.errors import InitialWalkersWarning
from numpyro_ebm.kernels import cd, jarzynski_ula, ula
from numpyro_ebm.kernels.base import JarzynskiState, PotentialFn, WalkerKernel
from numpyro_ebm.step_size import StepSizeAdaptation
from numpyro_ebm.training.callbacks import (
    Checkpoint,
    DegeneracyCheck,
    DivergenceCheck,
    NonFiniteError,
    NonFiniteStop,
    ProgressBar,
    Snapshots,
)
from numpyro_ebm.training.loop import run
from numpyro_ebm.training.trainer import TrainState, build_trainer

__all__ = ["fit", "FitResult", "METHODS", "make_kernel"]

METHODS = ("jarzynski", "pcd", "cd")


class FitResult(NamedTuple):
    """What :func:`fit` returns.

    params
        :math:`\\theta_K` after the run.
    state
        The final walkers (:class:`~numpyro_ebm.kernels.base.JarzynskiState`, weighted for
        :math:`\\theta_K`; equal weights for PCD and CD).
    trace
        ``dict`` of NumPy arrays, iteration axis first. Row ``k`` holds, at
        :math:`\\theta_k`: ``grad_norm``, ``data_energy`` (mean :math:`U_{\\theta_k}` over the
        batch), ``max_abs_potential``, and for weighted kernels ``log_normalizer`` and
        ``cross_entropy`` (with ``log_z0``); from the move :math:`\\theta_k \\to
        \\theta_{k+1}`: ``step_size``, ``num_nonfinite`` and, weighted, ``ess``,
        ``normalized_ess``, ``max_weight``, ``resampled`` (before resampling),
        ``num_substeps`` (adaptive schedule), ``acceptance`` (step-size adaptation: the
        proxy) and ``probe_acceptance`` (its probe, NaN between probes).
        ``extra`` holds ``trace_fn(params, walkers)``; ``snapshots`` the
        :class:`~numpyro_ebm.training.callbacks.Snapshots`.
    opt_state
        The optimiser state after the last update.
    method
        The kernel's name.
    train_state
        The whole :class:`~numpyro_ebm.training.trainer.TrainState`: pass it as
        ``fit(..., init_state=)`` to continue the run in memory.
    """

    params: Any
    state: JarzynskiState
    trace: dict[str, Any]
    opt_state: Any
    method: str
    train_state: TrainState | None = None


def make_kernel(kernel: str | WalkerKernel, step_size: float | None) -> WalkerKernel:
    """``kernel`` itself, or the default kernel object of the method it names."""
    if isinstance(kernel, WalkerKernel):
        if step_size is not None:
            raise ValueError("`step_size` is part of the kernel object; leave `step_size` unset "
                             "when `kernel` is a WalkerKernel")
        return kernel
    if kernel not in METHODS:
        raise ValueError(f"`kernel` must be a WalkerKernel or one of {METHODS}, got {kernel!r}")
    if step_size is None:
        raise ValueError(f"`step_size` is needed with `kernel={kernel!r}`")
    return {"jarzynski": jarzynski_ula, "pcd": ula, "cd": cd}[kernel].walker_kernel(step_size)


def _validate(potential_fn, params, data, num_iterations, data_batch_size, log_z0, rng_key):
    if not callable(potential_fn):
        raise TypeError("`potential_fn` must be callable: potential_fn(params, x) -> scalar")
    _checks.check_int_at_least("num_iterations", num_iterations, 1)
    _checks.check_key("rng_key", rng_key)
    num_data = _checks.leading_size("data", data)
    _checks.check_finite_tree("data", data)
    if data_batch_size is not None:
        _checks.check_int_at_least("data_batch_size", data_batch_size, 1)
        if data_batch_size > num_data:
            raise ValueError(f"`data_batch_size` ({data_batch_size}) exceeds the number of data "
                             f"points ({num_data})")
    if log_z0 is not None and not math.isfinite(float(log_z0)):
        raise ValueError(f"`log_z0` must be finite, got {log_z0}")
    _checks.check_finite_tree("params", params)
    _checks.check_scalar_potential(potential_fn, params, jax.tree.map(lambda leaf: leaf[0], data))
    return num_data


def _as_dtype(tree, dtype):
    """Floating leaves of ``tree`` as JAX arrays of ``dtype``, other leaves as they are."""
    def cast(leaf):
        leaf = jnp.asarray(leaf)
        return leaf.astype(dtype) if jnp.issubdtype(leaf.dtype, jnp.floating) else leaf
    return jax.tree.map(cast, tree)


def _initial_particles(kernel, init_particles, num_walkers, data, num_data, init_key):
    if num_walkers is None:
        raise ValueError("`num_walkers` is needed unless `init_state` is given")
    _checks.check_int_at_least("num_walkers", num_walkers, 2)
    if isinstance(init_particles, str):
        if init_particles != "standard_normal":
            raise ValueError("`init_particles` must be an array, a callable (rng_key, num_walkers) "
                             f"-> particles, 'standard_normal' or None, got {init_particles!r}")
    elif init_particles is None and kernel.weighted:
        warnings.warn(
            "`init_particles` not given: the walkers start at N(0, I) draws with equal weights, "
            "which is right only when the initial model rho_theta0 is N(0, I). Pass draws from "
            "rho_theta0 (or init_particles='standard_normal' to say N(0, I) is meant).",
            InitialWalkersWarning, stacklevel=3)
    if init_particles is None or isinstance(init_particles, str):
        if kernel.restart is not None:  # CD: data points
            idx = jax.random.randint(init_key, (num_walkers,), 0, num_data)
            init_particles = jax.tree.map(lambda leaf: leaf[idx], data)
        else:
            init_particles = jax.tree.map(
                lambda leaf: jax.random.normal(init_key, (num_walkers, *leaf.shape[1:]), leaf.dtype),
                data,
            )
    elif callable(init_particles):
        init_particles = init_particles(init_key, num_walkers)
    n_init = _checks.leading_size("init_particles", init_particles)
    if n_init != num_walkers:
        raise ValueError(f"`init_particles` holds {n_init} walkers but `num_walkers` is {num_walkers}")
    _checks.check_same_event_shape("init_particles", init_particles, "data", data)
    return init_particles


def _default_callbacks(callbacks, progress):
    callbacks = list(callbacks or ())
    have = lambda cls: any(isinstance(cb, cls) for cb in callbacks)  # noqa: E731
    head = [] if have(NonFiniteStop) else [NonFiniteStop()]
    tail = [ProgressBar()] if progress and not have(ProgressBar) else []
    tail += [] if have(DivergenceCheck) else [DivergenceCheck()]
    tail += [] if have(DegeneracyCheck) else [DegeneracyCheck()]
    return head + callbacks + tail


def fit(
    potential_fn: PotentialFn,
    params: Any,
    data: Any,
    *,
    optimizer: optax.GradientTransformation,
    num_iterations: int,
    rng_key: jax.Array,
    kernel: str | WalkerKernel = "jarzynski",
    step_size: float | None = None,
    num_walkers: int | None = None,
    init_particles: Any = None,
    init_state: TrainState | None = None,
    data_batch_size: int | None = None,
    log_z0: float | None = None,
    trace_fn: Callable[[Any, JarzynskiState], Any] | None = None,
    trace_every: int = 1,
    step_size_adaptation: StepSizeAdaptation | None = None,
    energy_penalty: Any = None,
    callbacks: Any = None,
    progress: bool = False,
    chunk_size: int | None = None,
    mesh: Any = None,
) -> FitResult:
    """Train ``potential_fn`` (the energy :math:`U_\\theta(x)` of ONE sample) on ``data``
    (sample axis first) by its cross-entropy.

    ``kernel``: ``"jarzynski"`` (weighted walkers, the paper's method), ``"pcd"``,
    ``"cd"`` (these three need ``step_size``, the ULA :math:`h`), or a kernel object from
    :mod:`numpyro_ebm.kernels` (``jarzynski_ula.walker_kernel(h, ess_threshold=...,
    num_mcmc_steps=..., walker_batch_size=..., noise_dtype=...)``,
    ``adaptive_jarzynski_ula.walker_kernel(h, target_ess=...)``, ``ula.walker_kernel(h)``,
    ``cd.walker_kernel(h, restart_every=...)``). ``num_walkers`` :math:`N \\ge 2` walkers
    start at ``init_particles`` (an array, or ``(rng_key, N) -> particles``); for Jarzynski
    they must be draws from the initial model :math:`\\rho_{\\theta_0}` (the weights start
    equal); default: standard normal draws (data points for CD), with an
    :class:`~numpyro_ebm.errors.InitialWalkersWarning` for weighted kernels unless
    ``init_particles="standard_normal"`` says so. Data and walkers are cast to the floating
    dtype of the energy (that of the params). ``init_state`` (a
    ``FitResult.train_state``) continues a run instead: with the same ``rng_key`` the
    result equals one longer run. ``data_batch_size``: minibatches by epoch
    (:func:`~numpyro_ebm.training.run`); ``None``: the whole data set. ``log_z0``
    (:math:`\\log Z_{\\theta_0}`) adds the cross-entropy estimate to the trace.
    ``trace_fn(params, walkers)`` is recorded in ``trace["extra"]``, evaluated every
    ``trace_every`` iterations (rows in between read as missing, e.g. NaN; see
    :func:`~numpyro_ebm.training.trainer.build_trainer`). ``step_size_adaptation``
    (:func:`numpyro_ebm.step_size.step_size_adaptation`) tunes :math:`h` (weighted kernels).
    ``energy_penalty`` (:func:`numpyro_ebm.training.penalties.squared_energy`) adds a penalty
    on the energies that **changes the objective** (:mod:`numpyro_ebm.training.penalties`).
    ``callbacks`` (:mod:`numpyro_ebm.training.callbacks`: ``Snapshots``, ``ParetoKhat``,
    ``Checkpoint``, ...) run between chunks of ``chunk_size`` iterations; ``NonFiniteStop``,
    ``DivergenceCheck`` and ``DegeneracyCheck`` are added unless given, and ``progress=True``
    adds a ``ProgressBar``. ``mesh`` (a :class:`jax.sharding.Mesh`) splits the walkers over
    its devices (:mod:`numpyro_ebm.sharding`); a mesh over the devices of several processes
    (:func:`numpyro_ebm.distributed.global_mesh`) splits them over every process, each of
    which calls ``fit`` with the same arguments (checked: a ``ValueError`` names the
    arguments that differ) and gets the same result, its walkers as global arrays
    (:func:`numpyro_ebm.distributed.to_host` gathers them).

    ``rng_key`` is split into an initialisation key and a loop key; iteration ``k`` uses
    ``fold_in(loop_key, k)``, so results depend neither on ``chunk_size`` nor on a resume.

    Raises :class:`~numpyro_ebm.training.callbacks.NonFiniteError` when every walker or the
    gradient became non-finite; ``error.result`` is the :class:`FitResult` at the start of
    the failing iteration.
    """
    if not isinstance(step_size_adaptation, StepSizeAdaptation | None):
        raise TypeError("`step_size_adaptation` must come from numpyro_ebm.step_size.step_size_adaptation")
    num_data = _validate(potential_fn, params, data, num_iterations, data_batch_size, log_z0, rng_key)
    kernel = make_kernel(kernel, step_size)
    init_key, loop_key = jax.random.split(rng_key)
    # one dtype: data and walkers take the energy's (the params') floating dtype
    dtype = jax.eval_shape(potential_fn, params, jax.tree.map(lambda leaf: leaf[0], data)).dtype
    data = _as_dtype(data, dtype)
    constrain = None
    if mesh is not None:
        from numpyro_ebm import sharding

        if isinstance(mesh, sharding.Mesh) and sharding.spans_processes(mesh):
            _check_processes_agree(locals())
        data, params, constrain = sharding.place_for_training(mesh, data, params, num_walkers)
    trainer = build_trainer(potential_fn, optimizer, kernel, log_z0=log_z0,
                            step_size_adaptation=step_size_adaptation, trace_fn=trace_fn,
                            trace_every=trace_every, constrain_walkers=constrain, energy_penalty=energy_penalty)
    if init_state is None:
        if mesh is not None and sharding.spans_processes(mesh) \
                and (init_particles is None or isinstance(init_particles, str)):
            # drawn where they live: each device draws only its own walkers (the same numbers)
            particles = jax.jit(lambda key: _as_dtype(_initial_particles(
                kernel, init_particles, num_walkers, data, num_data, key), dtype),
                out_shardings=sharding.walker_sharding(mesh))(init_key)
        else:
            particles = _as_dtype(
                _initial_particles(kernel, init_particles, num_walkers, data, num_data, init_key), dtype
            )
        if mesh is not None:
            particles = sharding.place_walkers(particles, mesh)
        init_state = trainer.init(params, particles)
    elif not isinstance(init_state, TrainState):
        raise TypeError(f"`init_state` must be a TrainState (FitResult.train_state), got "
                        f"{type(init_state).__name__}")
    if mesh is not None:  # every leaf on the mesh (also the target of a checkpoint restore)
        init_state = sharding.place_train_state(init_state, mesh)
    callbacks = _default_callbacks(callbacks, progress)
    _record_settings(callbacks, data_batch_size=data_batch_size, log_z0=log_z0,
                     trace_fn=trace_fn is not None, trace_every=trace_every,
                     step_size_adaptation=step_size_adaptation is not None,
                     energy_penalty=None if energy_penalty is None else repr(energy_penalty.alpha))
    try:
        with contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh):  # (kernels.base)
            result = run(loop_key, trainer, init_state, num_iterations, data=data,
                         data_batch_size=data_batch_size, chunk_size=chunk_size, callbacks=callbacks)
    except NonFiniteError as err:
        raise NonFiniteError(str(err), _fit_result(err.result, kernel)) from None
    return _fit_result(result, kernel)


def _check_processes_agree(args: dict[str, Any]) -> None:
    """Every process of a multi-process ``mesh`` must call ``fit`` alike (otherwise they
    compile different programs and wait on each other): compare the arguments that shape the
    run, by digest, across processes (:func:`numpyro_ebm.distributed.check_same_settings`)."""
    from numpyro_ebm import distributed
    from numpyro_ebm.training.callbacks import _optimizer_probe

    def name_of(fn):
        return None if fn is None else getattr(fn, "__qualname__", type(fn).__name__)

    init = args["init_particles"]
    kernel = args["kernel"]
    settings = {
        "kernel": (kernel.name, sorted((k, repr(v)) for k, v in kernel.config.items())),
        "optimizer": _optimizer_probe(args["optimizer"], args["params"]),
        "init_particles": name_of(init) if callable(init) else init,
        "init_state_iteration": None if args["init_state"] is None else int(args["init_state"].iteration),
        "trace_fn": name_of(args["trace_fn"]), "trace_every": args["trace_every"],
        "potential_fn": name_of(args["potential_fn"]),
        # what shapes the chunks (compiled programs) and the collective Orbax saves
        "callbacks": [(type(cb).__name__, getattr(cb, "every", None), getattr(cb, "snapshot_every", None))
                      for cb in (args["callbacks"] or ()) if isinstance(cb, Checkpoint)
                      or getattr(cb, "every", None) or getattr(cb, "snapshot_every", None)],
        "mesh": (args["mesh"].axis_names, [d.id for d in args["mesh"].devices.flat]),
        "step_size_adaptation": args["step_size_adaptation"] is not None,
        "energy_penalty": repr(getattr(args["energy_penalty"], "alpha", args["energy_penalty"])),
    }
    for name in ("params", "data", "num_iterations", "rng_key", "num_walkers", "data_batch_size",
                 "log_z0", "chunk_size"):
        settings[name] = args[name]
    distributed.check_same_settings(settings, "fit")


def _record_settings(callbacks, **settings):
    """Add the settings that change the result to checkpoint records (compared on resume)."""
    snapshot_every = next((cb.snapshot_every for cb in callbacks if isinstance(cb, Snapshots)), None)
    for cb in callbacks:
        if isinstance(cb, Checkpoint):
            cb.metadata = {**settings, "snapshot_every": snapshot_every, **cb.metadata}


def _fit_result(result, kernel) -> FitResult:
    s = result.state
    return FitResult(params=s.params, state=s.walkers, trace=result.trace, opt_state=s.opt_state,
                     method=kernel.name, train_state=s)
