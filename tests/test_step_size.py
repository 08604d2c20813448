"""Step-size control (numpyro_ebm.step_size; numpyro_ebm.schedule is its old name)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from numpyro_ebm import fit
from numpyro_ebm.kernels import jarzynski_ula as ju
from numpyro_ebm.kernels.langevin import ula_proposal
from numpyro_ebm.step_size import StepSizeAdaptation, acceptance_proxy, probe_acceptance, step_size_adaptation


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


# ---------------------------------------------------------------------------------------
# The probe: MALA's acceptance at fixed parameters
# ---------------------------------------------------------------------------------------


def _anisotropic(p, x):
    return 0.5 * jnp.sum((x - p["mu"]) ** 2 / p["scale"] ** 2) + 0.1 * jnp.sum(x**4)


def test_probe_acceptance_is_malas_metropolis_hastings_ratio(x64):
    r"""Against the textbook ratio written out with the Gaussian proposal densities,
    :math:`\log r = U(x) - U(y) + \log q(y \to x) - \log q(x \to y)`,
    :math:`\log q(x \to y) = -|y - x + h\nabla U(x)|^2 / 4h`, for the same proposal, with
    unequal weights (float64, to 1e-10)."""
    params = {"mu": jnp.array([0.5, -1.0, 0.0]), "scale": jnp.array([1.0, 0.5, 2.0])}
    x = jax.random.normal(jax.random.key(0), (50, 3)) * 1.5
    state = ju.init(x, params, _anisotropic)
    state = state._replace(log_weights=jax.nn.log_softmax(jax.random.normal(jax.random.key(1), (50,))))
    key, h = jax.random.key(2), 0.3
    y = ula_proposal(key, state.particles, state.grad, h)
    u_y, g_y = jax.vmap(jax.value_and_grad(_anisotropic, argnums=1), in_axes=(None, 0))(params, y)

    def log_q(a, b, grad_a):  # log density of proposing b from a, up to a constant
        return -jnp.sum((b - a + h * grad_a) ** 2, axis=-1) / (4 * h)

    log_r = state.potential - u_y + log_q(y, x, g_y) - log_q(x, y, state.grad)
    expected = jnp.sum(jax.nn.softmax(state.log_weights) * jnp.minimum(1.0, jnp.exp(log_r)))
    got = probe_acceptance(key, _anisotropic, state, h)
    np.testing.assert_allclose(float(got), float(expected), rtol=1e-10)
    assert 0.05 < float(got) < 0.999  # a ratio that rejects some proposals: the test can fail
    # the walkers do not move: the state is an input only
    np.testing.assert_allclose(float(probe_acceptance(key, _anisotropic, state, h, batch_size=10)),
                               float(got), rtol=1e-10)


def _noisy_parameter_run(noise_variance, probe_every, num_iterations=600):
    r"""Gaussian energy :math:`\tfrac12|x - \mu|^2` in d = 5, 1000 walkers at equilibrium,
    an optimiser that ignores the gradient and moves :math:`\mu` by N(0, noise_variance)
    per coordinate per iteration (SGD noise in the parameters), h adapted to 0.95."""
    def u(p, x):
        return 0.5 * jnp.sum((x - p["mu"]) ** 2)

    d, n = 5, 1000
    optimizer = optax.scale(0.0)
    if noise_variance:
        optimizer = optax.chain(optimizer, optax.add_noise(noise_variance, 0.0, 0))
    result = fit(u, {"mu": jnp.zeros(d)}, jax.random.normal(jax.random.key(0), (100, d)),
                 optimizer=optimizer, kernel=ju.walker_kernel(0.5), num_walkers=n,
                 init_particles=jax.random.normal(jax.random.key(1), (n, d)), num_iterations=num_iterations,
                 rng_key=jax.random.key(2), step_size_adaptation=step_size_adaptation(0.95, probe_every=probe_every))
    return {k: np.asarray(v) for k, v in result.trace.items()}


def test_probe_adaptation_is_not_fooled_by_noisy_parameters():
    r"""With :math:`\mu` jittered by sd 0.1 per coordinate at every iteration, the increments'
    parameter part, :math:`-(x - \mu)\cdot\delta + |\delta|^2/2`, differs between walkers by
    about 0.2 whatever h is; the proxy reads that as rejections and drives h down by orders
    of magnitude (the bias this test shows first), while the probe adapts h to the value it
    finds with the parameters held fixed (within 20%, where a run-to-run difference is a few
    percent) and its acceptance averages the target: within 0.01 over the last 60 probes
    (one probe's standard deviation is about 0.003 with 1000 walkers)."""
    fixed = _noisy_parameter_run(0.0, 5)
    h_fixed = float(np.median(fixed["step_size"][300:]))
    proxy = _noisy_parameter_run(0.01, None)
    assert float(np.median(proxy["step_size"][300:])) < h_fixed / 10
    probe = _noisy_parameter_run(0.01, 5)
    assert float(np.median(probe["step_size"][300:])) == pytest.approx(h_fixed, rel=0.2)
    probes = probe["probe_acceptance"][::5]
    assert np.all(np.isfinite(probes)) and np.all(np.isnan(probe["probe_acceptance"][1::5]))
    assert abs(float(np.mean(probes[-60:])) - 0.95) < 0.01
    assert float(np.mean(probe["acceptance"][300:])) < 0.93  # the proxy there is off the target
    # the step size changes only after a probe: between probes it is held
    steps = probe["step_size"]
    changed = np.nonzero(np.diff(steps))[0] + 1
    assert np.all(changed % 5 == 1)


@pytest.mark.parametrize("value, error", [(0, ValueError), (2.5, TypeError), (True, TypeError)])
def test_bad_probe_every(value, error):
    with pytest.raises(error, match="probe_every"):
        step_size_adaptation(0.9, probe_every=value)
