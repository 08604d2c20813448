"""Bad inputs give a named error or a documented warning, across the public functions.

Each row: a name, a thunk that calls a public function with one bad input, the exception
(or warning) class, and a pattern the message must match (the argument's name)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import numpyro_ebm
from numpyro_ebm import errors, kernels
from numpyro_ebm.kernels import adaptive_jarzynski_ula, cd, jarzynski_ula, ula
from numpyro_ebm.training import callbacks as cbs


def u(params, x):
    return 0.5 * jnp.sum((x - params) ** 2)


DATA = np.random.default_rng(0).normal(size=(40, 2)).astype(np.float32)
P0 = jnp.zeros(2)
WALKERS = jnp.asarray(np.random.default_rng(1).normal(size=(16, 2)).astype(np.float32))


def fit(**kw):
    args = dict(optimizer=optax.sgd(0.01), kernel="jarzynski", step_size=0.1, num_walkers=16,
                num_iterations=3, rng_key=jax.random.key(0), init_particles=WALKERS)
    args.update(kw)
    potential = args.pop("potential_fn", u)
    params = args.pop("params", P0)
    data = args.pop("data", DATA)
    return numpyro_ebm.fit(potential, params, data, **args)


def state():
    return jarzynski_ula.init(WALKERS, P0, u)


ERRORS = [
    ("fit kernel", lambda: fit(kernel="nope"), ValueError, "`kernel`"),
    ("fit kernel object + step_size", lambda: fit(kernel=jarzynski_ula.walker_kernel(0.1)),
     ValueError, "`step_size`"),
    ("fit no step_size", lambda: fit(step_size=None), ValueError, "`step_size`"),
    ("fit rng_key int", lambda: fit(rng_key=0), TypeError, "`rng_key`"),
    ("fit num_walkers 1", lambda: fit(num_walkers=1, init_particles=None), ValueError, "`num_walkers`"),
    ("fit num_iterations 0", lambda: fit(num_iterations=0), ValueError, "`num_iterations`"),
    ("fit data NaN", lambda: fit(data=np.full((4, 2), np.nan, np.float32)), ValueError, "`data`"),
    ("fit data_batch_size too big", lambda: fit(data_batch_size=41), ValueError, "`data_batch_size`"),
    ("fit log_z0 inf", lambda: fit(log_z0=math.inf), ValueError, "`log_z0`"),
    ("fit init_particles count", lambda: fit(init_particles=WALKERS[:8]), ValueError, "`init_particles`"),
    ("fit init_particles string", lambda: fit(init_particles="uniform"), ValueError, "`init_particles`"),
    ("fit optimizer", lambda: fit(optimizer=object()), TypeError, "`optimizer`"),
    ("fit potential not callable", lambda: fit(potential_fn=3), TypeError, "`potential_fn`"),
    ("fit batch energy", lambda: fit(potential_fn=lambda p, x: jnp.sum(x[:, None, :] - p)),
     ValueError, "ONE sample"),
    ("fit vector energy", lambda: fit(potential_fn=lambda p, x: x - p), ValueError, "scalar"),
    ("fit init_state type", lambda: fit(init_state={}), TypeError, "`init_state`"),
    ("fit step_size_adaptation pcd", lambda: fit(
        kernel="pcd", step_size_adaptation=numpyro_ebm.step_size.step_size_adaptation(0.7)),
     ValueError, "`step_size_adaptation`"),
    ("fit chunk_size 0", lambda: fit(chunk_size=0), ValueError, "`chunk_size`"),
    ("walker_kernel step_size", lambda: jarzynski_ula.walker_kernel(-0.1), ValueError, "`step_size`"),
    ("walker_kernel ess_threshold", lambda: jarzynski_ula.walker_kernel(0.1, ess_threshold=1.5),
     ValueError, "`ess_threshold`"),
    ("walker_kernel num_mcmc_steps", lambda: jarzynski_ula.walker_kernel(0.1, num_mcmc_steps=0), ValueError,
     "`num_mcmc_steps`"),
    ("walker_kernel noise_dtype", lambda: jarzynski_ula.walker_kernel(0.1, noise_dtype=jnp.int32),
     ValueError, "`noise_dtype`"),
    ("walker_kernel resampling_fn", lambda: jarzynski_ula.walker_kernel(0.1, resampling_fn=3),
     TypeError, "`resampling_fn`"),
    ("adaptive target_ess", lambda: adaptive_jarzynski_ula.walker_kernel(0.1, target_ess=1.0),
     ValueError, "`target_ess`"),
    ("adaptive max_substeps", lambda: adaptive_jarzynski_ula.walker_kernel(0.1, max_substeps=0),
     ValueError, "`max_substeps`"),
    ("ula step_size", lambda: ula.walker_kernel(0.0), ValueError, "`step_size`"),
    ("cd restart_every", lambda: cd.walker_kernel(0.1, restart_every=0), ValueError, "`restart_every`"),
    ("for_method", lambda: kernels.for_method("sgld", 0.1), ValueError, "`method`"),
    ("for_method schedule", lambda: kernels.for_method("jarzynski", 0.1, schedule="cosine"),
     ValueError, "`schedule`"),
    ("init one walker", lambda: jarzynski_ula.init(WALKERS[:1], P0, u), ValueError, "`particles`"),
    ("kernel negative step_size override", lambda: jarzynski_ula.build_kernel(u, 0.1)(
        jax.random.key(0), state(), step_size=-0.1), ValueError, "`step_size`"),
    ("ce_grad state type", lambda: numpyro_ebm.ce_grad(u, P0, DATA, state={}), TypeError, "`state`"),
    ("ce_grad data shape", lambda: numpyro_ebm.ce_grad(u, P0, DATA[:, :1], state()), ValueError, "`data`"),
    ("ce_estimate log_z0", lambda: numpyro_ebm.ce_estimate(u, P0, DATA, state(), math.nan),
     ValueError, "`log_z0`"),
    ("ce_estimate unweighted", lambda: numpyro_ebm.ce_estimate(u, P0, DATA, ula.init(WALKERS, P0, u), 0.0),
     ValueError, "log_normalizer"),
    ("build_trainer kernel", lambda: numpyro_ebm.build_trainer(u, optax.sgd(0.1), object()),
     TypeError, "`kernel`"),
    ("step_size_adaptation target", lambda: numpyro_ebm.step_size.step_size_adaptation(1.2),
     ValueError, "`target_acceptance`"),
    ("DivergenceCheck factor", lambda: cbs.DivergenceCheck(-1.0), ValueError, "`factor`"),
    ("DivergenceCheck NaN", lambda: cbs.DivergenceCheck(math.nan), ValueError, "`factor`"),
    ("walker_batch_size 0", lambda: jarzynski_ula.walker_kernel(0.1, walker_batch_size=0), ValueError,
     "`walker_batch_size`"),
    ("DegeneracyCheck floor", lambda: cbs.DegeneracyCheck(ess_floor=2.0), ValueError, "`ess_floor`"),
    ("Snapshots every", lambda: cbs.Snapshots(0), ValueError, "`every`"),
    ("ParetoKhat fn", lambda: cbs.ParetoKhat(3), TypeError, "`khat_fn`"),
    ("Checkpoint every", lambda: cbs.Checkpoint("/tmp/x", every=0), ValueError, "`every`"),
    ("summarize_infos walkers", lambda: kernels.summarize_infos(None, 0), ValueError, "`num_walkers`"),
]
ERRORS = [row for row in ERRORS if row[2] is not None]


@pytest.mark.parametrize("thunk, error, pattern", [r[1:] for r in ERRORS], ids=[r[0] for r in ERRORS])
def test_bad_input_gives_a_named_error(thunk, error, pattern):
    with pytest.raises(error, match=pattern):
        thunk()


def test_checkpoint_dir_that_is_a_file_is_refused_before_training(tmp_path):
    path = tmp_path / "a_file"
    path.write_text("x")
    with pytest.raises(NotADirectoryError, match="`directory`"):
        fit(callbacks=[cbs.Checkpoint(path)])


def test_mixed_precision_is_cast_by_the_stated_rule():
    """float32 data and walkers with float64 params under x64: cast to the energy's float64."""
    with jax.enable_x64(True):
        result = fit(params=jnp.zeros(2, jnp.float64))
        assert result.state.particles.dtype == jnp.float64
        with pytest.raises(TypeError, match="`particles` is float32 but the energy is float64"):
            jarzynski_ula.init(WALKERS, jnp.zeros(2, jnp.float64), u)


def test_numpy_data_with_minibatches_and_cd():
    """NumPy data (as load_digits returns) with data_batch_size and with CD: the runs
    complete (they used to fail with TracerArrayConversionError) with finite results, and
    NumPy float64 data are cast to the float32 energy."""
    for result in (fit(data_batch_size=8), fit(kernel="cd", init_particles=None)):
        assert np.all(np.isfinite(np.asarray(result.params)))
        assert np.all(np.isfinite(result.trace["grad_norm"]))
    mixed = fit(data=DATA.astype(np.float64), params=np.zeros(2, np.float32),
                init_particles=np.asarray(WALKERS))
    assert mixed.state.particles.dtype == jnp.float32


def test_default_walkers_warn_for_weighted_kernels_unless_said():
    with pytest.warns(errors.InitialWalkersWarning, match="init_particles"):
        fit(init_particles=None)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", errors.InitialWalkersWarning)
        fit(init_particles="standard_normal")
        fit(kernel="pcd", init_particles=None)


# --- around the core: normaliser, front-ends, distributions, diagnostics, datasets, CLI ---

def _normalizer(**kw):
    args = dict(num_walkers=64, event_shape=(2,), step_size=0.1)
    args.update(kw)
    return numpyro_ebm.estimate_log_normalizer(u, P0, jax.random.key(0), **args)


def _cli(argv):
    from numpyro_ebm import cli

    return cli.main(argv)


OUTER = [
    ("normalizer num_walkers", lambda: _normalizer(num_walkers=1), ValueError, "`num_walkers`"),
    ("normalizer step_size", lambda: _normalizer(step_size=-1.0), ValueError, "`step_size`"),
    ("normalizer base", lambda: _normalizer(base="laplace"), ValueError, "`base`"),
    ("normalizer rng_key", lambda: numpyro_ebm.estimate_log_normalizer(u, P0, 0, num_walkers=8,
                                                                       event_shape=(2,)),
     TypeError, "`rng_key`"),
    ("from_flax module", lambda: numpyro_ebm.potentials.from_flax(3), TypeError, "module"),
    ("from_numpyro data_site", lambda: numpyro_ebm.potentials.from_numpyro(
        lambda x=None: None, data_site="x"), ValueError, "`data_site`|'x'"),
    ("EnergyBased NaN weights", lambda: numpyro_ebm.EnergyBased(
        u, P0, particles=WALKERS, log_weights=jnp.full(16, jnp.nan)), ValueError, "`log_weights`"),
    ("energy_based_from_fit result", lambda: numpyro_ebm.energy_based_from_fit(u, object()),
     TypeError, "`result`"),
    ("to_datatree result", lambda: numpyro_ebm.diagnostics.to_datatree(object()), TypeError, "`result`"),
    ("pareto_khat NaN", lambda: numpyro_ebm.diagnostics.pareto_khat(np.array([0.0, np.nan] * 20)),
     ValueError, "`log_weights`"),
    ("load_digits classes", lambda: numpyro_ebm.datasets.load_digits((2, 2, 6)), ValueError, "`classes`"),
    ("load_digits proportions", lambda: numpyro_ebm.datasets.load_digits((2, 3), (1, -1)), ValueError,
     "`proportions`"),
    ("load_mnist path", lambda: numpyro_ebm.datasets.load_mnist("/nonexistent/mnist"),
     FileNotFoundError, "nonexistent"),
    ("cli num-walkers", lambda: _cli(["gmm", "--num-walkers", "1"]), SystemExit, "2"),
    ("cli step-size inf", lambda: _cli(["gmm", "--step-size", "inf"]), SystemExit, "2"),
]


@pytest.mark.parametrize("thunk, error, pattern", [r[1:] for r in OUTER], ids=[r[0] for r in OUTER])
def test_bad_input_around_the_core_gives_a_named_error(thunk, error, pattern):
    with pytest.raises(error, match=pattern):
        thunk()


def test_unreadable_checkpoint_is_a_named_error_and_is_kept(tmp_path):
    fit(num_iterations=4, callbacks=[cbs.Checkpoint(tmp_path, every=2)])
    step = max(p for p in tmp_path.iterdir() if p.name.isdigit())
    for f in step.rglob("*"):
        if f.is_file():
            f.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="could not read"):
        fit(num_iterations=8, callbacks=[cbs.Checkpoint(tmp_path, every=2, resume=True)])
    assert step.exists()
