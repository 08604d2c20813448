"""Every script in examples/ runs at its reduced size (NUMPYRO_EBM_SMOKE=1) and writes
at least one non-trivial PNG into the output directory it is given."""

import os
import pathlib
import subprocess
import sys

import pytest

EXAMPLES = sorted((pathlib.Path(__file__).parent.parent / "examples").glob("*.py"))


@pytest.mark.parametrize("script", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_runs_and_writes_figures(script, tmp_path):
    env = dict(os.environ, NUMPYRO_EBM_SMOKE="1", MPLBACKEND="Agg")
    proc = subprocess.run(
        [sys.executable, str(script), "--output-dir", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    pngs = list(tmp_path.glob("**/*.png"))
    assert pngs, f"{script.name} wrote no PNG; stdout:\n{proc.stdout[-2000:]}"
    assert all(p.stat().st_size > 5_000 for p in pngs)
