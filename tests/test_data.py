"""Tests for jaxpurify.data against the real MNIST / CIFAR-10 files.

The real data is read through $JAXPURIFY_DATA_DIR (CI sets it). When it is unset, the
tests fall back to ``<repo>/../shared/data`` if that folder exists, else they skip. Small
synthetic files are written to tmp_path only to exercise the error and format paths.
"""

from __future__ import annotations

import gzip
import os
import pickle
import sys
import types
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxpurify.data import (
    DATA_DIR_ENV,
    DataCorruptError,
    DataNotFoundError,
    Dataset,
    batches,
    load_cifar10,
    load_mnist,
    resolve_data_dir,
)

_SIBLING_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def _real_data_dir() -> Path | None:
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return Path(env)
    if _SIBLING_DATA.is_dir():
        return _SIBLING_DATA
    return None


@pytest.fixture(scope="module")
def data_dir():
    """The real data folder, exported as $JAXPURIFY_DATA_DIR for this module's tests."""
    path = _real_data_dir()
    if path is None:
        pytest.skip(
            f"real datasets not available: set {DATA_DIR_ENV} to the shared data folder "
            f"(no {_SIBLING_DATA} either)"
        )
    if not path.is_dir():  # set explicitly but wrong: fail loudly rather than skip
        pytest.fail(f"{DATA_DIR_ENV}={path} is not a directory")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(DATA_DIR_ENV, str(path))
        yield path


@pytest.fixture(scope="module")
def mnist_u8(data_dir) -> Dataset:
    return load_mnist(source="files", dtype="uint8")


@pytest.fixture(scope="module")
def cifar_u8(data_dir) -> Dataset:
    return load_cifar10(source="files", dtype="uint8")


@pytest.fixture(scope="module")
def cifar_f32(cifar_u8) -> Dataset:  # decoded once (cache); only the float conversion here
    return load_cifar10(source="files", dtype="float32")


@pytest.fixture
def no_tfds(monkeypatch):
    """Make `import tensorflow_datasets` fail, whether or not it is installed."""
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)


# --------------------------------------------------------------------------- helpers for
# synthetic files (error / format paths only)


def _idx_bytes(arr: np.ndarray, magic: int | None = None) -> bytes:
    arr = np.asarray(arr, dtype=np.uint8)
    if magic is None:
        magic = 2048 + arr.ndim
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return header + arr.tobytes()


def _write_mnist(root: Path, n_train=5, n_test=3, *, gz=True) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    d = root / "mnist"
    d.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test),
    }
    paths = {}
    for stem, a in arrays.items():
        raw = _idx_bytes(a)
        p = d / (stem + ".gz" if gz else stem)
        p.write_bytes(gzip.compress(raw) if gz else raw)
        paths[stem] = p
    return paths


def _channel_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean/std of an NHWC array, float64-accurate, in chunks (low memory)."""
    flat = x.reshape(-1, x.shape[-1])
    s1 = np.zeros(flat.shape[1])
    s2 = np.zeros(flat.shape[1])
    for i in range(0, len(flat), 1 << 20):
        c = flat[i : i + (1 << 20)].astype(np.float64)
        s1 += c.sum(axis=0)
        s2 += (c * c).sum(axis=0)
    mean = s1 / len(flat)
    return mean, np.sqrt(s2 / len(flat) - mean**2)


# --------------------------------------------------------------------------- data dir


def test_resolve_data_dir_argument_and_env(tmp_path, monkeypatch):
    assert resolve_data_dir(tmp_path) == tmp_path
    assert resolve_data_dir(str(tmp_path)) == tmp_path
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    assert resolve_data_dir() == tmp_path
    other = tmp_path / "other"
    other.mkdir()
    assert resolve_data_dir(other) == other  # the argument wins over the env var


def test_resolve_data_dir_unset_message(no_env):
    with pytest.raises(DataNotFoundError) as ei:
        resolve_data_dir()
    msg = str(ei.value)
    assert DATA_DIR_ENV in msg
    assert 'source="tfds"' in msg
    assert isinstance(ei.value, FileNotFoundError)


def test_resolve_data_dir_nonexistent(tmp_path, monkeypatch):
    missing = tmp_path / "nope"
    monkeypatch.setenv(DATA_DIR_ENV, str(missing))
    with pytest.raises(DataNotFoundError, match="does not exist") as ei:
        resolve_data_dir()
    assert str(missing) in str(ei.value)
    assert DATA_DIR_ENV in str(ei.value)


# --------------------------------------------------------------------------- MNIST (real)


def test_mnist_shapes_dtypes_counts(mnist_u8):
    d = mnist_u8
    assert d.name == "mnist" and d.num_classes == 10
    assert d.x_train.shape == (60000, 28, 28, 1) and d.x_train.dtype == np.uint8
    assert d.x_test.shape == (10000, 28, 28, 1) and d.x_test.dtype == np.uint8
    assert d.y_train.shape == (60000,) and d.y_train.dtype == np.int32
    assert d.y_test.shape == (10000,) and d.y_test.dtype == np.int32
    assert np.bincount(d.y_train, minlength=10).tolist() == MNIST_TRAIN_COUNTS
    assert np.bincount(d.y_test, minlength=10).tolist() == MNIST_TEST_COUNTS
    assert d.x_train.max() == 255 and d.x_train.min() == 0


def test_mnist_normalized_stats(data_dir):
    d = load_mnist(source="files")  # default: float32, normalized
    assert d.x_train.dtype == np.float32 and d.x_test.dtype == np.float32
    mean, std = _channel_stats(d.x_train)
    np.testing.assert_allclose(mean, 0.0, atol=1e-3)  # published 0.1307/0.3081 are rounded
    np.testing.assert_allclose(std, 1.0, atol=1e-3)
    assert d.x_train.flags.writeable  # float outputs are fresh arrays


def test_mnist_unnormalized_float64(mnist_u8):
    d = load_mnist(source="files", dtype="float64", normalize=False, limit_train=1000)
    assert d.x_train.dtype == np.float64
    assert 0.0 <= d.x_train.min() and d.x_train.max() <= 1.0
    np.testing.assert_array_equal(d.x_train * 255.0, mnist_u8.x_train[:1000].astype(np.float64))


def test_mnist_limit_takes_first_n(mnist_u8):
    d = load_mnist(source="files", dtype="uint8", limit_train=123, limit_test=7)
    assert d.x_train.shape == (123, 28, 28, 1) and d.y_train.shape == (123,)
    assert d.x_test.shape == (7, 28, 28, 1) and d.y_test.shape == (7,)
    np.testing.assert_array_equal(d.x_train, mnist_u8.x_train[:123])
    np.testing.assert_array_equal(d.y_test, mnist_u8.y_test[:7])
    empty = load_mnist(source="files", dtype="uint8", limit_train=0)
    assert empty.x_train.shape == (0, 28, 28, 1)


def test_mnist_cached_and_read_only(mnist_u8):
    # compare two back-to-back loads (the fixture's arrays may have been evicted by the
    # synthetic-file tests, depending on test order / xdist scheduling)
    first = load_mnist(source="files", dtype="uint8")
    again = load_mnist(source="files", dtype="uint8")
    assert np.shares_memory(again.x_train, first.x_train)  # served from the cache
    np.testing.assert_array_equal(again.y_train, mnist_u8.y_train)
    assert not again.x_train.flags.writeable
    with pytest.raises(ValueError):
        again.x_train[0, 0, 0, 0] = 1


def test_auto_uses_files_when_dir_set(mnist_u8, data_dir):
    files = load_mnist(source="files", dtype="uint8")
    d = load_mnist(dtype="uint8")  # source="auto", dir from the env var
    assert np.shares_memory(d.x_train, files.x_train)
    d2 = load_mnist(data_dir, dtype="uint8", limit_train=10)  # explicit argument
    np.testing.assert_array_equal(d2.x_train, mnist_u8.x_train[:10])


# --------------------------------------------------------------------------- CIFAR (real)


def test_cifar_shapes_dtypes_labels(cifar_u8):
    d = cifar_u8
    assert d.name == "cifar10" and d.num_classes == 10
    assert d.x_train.shape == (50000, 32, 32, 3) and d.x_train.dtype == np.uint8
    assert d.x_test.shape == (10000, 32, 32, 3) and d.x_test.dtype == np.uint8
    assert d.y_train.dtype == np.int32 and d.y_test.dtype == np.int32
    assert d.y_train[:10].tolist() == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]
    assert d.y_test[:10].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]
    assert np.bincount(d.y_train, minlength=10).tolist() == [5000] * 10
    assert np.bincount(d.y_test, minlength=10).tolist() == [1000] * 10


def test_cifar_normalized_stats(cifar_f32):
    x = cifar_f32.x_train
    assert x.dtype == np.float32 and x.shape == (50000, 32, 32, 3)
    mean, std = _channel_stats(x)
    np.testing.assert_allclose(mean, 0.0, atol=1e-4)
    np.testing.assert_allclose(std, 1.0, atol=1e-4)


def test_cifar_limit_and_cache(cifar_u8, cifar_f32):
    d = load_cifar10(source="files", dtype="uint8", limit_train=10, limit_test=5)
    assert d.x_train.shape == (10, 32, 32, 3) and d.x_test.shape == (5, 32, 32, 3)
    # no second decode (nothing else in this module decodes an npz successfully)
    assert np.shares_memory(d.x_train, cifar_u8.x_train)
    f = load_cifar10(source="files", dtype="float32", limit_train=10)
    np.testing.assert_allclose(f.x_train, cifar_f32.x_train[:10], rtol=1e-6)


# --------------------------------------------------------------------------- missing files


def test_mnist_missing_files_message(tmp_path):
    with pytest.raises(DataNotFoundError) as ei:
        load_mnist(tmp_path, source="files")
    msg = str(ei.value)
    assert str(tmp_path / "mnist" / "train-images-idx3-ubyte.gz") in msg
    assert str(tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz") in msg
    assert DATA_DIR_ENV in msg


def test_mnist_one_missing_file_named(tmp_path):
    paths = _write_mnist(tmp_path)
    paths["t10k-labels-idx1-ubyte"].unlink()
    with pytest.raises(DataNotFoundError) as ei:
        load_mnist(tmp_path, source="files")
    msg = str(ei.value)
    assert str(paths["t10k-labels-idx1-ubyte"]) in msg
    assert "train-images-idx3-ubyte.gz  (" not in msg  # present files are not listed


def test_cifar_missing_message(tmp_path):
    with pytest.raises(DataNotFoundError) as ei:
        load_cifar10(tmp_path, source="files")
    msg = str(ei.value)
    assert str(tmp_path / "cifar10" / "cifar10.npz") in msg
    assert "cifar-10-batches-py" in msg and DATA_DIR_ENV in msg


def test_files_mode_unset_dir(no_env):
    with pytest.raises(DataNotFoundError, match=DATA_DIR_ENV):
        load_mnist(source="files")


# --------------------------------------------------------------------------- format paths
# (synthetic files, to check the parsers; never used as a stand-in for the real data)


def test_mnist_synthetic_gz_and_uncompressed_names(tmp_path):
    for gz, sub in ((True, "a"), (False, "b")):
        root = tmp_path / sub
        _write_mnist(root, n_train=5, n_test=3, gz=gz)
        d = load_mnist(root, source="files", dtype="uint8")
        assert d.x_train.shape == (5, 28, 28, 1) and d.x_test.shape == (3, 28, 28, 1)
        assert d.y_train.dtype == np.int32


def test_cifar_pickle_batches_fallback(tmp_path):
    rng = np.random.default_rng(1)
    bd = tmp_path / "cifar-10-batches-py"
    bd.mkdir()
    xs, ys = [], []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        x = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
        y = rng.integers(0, 10, 2).tolist()
        flat = x.transpose(0, 3, 1, 2).reshape(2, 3072)  # official layout: CHW rows
        with (bd / name).open("wb") as f:
            pickle.dump({b"data": flat, b"labels": y}, f)
        xs.append(x)
        ys.append(y)
    d = load_cifar10(tmp_path, source="files", dtype="uint8")
    np.testing.assert_array_equal(d.x_train, np.concatenate(xs[:5]))
    np.testing.assert_array_equal(d.y_train, np.concatenate(ys[:5]))
    np.testing.assert_array_equal(d.x_test, xs[5])
    assert d.y_test.dtype == np.int32


# --------------------------------------------------------------------------- corrupt files


def test_mnist_truncated_gzip(tmp_path):
    paths = _write_mnist(tmp_path, n_train=50)
    gz = paths["train-images-idx3-ubyte"].read_bytes()
    paths["train-images-idx3-ubyte"].write_bytes(gz[: len(gz) // 2])  # interrupted copy
    with pytest.raises(DataCorruptError, match="gzip") as ei:
        load_mnist(tmp_path, source="files")
    assert str(paths["train-images-idx3-ubyte"]) in str(ei.value)


def test_mnist_not_gzip(tmp_path):
    paths = _write_mnist(tmp_path)
    paths["t10k-images-idx3-ubyte"].write_bytes(b"this is not gzip data at all")
    with pytest.raises(DataCorruptError) as ei:
        load_mnist(tmp_path, source="files")
    assert str(paths["t10k-images-idx3-ubyte"]) in str(ei.value)


def test_mnist_bad_magic(tmp_path):
    paths = _write_mnist(tmp_path)
    # a label file where the image file should be: magic 2049 instead of 2051
    paths["train-images-idx3-ubyte"].write_bytes(gzip.compress(_idx_bytes(np.zeros(5), 2049)))
    with pytest.raises(DataCorruptError, match="magic number 2049") as ei:
        load_mnist(tmp_path, source="files")
    assert "2051" in str(ei.value)
    assert str(paths["train-images-idx3-ubyte"]) in str(ei.value)


def test_mnist_header_payload_mismatch(tmp_path):
    paths = _write_mnist(tmp_path)
    raw = _idx_bytes(np.zeros((5, 28, 28)))[:-100]  # header says 5 images, payload short
    paths["train-images-idx3-ubyte"].write_bytes(gzip.compress(raw))
    with pytest.raises(DataCorruptError, match=r"\(5, 28, 28\)"):
        load_mnist(tmp_path, source="files")


def test_mnist_wrong_image_size_and_count_mismatch(tmp_path):
    paths = _write_mnist(tmp_path)
    paths["train-images-idx3-ubyte"].write_bytes(gzip.compress(_idx_bytes(np.zeros((5, 27, 28)))))
    with pytest.raises(DataCorruptError, match="expected \\(28, 28\\)"):
        load_mnist(tmp_path, source="files")
    paths = _write_mnist(tmp_path)
    paths["t10k-labels-idx1-ubyte"].write_bytes(gzip.compress(_idx_bytes(np.zeros(4))))
    with pytest.raises(DataCorruptError, match="3 images but .* 4 labels"):
        load_mnist(tmp_path, source="files")


def test_cifar_npz_bad_keys(tmp_path):
    p = tmp_path / "cifar10" / "cifar10.npz"
    p.parent.mkdir()
    np.savez(p, x_train=np.zeros((2, 32, 32, 3), np.uint8), labels=np.zeros(2, np.uint8))
    with pytest.raises(DataCorruptError, match="missing key") as ei:
        load_cifar10(tmp_path, source="files")
    assert str(p) in str(ei.value) and "y_train" in str(ei.value)


def test_cifar_npz_wrong_shapes(tmp_path):
    p = tmp_path / "cifar10" / "cifar10.npz"
    p.parent.mkdir()
    np.savez(
        p,
        x_train=np.zeros((2, 3, 32, 32), np.uint8),  # NCHW instead of NHWC
        y_train=np.zeros(2, np.uint8),
        x_test=np.zeros((1, 32, 32, 3), np.uint8),
        y_test=np.zeros(1, np.uint8),
    )
    with pytest.raises(DataCorruptError, match=r"x_train has shape \(2, 3, 32, 32\)") as ei:
        load_cifar10(tmp_path, source="files")
    assert str(p) in str(ei.value)


@pytest.mark.parametrize("content", ["truncated", "garbage"])
def test_cifar_npz_unreadable(tmp_path, content):
    p = tmp_path / "cifar10" / "cifar10.npz"
    p.parent.mkdir()
    arrays = {k: np.zeros((2, 32, 32, 3), np.uint8) for k in ("x_train", "x_test")}
    np.savez_compressed(p, y_train=np.zeros(2, np.uint8), y_test=np.zeros(2, np.uint8), **arrays)
    raw = p.read_bytes()
    p.write_bytes(raw[: len(raw) // 2] if content == "truncated" else b"not a zip file" * 10)
    with pytest.raises(DataCorruptError, match="npz") as ei:
        load_cifar10(tmp_path, source="files")
    assert str(p) in str(ei.value)


# --------------------------------------------------------------------------- tfds / auto


def test_tfds_missing_raises_clear_import_error(no_tfds):
    with pytest.raises(ImportError, match=r"pip install jaxpurify\[data\]"):
        load_mnist(source="tfds")
    with pytest.raises(ImportError, match=r"pip install jaxpurify\[data\]"):
        load_cifar10(source="tfds")


def test_auto_without_dir_or_tfds(no_env, no_tfds):
    with pytest.raises(DataNotFoundError) as ei:
        load_mnist()
    msg = str(ei.value)
    assert DATA_DIR_ENV in msg and 'source="tfds"' in msg


def test_auto_with_bad_dir_does_not_fall_back(tmp_path, monkeypatch, no_tfds):
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "missing"))
    with pytest.raises(DataNotFoundError, match="does not exist"):
        load_cifar10()


def _stub_tfds(calls: list) -> types.ModuleType:
    """A stand-in for the tfds API surface used (load + as_numpy), to check the call."""
    mod = types.ModuleType("tensorflow_datasets")

    def load(name, *, split, batch_size, as_supervised, data_dir):
        calls.append(dict(name=name, split=split, batch_size=batch_size, data_dir=data_dir))
        assert as_supervised
        return [
            (np.zeros((4, 28, 28, 1), np.uint8), np.arange(4, dtype=np.int64)),
            (np.full((2, 28, 28, 1), 255, np.uint8), np.arange(2, dtype=np.int64)),
        ]

    mod.load = load
    mod.as_numpy = lambda tree: tree
    return mod


def test_tfds_call_and_conversion(tmp_path, monkeypatch, no_env):
    calls: list = []
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", _stub_tfds(calls))
    d = load_mnist(tmp_path, source="tfds", limit_train=4, normalize=False)
    assert calls == [
        dict(name="mnist", split=["train[:4]", "test"], batch_size=-1, data_dir=str(tmp_path))
    ]
    assert d.x_train.shape == (4, 28, 28, 1) and d.x_train.dtype == np.float32
    assert d.y_train.dtype == np.int32 and d.x_test.max() == 1.0
    # auto with no data dir picks tfds when importable (tfds default data dir: None)
    calls.clear()
    load_mnist(dtype="uint8", limit_test=2)
    assert calls[0]["data_dir"] is None and calls[0]["split"] == ["train", "test[:2]"]


# --------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(source="web"),
        dict(dtype="float16"),
        dict(dtype="int32"),
        dict(limit_train=-1),
        dict(limit_test=1.5),
    ],
)
def test_bad_arguments(kwargs, tmp_path):
    with pytest.raises(ValueError):
        load_mnist(tmp_path, **kwargs)


# --------------------------------------------------------------------------- batches


def test_batches_in_order_with_remainder():
    x = np.arange(10 * 2).reshape(10, 2)
    y = np.arange(10)
    out = list(batches(x, y, 4))
    assert [len(b[1]) for b in out] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate([b[1] for b in out]), y)
    np.testing.assert_array_equal(out[0][0], x[:4])
    dropped = list(batches(x, y, 4, drop_remainder=True))
    assert [len(b[1]) for b in dropped] == [4, 4]
    assert list(batches(x, y, 20, drop_remainder=True)) == []


def test_batches_shuffle_deterministic():
    x = np.arange(100, dtype=np.float32)[:, None] * 2
    y = np.arange(100)
    key = jax.random.key(0)
    a = [b[1] for b in batches(x, y, 32, key=key)]
    b = [b[1] for b in batches(x, y, 32, key=key)]
    c = [b[1] for b in batches(x, y, 32, key=jax.random.key(1))]
    assert all(np.array_equal(u, v) for u, v in zip(a, b, strict=True))
    ya = np.concatenate(a)
    assert sorted(ya.tolist()) == list(range(100)) and not np.array_equal(ya, y)
    assert not np.array_equal(ya, np.concatenate(c))
    for xb, yb in batches(x, y, 32, key=key):  # x and y stay paired
        np.testing.assert_array_equal(xb[:, 0], 2 * yb)
    legacy = [b[1] for b in batches(x, y, 32, key=jax.random.PRNGKey(0))]
    assert sum(len(v) for v in legacy) == 100


def test_batches_jax_arrays_and_validation():
    x = jax.numpy.arange(12.0).reshape(6, 2)
    y = jax.numpy.arange(6)
    out = list(batches(x, y, 4, key=3))
    assert isinstance(out[0][0], jax.Array) and [len(b[1]) for b in out] == [4, 2]
    with pytest.raises(ValueError, match="different lengths"):
        batches(x, y[:5], 2)
    with pytest.raises(ValueError, match="batch_size"):
        batches(x, y, 0)


def test_batches_over_real_mnist(mnist_u8):
    n = 0
    for xb, yb in batches(mnist_u8.x_test, mnist_u8.y_test, 1000, key=jax.random.key(0)):
        assert xb.shape == (1000, 28, 28, 1) and yb.dtype == np.int32
        n += len(yb)
    assert n == 10000
