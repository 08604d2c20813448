"""Your own training loop around `trainer.step`: your own minibatches, your own logging.

`numpyro_ebm.fit` is `build_trainer` + `run` + default callbacks. Here the same Jarzynski
training of a 2-d Gaussian-mixture EBM runs twice: once through `fit` (full batch), once
through a hand-written jitted loop over `trainer.step` with the same keys, which must give
the same parameters; then the hand-written loop continues with its own minibatch iterator
(a NumPy generator, outside JAX) and prints its own log lines.

    python examples/custom_loop.py [--output-dir results/example_custom_loop]

Set NUMPYRO_EBM_SMOKE=1 for a seconds-long run at a tiny size.
"""

import argparse
import math
import os
import pathlib

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import numpyro_ebm  # noqa: E402
from numpyro_ebm.kernels import jarzynski_ula  # noqa: E402

SMOKE = os.environ.get("NUMPYRO_EBM_SMOKE") == "1"
jax.config.update("jax_enable_x64", True)


def energy(params, x):
    """Two unit Gaussians at +-params['loc'] with log-weights params['logits']."""
    centres = jnp.stack([params["loc"], -params["loc"]])
    return -jax.nn.logsumexp(params["logits"] - 0.5 * jnp.sum((x - centres) ** 2, -1))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output-dir", default="results/example_custom_loop")
    out = pathlib.Path(parser.parse_args().output_dir)
    out.mkdir(parents=True, exist_ok=True)
    n_data, n_walkers, n_iter = (400, 128, 60) if SMOKE else (4000, 2000, 1500)
    key = jax.random.key(0)
    k_data, k_side, k_walk, k_fit = jax.random.split(key, 4)
    side = jnp.where(jax.random.uniform(k_side, (n_data,)) < 0.25, -1.0, 1.0)
    data = side[:, None] * jnp.array([3.0, 0.0]) + jax.random.normal(k_data, (n_data, 2))
    params0 = {"loc": jnp.array([1.0, 0.0]), "logits": jnp.zeros(2)}
    # rho_0 is an equal mixture at +-(1, 0): exact draws for the initial walkers
    signs = jnp.where(jax.random.bernoulli(k_walk, 0.5, (n_walkers,)), 1.0, -1.0)
    walkers0 = signs[:, None] * params0["loc"] + jax.random.normal(jax.random.fold_in(k_walk, 1),
                                                                    (n_walkers, 2))
    log_z0 = math.log(2 * 2 * math.pi)
    kernel = jarzynski_ula.walker_kernel(0.1)
    optimizer = optax.sgd(0.02)

    # 1. fit, full batch
    result = numpyro_ebm.fit(energy, params0, data, optimizer=optimizer, kernel=kernel,
                             num_walkers=n_walkers, num_iterations=n_iter, rng_key=k_fit,
                             init_particles=walkers0, log_z0=log_z0)

    # 2. the same run by hand: fit splits rng_key into (init key, loop key) and gives
    #    iteration k the key fold_in(loop key, k)
    trainer = numpyro_ebm.build_trainer(energy, optimizer, kernel, log_z0=log_z0)
    _, loop_key = jax.random.split(k_fit)
    step = jax.jit(trainer.step)
    state = trainer.init(params0, walkers0)
    for k in range(n_iter):
        state, info = step(jax.random.fold_in(loop_key, k), state, data)
    same = jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), state.params, result.params))
    print(f"hand-written loop equals fit after {n_iter} iterations: {same}")
    if not same:
        raise SystemExit("the hand-written loop and fit disagree")

    # 3. continue with our own minibatch iterator (NumPy, outside JAX) and our own log
    rng = np.random.default_rng(1)
    host_data = np.asarray(data)
    masses, ce = [], []
    for k in range(n_iter, 2 * n_iter):
        batch = host_data[rng.choice(n_data, size=n_data // 4, replace=False)]
        state, info = step(jax.random.fold_in(loop_key, k), state, batch)
        masses.append(float(jax.nn.softmax(state.params["logits"])[1]))
        ce.append(float(info.cross_entropy))
        if (k + 1) % max(1, n_iter // 4) == 0:
            ess = float(info.kernel_info.ess) / n_walkers
            print(f"iteration {k + 1}: mass of the mode at -loc {masses[-1]:.3f} (truth 0.25), "
                  f"ESS/N {ess:.2f}, cross-entropy estimate {ce[-1]:.3f}")
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    axes[0].plot(np.arange(n_iter, 2 * n_iter), masses)
    axes[0].axhline(0.25, color="k", ls=":", label="truth 0.25")
    axes[0].set(xlabel="iteration", ylabel="mass of the mode at -loc", title="own minibatch loop")
    axes[0].legend()
    axes[1].plot(np.arange(n_iter, 2 * n_iter), ce)
    axes[1].set(xlabel="iteration", ylabel="nats", title="cross-entropy estimate (minibatch)")
    fig.tight_layout()
    fig.savefig(out / "custom_loop.png", dpi=110)
    print(f"wrote {out / 'custom_loop.png'}")


if __name__ == "__main__":
    main()
