"""Export of a training run as an ``xarray.DataTree`` in ArviZ's layout (:func:`to_datatree`).

The tree holds the per-iteration statistics of the run (group ``sample_stats``) and the
walker snapshots (group ``walkers``), so that ArviZ's functions run on it unchanged.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
import xarray as xr
from arviz_base import dict_to_dataset

from numpyro_ebm.diagnostics._trace import check_fit_result, snapshot_khat
from numpyro_ebm.train import FitResult

__all__ = ["to_datatree"]

# per-iteration fields of FitResult.trace exported to the sample_stats group, in order
_STAT_FIELDS = (
    "ess",
    "normalized_ess",
    "resampled",
    "max_weight",
    "log_normalizer",
    "cross_entropy",
    "data_energy",
    "grad_norm",
    "step_size",
    "num_lineages",
    "num_nonfinite",
    "max_abs_potential",
    "num_substeps",
    "substep_target_missed",
    "acceptance",
    "probe_acceptance",
    "rejuvenated",
    "mala_acceptance",
    "energy_penalty",
)
_SAMPLE_DIMS = ["chain", "draw"]


def _key_name(entry: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def _named_leaves(tree: Any, default: str, prefix: str = "") -> list[tuple[str, np.ndarray]]:
    """``(name, array)`` for each leaf; a bare array is called ``default``."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    out = []
    for path, leaf in flat:
        name = "_".join(_key_name(p) for p in path) or default
        out.append((prefix + name, np.asarray(leaf)))
    return out


def _dataset(
    variables: dict[str, np.ndarray], *, coords: dict[str, np.ndarray], dims: dict[str, list[str]],
    meaning: str,
) -> xr.Dataset:
    """An ArviZ dataset of one chain whose ``draw`` dimension stands for ``meaning``."""
    import numpyro_ebm  # for the ArviZ attributes (inference_library); no import cycle at call

    return dict_to_dataset(
        variables,
        coords=coords,
        dims=dims,
        sample_dims=_SAMPLE_DIMS,
        inference_library=numpyro_ebm,
        attrs={"draw_meaning": meaning},
    )


def _sample_stats(trace: dict[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, list[str]]]:
    """``(variables, dims)`` of the ``sample_stats`` group: the recorded per-iteration fields,
    the numeric leaves of ``trace_fn``'s output (``extra_*``) and ``pareto_k`` (NaN between
    snapshots)."""
    num_iterations = len(trace["grad_norm"])
    stats: dict[str, np.ndarray] = {}
    dims: dict[str, list[str]] = {}
    for name in _STAT_FIELDS:
        if name in trace:
            stats[name] = np.asarray(trace[name])[None]
    if "extra" in trace:
        for name, leaf in _named_leaves(trace["extra"], "value", prefix="extra_"):
            if leaf.dtype.kind in "biuf":
                stats[name] = leaf[None]
                dims[name] = [f"{name}_dim_{i}" for i in range(leaf.ndim - 1)]
    khat = snapshot_khat(trace)
    if khat is not None:
        full = np.full(num_iterations, np.nan)
        full[np.asarray(trace["snapshots"]["iteration"])] = khat
        stats["pareto_k"] = full[None]
    return stats, dims


def _kept_snapshots(iterations: np.ndarray, snapshot_every: int | None) -> np.ndarray:
    """Mask of the snapshots at multiples of ``snapshot_every`` (all for ``None``)."""
    if snapshot_every is None:
        return np.ones(len(iterations), bool)
    if isinstance(snapshot_every, bool) or not isinstance(snapshot_every, int):
        raise TypeError("`snapshot_every` must be an integer")
    recorded = int(iterations[1] - iterations[0]) if len(iterations) > 1 else 1
    if snapshot_every < 1 or snapshot_every % recorded:
        raise ValueError(
            f"`snapshot_every` must be a positive multiple of the fit's "
            f"snapshot interval {recorded}, got {snapshot_every}"
        )
    return iterations % snapshot_every == 0


def _walkers_dataset(snaps: dict[str, Any], keep: np.ndarray) -> xr.Dataset:
    """The ``walkers`` group: the kept snapshots' positions and log weights, walkers as draws."""
    iterations = np.asarray(snaps["iteration"])
    walkers: dict[str, np.ndarray] = {}
    wdims: dict[str, list[str]] = {}

    def add(name: str, leaf: np.ndarray) -> None:
        # (snapshot, walker, *event) -> (chain=1, draw=walker, iteration, *event)
        leaf = np.moveaxis(np.asarray(leaf)[keep], 0, 1)[None]
        walkers[name] = leaf
        wdims[name] = ["iteration"] + [f"{name}_dim_{i}" for i in range(leaf.ndim - 3)]

    for name, leaf in _named_leaves(snaps["particles"], "x"):
        add(name, leaf)
    for name in ("log_weights", "log_weights_before_resampling"):
        if name in snaps:
            add(name, snaps[name])
    num_walkers = next(iter(walkers.values())).shape[1]
    return _dataset(
        walkers,
        coords={"draw": np.arange(num_walkers), "iteration": iterations[keep]},
        dims=wdims,
        meaning="walker",
    )


def to_datatree(result: FitResult, *, snapshot_every: int | None = None) -> xr.DataTree:
    """Export a :func:`numpyro_ebm.fit` result as an ``xarray.DataTree`` (ArviZ 1.x layout).

    Groups:

    ``sample_stats``
        One chain whose ``draw`` is the training iteration :math:`k`. Variables (those
        the method recorded; the others are absent, never filled in): ``ess``
        (:math:`(\\sum w)^2/\\sum w^2`, after the move :math:`\\theta_k \\to \\theta_{k+1}`,
        before resampling), ``normalized_ess`` (ESS/N), ``resampled``, ``max_weight``
        (largest normalised weight), ``log_normalizer``
        (:math:`\\widehat{\\log Z_{\\theta_k}/Z_{\\theta_0}}`), ``cross_entropy`` (the
        estimate, when ``fit`` had ``log_z0``), ``data_energy``, ``grad_norm``,
        ``step_size``, ``pareto_k``
        (:func:`~numpyro_ebm.diagnostics.weights.pareto_khat` of the same weights as
        ``ess``; evaluated at the snapshot iterations only, NaN elsewhere) and ``extra_*``
        (the leaves of ``trace_fn``'s output).
    ``walkers`` (when ``fit`` recorded snapshots)
        The walkers as the ``draw`` dimension of one ``chain``, with an ``iteration``
        dimension for the snapshot iterations: the positions (variable ``x`` for an array,
        one variable per leaf for a pytree) and, for ``"jarzynski"``, their normalised
        ``log_weights`` at :math:`\\theta_k` (what the gradient at iteration :math:`k`
        used) and ``log_weights_before_resampling`` (after the move to
        :math:`\\theta_{k+1}`; not paired with the positions when ``resampled[k]``).

    ArviZ functions run on the groups as they are, e.g.
    ``arviz_stats.ess(dt, group="walkers")`` or ``arviz_plots.plot_trace(dt,
    group="sample_stats")``. The tree round-trips through ``to_netcdf`` /
    ``xarray.open_datatree`` (needs ``h5netcdf`` or ``netCDF4``).

    Parameters
    ----------
    result
        What :func:`numpyro_ebm.fit` returned (any method).
    snapshot_every
        Keep only the snapshots at multiples of this many iterations; it must be a
        multiple of the ``snapshot_every`` given to ``fit``. ``None``: keep all.
    """
    result = check_fit_result(result)
    trace = result.trace
    num_iterations = len(trace["grad_norm"])
    stats, dims = _sample_stats(trace)
    root_attrs = {
        "method": result.method,
        "num_iterations": num_iterations,
        "num_walkers": int(np.shape(result.state.log_weights)[0]),
    }
    groups: dict[str, xr.Dataset] = {
        "/": xr.Dataset(attrs=root_attrs),
        "sample_stats": _dataset(
            stats, coords={"draw": np.arange(num_iterations)}, dims=dims, meaning="training iteration"
        ),
    }
    snaps = trace.get("snapshots")
    if snapshot_every is not None and not snaps:
        raise ValueError(
            "`snapshot_every` was given but the run recorded no snapshots: call "
            "fit(..., snapshot_every=m) first"
        )
    if snaps:
        keep = _kept_snapshots(np.asarray(snaps["iteration"]), snapshot_every)
        groups["walkers"] = _walkers_dataset(snaps, keep)
    return xr.DataTree.from_dict(groups)
