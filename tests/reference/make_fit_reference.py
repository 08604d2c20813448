"""Record fixed-seed results of `fit` to compare later versions against (bit for bit).

Run once with the code whose results are the reference, in the test suite's XLA setting:
    XLA_FLAGS=--xla_backend_optimization_level=0 .venv/bin/python tests/reference/make_fit_reference.py
It writes tests/reference/fit_reference.npz. The cases are listed in CASES (old `fit`
keyword arguments); tests/test_fit_reference.py runs the same cases through today's API.
"""

import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

from numpyro_ebm import fit  # noqa: E402  (the old API; the reference was recorded with it)


def u(params, x):
    return 0.5 * jnp.sum((x - params["mu"]) ** 2) * jnp.exp(-2.0 * params["log_scale"])


def problem(dtype):
    data = 1.5 + 0.7 * jax.random.normal(jax.random.key(0), (200, 2), dtype)
    params = {"mu": jnp.zeros(2, dtype), "log_scale": jnp.zeros((), dtype)}
    walkers = jax.random.normal(jax.random.key(2), (64, 2), dtype)
    return data, params, walkers


COMMON = dict(num_walkers=64, step_size=0.3, num_iterations=25, chunk_size=10, warn_ess_floor=None,
              log_z0=math.log(2 * math.pi), ess_threshold=0.9)

CASES = {
    "jarzynski": dict(),
    "jarzynski_f32": dict(dtype="float32"),
    "pcd": dict(method="pcd"),
    "cd": dict(method="cd", cd_restart_every=4),
    "adaptive": dict(schedule="adaptive", target_ess=0.9, max_substeps=5),
    "step_size_adaptation": dict(adapt_step_size=True, target_acceptance=0.6),
    "snapshots": dict(snapshot_every=5),
    "walker_chunks": dict(walker_batch_size=16),
    "num_steps": dict(num_steps=2),
    "noise_f32": dict(noise_dtype="float32"),
}


def run_case(opts):
    opts = dict(opts)
    dtype = jnp.float32 if opts.pop("dtype", "float64") == "float32" else jnp.float64
    if "noise_dtype" in opts:
        opts["noise_dtype"] = jnp.float32
    data, params, walkers = problem(dtype)
    method = opts.get("method", "jarzynski")
    kw = {**COMMON, **opts}
    if method != "jarzynski":
        kw.pop("log_z0")
    return fit(u, params, data, optimizer=optax.sgd(0.05), rng_key=jax.random.key(1),
               init_particles=None if method == "cd" else walkers, **kw)


def flatten(result):
    out = {}
    for prefix, tree in (("params", result.params), ("state", result.state), ("trace", result.trace)):
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
            out[prefix + jax.tree_util.keystr(path)] = np.asarray(leaf)
    return out


if __name__ == "__main__":
    jax.config.update("jax_enable_x64", True)
    arrays = {}
    for name, opts in CASES.items():
        with jax.enable_x64(opts.get("dtype", "float64") == "float64"):
            for key, value in flatten(run_case(opts)).items():
                arrays[f"{name}|{key}"] = value
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fit_reference.npz")
    np.savez_compressed(path, **arrays)
    print(f"wrote {len(arrays)} arrays to {path}", file=sys.stderr)
