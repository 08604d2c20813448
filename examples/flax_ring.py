"""A Flax NNX MLP energy trained on eight Gaussians on a ring with unequal masses.

Energy: U_theta(x) = |x|^2 / (2 s0^2) + MLP_theta(x), with the MLP's last layer set to zero,
so the initial model is exactly N(0, s0^2 I): the walkers start as exact draws from it and
log Z_0 = log(2 pi s0^2) is known. The MLP is an ``nnx.Module`` turned into
``potential_fn(params, x)`` by ``numpyro_ebm.potentials.from_flax``.

Trains with Jarzynski-weighted walkers and with PCD (same optimiser, same walkers), and
compares the learned mode masses (computed from the normalised density on a grid) to the
truth. Saves ``ring.png`` (learned densities, walkers, mode masses).

    python examples/flax_ring.py [--output-dir DIR]       # NUMPYRO_EBM_SMOKE=1: tiny run
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.scipy.special import logsumexp  # noqa: E402

from numpyro_ebm import fit  # noqa: E402
from numpyro_ebm.potentials import from_flax  # noqa: E402

SMOKE = os.environ.get("NUMPYRO_EBM_SMOKE") == "1"
RADIUS, MODE_STD, BASE_STD = 3.0, 0.3, 2.5
MASSES = np.arange(1, 9) / np.arange(1, 9).sum()  # 1/36, 2/36, ..., 8/36
ANGLES = 2 * np.pi * np.arange(8) / 8


class RingEnergy(nnx.Module):
    """U(x) = |x|^2 / (2 s0^2) + MLP(x); zero last layer: the start is N(0, s0^2 I)."""

    def __init__(self, hidden: int, rngs: nnx.Rngs):
        self.l1 = nnx.Linear(2, hidden, rngs=rngs)
        self.l2 = nnx.Linear(hidden, hidden, rngs=rngs)
        self.out = nnx.Linear(hidden, 1, kernel_init=nnx.initializers.zeros, rngs=rngs)

    def __call__(self, x):
        h = nnx.silu(self.l2(nnx.silu(self.l1(x))))
        return 0.5 * jnp.sum(x**2) / BASE_STD**2 + self.out(h)[0]


def sample_ring(key, n):
    k1, k2 = jax.random.split(key)
    comp = jax.random.choice(k1, 8, (n,), p=jnp.asarray(MASSES))
    centres = RADIUS * jnp.stack([jnp.cos(ANGLES), jnp.sin(ANGLES)], -1)
    return centres[comp] + MODE_STD * jax.random.normal(k2, (n, 2))


def sector(points):
    """Index of the nearest mode (by angle)."""
    ang = jnp.arctan2(points[..., 1], points[..., 0])
    return jnp.round(ang / (2 * np.pi / 8)).astype(int) % 8


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="results/flax_ring")
    args = parser.parse_args(argv)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    n_data, n_walkers, n_iter, hidden, n_grid = (
        (128, 32, 10, 8, 40) if SMOKE else (4000, 1000, 3000, 64, 200)
    )
    key = jax.random.key(0)
    data = sample_ring(jax.random.fold_in(key, 1), n_data)
    potential_fn, params = from_flax(RingEnergy(hidden, nnx.Rngs(0)))
    log_z0 = math.log(2 * math.pi * BASE_STD**2)

    lim = RADIUS + 1.5
    g = jnp.linspace(-lim, lim, n_grid)
    grid = jnp.stack(jnp.meshgrid(g, g), -1).reshape(-1, 2)
    cell = float((g[1] - g[0]) ** 2)
    energy_on = jax.jit(jax.vmap(potential_fn, (None, 0)))

    results = {}
    for method in ("jarzynski", "pcd"):
        t0 = time.time()
        res = fit(
            potential_fn, params, data, optimizer=optax.sgd(0.05), method=method,
            num_walkers=n_walkers, step_size=0.01, num_iterations=n_iter,
            rng_key=jax.random.fold_in(key, 2), batch_size=min(256, n_data),
            init_particles=lambda k, n: BASE_STD * jax.random.normal(k, (n, 2)),
            log_z0=log_z0 if method == "jarzynski" else None,
        )
        log_p = -energy_on(res.params, grid)
        log_z_grid = float(logsumexp(log_p) + math.log(cell))
        p = jax.nn.softmax(log_p)
        grid_masses = np.asarray(jax.ops.segment_sum(p, sector(grid), 8))
        w = jnp.exp(res.state.log_weights)
        walker_masses = np.asarray(jax.ops.segment_sum(w, sector(res.state.particles), 8))
        results[method] = dict(result=res, log_p=log_p, grid_masses=grid_masses,
                               walker_masses=walker_masses, log_z_grid=log_z_grid,
                               seconds=time.time() - t0)

    print(f"eight-Gaussian ring, {n_data} points, {n_walkers} walkers, {n_iter} iterations")
    print("true masses      " + " ".join(f"{m:.3f}" for m in MASSES))
    for method, r in results.items():
        tv = 0.5 * np.abs(r["grid_masses"] - MASSES).sum()
        print(f"{method:10s} grid " + " ".join(f"{m:.3f}" for m in r["grid_masses"])
              + f"   TV={tv:.3f}  ({r['seconds']:.1f}s)")
    jz = results["jarzynski"]
    log_z_est = log_z0 + float(jz["result"].state.log_normalizer)
    print(f"log Z: Jarzynski {log_z_est:.3f}, grid {jz['log_z_grid']:.3f}")
    trained = potential_fn.to_module(jz["result"].params)  # trained params back in a module
    print(f"trained module energy at (R, 0): {float(trained(jnp.array([RADIUS, 0.0]))):.3f}")

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    for ax, method in zip(axes[:2], ("jarzynski", "pcd"), strict=True):
        r = results[method]
        dens = np.exp(np.asarray(r["log_p"]) - float(r["log_p"].max())).reshape(n_grid, n_grid)
        ax.contourf(np.asarray(g), np.asarray(g), dens, levels=30, cmap="viridis")
        parts = np.asarray(r["result"].state.particles)
        ax.scatter(parts[:, 0], parts[:, 1], s=2, c="w", alpha=0.4)
        ax.set_title(f"{method}: learned density and walkers")
        ax.set_aspect("equal")
    x = np.arange(8)
    axes[2].bar(x - 0.27, MASSES, 0.27, label="truth")
    axes[2].bar(x, results["jarzynski"]["grid_masses"], 0.27, label="Jarzynski")
    axes[2].bar(x + 0.27, results["pcd"]["grid_masses"], 0.27, label="PCD")
    axes[2].set_xlabel("mode")
    axes[2].set_ylabel("mass")
    axes[2].legend()
    axes[2].set_title("mode masses of the learned density")
    fig.tight_layout()
    fig.savefig(out / "ring.png", dpi=110)
    print(f"saved {out / 'ring.png'}")


if __name__ == "__main__":
    main()
