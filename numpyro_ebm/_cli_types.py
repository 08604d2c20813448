"""argparse ``type`` functions of the command line (:mod:`numpyro_ebm.cli`): each turns a
string into a checked value or raises ``argparse.ArgumentTypeError`` naming what it wants."""

from __future__ import annotations

import argparse
import math


def _int_at_least(minimum: int, maximum: int | None = None):
    """An argparse ``type``: an integer in ``[minimum, maximum]`` (argparse names the option)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"must be an integer <= {maximum}, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1)
_nonnegative_int = _int_at_least(0)
_seed = _int_at_least(-(2**63), 2**63 - 1)  # what jax.random.key takes


def _positive_int_or_none(text: str) -> int | None:
    """An argparse ``type``: an integer >= 1, or ``none``."""
    return None if text.lower() == "none" else _positive_int(text)


def _finite_float(text: str, *, allow_zero: bool) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        kind = "finite number >= 0" if allow_zero else "finite number > 0"
        raise argparse.ArgumentTypeError(f"must be a {kind}, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    """An argparse ``type``: a finite number > 0 (``inf`` and ``nan`` are rejected)."""
    return _finite_float(text, allow_zero=False)


def _nonnegative_float(text: str) -> float:
    """An argparse ``type``: a finite number >= 0."""
    return _finite_float(text, allow_zero=True)


def _classes(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"must be a comma list of integers, got {text!r}") from err
    if not values:
        raise argparse.ArgumentTypeError(f"must be a comma list of integers, got {text!r}")
    return values


def _acceptance_or_none(text: str):
    if text.lower() == "none":
        return None
    value = float(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must lie in (0, 1) or be 'none', got {text}")
    return value
