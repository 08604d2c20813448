r"""The walker moves and weights of the authors' public MNIST code, as an option (OUTSIDE THE
THEORY).

Carbone et al.'s MNIST code departs from Algorithm 1 (:mod:`~numpyro_ebm.kernels.jarzynski_ula`)
in ways that keep its weights healthy; this kernel reproduces those moves so that the two can
be compared on the same data (``numpyro-ebm mnist --preset authors``). One call takes the
walkers, weighted for :math:`\theta_k`, to :math:`\theta_{k+1}`:

1. Re-weight every walker at fixed position (one evaluation at :math:`\theta_{k+1}`):
   :math:`A^i \mathrel{+}= U_k(X^i) - U_{k+1}(X^i)`.
2. ``num_subsets`` times: a random subset of ``subset_size`` walkers (without replacement)
   makes ``num_mcmc_steps`` moves under :math:`\theta_{k+1}`,

   .. math::

      x' = x - h \nabla U_{k+1}(x) + \sigma \xi, \qquad \xi \sim N(0, I),

   each coordinate that leaves ``bounds`` keeping its old value, and each move adds to the
   walker's log weight

   .. math::

      U_{k+1}(x) - U_{k+1}(x') + \log q_h(x' \to x) - \log q_h(x \to x'), \qquad
      \log q_h(x \to y) = -\frac{|y - x + h \nabla U_{k+1}(x)|^2}{4h}.

   With :math:`\sigma = \sqrt{2h}` and no bounds this is the Jarzynski / MALA ratio of
   the move actually made, and the weights are exact (the test suite checks this). The
   authors use :math:`h = 5\times10^{-5}` and :math:`\sigma = 10^{-4}`: the walkers move at an
   effective temperature :math:`\sigma^2 / 2h = 10^{-4}` while the weights are computed as if
   the noise were :math:`\sqrt{2h}`, so **the weights are no longer exact for the dynamics
   run**, and the per-coordinate rejection at the bounds is not accounted for either.
3. Resampling when :math:`\mathrm{ESS}/N` < ``ess_threshold``; the authors resample
   (multinomially) when the coefficient of variation of the weights exceeds 1.5, i.e.
   :math:`\mathrm{ESS}/N < 1/(1 + 1.5^2) \approx 0.308` (their burn-in of 150 epochs before the
   first resampling is not reproduced).

Particles must be a single array (images). ``weighted=False`` makes the same moves without
weights (the authors' PCD comparison).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from blackjax.smc import resampling
from jax.scipy.special import logsumexp

from numpyro_ebm import _checks
from numpyro_ebm.kernels.base import (
    JarzynskiInfo,
    JarzynskiState,
    PotentialFn,
    WalkerKernel,
    resample_if_degenerate,
    resolve_step_size,
    sampling_algorithm,
)
from numpyro_ebm.kernels.evaluation import potential_and_grad, weighted_param_grad
from numpyro_ebm.kernels.jarzynski_ula import init as _init
from numpyro_ebm.kernels.jarzynski_ula import scaled

__all__ = ["init", "build_kernel", "as_top_level_api", "walker_kernel", "AUTHORS_ESS_THRESHOLD"]

AUTHORS_ESS_THRESHOLD = 1.0 / (1.0 + 1.5**2)  # std(w / mean w) > 1.5


def init(particles: jax.Array, params, potential_fn: PotentialFn) -> JarzynskiState:
    """Equal weights for ``params`` (as :func:`numpyro_ebm.kernels.jarzynski_ula.init`)."""
    if not hasattr(particles, "shape"):
        raise TypeError("`particles` must be a single array for the authors' kernel")
    return _init(particles, params, potential_fn)


def _check(step_size, noise_scale, num_mcmc_steps, subset_size, num_subsets, ess_threshold, bounds):
    _checks.check_positive("step_size", step_size)
    _checks.check_positive("noise_scale", noise_scale)
    for name, value in (("num_mcmc_steps", num_mcmc_steps), ("subset_size", subset_size),
                        ("num_subsets", num_subsets)):
        _checks.check_int_at_least(name, value, 1)
    _checks.check_fraction("ess_threshold", ess_threshold)
    if bounds is not None and not (len(bounds) == 2 and bounds[0] < bounds[1]):
        raise ValueError(f"`bounds` must be (low, high) with low < high, or None; got {bounds}")


def _subset_moves(potential_fn, params, key, x, u, g, h, noise_scale, num_mcmc_steps, bounds):
    """``num_mcmc_steps`` bounded, tempered ULA moves of the walkers ``x`` under ``params``;
    returns the new ``(x, u, g)`` and each walker's summed log-weight increment."""

    def move(carry, step_key):
        x, u, g, increment = carry
        y = x - h * g + noise_scale * jax.random.normal(step_key, x.shape, x.dtype)
        if bounds is not None:
            y = jnp.where((y < bounds[0]) | (y > bounds[1]), x, y)
        uy, gy = potential_and_grad(potential_fn, params, y)
        axes = tuple(range(1, x.ndim))
        log_forward = -jnp.sum((y - x + h * g) ** 2, axis=axes) / (4 * h)
        log_backward = -jnp.sum((x - y + h * gy) ** 2, axis=axes) / (4 * h)
        finite = jnp.isfinite(uy) & jnp.all(jnp.isfinite(gy), axis=axes)
        step_increment = jnp.where(finite, u - uy + log_backward - log_forward, -jnp.inf)
        keep = finite.reshape((-1,) + (1,) * (x.ndim - 1))
        return (jnp.where(keep, y, x), jnp.where(finite, uy, u), jnp.where(keep, gy, g),
                increment + step_increment), None

    keys = jax.random.split(key, num_mcmc_steps)
    (x, u, g, increment), _ = jax.lax.scan(move, (x, u, g, jnp.zeros_like(u)), keys)
    return x, u, g, increment


def build_kernel(
    potential_fn: PotentialFn,
    step_size: float = 5e-5,
    noise_scale: float = 1e-4,
    num_mcmc_steps: int = 30,
    subset_size: int = 256,
    num_subsets: int = 6,
    bounds: tuple[float, float] | None = (-1.0, 1.0),
    resampling_fn: Callable = resampling.multinomial,
    ess_threshold: float = AUTHORS_ESS_THRESHOLD,
    weighted: bool = True,
    param_grad: bool = False,
    param_grad_factor: Callable | None = None,
) -> Callable:
    """``kernel(rng_key, state, params=None, step_size=None) -> (state, info)``; the defaults
    are the authors' MNIST settings (see the module docstring)."""
    _check(step_size, noise_scale, num_mcmc_steps, subset_size, num_subsets, ess_threshold, bounds)
    default_step_size = step_size

    def kernel(rng_key, state: JarzynskiState, params=None, step_size=None):
        params = state.params if params is None else params
        n = state.log_weights.shape[0]
        if subset_size > n:
            raise ValueError(f"`subset_size` ({subset_size}) exceeds the number of walkers ({n})")
        h = resolve_step_size(default_step_size, step_size, state.potential.dtype)
        subsets_key, resample_key = jax.random.split(rng_key)
        u, g = potential_and_grad(potential_fn, params, state.particles)
        increment = jnp.where(jnp.isfinite(u), state.potential - u, -jnp.inf) if weighted else jnp.zeros_like(u)
        x = state.particles

        def one_subset(carry, key):
            x, u, g, increment = carry
            choose_key, move_key = jax.random.split(key)
            idx = jax.random.choice(choose_key, n, (subset_size,), replace=False)
            xs, us, gs, inc = _subset_moves(potential_fn, params, move_key, x[idx], u[idx], g[idx], h,
                                            noise_scale, num_mcmc_steps, bounds)
            increment = increment.at[idx].add(inc if weighted else 0.0)
            return (x.at[idx].set(xs), u.at[idx].set(us), g.at[idx].set(gs), increment), None

        (x, u, g, increment), _ = jax.lax.scan(one_subset, (x, u, g, increment),
                                               jax.random.split(subsets_key, num_subsets))
        total = state.log_weights + increment
        log_normalizer_increment = logsumexp(total) if weighted else jnp.zeros((), total.dtype)
        new = state._replace(particles=x, potential=u, grad=g, params=params,
                             log_weights=total - log_normalizer_increment,
                             log_normalizer=state.log_normalizer + log_normalizer_increment)
        if weighted:
            new, ess, resampled, ancestors = resample_if_degenerate(resample_key, new, resampling_fn, ess_threshold)
        else:
            ess, resampled, ancestors = jnp.asarray(n, total.dtype), jnp.asarray(False), jnp.arange(n, dtype=jnp.int32)
        walker_grad = None
        if param_grad:
            walker_grad = weighted_param_grad(potential_fn, params, new.particles,
                                              scaled(jnp.exp(new.log_weights), new.potential, param_grad_factor))
        info = JarzynskiInfo(ess=ess, resampled=resampled, ancestors=ancestors,
                             log_normalizer_increment=log_normalizer_increment, log_weight_increments=increment,
                             num_nonfinite=jnp.sum(~jnp.isfinite(increment)).astype(jnp.int32),
                             param_grad=walker_grad)
        return new, info

    return kernel


def as_top_level_api(potential_fn: PotentialFn, params, step_size: float = 5e-5, **settings):
    """The kernel as a ``blackjax.SamplingAlgorithm`` (``settings`` as in :func:`build_kernel`)."""
    kernel = build_kernel(potential_fn, step_size, **settings)
    return sampling_algorithm(kernel, lambda p, th, fn, _: init(p, th, fn), params, potential_fn, None)


def walker_kernel(step_size: float = 5e-5, *, noise_scale: float = 1e-4, num_mcmc_steps: int = 30,
                  subset_size: int = 256, num_subsets: int = 6, bounds: tuple[float, float] | None = (-1.0, 1.0),
                  resampling_fn: Callable = resampling.multinomial,
                  ess_threshold: float = AUTHORS_ESS_THRESHOLD, weighted: bool = True) -> WalkerKernel:
    """The authors' walkers for the trainer (arguments as in :func:`build_kernel`);
    ``weighted=False`` gives their PCD comparison (same moves, equal weights)."""
    settings = dict(noise_scale=noise_scale, num_mcmc_steps=num_mcmc_steps, subset_size=subset_size,
                    num_subsets=num_subsets, bounds=bounds, resampling_fn=resampling_fn,
                    ess_threshold=ess_threshold, weighted=weighted)
    _check(step_size, noise_scale, num_mcmc_steps, subset_size, num_subsets, ess_threshold, bounds)

    def init_fn(potential_fn, particles, params):
        return init(particles, params, potential_fn)

    def step_fn(potential_fn, rng_key, state, params, step_size, param_grad_factor=None):
        kernel = build_kernel(potential_fn, default_step_size, param_grad=True,
                              param_grad_factor=param_grad_factor, **settings)
        return kernel(rng_key, state, params, step_size)

    default_step_size = step_size
    config = {**settings, "step_size": step_size,
              "resampling_fn": getattr(resampling_fn, "__name__", str(resampling_fn))}
    return WalkerKernel(init_fn, step_fn, None, weighted, step_size,
                        "authors_ula" if weighted else "authors_ula_unweighted", config)
