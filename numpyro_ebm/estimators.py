r"""Estimators of the cross-entropy and its gradient from Jarzynski-weighted walkers.

For :math:`\rho_\theta = e^{-U_\theta}/Z_\theta` and data :math:`\{x_j\}_{j=1}^n`,

.. math::

   H(\theta) = \frac1n \sum_j U_\theta(x_j) + \log Z_\theta, \qquad
   \partial_\theta H = \frac1n \sum_j \partial_\theta U_\theta(x_j)
                       - E_{\rho_\theta}[\partial_\theta U_\theta].

The model expectation is replaced by the weighted walkers,
:math:`E_{\rho_\theta}[f] \approx \sum_i w_i f(X^i)` with :math:`w = \mathrm{softmax}(A)`,
and :math:`\log Z_\theta = \log Z_{\theta_0} + (\log Z_\theta - \log Z_{\theta_0})` with the
second term the state's Jarzynski ``log_normalizer``.

The weighted parameter gradient is the gradient of one weighted sum,
:math:`\nabla_\theta[\frac1n\sum_j U_\theta(x_j) - \sum_i w_i U_\theta(X^i)]` with the weights
held fixed, so per-walker parameter gradients are never materialised.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.scipy.special import logsumexp

from numpyro_ebm import _checks
from numpyro_ebm.kernels.base import JarzynskiState, PotentialFn
from numpyro_ebm.kernels.evaluation import weighted_param_grad

__all__ = [
    "ce_grad",
    "ce_estimate",
    "ce_value_and_grad",
    "feedback_bias_step",
    "group_log_normalizers",
    "group_log_weight_sums",
    "heldout_log_normalizer",
    "mean_energy",
]


def mean_energy(potential_fn: PotentialFn, params: Any, samples: Any) -> jax.Array:
    """:math:`\\frac1n \\sum_j U_\\theta(x_j)` over the leading axis of ``samples``."""
    return jnp.mean(jax.vmap(potential_fn, in_axes=(None, 0))(params, samples))


def ce_value_and_grad(
    potential_fn: PotentialFn,
    params: Any,
    data: Any,
    state: JarzynskiState,
    walker_grad: Any = None,
) -> tuple[jax.Array, Any]:
    """Mean data energy :math:`\\frac1n\\sum_j U_\\theta(x_j)` and the cross-entropy gradient
    (as :func:`ce_grad`): one forward/backward pass over the data, minus the walkers' term
    :math:`\\sum_i w_i \\nabla_\\theta U_\\theta(X^i)`. That term is ``walker_grad`` when given
    (``fit`` takes it from the kernel's evaluation at the walkers), otherwise one weighted
    forward/backward pass over the walkers
    (:func:`numpyro_ebm.jarzynski_ula.weighted_param_grad`)."""
    data_energy, data_grad = jax.value_and_grad(mean_energy, argnums=1)(potential_fn, params, data)
    if walker_grad is None:
        weights = jax.nn.softmax(state.log_weights)
        walker_grad = weighted_param_grad(potential_fn, params, state.particles, weights)
    return data_energy, optax.tree.sub(data_grad, walker_grad)


def _check_inputs(data: Any, state: JarzynskiState) -> None:
    if not isinstance(state, JarzynskiState):
        raise TypeError(f"`state` must be a JarzynskiState, got {type(state).__name__}")
    _checks.leading_size("data", data)
    _checks.check_finite_tree("data", data)
    _checks.check_same_event_shape("data", data, "state.particles", state.particles)


def ce_grad(potential_fn: PotentialFn, params: Any, data: Any, state: JarzynskiState) -> Any:
    """Cross-entropy gradient
    :math:`D = \\frac1n\\sum_j \\nabla_\\theta U_\\theta(x_j) - \\sum_i w_i \\nabla_\\theta U_\\theta(X^i)`.

    ``data`` has the sample axis first and may be a minibatch; ``state`` holds the walkers
    and their log weights (normalised or not: only their softmax is used). Returns a pytree
    shaped like ``params``.
    """
    _check_inputs(data, state)
    return ce_value_and_grad(potential_fn, params, data, state)[1]


def ce_estimate(
    potential_fn: PotentialFn,
    params: Any,
    data: Any,
    state: JarzynskiState,
    log_z0: float | jax.Array,
) -> jax.Array:
    """Cross-entropy estimate
    :math:`\\hat H = \\frac1n\\sum_j U_\\theta(x_j) + \\log Z_{\\theta_0} + \\widehat{\\log Z_\\theta / Z_{\\theta_0}}`.

    ``log_z0`` is the log normaliser of the model the walkers started from (closed-form for
    a Gaussian start); the ratio is the state's Jarzynski ``log_normalizer``.
    """
    _check_inputs(data, state)
    if _checks.is_concrete(log_z0) and not bool(jnp.isfinite(jnp.asarray(log_z0))):
        raise ValueError(f"`log_z0` must be finite, got {log_z0}")
    if _checks.is_concrete(state.log_normalizer) and not bool(jnp.isfinite(state.log_normalizer)):
        raise ValueError(
            "`state.log_normalizer` is not finite: these walkers carry no estimate of "
            "log Z_theta / Z_theta0 (unweighted PCD/CD walkers, or every weight was lost)"
        )
    return mean_energy(potential_fn, params, data) + log_z0 + state.log_normalizer


def feedback_bias_step(
    potential_fn: PotentialFn,
    params: Any,
    state: JarzynskiState,
    learning_rates: Any,
) -> jax.Array:
    r"""The expected amount by which one training step lowers the Jarzynski estimate of
    :math:`\log Z_{\theta_{k+1}}/Z_{\theta_k}` because :math:`\theta_{k+1}` was computed from
    the same walkers that then estimate the ratio (plain gradient descent).

    With :math:`v_i = \nabla_\theta U_{\theta_k}(X^i)`, the walker term
    :math:`\hat g = \sum_i w_i v_i` of the gradient has error :math:`e = \hat g - g`,
    :math:`g = E_{\rho_{\theta_k}}[\nabla_\theta U_{\theta_k}]`. Gradient descent with
    learning rates :math:`P` (a diagonal matrix) moves
    :math:`\delta\theta = -P(\hat g_{\text{data}} - \hat g)`, and to first order in
    :math:`\delta\theta` the log-normaliser increment is estimated as
    :math:`-\hat g\cdot\delta\theta` where the truth is :math:`-g\cdot\delta\theta`. Their
    difference is :math:`e\cdot P(\hat g_{\text{data}} - g) - e^\top P e`; the first term has
    mean zero (the data term does not depend on the walkers' noise), the second does not:

    .. math::

       E[\text{error}] = -E[e^\top P e] = -\operatorname{tr}(P\,\mathrm{Cov}(\hat g))
       \approx -\sum_i w_i^2 (v_i - \hat g)^\top P (v_i - \hat g),

    the last step the usual (delta-method) variance of a self-normalised weighted mean. It
    shrinks like :math:`1/\mathrm{ESS}` per step and adds up over the steps (like
    :math:`K\,\mathrm{lr}/\mathrm{ESS}` over :math:`K` steps). This function returns the
    right-hand sum (:math:`\ge 0`) at :math:`\theta_k` for the walkers ``state``; adding the
    running sum of it to the trained estimate of :math:`\log Z` (or of the cross-entropy)
    removes the bias to first order. Use it as (part of) a ``trace_fn``.

    ``learning_rates``: :math:`P`, a pytree shaped like ``params`` (or one whose leaves
    broadcast against them, e.g. a float per leaf), for ``optax.sgd`` without momentum (and
    ``optax.multi_transform`` of them). For other optimisers the map from the gradient to
    the update is not a fixed :math:`P` and this correction does not apply. Materialises the
    per-walker parameter gradients (memory ``num_walkers`` times the parameters).
    """
    weights = jax.nn.softmax(state.log_weights)
    per_walker = jax.vmap(jax.grad(potential_fn), in_axes=(None, 0))(params, state.particles)
    lr_leaves = jax.tree.leaves(learning_rates)
    grad_leaves = jax.tree.leaves(per_walker)
    if len(lr_leaves) == 1 and len(grad_leaves) > 1:
        lr_leaves = lr_leaves * len(grad_leaves)
    if len(lr_leaves) != len(grad_leaves):
        raise ValueError("`learning_rates` must be one number or a pytree shaped like `params`")
    total = jnp.zeros((), weights.dtype)
    for lr, v in zip(lr_leaves, grad_leaves, strict=True):
        lr = jnp.broadcast_to(jnp.asarray(lr, v.dtype), v.shape[1:]).reshape(-1)
        v = v.reshape(v.shape[0], -1)
        centred = v - weights @ v
        total = total + jnp.sum(weights**2 * ((centred**2) @ lr))
    return total


def group_log_weight_sums(state: JarzynskiState, num_groups: int) -> jax.Array:
    """:math:`\\log \\sum_{i \\in g} w_i` for ``num_groups`` contiguous blocks ``g`` of the
    walkers (normalised weights; the last block takes the remainder), shape
    ``(num_groups,)``. Record it every iteration (in a ``trace_fn``) for
    :func:`group_log_normalizers`."""
    n = state.log_weights.shape[0]
    if not 2 <= num_groups <= n:
        raise ValueError(f"`num_groups` must lie in [2, num_walkers = {n}], got {num_groups}")
    group = jnp.minimum(jnp.arange(n) // (n // num_groups), num_groups - 1)
    log_w = state.log_weights - logsumexp(state.log_weights)
    masked = jnp.where(group[None, :] == jnp.arange(num_groups)[:, None], log_w[None, :], -jnp.inf)
    return logsumexp(masked, axis=1)


def group_log_normalizers(log_normalizer: jax.Array, group_log_sums: jax.Array,
                          resampled: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    r"""Per-group estimates of :math:`\log Z_{\theta_k}/Z_{\theta_0}` along a run, and the
    standard error of the run's estimate they imply.

    Inputs, one row per iteration :math:`k` (a ``fit`` trace): the run's estimate
    :math:`L_k` (``trace["log_normalizer"]``), :math:`s_{g,k} = \log\sum_{i\in g} w_i`
    (:func:`group_log_weight_sums` in ``trace["extra"]``, shape ``(K, G)``) and whether step
    :math:`k` resampled (``trace["resampled"]``). Between resamplings the walkers of group
    :math:`g` alone estimate the ratio as :math:`\ell_{g,k} = L_k + \log G + s_{g,k}` (their
    unnormalised weights summed, relative to their share at the epoch's start); across a
    resampling the group's estimate moves with the run's (the one step's within-group
    variation there is not seen). So

    .. math:: \ell_{g,k} = L_k + \sum_{j < k,\ \text{no resampling at } j} (s_{g,j+1} - s_{g,j}).

    The groups hold disjoint, independently started walkers, so :math:`\ell_{g,k}` are
    (nearly) independent replicates with :math:`e^{L_k} = \text{mean}_g\, e^{\ell_{g,k}}`
    within an epoch; the delta method gives the standard error
    :math:`\mathrm{sd}_g(\ell_{g,k}) / \sqrt G` of :math:`L_k`. It covers the random part of
    the error, not a bias (:func:`feedback_bias_step`), and it underestimates when
    resampling mixes the groups' lineages. Returns ``(ell, stderr)`` with shapes
    ``(K, G)`` and ``(K,)``; row ``K - 1`` uses the steps before it only.

    ``resampled=None``: the run resampled its groups as islands (the Jarzynski kernel's
    ``resampling_groups`` equal to ``G``), which leaves each group's total weight unchanged;
    then no step is frozen, :math:`\ell_{g,k} = L_k + \log G + s_{g,k}` at every :math:`k`,
    the groups' lineages never mix, and the standard error covers the whole random error.
    """
    group_log_sums = jnp.asarray(group_log_sums)
    if group_log_sums.ndim != 2 or group_log_sums.shape[0] != jnp.shape(log_normalizer)[0]:
        raise ValueError("`group_log_sums` must have shape (num_iterations, num_groups) matching "
                         "`log_normalizer`")
    g = group_log_sums.shape[1]
    if resampled is None:
        ell = jnp.asarray(log_normalizer)[:, None] + jnp.log(g) + group_log_sums
        return ell, jnp.std(ell, axis=1, ddof=1) / jnp.sqrt(g)
    steps = jnp.diff(group_log_sums, axis=0)  # s_{g,j+1} - s_{g,j}, j = 0..K-2
    keep = ~jnp.asarray(resampled, bool)[:-1, None]
    drift = jnp.concatenate([jnp.zeros_like(group_log_sums[:1]),
                             jnp.cumsum(jnp.where(keep, steps, 0.0), axis=0)])
    ell = jnp.asarray(log_normalizer)[:, None] + drift
    return ell, jnp.std(ell, axis=1, ddof=1) / jnp.sqrt(g)


def heldout_log_normalizer(log_normalizer: jax.Array, group_log_sums: jax.Array,
                           heldout_groups: int) -> tuple[jax.Array, jax.Array]:
    r"""The Jarzynski estimate of :math:`\log Z_{\theta_k}/Z_{\theta_0}` from the held-out
    islands alone, and its standard error, along a run made with
    ``resampling_groups=G, heldout_groups=H`` (:func:`numpyro_ebm.kernels.base.gradient_weights`).

    The parameters never depend on the held-out walkers' noise, so for them Jarzynski's
    equality holds given the parameter path: :math:`E[\hat Z_{\text{held}}] = Z_{\theta_k}/
    Z_{\theta_0}` with no feedback bias (:func:`feedback_bias_step`); only the log of the
    mean is biased, by about :math:`-\tfrac12\mathrm{Var}(\hat Z)/Z^2`. With
    :math:`\ell_{g,k} = L_k + \log G + s_{g,k}` the groups' own estimates
    (:func:`group_log_normalizers` with ``resampled=None``), the estimate is
    :math:`\log \tfrac1H \sum_{g\,\text{held out}} e^{\ell_{g,k}}` and its standard error
    :math:`\mathrm{sd}_g(\ell_{g,k}) / \sqrt H` over the held-out groups (the delta method,
    as in :func:`group_log_normalizers`). The held-out groups are the last ``heldout_groups``
    columns of ``group_log_sums`` (:func:`group_log_weight_sums`, shape ``(K, G)``). Returns
    two arrays of shape ``(K,)``."""
    group_log_sums = jnp.asarray(group_log_sums)
    if isinstance(heldout_groups, bool) or not isinstance(heldout_groups, int) or not (
            2 <= heldout_groups <= group_log_sums.shape[-1]):
        raise ValueError("`heldout_groups` must be an integer between 2 (a standard error needs two) "
                         f"and the number of groups {group_log_sums.shape[-1]}, got {heldout_groups!r}")
    ell, _ = group_log_normalizers(log_normalizer, group_log_sums, None)
    held = ell[:, -heldout_groups:]
    estimate = logsumexp(held, axis=1) - jnp.log(heldout_groups)
    return estimate, jnp.std(held, axis=1, ddof=1) / jnp.sqrt(heldout_groups)
