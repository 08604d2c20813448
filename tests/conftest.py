"""Shared fixtures: run a test in float32 and float64.

The tests are dominated by XLA compilation (every `fit` compiles its own loop), so they
ask LLVM for its cheapest code generation (`--xla_backend_optimization_level=0`): about a
third less wall time, the same semantics. Set before JAX starts its CPU backend, and
inherited by the subprocesses of the example and sharding tests.
"""

import os

_FAST_COMPILE = "--xla_backend_optimization_level=0"
if _FAST_COMPILE not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FAST_COMPILE).strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import pytest  # noqa: E402


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
