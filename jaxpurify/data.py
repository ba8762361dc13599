"""Real-dataset loaders (MNIST, CIFAR-10) and a minimal batch iterator.

Where the data comes from
-------------------------
``source="files"`` (offline, never downloads) reads the standard files from a data
directory, given as the ``data_dir`` argument or through the ``JAXPURIFY_DATA_DIR``
environment variable::

    $JAXPURIFY_DATA_DIR/
        mnist/train-images-idx3-ubyte.gz      (the 4 original IDX files; the
        mnist/train-labels-idx1-ubyte.gz       uncompressed ``*-ubyte`` names and the
        mnist/t10k-images-idx3-ubyte.gz        ``*.idx3-ubyte`` spelling are accepted,
        mnist/t10k-labels-idx1-ubyte.gz        as are the files directly in the dir)
        cifar10/cifar10.npz                   (x_train, y_train, x_test, y_test; uint8,
                                               images NHWC)
        cifar-10-batches-py/                  (fallback when no npz: the official
            data_batch_1..5, test_batch        python-pickle batches; also accepted
                                               under cifar10/)

``source="tfds"`` loads through ``tensorflow_datasets`` (``pip install jaxpurify[data]``),
which downloads on first use; ``data_dir`` is then passed to ``tfds.load`` as its data dir
(``None`` means the tfds default, ``~/tensorflow_datasets``).

``source="auto"`` (the default) uses the files when a data dir is given or the environment
variable is set, else tfds when it is importable, else raises :class:`DataNotFoundError`.
A data dir that is set but wrong is an error; it never silently switches to tfds. No
loader ever substitutes synthetic data.

Output
------
Images are always NHWC (MNIST gets a trailing channel axis: ``(N, 28, 28, 1)``); labels
are ``int32``. With ``dtype="uint8"`` images are the raw pixels and ``normalize`` has no
effect. With a float dtype pixels are scaled to ``[0, 1]`` and then, if ``normalize``,
standardized per channel with the dataset's published training-set mean/std
(:data:`MNIST_MEAN`, :data:`MNIST_STD`, :data:`CIFAR10_MEAN`, :data:`CIFAR10_STD`).

Decoded files are cached in-process (keyed on path, size and mtime), so repeated loads are
cheap. The cached arrays are **read-only**: ``uint8`` images and all labels you get back
may be read-only views of the cache (``limit_*`` slices them without copying). Call
``np.array(x)`` if you need to write into them. Float images are fresh, writable arrays.
"""

from __future__ import annotations

import functools
import gzip
import os
import pickle
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "DATA_DIR_ENV",
    "MNIST_MEAN",
    "MNIST_STD",
    "DataCorruptError",
    "DataNotFoundError",
    "Dataset",
    "batches",
    "clear_cache",
    "load_cifar10",
    "load_mnist",
    "resolve_data_dir",
]

DATA_DIR_ENV = "JAXPURIFY_DATA_DIR"

MNIST_MEAN = (0.1307,)
MNIST_STD = (0.3081,)
CIFAR10_MEAN = (0.49139968, 0.48215841, 0.44653091)
CIFAR10_STD = (0.24703223, 0.24348513, 0.26158784)

_SOURCES = ("auto", "files", "tfds")
_DTYPES = ("uint8", "float32", "float64")
_TFDS_HINT = 'or, with internet access, pass source="tfds" (pip install jaxpurify[data])'


class DataNotFoundError(FileNotFoundError):
    """The data directory or a dataset file is missing."""


class DataCorruptError(ValueError):
    """A dataset file exists but cannot be decoded or has the wrong contents."""


class Dataset(NamedTuple):
    """A train/test split. Images NHWC, labels int32 (see the module docstring)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    name: str


# --------------------------------------------------------------------------- data dir


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """Return the data directory: ``data_dir`` if given, else ``$JAXPURIFY_DATA_DIR``.

    Raises :class:`DataNotFoundError` if neither is set (an empty variable counts as
    unset) or if the chosen path is not an existing directory.
    """
    if _is_given(data_dir):
        where = "the data_dir argument"
        raw = os.fspath(data_dir)
    else:
        raw = os.environ.get(DATA_DIR_ENV, "")
        where = f"${DATA_DIR_ENV}"
        if not raw:
            raise DataNotFoundError(
                "No data directory: pass data_dir=... or set the environment variable "
                f"{DATA_DIR_ENV} to a folder holding mnist/ and cifar10/ "
                f"(e.g. export {DATA_DIR_ENV}=/path/to/shared/data), {_TFDS_HINT}."
            )
    path = Path(os.path.expandvars(raw)).expanduser()
    if not path.is_dir():
        raise DataNotFoundError(
            f"Data directory {path} (from {where}) does not exist or is not a directory. "
            f"Point data_dir or {DATA_DIR_ENV} at the folder holding mnist/ and cifar10/, "
            f"{_TFDS_HINT}."
        )
    return path


def default_data_dir(data_dir: str | os.PathLike[str] | None = None) -> str | None:
    """The data directory to use when one may be absent.

    ``data_dir`` if given, else ``$JAXPURIFY_DATA_DIR``, else ``../shared/data`` beside a
    source checkout of jaxpurify when that folder exists (the tests' and experiments'
    default), else ``None``.
    """
    if _data_dir_is_configured(data_dir):
        return os.fspath(data_dir) if _is_given(data_dir) else os.environ[DATA_DIR_ENV]
    sibling = Path(__file__).resolve().parents[2] / "shared" / "data"
    return str(sibling) if sibling.is_dir() else None


def _is_given(data_dir: str | os.PathLike[str] | None) -> bool:
    """An argument counts when it is not None and not empty."""
    return data_dir is not None and str(data_dir) != ""


def _data_dir_is_configured(data_dir: str | os.PathLike[str] | None) -> bool:
    return _is_given(data_dir) or bool(os.environ.get(DATA_DIR_ENV))


# --------------------------------------------------------------------------- caching


def clear_cache() -> None:
    """Drop every decoded array held by the in-process cache."""
    _read_idx_cached.cache_clear()
    _read_cifar_npz_cached.cache_clear()
    _read_cifar_batches_cached.cache_clear()
    _tfds_load_cached.cache_clear()


def _stat_key(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return (str(path.resolve()), st.st_size, st.st_mtime_ns)


def _readonly(*arrays: np.ndarray) -> None:
    for a in arrays:
        a.setflags(write=False)


# --------------------------------------------------------------------------- MNIST

_IDX_MAGIC = {3: 2051, 1: 2049}  # ndim -> magic (unsigned byte data)


def _mnist_candidates(root: Path, stem: str) -> list[Path]:
    """Paths tried, in order, for e.g. stem='train-images-idx3-ubyte'."""
    dotted = stem.replace("-idx", ".idx")  # 'train-images.idx3-ubyte'
    names = [f"{stem}.gz", stem, f"{dotted}.gz", dotted]
    return [d / n for d in (root / "mnist", root) for n in names]


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    key = _stat_key(path)
    return _read_idx_cached(key, ndim)


@functools.lru_cache(maxsize=8)
def _read_idx_cached(key: tuple[str, int, int], ndim: int) -> np.ndarray:
    path = Path(key[0])
    raw = path.read_bytes()
    if path.suffix == ".gz" or raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError
            raise DataCorruptError(
                f"{path}: not a valid gzip file or truncated ({type(e).__name__}: {e}). "
                "Re-download or re-copy the file."
            ) from e
    expected_magic = _IDX_MAGIC[ndim]
    header_len = 4 + 4 * ndim
    if len(raw) < 4:
        raise DataCorruptError(f"{path}: only {len(raw)} bytes, too short for an IDX header.")
    magic = int.from_bytes(raw[:4], "big")
    if magic != expected_magic:
        raise DataCorruptError(
            f"{path}: bad IDX magic number {magic} (expected {expected_magic}: "
            f"unsigned-byte data with {ndim} dimension(s)). Wrong or corrupt file."
        )
    if len(raw) < header_len:
        raise DataCorruptError(f"{path}: truncated IDX header ({len(raw)} bytes).")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(dims, dtype=np.int64))
    payload = len(raw) - header_len
    if payload != expected:
        raise DataCorruptError(
            f"{path}: IDX header says shape {dims} ({expected} bytes of data) but the file "
            f"holds {payload} bytes after the header (truncated or corrupt)."
        )
    arr = np.frombuffer(raw, dtype=np.uint8, offset=header_len).reshape(dims)
    _readonly(arr)
    return arr


def _find_first(candidates: list[Path]) -> Path | None:
    for p in candidates:
        if p.is_file():
            return p
    return None


def _load_mnist_files(root: Path) -> tuple[np.ndarray, ...]:
    stems = [
        ("train-images-idx3-ubyte", 3),
        ("train-labels-idx1-ubyte", 1),
        ("t10k-images-idx3-ubyte", 3),
        ("t10k-labels-idx1-ubyte", 1),
    ]
    found: list[Path] = []
    missing: list[list[Path]] = []
    for stem, _ in stems:
        cands = _mnist_candidates(root, stem)
        p = _find_first(cands)
        if p is None:
            missing.append(cands)
        else:
            found.append(p)
    if missing:
        lines = "\n".join(
            f"  {c[0]}  (also tried: {', '.join(x.name for x in c[1:4])}, and in {root})"
            for c in missing
        )
        raise DataNotFoundError(
            f"MNIST file(s) not found:\n{lines}\n"
            f"Put the 4 original IDX files (train-images-idx3-ubyte.gz, "
            f"train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
            f"t10k-labels-idx1-ubyte.gz) in {root / 'mnist'}, or point data_dir / "
            f"{DATA_DIR_ENV} at a folder that has them under mnist/, {_TFDS_HINT}."
        )
    out = []
    for (_, ndim), p in zip(stems, found, strict=True):
        out.append(_read_idx(p, ndim))
    x_tr, y_tr, x_te, y_te = out
    for x, y, px, py in ((x_tr, y_tr, found[0], found[1]), (x_te, y_te, found[2], found[3])):
        if x.shape[1:] != (28, 28):
            raise DataCorruptError(f"{px}: images are {x.shape[1:]}, expected (28, 28).")
        if x.shape[0] != y.shape[0]:
            raise DataCorruptError(
                f"{px} has {x.shape[0]} images but {py} has {y.shape[0]} labels."
            )
        if y.size and y.max() >= 10:
            raise DataCorruptError(f"{py}: label {int(y.max())} out of range 0..9.")
    return x_tr[..., None], y_tr, x_te[..., None], y_te


# --------------------------------------------------------------------------- CIFAR-10


def _check_cifar(path: Path, x: Any, y: Any, split: str) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x)
    y = np.asarray(y)
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (32, 32, 3):
        raise DataCorruptError(
            f"{path}: x_{split} has shape {x.shape} dtype {x.dtype}; "
            "expected (N, 32, 32, 3) uint8 (NHWC)."
        )
    if y.ndim != 1 or y.shape[0] != x.shape[0] or not np.issubdtype(y.dtype, np.integer):
        raise DataCorruptError(
            f"{path}: y_{split} has shape {y.shape} dtype {y.dtype}; expected ({x.shape[0]},) "
            "integer labels."
        )
    if y.size and (y.min() < 0 or y.max() >= 10):
        raise DataCorruptError(f"{path}: y_{split} has labels outside 0..9.")
    return x, y.astype(np.int32)


@functools.lru_cache(maxsize=2)
def _read_cifar_npz_cached(key: tuple[str, int, int]) -> tuple[np.ndarray, ...]:
    path = Path(key[0])
    required = ("x_train", "y_train", "x_test", "y_test")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in required if k not in z.files]
            if missing:
                raise DataCorruptError(
                    f"{path}: missing key(s) {missing}; has {sorted(z.files)}, "
                    f"expected {list(required)}."
                )
            arrays = {k: z[k] for k in required}
    except DataCorruptError:
        raise
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, zlib.error, KeyError) as e:
        raise DataCorruptError(
            f"{path}: cannot read as a .npz archive ({type(e).__name__}: {e}). Re-copy the file."
        ) from e
    x_tr, y_tr = _check_cifar(path, arrays["x_train"], arrays["y_train"], "train")
    x_te, y_te = _check_cifar(path, arrays["x_test"], arrays["y_test"], "test")
    _readonly(x_tr, y_tr, x_te, y_te)
    return x_tr, y_tr, x_te, y_te


def _read_pickle_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with path.open("rb") as f:
            d = pickle.load(f, encoding="bytes")
        data = np.asarray(d[b"data"] if b"data" in d else d["data"])
        labels = d.get(b"labels", d.get("labels"))
        if labels is None:
            raise KeyError("labels")
    except DataCorruptError:
        raise
    except Exception as e:  # pickle can raise nearly anything on garbage input
        raise DataCorruptError(
            f"{path}: not a valid CIFAR-10 python batch ({type(e).__name__}: {e})."
        ) from e
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataCorruptError(
            f"{path}: 'data' has shape {data.shape} dtype {data.dtype}; expected (N, 3072) uint8."
        )
    x = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return x, np.asarray(labels)


@functools.lru_cache(maxsize=2)
def _read_cifar_batches_cached(
    dirpath: str, stats: tuple[tuple[str, int, int], ...]
) -> tuple[np.ndarray, ...]:
    del stats  # part of the cache key only: edited batch files are re-read
    d = Path(dirpath)
    parts = [_read_pickle_batch(d / f"data_batch_{i}") for i in range(1, 6)]
    x_tr = np.concatenate([p[0] for p in parts])
    y_tr = np.concatenate([p[1] for p in parts])
    x_te, y_te = _read_pickle_batch(d / "test_batch")
    x_tr, y_tr = _check_cifar(d, x_tr, y_tr, "train")
    x_te, y_te = _check_cifar(d, x_te, y_te, "test")
    _readonly(x_tr, y_tr, x_te, y_te)
    return x_tr, y_tr, x_te, y_te


_CIFAR_BATCH_NAMES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def _load_cifar10_files(root: Path) -> tuple[np.ndarray, ...]:
    npz = root / "cifar10" / "cifar10.npz"
    if npz.is_file():
        return _read_cifar_npz_cached(_stat_key(npz))
    batch_dirs = [root / "cifar-10-batches-py", root / "cifar10" / "cifar-10-batches-py"]
    for bd in batch_dirs:
        if all((bd / n).is_file() for n in _CIFAR_BATCH_NAMES):
            stats = tuple(_stat_key(bd / n) for n in _CIFAR_BATCH_NAMES)
            return _read_cifar_batches_cached(str(bd.resolve()), stats)
    raise DataNotFoundError(
        f"CIFAR-10 not found: looked for {npz} and for the python batches "
        f"({', '.join(_CIFAR_BATCH_NAMES)}) in {batch_dirs[0]} and {batch_dirs[1]}. "
        f"Put cifar10.npz (keys x_train, y_train, x_test, y_test) in {root / 'cifar10'}, "
        f"or extract the official cifar-10-python.tar.gz into {root}, or point data_dir / "
        f"{DATA_DIR_ENV} elsewhere, {_TFDS_HINT}."
    )


# --------------------------------------------------------------------------- tfds


def _import_tfds() -> Any:
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise ImportError(
            'source="tfds" needs tensorflow_datasets, which is not installed: '
            "pip install jaxpurify[data] (or pip install tensorflow-datasets). "
            f'Offline, use source="files" with data_dir or {DATA_DIR_ENV} instead.'
        ) from e
    return tfds


@functools.lru_cache(maxsize=4)
def _tfds_load_cached(
    name: str, data_dir: str | None, train_split: str, test_split: str
) -> tuple[np.ndarray, ...]:
    tfds = _import_tfds()
    (x_tr, y_tr), (x_te, y_te) = tfds.as_numpy(
        tfds.load(
            name,
            split=[train_split, test_split],
            batch_size=-1,
            as_supervised=True,
            data_dir=data_dir,
        )
    )
    out = []
    for x, y in ((x_tr, y_tr), (x_te, y_te)):
        x = np.asarray(x, dtype=np.uint8)
        if x.ndim == 3:
            x = x[..., None]
        y = np.asarray(y).astype(np.int32)
        _readonly(x, y)
        out += [x, y]
    return tuple(out)


def _tfds_split(split: str, limit: int | None) -> str:
    return split if limit is None else f"{split}[:{limit}]"


# --------------------------------------------------------------------------- public loaders


def _check_args(source: str, dtype: Any, limit_train: Any, limit_test: Any) -> str:
    if source not in _SOURCES:
        raise ValueError(f"source must be one of {_SOURCES}, got {source!r}")
    try:
        dt = np.dtype(dtype).name
    except TypeError as e:
        raise ValueError(f"dtype must be one of {_DTYPES}, got {dtype!r}") from e
    if dt not in _DTYPES:
        raise ValueError(f"dtype must be one of {_DTYPES}, got {dtype!r}")
    for nm, v in (("limit_train", limit_train), ("limit_test", limit_test)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int | np.integer) or v < 0):
            raise ValueError(f"{nm} must be None or a non-negative int, got {v!r}")
    return dt


def _finish_images(
    x: np.ndarray, dtype: str, normalize: bool, mean: tuple[float, ...], std: tuple[float, ...]
) -> np.ndarray:
    if dtype == "uint8":
        return x
    out = x.astype(dtype)
    out /= 255.0
    if normalize:
        out -= np.asarray(mean, dtype=dtype)
        out /= np.asarray(std, dtype=dtype)
    return out


def _load(
    name: str,
    files_loader: Any,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    data_dir: str | os.PathLike[str] | None,
    source: str,
    dtype: Any,
    normalize: bool,
    limit_train: int | None,
    limit_test: int | None,
) -> Dataset:
    dt = _check_args(source, dtype, limit_train, limit_test)
    if source == "auto":
        if _data_dir_is_configured(data_dir):
            source = "files"
        else:
            try:
                _import_tfds()
            except ImportError as e:
                raise DataNotFoundError(
                    f"Cannot load {name}: no data directory (pass data_dir=... or set "
                    f"{DATA_DIR_ENV} to the folder holding mnist/ and cifar10/) and "
                    'tensorflow_datasets is not installed (for source="tfds": '
                    "pip install jaxpurify[data])."
                ) from e
            source = "tfds"
    if source == "files":
        x_tr, y_tr, x_te, y_te = files_loader(resolve_data_dir(data_dir))
        if limit_train is not None:
            x_tr, y_tr = x_tr[:limit_train], y_tr[:limit_train]
        if limit_test is not None:
            x_te, y_te = x_te[:limit_test], y_te[:limit_test]
    else:
        tdir = None if data_dir is None else os.fspath(Path(data_dir).expanduser())
        x_tr, y_tr, x_te, y_te = _tfds_load_cached(
            name, tdir, _tfds_split("train", limit_train), _tfds_split("test", limit_test)
        )
    return Dataset(
        x_train=_finish_images(x_tr, dt, normalize, mean, std),
        y_train=y_tr.astype(np.int32, copy=False),
        x_test=_finish_images(x_te, dt, normalize, mean, std),
        y_test=y_te.astype(np.int32, copy=False),
        num_classes=10,
        name=name,
    )


def load_mnist(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    source: str = "auto",
    dtype: Any = "float32",
    normalize: bool = True,
    limit_train: int | None = None,
    limit_test: int | None = None,
) -> Dataset:
    """Load MNIST: x ``(N, 28, 28, 1)``, y int32; 60000 train / 10000 test examples.

    Args:
      data_dir: folder holding ``mnist/`` (files mode) or the tfds data dir (tfds mode);
        ``None`` means ``$JAXPURIFY_DATA_DIR`` (files) / the tfds default (tfds).
      source: ``"auto"``, ``"files"`` or ``"tfds"`` (see the module docstring).
      dtype: ``"uint8"`` (raw pixels), ``"float32"`` or ``"float64"``.
      normalize: for float dtypes, standardize with mean 0.1307 / std 0.3081 after
        scaling to [0, 1]; ignored for uint8.
      limit_train, limit_test: keep only the first N examples (deterministic).

    Raises:
      DataNotFoundError: no data dir / a file is missing (the message names the path).
      DataCorruptError: a file exists but is not valid MNIST IDX data.
      ImportError: ``source="tfds"`` without ``tensorflow_datasets`` installed.
    """
    return _load(
        "mnist", _load_mnist_files, MNIST_MEAN, MNIST_STD,
        data_dir, source, dtype, normalize, limit_train, limit_test,
    )  # fmt: skip


def load_cifar10(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    source: str = "auto",
    dtype: Any = "float32",
    normalize: bool = True,
    limit_train: int | None = None,
    limit_test: int | None = None,
) -> Dataset:
    """Load CIFAR-10: x ``(N, 32, 32, 3)`` RGB, y int32; 50000 train / 10000 test.

    Files mode reads ``cifar10/cifar10.npz`` under the data dir, or, if that is absent,
    the official python-pickle batches in ``cifar-10-batches-py/`` (only load pickles you
    trust). Arguments and errors as in :func:`load_mnist`; normalization uses the
    published per-channel train mean/std (:data:`CIFAR10_MEAN`, :data:`CIFAR10_STD`).
    """
    return _load(
        "cifar10", _load_cifar10_files, CIFAR10_MEAN, CIFAR10_STD,
        data_dir, source, dtype, normalize, limit_train, limit_test,
    )  # fmt: skip


# --------------------------------------------------------------------------- batching


def batches(
    x: Any,
    y: Any,
    batch_size: int,
    *,
    key: Any = None,
    drop_remainder: bool = False,
) -> Iterator[tuple[Any, Any]]:
    """Iterate over ``(x[idx], y[idx])`` minibatches along the leading axis.

    Without ``key`` the order is the stored order and batches are slices (views for
    numpy inputs). With ``key`` (a JAX PRNG key, or an int seed) the examples are
    shuffled by ``jax.random.permutation(key, len(x))`` — the same key gives the same
    order. The last, smaller batch is yielded unless ``drop_remainder``. Works with numpy
    or JAX arrays; returns the same kind as given. Arguments are checked eagerly.
    """
    n = len(x)
    if len(y) != n:
        raise ValueError(f"x and y have different lengths: {n} vs {len(y)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer):
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    perm = None
    if key is not None:
        import jax

        if isinstance(key, int | np.integer):
            key = jax.random.key(int(key))
        perm = np.asarray(jax.random.permutation(key, n))
    stop = n - n % batch_size if drop_remainder else n

    def _gen() -> Iterator[tuple[Any, Any]]:
        for start in range(0, stop, batch_size):
            end = min(start + batch_size, stop)
            if perm is None:
                yield x[start:end], y[start:end]
            else:
                idx = perm[start:end]
                yield x[idx], y[idx]

    return _gen()
