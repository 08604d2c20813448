"""Lineages: how many distinct ancestors (at the start of a window) the walkers descend
from. Resampling from a few survivors shows here, where the ESS (reset by every
resampling) does not."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import numpyro_ebm
from numpyro_ebm.kernels import jarzynski_ula
from numpyro_ebm.training import callbacks as cbs


def u(params, x):
    return 0.5 * jnp.sum((x - params) ** 2)


DATA = 1.0 + jax.random.normal(jax.random.key(0), (64, 2))
WALKERS = jax.random.normal(jax.random.key(1), (16, 2))


def test_num_lineages_counts_the_distinct_composed_ancestors():
    """Resampling at every call (ess_threshold 1): the count equals the number of distinct
    window-start ancestors, composed by hand from the kernel's ancestors, and resets at
    each window start."""
    window = 7
    trainer = numpyro_ebm.build_trainer(u, optax.sgd(0.05),
                                        jarzynski_ula.walker_kernel(0.3, ess_threshold=1.0),
                                        lineage_window=window)
    state = trainer.init(jnp.zeros(2), WALKERS)
    step = jax.jit(trainer.step)
    lineage = np.arange(16)
    for k in range(20):
        if k % window == 0:
            lineage = np.arange(16)
        state, info = step(jax.random.fold_in(jax.random.key(2), k), state, DATA)
        lineage = lineage[np.asarray(info.kernel_info.ancestors)]
        assert int(info.num_lineages) == len(np.unique(lineage)), k
    np.testing.assert_array_equal(state.lineage, lineage)


def test_lineage_collapse_warns():
    """16 walkers resampled at every iteration for 100 iterations coalesce to a few
    lineages (a coalescent reaches its last ancestor in ~2N generations): the degeneracy
    check names it, though the ESS after each resampling is N."""
    with pytest.warns(numpyro_ebm.WeightDegeneracyWarning, match="lineages"):
        result = numpyro_ebm.fit(
            u, jnp.zeros(2), DATA, optimizer=optax.sgd(0.05),
            kernel=jarzynski_ula.walker_kernel(0.3, ess_threshold=1.0), num_walkers=16,
            init_particles=WALKERS, num_iterations=100, rng_key=jax.random.key(3),
            callbacks=[cbs.DegeneracyCheck(ess_floor=None, lineage_floor=0.25)],
        )
    assert result.trace["num_lineages"].min() < 4
    assert np.all(np.diff(result.trace["num_lineages"][:99]) <= 0)  # one window: never grows


def test_healthy_run_keeps_its_lineages():
    with warnings.catch_warnings():
        warnings.simplefilter("error", numpyro_ebm.WeightDegeneracyWarning)
        result = numpyro_ebm.fit(
            u, jnp.zeros(2), DATA, optimizer=optax.sgd(0.01), kernel="jarzynski", step_size=0.1,
            num_walkers=64, init_particles=jax.random.normal(jax.random.key(1), (64, 2)),
            num_iterations=50, rng_key=jax.random.key(3),
        )
    assert result.trace["num_lineages"].min() >= 0.5 * 64


def test_lineages_reach_the_arviz_datatree():
    from numpyro_ebm import diagnostics

    result = numpyro_ebm.fit(
        u, jnp.zeros(2), DATA, optimizer=optax.sgd(0.05),
        kernel=jarzynski_ula.walker_kernel(0.3, ess_threshold=1.0), num_walkers=16,
        init_particles=WALKERS, num_iterations=12, rng_key=jax.random.key(3),
        callbacks=[cbs.DegeneracyCheck(ess_floor=None, lineage_floor=None)],
    )
    dt = diagnostics.to_datatree(result)
    np.testing.assert_array_equal(np.asarray(dt["sample_stats"]["num_lineages"]).ravel(),
                                  result.trace["num_lineages"])
