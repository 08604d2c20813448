r"""Health of importance weights: effective sample size and Pareto :math:`\hat k`.

The walkers :math:`X^i` with normalised Jarzynski weights :math:`w_i` (:math:`\sum_i w_i = 1`)
stand for the model. :func:`effective_sample_size` and :func:`pareto_khat` say how far the
weights are from degenerate; :func:`psis_tail_length` is the number of largest weights the
Pareto fit uses, and :class:`TooFewWalkersWarning` is issued when there are too few of them.
PSIS itself is ArviZ's (NumPy code run on the host); nothing is reimplemented here.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import jax
import numpy as np
from arviz_stats.base import array_stats
from blackjax.smc.ess import ess as blackjax_ess

__all__ = [
    "KHAT_THRESHOLD",
    "effective_sample_size",
    "pareto_khat",
    "psis_tail_length",
    "TooFewWalkersWarning",
]


class TooFewWalkersWarning(UserWarning):
    """Too few walkers of positive weight for ArviZ's Pareto tail fit: k-hat is NaN."""


# ArviZ's PSIS raises for a tail of fewer than 5 draws, and its generalised-Pareto fit
# returns NaN for 5 (the tail's first quartile is its minimum): 6 is the least that fits.
_MIN_TAIL = 6

KHAT_THRESHOLD = 0.7
"""Pareto :math:`\\hat k` above which importance weights are considered unreliable."""


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
