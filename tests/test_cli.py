"""The command line: `numpyro-ebm gmm` at a tiny size prints the table and saves files."""

import json

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
