"""The core (kernel, estimators, trainer and their helpers) imports nothing from the
front-ends, diagnostics, datasets, experiments or the CLI, nor ArviZ or matplotlib."""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).parent.parent / "numpyro_ebm"
CORE = sorted(
    ["jarzynski_ula", "estimators", "train", "sharding", "distributed", "schedule", "step_size", "normalizer",
     "checkpoint", "_checks", "_optional"]
    + [f"{pkg}/{p.stem}" for pkg in ("kernels", "training") for p in (PACKAGE / pkg).glob("*.py")]
)
OUTSIDE = {
    "numpyro_ebm.potentials", "numpyro_ebm.distributions", "numpyro_ebm.diagnostics",
    "numpyro_ebm.datasets", "numpyro_ebm.experiments", "numpyro_ebm.cli",
    "arviz", "arviz_base", "arviz_stats", "arviz_plots", "matplotlib", "flax", "sklearn",
}


def test_core_packages_are_listed():
    assert "kernels/jarzynski_ula" in CORE and "training/trainer" in CORE


def imported_modules(path):
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("module", CORE)
def test_core_module_does_not_import_outer_layers(module):
    names = imported_modules(PACKAGE / f"{module}.py")
    bad = {n for n in names for o in OUTSIDE if n == o or n.startswith(o + ".")}
    assert not bad, f"{module} imports {sorted(bad)}"
