"""Shared fixtures: run a test in float32 and float64."""

import jax
import jax.numpy as jnp
import pytest


@pytest.fixture(params=["float32", "float64"])
def dtype(request):
    """The floating dtype under test; float64 switches on ``jax_enable_x64`` for the test."""
    if request.param == "float64":
        with jax.enable_x64(True):
            yield jnp.float64
    else:
        with jax.enable_x64(False):
            yield jnp.float32


@pytest.fixture
def x64():
    """Run the test with 64-bit floats (exact identities are checked to 1e-10)."""
    with jax.enable_x64(True):
        yield
