"""The log normaliser of a trained EBM (numpyro_ebm.normalizer)."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from numpyro_ebm.experiments.gmm import mixture_log_normalizer, mixture_potential
from numpyro_ebm.normalizer import ImproperEnergyWarning, estimate_log_normalizer

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


def _run(potential_fn, params=None, event_shape=(2,)):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = estimate_log_normalizer(
            potential_fn, params, jax.random.key(0), num_walkers=200, event_shape=event_shape,
            num_repeats=2,
        )
    ours = [w for w in caught if issubclass(w.category, ImproperEnergyWarning)]
    return result, ours


@pytest.mark.parametrize(
    "potential_fn",
    [
        lambda p, x: 0.0 * jnp.sum(x),  # flat: Z = infinity
        lambda p, x: -jnp.sum(x**2),  # unbounded below
        lambda p, x: jnp.tanh(jnp.sum(x**2)),  # bounded: exp(-U) -> e^-1 at infinity
    ],
    ids=["zero", "minus_square", "bounded"],
)
def test_improper_energy_warns(potential_fn):
    result, ours = _run(potential_fn)
    assert len(ours) == 1
    assert "may not be normalisable" in str(ours[0].message)
    assert np.all(np.isfinite(result.estimates))  # what made the silent failure silent


@pytest.mark.parametrize(
    "potential_fn, exact",
    [
        (lambda p, x: 0.5 * jnp.sum((x - p) ** 2), np.log(2 * np.pi)),
        # heavy tail, proper: 2-D Student t with 1 dof, Z = 2 pi
        (lambda p, x: 1.5 * jnp.log1p(jnp.sum((x - p) ** 2)), np.log(2 * np.pi)),
        (lambda p, x: jnp.sum(jnp.abs(x - p)), np.log(4.0)),  # Laplace
    ],
    ids=["gaussian", "cauchy", "laplace"],
)
def test_proper_energies_do_not_warn(potential_fn, exact):
    result, ours = _run(potential_fn, jnp.array([1.0, -0.5]))
    assert ours == []
    assert abs(float(result.log_normalizer) - exact) < 0.6


def test_scalar_event_and_python_number_params():
    result, ours = _run(lambda p, x: 0.5 * (x - p) ** 2, 1.0, event_shape=())
    assert ours == [] and abs(float(result.log_normalizer) - 0.5 * np.log(2 * np.pi)) < 0.2
    _, ours = _run(lambda p, x: 0.0 * x * p, 1.0, event_shape=())
    assert len(ours) == 1
