"""Tests of the cross-entropy estimators (numpyro_ebm.estimators)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from numpyro_ebm import ce_estimate, ce_grad
from numpyro_ebm.estimators import ce_value_and_grad
from numpyro_ebm.kernels import jarzynski_ula as ju
from numpyro_ebm.kernels.evaluation import weighted_param_grad


def u(params, x):
    return 0.5 * jnp.sum((x - params["mu"]) ** 2) * jnp.exp(-2.0 * params["log_scale"])


def test_ce_grad_matches_the_closed_form(dtype):
    """For U = |x - mu|^2 / (2 s^2): D_mu = (mean(x_data) - sum_i w_i X_i) * (-1/s^2) ...
    written out for both parameters with arbitrary weights."""
    key = jax.random.key(0)
    k1, k2, k3 = jax.random.split(key, 3)
    params = {"mu": jnp.array([0.3, -0.2], dtype), "log_scale": jnp.asarray(0.1, dtype)}
    data = jax.random.normal(k1, (50, 2), dtype) + 1.0
    walkers = jax.random.normal(k2, (40, 2), dtype)
    log_w = jax.random.normal(k3, (40,), dtype)
    state = ju.init(walkers, params, u)._replace(log_weights=log_w - jax.nn.logsumexp(log_w))
    g = ce_grad(u, params, data, state)
    w = jax.nn.softmax(log_w)
    inv_var = jnp.exp(-2 * params["log_scale"])
    e_data = lambda f: jnp.mean(jax.vmap(f)(data), axis=0)  # noqa: E731
    e_model = lambda f: jnp.sum(w[:, None] * jax.vmap(f)(walkers).reshape(40, -1), axis=0)  # noqa: E731
    grad_mu = lambda x: (params["mu"] - x) * inv_var  # noqa: E731
    grad_ls = lambda x: -jnp.sum((x - params["mu"]) ** 2)[None] * inv_var  # noqa: E731
    tol = 1e-5 if dtype == jnp.float32 else 1e-12
    np.testing.assert_allclose(g["mu"], e_data(grad_mu) - e_model(grad_mu), rtol=tol, atol=tol)
    np.testing.assert_allclose(
        g["log_scale"], (e_data(grad_ls) - e_model(grad_ls))[0], rtol=tol, atol=tol
    )
    assert g["mu"].dtype == dtype


def test_ce_grad_uses_the_softmax_of_unnormalised_log_weights(x64):
    params = {"mu": jnp.zeros(2), "log_scale": jnp.zeros(())}
    walkers = jax.random.normal(jax.random.key(1), (10, 2))
    data = jnp.ones((5, 2))
    state = ju.init(walkers, params, u)
    shifted = state._replace(log_weights=state.log_weights + 123.0)
    a = ce_grad(u, params, data, state)
    b = ce_grad(u, params, data, shifted)
    np.testing.assert_allclose(a["mu"], b["mu"], rtol=1e-12)


def test_ce_value_and_grad_with_the_kernels_walker_term(x64):
    """``walker_grad`` (the walker term a kernel built with ``param_grad=True`` returns in
    ``info.param_grad``) replaces the weighted pass over the walkers: the same gradient as
    ``ce_grad`` at the kernel's new state, and the data energy is the mean data energy."""
    p0 = {"mu": jnp.zeros(2), "log_scale": jnp.zeros(())}
    p1 = {"mu": jnp.array([0.3, -0.1]), "log_scale": jnp.asarray(0.2)}
    data = jax.random.normal(jax.random.key(4), (30, 2)) + 1.0
    state = ju.init(jax.random.normal(jax.random.key(5), (50, 2)), p0, u)
    kernel = ju.build_kernel(u, 0.2, ess_threshold=1e-9, param_grad=True)
    new, info = jax.jit(kernel)(jax.random.key(6), state, p1)
    value_and_grad = jax.jit(ce_value_and_grad, static_argnums=0)
    energy, g = value_and_grad(u, p1, data, new, info.param_grad)
    want = value_and_grad(u, p1, data, new)[1]
    np.testing.assert_allclose(want["mu"], ce_grad(u, p1, data, new)["mu"], rtol=1e-10)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(energy, jnp.mean(jax.vmap(u, (None, 0))(p1, data)), rtol=1e-12)
    # a wrong walker term is used as given (it is not recomputed)
    zero = jax.tree.map(jnp.zeros_like, info.param_grad)
    _, g0 = value_and_grad(u, p1, data, new, zero)
    walker = weighted_param_grad(u, p1, new.particles, jnp.exp(new.log_weights))
    np.testing.assert_allclose(g0["mu"] - walker["mu"], g["mu"], rtol=1e-10, atol=1e-12)


def test_ce_estimate_is_exact_for_a_known_normaliser(x64):
    """Walkers for theta_0 = N(0, I); move to sigma = e^{0.3} with a known log Z; the
    estimate is data energy + log Z0 + log_normalizer, which equals the exact CE when the
    log normaliser is exact."""
    d = 2
    params = {"mu": jnp.zeros(d), "log_scale": jnp.asarray(0.3)}
    log_z0 = 0.5 * d * math.log(2 * math.pi)
    data = jax.random.normal(jax.random.key(2), (100, d))
    state = ju.init(jax.random.normal(jax.random.key(3), (20, d)), params, u)
    state = state._replace(log_normalizer=jnp.asarray(d * 0.3))
    exact = jnp.mean(jax.vmap(u, (None, 0))(params, data)) + log_z0 + d * 0.3
    np.testing.assert_allclose(ce_estimate(u, params, data, state, log_z0), exact, rtol=1e-12)


def _state():
    params = {"mu": jnp.zeros(2), "log_scale": jnp.zeros(())}
    return params, ju.init(jax.random.normal(jax.random.key(0), (8, 2)), params, u)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda p, s: ce_grad(u, p, jnp.full((4, 2), jnp.nan), s), "data"),
        (lambda p, s: ce_grad(u, p, jnp.ones((4, 3)), s), "per-sample shape"),
        (lambda p, s: ce_grad(u, p, jnp.ones((0, 2)), s), "data"),
        (lambda p, s: ce_grad(u, p, jnp.ones((4, 2)), s.particles), "state"),
        (lambda p, s: ce_estimate(u, p, jnp.ones((4, 2)), s, float("inf")), "log_z0"),
        (lambda p, s: ce_estimate(u, p, jnp.ones((4, 2), jnp.int32), s, 0.0), "data"),
    ],
)
def test_bad_input_names_the_argument(call, match):
    params, state = _state()
    with pytest.raises((ValueError, TypeError), match=match):
        call(params, state)


# -- feedback bias and walker-group standard errors ------------------------------------------

def test_feedback_bias_step_is_the_weighted_variance_of_the_parameter_gradients(dtype):
    from numpyro_ebm.estimators import feedback_bias_step

    key1, key2 = jax.random.split(jax.random.key(0))
    x = jax.random.normal(key1, (7, 3), dtype)
    log_w = jax.random.normal(key2, (7,), dtype)
    params = {"mu": jnp.array([0.3, -0.2, 0.1], dtype), "log_scale": jnp.asarray(0.2, dtype)}
    state = ju.init(x, params, u)._replace(log_weights=log_w)  # unnormalised: softmax is used
    lrs = {"mu": 0.01, "log_scale": 0.05}
    got = feedback_bias_step(u, params, state, lrs)
    # brute force, one walker at a time
    w = np.asarray(jax.nn.softmax(log_w), np.float64)
    per = [jax.grad(u)(params, xi) for xi in x]
    v_mu = np.stack([np.asarray(p["mu"], np.float64) for p in per])
    v_s = np.array([float(p["log_scale"]) for p in per])
    want = 0.01 * np.sum(w**2 * np.sum((v_mu - w @ v_mu) ** 2, axis=1))
    want += 0.05 * np.sum(w**2 * (v_s - w @ v_s) ** 2)
    np.testing.assert_allclose(float(got), want, rtol=1e-5 if dtype == jnp.float32 else 1e-12)
    # one learning rate for every leaf
    both = feedback_bias_step(u, params, state, 0.01)
    want_one = want + (0.01 - 0.05) * np.sum(w**2 * (v_s - w @ v_s) ** 2)
    np.testing.assert_allclose(float(both), want_one, rtol=1e-5 if dtype == jnp.float32 else 1e-12)


def test_group_log_normalizers_replicate_the_run_between_resamplings(x64):
    from numpyro_ebm.estimators import group_log_normalizers, group_log_weight_sums

    # a run of 3 iterations of 6 walkers in 3 groups, resampled at step 1
    lw = jnp.log(jnp.array([[1, 1, 1, 1, 1, 1], [1, 3, 2, 2, 1, 1], [1, 1, 1, 1, 1, 1],
                            [2, 1, 1, 1, 1, 1]], jnp.float64))
    states = [ju.JarzynskiState(jnp.zeros((6, 1)), row - jax.scipy.special.logsumexp(row), None,
                                jnp.zeros(6), jnp.zeros((6, 1)), jnp.zeros(())) for row in lw]
    sums = jnp.stack([group_log_weight_sums(s, 3) for s in states])
    np.testing.assert_allclose(jnp.exp(sums[1]), [4 / 10, 4 / 10, 2 / 10])
    log_z = jnp.array([0.0, 0.5, 0.7, 0.6])
    ell, stderr = group_log_normalizers(log_z, sums, jnp.array([False, True, False, False]))
    # row 1: each group's own estimate, L_1 + log(G S_g); the run's is their log-mean-exp
    np.testing.assert_allclose(ell[1], 0.5 + jnp.log(3 * jnp.exp(sums[1])), rtol=1e-12)
    np.testing.assert_allclose(jax.scipy.special.logsumexp(ell[1]) - jnp.log(3), 0.5, rtol=1e-12)
    # step 1 resampled: row 2 keeps row 1's group offsets; row 3 adds the new epoch's
    np.testing.assert_allclose(ell[2] - 0.7, ell[1] - 0.5, rtol=1e-12)
    np.testing.assert_allclose(ell[3] - 0.6, ell[1] - 0.5 + jnp.log(3 * jnp.exp(sums[3])), rtol=1e-12)
    np.testing.assert_allclose(stderr, jnp.std(ell, axis=1, ddof=1) / jnp.sqrt(3.0))
    with pytest.raises(ValueError, match="num_groups"):
        group_log_weight_sums(states[0], 7)


@pytest.mark.slow
def test_feedback_correction_removes_the_bias_of_the_trained_log_normalizer(x64):
    """A Gaussian whose mean is learnt: Z does not depend on the mean, so the run's
    log_normalizer should be 0, and is biased low by the feedback of the walkers' noise
    into theta, ~ -lr K Var / N = -0.02 * 1000 / 100 = -0.2."""
    import optax

    from numpyro_ebm import fit
    from numpyro_ebm.estimators import feedback_bias_step

    def energy(p, x):
        return 0.5 * jnp.sum((x - p) ** 2)

    data = 1.0 + jax.random.normal(jax.random.key(0), (1000, 1))
    raw, corrected = [], []
    for seed in range(4):
        result = fit(energy, jnp.zeros(1), data, optimizer=optax.sgd(0.02), step_size=0.1,
                     num_walkers=100, num_iterations=1000, rng_key=jax.random.key(seed),
                     init_particles=jax.random.normal(jax.random.key(100 + seed), (100, 1)),
                     trace_fn=lambda p, s: feedback_bias_step(energy, p, s, 0.02))
        raw.append(float(result.state.log_normalizer))
        corrected.append(raw[-1] + float(np.sum(result.trace["extra"])))
    # seen (seeds 0-3): raw -0.19, -0.18, -0.12, -0.23; corrected +0.02, +0.03, +0.09, -0.02.
    # The sd over seeds is ~0.045, so 3 standard errors of a mean of 4 are ~0.07; the
    # correction overshoots by a fraction ~ lr * tau (the walkers' decorrelation time, 1/h
    # = 10 steps: 0.2, i.e. ~0.04 nats), which the first-order formula leaves out.
    assert np.mean(raw) < -0.1
    assert abs(np.mean(corrected)) < 0.04 + 0.07


def test_heldout_log_normalizer_is_the_log_mean_of_the_heldout_groups(x64):
    """Exact formula: ell_g = L + log G + s_g; the estimate is the log-mean-exp of the last
    H groups' ell_g and its standard error sd(ell_g) / sqrt(H) over them."""
    from numpyro_ebm.estimators import heldout_log_normalizer

    sums = jnp.log(jnp.array([[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.3, 0.2]]))
    log_z = jnp.array([0.5, -0.2])
    est, se = heldout_log_normalizer(log_z, sums, 2)
    ell = log_z[:, None] + jnp.log(4.0) + sums[:, 2:]
    np.testing.assert_allclose(est, jnp.log(jnp.mean(jnp.exp(ell), axis=1)), rtol=1e-12)
    np.testing.assert_allclose(se, jnp.std(ell, axis=1, ddof=1) / jnp.sqrt(2.0), rtol=1e-12)
    np.testing.assert_allclose(est[1], -0.2 + jnp.log(2 * 0.5), atol=1e-12)  # half the weight in 2 of 4 groups
    for bad in (1, 5, 2.0):
        with pytest.raises(ValueError, match="heldout_groups"):
            heldout_log_normalizer(log_z, sums, bad)


def test_heldout_islands_carry_no_feedback_bias(x64):
    """A Gaussian whose mean is learnt (Z does not depend on it: the exact log Z ratio is
    0), 16 independent trainings vmapped over keys, 100 walkers in 10 islands of which 5
    are held out of the gradient. The training walkers' noise feeds back into theta, so the
    all-walker estimate is biased low, by about -lr K Var / (2 ESS_train) = -0.02 * 1000 /
    (2 * 50) = -0.2; the held-out islands never steer theta, so their estimate is unbiased
    (up to the log-of-mean bias, -Var/2, below 0.01 here). Tolerances: 3 standard errors of
    the mean over the 16 runs; the held-out mean must also lie 3 of them above the
    all-walker mean, which fails if the held-out walkers fed the gradient."""
    import optax

    from numpyro_ebm.estimators import group_log_weight_sums, heldout_log_normalizer
    from numpyro_ebm.training import build_trainer

    def energy(p, x):
        return 0.5 * jnp.sum((x - p) ** 2)

    n, groups, held, k_steps, runs = 100, 10, 5, 1000, 16
    data = 1.0 + jax.random.normal(jax.random.key(0), (1000, 1))
    trainer = build_trainer(energy, optax.sgd(0.02),
                            ju.walker_kernel(0.1, resampling_groups=groups, heldout_groups=held))

    def one_run(key):
        init_key, loop_key = jax.random.split(key)
        state = trainer.init(jnp.zeros(1), jax.random.normal(init_key, (n, 1)))
        state, _ = jax.lax.scan(lambda s, k: (trainer.step(k, s, data)[0], None), state,
                                jax.random.split(loop_key, k_steps))
        walkers = state.walkers
        sums = group_log_weight_sums(walkers, groups)[None]
        estimate, _ = heldout_log_normalizer(walkers.log_normalizer[None], sums, held)
        return walkers.log_normalizer, estimate[0]

    everyone, heldout = map(np.asarray, jax.jit(jax.vmap(one_run))(jax.random.split(jax.random.key(1), runs)))
    mean_all, se_all = _mean_and_se(everyone)
    mean_held, se_held = _mean_and_se(heldout)
    assert mean_all < -0.1, mean_all
    assert abs(mean_held) < 3 * se_held + 0.01, (mean_held, se_held)
    assert mean_held - mean_all > 3 * math.hypot(se_held, se_all), (mean_held, mean_all)


def _mean_and_se(values):
    values = np.asarray(values, np.float64)
    return values.mean(), values.std(ddof=1) / math.sqrt(values.size)
