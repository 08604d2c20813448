"""A mixture EBM written as a NumPyro model, with constrained parameters.

The model describes ONE data point x in 1-D:

    locs  = numpyro.param("locs", ...)                                   # real
    scale = numpyro.param("scale", 1.0, constraint=positive)
    w     = numpyro.param("w", [0.5, 0.5], constraint=simplex)
    x     = numpyro.sample("x", ImproperUniform(real), obs=x)
    numpyro.factor("energy", logsumexp(log w - (x - locs)^2 / (2 scale^2)))

so U(x) = -log sum_j w_j exp(-(x - mu_j)^2 / (2 s^2)) and Z = sqrt(2 pi s^2).
``from_numpyro`` turns it into ``potential_fn(params, x)`` over UNCONSTRAINED params
(log scale, stick-breaking weights); ``potential_fn.constrain`` reads the trained values.
The data: modes at -3 (mass 1/4) and +2 (mass 3/4), sd 0.5; the model starts at
locs = +-1, scale 1, equal weights, and the initial walkers are exact draws from it
(started at +-0.1 the two components stay merged into one broad bump: a local optimum).
Saves ``mixture.png``.

    python examples/numpyro_mixture.py [--output-dir DIR]   # NUMPYRO_EBM_SMOKE=1: tiny run
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import numpyro  # noqa: E402
import numpyro.distributions as dist  # noqa: E402
import optax  # noqa: E402
from jax.scipy.special import logsumexp  # noqa: E402
from numpyro.distributions import constraints  # noqa: E402

from numpyro_ebm import fit  # noqa: E402
from numpyro_ebm.distributions import energy_based_from_fit  # noqa: E402
from numpyro_ebm.potentials import from_numpyro  # noqa: E402

SMOKE = os.environ.get("NUMPYRO_EBM_SMOKE") == "1"
TRUE_LOCS, TRUE_MASSES, TRUE_SCALE = np.array([-3.0, 2.0]), np.array([0.25, 0.75]), 0.5


def mixture_model(x):
    locs = numpyro.param("locs", jnp.array([-1.0, 1.0]))
    scale = numpyro.param("scale", 1.0, constraint=constraints.positive)
    w = numpyro.param("w", jnp.array([0.5, 0.5]), constraint=constraints.simplex)
    x = numpyro.sample("x", dist.ImproperUniform(constraints.real, (), ()), obs=x)
    numpyro.factor("energy", logsumexp(jnp.log(w) - 0.5 * (x - locs) ** 2 / scale**2))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="results/numpyro_mixture")
    args = parser.parse_args(argv)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    n_data, n_walkers, n_iter = (200, 64, 20) if SMOKE else (4000, 2000, 2000)

    key = jax.random.key(0)
    k_comp, k_noise, k_fit = jax.random.split(key, 3)
    comp = jax.random.choice(k_comp, 2, (n_data,), p=jnp.asarray(TRUE_MASSES))
    data = jnp.asarray(TRUE_LOCS)[comp] + TRUE_SCALE * jax.random.normal(k_noise, (n_data,))

    potential_fn, params = from_numpyro(mixture_model, 0.0, data_site="x")
    theta0 = potential_fn.constrain(params)

    def initial_walkers(k, n):  # exact draws from the initial mixture rho_theta0
        kc, kn = jax.random.split(k)
        c = jax.random.categorical(kc, jnp.log(theta0["w"]), shape=(n,))
        return theta0["locs"][c] + theta0["scale"] * jax.random.normal(kn, (n,))

    log_z0 = 0.5 * math.log(2 * math.pi * float(theta0["scale"]) ** 2)
    result = fit(
        potential_fn, params, data, optimizer=optax.sgd(0.05), num_walkers=n_walkers,
        step_size=0.02, num_iterations=n_iter, rng_key=k_fit, data_batch_size=min(500, n_data),
        init_particles=initial_walkers, log_z0=log_z0,
        trace_fn=lambda p, s: potential_fn.constrain(p)["scale"],
    )
    theta = potential_fn.constrain(result.params)
    order = np.argsort(np.asarray(theta["locs"]))
    print(f"NumPyro mixture EBM: {n_data} points, {n_walkers} walkers, {n_iter} iterations")
    print(f"locs   {np.asarray(theta['locs'])[order].round(3)}   (truth {TRUE_LOCS})")
    print(f"masses {np.asarray(theta['w'])[order].round(3)}   (truth {TRUE_MASSES})")
    print(f"scale  {float(theta['scale']):.3f} (truth {TRUE_SCALE}); min over training "
          f"{float(result.trace['extra'].min()):.3f} > 0 (positive constraint)")
    exact_log_z = 0.5 * math.log(2 * math.pi * float(theta["scale"]) ** 2)
    ebm = energy_based_from_fit(potential_fn, result, log_z0)
    print(f"log Z: Jarzynski {float(ebm.log_normalizer):.3f}, exact {exact_log_z:.3f}")

    grid = jnp.linspace(-6, 5, 600)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    axes[0].hist(np.asarray(data), bins=80, density=True, alpha=0.4, label="data")
    axes[0].plot(grid, np.exp(np.asarray(ebm.log_prob(grid))), label="EBM (Jarzynski log Z)")
    axes[0].legend()
    axes[0].set_title("learned density")
    axes[1].plot(result.trace["extra"], color="C0")
    axes[1].axhline(TRUE_SCALE, color="C0", ls=":", lw=1)
    axes[1].set_xlabel("iteration")
    axes[1].set_ylabel("scale (constrained parameter)", color="C0")
    twin = axes[1].twinx()
    twin.plot(result.trace["cross_entropy"], color="C1", lw=0.8)
    twin.set_ylabel("cross-entropy estimate (nats, minibatch)", color="C1")
    axes[1].set_title("scale (left axis; dotted: truth) and cross-entropy (right axis)")
    fig.tight_layout()
    fig.savefig(out / "mixture.png", dpi=110)
    print(f"saved {out / 'mixture.png'}")


if __name__ == "__main__":
    main()
