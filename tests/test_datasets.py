"""Digit loaders: IDX files written here (gzipped and raw), exact proportions, scaling, errors."""

import gzip
import struct
import tracemalloc
from pathlib import Path

import jax
import numpy as np
import pytest

from numpyro_ebm import datasets

MNIST_DIR = Path(__file__).parents[1].parent / "shared/data/mnist"


def _idx_bytes(array: np.ndarray) -> bytes:
    array = np.ascontiguousarray(array, np.uint8)
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.tobytes()


def _write_mnist(directory: Path, images: np.ndarray, labels: np.ndarray, prefix: str, gz: bool) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for stem, arr in ((f"{prefix}-images-idx3-ubyte", images), (f"{prefix}-labels-idx1-ubyte", labels)):
        raw = _idx_bytes(arr)
        if gz:
            (directory / (stem + ".gz")).write_bytes(gzip.compress(raw))
        else:
            (directory / stem).write_bytes(raw)


def _fake_mnist(num_per_class=(30, 25, 12), classes=(2, 3, 6), seed=0):
    rng = np.random.default_rng(seed)
    labels = np.concatenate([np.full(n, c) for c, n in zip(classes, num_per_class, strict=True)])
    labels = np.concatenate([labels, np.full(7, 9)])  # a class not asked for
    rng.shuffle(labels)
    # pixel value encodes the label so the tests can check images stay with their labels
    images = rng.integers(0, 256, size=(len(labels), 5, 4)).astype(np.uint8)
    images[:, 0, 0] = labels * 20
    return images, labels.astype(np.uint8)


@pytest.mark.parametrize("gz", [True, False], ids=["gzip", "raw"])
@pytest.mark.parametrize("split", ["train", "test"])
def test_read_idx_and_load_mnist_round_trip(tmp_path, gz, split):
    images, labels = _fake_mnist()
    _write_mnist(tmp_path, images, labels, "train" if split == "train" else "t10k", gz)
    stem = ("train" if split == "train" else "t10k") + "-images-idx3-ubyte" + (".gz" if gz else "")
    np.testing.assert_array_equal(datasets.read_idx(tmp_path / stem), images)
    subset = datasets.load_mnist(tmp_path, (2, 3, 6), (4, 2, 1), split=split, num_samples=42)
    assert subset.counts == {2: 24, 3: 12, 6: 6}
    assert subset.images.shape == (42, 5, 4) and subset.images.dtype == np.float32
    assert np.bincount(subset.labels, minlength=10)[[2, 3, 6]].tolist() == [24, 12, 6]
    # the rest: every other image of the requested classes, none of digit 9
    assert np.bincount(subset.rest_labels, minlength=10)[[2, 3, 6, 9]].tolist() == [6, 13, 6, 0]
    # scaling v / 127.5 - 1 and labels kept with their images
    np.testing.assert_allclose(subset.images[:, 0, 0], subset.labels * 20 / 127.5 - 1, atol=1e-6)
    np.testing.assert_allclose(subset.rest_images[:, 0, 0], subset.rest_labels * 20 / 127.5 - 1, atol=1e-6)
    assert subset.images.min() >= -1 and subset.images.max() <= 1
    # no image both in the subset and in the rest
    both = np.concatenate([subset.images, subset.rest_images]).reshape(67, -1)
    assert len(np.unique(both, axis=0)) == 67


def test_load_mnist_largest_exact_subset_and_seeds(tmp_path):
    images, labels = _fake_mnist(num_per_class=(30, 25, 12))
    _write_mnist(tmp_path, images, labels, "train", gz=True)
    # 4:2:1 from 30/25/12: unit = min(7, 12, 12) = 7 -> 28/14/7
    subset = datasets.load_mnist(tmp_path, rng_key=jax.random.key(1))
    assert subset.counts == {2: 28, 3: 14, 6: 7}
    np.testing.assert_allclose(subset.fractions, [4 / 7, 2 / 7, 1 / 7])
    same = datasets.load_mnist(tmp_path, rng_key=jax.random.key(1))
    other = datasets.load_mnist(tmp_path, rng_key=jax.random.key(2))
    np.testing.assert_array_equal(subset.images, same.images)
    assert not np.array_equal(subset.images, other.images)


def test_load_digits_proportions_counts_and_scaling():
    subset = datasets.load_digits((2, 3, 6), (4, 2, 1))
    # scikit-learn digits: 177/183/181 images of 2/3/6 -> largest exact 4:2:1 subset 176/88/44
    assert subset.counts == {2: 176, 3: 88, 6: 44}
    assert np.bincount(subset.rest_labels, minlength=10)[[2, 3, 6]].tolist() == [1, 95, 137]
    assert subset.images.shape == (308, 8, 8)
    # values v/8 - 1 with v in 0..16: exactly the 17 levels -1, -7/8, ..., 1, both ends used
    levels = np.unique(subset.images)
    assert levels.min() == -1.0 and levels.max() == 1.0
    np.testing.assert_allclose((levels + 1) * 8, np.round((levels + 1) * 8), atol=1e-5)
    small = datasets.load_digits((0, 1), (1, 3), num_samples=100, rng_key=jax.random.key(3))
    assert small.counts == {0: 25, 1: 75}
    assert small.labels.tolist() == [0] * 25 + [1] * 75


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(classes=(2, 3), proportions=(1,)), "proportions"),
        (dict(classes=(2, 2), proportions=(1, 1)), "classes"),
        (dict(classes=(2, 11), proportions=(1, 1)), "classes"),
        (dict(classes=(2, 3), proportions=(1, 0)), "proportions"),
        (dict(classes=(2, 3), proportions=(1.5, 1)), "proportions"),
        (dict(num_samples=100), "multiple of 7"),
        (dict(num_samples=700), "at most 308"),
    ],
)
def test_load_digits_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        datasets.load_digits(**kwargs)


def test_load_mnist_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        datasets.load_mnist(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="split"):
        datasets.load_mnist(tmp_path, split="valid")
    images, labels = _fake_mnist()
    _write_mnist(tmp_path, images, labels, "train", gz=False)
    (tmp_path / "train-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match="train-labels-idx1-ubyte"):
        datasets.load_mnist(tmp_path)
    # truncated body
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx_bytes(labels)[:-3])
    with pytest.raises(ValueError, match="train-labels-idx1-ubyte.*malformed|malformed.*train-labels"):
        datasets.load_mnist(tmp_path)
    # bad magic number
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(b"\x12\x34" + _idx_bytes(labels)[2:])
    with pytest.raises(ValueError, match="magic"):
        datasets.load_mnist(tmp_path)
    # labels and images disagree in length
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx_bytes(labels[:-1]))
    with pytest.raises(ValueError, match="disagree"):
        datasets.load_mnist(tmp_path)
    # a corrupt gzip file
    (tmp_path / "train-labels-idx1-ubyte").unlink()
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8b" + b"garbage")
    with pytest.raises(ValueError, match="train-labels-idx1-ubyte.gz"):
        datasets.load_mnist(tmp_path)
    with pytest.raises(FileNotFoundError, match="t10k-images"):
        datasets.load_mnist(tmp_path, split="test")


def test_load_mnist_shared_test_set():
    if not MNIST_DIR.is_dir():
        pytest.skip(f"MNIST test set not found at {MNIST_DIR}")
    subset = datasets.load_mnist(MNIST_DIR, split="test", num_samples=1400)
    assert subset.counts == {2: 800, 3: 400, 6: 200}
    assert subset.images.shape == (1400, 28, 28)
    # the MNIST test set holds 1032/1010/958 images of 2/3/6
    assert np.bincount(subset.rest_labels, minlength=10)[[2, 3, 6]].tolist() == [232, 610, 758]
    assert subset.images.min() == -1.0 and subset.images.max() == 1.0


def _idx_header(shape, code=0x08) -> bytes:
    return struct.pack(">BBBB", 0, 0, code, len(shape)) + struct.pack(f">{len(shape)}I", *shape)


def test_read_idx_gzip_bomb_is_not_decompressed(tmp_path):
    """A small gzip whose header declares 10 bytes but whose payload is 64 MB of zeros:
    the reader stops after the declared size (+1 byte), so it neither decompresses the
    payload nor allocates it, and names the file."""
    payload = 64 << 20
    bomb = tmp_path / "bomb-idx1-ubyte.gz"
    with gzip.open(bomb, "wb", compresslevel=9) as fh:
        fh.write(_idx_header((10,)))
        zeros = bytes(1 << 20)
        for _ in range(payload >> 20):
            fh.write(zeros)
    assert bomb.stat().st_size < 200_000
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=r"bomb-idx1-ubyte\.gz.*holds more"):
            datasets.read_idx(bomb)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, f"peak allocation {peak / 2**20:.1f} MB while reading the header"


def test_read_idx_truncated_and_oversized_headers(tmp_path):
    data = np.arange(60, dtype=np.uint8)
    # header claims (10, 10) = 100 bytes, the stream holds 60: gzipped and raw
    short = _idx_header((10, 10)) + data.tobytes()
    (tmp_path / "short-idx2-ubyte.gz").write_bytes(gzip.compress(short))
    (tmp_path / "short-idx2-ubyte").write_bytes(short)
    for name in ("short-idx2-ubyte.gz", "short-idx2-ubyte"):
        with pytest.raises(ValueError, match=rf"{name}.*truncated data.*60 of 100 bytes"):
            datasets.read_idx(tmp_path / name)
    # a gzip stream cut in the middle (no end-of-stream marker)
    cut = gzip.compress(_idx_header((6, 10)) + np.random.default_rng(0).bytes(60))[:-12]
    (tmp_path / "cut-idx2-ubyte.gz").write_bytes(cut)
    with pytest.raises(ValueError, match=r"cut-idx2-ubyte\.gz"):
        datasets.read_idx(tmp_path / "cut-idx2-ubyte.gz")
    # the header itself cut short
    (tmp_path / "head-idx3-ubyte.gz").write_bytes(gzip.compress(_idx_header((2, 3, 4))[:9]))
    with pytest.raises(ValueError, match=r"head-idx3-ubyte\.gz.*truncated header"):
        datasets.read_idx(tmp_path / "head-idx3-ubyte.gz")
    # a header declaring more than max_bytes is rejected before any data is read
    (tmp_path / "big-idx2-ubyte").write_bytes(_idx_header((1000, 1000)) + bytes(10))
    with pytest.raises(ValueError, match=r"big-idx2-ubyte.*`max_bytes`"):
        datasets.read_idx(tmp_path / "big-idx2-ubyte", max_bytes=10_000)
    # exact files still read, the big-endian types included
    exact = _idx_header((6, 10)) + data.tobytes()
    (tmp_path / "ok-idx2-ubyte.gz").write_bytes(gzip.compress(exact))
    np.testing.assert_array_equal(datasets.read_idx(tmp_path / "ok-idx2-ubyte.gz"), data.reshape(6, 10))
    floats = np.linspace(-1, 1, 6).astype(">f4")
    (tmp_path / "f-idx1").write_bytes(_idx_header((6,), code=0x0D) + floats.tobytes())
    np.testing.assert_array_equal(datasets.read_idx(tmp_path / "f-idx1"), floats.astype(np.float32))
