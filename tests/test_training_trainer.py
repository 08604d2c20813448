"""The trainer's pieces (numpyro_ebm.training): ``build_trainer``'s pure step driven by a
user's own loop, ``run``'s data pipeline and callbacks, argument errors, and the kernels'
BlackJAX interface."""

import warnings

import blackjax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from numpyro_ebm import TrainState, build_trainer, fit, run
from numpyro_ebm.kernels import cd, jarzynski_ula, ula
from numpyro_ebm.kernels.base import JarzynskiState, WalkerKernel
from numpyro_ebm.step_size import step_size_adaptation
from numpyro_ebm.training import CallbackFailedWarning, RunResult
from numpyro_ebm.training import callbacks as cbs
from numpyro_ebm.training.loop import _batch_source


def u(params, x):
    return 0.5 * jnp.sum((x - params["mu"]) ** 2) * jnp.exp(-2.0 * params["log_scale"])


def problem(dtype=jnp.float32, n_data=200, num_walkers=64):
    data = 1.5 + 0.7 * jax.random.normal(jax.random.key(0), (n_data, 2), dtype)
    params = {"mu": jnp.zeros(2, dtype), "log_scale": jnp.zeros((), dtype)}
    walkers = jax.random.normal(jax.random.key(2), (num_walkers, 2), dtype)
    return data, params, walkers


def assert_trees_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(la, lb, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ---------------------------------------------------------------------------------------
# (a) the pure step in a user's own loop equals fit
# ---------------------------------------------------------------------------------------


KERNELS = {"jarzynski": lambda: jarzynski_ula.walker_kernel(0.3, ess_threshold=0.9),
           "pcd": lambda: ula.walker_kernel(0.3),
           "cd": lambda: cd.walker_kernel(0.3, restart_every=3)}


def _fit_and_trainer(name, optimizer, dtype, num_iterations=12):
    data, params, walkers = problem(dtype)
    kernel = KERNELS[name]()
    rng_key = jax.random.key(5)
    result = fit(u, params, data, optimizer=optimizer, kernel=kernel, num_walkers=64,
                 init_particles=walkers, num_iterations=num_iterations, rng_key=rng_key)
    _, loop_key = jax.random.split(rng_key)  # fit: init_key, loop_key = split(rng_key)
    trainer = build_trainer(u, optimizer, kernel)
    assert trainer.kernel is kernel
    state = trainer.init(params, walkers)
    assert isinstance(state, TrainState) and int(state.iteration) == 0
    return result, trainer, state, loop_key, data


@pytest.mark.parametrize("optimizer, dtype", [(optax.sgd(0.05), jnp.float32),
                                              (optax.adam(0.05), jnp.float64)],
                         ids=["sgd-float32", "adam-float64"])
def test_own_jitted_loop_over_trainer_step_equals_fit(optimizer, dtype):
    """fit splits ``rng_key`` into ``(init_key, loop_key)`` and runs iteration ``k`` with
    ``fold_in(loop_key, k)``: a hand-written Python loop over the jitted ``trainer.step``
    with those keys, the full data set as the batch and the same initial walkers gives
    fit's parameters, optimiser state, walkers and walker gradient bit for bit
    (Jarzynski kernel, resampling included)."""
    with jax.enable_x64(dtype == jnp.float64):
        num_iterations = 12
        result, trainer, state, loop_key, data = _fit_and_trainer("jarzynski", optimizer, dtype)
        step = jax.jit(trainer.step)
        grad_norms, resampled = [], []
        for k in range(num_iterations):
            state, info = step(jax.random.fold_in(loop_key, k), state, data)
            grad_norms.append(info.grad_norm)
            resampled.append(info.kernel_info.resampled)
        assert int(state.iteration) == num_iterations
        assert state.params["mu"].dtype == dtype
        assert_trees_equal(state.params, result.params)
        assert_trees_equal(state.opt_state, result.opt_state)
        assert_trees_equal(state.walkers, result.state)
        assert_trees_equal(state.walker_grad, result.train_state.walker_grad)
        np.testing.assert_array_equal(np.asarray(grad_norms), result.trace["grad_norm"])
        assert sum(map(bool, resampled)) >= 1  # the resampled branch is exercised
        np.testing.assert_array_equal(np.asarray(resampled), result.trace["resampled"])


@pytest.mark.parametrize("name", ["pcd", "cd"])
def test_own_loop_over_trainer_step_equals_fit_for_unweighted_kernels(name, x64):
    """PCD and CD (CD restarting every 3 steps): a jitted ``lax.scan`` over
    ``trainer.step`` gives fit's state bit for bit; a Python loop over the jitted step
    agrees to float64 rounding (XLA rounds the ULA move of a step compiled on its own
    differently in the last bit for these kernels)."""
    result, trainer, state0, loop_key, data = _fit_and_trainer(name, optax.adam(0.05), jnp.float64)

    @jax.jit
    def loop(state):
        def body(st, k):
            return trainer.step(jax.random.fold_in(loop_key, k), st, data)[0], None

        return jax.lax.scan(body, state, jnp.arange(12))[0]

    assert_trees_equal(loop(state0), result.train_state)
    step = jax.jit(trainer.step)
    state = state0
    for k in range(12):
        state, _ = step(jax.random.fold_in(loop_key, k), state, data)
    for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(result.train_state), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(state.walkers.log_weights, -np.log(64))


def test_run_resumed_mid_epoch_equals_one_run():
    """``run`` from a state at an iteration in the middle of an epoch of minibatches
    recomputes that epoch's permutation: 7 + 8 iterations equal 15 (5 batches per epoch)."""
    data, params, walkers = problem()
    trainer = build_trainer(u, optax.sgd(0.05), jarzynski_ula.walker_kernel(0.2))
    state = trainer.init(params, walkers)
    key = jax.random.key(3)
    whole = run(key, trainer, state, 15, data=data, data_batch_size=40)
    first = run(key, trainer, state, 7, data=data, data_batch_size=40)
    second = run(key, trainer, first.state, 8, data=data, data_batch_size=40)
    assert isinstance(whole, RunResult)
    assert_trees_equal(second.state, whole.state)
    np.testing.assert_array_equal(
        np.concatenate([first.trace["data_energy"], second.trace["data_energy"]]),
        whole.trace["data_energy"])


# ---------------------------------------------------------------------------------------
# (b) minibatches: each epoch is a permutation of the data
# ---------------------------------------------------------------------------------------


def _epoch_indices(next_batch, order, first_iteration, per_epoch):
    seen = []
    for k in range(first_iteration, first_iteration + per_epoch):
        batch, order = next_batch(order, k)
        seen.append(np.asarray(batch["i"]))
    return np.concatenate(seen), order


def test_minibatches_visit_every_data_point_once_per_epoch():
    """Data ``i = 0..n-1`` (a pytree), B dividing n: the batches of one epoch hold every
    index exactly once; the next epoch is another permutation; a run that starts (or
    resumes) mid-epoch draws the same batches as one that went through the epoch's start;
    the whole data set without ``data_batch_size``."""
    n, batch_size = 24, 6
    per_epoch = n // batch_size
    data = {"i": jnp.arange(n), "x": jnp.arange(n, dtype=jnp.float32)[:, None] * jnp.ones(3)}
    first_order, next_batch = _batch_source(jax.random.key(0), data, batch_size)
    next_batch = jax.jit(next_batch)
    first, carried = _epoch_indices(next_batch, first_order(0), 0, per_epoch)
    np.testing.assert_array_equal(np.sort(first), np.arange(n))
    assert not np.array_equal(first, np.arange(n))  # shuffled, not the data in order
    second, carried = _epoch_indices(next_batch, carried, per_epoch, per_epoch)
    np.testing.assert_array_equal(np.sort(second), np.arange(n))
    assert not np.array_equal(first, second)
    # the leaves of a batch are taken at the same indices
    batch, _ = next_batch(first_order(1), 1)
    np.testing.assert_array_equal(batch["x"][:, 0], batch["i"].astype(np.float32))
    # starting mid-epoch (a resume): the same batches as the uninterrupted run
    resumed, _ = _epoch_indices(next_batch, first_order(2), 2, per_epoch - 2)
    np.testing.assert_array_equal(resumed, first[2 * batch_size:])
    # the order is drawn once per epoch: a carried order of the current epoch is kept
    _, carried = next_batch(first_order(0), 0)
    fake = (jnp.arange(n, dtype=jnp.int32), carried[1])
    kept, _ = next_batch(fake, 1)
    np.testing.assert_array_equal(kept["i"], np.arange(batch_size, 2 * batch_size))
    # full batch
    no_order, full_batch = _batch_source(jax.random.key(0), data, None)
    assert no_order(5) is None
    batch, carried = full_batch(None, 3)
    assert batch is data and carried is None


def test_minibatch_remainder_is_left_out_of_each_epoch():
    """n = 10, B = 3: three batches per epoch of distinct indices; one point sits out."""
    data = {"i": jnp.arange(10)}
    first_order, next_batch = _batch_source(jax.random.key(1), data, 3)
    seen, _ = _epoch_indices(next_batch, first_order(0), 0, 3)
    assert seen.shape == (9,) and len(np.unique(seen)) == 9


# ---------------------------------------------------------------------------------------
# (c) errors name the argument
# ---------------------------------------------------------------------------------------

DATA, PARAMS, WALKERS = problem()


def _fit(**kw):
    args = dict(optimizer=optax.sgd(0.1), num_walkers=64, kernel="jarzynski", step_size=0.1,
                num_iterations=2, rng_key=jax.random.key(0))
    args.update(kw)
    return fit(u, PARAMS, DATA, **args)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: _fit(kernel="nope"), "`kernel`"),
        (lambda: _fit(kernel=None), "`kernel`"),
        (lambda: _fit(rng_key=0), "`rng_key`"),
        (lambda: _fit(rng_key=np.array([0, 1], np.int32)), "`rng_key`"),
        (lambda: _fit(kernel=jarzynski_ula.walker_kernel(0.1), step_size=0.1), "`step_size`"),
        (lambda: _fit(kernel="pcd", step_size=None), "`step_size`"),
        (lambda: _fit(kernel="pcd", step_size_adaptation=step_size_adaptation(0.7)),
         "`step_size_adaptation`"),
        (lambda: _fit(kernel=cd.walker_kernel(0.1), step_size=None,
                      step_size_adaptation=step_size_adaptation(0.7)), "`step_size_adaptation`"),
        (lambda: build_trainer(u, optax.sgd(0.1), object()), "`kernel`"),
        (lambda: build_trainer(u, optax.sgd(0.1), "jarzynski"), "`kernel`"),
        (lambda: build_trainer(u, "sgd", ula.walker_kernel(0.1)), "`optimizer`"),
        (lambda: build_trainer(3, optax.sgd(0.1), ula.walker_kernel(0.1)), "`potential_fn`"),
        (lambda: build_trainer(u, optax.sgd(0.1), ula.walker_kernel(0.1),
                               step_size_adaptation=step_size_adaptation(0.7)),
         "`step_size_adaptation`"),
        (lambda: build_trainer(u, optax.sgd(0.1), jarzynski_ula.walker_kernel(0.1),
                               step_size_adaptation=0.7), "`step_size_adaptation`"),
    ],
)
def test_errors_name_the_argument(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


def test_run_errors_name_the_argument():
    trainer = build_trainer(u, optax.sgd(0.1), ula.walker_kernel(0.1))
    state = trainer.init(PARAMS, WALKERS)
    with pytest.raises(ValueError, match="`num_iterations`"):
        run(jax.random.key(0), trainer, state, 0, data=DATA)
    with pytest.raises(ValueError, match="`chunk_size`"):
        run(jax.random.key(0), trainer, state, 2, data=DATA, chunk_size=0)


# ---------------------------------------------------------------------------------------
# (d) callbacks
# ---------------------------------------------------------------------------------------


class _Recorder:
    """Records the hooks it sees; ``fail_in`` names the hook that raises."""

    def __init__(self, fail_in=None, every=None):
        self.calls, self.fail_in = [], fail_in
        if every is not None:
            self.every = every

    def _hook(self, name):
        self.calls.append(name)
        if name == self.fail_in:
            raise RuntimeError(f"boom in {name}")

    def on_start(self, ctx):
        self._hook("on_start")

    def on_chunk(self, ctx, chunk):
        self._hook("on_chunk")
        self.calls.append((chunk.start, chunk.length))

    def on_end(self, ctx, result):
        self._hook("on_end")

    def close(self):
        self.calls.append("close")


def test_failing_on_end_warns_and_fit_returns_the_result():
    """A callback that raises in ``on_end`` (after training) gives one
    CallbackFailedWarning naming it and the error, and fit returns the same result as
    without it; the callbacks after it still run."""
    failing, after = _Recorder(fail_in="on_end"), _Recorder()
    with pytest.warns(CallbackFailedWarning, match=r"_Recorder.*RuntimeError: boom in on_end") as rec:
        result = _fit(num_iterations=6, callbacks=[failing, after])
    assert len([w for w in rec if w.category is CallbackFailedWarning]) == 1
    plain = _fit(num_iterations=6)
    assert_trees_equal((result.params, result.state), (plain.params, plain.state))
    assert_trees_equal(result.trace, plain.trace)
    assert failing.calls == ["on_start", "on_chunk", (0, 6), "close", "on_end"]
    assert after.calls == ["on_start", "on_chunk", (0, 6), "close", "on_end"]


def test_failing_on_chunk_stops_the_run_and_closes_the_callbacks():
    """An error in ``on_chunk`` is not swallowed (it stops training); every callback's
    ``close`` still runs. ``every`` ends the chunks at its multiples."""
    failing, other = _Recorder(fail_in="on_chunk", every=3), _Recorder()
    with warnings.catch_warnings():
        warnings.simplefilter("error", CallbackFailedWarning)
        with pytest.raises(RuntimeError, match="boom in on_chunk"):
            _fit(num_iterations=6, callbacks=[failing, other])
    assert failing.calls == ["on_start", "on_chunk", "close"]
    assert other.calls == ["on_start", "close"]
    chunks = _Recorder(every=4)
    _fit(num_iterations=10, callbacks=[chunks])
    assert [c for c in chunks.calls if isinstance(c, tuple)] == [(0, 4), (4, 4), (8, 2)]


def test_fit_adds_the_default_checks_unless_given():
    """NonFiniteStop, DivergenceCheck and DegeneracyCheck are added once each; a given
    instance replaces the default one: a healthy run does not warn with the default
    check, and warns (once) with a strict one given by the user."""
    from numpyro_ebm import WeightDegeneracyWarning
    from numpyro_ebm.training.fit import _default_callbacks

    mine = cbs.DegeneracyCheck(ess_floor=0.999, patience=1)
    names = [type(cb).__name__ for cb in _default_callbacks([mine], progress=True)]
    assert names == ["NonFiniteStop", "DegeneracyCheck", "ProgressBar", "DivergenceCheck"]
    assert _default_callbacks([mine], progress=False)[1] is mine
    names = [type(cb).__name__ for cb in _default_callbacks(None, progress=False)]
    assert names == ["NonFiniteStop", "DivergenceCheck", "DegeneracyCheck"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", WeightDegeneracyWarning)
        healthy = _fit(num_iterations=10)
    assert np.min(healthy.trace["normalized_ess"]) < 0.999
    with pytest.warns(WeightDegeneracyWarning, match="normalised ESS < 0.999") as rec:
        _fit(num_iterations=10, callbacks=[mine])
    assert len([w for w in rec if w.category is WeightDegeneracyWarning]) == 1


# ---------------------------------------------------------------------------------------
# (e) BlackJAX's run_inference_algorithm drives the kernels
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["jarzynski", "ula"])
def test_run_inference_algorithm_drives_the_top_level_api(name, x64):
    """``blackjax.util.run_inference_algorithm(rng_key, algorithm, num_steps,
    initial_state=...)`` runs ``as_top_level_api``: the final state is the kernel's own
    scan over ``jax.random.split(rng_key, num_steps)``, the history holds one info per
    step, and ``initial_position=`` works too (``init`` takes and ignores a key)."""
    _, params, walkers = problem(jnp.float64, num_walkers=200)
    num_steps = 15
    if name == "jarzynski":
        algo = jarzynski_ula.as_top_level_api(u, params, 0.5, ess_threshold=0.9)
        kernel = jarzynski_ula.build_kernel(u, 0.5, ess_threshold=0.9)
    else:
        algo = ula.as_top_level_api(u, params, 0.5)
        kernel = ula.build_kernel(u, 0.5)
    key = jax.random.key(7)
    initial = algo.init(walkers)
    assert isinstance(initial, JarzynskiState)
    final, (states, infos) = blackjax.util.run_inference_algorithm(
        key, algo, num_steps, initial_state=initial)
    manual, _ = jax.lax.scan(lambda s, k: kernel(k, s), initial, jax.random.split(key, num_steps))
    assert isinstance(final, JarzynskiState)
    for a, b in zip(jax.tree.leaves(final), jax.tree.leaves(manual), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
    assert infos.ess.shape == (num_steps,)
    assert states.particles.shape == (num_steps, 200, 2)
    np.testing.assert_allclose(jax.nn.logsumexp(final.log_weights), 0.0, atol=1e-12)
    if name == "jarzynski":
        # h = 0.5: ULA's bias moves the weights; resampled exactly when ESS < 0.9 N
        assert np.any(np.asarray(infos.resampled))
        np.testing.assert_array_equal(infos.resampled, np.asarray(infos.ess) < 0.9 * 200)
    else:
        np.testing.assert_allclose(final.log_weights, -np.log(200))
        np.testing.assert_allclose(infos.ess, 200.0)
    from_position, _ = blackjax.util.run_inference_algorithm(
        key, algo, 3, initial_position=walkers)
    assert from_position.particles.shape == walkers.shape
    assert np.all(np.isfinite(np.asarray(from_position.particles)))


def test_walker_kernels_are_walker_kernel_objects():
    """The trainer's kernel objects: name, weighting, default step size, settings."""
    jz = jarzynski_ula.walker_kernel(0.2, ess_threshold=0.7, num_mcmc_steps=2)
    assert isinstance(jz, WalkerKernel) and jz.name == "jarzynski" and jz.weighted
    assert jz.step_size == 0.2 and jz.restart is None
    assert jz.config["ess_threshold"] == 0.7 and jz.config["num_mcmc_steps"] == 2
    pcd = ula.walker_kernel(0.2)
    assert pcd.name == "pcd" and not pcd.weighted and pcd.restart is None
    cdk = cd.walker_kernel(0.2, restart_every=5)
    assert cdk.name == "cd" and not cdk.weighted and cdk.restart is not None
    assert cdk.config["restart_every"] == 5
