r"""Where the weight variance comes from: each iteration's log-weight increment split into a
parameter part and a move part (a diagnostic trainer wrapper).

One training iteration changes the walkers' log weights by (Algorithm 1)

.. math::

   \Delta_i = \alpha_k(X^i, X'^i) - \alpha_{k+1}(X'^i, X^i)
   = \underbrace{U_k(X^i) - U_{k+1}(X^i)}_{\text{parameter part } p_i}
   + \underbrace{\tilde\alpha(X^i, X'^i) - \alpha_{k+1}(X'^i, X^i)}_{\text{move part } m_i},

with :math:`\tilde\alpha(x, y) = U_{k+1}(x) + \tfrac12 (y - x)\cdot\nabla U_k(x) +
\tfrac h4 |\nabla U_k(x)|^2`. The parameter part is the classical Jarzynski work of
switching :math:`\theta_k \to \theta_{k+1}` at fixed walkers; the move part is what remains:
at fixed :math:`\theta` it is exactly the log Metropolis-Hastings ratio of the ULA move, which
vanishes as :math:`h \to 0`. For a small parameter step,
:math:`p_i \approx -(\theta_{k+1} - \theta_k)\cdot\nabla_\theta U_k(X^i)`: its spread across the
walkers grows with the learning rate.

Since the last resampling (equal weights), the log weights are the accumulated increments,
:math:`A^i = P^i + M^i` with :math:`P^i = \sum p_i` and :math:`M^i = \sum m_i` carried along
the walkers' ancestry, and the weights degenerate as their spread grows:
:math:`\mathrm{Var}(A) = \mathrm{Var}(P) + \mathrm{Var}(M) + 2\,\mathrm{Cov}(P, M)`.
Per-iteration variances alone can mislead: the move parts of successive iterations largely
cancel (the discretisation error of ULA depends mostly on the position), while the parameter
parts accumulate. :func:`with_increment_split` records every iteration's weighted variances,
and with ``per_walker=True`` the parts themselves and the ancestors, from which
:func:`accumulated_split` rebuilds :math:`\mathrm{Var}(P)`, :math:`\mathrm{Var}(M)` and
:math:`2\,\mathrm{Cov}(P, M)` along the run. It costs one more evaluation of the energy at the
walkers per iteration (:math:`U_{k+1}` at the walkers before the move): a diagnostic, not for
production runs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from numpyro_ebm.training.trainer import Trainer

__all__ = ["with_increment_split", "split_statistics", "accumulated_split"]


def split_statistics(log_weights: jax.Array, param_part: jax.Array, move_part: jax.Array) -> dict:
    """Weighted (normalised ``log_weights``) means, variances and covariance of the two
    parts of the increment; walkers with non-finite parts carry no weight."""
    live = jnp.isfinite(log_weights) & jnp.isfinite(param_part) & jnp.isfinite(move_part)
    w = jax.nn.softmax(jnp.where(live, log_weights, -jnp.inf))
    p = jnp.where(live, param_part, 0.0)
    m = jnp.where(live, move_part, 0.0)
    p_mean, m_mean = jnp.sum(w * p), jnp.sum(w * m)
    dp, dm = p - p_mean, m - m_mean
    return {
        "param_mean": p_mean,
        "move_mean": m_mean,
        "param_var": jnp.sum(w * dp**2),
        "move_var": jnp.sum(w * dm**2),
        "param_move_cov": jnp.sum(w * dp * dm),
    }


def with_increment_split(trainer: Trainer, per_walker: bool = False) -> Trainer:
    """The same trainer, whose ``info.extra`` becomes ``{"increment_split": stats, "extra":
    the original extra}`` with ``stats`` from :func:`split_statistics` (weights at the start
    of the iteration); with ``per_walker``, ``stats`` also holds ``param_part`` and
    ``move_part`` (one value per walker, before resampling) and the kernel's ``ancestors``
    (a trace of size iterations x walkers). Needs a weighted kernel (Jarzynski)."""
    if not isinstance(trainer, Trainer):
        raise TypeError(f"`trainer` must be a Trainer (build_trainer), got {type(trainer).__name__}")
    if not trainer.kernel.weighted:
        raise ValueError(f"the increment split needs weighted walkers; the kernel {trainer.kernel.name!r} "
                         "is unweighted")
    potential_fn = trainer.potential_fn
    energies = jax.vmap(potential_fn, in_axes=(None, 0))

    def step(rng_key, state, batch):
        new_state, info = trainer.step(rng_key, state, batch)
        walkers = state.walkers
        param_part = walkers.potential - energies(new_state.params, walkers.particles)
        kernel_info = getattr(info.kernel_info, "inner", info.kernel_info)  # rejuvenation wraps it
        move_part = kernel_info.log_weight_increments - param_part
        stats = split_statistics(walkers.log_weights, param_part, move_part)
        if per_walker:
            stats.update(param_part=param_part, move_part=move_part, ancestors=kernel_info.ancestors)
        return new_state, info._replace(extra={"increment_split": stats, "extra": info.extra})

    return trainer._replace(step=step)


def accumulated_split(trace: dict) -> dict:
    """From a ``per_walker`` trace: at every iteration (after its increment, before its
    resampling), the spread across walkers of the parts accumulated since the last
    resampling, ``{"param_var", "move_var", "twice_cov", "log_weight_var"}`` (arrays over
    iterations; ``log_weight_var`` = their sum = the variance of the log weights then)."""
    split = trace["extra"]["increment_split"]
    p_steps = np.asarray(split["param_part"], np.float64)
    m_steps = np.asarray(split["move_part"], np.float64)
    ancestors = np.asarray(split["ancestors"])
    resampled = np.asarray(trace["resampled"])
    accumulated_p = np.zeros(p_steps.shape[1])
    accumulated_m = np.zeros(p_steps.shape[1])
    out = {name: np.zeros(len(p_steps)) for name in ("param_var", "move_var", "twice_cov")}
    for k in range(len(p_steps)):
        accumulated_p = accumulated_p + p_steps[k]
        accumulated_m = accumulated_m + m_steps[k]
        live = np.isfinite(accumulated_p) & np.isfinite(accumulated_m)
        dp = accumulated_p[live] - accumulated_p[live].mean()
        dm = accumulated_m[live] - accumulated_m[live].mean()
        out["param_var"][k], out["move_var"][k] = np.mean(dp**2), np.mean(dm**2)
        out["twice_cov"][k] = 2 * np.mean(dp * dm)
        if resampled[k]:  # equal weights again: the accumulation restarts
            accumulated_p = np.zeros_like(accumulated_p)
            accumulated_m = np.zeros_like(accumulated_m)
        else:
            accumulated_p, accumulated_m = accumulated_p[ancestors[k]], accumulated_m[ancestors[k]]
    out["log_weight_var"] = out["param_var"] + out["move_var"] + out["twice_cov"]
    return out
