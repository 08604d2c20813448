"""Imports of optional dependencies, with an error that names the extra to install."""

from __future__ import annotations

import importlib
from types import ModuleType

EXTRAS = {
    "flax": "flax",
    "orbax.checkpoint": "checkpoint",
    "matplotlib": "plots",
    "sklearn": "experiments",
    "tqdm": "progress",
    "tqdm.auto": "progress",
    "h5netcdf": "diagnostics",
}


def require(module: str, purpose: str) -> ModuleType:
    """``importlib.import_module(module)``, or an ``ImportError`` saying which extra of
    numpyro-ebm brings it (``pip install 'numpyro-ebm[extra]'``)."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        extra = EXTRAS.get(module.split(".")[0] if module not in EXTRAS else module, "all")
        raise ImportError(
            f"{purpose} needs `{module}`, which is not installed: pip install "
            f"'numpyro-ebm[{extra}]' (or 'numpyro-ebm[all]')"
        ) from err
