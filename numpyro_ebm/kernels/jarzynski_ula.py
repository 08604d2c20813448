r"""Jarzynski-weighted unadjusted Langevin walkers, as a BlackJAX SMC kernel.

Algorithm 1 of Carbone, Hua, Coste and Vanden-Eijnden, *Efficient Training of Energy-Based
Models Using Jarzynski Equality* (NeurIPS 2023). The model is
:math:`\rho_\theta(x) = e^{-U_\theta(x)} / Z_\theta`; walkers :math:`X^i` carry log weights
:math:`A^i`. One kernel call takes the walkers, weighted for :math:`\theta_k`, to walkers
weighted for :math:`\theta_{k+1}`:

1. ULA move under :math:`\theta_k` (gradient cached in the state, no new evaluation):
   :math:`X' = X - h \nabla U_k(X) + \sqrt{2h}\,\xi`, :math:`\xi \sim N(0, I)`.
2. One evaluation of :math:`U_{k+1}, \nabla U_{k+1}` at :math:`X'` (cached for the next
   move) and the weight update

   .. math::

      A' = A + \alpha_k(X, X') - \alpha_{k+1}(X', X), \qquad
      \alpha_k(x, y) = U_k(x) + \tfrac12 (y - x)\cdot\nabla U_k(x)
                       + \tfrac{h}{4} |\nabla U_k(x)|^2 .

   The increment is exactly the log ratio of the backward to the forward path density
   (:mod:`numpyro_ebm.kernels.base`); at fixed :math:`\theta` it is MALA's log Metropolis
   ratio, which is why the weights remove ULA's discretisation bias.
3. With :math:`w = \mathrm{softmax}(A)`, :math:`\sum_i w_i f(X^i)` estimates
   :math:`E_{\rho_{\theta_{k+1}}}[f]`, and the Jarzynski equality gives
   :math:`\log \tfrac1N \sum_i e^{A^i} \approx \log Z_{\theta_{k+1}} / Z_{\theta_0}`
   (``state.log_normalizer``).
4. When :math:`\mathrm{ESS}/N` < ``ess_threshold`` the walkers are resampled (default:
   systematic, :func:`numpyro_ebm.kernels.resampling.systematic`, BlackJAX's draws without
   its search; any BlackJAX resampling function fits), the weights reset to equal, the log
   normaliser carried across. With ``resampling_groups`` the walkers form islands resampled
   on their own, so that their estimates stay independent replicates (an error bar).

With ``num_mcmc_steps > 1`` the further moves run at :math:`\theta_{k+1}` (steps 1-2 at fixed
parameters) before step 4. ``potential_fn(params, x)`` is the energy of ONE sample. A
walker whose new position, energy or gradient is not finite gets weight zero and keeps its
last finite values; resampling replaces it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from blackjax.base import SamplingAlgorithm

from numpyro_ebm import _checks
from numpyro_ebm.kernels.base import (
    ArrayTree,
    JarzynskiState,
    PotentialFn,
    WalkerKernel,
    check_heldout_groups,
    check_num_groups,
    dtype_name,
    gradient_weights,
    moves_info,
    num_walkers,
    resample_if_degenerate,
    resolve_step_size,
    sampling_algorithm,
    uniform_log_weights,
)
from numpyro_ebm.kernels.evaluation import keep_or_recompute, potential_and_grad, weighted_param_grad
from numpyro_ebm.kernels.langevin import ula_moves
from numpyro_ebm.kernels.resampling import systematic

__all__ = ["init", "build_kernel", "as_top_level_api", "walker_kernel", "check_kernel_args"]


def init(
    particles: ArrayTree,
    params: ArrayTree,
    potential_fn: PotentialFn,
    batch_size: int | None = None,
) -> JarzynskiState:
    """Walkers with equal weights for ``params`` (they should be draws from
    :math:`\\rho_\\theta`); evaluates :math:`U_\\theta` and :math:`\\nabla_x U_\\theta` once per
    walker (in chunks of ``batch_size`` walkers when given) and sets the log-normaliser
    estimate to 0."""
    n = _checks.leading_size("particles", particles)
    if n < 2:
        raise ValueError(f"`particles` must hold at least 2 walkers, got {n}")
    _checks.check_finite_tree("particles", particles)
    _checks.check_scalar_potential(
        potential_fn, params, jax.tree.map(lambda leaf: leaf[0], particles)
    )
    _checks.check_same_float_dtype(potential_fn, params, "particles", particles)
    if batch_size is not None:
        _checks.check_int_at_least("batch_size", batch_size, 1)
    potential, grad = potential_and_grad(potential_fn, params, particles, batch_size)
    dtype = potential.dtype
    return JarzynskiState(
        particles=particles,
        log_weights=uniform_log_weights(n, dtype),
        params=params,
        potential=potential,
        grad=grad,
        log_normalizer=jnp.zeros((), dtype),
    )


def check_move_args(step_size, num_mcmc_steps, batch_size=None, noise_dtype=None,
                    batch_name="batch_size") -> int:
    """Validate the arguments every ULA-moving kernel has; returns ``num_mcmc_steps``."""
    _checks.check_positive("step_size", step_size)
    if noise_dtype is not None:
        _checks.check_float_dtype("noise_dtype", noise_dtype)
    if batch_size is not None:
        _checks.check_int_at_least(batch_name, batch_size, 1)
    return _checks.check_int_at_least("num_mcmc_steps", num_mcmc_steps, 1)


def check_kernel_args(
    step_size, resampling_fn, ess_threshold, num_mcmc_steps, batch_size=None, noise_dtype=None,
    batch_name="batch_size",
) -> int:
    """Validate the arguments the weighted kernels share; returns ``num_mcmc_steps``."""
    num_mcmc_steps = check_move_args(step_size, num_mcmc_steps, batch_size, noise_dtype, batch_name)
    _checks.check_fraction("ess_threshold", ess_threshold)
    if not callable(resampling_fn):
        raise TypeError("`resampling_fn` must be callable (rng_key, weights, num_samples)")
    return num_mcmc_steps


def scaled(weights: jax.Array, potential: jax.Array, factor: Callable | None) -> jax.Array:
    """``weights * factor(potential)`` (``weights`` when there is no factor); a walker of
    weight zero keeps coefficient zero whatever its energy."""
    if factor is None:
        return weights
    return jnp.where(weights > 0, weights * factor(jnp.where(weights > 0, potential, 0.0)), 0.0)


def _walker_grad(potential_fn, params, state, record, pre, resampled, ancestors, factor=None, groups=None,
                 heldout=0):
    """:math:`\\sum_i w_i \\nabla_\\theta U_{k+1}(X^i)` at the returned walkers from the fused
    evaluation: a second backward pass with cotangents :math:`c_i` (the new weights, or
    ``count_i / N`` after resampling, ``count_i`` being the copies made of walker ``i``; with
    island resampling (``groups``) the new gradient weights summed over the copies of walker
    ``i``), times ``factor(U_i)`` when given. ``pre``: ``(log_weights, potential)`` before
    resampling."""
    n = num_walkers(state)
    weights = gradient_weights(state.log_weights, groups, heldout)
    if groups is not None:  # ancestors are arange(N) when nothing was resampled
        coefficients = jnp.zeros((n,), weights.dtype).at[ancestors].add(weights)
    else:
        counts = jnp.zeros((n,), weights.dtype).at[ancestors].add(1.0) / n
        coefficients = jnp.where(resampled, counts, jnp.exp(pre[0]))
    return keep_or_recompute(
        record.param_vjp(scaled(coefficients, pre[1], factor)),
        ~jnp.any(record.last_nonfinite),
        lambda: weighted_param_grad(potential_fn, params, state.particles,
                                    scaled(weights, state.potential, factor)),
    )


def build_kernel(
    potential_fn: PotentialFn,
    step_size: float,
    resampling_fn: Callable = systematic,
    ess_threshold: float = 0.5,
    num_mcmc_steps: int = 1,
    batch_size: int | None = None,
    noise_dtype: Any = None,
    param_grad: bool = False,
    param_grad_factor: Callable[[jax.Array], jax.Array] | None = None,
    resampling_groups: int | None = None,
    heldout_groups: int = 0,
) -> Callable:
    """Build the Jarzynski-weighted ULA kernel.

    Parameters
    ----------
    potential_fn
        ``potential_fn(params, x) -> scalar``, the energy :math:`U_\\theta(x)` of one sample.
    step_size
        ULA step size :math:`h > 0`.
    resampling_fn
        A resampling function ``(rng_key, weights, num_samples) -> indices`` (BlackJAX's
        interface); default :func:`numpyro_ebm.kernels.resampling.systematic`, the same
        ancestors as ``blackjax.smc.resampling.systematic`` for the same key, without a
        search.
    ess_threshold
        Resample when :math:`\\mathrm{ESS}/N` falls below this value, in (0, 1].
    num_mcmc_steps
        ULA moves per call; the first re-weights :math:`\\theta_k \\to \\theta_{k+1}`, the
        others run at :math:`\\theta_{k+1}` (as in BlackJAX's SMC kernels; BlackJAX's
        ``run_inference_algorithm(..., num_steps)`` counts kernel calls instead).
    batch_size
        Evaluate the walkers in chunks of this many with ``lax.map`` (memory bounded by
        one chunk); ``None`` (default) vmaps over all walkers at once.
    noise_dtype
        dtype of the ULA noise (:func:`~numpyro_ebm.kernels.langevin.ula_proposal`);
        default the walkers' dtype.
    param_grad
        Also return, in ``info.param_grad``, the walkers' weighted parameter gradient at
        the new state, :math:`\\sum_i w_i \\nabla_\\theta U_{\\theta_{k+1}}(X^i)` (the second
        term of the next cross-entropy gradient). Without ``batch_size`` it shares the
        move's evaluation: one forward pass, one backward pass with unit cotangents for
        :math:`\\nabla_x U`, and a second backward pass with the new weights as cotangents
        (they exist only after :math:`\\nabla_x U`). If the last move's evaluation was not
        finite somewhere it is recomputed at the kept walkers, so it always equals
        :func:`~numpyro_ebm.kernels.evaluation.weighted_param_grad` at the returned state.
    param_grad_factor
        With ``param_grad``: ``factor(U) -> per-walker factor``; the walker term becomes
        :math:`\\sum_i w_i\\, \\mathrm{factor}(U_i) \\nabla_\\theta U(X^i)` (an energy penalty's
        walker part, :mod:`numpyro_ebm.training.penalties`), from the same passes.
    resampling_groups
        ``None`` (default): all walkers are resampled together. An integer :math:`G \\ge 2`
        dividing the number of walkers: island resampling
        (:func:`~numpyro_ebm.kernels.base.resample_groups_if_degenerate`), each of :math:`G`
        contiguous groups on its own when its own ESS falls below the threshold, so that the
        groups stay independent replicates and the spread of their log-normaliser estimates
        is an honest error bar (:func:`numpyro_ebm.estimators.group_log_normalizers`).
    heldout_groups
        With ``resampling_groups`` :math:`G`: the last :math:`H` islands are left out of
        ``info.param_grad`` (:func:`~numpyro_ebm.kernels.base.gradient_weights`; the others'
        weights renormalised). They move and are weighted like the rest, and since
        :math:`\\theta` never depends on their noise, their log-normaliser estimate has no
        feedback bias (:func:`numpyro_ebm.estimators.heldout_log_normalizer`), at the price of
        a gradient from :math:`(G - H)/G` of the walkers. Default 0.

    Returns
    -------
    ``kernel(rng_key, state, params=None, step_size=None) -> (JarzynskiState, JarzynskiInfo)``.
    ``params`` is :math:`\\theta_{k+1}` (``None`` keeps ``state.params``); ``step_size``
    overrides the default for this call (e.g. from an adaptation scheme).
    """
    num_mcmc_steps = check_kernel_args(
        step_size, resampling_fn, ess_threshold, num_mcmc_steps, batch_size, noise_dtype
    )
    check_num_groups(resampling_groups)
    check_heldout_groups(heldout_groups, resampling_groups)
    default_step_size = step_size
    fused = param_grad and batch_size is None

    def kernel(rng_key, state, params=None, step_size=None):
        params = state.params if params is None else params
        h = resolve_step_size(default_step_size, step_size, state.potential.dtype)
        move_key, resample_key = jax.random.split(rng_key)
        state, record = ula_moves(
            move_key, state, params, potential_fn, h, num_mcmc_steps, weighted=True, fused=fused,
            batch_size=batch_size, noise_dtype=noise_dtype,
        )
        pre = (state.log_weights, state.potential)
        state, ess, resampled, ancestors = resample_if_degenerate(
            resample_key, state, resampling_fn, ess_threshold, resampling_groups
        )
        walker_grad = None
        if fused:
            walker_grad = _walker_grad(
                potential_fn, params, state, record, pre, resampled, ancestors, param_grad_factor,
                resampling_groups, heldout_groups,
            )
        elif param_grad:
            walker_grad = weighted_param_grad(
                potential_fn, params, state.particles,
                scaled(gradient_weights(state.log_weights, resampling_groups, heldout_groups), state.potential,
                       param_grad_factor), batch_size,
            )
        return state, moves_info(record, ess, resampled, ancestors, walker_grad)

    return kernel


def as_top_level_api(
    potential_fn: PotentialFn,
    params: ArrayTree,
    step_size: float,
    resampling_fn: Callable = systematic,
    ess_threshold: float = 0.5,
    num_mcmc_steps: int = 1,
    batch_size: int | None = None,
    noise_dtype: Any = None,
    resampling_groups: int | None = None,
) -> SamplingAlgorithm:
    """Jarzynski-weighted ULA as a ``blackjax.SamplingAlgorithm``.

    ``init(position, rng_key=None)`` weights the walkers ``position`` equally for
    ``params``; ``step(rng_key, state, params=None)`` runs one kernel call. Called with
    ``params=None`` at every step it samples the fixed EBM :math:`\\rho_\\theta`, and the
    weighted walkers are free of ULA's discretisation bias. Works with
    ``blackjax.util.run_inference_algorithm``. ``resampling_groups``: island resampling, as in
    :func:`build_kernel`.
    """
    kernel = build_kernel(
        potential_fn, step_size, resampling_fn, ess_threshold, num_mcmc_steps, batch_size, noise_dtype,
        resampling_groups=resampling_groups,
    )
    return sampling_algorithm(kernel, init, params, potential_fn, batch_size)


def walker_kernel(
    step_size: float,
    *,
    resampling_fn: Callable = systematic,
    ess_threshold: float = 0.5,
    num_mcmc_steps: int = 1,
    walker_batch_size: int | None = None,
    noise_dtype: Any = None,
    resampling_groups: int | None = None,
    heldout_groups: int = 0,
) -> WalkerKernel:
    """Jarzynski-weighted walkers for the trainer
    (:func:`numpyro_ebm.training.build_trainer`): the method of the paper. Arguments as in
    :func:`build_kernel` (``walker_batch_size`` is its ``batch_size``)."""
    check_kernel_args(step_size, resampling_fn, ess_threshold, num_mcmc_steps, walker_batch_size, noise_dtype,
                      "walker_batch_size")
    check_num_groups(resampling_groups)
    check_heldout_groups(heldout_groups, resampling_groups)

    def init_fn(potential_fn, particles, params):
        return init(particles, params, potential_fn, walker_batch_size)

    def step_fn(potential_fn, rng_key, state, params, step_size, param_grad_factor=None):
        kernel = build_kernel(
            potential_fn, default_step_size, resampling_fn, ess_threshold, num_mcmc_steps,
            walker_batch_size, noise_dtype, param_grad=True, param_grad_factor=param_grad_factor,
            resampling_groups=resampling_groups, heldout_groups=heldout_groups,
        )
        return kernel(rng_key, state, params, step_size)

    default_step_size = step_size
    config = dict(step_size=step_size, resampling_fn=getattr(resampling_fn, "__name__", str(resampling_fn)),
                  ess_threshold=ess_threshold, num_mcmc_steps=num_mcmc_steps, walker_batch_size=walker_batch_size,
                  noise_dtype=dtype_name(noise_dtype), resampling_groups=resampling_groups,
                  heldout_groups=heldout_groups)
    return WalkerKernel(init_fn, step_fn, None, True, step_size, "jarzynski", config)
