r"""Evaluations of the energy at the walkers.

* :func:`potential_and_grad`: :math:`U_\theta(X^i)` and :math:`\nabla_x U_\theta(X^i)`, one
  forward/backward pass per walker (vmapped, or in chunks of walkers);
* :func:`weighted_param_grad`: :math:`\sum_i c_i \nabla_\theta U_\theta(X^i)` as the gradient
  of one weighted sum, so per-walker parameter gradients are never materialised;
* :func:`fused_evaluation`: both from one forward pass (``jax.vjp``), for the trainer's one
  evaluation per walker per iteration.

``potential_fn(params, x)`` is the energy of ONE sample ``x`` (an array or a pytree); it is
vmapped over the leading (walker) axis.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from numpyro_ebm.kernels.base import ArrayTree, PotentialFn, all_finite

__all__ = ["potential_and_grad", "weighted_param_grad", "fused_evaluation", "keep_or_recompute"]


def potential_and_grad(
    potential_fn: PotentialFn,
    params: ArrayTree,
    particles: ArrayTree,
    batch_size: int | None = None,
) -> tuple[jax.Array, ArrayTree]:
    """:math:`U_\\theta(X^i)` and :math:`\\nabla_x U_\\theta(X^i)` for every walker: ONE
    forward/backward evaluation of ``potential_fn`` per walker, vmapped over all walkers at
    once (``batch_size=None``) or over chunks of ``batch_size`` walkers with ``lax.map``
    (memory bounded by one chunk)."""
    value_and_grad = jax.value_and_grad(potential_fn, argnums=1)
    if batch_size is None:
        return jax.vmap(value_and_grad, in_axes=(None, 0))(params, particles)
    return jax.lax.map(lambda x: value_and_grad(params, x), particles, batch_size=batch_size)


def _split_chunks(tree: ArrayTree, batch_size: int) -> tuple[ArrayTree, ArrayTree]:
    """``(full, rest)``: the first ``n // batch_size * batch_size`` walkers reshaped to
    ``(n // batch_size, batch_size, ...)``, and the remaining walkers."""
    n = jax.tree.leaves(tree)[0].shape[0]
    m = n // batch_size * batch_size
    full = jax.tree.map(lambda leaf: leaf[:m].reshape(n // batch_size, batch_size, *leaf.shape[1:]), tree)
    rest = jax.tree.map(lambda leaf: leaf[m:], tree)
    return full, rest


def weighted_param_grad(
    potential_fn: PotentialFn,
    params: ArrayTree,
    particles: ArrayTree,
    weights: jax.Array,
    batch_size: int | None = None,
) -> ArrayTree:
    """:math:`\\sum_i c_i \\nabla_\\theta U_\\theta(X^i)` for fixed coefficients ``weights``
    :math:`c_i`, taken as the gradient of the one weighted sum
    :math:`\\nabla_\\theta \\sum_i c_i U_\\theta(X^i)`: per-walker parameter gradients are
    never materialised. With ``batch_size`` the sum runs over chunks of walkers in a
    ``lax.scan`` (memory bounded by one chunk)."""

    def weighted_sum(p, x, c):
        return jnp.sum(c * jax.vmap(potential_fn, in_axes=(None, 0))(p, x))

    grad = jax.grad(weighted_sum)
    if batch_size is None:
        return grad(params, particles, weights)
    (full_x, full_c), (rest_x, rest_c) = _split_chunks((particles, weights), batch_size)

    def add_chunk(total, chunk):
        return optax.tree.add(total, grad(params, *chunk)), None

    zeros = optax.tree.zeros_like(params)
    total, _ = jax.lax.scan(add_chunk, zeros, (full_x, full_c))
    if rest_c.shape[0]:
        total = optax.tree.add(total, grad(params, rest_x, rest_c))
    return total


def fused_evaluation(
    potential_fn: PotentialFn, params: ArrayTree, particles: ArrayTree
) -> tuple[jax.Array, ArrayTree, ArrayTree, Callable[[jax.Array], ArrayTree]]:
    """One forward pass over the walkers and its backward pass with unit cotangents:
    ``(U, grad_x U, sum_i grad_theta U(X^i), param_vjp)``. ``param_vjp(c)`` reuses the
    forward pass (``jax.vjp``) to give :math:`\\sum_i c_i \\nabla_\\theta U(X^i)` for
    coefficients that are only known after the first backward pass (the Jarzynski
    weights); the unused halves of each backward pass are removed by XLA."""

    def energies(p, x):
        return jax.vmap(potential_fn, in_axes=(None, 0))(p, x)

    potential, vjp_fn = jax.vjp(energies, params, particles)
    param_sum, grad = vjp_fn(jnp.ones_like(potential))
    return potential, grad, param_sum, lambda c: vjp_fn(c)[0]


def keep_or_recompute(
    walker_grad: ArrayTree, move_ok: jax.Array, recompute: Callable[[], ArrayTree]
) -> ArrayTree:
    """``walker_grad`` (the walker term from a :func:`fused_evaluation`), or
    ``recompute()`` when ``move_ok`` is false or ``walker_grad`` is not finite: a walker
    whose evaluation failed kept its old position, where the fused pass did not evaluate
    it."""
    ok = move_ok & all_finite(walker_grad)
    return jax.lax.cond(ok, lambda: walker_grad, recompute)
