"""Resuming never mixes two runs: every setting that changes the result is recorded with
the checkpoints and compared (the error names it), and nothing is deleted on a refusal."""

import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import numpyro_ebm
from numpyro_ebm.kernels import jarzynski_ula
from numpyro_ebm.training import callbacks as cbs

DATA = np.random.default_rng(0).normal(1.0, 1.0, size=(64, 2)).astype(np.float32)
WALKERS = np.random.default_rng(1).normal(size=(32, 2)).astype(np.float32)


def u(params, x):
    return 0.5 * jnp.sum((x - params) ** 2)


def run(directory, *, resume=False, step_size=0.1, learning_rate=0.05, data=DATA, num_iterations=8):
    return numpyro_ebm.fit(
        u, jnp.zeros(2), data, optimizer=optax.sgd(learning_rate),
        kernel=jarzynski_ula.walker_kernel(step_size), num_walkers=32, init_particles=WALKERS,
        num_iterations=num_iterations, rng_key=jax.random.key(0), chunk_size=4,
        callbacks=[cbs.Checkpoint(directory, every=4, resume=resume)],
    )


def step_folders(directory):
    return sorted(p.name for p in directory.iterdir() if p.name.isdigit())


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ckpt")
    run(directory)
    return directory


@pytest.mark.parametrize("change, field", [
    (dict(step_size=0.2), "step_size"),
    (dict(learning_rate=0.01), "optimizer_probe_sha256"),
    (dict(data=DATA + 1.0), "data_sha256"),
])
def test_resume_with_another_setting_is_refused_and_nothing_is_deleted(saved, change, field):
    before = step_folders(saved)
    with pytest.raises(ValueError, match=field):
        run(saved, resume=True, num_iterations=16, **change)
    assert step_folders(saved) == before


def test_resume_with_fewer_iterations_than_saved_is_refused(saved):
    with pytest.raises(ValueError, match="`num_iterations`"):
        run(saved, resume=True, num_iterations=4)


def test_same_settings_resume_and_extend(saved, tmp_path):
    """The same settings resume (and may extend the run): the result equals one longer run."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(saved, copy)
    resumed = run(copy, resume=True, num_iterations=12)
    straight = run(tmp_path / "fresh", num_iterations=12)
    np.testing.assert_array_equal(resumed.params, straight.params)
    np.testing.assert_array_equal(resumed.trace["ess"], straight.trace["ess"])


def test_failure_with_checkpoints_exits_promptly(tmp_path):
    """A run that fails while checkpointing leaves no Orbax thread behind: the interpreter
    exits at once (it used to hang ~5 minutes)."""
    script = textwrap.dedent(f"""
        import jax, jax.numpy as jnp, numpy as np, optax, numpyro_ebm
        from numpyro_ebm.training import callbacks as cbs
        def u(p, x):
            return jnp.where(p[0] > 0.3, jnp.nan, 0.5 * jnp.sum((x - p) ** 2))
        data = np.ones((16, 2), np.float32)
        try:
            numpyro_ebm.fit(u, jnp.zeros(2), data, optimizer=optax.sgd(0.2), kernel="jarzynski",
                            step_size=0.1, num_walkers=8, init_particles="standard_normal",
                            num_iterations=40, rng_key=jax.random.key(0), chunk_size=4,
                            callbacks=[cbs.Checkpoint({str(tmp_path / 'c')!r})])
        except numpyro_ebm.NonFiniteError as err:
            print("stopped:", err.result.train_state.iteration)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "stopped:" in proc.stdout
