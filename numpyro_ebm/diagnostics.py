r"""Diagnostics of a training run: weight health, ArviZ export and plots.

Jarzynski weights are importance weights: the walkers :math:`X^i` with normalised weights
:math:`w_i` (:math:`\sum_i w_i = 1`) stand for the model :math:`\rho_{\theta_k}`. Two numbers
say how far they are from degenerate:

* the effective sample size :math:`\mathrm{ESS} = (\sum_i w_i)^2 / \sum_i w_i^2`, between 1
  (one walker carries all the weight) and :math:`N` (equal weights); ``normalized_ess`` is
  :math:`\mathrm{ESS}/N`;
* the Pareto :math:`\hat k`: the shape of a generalised Pareto distribution fitted to the
  largest weights (Pareto-smoothed importance sampling, Vehtari et al.). The weights'
  :math:`1/\hat k`-th and higher moments are estimated not to exist. For
  :math:`\hat k < 0.5` the variance of the weights is finite and weighted averages converge
  at the usual rate; above :math:`0.7` the tail is so heavy that they are unreliable even
  for large :math:`N` (the ESS then overstates the quality of the sample), which is why
  0.7 is the threshold used here and in ArviZ.

Division of work: the ESS, the largest weight and the other per-iteration quantities are
jittable reductions, recorded inside :func:`numpyro_ebm.fit`'s jitted loop. PSIS is
NumPy code in ArviZ (sorting, a generalised-Pareto fit); it is not reimplemented, so
:math:`\hat k` is computed on the host, from the walker snapshots that ``fit`` records
every ``snapshot_every`` iterations (:func:`pareto_khat`, by :func:`to_datatree` and
:func:`plot_training`, or by ``fit`` itself when given ``khat_fn=pareto_khat``).

This module depends on ArviZ (arviz-base, arviz-stats), xarray and matplotlib; the
training core does not import it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import xarray as xr
from arviz_base import dict_to_dataset
from arviz_stats.base import array_stats
from blackjax.smc.ess import ess as blackjax_ess
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from numpyro_ebm.train import FitResult

__all__ = [
    "KHAT_THRESHOLD",
    "effective_sample_size",
    "pareto_khat",
    "psis_tail_length",
    "TooFewWalkersWarning",
    "to_datatree",
    "plot_training",
    "plot_samples",
]

class TooFewWalkersWarning(UserWarning):
    """Too few walkers of positive weight for ArviZ's Pareto tail fit: k-hat is NaN."""


# ArviZ's PSIS raises for a tail of fewer than 5 draws, and its generalised-Pareto fit
# returns NaN for 5 (the tail's first quartile is its minimum): 6 is the least that fits.
_MIN_TAIL = 6

KHAT_THRESHOLD = 0.7
"""Pareto :math:`\\hat k` above which importance weights are considered unreliable."""

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
)
_SAMPLE_DIMS = ["chain", "draw"]
_ESS_YMAX = 1.35  # top of the ESS panel: the band above 1 is the legend's


# ---------------------------------------------------------------------------------------
# Weight diagnostics
# ---------------------------------------------------------------------------------------


def _as_log_weights(log_weights: Any) -> np.ndarray:
    """Log weights as float64, walker axis last; :math:`-\\infty` (weight 0) is allowed.

    A state returned by training can hold walkers of weight zero (a move that produced a
    non-finite position or energy gets :math:`\\log w_i = -\\infty`). NaN and
    :math:`+\\infty` are rejected, and so is a row in which every weight is zero.
    """
    lw = np.asarray(log_weights, dtype=np.float64)
    if lw.ndim == 0:
        raise ValueError("`log_weights` must have a walker axis (the last), got a scalar")
    if lw.shape[-1] < 2:
        raise ValueError(f"`log_weights` needs at least 2 walkers, got {lw.shape[-1]}")
    if np.any(np.isnan(lw) | (lw == np.inf)):
        raise ValueError("`log_weights` contains non-finite values (NaN or +inf)")
    if not np.all(np.any(np.isfinite(lw), axis=-1)):
        raise ValueError("`log_weights` has a row where every weight is zero (all -inf)")
    return lw


def effective_sample_size(log_weights: Any) -> np.ndarray | float:
    """ESS :math:`(\\sum_i w_i)^2 / \\sum_i w_i^2` of weights :math:`w_i = e^{a_i}`.

    ``log_weights`` may be unnormalised; the last axis is the walker axis. Computed in log
    space by BlackJAX's ``blackjax.smc.ess.ess``.
    """
    lw = _as_log_weights(log_weights)
    flat = lw.reshape(-1, lw.shape[-1])
    with jax.enable_x64(True):  # host-side diagnostic: keep the float64 of the input
        out = np.asarray(jax.vmap(blackjax_ess)(jax.numpy.asarray(flat)), np.float64)
    out = out.reshape(lw.shape[:-1])
    return float(out) if out.ndim == 0 else out


def psis_tail_length(num_draws: int, r_eff: float = 1.0) -> int:
    """Number of largest weights PSIS fits the Pareto tail to (ArviZ's rule, right tail):

    .. math:: M = \\lfloor 3 \\sqrt{n / r_{\\text{eff}}} \\rfloor \\text{ if } n r_{\\text{eff}} > 225,
              \\qquad M = \\lfloor n / 5 \\rfloor \\text{ otherwise.}

    The fit needs :math:`M \\ge 6` (ArviZ raises for :math:`M < 5`, its generalised-Pareto
    fit gives NaN for :math:`M = 5`), i.e. :math:`n \\ge 30` positive weights for
    :math:`r_{\\text{eff}} = 1`.
    """
    if num_draws * r_eff > 225:
        return int(math.floor(3 * math.sqrt(num_draws / r_eff)))
    return int(num_draws // 5)


def _row_khat(row: np.ndarray, r_eff: float) -> float | None:
    """k-hat of one row of log weights; NaN without a tail; None when too few walkers."""
    row = row[np.isfinite(row)]  # -inf: weight 0, no part of the tail
    tail_length = psis_tail_length(row.size, r_eff)
    if tail_length < _MIN_TAIL:
        return None
    tail = np.sort(row)[-tail_length:]
    if np.ptp(tail) <= 1e-12 * max(1.0, float(np.max(np.abs(tail)))):
        return math.nan  # equal largest weights (e.g. just after resampling): no tail
    # ArviZ's psislw takes negated log ratios (the log-likelihood convention of
    # PSIS-LOO, where the ratios are 1 / p(y_i | theta)): pass -a to fit the tail of e^a.
    _, khat = array_stats.psislw(-row, r_eff=float(r_eff))
    return float(khat)


def pareto_khat(log_weights: Any, *, r_eff: float = 1.0) -> np.ndarray | float:
    """Pareto :math:`\\hat k` of importance weights :math:`w_i \\propto e^{a_i}`, by ArviZ's PSIS.

    A generalised Pareto distribution is fitted to the largest weights (ArviZ's
    Pareto-smoothed importance sampling, :func:`arviz_stats` ``psislw``; nothing is
    reimplemented here). :math:`\\hat k` estimates the tail shape: the weights have about
    :math:`1/\\hat k` finite moments. :math:`\\hat k < 0.5`: finite variance, reliable;
    :math:`0.5 \\le \\hat k \\le 0.7`: usable with care; :math:`\\hat k >` 0.7
    (:data:`KHAT_THRESHOLD`): weighted averages are unreliable whatever the ESS says.

    Parameters
    ----------
    log_weights
        Log weights, normalised or not (shift-invariant); the last axis is the walker
        axis, leading axes are a batch (e.g. snapshots). Entries :math:`-\\infty` are
        walkers of weight 0 (as training leaves walkers whose move was not finite); they
        are dropped before the fit. NaN or :math:`+\\infty` raise ``ValueError``.
    r_eff
        Relative efficiency of the draws (ESS / N of the walkers as a sample, before
        weighting); 1 for independent walkers. It sets the tail length PSIS uses
        (:func:`psis_tail_length`).

    Returns
    -------
    A float for a 1-D input, else an array over the batch axes. NaN where the largest
    weights are all equal (e.g. just after resampling): there is no tail to fit; and NaN
    where there are too few walkers of positive weight for the fit (fewer than 30 for
    ``r_eff=1``).

    Warns
    -----
    TooFewWalkersWarning
        When some row has fewer positive weights than the Pareto fit needs (its tail
        of :func:`psis_tail_length` weights must hold at least 6); those rows are NaN.
    """
    lw = _as_log_weights(log_weights)
    if not (isinstance(r_eff, int | float) and math.isfinite(r_eff) and r_eff > 0):
        raise ValueError(f"`r_eff` must be a finite number > 0, got {r_eff!r}")
    out = np.full(lw.shape[:-1], np.nan)
    too_few = 0
    for idx in np.ndindex(*lw.shape[:-1]):
        khat = _row_khat(lw[idx], float(r_eff))
        if khat is None:
            too_few += 1
        else:
            out[idx] = khat
    if too_few:
        warnings.warn(
            f"pareto_khat: {too_few} row(s) of `log_weights` have too few walkers of positive "
            f"weight for the Pareto tail fit (the tail must hold >= {_MIN_TAIL} weights; "
            "30 walkers for r_eff = 1); k-hat is NaN there",
            TooFewWalkersWarning,
            stacklevel=2,
        )
    return float(out) if out.ndim == 0 else out


# ---------------------------------------------------------------------------------------
# ArviZ export
# ---------------------------------------------------------------------------------------


def _check_result(result: Any) -> FitResult:
    if not isinstance(result, FitResult):
        raise TypeError(
            f"`result` must be the FitResult returned by numpyro_ebm.fit, got "
            f"{type(result).__name__}"
        )
    if "grad_norm" not in result.trace:
        raise ValueError("`result.trace` has no `grad_norm`: not a trace recorded by fit")
    return result


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


def _snapshot_khat(trace: dict[str, Any]) -> np.ndarray | None:
    snaps = trace.get("snapshots")
    if not snaps or "log_weights_before_resampling" not in snaps:
        return None
    if "pareto_k" in snaps:
        return np.asarray(snaps["pareto_k"], dtype=np.float64)
    return np.asarray(pareto_khat(snaps["log_weights_before_resampling"]), dtype=np.float64)


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
        ``step_size``, ``pareto_k`` (:func:`pareto_khat` of the same weights as ``ess``;
        evaluated at the snapshot iterations only, NaN elsewhere) and ``extra_*`` (the
        leaves of ``trace_fn``'s output).
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
    import numpyro_ebm  # for the ArviZ attributes (inference_library); no import cycle at call

    result = _check_result(result)
    trace = result.trace
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
    snaps = trace.get("snapshots")
    khat = _snapshot_khat(trace)
    if khat is not None:
        full = np.full(num_iterations, np.nan)
        full[np.asarray(snaps["iteration"])] = khat
        stats["pareto_k"] = full[None]
    root_attrs = {
        "method": result.method,
        "num_iterations": num_iterations,
        "num_walkers": int(np.shape(result.state.log_weights)[0]),
    }
    groups: dict[str, xr.Dataset] = {
        "/": xr.Dataset(attrs=root_attrs),
        "sample_stats": dict_to_dataset(
            stats,
            coords={"draw": np.arange(num_iterations)},
            dims=dims,
            sample_dims=_SAMPLE_DIMS,
            inference_library=numpyro_ebm,
            attrs={"draw_meaning": "training iteration"},
        ),
    }

    if snapshot_every is not None and not snaps:
        raise ValueError(
            "`snapshot_every` was given but the run recorded no snapshots: call "
            "fit(..., snapshot_every=m) first"
        )
    if snaps:
        iterations = np.asarray(snaps["iteration"])
        keep = np.ones(len(iterations), bool)
        if snapshot_every is not None:
            if isinstance(snapshot_every, bool) or not isinstance(snapshot_every, int):
                raise TypeError("`snapshot_every` must be an integer")
            recorded = int(iterations[1] - iterations[0]) if len(iterations) > 1 else 1
            if snapshot_every < 1 or snapshot_every % recorded:
                raise ValueError(
                    f"`snapshot_every` must be a positive multiple of the fit's "
                    f"snapshot interval {recorded}, got {snapshot_every}"
                )
            keep = iterations % snapshot_every == 0
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
        groups["walkers"] = dict_to_dataset(
            walkers,
            coords={"draw": np.arange(num_walkers), "iteration": iterations[keep]},
            dims=wdims,
            sample_dims=_SAMPLE_DIMS,
            inference_library=numpyro_ebm,
            attrs={"draw_meaning": "walker"},
        )
    return xr.DataTree.from_dict(groups)


# ---------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------


def _new_figure(figsize: tuple[float, float]) -> Figure:
    """A figure on an Agg canvas: renders headless, leaves pyplot's state alone."""
    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _finish(fig: Figure, path: Any) -> Figure:
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig


def plot_training(
    result: FitResult, exact_cross_entropy: Any = None, *, path: Any = None
) -> Figure:
    """Plot a training run against iteration.

    Panels (those the method recorded): normalised ESS before resampling with the
    resampling events as ticks; largest normalised weight; log-normaliser estimate;
    cross-entropy estimate with ``exact_cross_entropy`` beside it; Pareto :math:`\\hat k`
    at the snapshot iterations with the 0.7 threshold; gradient norm. For PCD/CD: the
    gradient norm, the mean data energy and the exact cross-entropy when given.

    Parameters
    ----------
    result
        What :func:`numpyro_ebm.fit` returned.
    exact_cross_entropy
        Optional exact cross-entropy per iteration, shape ``(num_iterations,)`` (e.g. from
        a closed-form :math:`\\log Z_\\theta`): the curve the estimate should follow. One
        number is drawn as a dotted horizontal line labelled "exact CE (constant)": a
        fixed reference level (e.g. the data's entropy, the lower bound of the
        cross-entropy), not a per-iteration target; the cross-entropy of a model that
        changes during training is not constant, so pass the per-iteration values to
        compare the estimate with the truth.
    path
        Where to save the figure (PNG by extension); ``None``: do not save.

    Returns
    -------
    The ``matplotlib.figure.Figure`` (on an Agg canvas).
    """
    result = _check_result(result)
    trace = result.trace
    num_iterations = len(trace["grad_norm"])
    it = np.arange(num_iterations)
    exact = None
    exact_is_constant = False
    if exact_cross_entropy is not None:
        exact = np.asarray(exact_cross_entropy, dtype=np.float64)
        if exact.ndim == 0:
            exact_is_constant = True
            exact = np.full(num_iterations, float(exact))
        if exact.shape != (num_iterations,):
            raise ValueError(
                f"`exact_cross_entropy` must be a number or have shape ({num_iterations},), "
                f"got {exact.shape}"
            )
    panels = []

    if "normalized_ess" in trace:

        def ess_panel(ax):
            ax.plot(it, trace["normalized_ess"], lw=1, color="C0", label="ESS / N")
            events = it[np.asarray(trace["resampled"], bool)]
            if events.size:
                ax.plot(events, np.zeros(events.size), "|", color="C3", ms=8,
                        label=f"resampled ({events.size})")
            # headroom above ESS/N = 1 holds the legend: it covers neither the curve nor
            # the resampling ticks at 0
            ax.set_ylim(-0.05, _ESS_YMAX)
            ax.set_yticks([0.0, 0.25, 0.5, 0.75, 1.0])
            ax.set_ylabel("normalised ESS (before resampling)")
            ax.legend(fontsize=7, loc="upper center", ncols=2, framealpha=0.9,
                      borderaxespad=0.2)

        panels.append(("Effective sample size", ess_panel))
    if "max_weight" in trace:

        def weight_panel(ax):
            ax.semilogy(it, trace["max_weight"], lw=1, color="C1")
            n = int(np.shape(result.state.log_weights)[0])
            ax.axhline(1.0 / n, color="k", lw=0.8, ls=":", label="1/N (equal weights)")
            ax.set_ylabel("largest normalised weight")
            ax.legend(fontsize=7)

        panels.append(("Largest weight", weight_panel))
    if "log_normalizer" in trace:

        def logz_panel(ax):
            ax.plot(it, trace["log_normalizer"], lw=1, color="C2")
            ax.set_ylabel(r"$\widehat{\log Z_{\theta_k} / Z_{\theta_0}}$")

        panels.append(("Log-normaliser estimate", logz_panel))
    if "cross_entropy" in trace or exact is not None:

        def ce_panel(ax):
            if exact is not None:
                ax.plot(it, exact, lw=1.2, color="k", ls=":" if exact_is_constant else "-",
                        label="exact CE (constant)" if exact_is_constant else "exact CE")
            if "cross_entropy" in trace:
                ax.plot(it, trace["cross_entropy"], lw=1, ls="--", color="C0",
                        label="Jarzynski estimate")
            ax.set_ylabel("cross-entropy")
            ax.legend(fontsize=7)

        panels.append(("Cross-entropy", ce_panel))
    khat = _snapshot_khat(trace)
    if khat is not None:
        snap_it = np.asarray(trace["snapshots"]["iteration"])

        def khat_panel(ax):
            ax.plot(snap_it, khat, "o-", ms=3, lw=0.8, color="C4")
            ax.axhline(KHAT_THRESHOLD, color="C3", lw=0.8, ls="--", label="0.7")
            bad = khat > KHAT_THRESHOLD
            if np.any(bad):
                ax.plot(snap_it[bad], khat[bad], "o", ms=4, color="C3")
            ax.set_ylabel(r"Pareto $\hat k$ (snapshots)")
            ax.legend(fontsize=7)

        panels.append((r"Pareto $\hat k$ of the weights", khat_panel))
    if "data_energy" in trace and "cross_entropy" not in trace and exact is None:

        def energy_panel(ax):
            ax.plot(it, trace["data_energy"], lw=1, color="C5")
            ax.set_ylabel("mean data energy")

        panels.append(("Data energy", energy_panel))

    def grad_panel(ax):
        ax.semilogy(it, np.maximum(trace["grad_norm"], np.finfo(float).tiny), lw=1, color="C7")
        ax.set_ylabel("gradient norm")

    panels.append(("Gradient norm", grad_panel))

    ncols = 2
    nrows = math.ceil(len(panels) / ncols)
    fig = _new_figure((10.0, 2.8 * nrows))
    axes = fig.subplots(nrows, ncols, squeeze=False, sharex=True)
    for ax, (title, draw) in zip(axes.flat, panels, strict=False):
        draw(ax)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("training iteration")
    fig.suptitle(f"fit[{result.method}]: {num_iterations} iterations", fontsize=10)
    return _finish(fig, path)


def _image_like(x: np.ndarray, image_shape: Sequence[int] | None) -> np.ndarray | None:
    if image_shape is not None:
        shape = tuple(int(s) for s in image_shape)
        if int(np.prod(shape)) != int(np.prod(x.shape[1:])):
            raise ValueError(
                f"`image_shape` {shape} does not match the per-sample size "
                f"{int(np.prod(x.shape[1:]))}"
            )
        return x.reshape(x.shape[0], *shape)
    if x.ndim == 3 or (x.ndim == 4 and x.shape[-1] in (1, 3, 4)):
        return x
    return None


def plot_samples(
    samples: Any,
    log_weights: Any = None,
    *,
    data: Any = None,
    dims: tuple[int, int] = (0, 1),
    image_shape: Sequence[int] | None = None,
    max_images: int = 64,
    title: str | None = None,
    path: Any = None,
) -> Figure:
    """Plot walkers with their weights.

    * Vector samples (shape ``(N, d)``, :math:`d \\ge 2`): scatter of coordinates ``dims``,
      colour and size by :math:`N w_i` (1 = equal weight), over ``data`` in grey.
      :math:`d = 1`: weighted histogram.
    * Images (shape ``(N, H, W)`` or ``(N, H, W, C)``, or any shape with ``image_shape``):
      a grid of the ``max_images`` heaviest walkers (or the first ones without weights),
      each titled with :math:`N w_i`.

    Parameters
    ----------
    samples
        Walker positions with the walker axis first, or a :class:`~numpyro_ebm.FitResult`
        (its final walkers and, for ``"jarzynski"``, their weights).
    log_weights
        Log weights of the walkers (normalised or not); ``None``: equal weights.
    data
        Optional data points drawn behind a scatter (same per-sample shape).
    dims
        The two coordinates of a scatter.
    image_shape
        Per-sample image shape to reshape flat vectors to.
    max_images
        Most images in a grid.
    title
        Figure title.
    path
        Where to save the figure (PNG by extension); ``None``: do not save.
    """
    if isinstance(samples, FitResult):
        if log_weights is None and samples.method == "jarzynski":
            log_weights = samples.state.log_weights
        samples = samples.state.particles
    if len(jax.tree.leaves(samples)) != 1:
        raise ValueError("`samples` must be one array (walker axis first), not a pytree")
    x = np.asarray(jax.tree.leaves(samples)[0], dtype=np.float64)
    if x.ndim < 2:
        raise ValueError(f"`samples` must have shape (N, ...) with an event axis, got {x.shape}")
    n = x.shape[0]
    if log_weights is None:
        rel = np.ones(n)
    else:
        lw = _as_log_weights(log_weights)
        if lw.shape != (n,):
            raise ValueError(f"`log_weights` must have shape ({n},), got {lw.shape}")
        w = np.exp(lw - lw.max())
        rel = n * w / w.sum()  # N w_i: 1 for equal weights
    if not isinstance(max_images, int) or max_images < 1:
        raise ValueError(f"`max_images` must be a positive integer, got {max_images!r}")

    images = _image_like(x, image_shape)
    if images is not None:
        order = np.argsort(-rel, kind="stable") if log_weights is not None else np.arange(n)
        order = order[: min(max_images, n)]
        ncols = math.ceil(math.sqrt(len(order)))
        nrows = math.ceil(len(order) / ncols)
        fig = _new_figure((1.3 * ncols, 1.45 * nrows + 0.4))
        axes = fig.subplots(nrows, ncols, squeeze=False)
        lo, hi = float(np.min(images[order])), float(np.max(images[order]))
        for ax, i in zip(axes.flat, order, strict=False):
            img = images[i]
            if img.ndim == 3 and img.shape[-1] == 1:
                img = img[..., 0]
            if img.ndim == 2:
                ax.imshow(img, cmap="gray", vmin=lo, vmax=hi)
            else:
                ax.imshow(np.clip((img - lo) / max(hi - lo, 1e-12), 0, 1))
            if log_weights is not None:
                ax.set_title(f"Nw={rel[i]:.2g}", fontsize=7)
        for ax in axes.flat:
            ax.set_axis_off()
        fig.suptitle(title or f"{len(order)} of {n} walkers", fontsize=9)
        return _finish(fig, path)

    flat = x.reshape(n, -1)
    d = flat.shape[1]
    fig = _new_figure((5.4, 4.6))
    ax = fig.subplots()
    data_flat = None
    if data is not None:
        data_flat = np.asarray(jax.tree.leaves(data)[0], dtype=np.float64).reshape(
            np.shape(jax.tree.leaves(data)[0])[0], -1
        )
        if data_flat.shape[1] != d:
            raise ValueError(f"`data` has {data_flat.shape[1]} coordinates, samples have {d}")
    if d == 1:
        bins = 50
        if data_flat is not None:
            ax.hist(data_flat[:, 0], bins=bins, density=True, color="0.7", label="data")
        ax.hist(flat[:, 0], bins=bins, weights=rel / n, density=True, histtype="step",
                lw=1.5, color="C0", label="weighted walkers")
        ax.legend(fontsize=8)
        ax.set_xlabel("x")
    else:
        i, j = dims
        if not (0 <= i < d and 0 <= j < d and i != j):
            raise ValueError(f"`dims` must be two different coordinates in [0, {d}), got {dims}")
        if data_flat is not None:
            ax.scatter(data_flat[:, i], data_flat[:, j], s=2, color="0.75", label="data",
                       rasterized=True)
        order = np.argsort(rel, kind="stable")  # heaviest on top
        sizes = 4.0 + 36.0 * rel[order] / rel.max()
        if log_weights is None:
            ax.scatter(flat[order, i], flat[order, j], s=6, color="C0", label="walkers",
                       rasterized=True)
        else:
            positive = rel[rel > 0]
            vmin = max(float(positive.min()) if positive.size else 1e-3, 1e-6 * rel.max())
            norm = LogNorm(vmin=vmin, vmax=max(float(rel.max()), vmin * 10))
            sc = ax.scatter(flat[order, i], flat[order, j], s=sizes,
                            c=np.maximum(rel[order], vmin), cmap="viridis", norm=norm,
                            label="walkers", rasterized=True)
            fig.colorbar(sc, ax=ax, label=r"$N w_i$ (1 = equal weight)")
        ax.set_xlabel(f"x[{i}]")
        ax.set_ylabel(f"x[{j}]")
        ax.legend(fontsize=8, markerscale=2)
    ess = effective_sample_size(np.log(np.maximum(rel, 1e-300)))
    ax.set_title(title or f"{n} walkers, ESS = {ess:.1f}", fontsize=9)
    return _finish(fig, path)
