"""The Gaussian-mixture experiment (numpyro_ebm.experiments.gmm)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from numpyro_ebm.experiments import gmm


def test_closed_form_log_normalizer_matches_quadrature(x64):
    config = gmm.GMMConfig(dim=1, small_mean=-3.0, large_mean=2.0)
    params = {"means": jnp.array([[-3.0], [2.0]]), "logits": jnp.array([0.3, -1.2])}
    grid = jnp.linspace(-15, 15, 30_001)[:, None]
    dens = jnp.exp(-jax.vmap(gmm.mixture_potential, (None, 0))(params, grid))
    log_z = jnp.log(jnp.trapezoid(dens, grid[:, 0]))
    np.testing.assert_allclose(log_z, gmm.mixture_log_normalizer(params), rtol=1e-9)
    assert config.dim == 1


def test_small_mode_mass_follows_the_nearest_component(x64):
    config = gmm.GMMConfig(dim=2)
    params = {
        "means": jnp.array([[6.0, 0.0], [-10.0, 0.0]]),  # components swapped
        "logits": jnp.log(jnp.array([0.7, 0.3])),
    }
    np.testing.assert_allclose(gmm.small_mode_mass(params, config), 0.3, rtol=1e-12)


def test_reduced_experiment_jarzynski_recovers_the_mass_pcd_and_cd_do_not():
    """d = 5, 2000 walkers and data points, 600 iterations. Over seeds 0-5 the Jarzynski
    final mass had mean 0.255 and seed-to-seed sd 0.019 (measured); the tolerance is 4 sd.
    PCD's mass collapses towards 0 and CD's stays near the initial 1/2."""
    config = gmm.GMMConfig(dim=5, num_data=2000, num_walkers=2000, num_iterations=600, seed=0)
    results = gmm.run(config)
    assert abs(results["jarzynski"]["final_small_mass"] - 0.25) < 4 * 0.019
    assert abs(results["pcd"]["final_small_mass"] - 0.25) > 0.15
    assert abs(results["cd"]["final_small_mass"] - 0.25) > 0.15
    # the weighted walkers agree with the model they are weighted for
    walker_mass = results["jarzynski"]["walker_small_mass"][-1]
    ess = results["jarzynski"]["result"].trace["ess"][-1]
    se = np.sqrt(0.25 * 0.75 / ess)
    assert abs(walker_mass - results["jarzynski"]["small_mass"][-1]) < 4 * se + 4 * 0.019
    # the Jarzynski cross-entropy estimate is recorded and finite, the exact one decreases
    ce = results["jarzynski"]["cross_entropy"]
    exact = results["jarzynski"]["exact_cross_entropy"]
    assert np.all(np.isfinite(ce)) and exact[-1] < exact[0]
    # the feedback correction is >= 0 at every step and the group standard error positive
    jz = results["jarzynski"]
    assert np.all(jz["feedback_bias"] >= 0) and jz["ce_corrected_error"] > jz["ce_estimate_error"]
    assert jz["cross_entropy_stderr"][0] == 0 and np.all(jz["cross_entropy_stderr"][1:] > 0)
    assert "standard error (walker groups)" in gmm.format_table(results)
    # the run is in float64 (the paper's setting) and leaves the caller's x64 flag as it was
    assert results["data"].dtype == jnp.float64
    assert not jax.config.read("jax_enable_x64")


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="num_walkers"):
        gmm.GMMConfig(num_walkers=1)
    with pytest.raises(ValueError, match="small_mass"):
        gmm.GMMConfig(small_mass=0.7)
    with pytest.raises(ValueError, match="methods"):
        gmm.GMMConfig(methods=("sgld",))
    with pytest.raises(ValueError, match="num_groups"):
        gmm.GMMConfig(num_walkers=999)
    assert not gmm.GMMConfig(num_walkers=999, island_resampling=False).island_resampling
    for bad in (1, 10):
        with pytest.raises(ValueError, match="heldout_groups"):
            gmm.GMMConfig(heldout_groups=bad)
    with pytest.raises(ValueError, match="heldout_groups"):
        gmm.GMMConfig(heldout_groups=5, island_resampling=False)


def test_heldout_groups_add_their_own_estimate():
    """A small run with 5 of 10 islands held out of the gradient: the held-out estimate and
    its standard error are recorded per iteration and at the end, consistent with each
    other, and printed in the table."""
    config = gmm.GMMConfig(dim=2, num_data=200, num_walkers=200, num_iterations=40,
                           methods=("jarzynski",), heldout_groups=5)
    results = gmm.run(config)
    jz = results["jarzynski"]
    assert jz["cross_entropy_heldout"].shape == jz["cross_entropy"].shape
    assert np.all(np.isfinite(jz["cross_entropy_heldout"])) and jz["final_cross_entropy_heldout_stderr"] > 0
    assert jz["ce_heldout_error"] == pytest.approx(jz["final_cross_entropy_heldout"] - jz["final_exact_cross_entropy"])
    assert jz["cross_entropy_heldout"][0] == pytest.approx(jz["cross_entropy"][0])  # equal weights at the start
    assert "5 held-out groups" in gmm.format_table(results)
