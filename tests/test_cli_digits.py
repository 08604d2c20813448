"""`numpyro-ebm digits` and `numpyro-ebm mnist` at a tiny size: table, PNGs and JSON."""

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest

from numpyro_ebm import cli
from numpyro_ebm.experiments import digits

MNIST_DIR = Path(__file__).parents[1].parent / "shared/data/mnist"
TINY = ["--num-walkers", "40", "--num-iterations", "20", "--hidden", "16", "--no-progress"]


def _check_outputs(tmp_path, name, out):
    for method in ("jarzynski", "pcd"):
        assert method in out
        assert (tmp_path / f"{name}_walkers_{method}.png").stat().st_size > 5_000
        assert (tmp_path / f"{name}_training_{method}.png").stat().st_size > 5_000
    assert (tmp_path / f"{name}_masses.png").stat().st_size > 5_000
    assert "held-out accuracy" in out
    summary = json.loads((tmp_path / f"{name}.json").read_text())
    assert set(summary["methods"]) == {"jarzynski", "pcd"}
    assert "final_cross_entropy_estimate" in summary["methods"]["jarzynski"]
    assert "final_cross_entropy_estimate" not in summary["methods"]["pcd"]
    for m in summary["methods"].values():
        assert sum(m["masses"]) == pytest.approx(1.0)
    table = (tmp_path / f"{name}.txt").read_text()
    assert "truth" in table and "digit 6" in table
    return summary


def test_digits_command_writes_table_pngs_and_json(tmp_path, capsys):
    code = cli.main(["digits", *TINY, "--clip-norm", "5", "--num-mcmc-steps", "2", "--output-dir", str(tmp_path)])
    assert code == 0
    summary = _check_outputs(tmp_path, "digits", capsys.readouterr().out)
    assert summary["config"]["clip_norm"] == 5.0 and summary["config"]["num_mcmc_steps"] == 2
    assert summary["counts"] == {"2": 140, "3": 70, "6": 35}
    assert summary["classifier"]["test_accuracy"] > 0.9


def _write_fake_mnist(directory: Path, rng) -> None:
    # 12x12 images: digit d is a bright bar at row d (plus noise), so a classifier can tell them apart
    labels = np.repeat(np.array([2, 3, 6, 7], np.uint8), [60, 40, 30, 10])
    images = rng.integers(0, 60, size=(len(labels), 12, 12)).astype(np.uint8)
    images[np.arange(len(labels)), labels, :] = 250
    for stem, arr in (("train-images-idx3-ubyte", images), ("train-labels-idx1-ubyte", labels)):
        header = struct.pack(">BBBB", 0, 0, 8, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
        (directory / (stem + ".gz")).write_bytes(gzip.compress(header + arr.tobytes()))


def test_mnist_command_on_idx_files_written_here(tmp_path, capsys):
    data_dir = tmp_path / "idx"
    data_dir.mkdir()
    _write_fake_mnist(data_dir, np.random.default_rng(0))
    out_dir = tmp_path / "out"
    code = cli.main([
        "mnist", "--data-dir", str(data_dir), "--split", "train", "--num-samples", "70", "--channels", "4",
        "--classifier", "logistic", *TINY, "--output-dir", str(out_dir),  # the CNN: test_experiments_digits_classifier
    ])
    assert code == 0
    summary = _check_outputs(out_dir, "mnist", capsys.readouterr().out)
    assert summary["counts"] == {"2": 40, "3": 20, "6": 10}
    assert summary["config"]["model"] == "conv"


@pytest.mark.slow
def test_mnist_command_on_the_shared_test_set(tmp_path, capsys):
    if not MNIST_DIR.is_dir():
        pytest.skip(f"MNIST test set not found at {MNIST_DIR}")
    code = cli.main([
        "mnist", "--data-dir", str(MNIST_DIR), "--num-samples", "70", "--channels", "4", "--methods", "jarzynski,pcd",
        *TINY, "--output-dir", str(tmp_path),
    ])
    assert code == 0
    summary = _check_outputs(tmp_path, "mnist", capsys.readouterr().out)
    assert summary["classifier"]["test_accuracy"] > 0.9


def test_acceptance_probe_every_reaches_the_config(monkeypatch, tmp_path):
    """Both commands probe MALA's acceptance every 10th iteration by default;
    ``--acceptance-probe-every none`` goes back to the proxy."""

    seen = []

    def stop(config):
        seen.append(config.acceptance_probe_every)
        raise ValueError("stopped by the test")

    monkeypatch.setattr(digits, "load_data", stop)
    cli.main(["mnist", "--data-dir", str(tmp_path)])
    cli.main(["digits"])
    cli.main(["digits", "--acceptance-probe-every", "none"])
    cli.main(["digits", "--acceptance-probe-every", "4"])
    assert seen == [10, 10, None, 4]


def test_optimizer_reaches_the_config_and_the_run(monkeypatch):
    """``--optimizer adam`` reaches the config; the experiment's optimizer then is Adam:
    from a gradient of 0.1 per coordinate its first update is ``learning_rate`` (0.005) per
    coordinate, whatever the gradient's size, where SGD's is ``learning_rate`` times the
    gradient (0.0005)."""
    import jax.numpy as jnp


    seen = []

    def stop(config):
        seen.append(config.optimizer)
        raise ValueError("stopped by the test")

    monkeypatch.setattr(digits, "load_data", stop)
    cli.main(["digits", "--optimizer", "adam"])
    cli.main(["digits"])
    assert seen == ["adam", "sgd"]
    params = {"w": jnp.zeros(4)}
    grads = {"w": jnp.full(4, 0.1)}
    for name, expected in (("adam", -0.005), ("sgd", -0.0005)):
        optimizer = digits.make_optimizer(digits.DigitsConfig(optimizer=name, weight_decay=0.0))
        updates, _ = optimizer.update(grads, optimizer.init(params), params)
        np.testing.assert_allclose(updates["w"], expected, rtol=1e-4)


def test_digits_learning_rate_follows_the_length_unless_given(monkeypatch):
    seen = []

    def stop(config):
        seen.append((digits.peak_learning_rate(config), config.num_classifiers))
        raise ValueError("stopped by the test")

    monkeypatch.setattr(digits, "load_data", stop)
    cli.main(["digits"])
    cli.main(["digits", "--num-iterations", "20000", "--num-classifiers", "1"])
    cli.main(["digits", "--num-iterations", "20000", "--learning-rate", "0.004"])
    cli.main(["mnist", "--data-dir", "unused", "--num-iterations", "1000"])
    assert seen == [(0.005, 3), (0.0025, 1), (0.004, 3), (0.002, 3)]


def test_mnist_command_names_a_missing_directory(tmp_path, capsys):
    code = cli.main(["mnist", "--data-dir", str(tmp_path / "absent"), *TINY])
    assert code == 2
    assert "absent" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["digits", "--num-walkers", "0"],
        ["digits", "--step-size", "-1"],
        ["digits", "--clip-norm", "0"],
        ["digits", "--num-mcmc-steps", "0"],
        ["digits", "--label-every", "0"],
        ["digits", "--acceptance-probe-every", "0"],
        ["digits", "--methods", "jarzynski,sgld"],
        ["digits", "--classes", "2,x"],
        ["mnist"],
    ],
)
def test_digits_commands_reject_bad_options(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    option = argv[1].lstrip("-").split("-")[0] if len(argv) > 1 else "data-dir"
    assert option in err.replace("_", "-")


def test_digits_command_rejects_inexact_proportions(tmp_path, capsys):
    code = cli.main(["digits", "--num-samples", "100", *TINY, "--output-dir", str(tmp_path)])
    assert code == 2
    assert "num_samples" in capsys.readouterr().err


def test_digits_command_with_the_authors_preset(monkeypatch, capsys):
    """--preset authors replaces the sampler/optimiser settings (outside the theory) and keeps
    the others (iterations, seed); the run itself is stopped at the data loading."""

    seen = {}

    def stop(config):
        seen["config"] = config
        raise ValueError("stopped by the test")

    monkeypatch.setattr(digits, "load_data", stop)
    assert cli.main(["digits", "--num-iterations", "3", "--seed", "4", "--preset", "authors"]) == 2
    config = seen["config"]
    assert config.preset == "authors" and config.num_iterations == 3 and config.seed == 4
    assert config.step_size == 5e-5 and config.num_walkers == 1024 and config.energy_penalty == 0.01
    assert config.target_acceptance is None and config.num_mcmc_steps == 30
    assert "stopped by the test" in capsys.readouterr().err


def test_label_every_reaches_the_config(monkeypatch, tmp_path):
    """``mnist`` labels the walkers every 10th iteration by default, ``digits`` at every one;
    ``--label-every`` overrides both."""

    seen = []

    def stop(config):
        seen.append(config.label_every)
        raise ValueError("stopped by the test")

    monkeypatch.setattr(digits, "load_data", stop)
    cli.main(["mnist", "--data-dir", str(tmp_path)])
    cli.main(["digits"])
    cli.main(["mnist", "--data-dir", str(tmp_path), "--label-every", "3"])
    assert seen == [10, 1, 3]
