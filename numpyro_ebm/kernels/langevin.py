r"""Unadjusted Langevin (ULA) moves of the walkers.

One move under :math:`\theta`: :math:`X' = X - h \nabla U_\theta(X) + \sqrt{2h}\,\xi`,
:math:`\xi \sim N(0, I)`, with :math:`\nabla U_\theta(X)` cached in the state, followed by
one evaluation at the new positions and the weight update of
:func:`numpyro_ebm.kernels.base.apply_move`. :func:`ula_moves` runs ``num_mcmc_steps`` of them:
the first re-weights :math:`\theta_k \to \theta_{k+1}`, the others run at
:math:`\theta_{k+1}`; with ``fused=True`` the last evaluation also serves the walkers'
parameter gradient (:func:`numpyro_ebm.kernels.evaluation.fused_evaluation`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.extend.random import threefry_2x32

from numpyro_ebm.kernels.base import ArrayTree, JarzynskiState, PotentialFn, apply_move
from numpyro_ebm.kernels.evaluation import fused_evaluation, potential_and_grad

__all__ = ["standard_normal", "ula_proposal", "ula_moves", "MovesRecord"]


def _is_threefry(rng_key: jax.Array) -> bool:
    if jnp.issubdtype(rng_key.dtype, jax.dtypes.prng_key):
        return str(jax.random.key_impl(rng_key)) == "threefry2x32"
    return rng_key.shape == (2,) and jax.config.jax_default_prng_impl == "threefry2x32"


def standard_normal(rng_key: jax.Array, shape: tuple[int, ...], dtype: Any) -> jax.Array:
    """Standard normal draws, as ``jax.random.normal`` makes them, faster for float32.

    ``jax.random.normal`` turns uniforms on (-1, 1) into normals by
    :math:`\\sqrt2\\,\\mathrm{erf}^{-1}(u)`. For float32 and a threefry key this function
    does the same with the same 23-bit uniforms, but takes both 32-bit words of each
    threefry-2x32 block (``jax.extend.random.threefry_2x32`` over a counter), where
    ``jax.random.bits`` spends one block per word: half the generator work. Other dtypes
    and key types use ``jax.random.normal``. The numbers differ from
    ``jax.random.normal``'s for the same key; their distribution does not. The random bits
    do not depend on how the walkers are sharded, but the float32 transform may round a few
    numbers differently in the last place under a ``Mesh`` (seen on 4 CPU devices at small
    sizes: 4 of 192 draws off by one ulp; none of 50 000 at 1000 x 50).

    Measured against the alternatives (``benchmarks/gpu_speed.py --sections noise``; on the
    2-core CPU, ``benchmarks/README.md``): ``jax.random.normal`` with ``rbg`` or
    ``unsafe_rbg`` keys is several times slower on the CPU, in float32 and float64, so this
    generator stays the float32 default there; the GPU figures come from the same script.
    """
    dtype = jnp.dtype(dtype)
    size = math.prod(shape)
    if dtype != jnp.float32 or not _is_threefry(rng_key) or not 0 < size < 2**32:
        return jax.random.normal(rng_key, shape, dtype)
    key_words = jax.random.key_data(rng_key) if jnp.issubdtype(
        rng_key.dtype, jax.dtypes.prng_key) else rng_key
    words = threefry_2x32(key_words, jax.lax.iota(jnp.uint32, size))
    one = jnp.asarray(1.0, jnp.float32)
    mantissa = jax.lax.shift_right_logical(words, jnp.uint32(9))
    unit = jax.lax.bitcast_convert_type(
        mantissa | jax.lax.bitcast_convert_type(one, jnp.uint32), jnp.float32
    ) - one  # [0, 1) on a 2^-23 grid
    low = jnp.nextafter(jnp.asarray(-1.0, jnp.float32), jnp.asarray(0.0, jnp.float32))
    u = jnp.maximum(low, unit * (one - low) + low)  # (-1, 1)
    normal = jnp.asarray(math.sqrt(2.0), jnp.float32) * jax.lax.erf_inv(u)
    return normal.reshape(shape)


def ula_proposal(
    rng_key: jax.Array,
    particles: ArrayTree,
    grad: ArrayTree,
    step_size: jax.Array,
    noise_dtype: Any = None,
) -> ArrayTree:
    """One unadjusted Langevin move :math:`X' = X - h\\nabla U(X) + \\sqrt{2h}\\,\\xi`.

    :math:`\\xi` is drawn in ``noise_dtype`` (default: each leaf's own dtype) by
    :func:`standard_normal`; e.g. float32 noise for float64 walkers halves the cost of the
    noise. The weights stay exact for the move that was made, since :math:`\\Delta A` is
    computed from :math:`X` and :math:`X'` in the walkers' precision; only the proposal's
    tails are cut at the float32 generator's :math:`\\pm 5.4\\sigma`.
    """
    leaves, treedef = jax.tree.flatten(particles)
    keys = jax.random.split(rng_key, len(leaves))
    noise = [
        standard_normal(k, leaf.shape, leaf.dtype if noise_dtype is None else noise_dtype).astype(
            leaf.dtype
        )
        for k, leaf in zip(keys, leaves, strict=True)
    ]
    noise = jax.tree.unflatten(treedef, noise)
    return jax.tree.map(
        lambda x, g, xi: x - step_size * g + jnp.sqrt(2.0 * step_size) * xi,
        particles,
        grad,
        noise,
    )


class MovesRecord(NamedTuple):
    """What :func:`ula_moves` did: ``log_weight_increments`` (summed over the moves),
    ``log_normalizer_increments`` (one per move), ``nonfinite`` (per walker, in any move),
    ``last_nonfinite`` (in the last move), and, with ``fused=True``, ``param_sum``
    (:math:`\\sum_i \\nabla_\\theta U(X^i)` at the last positions) and ``param_vjp``."""

    log_weight_increments: jax.Array
    log_normalizer_increments: jax.Array
    nonfinite: jax.Array
    last_nonfinite: jax.Array
    param_sum: ArrayTree = None
    param_vjp: Callable | None = None


def ula_moves(
    rng_key: jax.Array,
    state: JarzynskiState,
    params: ArrayTree,
    potential_fn: PotentialFn,
    step_size: jax.Array,
    num_mcmc_steps: int,
    *,
    weighted: bool,
    fused: bool = False,
    batch_size: int | None = None,
    noise_dtype: Any = None,
) -> tuple[JarzynskiState, MovesRecord]:
    """``num_mcmc_steps`` ULA moves, each followed by :func:`~numpyro_ebm.kernels.base.apply_move`
    to ``params``; the first starts from the cached :math:`\\nabla U_{\\theta_k}`. With
    ``fused`` the last move's evaluation is a :func:`fused_evaluation` (no chunks)."""
    n = state.log_weights.shape[0]
    keys = jax.random.split(rng_key, num_mcmc_steps)
    num_plain = num_mcmc_steps - 1 if fused else num_mcmc_steps

    def one_move(carry, key):
        st, delta_sum, bad_any = carry
        x_new = ula_proposal(key, st.particles, st.grad, step_size, noise_dtype)
        u_new, g_new = potential_and_grad(potential_fn, params, x_new, batch_size)
        st, delta, increment, bad = apply_move(st, x_new, u_new, g_new, params, step_size, weighted)
        return (st, delta_sum + delta, bad_any | bad), increment

    carry = (state, jnp.zeros_like(state.log_weights), jnp.zeros((n,), bool))
    increments = jnp.zeros((0,), state.log_weights.dtype)
    if num_plain:
        carry, increments = jax.lax.scan(one_move, carry, keys[:num_plain])
    state, delta_sum, bad_any = carry
    if not fused:
        return state, MovesRecord(delta_sum, increments, bad_any, bad_any)
    x_new = ula_proposal(keys[-1], state.particles, state.grad, step_size, noise_dtype)
    u_new, g_new, param_sum, param_vjp = fused_evaluation(potential_fn, params, x_new)
    state, delta, increment, bad = apply_move(state, x_new, u_new, g_new, params, step_size, weighted)
    record = MovesRecord(
        delta_sum + delta, jnp.concatenate([increments, increment[None]]), bad_any | bad, bad,
        param_sum, param_vjp,
    )
    return state, record
