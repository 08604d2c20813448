"""Tests of the trainer through `numpyro_ebm.fit` (kernel objects, callbacks, errors)."""

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from numpyro_ebm import fit
from numpyro_ebm.kernels import adaptive_jarzynski_ula, cd, jarzynski_ula, ula
from numpyro_ebm.step_size import step_size_adaptation
from numpyro_ebm.training import callbacks as cbs

KERNEL_MODULES = {"jarzynski": jarzynski_ula, "pcd": ula, "cd": cd}


def u(params, x):
    return 0.5 * jnp.sum((x - params["mu"]) ** 2) * jnp.exp(-2.0 * params["log_scale"])


def small_problem(dtype, n_data=200, d=2):
    data = 1.5 + 0.7 * jax.random.normal(jax.random.key(0), (n_data, d), dtype)
    params = {"mu": jnp.zeros(d, dtype), "log_scale": jnp.zeros((), dtype)}
    return data, params


def run(method="jarzynski", dtype=jnp.float32, kernel_kw=None, **kw):
    """``fit`` on the small problem. ``method`` names the kernel (given to ``fit`` as the
    string with ``step_size``); with ``kernel_kw`` the kernel object
    ``<module>.walker_kernel(step_size, **kernel_kw)`` is passed instead."""
    data, params = small_problem(dtype)
    d = data.shape[1]
    step_size = kw.pop("step_size", 0.1)
    if kernel_kw is None:
        kernel = dict(kernel=method, step_size=step_size)
    else:
        kernel = dict(kernel=KERNEL_MODULES[method].walker_kernel(step_size, **kernel_kw))
    opts = dict(
        optimizer=optax.sgd(0.05),
        num_walkers=256,
        num_iterations=60,
        rng_key=jax.random.key(1),
        log_z0=0.5 * d * math.log(2 * math.pi),
        **kernel,
    )
    opts.update(kw)
    return fit(u, params, data, **opts)


def test_trace_fields_per_method():
    """Every kernel records the gradient norm and data energy; only Jarzynski records
    weight-based fields (absent, not faked, for PCD and CD)."""
    weighted_only = {"log_normalizer", "cross_entropy", "ess", "resampled"}
    for method in ("jarzynski", "pcd", "cd"):
        result = run(method, num_iterations=5)
        assert {"grad_norm", "data_energy"} <= set(result.trace), method
        if method == "jarzynski":
            assert weighted_only <= set(result.trace)
        else:
            assert not weighted_only & set(result.trace), method
        assert all(np.shape(v)[0] == 5 for v in jax.tree.leaves(result.trace))
        assert result.method == method
        assert int(result.train_state.iteration) == 5


def test_gaussian_fit_learns_mean_and_scale_and_tracks_the_log_normalizer(dtype):
    """A Gaussian EBM on Gaussian data: theta -> the data's mean and std, and the Jarzynski
    log normaliser follows the exact log Z(theta_k) - log Z(theta_0) = d * log_scale_k."""
    data, _ = small_problem(dtype)
    n, d = 2000, data.shape[1]
    result = run(
        "jarzynski", dtype, num_iterations=300, num_walkers=n,
        trace_fn=lambda p, s: d * p["log_scale"],
    )
    assert result.params["mu"].dtype == dtype
    sigma_hat = float(jnp.sqrt(jnp.mean((data - data.mean(0)) ** 2)))
    # stationary point: data moments = weighted walker moments; the walkers' Monte Carlo
    # error with ESS >= N/2 (resampling threshold) is sigma / sqrt(N/2) per coordinate
    tol_mu = 4 * sigma_hat / math.sqrt(n / 2)
    np.testing.assert_allclose(result.params["mu"], jnp.mean(data, 0), atol=tol_mu)
    # relative error of a variance estimated from d * N/2 coordinates: sqrt(2 / (d N/2))
    tol_sigma = 4 * sigma_hat * math.sqrt(2 / (d * n / 2)) / 2
    assert abs(math.exp(float(result.params["log_scale"])) - sigma_hat) < tol_sigma
    err = result.trace["log_normalizer"] - result.trace["extra"]
    # MC error of one Jarzynski segment ~ 1/sqrt(ESS); segments between resamplings add up
    n_res = int(np.sum(result.trace["resampled"]))
    bound = 4 * math.sqrt(n_res + 1) / math.sqrt(float(np.min(result.trace["ess"])))
    assert np.max(np.abs(err)) < bound, (np.max(np.abs(err)), bound)
    assert np.all(np.isfinite(result.trace["cross_entropy"]))


def test_results_do_not_depend_on_chunk_size():
    a = run("jarzynski", num_iterations=23)
    b = run("jarzynski", num_iterations=23, chunk_size=5)
    np.testing.assert_array_equal(a.params["mu"], b.params["mu"])
    np.testing.assert_array_equal(a.state.particles, b.state.particles)
    np.testing.assert_array_equal(a.trace["ess"], b.trace["ess"])


class _ChunkStarts:
    def __init__(self):
        self.starts = []

    def on_chunk(self, ctx, chunk):
        self.starts.append((chunk.start, chunk.length, chunk.snapshots is not None))


def test_snapshots_further_apart_than_a_chunk_keep_the_chunk_length():
    """Snapshots every 10 iterations with chunks of 4: callbacks hear from the run every 4
    iterations at most (pieces 4, 3, 3 per block; the first takes the snapshot), and the
    result, snapshots included, equals that of one chunk holding the whole run."""
    a_calls, b_calls = _ChunkStarts(), _ChunkStarts()
    a = run("jarzynski", num_iterations=23, callbacks=[cbs.Snapshots(10), a_calls])
    b = run("jarzynski", num_iterations=23, chunk_size=4, callbacks=[cbs.Snapshots(10), b_calls])
    assert b_calls.starts == [(0, 4, True), (4, 3, False), (7, 3, False), (10, 4, True),
                              (14, 3, False), (17, 3, False), (20, 3, True)]
    assert all(length <= 4 for _, length, _ in b_calls.starts)
    for x, y in zip(jax.tree.leaves((a.params, a.state, a.trace)),
                    jax.tree.leaves((b.params, b.state, b.trace)), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    np.testing.assert_array_equal(b.trace["snapshots"]["iteration"], [0, 10, 20])


def test_kernel_string_equals_the_default_kernel_object():
    """``kernel="jarzynski", step_size=h`` is ``kernel=jarzynski_ula.walker_kernel(h)``."""
    a = run("jarzynski", num_iterations=8)
    b = run("jarzynski", num_iterations=8, kernel_kw={})
    for x, y in zip(jax.tree.leaves((a.params, a.state, a.trace)),
                    jax.tree.leaves((b.params, b.state, b.trace)), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_pcd_and_cd_keep_equal_weights_and_cd_restarts_from_data():
    data, _ = small_problem(jnp.float32)
    pcd = run("pcd", num_iterations=10)
    np.testing.assert_allclose(pcd.state.log_weights, -math.log(256))
    assert np.isnan(pcd.state.log_normalizer)  # unweighted walkers carry no log-Z estimate
    # CD restarted at the last iteration (restart_every=1): one ULA step from data points
    cd_result = run("cd", num_iterations=10, step_size=1e-8)
    x = np.asarray(cd_result.state.particles)
    dist = np.min(np.abs(x[:, None, :] - np.asarray(data)[None]).sum(-1), axis=1)
    assert np.max(dist) < 1e-3


def test_minibatch_training_runs_and_is_finite():
    result = run("jarzynski", data_batch_size=32, num_iterations=20)
    assert np.all(np.isfinite(result.trace["grad_norm"]))


def test_minibatch_data_energy_is_the_mean_over_an_epoch_permutation():
    """With ``data_batch_size`` B the iterations of one epoch see floor(n/B) disjoint
    batches of the data (a permutation), so at fixed parameters (learning rate 0) the mean
    of the recorded data energies over an epoch that uses all the data (B divides n) is
    the full-data mean energy, epoch after epoch."""
    data, params = small_problem(jnp.float32)
    result = fit(u, params, data, optimizer=optax.sgd(0.0), kernel="pcd", step_size=0.1,
                 num_walkers=16, num_iterations=10, rng_key=jax.random.key(4),
                 data_batch_size=40)  # 200 / 40 = 5 batches per epoch, 2 epochs
    full = float(jnp.mean(jax.vmap(u, (None, 0))(params, data)))
    energies = result.trace["data_energy"]
    np.testing.assert_allclose(energies[:5].mean(), full, rtol=1e-5)
    np.testing.assert_allclose(energies[5:].mean(), full, rtol=1e-5)
    # the batches are not all the same (a permutation, not the data in order every time)
    assert np.ptp(energies[:5]) > 0
    # and the second epoch is another permutation
    assert not np.allclose(np.sort(energies[:5]), np.sort(energies[5:]))


def test_init_particles_callable_gets_the_walker_count():
    seen = []

    def draw(key, n):
        seen.append(n)
        return jax.random.normal(key, (n, 2))

    run("pcd", num_iterations=2, num_walkers=64, init_particles=draw)
    assert seen == [64]


GOOD_DATA, GOOD_PARAMS = small_problem(jnp.float32)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"kernel": "sgld"}, "kernel"),
        ({"num_walkers": 1}, "num_walkers"),
        ({"num_iterations": 0}, "num_iterations"),
        ({"step_size": 0.0}, "step_size"),
        ({"step_size": -1.0}, "step_size"),
        ({"step_size": None}, "step_size"),
        ({"data_batch_size": 10_000}, "data_batch_size"),
        ({"data_batch_size": 0}, "data_batch_size"),
        ({"log_z0": float("nan")}, "log_z0"),
        ({"init_particles": jnp.zeros((256, 3))}, "init_particles"),
        ({"init_particles": jnp.zeros((10, 2))}, "init_particles"),
        ({"init_particles": jnp.full((256, 2), jnp.nan)}, "particles"),
        ({"optimizer": "adam"}, "optimizer"),
        ({"data": GOOD_DATA.at[3, 0].set(jnp.nan)}, "data"),
        ({"data": GOOD_DATA.at[3, 0].set(jnp.inf)}, "data"),
        ({"data": jnp.zeros((0, 2))}, "data"),
        ({"potential_fn": lambda p, x: x}, "potential_fn"),
        ({"mesh": "cpu"}, "mesh"),
        ({"rng_key": 0}, "rng_key"),
        ({"init_state": {"params": GOOD_PARAMS}}, "init_state"),
        ({"step_size_adaptation": 0.7}, "step_size_adaptation"),
    ],
)
def test_bad_input_names_the_argument(kw, match):
    args = dict(
        potential_fn=u,
        params=GOOD_PARAMS,
        data=GOOD_DATA,
        optimizer=optax.sgd(0.1),
        num_walkers=256,
        step_size=0.1,
        num_iterations=3,
        rng_key=jax.random.key(0),
    )
    args.update(kw)
    potential_fn, params, data = args.pop("potential_fn"), args.pop("params"), args.pop("data")
    with pytest.raises((ValueError, TypeError), match=match):
        fit(potential_fn, params, data, **args)


@pytest.mark.parametrize(
    "make, match",
    [
        # the kernel settings fit took as keywords before live in the kernel objects
        (lambda: jarzynski_ula.walker_kernel(0.1, ess_threshold=0.0), "ess_threshold"),
        (lambda: jarzynski_ula.walker_kernel(0.1, ess_threshold=1.01), "ess_threshold"),
        (lambda: jarzynski_ula.walker_kernel(0.1, num_mcmc_steps=0), "num_mcmc_steps"),
        (lambda: jarzynski_ula.walker_kernel(0.0), "step_size"),
        (lambda: jarzynski_ula.walker_kernel(0.1, resampling_fn="systematic"), "resampling_fn"),
        (lambda: jarzynski_ula.walker_kernel(0.1, noise_dtype=jnp.int32), "noise_dtype"),
        # the messages say `batch_size` (the build_kernel name) for `walker_batch_size`
        (lambda: jarzynski_ula.walker_kernel(0.1, walker_batch_size=0), "batch_size"),
        (lambda: ula.walker_kernel(0.1, walker_batch_size=0), "batch_size"),
        (lambda: ula.walker_kernel(-0.1), "step_size"),
        (lambda: cd.walker_kernel(0.1, restart_every=0), "restart_every"),
        (lambda: adaptive_jarzynski_ula.walker_kernel(0.1, target_ess=1.0), "target_ess"),
        (lambda: adaptive_jarzynski_ula.walker_kernel(0.1, max_substeps=0), "max_substeps"),
        (lambda: step_size_adaptation(1.2), "target_acceptance"),
    ],
)
def test_bad_kernel_settings_name_the_argument(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


def test_adaptive_schedule_splits_a_huge_step_and_keeps_the_log_normalizer():
    """Learning rate 1 on the mean only (scale fixed, so log Z never changes): the first
    step jumps the mean by |(3, 3)| = 4.2 walker widths. With the adaptive kernel the move
    is split into sub-steps and the Jarzynski log normaliser stays at its exact value 0
    within Monte Carlo error; the fixed schedule's ESS collapses on the same run."""
    data, params = small_problem(jnp.float32, n_data=400)
    data = data + 1.5  # mean 3 per coordinate
    optimizer = optax.multi_transform(
        {"mu": optax.sgd(1.0), "log_scale": optax.set_to_zero()},
        {"mu": "mu", "log_scale": "log_scale"},
    )
    common = dict(
        optimizer=optimizer, num_iterations=10, num_walkers=2000,
        rng_key=jax.random.key(3), callbacks=[cbs.DegeneracyCheck(ess_floor=None)],
        init_particles=lambda key, n: jax.random.normal(key, (n, 2)),
    )
    adaptive = fit(u, params, data, **common, kernel=adaptive_jarzynski_ula.walker_kernel(
        0.2, num_mcmc_steps=5, target_ess=0.5, max_substeps=50))
    fixed = fit(u, params, data, **common, kernel=jarzynski_ula.walker_kernel(0.2, num_mcmc_steps=5))
    assert adaptive.method == "adaptive_jarzynski"
    assert "num_substeps" not in fixed.trace
    assert adaptive.trace["num_substeps"][0] > 1
    assert fixed.trace["normalized_ess"][0] < 0.05
    assert adaptive.trace["normalized_ess"][0] > 10 * fixed.trace["normalized_ess"][0]
    # MC error of one Jarzynski segment ~ 1/sqrt(ESS); segments between resamplings add up
    n_res = int(np.sum(adaptive.trace["resampled"])) + int(adaptive.trace["num_substeps"].sum())
    bound = 4 * math.sqrt(n_res + 1) / math.sqrt(float(np.min(adaptive.trace["ess"])))
    assert np.max(np.abs(adaptive.trace["log_normalizer"])) < bound
    assert abs(float(fixed.state.log_normalizer)) > abs(float(adaptive.state.log_normalizer))


def test_step_size_adaptation_in_fit_records_and_moves_the_step_size():
    result = run(
        "jarzynski", num_iterations=150, num_walkers=500, step_size=1.5,
        step_size_adaptation=step_size_adaptation(0.7),
        callbacks=[cbs.DegeneracyCheck(ess_floor=None)],
    )
    steps = result.trace["step_size"]
    assert steps[0] == np.float32(1.5) and steps[-1] < 1.0
    assert abs(float(np.mean(result.trace["acceptance"][-50:])) - 0.7) < 0.1
    assert float(result.train_state.step_size_state.step_size) < 1.0


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"step_size_adaptation": step_size_adaptation(0.7), "kernel": "pcd"}, "step_size_adaptation"),
        ({"step_size_adaptation": step_size_adaptation(0.7), "kernel": "cd"}, "step_size_adaptation"),
        ({"step_size_adaptation": "dual_averaging"}, "step_size_adaptation"),
        ({"kernel": jarzynski_ula.walker_kernel(0.1)}, "step_size"),  # step_size given too
    ],
)
def test_adaptation_bad_input_names_the_argument(kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        run(num_iterations=2, **kw)


# ---------------------------------------------------------------------------------------
# Reliability
# ---------------------------------------------------------------------------------------


def test_same_seed_gives_bit_identical_results():
    a = run("jarzynski", num_iterations=15, data_batch_size=50)
    b = run("jarzynski", num_iterations=15, data_batch_size=50)
    for x, y in zip(jax.tree.leaves((a.params, a.state, a.trace)),
                    jax.tree.leaves((b.params, b.state, b.trace)), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_all_walkers_non_finite_stops_with_the_last_good_params():
    """The energy is NaN everywhere once mu_0 > 1 (data mean 1.5 pulls it there): fit
    raises NonFiniteError naming the iteration; its result holds finite parameters from
    before the failure and the trace up to it."""
    from numpyro_ebm import FitResult, NonFiniteError

    def bad_u(params, x):
        return u(params, x) + jnp.where(params["mu"][0] > 1.0, jnp.nan, 0.0)

    data, params = small_problem(jnp.float32)
    with pytest.raises(NonFiniteError, match=r"iteration \d+") as err:
        fit(bad_u, params, data, optimizer=optax.sgd(0.05), num_walkers=64, step_size=0.1,
            num_iterations=200, rng_key=jax.random.key(0), chunk_size=50)
    result = err.value.result
    assert isinstance(result, FitResult)
    k = len(result.trace["grad_norm"])
    assert 0 < k < 200 and f"iteration {k}" in str(err.value)
    assert int(result.train_state.iteration) == k
    assert float(result.params["mu"][0]) <= 1.0
    assert all(np.all(np.isfinite(np.asarray(leaf))) for leaf in jax.tree.leaves(result.params))
    assert np.all(np.isfinite(result.trace["grad_norm"]))


def test_diverging_energies_warn_with_advice():
    """PCD with SGD learning rate 10 on the mean: with the walker mean m lagging (ULA rate
    h = 0.1), (mu - xbar, m - xbar) evolves by [[1, -10], [0.1, 0.9]], whose eigenvalues
    have modulus sqrt(1.9) = 1.38: the oscillation grows ~1e5-fold in 40 iterations, the
    energies explode, and one EnergyDivergenceWarning says so (DivergenceCheck, added by
    fit by default); DivergenceCheck(math.inf) switches it off."""
    from numpyro_ebm import EnergyDivergenceWarning

    optimizer = optax.multi_transform(
        {"mu": optax.sgd(10.0), "log_scale": optax.set_to_zero()},
        {"mu": "mu", "log_scale": "log_scale"},
    )
    with pytest.warns(EnergyDivergenceWarning, match="learning rate") as record:
        run("pcd", optimizer=optimizer, num_iterations=40, num_walkers=64)
    assert len([w for w in record if w.category is EnergyDivergenceWarning]) == 1
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        run("pcd", optimizer=optimizer, num_iterations=40, num_walkers=64,
            callbacks=[cbs.DivergenceCheck(math.inf)])
    assert not [w for w in record if w.category is EnergyDivergenceWarning]
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="`factor`"):
            cbs.DivergenceCheck(bad)


def test_healthy_run_does_not_warn_about_divergence():
    from numpyro_ebm import EnergyDivergenceWarning

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        result = run("jarzynski", num_iterations=50)
    assert not [w for w in record if w.category is EnergyDivergenceWarning]
    assert np.max(result.trace["max_abs_potential"]) < 1e4 * max(1.0, result.trace["max_abs_potential"][0])


def _reference_loop(method, data, params, optimizer, num_walkers, step_size, num_iterations,
                    rng_key, cd_restart_every=1, ess_threshold=0.5):
    """fit's iteration written with the public pieces and no fusion: ce_grad at the walkers,
    optax, then the kernel (jarzynski_ula.build_kernel, or the plain ULA moves of
    ula.build_kernel for PCD/CD)."""
    from blackjax.smc import resampling

    from numpyro_ebm.estimators import ce_value_and_grad

    init_key, loop_key = jax.random.split(rng_key)
    n_data = data.shape[0]
    if method == "cd":
        particles = data[jax.random.randint(init_key, (num_walkers,), 0, n_data)]
    else:
        particles = jax.random.normal(init_key, (num_walkers, data.shape[1]), data.dtype)
    state = jarzynski_ula.init(particles, params, u)
    if method == "jarzynski":
        kernel = jarzynski_ula.build_kernel(u, step_size, resampling.systematic, ess_threshold, 1)
    else:
        kernel = ula.build_kernel(u, step_size, 1)

    @jax.jit
    def step(params, opt_state, state, k):
        key = jax.random.fold_in(loop_key, k)
        _, move_key, restart_key = jax.random.split(key, 3)
        grads = ce_value_and_grad(u, params, data, state)[1]
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        if method == "cd":
            idx = jax.random.randint(restart_key, (num_walkers,), 0, n_data)
            state = jax.lax.cond(k % cd_restart_every == 0,
                                 lambda: jarzynski_ula.init(data[idx], params, u), lambda: state)
        state, info = kernel(move_key, state, params, step_size)
        return params, opt_state, state, info.resampled

    opt_state = optimizer.init(params)
    resampled = 0
    for k in range(num_iterations):
        params, opt_state, state, did = step(params, opt_state, state, k)
        resampled += int(did)
    return params, state, resampled


@pytest.mark.parametrize("method", ["jarzynski", "pcd", "cd"])
def test_fused_evaluation_gives_the_unfused_results(method, x64):
    """fit reuses the kernel's evaluation at the walkers for the next gradient (one forward
    pass per walker per iteration): its parameters and walkers equal those of the plain
    loop (ce_grad, then the kernel) to float64 rounding, resampling included."""
    data, params = small_problem(jnp.float64)
    opts = dict(optimizer=optax.sgd(0.05), num_walkers=64, step_size=0.3, num_iterations=12,
                rng_key=jax.random.key(3))
    ref_params, ref_state, resampled = _reference_loop(method, data, params, **opts,
                                                       cd_restart_every=4, ess_threshold=0.9)
    kernel = {
        "jarzynski": jarzynski_ula.walker_kernel(0.3, ess_threshold=0.9),
        "pcd": ula.walker_kernel(0.3),
        "cd": cd.walker_kernel(0.3, restart_every=4),
    }[method]
    opts.pop("step_size")
    result = fit(u, params, data, kernel=kernel, **opts)
    if method == "jarzynski":
        assert resampled >= 2  # the resampled branch of the fused gradient is exercised
        assert int(result.trace["resampled"].sum()) == resampled
    for got, want in zip(jax.tree.leaves((result.params, result.state.particles,
                                          result.state.log_weights)),
                         jax.tree.leaves((ref_params, ref_state.particles,
                                          ref_state.log_weights)), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)


def test_one_energy_evaluation_at_the_walkers_and_one_at_the_data_per_iteration():
    """Tracing one training step (``build_trainer(...).step``, the step ``fit`` runs) calls
    the energy once for the data batch and once for the walkers (the fused evaluation),
    for every kernel. Evaluations that run only under a `lax.cond` are counted apart: CD's
    restart from data (every `restart_every` iterations) and the recomputation of the
    walker gradient when a walker's evaluation was not finite (`keep_or_recompute`).
    Shape-only traces (`jax.eval_shape` in the argument checks) do not count."""
    import inspect

    from numpyro_ebm import build_trainer

    counts = {}
    conditional = {"from_data", "keep_or_recompute"}
    counting = []

    def counted(params, x):
        if counting:
            frames = {f.function for f in inspect.stack(context=0)}
            if "check_scalar_potential" not in frames:
                kind = next(iter(frames & conditional), "always")
                counts.setdefault(counting[0], {}).setdefault(kind, 0)
                counts[counting[0]][kind] += 1
        return u(params, x)

    data, params = small_problem(jnp.float32)
    walkers = jax.random.normal(jax.random.key(0), (16, 2))
    from numpyro_ebm.training.penalties import squared_energy

    for penalty in (None, squared_energy(0.01)):  # the energy penalty adds no evaluation
        counts.clear()
        for method in ("jarzynski", "pcd", "cd"):
            kernel = KERNEL_MODULES[method].walker_kernel(0.1)
            trainer = build_trainer(counted, optax.sgd(0.05), kernel, energy_penalty=penalty)
            state = trainer.init(params, walkers)
            counting.append(method)
            jax.jit(trainer.step).lower(jax.random.key(1), state, data)
            counting.clear()
        fallback = {"keep_or_recompute": 1}
        assert counts == {
            "jarzynski": {"always": 2, **fallback},
            "pcd": {"always": 2, **fallback},
            "cd": {"always": 2, "from_data": 1, **fallback},
        }, penalty


def test_one_energy_evaluation_per_iteration_through_fit():
    """The same count through ``fit``: the jitted chunk (a ``lax.scan`` of the step) traces
    the energy once for the data and once for the walkers, plus the conditional
    recomputation; outside the loop ``fit`` evaluates only at initialisation."""
    import inspect

    data, params = small_problem(jnp.float32)
    counts = {}

    def counted(params, x):
        frames = {f.function for f in inspect.stack(context=0)}
        if "one_iteration" in frames:
            kind = "keep_or_recompute" if "keep_or_recompute" in frames else "always"
            counts[kind] = counts.get(kind, 0) + 1
        return u(params, x)

    fit(counted, params, data, optimizer=optax.sgd(0.05), kernel="jarzynski", step_size=0.1,
        num_walkers=16, num_iterations=2, rng_key=jax.random.key(0))
    assert counts == {"always": 2, "keep_or_recompute": 1}


def test_walker_batch_size_gives_the_same_results(x64):
    """Evaluating the walkers in chunks (a remainder chunk included) changes nothing but
    the memory."""
    base = run("jarzynski", jnp.float64, num_iterations=20, num_walkers=100, kernel_kw={})
    chunked = run("jarzynski", jnp.float64, num_iterations=20, num_walkers=100,
                  kernel_kw={"walker_batch_size": 30})
    for got, want in zip(jax.tree.leaves((chunked.params, chunked.state)),
                         jax.tree.leaves((base.params, base.state)), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)
