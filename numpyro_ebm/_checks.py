"""Input validation shared by the public functions.

Every check names the argument it rejects. Checks on values only run on concrete
(non-traced) inputs, so the public functions stay usable inside ``jit``: under a trace
the shape checks still run, the value checks are skipped.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np


def is_concrete(x: Any) -> bool:
    """True when no leaf of ``x`` is a JAX tracer."""
    return not any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(x))


def check_positive(name: str, value: Any) -> None:
    """``value`` must be a finite number > 0 (skipped for traced values)."""
    if value is None:
        raise ValueError(f"`{name}` must be a positive number, got None")
    if not is_concrete(value):
        return
    arr = np.asarray(value)
    if arr.size != 1:
        raise ValueError(f"`{name}` must be a scalar, got shape {arr.shape}")
    v = float(arr)
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"`{name}` must be a finite number > 0, got {v}")


def check_int_at_least(name: str, value: Any, minimum: int) -> int:
    """``value`` must be an integer >= ``minimum``; returns it as ``int``."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"`{name}` must be an integer, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, got {value}")
    return int(value)


def check_fraction(name: str, value: Any, *, closed_right: bool = True) -> None:
    """``value`` must lie in (0, 1] (or (0, 1) when ``closed_right`` is False)."""
    if not is_concrete(value):
        return
    v = float(np.asarray(value))
    ok = 0.0 < v <= 1.0 if closed_right else 0.0 < v < 1.0
    if not ok:
        interval = "(0, 1]" if closed_right else "(0, 1)"
        raise ValueError(f"`{name}` must lie in {interval}, got {v}")


def check_finite_tree(name: str, tree: Any) -> None:
    """Every leaf of ``tree`` must be a finite floating array (skipped when traced)."""
    leaves = jax.tree.leaves(tree)
    if not leaves:
        raise ValueError(f"`{name}` is empty")
    if not is_concrete(tree):
        return
    for leaf in leaves:
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            _check_finite_global(name, leaf)  # spread over processes: reduce, don't fetch
            continue
        arr = np.asarray(leaf)
        if arr.dtype.kind not in "fc":
            raise TypeError(f"`{name}` must hold floating-point arrays, got dtype {arr.dtype}")
        if arr.size and not np.all(np.isfinite(arr)):
            bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
            raise ValueError(f"`{name}` contains {bad} non-finite value(s) (NaN or inf)")


def _check_finite_global(name: str, leaf: jax.Array) -> None:
    """:func:`check_finite_tree` for one array spread over several processes: the count of
    non-finite values is a global reduction (every process gets it)."""
    if leaf.dtype.kind not in "fc":
        raise TypeError(f"`{name}` must hold floating-point arrays, got dtype {leaf.dtype}")
    bad = int(jax.jit(lambda x: jax.numpy.sum(~jax.numpy.isfinite(x)))(leaf))
    if bad:
        raise ValueError(f"`{name}` contains {bad} non-finite value(s) (NaN or inf)")


def leading_size(name: str, tree: Any) -> int:
    """The common leading-axis size of the leaves of ``tree``."""
    leaves = jax.tree.leaves(tree)
    if not leaves:
        raise ValueError(f"`{name}` is empty")
    sizes = {np.shape(leaf)[0] if np.ndim(leaf) else None for leaf in leaves}
    if None in sizes:
        raise ValueError(f"`{name}` needs a leading (sample) axis on every leaf")
    if len(sizes) != 1:
        raise ValueError(f"`{name}` leaves disagree on the leading axis: sizes {sorted(sizes)}")
    (size,) = sizes
    if size == 0:
        raise ValueError(f"`{name}` is empty (leading axis of size 0)")
    return int(size)


def check_same_event_shape(name_a: str, a: Any, name_b: str, b: Any) -> None:
    """Per-sample shapes (all axes but the leading one) of ``a`` and ``b`` must agree."""
    sa = jax.tree.structure(a)
    sb = jax.tree.structure(b)
    if sa != sb:
        raise ValueError(f"`{name_a}` and `{name_b}` have different structures: {sa} vs {sb}")
    for la, lb in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        if np.shape(la)[1:] != np.shape(lb)[1:]:
            raise ValueError(
                f"`{name_a}` and `{name_b}` disagree on the per-sample shape: "
                f"{np.shape(la)[1:]} vs {np.shape(lb)[1:]}"
            )


def check_scalar_potential(potential_fn: Any, params: Any, sample: Any) -> None:
    """``potential_fn(params, x)`` must return one real scalar for one sample ``x``."""
    if not callable(potential_fn):
        raise TypeError(f"`potential_fn` must be callable, got {type(potential_fn).__name__}")
    try:
        out = jax.eval_shape(potential_fn, params, sample)
    except (IndexError, TypeError, ValueError) as err:
        shapes = [np.shape(leaf) for leaf in jax.tree.leaves(sample)]
        raise ValueError(
            "`potential_fn(params, x)` failed on ONE sample x of shape "
            f"{shapes[0] if len(shapes) == 1 else shapes} ({type(err).__name__}: {err}). It must "
            "compute the energy of a single sample (the library vmaps it over walkers and data); "
            "an energy written for a batch (x[:, ...], axis=1) fails here."
        ) from err
    if not hasattr(out, "shape") or out.shape != ():
        shape = getattr(out, "shape", type(out).__name__)
        raise ValueError(
            "`potential_fn(params, x)` must return a scalar energy for ONE sample x "
            f"(the library vmaps it over walkers), got {shape}"
        )


def check_float_dtype(name: str, value: Any) -> Any:
    """``value`` as a NumPy floating dtype, or a ``ValueError`` naming ``name``."""
    try:
        dtype = np.dtype(value)
    except TypeError:
        dtype = None
    if dtype is None or not np.issubdtype(dtype, np.floating):
        raise ValueError(f"`{name}` must be a floating dtype such as jnp.float32, got {value!r}")
    return dtype


def check_key(name: str, key: Any) -> None:
    """``key`` must be a JAX PRNG key (``jax.random.key(seed)``, or a legacy uint32 key of
    shape ``(2,)``)."""
    dtype = getattr(key, "dtype", None)
    if dtype is not None and jax.numpy.issubdtype(dtype, jax.dtypes.prng_key):
        return
    if dtype is not None and np.dtype(dtype) == np.uint32 and np.shape(key)[-1:] == (2,):
        return
    raise TypeError(f"`{name}` must be a JAX PRNG key such as jax.random.key(0), got "
                    f"{type(key).__name__}{'' if dtype is None else f' of dtype {dtype}'}")


def check_same_float_dtype(potential_fn: Any, params: Any, name: str, samples: Any) -> None:
    """The floating leaves of ``samples`` must have the dtype of the energy
    ``potential_fn(params, x)``: otherwise a ULA move would change the walkers' dtype."""
    sample = jax.tree.map(lambda leaf: leaf[0], samples)
    energy_dtype = jax.eval_shape(potential_fn, params, sample).dtype
    for leaf in jax.tree.leaves(samples):
        dtype = np.dtype(leaf.dtype) if hasattr(leaf, "dtype") else np.asarray(leaf).dtype
        if np.issubdtype(dtype, np.floating) and dtype != energy_dtype:
            raise TypeError(
                f"`{name}` is {dtype} but the energy is {energy_dtype} (the params' dtype): cast "
                f"one of them so that both are {energy_dtype} or both {dtype} (`fit` casts the "
                "data and walkers to the energy's dtype)"
            )
