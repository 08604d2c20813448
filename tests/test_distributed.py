"""Tests of walkers split over several processes (numpyro_ebm.distributed), with real processes.

The multi-process tests start Python processes on localhost that meet at a coordinator on
a free port (``jax.distributed``; CPU collectives over gloo), each split into 2 CPU devices
(``--cpu-devices 2``), so that 2 processes form one 4-device mesh. Each launch is bounded in
time and its processes are killed when it fails. The commands are those docs/scale.md
shows: the ``numpyro-ebm gmm`` command line, and tests/distributed_worker.py for the
Python API (``distributed.initialize`` from the environment, ``fit(mesh=)``, ``Checkpoint``).

Tolerances: the runs differ only in the order of floating-point sums over walkers (float64,
about 1e-16 relative per sum); over 16-20 iterations they stay below 1e-13 (measured:
3e-15), so 1e-9 leaves room while any real difference (another key, another ancestor, a
lost or repeated iteration) moves the walkers by O(0.1-1).
"""

import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from numpyro_ebm import distributed

ROOT = pathlib.Path(__file__).resolve().parent.parent
WORKER = str(ROOT / "tests" / "distributed_worker.py")
LAUNCH_TIMEOUT = 240  # seconds for one launch (all its processes): generous for a loaded CI box
GMM = ["--dim", "2", "--num-data", "64", "--num-walkers", "64", "--num-iterations", "16",
       "--learning-rate", "0.2", "--logit-learning-rate", "0.2", "--methods", "jarzynski",
       "--no-progress", "--save-state", "--no-island-resampling"]  # resamples 4 times in 16 iterations
TOLERANCE = 1e-9


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUMPYRO_EBM_")}
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "host_platform_device_count" not in f]
    env.update(XLA_FLAGS=" ".join(flags), JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    env.update(extra)
    return env


class Launch:
    """Processes started together; ``wait`` bounds them in time; leaving the ``with`` block
    kills whatever still runs (also when an assertion failed)."""

    def __init__(self, tmp_path, commands):
        self.procs, self.logs = [], []
        first = len(list(tmp_path.glob("process*.log")))
        for i, (cmd, env) in enumerate(commands):
            log = open(tmp_path / f"process{first + i}.log", "w+")
            self.logs.append(log)
            self.procs.append(subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                               start_new_session=True))
        self.deadline = time.monotonic() + LAUNCH_TIMEOUT

    def wait(self, i) -> int:
        try:
            return self.procs[i].wait(timeout=max(1.0, self.deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pytest.fail(f"process {i} ran past {LAUNCH_TIMEOUT} s:\n{self.output(i)[-3000:]}")

    def output(self, i) -> str:
        self.logs[i].flush()
        self.logs[i].seek(0)
        return self.logs[i].read()

    def kill(self, i):
        if self.procs[i].poll() is None:
            os.killpg(self.procs[i].pid, signal.SIGKILL)
            self.procs[i].wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for i in range(len(self.procs)):
            self.kill(i)
        for log in self.logs:
            log.close()


def _check_ok(launch, *indices):
    for i in indices:
        assert launch.wait(i) == 0, launch.output(i)[-3000:]


def _cli(*args):
    return [sys.executable, "-m", "numpyro_ebm.cli", "gmm", *GMM, *args]


def _worker_env(port, process_id):
    return _env(NUMPYRO_EBM_COORDINATOR=f"localhost:{port}", NUMPYRO_EBM_NUM_PROCESSES="2",
                NUMPYRO_EBM_PROCESS_ID=str(process_id))


def _assert_same_run(a, b, keys):
    for key in keys:
        assert np.max(np.abs(a[key] - b[key])) < TOLERANCE, (key, a[key], b[key])
    np.testing.assert_array_equal(a["resampled"], b["resampled"])
    assert np.sum(a["resampled"]) >= 3  # global resampling (ancestors across processes) happened


def test_two_processes_reproduce_one_process_and_one_device(tmp_path):
    """``numpyro-ebm gmm`` on 2 processes x 2 devices, on 1 process x 4 devices and on one
    device: the same final parameters, walkers, weights and log normaliser, the same
    resampling iterations (>= 3); process 0 alone writes the results."""
    port = _free_port()
    two = [_cli("--cpu-devices", "2", "--coordinator", f"localhost:{port}", "--num-processes", "2",
                "--process-id", str(i), "--output-dir", str(tmp_path / f"two_{i}")) for i in (0, 1)]
    commands = [(two[0], _env()), (two[1], _env()),
                (_cli("--cpu-devices", "4", "--output-dir", str(tmp_path / "four")), _env()),
                (_cli("--output-dir", str(tmp_path / "one")), _env())]
    with Launch(tmp_path, commands) as launch:
        _check_ok(launch, 0, 1, 2, 3)
        assert "split over 4 devices of 2 process(es)" in launch.output(0)
        assert "split over 4 devices of 1 process(es)" in launch.output(2)
    state = {name: np.load(tmp_path / name / "gmm_jarzynski_state.npz") for name in ("two_0", "four", "one")}
    keys = ("params_means", "params_logits", "particles", "log_weights", "log_normalizer")
    _assert_same_run(state["two_0"], state["one"], keys)
    _assert_same_run(state["four"], state["one"], keys)
    assert sorted(os.listdir(tmp_path / "two_0")) == [
        "gmm.json", "gmm.png", "gmm.txt", "gmm_jarzynski_state.npz", "gmm_training_jarzynski.png"]
    assert os.listdir(tmp_path / "two_1") == []  # written once, by process 0


def _committed_steps(directory):
    return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def test_resume_after_one_process_is_killed(tmp_path):
    """Two processes checkpoint every 5 iterations; process 1 is killed (SIGKILL) at
    iteration 10, before that checkpoint; the survivor is stopped too. Started again (now
    each process passing only its own rows of the data, ``distributed.shard_data``: the
    checkpoint's data fingerprint does not depend on how the data arrived), both resume
    from iteration 5 and end where an uninterrupted run (1 process x 4 devices) ends."""
    ckpt = str(tmp_path / "ckpt")
    port = _free_port()
    worker = [sys.executable, WORKER, "--cpu-devices", "2", "--out", str(tmp_path / "two.npz"),
              "--checkpoint-dir", ckpt]
    reference = [sys.executable, WORKER, "--cpu-devices", "4", "--out", str(tmp_path / "ref.npz")]
    kill = ["--kill-at", "10", "--kill-process", "1"]
    commands = [(worker + kill, _worker_env(port, 0)), (worker + kill, _worker_env(port, 1)),
                (reference, _env())]
    with Launch(tmp_path, commands) as launch:
        assert launch.wait(1) == -signal.SIGKILL, launch.output(1)[-3000:]
        try:  # the survivor fails (peer gone) or waits for it: stop it
            launch.procs[0].wait(timeout=5)
        except subprocess.TimeoutExpired:
            launch.kill(0)
        _check_ok(launch, 2)
    assert _committed_steps(ckpt) == [5]
    assert not (tmp_path / "two.npz").exists()
    port = _free_port()
    worker.append("--shard-data")
    commands = [(worker, _worker_env(port, 0)), (worker, _worker_env(port, 1))]
    with Launch(tmp_path, commands) as launch:
        _check_ok(launch, 0, 1)
    resumed, ref = np.load(tmp_path / "two.npz"), np.load(tmp_path / "ref.npz")
    assert int(resumed["first_chunk_start"]) == 5 and int(ref["first_chunk_start"]) == 0
    assert int(resumed["num_processes"]) == 2 and int(ref["num_processes"]) == 1
    _assert_same_run(resumed, ref, ("mu", "log_scale", "particles", "log_weights", "log_normalizer",
                                    "log_normalizer_trace"))
    assert _committed_steps(ckpt)[-1] == 20


def test_processes_that_disagree_stop_with_a_clear_error(tmp_path):
    """Process 1 asks for one more iteration: both processes stop before training with an
    error naming the setting (instead of waiting on each other for ever)."""
    port = _free_port()
    common = ["--cpu-devices", "2", "--coordinator", f"localhost:{port}", "--num-processes", "2",
              "--output-dir", str(tmp_path / "out")]
    commands = [(_cli(*common, "--process-id", "0"), _env()),
                (_cli(*common, "--process-id", "1", "--num-iterations", "17"), _env())]
    with Launch(tmp_path, commands) as launch:
        for i in (0, 1):
            assert launch.wait(i) == 2, launch.output(i)[-3000:]
            text = launch.output(i)
            assert "processes called `fit` with different settings: num_iterations differ" in text, text
            assert "Traceback" not in text
    assert not (tmp_path / "out" / "gmm.json").exists()


def test_launch_arguments_are_checked_before_joining(monkeypatch):
    for name in (distributed.ENV_COORDINATOR, distributed.ENV_NUM_PROCESSES, distributed.ENV_PROCESS_ID):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match="coordinator_address"):
        distributed.initialize("localhost", 2, 0)
    with pytest.raises(ValueError, match="process_id"):
        distributed.initialize("localhost:1234", 2, 2)
    with pytest.raises(ValueError, match="num_processes"):
        distributed.initialize("localhost:1234", 0, 0)
    monkeypatch.setenv(distributed.ENV_NUM_PROCESSES, "two")
    with pytest.raises(ValueError, match="NUMPYRO_EBM_NUM_PROCESSES"):
        distributed.initialize("localhost:1234")


def test_one_process_helpers():
    """With one process: the settings check passes, ``to_host`` is ``device_get``, the
    digests tell values apart, the checksum tells arrays apart and the mesh holds every
    device."""
    distributed.check_same_settings({"a": 1, "b": np.zeros(3)})
    tree = {"x": jnp.arange(3.0), "n": 2}
    host = distributed.to_host(tree)
    assert isinstance(host["x"], np.ndarray) and host["n"] == 2
    digest = distributed.setting_digest
    assert np.array_equal(digest(np.ones(3)), digest(np.ones(3)))
    assert not np.array_equal(digest(np.ones(3)), digest(np.ones(3) + 1e-12))
    assert not np.array_equal(digest(jax.random.key(1)), digest(jax.random.key(2)))
    x = jnp.arange(12.0).reshape(4, 3)
    assert distributed.global_checksum(x) == distributed.global_checksum(x + 0.0)
    assert distributed.global_checksum(x) != distributed.global_checksum(x.at[3, 2].set(11.5))
    assert distributed.global_checksum(x) != distributed.global_checksum(x.reshape(3, 4))
    assert distributed.global_mesh().size == jax.device_count()
    assert distributed.is_main_process()
    assert not distributed.spans_processes(distributed.global_mesh())
