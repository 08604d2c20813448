"""A Flax NNX MLP energy trained on eight Gaussians on a ring with unequal masses.

Data: eight Gaussians (std 0.3) on a circle of radius 3 with masses 1/36, 2/36, ..., 8/36.
Neighbouring modes are about 7.7 standard deviations apart: as the learned modes sharpen,
the barriers between them grow and the Langevin walkers stop crossing.

Energy: U_theta(x) = |x|^2 / (2 s0^2) + MLP_theta(x), with the MLP's last layer set to zero,
so the initial model is exactly N(0, s0^2 I): the walkers start as exact draws from it and
log Z_0 = log(2 pi s0^2) is known. The MLP is an ``nnx.Module`` turned into
``potential_fn(params, x)`` by ``numpyro_ebm.potentials.from_flax``.

Trains with Jarzynski-weighted walkers and with PCD (same optimiser, walkers, step size and
keys) and compares the mode masses (each point assigned to its nearest mode centre) of the
truth, of the walkers (Jarzynski: weighted; PCD: equal weights) and of the learned density
itself (normalised on a grid). PCD's walkers end up matching the data, but they are trapped
in their modes and no longer describe the model, whose masses drift; Jarzynski's weights
carry the mass changes. Saves ``ring_density.png`` (learned densities and walkers),
``ring_masses.png`` (mode masses) and ``ring_trace.png`` (walker-mass error and ESS).

The settings matter: plain SGD with a small learning rate (one step of lr = 0.01 already
changes U by ~0.5 nats between walkers, and the weights degenerate within a few iterations),
a ULA step size h ~ 0.03 (mode std)^2 (small enough that the modes form before the walkers
have spread between them), a few thousand walkers. Training much longer than this sharpens
the model towards the finite data set and the weights degrade.

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
NUM_MODES, RADIUS, MODE_STD, BASE_STD = 8, 3.0, 0.3, 2.5
MASSES = np.arange(1, NUM_MODES + 1) / np.arange(1, NUM_MODES + 1).sum()  # 1/36, ..., 8/36
ANGLES = 2 * np.pi * np.arange(NUM_MODES) / NUM_MODES
CENTRES = RADIUS * np.stack([np.cos(ANGLES), np.sin(ANGLES)], -1)
METHODS = ("jarzynski", "pcd")

if SMOKE:
    N_DATA, N_WALKERS, N_ITER, HIDDEN, N_GRID = 256, 64, 40, 16, 60
else:
    N_DATA, N_WALKERS, N_ITER, HIDDEN, N_GRID = 10_000, 2000, 6000, 64, 200
LEARNING_RATE, STEP_SIZE, BATCH_SIZE, CLIP_NORM = 0.002, 0.003, 256, 10.0


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
    comp = jax.random.choice(k1, NUM_MODES, (n,), p=jnp.asarray(MASSES))
    return jnp.asarray(CENTRES)[comp] + MODE_STD * jax.random.normal(k2, (n, 2))


def nearest_mode(points):
    """Index of the nearest mode centre, per point."""
    sq = jnp.sum((points[:, None, :] - jnp.asarray(CENTRES)) ** 2, axis=-1)
    return jnp.argmin(sq, axis=-1)


def mode_masses(points, weights):
    """Total weight per mode (points assigned to their nearest mode centre)."""
    return jax.ops.segment_sum(weights, nearest_mode(points), NUM_MODES)


def tv(masses):
    return 0.5 * float(np.abs(np.asarray(masses) - MASSES).sum())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="results/flax_ring")
    args = parser.parse_args(argv)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    key = jax.random.key(0)
    data = sample_ring(jax.random.fold_in(key, 1), N_DATA)
    potential_fn, params = from_flax(RingEnergy(HIDDEN, nnx.Rngs(0)))
    log_z0 = math.log(2 * math.pi * BASE_STD**2)  # rho_0 = N(0, s0^2 I) exactly
    optimizer = optax.chain(optax.clip_by_global_norm(CLIP_NORM), optax.sgd(LEARNING_RATE))

    lim = RADIUS + 3 * MODE_STD + 1.5
    g = jnp.linspace(-lim, lim, N_GRID)
    grid = jnp.stack(jnp.meshgrid(g, g), -1).reshape(-1, 2)
    cell = float((g[1] - g[0]) ** 2)
    energy_on = jax.jit(jax.vmap(potential_fn, (None, 0)))

    def walker_masses_fn(_params, state):  # per iteration, inside the jitted loop
        return mode_masses(state.particles, jnp.exp(state.log_weights))

    results = {}
    for method in METHODS:
        t0 = time.time()
        res = fit(
            potential_fn, params, data, optimizer=optimizer, kernel=method,
            num_walkers=N_WALKERS, step_size=STEP_SIZE, num_iterations=N_ITER,
            rng_key=jax.random.fold_in(key, 2), data_batch_size=min(BATCH_SIZE, N_DATA),
            init_particles=lambda k, n: BASE_STD * jax.random.normal(k, (n, 2)),
            log_z0=log_z0 if method == "jarzynski" else None, trace_fn=walker_masses_fn,
        )
        log_p = -energy_on(res.params, grid)
        p_grid = jax.nn.softmax(log_p)
        weights = jnp.exp(res.state.log_weights)  # equal weights for PCD
        edge = np.asarray(p_grid).reshape(N_GRID, N_GRID)
        results[method] = dict(
            result=res, log_p=log_p,
            walker_masses=np.asarray(mode_masses(res.state.particles, weights)),
            grid_masses=np.asarray(mode_masses(grid, p_grid)),
            log_z_grid=float(logsumexp(log_p) + math.log(cell)),
            edge_mass=float(edge[[0, -1], :].sum() + edge[1:-1, [0, -1]].sum()),
            seconds=time.time() - t0,
        )

    jz, pcd = results["jarzynski"], results["pcd"]
    print(f"{NUM_MODES} Gaussians on a ring: {N_DATA} points, {N_WALKERS} walkers, "
          f"{N_ITER} iterations, sgd({LEARNING_RATE}), h = {STEP_SIZE}")
    columns = [
        ("truth", MASSES),
        ("Jarzynski walkers", jz["walker_masses"]),
        ("Jarzynski model", jz["grid_masses"]),
        ("PCD walkers", pcd["walker_masses"]),
        ("PCD model", pcd["grid_masses"]),
    ]
    print("mode " + "".join(f"{name:>19s}" for name, _ in columns))
    for j in range(NUM_MODES):
        print(f"{j:4d} " + "".join(f"{float(m[j]):19.4f}" for _, m in columns))
    print("TV   " + "".join(f"{tv(m):19.4f}" for _, m in columns))
    log_z_est = log_z0 + float(jz["result"].state.log_normalizer)
    print(f"log Z (Jarzynski model): Jarzynski estimate {log_z_est:.3f}, grid "
          f"{jz['log_z_grid']:.3f}   (PCD model, grid: {pcd['log_z_grid']:.3f})")
    trace = jz["result"].trace
    print(f"Jarzynski: min ESS/N {float(trace['normalized_ess'].min()):.3f}, "
          f"{int(trace['resampled'].sum())} resamplings, final cross-entropy estimate "
          f"{float(trace['cross_entropy'][-1]):.3f}")
    for method, r in results.items():
        print(f"{method}: {r['seconds']:.1f}s, model mass on the grid's edge {r['edge_mass']:.1e}")
    trained = potential_fn.to_module(jz["result"].params)  # trained params back in a module
    print(f"trained module energy at (R, 0): {float(trained(jnp.array([RADIUS, 0.0]))):.3f}")

    # learned densities with the walkers
    fig, axes = plt.subplots(1, 2, figsize=(11, 5.2))
    for ax, method in zip(axes, METHODS, strict=True):
        r = results[method]
        rel = (np.asarray(r["log_p"]) - float(r["log_p"].max())).reshape(N_GRID, N_GRID)
        ax.contourf(np.asarray(g), np.asarray(g), np.maximum(rel, -8.0), levels=24,
                    cmap="Greys")  # log density, clipped 8 nats below its maximum
        parts = np.asarray(r["result"].state.particles)
        w = np.exp(np.asarray(r["result"].state.log_weights))
        if method == "jarzynski":
            sc = ax.scatter(parts[:, 0], parts[:, 1], s=4 * w * len(w), c=w * len(w),
                            cmap="plasma", alpha=0.6, linewidths=0)
            fig.colorbar(sc, ax=ax, shrink=0.8, label="walker weight x N")
        else:
            ax.scatter(parts[:, 0], parts[:, 1], s=4, c="tab:orange", alpha=0.5,
                       linewidths=0)
        ax.scatter(CENTRES[:, 0], CENTRES[:, 1], marker="+", c="tab:blue", s=60)
        for j, (cx, cy) in enumerate(CENTRES):
            ax.annotate(str(j), (1.25 * cx, 1.25 * cy), ha="center", va="center",
                        color="tab:blue")
        ax.set_title(f"{method}: learned log density, walkers (TV of model masses "
                     f"{tv(r['grid_masses']):.3f})", fontsize=10)
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
    fig.tight_layout()
    fig.savefig(out / "ring_density.png", dpi=110)
    plt.close(fig)

    # mode masses
    fig, ax = plt.subplots(figsize=(9, 4.2))
    x = np.arange(NUM_MODES)
    width = 0.16
    for i, (name, m) in enumerate(columns):
        ax.bar(x + (i - 2) * width, m, width, label=f"{name} (TV {tv(m):.3f})")
    ax.set_xticks(x)
    ax.set_xlabel("mode")
    ax.set_ylabel("mass")
    ax.set_title("mode masses: truth, walkers and learned model (normalised on a grid)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "ring_masses.png", dpi=110)
    plt.close(fig)

    # walker-mass error and Jarzynski ESS over training
    fig, ax = plt.subplots(figsize=(8, 3.8))
    for method in METHODS:
        walker_traj = results[method]["result"].trace["extra"]
        ax.plot(0.5 * np.abs(walker_traj - MASSES).sum(-1), label=f"{method} walkers")
    ax.set_xlabel("iteration")
    ax.set_ylabel("TV(walker masses, truth)")
    ax2 = ax.twinx()
    ax2.plot(trace["normalized_ess"], color="grey", lw=0.6, alpha=0.6, label="Jarzynski ESS/N")
    ax2.set_ylim(0, 1.05)
    ax2.set_ylabel("ESS/N")
    fig.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "ring_trace.png", dpi=110)
    plt.close(fig)
    print(f"saved {out / 'ring_density.png'}, {out / 'ring_masses.png'}, "
          f"{out / 'ring_trace.png'}")


if __name__ == "__main__":
    main()
