"""The log normaliser of a trained EBM (numpyro_ebm.normalizer)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from numpyro_ebm.experiments.gmm import mixture_log_normalizer, mixture_potential
from numpyro_ebm.normalizer import estimate_log_normalizer

PARAMS = {
    "means": jnp.array([[-3.0, 0.0], [3.0, 1.0]]),
    "logits": jnp.log(jnp.array([0.3, 0.7])) + 1.0,
}


def test_two_dimensional_mixture_log_normalizer_within_0_05(x64):
    result = estimate_log_normalizer(
        mixture_potential, PARAMS, jax.random.key(0), num_walkers=2000, event_shape=(2,),
        base_scale=3.0, step_size=0.2,
    )
    exact = float(mixture_log_normalizer(PARAMS))
    assert abs(float(result.log_normalizer) - exact) < 0.05
    assert abs(float(result.log_normalizer) - exact) < 5 * float(result.stderr) + 1e-3
    assert result.estimates.shape == (4,)
    # the weighted final walkers sample the mixture: mass of the mode at x1 > 0 is 0.7
    w = jax.nn.softmax(result.state.log_weights, axis=-1)
    mass = jnp.sum(w * (result.state.particles[..., 0] > 0), axis=-1)
    np.testing.assert_allclose(mass, 0.7, atol=4 * np.sqrt(0.21 / 1000))


def test_base_fitted_to_data_and_float32():
    data = jax.random.normal(jax.random.key(1), (500, 2)) * 2.0 + 1.0
    result = estimate_log_normalizer(
        lambda p, x: 0.5 * jnp.sum((x - p) ** 2), jnp.array([1.0, 1.0]), jax.random.key(2),
        num_walkers=500, data=data, num_repeats=2,
    )
    assert result.log_normalizer.dtype == jnp.float32
    # N(1, I): log Z = log(2 pi)
    assert abs(float(result.log_normalizer) - float(jnp.log(2 * jnp.pi))) < 0.1


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"num_walkers": 1}, "num_walkers"),
        ({"base": "student"}, "base"),
        ({"target_ess": 1.0}, "target_ess"),
        ({"max_substeps": 0}, "max_substeps"),
        ({"event_shape": None}, "event_shape"),
        ({"base_scale": -1.0}, "base_scale"),
        ({"step_size": 0.0}, "step_size"),
    ],
)
def test_bad_input_names_the_argument(kw, match):
    args = {"num_walkers": 10, "event_shape": (2,)}
    args.update(kw)
    with pytest.raises((ValueError, TypeError), match=match):
        estimate_log_normalizer(mixture_potential, PARAMS, jax.random.key(0), **args)
