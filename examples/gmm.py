"""Train a two-mode Gaussian mixture with Jarzynski-weighted walkers and with PCD.

The data come from two unit Gaussians with masses 1/4 and 3/4; the model starts with
both modes near the origin and equal masses. Jarzynski's weighted walkers give the right
gradient for the mass and recover 1/4; PCD's unweighted walkers stay split as they were
when the modes separated, and its mass drifts away.

    python examples/gmm.py [--output-dir results/example_gmm]

Set NUMPYRO_EBM_SMOKE=1 for a seconds-long run at a tiny size.
"""

import argparse
import math
import os

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import optax  # noqa: E402

import numpyro_ebm  # noqa: E402

SMOKE = os.environ.get("NUMPYRO_EBM_SMOKE") == "1"
jax.config.update("jax_enable_x64", True)


def energy(params, x):
    """U(x) = -log sum_j exp(logit_j - |x - mu_j|^2 / 2), one sample x."""
    sq = jnp.sum((x - params["means"]) ** 2, axis=-1)
    return -jax.nn.logsumexp(params["logits"] - 0.5 * sq)


def log_normalizer(params):
    d = params["means"].shape[-1]
    return 0.5 * d * math.log(2 * math.pi) + jax.nn.logsumexp(params["logits"])


def sample(key, params, n):
    k1, k2 = jax.random.split(key)
    comp = jax.random.categorical(k1, params["logits"], shape=(n,))
    return params["means"][comp] + jax.random.normal(k2, (n, params["means"].shape[-1]))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--output-dir", default=os.path.join("results", "example_gmm"))
    args = parser.parse_args()
    os.makedirs(args.output_dir, exist_ok=True)

    dim, n, iterations = (5, 1000, 300) if SMOKE else (10, 5000, 1500)
    key_data, key_init, key_walkers, key_fit = jax.random.split(jax.random.key(0), 4)
    teacher = {
        "means": jnp.zeros((2, dim)).at[0, 0].set(-10.0).at[1, 0].set(6.0),
        "logits": jnp.log(jnp.array([0.25, 0.75])),
    }
    data = sample(key_data, teacher, n)
    params0 = {
        "means": (0.01 * jax.random.normal(key_init, (2, dim))).at[:, 0].set(jnp.array([-0.1, 0.1])),
        "logits": jnp.zeros(2),
    }
    walkers0 = sample(key_walkers, params0, n)  # draws from the initial model
    optimizer = optax.multi_transform(
        {"means": optax.sgd(0.01), "logits": optax.sgd(0.05)},
        {"means": "means", "logits": "logits"},
    )

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, color in (("jarzynski", "C0"), ("pcd", "C1")):
        result = numpyro_ebm.fit(
            energy, params0, data, optimizer=optimizer, kernel=method, num_walkers=n,
            step_size=0.1, num_iterations=iterations, rng_key=key_fit,
            init_particles=walkers0, log_z0=float(log_normalizer(params0)),
            trace_fn=lambda p, s: jax.nn.softmax(p["logits"])[0],
        )
        mass = result.trace["extra"]
        print(f"{method:>10}: mass of the small mode {float(mass[-1]):.3f} (truth 0.25)")
        if method == "jarzynski":
            exact = float(
                jnp.mean(jax.vmap(energy, (None, 0))(result.params, data))
                + log_normalizer(result.params)
            )
            est = float(numpyro_ebm.ce_estimate(
                energy, result.params, data, result.state, float(log_normalizer(params0))
            ))
            print(f"{'':>10}  cross-entropy: Jarzynski estimate {est:.3f}, exact {exact:.3f}")
        ax.plot(mass, color=color, label=method)
    ax.axhline(0.25, color="k", ls="--", lw=0.8, label="truth")
    ax.set_xlabel("iteration")
    ax.set_ylabel("mass of the small mode")
    ax.legend()
    fig.tight_layout()
    path = os.path.join(args.output_dir, "gmm_mass.png")
    fig.savefig(path, dpi=110)
    print(f"saved {path}")


if __name__ == "__main__":
    main()
