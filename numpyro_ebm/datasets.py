r"""Handwritten-digit data for the imbalanced-digits experiment.

Two sources, one output type (:class:`DigitSubset`):

* :func:`load_digits`: scikit-learn's 8x8 digits (1797 images, about 180 per class); the
  data ship inside the scikit-learn package, so nothing is downloaded.
* :func:`load_mnist`: MNIST 28x28 images from the standard IDX files (``*-idx3-ubyte`` and
  ``*-idx1-ubyte``, gzipped or not) in a directory given by the user.

Both scale the pixel values linearly to :math:`[-1, 1]` (digits: :math:`v / 8 - 1` for
:math:`v \in \{0, \dots, 16\}`; MNIST: :math:`v / 127.5 - 1` for :math:`v \in \{0, \dots, 255\}`)
and draw an imbalanced training subset of the requested classes **exactly** in the requested
integer proportions: with proportions :math:`p_c` and ``num_samples`` :math:`n`, class
:math:`c` contributes :math:`n p_c / \sum_{c'} p_{c'}` images (which must be an integer). The
images of the requested classes that were not drawn are returned beside the subset
(``rest_images``, ``rest_labels``), e.g. to train a digit classifier on images the
energy-based model never sees.
"""

from __future__ import annotations

import dataclasses
import gzip
import math
import os
import zlib
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np

__all__ = ["DigitSubset", "load_digits", "load_mnist", "read_idx", "exact_counts"]

_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_CHUNK = 1 << 20  # bytes per read: memory grows with what the header declares, no faster


@dataclasses.dataclass(frozen=True)
class DigitSubset:
    """An imbalanced subset of digit images and the images left out of it.

    images
        Training subset, shape ``(n, H, W)``, values in :math:`[-1, 1]`, classes in blocks
        in the order of ``classes`` (shuffle before use if order matters).
    labels
        Digit of each image, shape ``(n,)``, ``int32``.
    rest_images, rest_labels
        Every other image of the requested classes (same scaling).
    classes
        The requested digits.
    proportions
        The requested integer proportions (same order as ``classes``).
    counts
        ``{digit: number of images in the subset}``.
    """

    images: np.ndarray
    labels: np.ndarray
    rest_images: np.ndarray
    rest_labels: np.ndarray
    classes: tuple[int, ...]
    proportions: tuple[int, ...]
    counts: dict[int, int]

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.images.shape[1:])

    @property
    def fractions(self) -> np.ndarray:
        """The exact class fractions of the subset, in the order of ``classes``."""
        p = np.asarray(self.proportions, np.float64)
        return p / p.sum()


def _check_classes_proportions(classes: Sequence[int], proportions: Sequence[int]) -> tuple:
    classes = tuple(classes)
    proportions = tuple(proportions)
    if not classes:
        raise ValueError("`classes` must hold at least one digit")
    for c in classes:
        if isinstance(c, bool) or not isinstance(c, int | np.integer) or not 0 <= c <= 9:
            raise ValueError(f"`classes` must be digits 0-9, got {classes!r}")
    if len(set(classes)) != len(classes):
        raise ValueError(f"`classes` must not repeat a digit, got {classes!r}")
    if len(proportions) != len(classes):
        raise ValueError(
            f"`proportions` must have one entry per class ({len(classes)}), got {proportions!r}"
        )
    for p in proportions:
        if isinstance(p, bool) or not isinstance(p, int | np.integer) or p < 1:
            raise ValueError(f"`proportions` must be positive integers, got {proportions!r}")
    return tuple(int(c) for c in classes), tuple(int(p) for p in proportions)


def exact_counts(
    available: Sequence[int], proportions: Sequence[int], num_samples: int | None = None
) -> tuple[int, ...]:
    """Per-class counts exactly in ``proportions``.

    ``num_samples=None``: the largest subset the ``available`` images allow
    (:math:`m p_c` with :math:`m = \\min_c \\lfloor a_c / p_c \\rfloor`); otherwise
    ``num_samples`` must be a multiple of :math:`\\sum_c p_c` that the available images
    allow.
    """
    total = sum(proportions)
    if num_samples is None:
        unit = min(a // p for a, p in zip(available, proportions, strict=True))
        if unit < 1:
            raise ValueError(
                f"not enough images ({list(available)}) for one set in proportions {list(proportions)}"
            )
    else:
        if isinstance(num_samples, bool) or not isinstance(num_samples, int | np.integer) or num_samples < 1:
            raise ValueError(f"`num_samples` must be a positive integer, got {num_samples!r}")
        if num_samples % total:
            raise ValueError(
                f"`num_samples` ({num_samples}) cannot be split exactly in proportions "
                f"{list(proportions)}: it must be a multiple of {total}"
            )
        unit = num_samples // total
    counts = tuple(unit * p for p in proportions)
    for a, n in zip(available, counts, strict=True):
        if n > a:
            raise ValueError(
                f"`num_samples` ({num_samples}) needs {n} images of a class that has only {a}; "
                f"at most {min(x // p for x, p in zip(available, proportions, strict=True)) * total}"
            )
    return counts


def _subset(
    images: np.ndarray,
    labels: np.ndarray,
    classes: tuple[int, ...],
    proportions: tuple[int, ...],
    num_samples: int | None,
    rng_key: jax.Array | None,
) -> DigitSubset:
    key = jax.random.key(0) if rng_key is None else rng_key
    index_per_class = [np.flatnonzero(labels == c) for c in classes]
    counts = exact_counts([len(i) for i in index_per_class], proportions, num_samples)
    chosen, rest = [], []
    for j, (idx, n) in enumerate(zip(index_per_class, counts, strict=True)):
        perm = np.asarray(jax.random.permutation(jax.random.fold_in(key, j), len(idx)))
        chosen.append(idx[perm[:n]])
        rest.append(np.sort(idx[perm[n:]]))
    chosen = np.concatenate(chosen)
    rest = np.concatenate(rest)
    return DigitSubset(
        images=images[chosen],
        labels=labels[chosen].astype(np.int32),
        rest_images=images[rest],
        rest_labels=labels[rest].astype(np.int32),
        classes=classes,
        proportions=proportions,
        counts={c: int(n) for c, n in zip(classes, counts, strict=True)},
    )


def load_digits(
    classes: Sequence[int] = (2, 3, 6),
    proportions: Sequence[int] = (4, 2, 1),
    *,
    num_samples: int | None = None,
    rng_key: jax.Array | None = None,
    dtype=np.float32,
) -> DigitSubset:
    """scikit-learn's 8x8 handwritten digits, scaled to [-1, 1], as an imbalanced subset.

    Parameters
    ----------
    classes
        Digits to keep.
    proportions
        Positive integer proportions of ``classes`` in the subset.
    num_samples
        Size of the subset, a multiple of ``sum(proportions)``; ``None``: the largest the
        data allow (classes 2/3/6 at 4:2:1: 176/88/44 of the 177/183/181 images).
    rng_key
        PRNG key choosing the images (default ``jax.random.key(0)``).
    dtype
        Floating dtype of the images.
    """
    classes, proportions = _check_classes_proportions(classes, proportions)
    try:
        from sklearn.datasets import load_digits as _sk_load_digits
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("`load_digits` needs scikit-learn (pip install scikit-learn)") from err
    bunch = _sk_load_digits()
    images = (np.asarray(bunch.images, np.float64) / 8.0 - 1.0).astype(dtype)
    return _subset(images, np.asarray(bunch.target), classes, proportions, num_samples, rng_key)


def _open_maybe_gzip(path: Path):
    with open(path, "rb") as fh:
        head = fh.read(2)
    return gzip.open(path, "rb") if head == b"\x1f\x8b" else open(path, "rb")


def _read_exactly(fh, size: int, path: Path, what: str) -> bytes:
    """``size`` bytes from ``fh``; ``ValueError`` naming ``path`` if the stream ends first."""
    chunks, got = [], 0
    while got < size:
        chunk = fh.read(min(size - got, _CHUNK))
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    if got < size:
        raise ValueError(f"malformed IDX file {path}: truncated {what} ({got} of {size} bytes)")
    return b"".join(chunks)


def _read_header(fh, path: Path) -> tuple[np.dtype, tuple[int, ...]]:
    """Parse and validate the IDX header: magic ``00 00``, type code, dimensions."""
    magic = _read_exactly(fh, 4, path, "header")
    if magic[0] != 0 or magic[1] != 0:
        raise ValueError(f"malformed IDX file {path}: bad magic number {magic.hex()}")
    code, ndim = magic[2], magic[3]
    if code not in _IDX_DTYPES:
        raise ValueError(f"malformed IDX file {path}: unknown data type code 0x{code:02x}")
    if ndim < 1:
        raise ValueError(f"malformed IDX file {path}: header declares 0 dimensions")
    dims = _read_exactly(fh, 4 * ndim, path, f"header ({ndim} dimensions)")
    return _IDX_DTYPES[code], tuple(int(d) for d in np.frombuffer(dims, ">u4"))


def read_idx(path: str | os.PathLike, *, max_bytes: int = 1 << 31) -> np.ndarray:
    """Read one IDX file (gzipped or not; detected from its first bytes) into an array.

    The header (magic number, type code, dimensions :math:`d_1, \\dots, d_k`) is read
    from the stream first; then exactly :math:`\\prod_j d_j` items of the declared type
    are read, and one more byte to check that the data end there. A gzip file is thus
    decompressed only as far as its header says, never beyond (a small gzip file cannot
    make the reader decompress more than that).

    Parameters
    ----------
    path
        The file.
    max_bytes
        Largest data size the header may declare (default 2 GiB; MNIST's training images
        take 47 MB).

    Raises
    ------
    FileNotFoundError
        When ``path`` does not exist.
    ValueError
        Naming the file, when its header is malformed or declares more than ``max_bytes``,
        or when the data are shorter or longer than the header's dimensions give.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"IDX file not found: {path}")
    try:
        with _open_maybe_gzip(path) as fh:
            dtype, shape = _read_header(fh, path)
            expected = math.prod(shape) * dtype.itemsize
            if expected > max_bytes:
                raise ValueError(
                    f"IDX file {path}: header declares shape {shape} ({expected} bytes of "
                    f"data), more than `max_bytes` ({max_bytes})"
                )
            raw = _read_exactly(fh, expected, path, f"data: header says shape {shape}")
            if fh.read(1):
                raise ValueError(
                    f"malformed IDX file {path}: header says shape {shape} ({expected} bytes "
                    "of data), the file holds more"
                )
    except (OSError, EOFError, zlib.error) as err:  # gzip.BadGzipFile is an OSError
        raise ValueError(f"cannot read IDX file {path}: {err}") from err
    return np.frombuffer(raw, dtype).reshape(shape).astype(dtype.newbyteorder("="))


def _find_idx(directory: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (directory / name).is_file():
            return directory / name
    raise FileNotFoundError(f"MNIST file {stem} (or {stem}.gz) not found in {directory}")


def load_mnist(
    path: str | os.PathLike,
    classes: Sequence[int] = (2, 3, 6),
    proportions: Sequence[int] = (4, 2, 1),
    *,
    split: str = "train",
    num_samples: int | None = None,
    rng_key: jax.Array | None = None,
    dtype=np.float32,
) -> DigitSubset:
    """MNIST from the standard IDX files in directory ``path``, scaled to [-1, 1].

    ``split="train"`` reads ``train-images-idx3-ubyte[.gz]`` and
    ``train-labels-idx1-ubyte[.gz]``; ``split="test"`` the ``t10k-`` files. The other
    arguments are as in :func:`load_digits`. Raises ``FileNotFoundError`` naming a missing
    directory or file and ``ValueError`` naming a malformed one.
    """
    if split not in ("train", "test"):
        raise ValueError(f"`split` must be 'train' or 'test', got {split!r}")
    classes, proportions = _check_classes_proportions(classes, proportions)
    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"MNIST directory not found: {directory}")
    prefix = "train" if split == "train" else "t10k"
    images_file = _find_idx(directory, f"{prefix}-images-idx3-ubyte")
    labels_file = _find_idx(directory, f"{prefix}-labels-idx1-ubyte")
    images = read_idx(images_file)
    labels = read_idx(labels_file)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(
            f"malformed MNIST images file {images_file}: expected uint8 of shape (n, rows, cols), "
            f"got {images.dtype} {images.shape}"
        )
    if labels.ndim != 1 or labels.dtype != np.uint8:
        raise ValueError(
            f"malformed MNIST labels file {labels_file}: expected uint8 of shape (n,), "
            f"got {labels.dtype} {labels.shape}"
        )
    if len(labels) != len(images):
        raise ValueError(
            f"MNIST files disagree: {images_file} holds {len(images)} images, "
            f"{labels_file} holds {len(labels)} labels"
        )
    if labels.size and labels.max() > 9:
        raise ValueError(f"malformed MNIST labels file {labels_file}: label {int(labels.max())} > 9")
    scaled = (images.astype(np.float64) / 127.5 - 1.0).astype(dtype)
    return _subset(scaled, labels.astype(np.int64), classes, proportions, num_samples, rng_key)
