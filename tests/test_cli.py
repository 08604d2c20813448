"""The command line: `numpyro-ebm gmm` at a tiny size prints the table and saves files."""

import json
import os

import jax
import pytest

from numpyro_ebm import cli


def test_gmm_command_writes_table_png_and_json(tmp_path, capsys):
    code = cli.main([
        "gmm", "--dim", "2", "--num-data", "300", "--num-walkers", "200",
        "--num-iterations", "40", "--output-dir", str(tmp_path), "--no-progress",
    ])
    assert code == 0
    out = capsys.readouterr().out
    for method in ("jarzynski", "pcd", "cd"):
        assert method in out
    assert (tmp_path / "gmm.png").stat().st_size > 10_000
    assert (tmp_path / "gmm_training_jarzynski.png").stat().st_size > 10_000
    summary = json.loads((tmp_path / "gmm.json").read_text())
    assert set(summary["methods"]) == {"jarzynski", "pcd", "cd"}
    assert "ce_estimate_error" in summary["methods"]["jarzynski"]
    assert "ce_estimate_error" not in summary["methods"]["pcd"]


@pytest.mark.parametrize(
    "argv",
    [
        ["gmm", "--num-walkers", "0"],
        ["gmm", "--step-size", "-1"],
        ["gmm", "--methods", "jarzynski,sgld"],
    ],
)
def test_gmm_command_rejects_bad_options(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert argv[1].lstrip("-").split("-")[0] in err.replace("_", "-")


@pytest.mark.parametrize(
    "argv, option",
    [
        (["gmm", "--num-walkers", "1"], "--num-walkers"),
        (["gmm", "--num-walkers", "many"], "--num-walkers"),
        (["gmm", "--step-size", "inf"], "--step-size"),
        (["gmm", "--step-size", "nan"], "--step-size"),
        (["gmm", "--learning-rate", "1e999"], "--learning-rate"),
        (["gmm", "--logit-learning-rate", "-inf"], "--logit-learning-rate"),
        (["gmm", "--seed", str(2**70)], "--seed"),
        (["digits", "--weight-decay", "nan"], "--weight-decay"),
        (["digits", "--weight-decay", "-0.1"], "--weight-decay"),
        (["digits", "--noise-std", "inf"], "--noise-std"),
        (["digits", "--clip-norm", "inf"], "--clip-norm"),
        (["digits", "--num-walkers", "1"], "--num-walkers"),
    ],
)
def test_numeric_options_are_checked_at_parse_time(argv, option, capsys, monkeypatch):
    _no_training(monkeypatch)
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"error: argument {option}: " in err
    assert "Traceback" not in err


def _no_training(monkeypatch):
    from numpyro_ebm.experiments import digits, gmm

    def refuse(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(gmm, "run", refuse)
    monkeypatch.setattr(digits, "run", refuse)
    monkeypatch.setattr(digits, "load_data", refuse)


@pytest.mark.parametrize("command", ["gmm", "digits"])
def test_unusable_output_dir_fails_before_training(command, tmp_path, capsys, monkeypatch):
    _no_training(monkeypatch)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    for bad in (blocker, blocker / "sub"):
        with pytest.raises(SystemExit) as exc:
            cli.main([command, "--output-dir", str(bad), "--no-progress"])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert "error: argument --output-dir: cannot create or write" in err
        assert str(bad) in err
    if os.geteuid() != 0:  # root writes anywhere: a read-only directory only stops others
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(SystemExit) as exc:
            cli.main([command, "--output-dir", str(locked / "out"), "--no-progress"])
        assert exc.value.code == 2
        assert "--output-dir" in capsys.readouterr().err


def test_output_dir_is_created_before_training(tmp_path, monkeypatch):
    _no_training(monkeypatch)
    out = tmp_path / "new" / "nested"
    with pytest.raises(AssertionError, match="training started"):
        cli.main(["gmm", "--output-dir", str(out), "--no-progress"])
    assert out.is_dir()


def test_compilation_cache_option_switches_on_the_persistent_cache(tmp_path, monkeypatch):
    """`--compilation-cache DIR` sets JAX's persistent cache to DIR (created) before training."""
    _no_training(monkeypatch)
    cache = tmp_path / "cache"
    before = jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs
    try:
        with pytest.raises(AssertionError, match="training started"):
            cli.main(["gmm", "--output-dir", str(tmp_path / "out"), "--no-progress",
                      "--compilation-cache", str(cache)])
        assert jax.config.jax_compilation_cache_dir == str(cache)
        assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.0
        assert cache.is_dir()
    finally:
        jax.config.update("jax_compilation_cache_dir", before[0])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", before[1])


def test_gmm_walkers_not_divisible_into_islands_is_a_clear_error(tmp_path, capsys, monkeypatch):
    """Island resampling (the default) needs the walkers split into 10 equal groups: an
    error that names the settings and the way out, before any training, exit code 2;
    --no-island-resampling accepts the same count."""
    _no_training(monkeypatch)
    rc = cli.main(["gmm", "--num-walkers", "999", "--output-dir", str(tmp_path), "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "`num_walkers` (999)" in err and "--no-island-resampling" in err and "Traceback" not in err
    with pytest.raises(AssertionError, match="training started"):
        cli.main(["gmm", "--num-walkers", "999", "--no-island-resampling", "--output-dir", str(tmp_path),
                  "--no-progress"])
