"""Step-size control (numpyro_ebm.step_size; numpyro_ebm.schedule is its old name)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from numpyro_ebm.kernels import jarzynski_ula as ju
from numpyro_ebm.step_size import StepSizeAdaptation, acceptance_proxy, step_size_adaptation


def test_acceptance_proxy_exact_values():
    log_w = jnp.log(jnp.array([0.5, 0.25, 0.25]))
    inc = jnp.array([0.0, -jnp.log(2.0), 0.0])
    # c = log(0.5 + 0.125 + 0.25) = log(0.875); ratios min(1, e^{inc - c})
    c = jnp.log(0.875)
    expected = 0.5 * 1.0 + 0.25 * float(jnp.exp(-jnp.log(2.0) - c)) + 0.25 * 1.0
    np.testing.assert_allclose(acceptance_proxy(log_w, inc), expected, rtol=1e-6)
    # a common shift of the increments (a parameter move) changes nothing
    np.testing.assert_allclose(acceptance_proxy(log_w, inc + 3.0), expected, rtol=1e-6)


def test_dual_averaging_reaches_the_target_acceptance_on_a_gaussian():
    """Anisotropic Gaussian, walkers at equilibrium, h starting far too large (1.0): the
    proxy over the last 100 of 400 moves averages within 0.03 of the 0.7 target (its
    per-move standard deviation is about 0.01 here with 2000 walkers)."""
    scales = jnp.array([1.0, 0.5, 2.0])

    def u(p, x):
        return 0.5 * jnp.sum(x**2 / p**2)

    adaptation = step_size_adaptation(0.7)
    kernel = ju.build_kernel(u, 1.0)
    state = ju.init(jax.random.normal(jax.random.key(0), (2000, 3)) * scales, scales, u)

    def step(carry, key):
        st, ss = carry
        new, info = kernel(key, st, None, ss.step_size)
        a = acceptance_proxy(st.log_weights, info.log_weight_increments)
        return (new, adaptation.update(ss, a)), (a, ss.step_size)

    run = jax.jit(lambda c, ks: jax.lax.scan(step, c, ks))
    (_, final), (acc, steps) = run(
        (state, adaptation.init(1.0)), jax.random.split(jax.random.key(1), 400)
    )
    assert abs(float(jnp.mean(acc[-100:])) - 0.7) < 0.03
    assert float(acc[0]) < 0.5  # the initial step size was far off the target
    assert float(final.step_size) < 0.6


@pytest.mark.parametrize("target", [0.0, 1.0, -0.2, 2.0])
def test_bad_target_acceptance(target):
    with pytest.raises(ValueError, match="target_acceptance"):
        step_size_adaptation(target)


def test_bad_initial_step_size():
    with pytest.raises(ValueError, match="step_size"):
        step_size_adaptation(0.7).init(0.0)


def test_update_clips_the_step_size_and_keeps_its_dtype():
    """A step-size state in float32 stays float32; the iterate is clipped to
    [min_step_size, max_step_size] whatever the acceptance says."""
    adaptation = step_size_adaptation(0.7, min_step_size=0.05, max_step_size=2.0)
    assert isinstance(adaptation, StepSizeAdaptation)
    state = adaptation.init(jnp.asarray(1.0, jnp.float32))
    low = high = state
    for _ in range(50):
        low = adaptation.update(low, jnp.asarray(0.0, jnp.float32))  # never accepted: shrink
        high = adaptation.update(high, jnp.asarray(1.0, jnp.float32))  # always: grow
    assert low.step_size.dtype == jnp.float32
    assert float(low.step_size) == pytest.approx(0.05)
    assert float(high.step_size) == pytest.approx(2.0)


def test_old_module_path_reexports_the_step_size_module():
    import numpyro_ebm
    from numpyro_ebm import schedule, step_size

    assert numpyro_ebm.step_size is step_size
    for name in ("acceptance_proxy", "StepSizeState", "StepSizeAdaptation", "step_size_adaptation"):
        assert getattr(schedule, name) is getattr(step_size, name), name
