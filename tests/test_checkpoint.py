"""Checkpoint and resume of fit (numpyro_ebm.checkpoint, through the Checkpoint callback)."""

import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from numpyro_ebm import fit
from numpyro_ebm.step_size import step_size_adaptation
from numpyro_ebm.training.callbacks import Checkpoint, DegeneracyCheck, Snapshots


def u(params, x):
    return 0.5 * jnp.sum((x - params["mu"]) ** 2) * jnp.exp(-2.0 * params["log_scale"])


DATA = 1.5 + 0.7 * jax.random.normal(jax.random.key(0), (200, 2))
PARAMS = {"mu": jnp.zeros(2), "log_scale": jnp.zeros(())}


def run(num_iterations, *extra_callbacks, **kw):
    opts = dict(
        optimizer=optax.adam(0.05), num_walkers=128, kernel="jarzynski", step_size=0.1,
        num_iterations=num_iterations, rng_key=jax.random.key(1), log_z0=1.8378770664093453,
        trace_fn=lambda p, s: {"mu0": p["mu"][0]},
        callbacks=[*extra_callbacks, DegeneracyCheck(ess_floor=None)],
    )
    opts.update(kw)
    return fit(u, PARAMS, DATA, **opts)


def assert_same(a, b):
    for x, y in zip(jax.tree.leaves((a.params, a.state, a.opt_state)),
                    jax.tree.leaves((b.params, b.state, b.opt_state)), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert set(a.trace) == set(b.trace)
    for x, y in zip(jax.tree.leaves(a.trace), jax.tree.leaves(b.trace), strict=True):
        np.testing.assert_array_equal(x, y)


def test_interrupted_and_resumed_run_equals_the_uninterrupted_one(tmp_path):
    full = run(30)
    ckpt = tmp_path / "ckpt"
    first = run(20, Checkpoint(str(ckpt), every=10))  # the "interruption"
    assert sorted(os.listdir(ckpt)) == ["10", "20"]
    assert first.trace["grad_norm"].shape == (20,)
    resumed = run(30, Checkpoint(str(ckpt), every=10, resume=True))
    assert_same(full, resumed)
    assert int(resumed.train_state.iteration) == 30
    assert "30" in os.listdir(ckpt)
    # resuming a finished run returns it as it was
    again = run(30, Checkpoint(str(ckpt), every=10, resume=True))
    assert_same(full, again)


def test_resume_with_snapshots_and_adaptive_step_size(tmp_path):
    kw = dict(step_size_adaptation=step_size_adaptation(0.7))
    full = run(20, Snapshots(5), **kw)
    run(10, Snapshots(5), Checkpoint(tmp_path, every=10), **kw)
    resumed = run(20, Snapshots(5), Checkpoint(tmp_path, every=10, resume=True), **kw)
    assert_same(full, resumed)
    np.testing.assert_array_equal(resumed.train_state.step_size_state.step_size,
                                  full.train_state.step_size_state.step_size)
    assert resumed.trace["snapshots"]["iteration"].tolist() == [0, 5, 10, 15]


def test_mismatched_checkpoint_is_refused_and_left_intact(tmp_path):
    run(10, Checkpoint(tmp_path, every=5))
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(ValueError, match="num_walkers"):
        run(20, Checkpoint(tmp_path, resume=True), num_walkers=64)
    with pytest.raises(ValueError, match="rng_key"):
        run(20, Checkpoint(tmp_path, resume=True), rng_key=jax.random.key(9))
    with pytest.raises(ValueError, match="method"):
        run(20, Checkpoint(tmp_path, resume=True), kernel="pcd")
    with pytest.raises(ValueError, match="ess_threshold"):  # the kernel's settings count too
        from numpyro_ebm.kernels import jarzynski_ula

        run(20, Checkpoint(tmp_path, resume=True), step_size=None,
            kernel=jarzynski_ula.walker_kernel(0.1, ess_threshold=0.9))
    with pytest.raises(ValueError, match="resume=True"):
        run(20, Checkpoint(tmp_path))  # would overwrite another run
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_corrupt_checkpoint_gives_a_clear_error_and_keeps_earlier_ones(tmp_path):
    run(10, Checkpoint(tmp_path, every=5))
    latest = tmp_path / "10"
    files = [p for p in pathlib.Path(latest).rglob("*") if p.is_file()]
    assert files
    for p in files:  # garble every file of the latest checkpoint
        p.write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="could not read the checkpoint at iteration 10"):
        run(20, Checkpoint(tmp_path, resume=True))
    assert (tmp_path / "5").is_dir()


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: Checkpoint("x", every=0), "every"),
        (lambda: Checkpoint("x", every=2.5), "every"),
        (lambda: Checkpoint("a_file"), "checkpoint_dir|directory"),
    ],
)
def test_bad_checkpoint_options(make, match, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a_file").write_text("not a directory")
    with pytest.raises((ValueError, TypeError, NotADirectoryError), match=match):
        make()


def test_checkpoint_every_must_be_a_multiple_of_snapshot_every(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"`every` \(7\) must be a multiple of `snapshot_every` \(5\)"):
        run(3, Snapshots(5), Checkpoint("x", every=7))
    assert not (tmp_path / "x").exists()  # refused before anything was written
