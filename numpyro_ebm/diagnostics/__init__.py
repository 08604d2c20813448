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

The package is split by task: :mod:`numpyro_ebm.diagnostics.weights` (ESS, Pareto
:math:`\hat k`), :mod:`numpyro_ebm.diagnostics.datatree` (the ArviZ export) and
:mod:`numpyro_ebm.diagnostics.plots` (the figures); every public name of those modules is
re-exported here, so ``from numpyro_ebm.diagnostics import pareto_khat`` works.

This package depends on ArviZ (arviz-base, arviz-stats), xarray and matplotlib; the
training core does not import it.
"""

from numpyro_ebm.diagnostics.datatree import to_datatree
from numpyro_ebm.diagnostics.plots import plot_samples, plot_training
from numpyro_ebm.diagnostics.weights import (
    KHAT_THRESHOLD,
    TooFewWalkersWarning,
    effective_sample_size,
    pareto_khat,
    psis_tail_length,
)

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
