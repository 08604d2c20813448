"""A trained EBM as the prior of a latent variable in a NumPyro model, sampled with NUTS.

1. Train a 2-D EBM on a two-moded "prior" data set (Jarzynski walkers):
   U(z) = |z|^2 / 2 + sum_k a_k exp(-|z - c_k|^2), bumps on a 5 x 5 grid of centres
   (rho_0 = N(0, I) at a = 0, so log Z_0 = log 2 pi).
2. ``EnergyBased`` from the fit result (params, Jarzynski log Z, weighted walkers).
3. The model  z ~ EBM,  y_i ~ N(z, 0.7^2 I)  with three observations; NUTS samples the
   posterior of z. log Z is a constant there. The NUTS posterior mean is checked against
   the posterior mean computed on a grid from the same EBM.
Saves ``posterior.png``.

    python examples/energy_based_prior.py [--output-dir DIR]  # NUMPYRO_EBM_SMOKE=1: tiny
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
from numpyro.infer import MCMC, NUTS  # noqa: E402

from numpyro_ebm import fit  # noqa: E402
from numpyro_ebm.distributions import energy_based_from_fit  # noqa: E402

SMOKE = os.environ.get("NUMPYRO_EBM_SMOKE") == "1"
_c = jnp.linspace(-2.0, 2.0, 5)
CENTRES = jnp.stack(jnp.meshgrid(_c, _c), -1).reshape(-1, 2)
NOISE = 0.7


def energy(params, z):
    bumps = jnp.exp(-jnp.sum((z - CENTRES) ** 2, -1))
    return 0.5 * jnp.sum(z**2) + jnp.sum(params["a"] * bumps)


def prior_data(key, n):
    k1, k2 = jax.random.split(key)
    side = jnp.where(jax.random.bernoulli(k1, 0.6, (n,)), 1.0, -1.0)
    centre = side[:, None] * jnp.array([1.2, 0.8])
    return centre + 0.45 * jax.random.normal(k2, (n, 2))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="results/energy_based_prior")
    args = parser.parse_args(argv)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    n_data, n_walkers, n_iter, n_warm, n_samp = (
        (200, 64, 20, 100, 200) if SMOKE else (4000, 1000, 1500, 500, 4000)
    )
    key = jax.random.key(0)
    k_data, k_fit, k_mcmc = jax.random.split(key, 3)
    data = prior_data(k_data, n_data)
    result = fit(
        energy, {"a": jnp.zeros(len(CENTRES))}, data, optimizer=optax.sgd(0.1),
        num_walkers=n_walkers, step_size=0.02, num_iterations=n_iter, rng_key=k_fit,
        data_batch_size=min(500, n_data), log_z0=math.log(2 * math.pi),
        init_particles="standard_normal",  # rho_theta0 is N(0, I): a = 0 gives U = |x|^2 / 2
    )
    prior = energy_based_from_fit(energy, result, math.log(2 * math.pi))
    y = jnp.array([[0.9, 1.4], [1.5, 0.4], [0.4, 0.9]])

    def model(y):
        z = numpyro.sample("z", prior)
        with numpyro.plate("obs", y.shape[0]):
            numpyro.sample("y", dist.Normal(z, NOISE).to_event(1), obs=y)

    mcmc = MCMC(NUTS(model), num_warmup=n_warm, num_samples=n_samp, progress_bar=False)
    mcmc.run(k_mcmc, y)
    z = np.asarray(mcmc.get_samples()["z"])

    g = jnp.linspace(-4, 4, 161)
    grid = jnp.stack(jnp.meshgrid(g, g), -1).reshape(-1, 2)
    log_prior = prior.log_prob(grid)
    log_lik = dist.Normal(grid[:, None, :], NOISE).log_prob(y[None]).sum((-1, -2))
    post = jax.nn.softmax(log_prior + log_lik)
    grid_mean = np.asarray(post @ grid)
    cell = float((g[1] - g[0]) ** 2)
    prior_mass = float(jnp.sum(jnp.exp(log_prior)) * cell)

    print(f"EBM prior: {n_data} points, {n_walkers} walkers, {n_iter} iterations; "
          f"log Z = {float(prior.log_normalizer):.3f}, prior mass on grid {prior_mass:.3f}")
    print(f"NUTS posterior mean {z.mean(0).round(3)}, grid posterior mean {grid_mean.round(3)}")
    print(f"NUTS posterior sd   {z.std(0).round(3)}")

    fig, ax = plt.subplots(figsize=(6, 5.5))
    dens = np.exp(np.asarray(log_prior)).reshape(len(g), len(g))
    ax.contour(np.asarray(g), np.asarray(g), dens, levels=12, cmap="Blues")
    ax.scatter(z[:, 0], z[:, 1], s=2, c="tab:red", alpha=0.2, label="NUTS posterior")
    ax.scatter(np.asarray(y)[:, 0], np.asarray(y)[:, 1], marker="x", c="k", label="y")
    ax.set_title("EBM prior (contours) and NUTS posterior of z")
    ax.legend(loc="lower right")
    ax.set_aspect("equal")
    fig.tight_layout()
    fig.savefig(out / "posterior.png", dpi=110)
    print(f"saved {out / 'posterior.png'}")


if __name__ == "__main__":
    main()
