"""pyproject.toml metadata: an SPDX license expression (PEP 639) and a backend that reads it."""

import re
import tomllib
from pathlib import Path

PYPROJECT = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())


def test_license_is_an_spdx_expression():
    license_ = PYPROJECT["project"]["license"]
    # PEP 639: a plain SPDX string; the table form `{ text = ... }` is deprecated
    assert license_ == "Apache-2.0"
    try:
        from packaging.licenses import canonicalize_license_expression
    except ImportError:  # packaging < 24.2
        return
    assert canonicalize_license_expression(license_) == "Apache-2.0"


def test_build_backend_understands_spdx_license():
    """setuptools reads a string `license` (PEP 639) from version 77 on."""
    requires = PYPROJECT["build-system"]["requires"]
    setuptools = [r for r in requires if re.match(r"setuptools\b", r)]
    assert len(setuptools) == 1
    match = re.fullmatch(r"setuptools\s*>=\s*(\d+)(?:\.\d+)*", setuptools[0])
    assert match and int(match.group(1)) >= 77, setuptools[0]
