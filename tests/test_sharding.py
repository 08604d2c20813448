"""Tests of walkers sharded over devices (numpyro_ebm.sharding and fit's ``mesh``).

The sharded runs need several devices; on a CPU they come from
``XLA_FLAGS=--xla_force_host_platform_device_count=4``, which takes effect only before JAX
starts, so the comparison runs in a subprocess.
"""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from numpyro_ebm import fit
from numpyro_ebm.sharding import check_mesh

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import jax, jax.numpy as jnp, numpy as np, optax
    jax.config.update("jax_enable_x64", True)
    from jax.sharding import Mesh
    from numpyro_ebm import fit
    from numpyro_ebm.kernels import jarzynski_ula, ula

    def u(params, x):
        return 0.5 * jnp.sum((x - params["mu"]) ** 2) * jnp.exp(-2.0 * params["log_scale"])

    data = 1.5 + 0.7 * jax.random.normal(jax.random.key(0), (200, 3))
    params = {"mu": jnp.zeros(3), "log_scale": jnp.zeros(())}
    mesh = Mesh(np.array(jax.devices()), ("walkers",))
    out = {"num_devices": len(jax.devices())}
    kernels = {"jarzynski": jarzynski_ula.walker_kernel(0.3, ess_threshold=0.9),
               "pcd": ula.walker_kernel(0.3),
               "islands": jarzynski_ula.walker_kernel(0.3, ess_threshold=0.9, resampling_groups=8,
                                                      heldout_groups=2)}
    for method, kernel in kernels.items():
        runs = [
            fit(u, params, data, optimizer=optax.sgd(0.05), kernel=kernel, num_walkers=64,
                num_iterations=25, rng_key=jax.random.key(1), mesh=m)
            for m in (None, mesh)
        ]
        single, sharded = runs
        diffs = [float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                 for a, b in zip(jax.tree.leaves((single.params, single.state)),
                                 jax.tree.leaves((sharded.params, sharded.state)))]
        out[method] = {
            "max_abs_diff": max(diffs),
            "walker_devices": len(sharded.state.particles.sharding.device_set),
            "walker_shard_rows": sharded.state.particles.addressable_shards[0].data.shape[0],
            "resampled": int(np.sum(single.trace.get("resampled", 0))),
            "resampled_sharded": int(np.sum(sharded.trace.get("resampled", 0))),
            "method": sharded.method if method != "islands" else "islands",
        }
    print(json.dumps(out))
    """
)


def test_sharded_walkers_reproduce_the_single_device_run():
    """Four CPU devices, walkers split four ways: same key, same parameters, walkers,
    weights and log normaliser as on one device (float64, up to reduction order), with
    resampling (global ancestors) happening; the walkers really are split. The same for
    island resampling with held-out islands (8 groups of 8, two per device)."""
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    env = dict(os.environ, XLA_FLAGS=flags.strip(), JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["num_devices"] == 4
    for method in ("jarzynski", "pcd", "islands"):
        res = out[method]
        assert res["walker_devices"] == 4 and res["walker_shard_rows"] == 16, res
        assert res["max_abs_diff"] < 1e-9, res
        assert res["method"] == method
    assert out["jarzynski"]["resampled"] >= 2
    assert out["jarzynski"]["resampled_sharded"] == out["jarzynski"]["resampled"]
    assert out["islands"]["resampled"] >= 2
    assert out["islands"]["resampled_sharded"] == out["islands"]["resampled"]


def test_mesh_must_divide_the_walkers():
    from jax.sharding import Mesh

    mesh = Mesh(np.array(jax.devices()[:1]), ("walkers",))
    assert check_mesh(mesh, 10) is mesh
    with pytest.raises(TypeError, match="mesh"):
        check_mesh("cpu", 10)
    data = jnp.zeros((10, 2))
    with pytest.raises(TypeError, match="mesh"):
        fit(lambda p, x: jnp.sum((x - p) ** 2), jnp.zeros(2), data, optimizer=optax.sgd(0.1),
            num_walkers=8, kernel="jarzynski", step_size=0.1, num_iterations=1,
            rng_key=jax.random.key(0), mesh=jax.devices())
