"""The increment split: parameter part U_k - U_{k+1} at the walkers, move part the rest."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import numpyro_ebm
from numpyro_ebm.kernels import jarzynski_ula, ula
from numpyro_ebm.training.increments import accumulated_split, split_statistics, with_increment_split


def u(params, x):  # N(params["m"], exp(-params["s"]) I)
    return 0.5 * jnp.exp(params["s"]) * jnp.sum((x - params["m"]) ** 2)


PARAMS = {"m": jnp.zeros(3), "s": jnp.asarray(0.0)}
DATA = 1.0 + 0.5 * jax.random.normal(jax.random.key(0), (64, 3))
WALKERS = jax.random.normal(jax.random.key(1), (32, 3))


def _steps(trainer, num, seed=2):
    state = trainer.init(PARAMS, WALKERS)
    step = jax.jit(trainer.step)
    infos = []
    for k in range(num):
        state, info = step(jax.random.fold_in(jax.random.key(seed), k), state, DATA)
        infos.append(info)
    return state, infos


def test_parameter_part_vanishes_without_a_parameter_step():
    """lr = 0: theta_{k+1} = theta_k, so the parameter part is exactly 0 and the whole
    increment is the move part (the ULA move's log MH ratio, non-zero at h = 0.5)."""
    trainer = with_increment_split(numpyro_ebm.build_trainer(u, optax.sgd(0.0), jarzynski_ula.walker_kernel(0.5)))
    _, infos = _steps(trainer, 3)
    for info in infos:
        stats = info.extra["increment_split"]
        assert float(stats["param_var"]) == 0.0 and float(stats["param_mean"]) == 0.0
        assert float(stats["move_var"]) > 1e-3


def test_move_part_vanishes_for_a_tiny_step():
    """h -> 0: the move part is O(sqrt(h)) while the parameter part does not depend on h; a
    wrong sign or order of the parameter part would leave a move part of its size."""
    trainer = with_increment_split(numpyro_ebm.build_trainer(u, optax.sgd(0.2), jarzynski_ula.walker_kernel(1e-10)),
                                   per_walker=True)
    _, infos = _steps(trainer, 3)
    for info in infos[1:]:
        stats = info.extra["increment_split"]
        assert float(stats["param_var"]) > 1e-4
        assert float(stats["move_var"]) < 1e-6 * float(stats["param_var"])
        np.testing.assert_allclose(stats["param_part"], info.kernel_info.log_weight_increments,
                                   rtol=1e-4, atol=1e-5)  # float32: U ~ 10, eps ~ 1e-7, a few ops


def test_accumulated_split_rebuilds_the_log_weight_variance():
    """Since the last resampling the log weights are the accumulated increments along the
    ancestry: accumulated_split's total equals the variance of the actual log weights before
    each resampling (exactly, up to float error), through several resamplings."""
    trainer = with_increment_split(
        numpyro_ebm.build_trainer(u, optax.sgd(0.3), jarzynski_ula.walker_kernel(0.4, ess_threshold=0.8)),
        per_walker=True)
    _, infos = _steps(trainer, 25)
    trace = {"resampled": np.array([bool(i.kernel_info.resampled) for i in infos]),
             "extra": {"increment_split": {k: np.stack([np.asarray(i.extra["increment_split"][k]) for i in infos])
                                           for k in ("param_part", "move_part", "ancestors")}}}
    assert 3 <= trace["resampled"].sum() < 25
    acc = accumulated_split(trace)
    actual = np.array([np.var(np.asarray(i.log_weights_before_resampling, np.float64)) for i in infos])
    np.testing.assert_allclose(acc["log_weight_var"], actual, rtol=1e-4, atol=1e-7)
    assert np.all(acc["param_var"] >= 0) and np.all(acc["move_var"] >= 0)


def test_split_statistics_weighted_moments():
    lw = jnp.log(jnp.array([0.5, 0.25, 0.25]))
    p, m = jnp.array([1.0, 0.0, -1.0]), jnp.array([0.0, 2.0, 2.0])
    stats = split_statistics(lw, p, m)
    assert float(stats["param_mean"]) == pytest.approx(0.25)
    assert float(stats["param_var"]) == pytest.approx(0.5 * 0.75**2 + 0.25 * 0.25**2 + 0.25 * 1.25**2)
    assert float(stats["move_var"]) == pytest.approx(1.0)  # mean 1, every deviation +-1
    assert float(stats["param_move_cov"]) == pytest.approx(0.5 * 0.75 * -1 + 0.25 * -0.25 + 0.25 * -1.25)


def test_bad_inputs():
    with pytest.raises(TypeError, match="trainer"):
        with_increment_split(object())
    with pytest.raises(ValueError, match="unweighted"):
        with_increment_split(numpyro_ebm.build_trainer(u, optax.sgd(0.1), ula.walker_kernel(0.1)))
