"""Plots of a training run (:func:`plot_training`) and of weighted walkers (:func:`plot_samples`).

The figures are drawn on an Agg canvas: they render headless and leave pyplot's state alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import jax
import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from numpyro_ebm.diagnostics._trace import check_fit_result, snapshot_khat
from numpyro_ebm.diagnostics.weights import KHAT_THRESHOLD, _as_log_weights, effective_sample_size
from numpyro_ebm.train import FitResult

__all__ = ["plot_training", "plot_samples"]

_ESS_YMAX = 1.35  # top of the ESS panel: the band above 1 is the legend's

# a panel of plot_training: its title and what draws it on its axes
_Panel = tuple[str, Callable[[Axes], None]]


def _new_figure(figsize: tuple[float, float]) -> Figure:
    """A figure on an Agg canvas: renders headless, leaves pyplot's state alone."""
    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _finish(fig: Figure, path: Any) -> Figure:
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig


# ---------------------------------------------------------------------------------------
# plot_training
# ---------------------------------------------------------------------------------------


def _exact_cross_entropy(exact_cross_entropy: Any, num_iterations: int) -> tuple[np.ndarray | None, bool]:
    """``(per-iteration values or None, whether one number was given)``."""
    if exact_cross_entropy is None:
        return None, False
    exact = np.asarray(exact_cross_entropy, dtype=np.float64)
    exact_is_constant = False
    if exact.ndim == 0:
        exact_is_constant = True
        exact = np.full(num_iterations, float(exact))
    if exact.shape != (num_iterations,):
        raise ValueError(
            f"`exact_cross_entropy` must be a number or have shape ({num_iterations},), "
            f"got {exact.shape}"
        )
    return exact, exact_is_constant


def _draw_ess(ax: Axes, it: np.ndarray, trace: dict[str, Any]) -> None:
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


def _draw_max_weight(ax: Axes, it: np.ndarray, trace: dict[str, Any], num_walkers: int) -> None:
    ax.semilogy(it, trace["max_weight"], lw=1, color="C1")
    ax.axhline(1.0 / num_walkers, color="k", lw=0.8, ls=":", label="1/N (equal weights)")
    ax.set_ylabel("largest normalised weight")
    ax.legend(fontsize=7)


def _draw_log_normalizer(ax: Axes, it: np.ndarray, trace: dict[str, Any]) -> None:
    ax.plot(it, trace["log_normalizer"], lw=1, color="C2")
    ax.set_ylabel(r"$\widehat{\log Z_{\theta_k} / Z_{\theta_0}}$")


def _draw_cross_entropy(
    ax: Axes, it: np.ndarray, trace: dict[str, Any], exact: np.ndarray | None, exact_is_constant: bool
) -> None:
    if exact is not None:
        ax.plot(it, exact, lw=1.2, color="k", ls=":" if exact_is_constant else "-",
                label="exact CE (constant)" if exact_is_constant else "exact CE")
    if "cross_entropy" in trace:
        ax.plot(it, trace["cross_entropy"], lw=1, ls="--", color="C0",
                label="Jarzynski estimate")
    ax.set_ylabel("cross-entropy")
    ax.legend(fontsize=7)


def _draw_khat(ax: Axes, snap_it: np.ndarray, khat: np.ndarray) -> None:
    ax.plot(snap_it, khat, "o-", ms=3, lw=0.8, color="C4")
    ax.axhline(KHAT_THRESHOLD, color="C3", lw=0.8, ls="--", label="0.7")
    bad = khat > KHAT_THRESHOLD
    if np.any(bad):
        ax.plot(snap_it[bad], khat[bad], "o", ms=4, color="C3")
    ax.set_ylabel(r"Pareto $\hat k$ (snapshots)")
    ax.legend(fontsize=7)


def _draw_data_energy(ax: Axes, it: np.ndarray, trace: dict[str, Any]) -> None:
    ax.plot(it, trace["data_energy"], lw=1, color="C5")
    ax.set_ylabel("mean data energy")


def _draw_grad_norm(ax: Axes, it: np.ndarray, trace: dict[str, Any]) -> None:
    ax.semilogy(it, np.maximum(trace["grad_norm"], np.finfo(float).tiny), lw=1, color="C7")
    ax.set_ylabel("gradient norm")


def _training_panels(
    result: FitResult, exact: np.ndarray | None, exact_is_constant: bool
) -> list[_Panel]:
    """The panels of :func:`plot_training` for what the run recorded, in drawing order."""
    trace = result.trace
    it = np.arange(len(trace["grad_norm"]))
    panels: list[_Panel] = []
    if "normalized_ess" in trace:
        panels.append(("Effective sample size", partial(_draw_ess, it=it, trace=trace)))
    if "max_weight" in trace:
        num_walkers = int(np.shape(result.state.log_weights)[0])
        panels.append(("Largest weight", partial(_draw_max_weight, it=it, trace=trace, num_walkers=num_walkers)))
    if "log_normalizer" in trace:
        panels.append(("Log-normaliser estimate", partial(_draw_log_normalizer, it=it, trace=trace)))
    if "cross_entropy" in trace or exact is not None:
        draw = partial(_draw_cross_entropy, it=it, trace=trace, exact=exact, exact_is_constant=exact_is_constant)
        panels.append(("Cross-entropy", draw))
    khat = snapshot_khat(trace)
    if khat is not None:
        snap_it = np.asarray(trace["snapshots"]["iteration"])
        panels.append((r"Pareto $\hat k$ of the weights", partial(_draw_khat, snap_it=snap_it, khat=khat)))
    if "data_energy" in trace and "cross_entropy" not in trace and exact is None:
        panels.append(("Data energy", partial(_draw_data_energy, it=it, trace=trace)))
    panels.append(("Gradient norm", partial(_draw_grad_norm, it=it, trace=trace)))
    return panels


def _panel_grid(panels: list[_Panel], title: str) -> Figure:
    """A figure with the panels on two columns sharing the iteration axis."""
    ncols = 2
    nrows = math.ceil(len(panels) / ncols)
    fig = _new_figure((10.0, 2.8 * nrows))
    axes = fig.subplots(nrows, ncols, squeeze=False, sharex=True)
    for ax, (panel_title, draw) in zip(axes.flat, panels, strict=False):
        draw(ax)
        ax.set_title(panel_title, fontsize=9)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("training iteration")
    fig.suptitle(title, fontsize=10)
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
    result = check_fit_result(result)
    num_iterations = len(result.trace["grad_norm"])
    exact, exact_is_constant = _exact_cross_entropy(exact_cross_entropy, num_iterations)
    panels = _training_panels(result, exact, exact_is_constant)
    fig = _panel_grid(panels, f"fit[{result.method}]: {num_iterations} iterations")
    return _finish(fig, path)


# ---------------------------------------------------------------------------------------
# plot_samples
# ---------------------------------------------------------------------------------------


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


def _walker_positions(samples: Any, log_weights: Any) -> tuple[np.ndarray, Any]:
    """``(positions as float64, log weights)``; a ``FitResult`` gives its final walkers and,
    for ``"jarzynski"`` without ``log_weights``, their weights."""
    if isinstance(samples, FitResult):
        if log_weights is None and samples.method == "jarzynski":
            log_weights = samples.state.log_weights
        samples = samples.state.particles
    if len(jax.tree.leaves(samples)) != 1:
        raise ValueError("`samples` must be one array (walker axis first), not a pytree")
    x = np.asarray(jax.tree.leaves(samples)[0], dtype=np.float64)
    if x.ndim < 2:
        raise ValueError(f"`samples` must have shape (N, ...) with an event axis, got {x.shape}")
    return x, log_weights


def _relative_weights(log_weights: Any, n: int) -> np.ndarray:
    """:math:`N w_i` of each walker: 1 for equal weights (and for ``log_weights=None``)."""
    if log_weights is None:
        return np.ones(n)
    lw = _as_log_weights(log_weights)
    if lw.shape != (n,):
        raise ValueError(f"`log_weights` must have shape ({n},), got {lw.shape}")
    w = np.exp(lw - lw.max())
    return n * w / w.sum()  # N w_i: 1 for equal weights


def _image_grid(images: np.ndarray, rel: np.ndarray, weighted: bool, max_images: int,
                title: str | None) -> Figure:
    """A grid of the heaviest walkers (the first ones when not ``weighted``), titled N w_i."""
    n = images.shape[0]
    order = np.argsort(-rel, kind="stable") if weighted else np.arange(n)
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
        if weighted:
            ax.set_title(f"Nw={rel[i]:.2g}", fontsize=7)
    for ax in axes.flat:
        ax.set_axis_off()
    fig.suptitle(title or f"{len(order)} of {n} walkers", fontsize=9)
    return fig


def _flat_data(data: Any, d: int) -> np.ndarray | None:
    """``data`` as an ``(n, d)`` array of float64, or ``None``."""
    if data is None:
        return None
    data_flat = np.asarray(jax.tree.leaves(data)[0], dtype=np.float64).reshape(
        np.shape(jax.tree.leaves(data)[0])[0], -1
    )
    if data_flat.shape[1] != d:
        raise ValueError(f"`data` has {data_flat.shape[1]} coordinates, samples have {d}")
    return data_flat


def _draw_histogram(ax: Axes, flat: np.ndarray, rel: np.ndarray, data_flat: np.ndarray | None) -> None:
    """Weighted histogram of one-dimensional walkers over the data's."""
    n = flat.shape[0]
    bins = 50
    if data_flat is not None:
        ax.hist(data_flat[:, 0], bins=bins, density=True, color="0.7", label="data")
    ax.hist(flat[:, 0], bins=bins, weights=rel / n, density=True, histtype="step",
            lw=1.5, color="C0", label="weighted walkers")
    ax.legend(fontsize=8)
    ax.set_xlabel("x")


def _draw_scatter(fig: Figure, ax: Axes, flat: np.ndarray, rel: np.ndarray, weighted: bool,
                  data_flat: np.ndarray | None, dims: tuple[int, int]) -> None:
    """Scatter of coordinates ``dims`` of the walkers, coloured and sized by N w_i."""
    d = flat.shape[1]
    i, j = dims
    if not (0 <= i < d and 0 <= j < d and i != j):
        raise ValueError(f"`dims` must be two different coordinates in [0, {d}), got {dims}")
    if data_flat is not None:
        ax.scatter(data_flat[:, i], data_flat[:, j], s=2, color="0.75", label="data",
                   rasterized=True)
    order = np.argsort(rel, kind="stable")  # heaviest on top
    sizes = 4.0 + 36.0 * rel[order] / rel.max()
    if not weighted:
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


def _vector_plot(x: np.ndarray, rel: np.ndarray, weighted: bool, data: Any, dims: tuple[int, int],
                 title: str | None) -> Figure:
    """Scatter (or, in one dimension, histogram) of vector walkers, titled with their ESS."""
    n = x.shape[0]
    flat = x.reshape(n, -1)
    fig = _new_figure((5.4, 4.6))
    ax = fig.subplots()
    data_flat = _flat_data(data, flat.shape[1])
    if flat.shape[1] == 1:
        _draw_histogram(ax, flat, rel, data_flat)
    else:
        _draw_scatter(fig, ax, flat, rel, weighted, data_flat, dims)
    ess = effective_sample_size(np.log(np.maximum(rel, 1e-300)))
    ax.set_title(title or f"{n} walkers, ESS = {ess:.1f}", fontsize=9)
    return fig




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
    x, log_weights = _walker_positions(samples, log_weights)
    rel = _relative_weights(log_weights, x.shape[0])
    if not isinstance(max_images, int) or max_images < 1:
        raise ValueError(f"`max_images` must be a positive integer, got {max_images!r}")
    weighted = log_weights is not None
    images = _image_like(x, image_shape)
    if images is not None:
        fig = _image_grid(images, rel, weighted, max_images, title)
    else:
        fig = _vector_plot(x, rel, weighted, data, dims, title)
    return _finish(fig, path)
