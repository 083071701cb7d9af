"""Tests for edgetrain.data: every source on generated files, every error path, determinism, resume."""

from __future__ import annotations

import dataclasses
import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import edgetrain
from edgetrain.data import (
    DIGITS_MEAN,
    DIGITS_STD,
    Augment,
    Dataset,
    Loader,
    Split,
    channel_stats,
    check_fits,
    iterate_eval,
    load_data,
    load_digits,
    loads_safe,
    parse_spec,
    stratified_holdout,
)
from edgetrain.data.cifar import CIFAR_ROW_BYTES
from edgetrain.data.safe_pickle import load_safe
from edgetrain.data.transforms import CIFAR_AUGMENT, augment_rng
from edgetrain.errors import DataError
from edgetrain.train.loop import batches as training_batches

SIDE = 32
ROWS = 12  # rows per fake CIFAR-10 batch (the real files have 10000)
C10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
C100_NAMES = [f"class_{i}" for i in range(100)]
SAFE_SUFFIX = "(only plain values and numpy arrays are read, nothing is run)"


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and msg
    return msg


# ---------------------------------------------------------------------------------------------
# Fake data writers
# ---------------------------------------------------------------------------------------------

def _dump(path: Path, obj, protocol: int) -> None:
    path.write_bytes(pickle.dumps(obj, protocol=protocol))


def _py2_dumps(obj) -> bytes:
    """What Python 2's cPickle.dump(obj, f, 2) writes for the original CIFAR files (str = bytes)."""
    out = bytearray(b"\x80\x02")
    memo = [0]

    def put() -> None:
        memo[0] += 1
        out.extend(b"q" + bytes([memo[0] % 256]))

    def string(s: bytes) -> None:
        out.extend((b"U" + bytes([len(s)]) if len(s) < 256 else b"T" + struct.pack("<i", len(s))) + s)
        put()

    def integer(i: int) -> None:
        if 0 <= i < 256:
            out.extend(b"K" + bytes([i]))
        elif 0 <= i < 65536:
            out.extend(b"M" + struct.pack("<H", i))
        else:
            out.extend(b"J" + struct.pack("<i", i))

    def value(v) -> None:
        if isinstance(v, str):
            string(v.encode())
        elif isinstance(v, bytes):
            string(v)
        elif isinstance(v, int):
            integer(v)
        elif isinstance(v, list):
            out.extend(b"]")
            put()
            for start in range(0, len(v), 1000):  # cPickle batches APPENDS by 1000
                out.extend(b"(")
                for item in v[start:start + 1000]:
                    value(item)
                out.extend(b"e")
        elif isinstance(v, np.ndarray):
            assert v.dtype == np.uint8 and v.ndim == 2
            out.extend(b"cnumpy.core.multiarray\n_reconstruct\n")
            put()
            out.extend(b"cnumpy\nndarray\n")
            put()
            out.extend(b"K\x00\x85")
            string(b"b")
            out.extend(b"\x87R")
            put()
            out.extend(b"(K\x01")
            integer(v.shape[0])
            integer(v.shape[1])
            out.extend(b"\x86cnumpy\ndtype\n")
            put()
            string(b"u1")
            out.extend(b"K\x00K\x01\x87R")
            put()
            out.extend(b"(K\x03")
            string(b"|")
            out.extend(b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89")
            string(v.tobytes())
            out.extend(b"tb")
        else:
            raise TypeError(type(v))

    out.extend(b"}")
    put()
    out.extend(b"(")
    for k, v in obj.items():
        string(k.encode())
        value(v)
    out.extend(b"u.")
    return bytes(out)


def _images(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 256, size=(n, CIFAR_ROW_BYTES), dtype=np.uint8)


def write_cifar10(root: Path, protocol: int | str = 2, rows: int = ROWS, seed: int = 0,
                  labels_key: str = "labels") -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A cifar-10-batches-py folder under root; returns (x_train, y_train, x_test, y_test) as uint8/int."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)

    def save(name: str, obj) -> None:
        data = _py2_dumps(obj) if protocol == "py2" else pickle.dumps(obj, protocol=protocol)
        (folder / name).write_bytes(data)

    save("batches.meta", {"num_cases_per_batch": rows, "label_names": C10_NAMES, "num_vis": CIFAR_ROW_BYTES})
    parts = []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        x = _images(rng, rows)
        y = [int(v) for v in rng.integers(0, 10, size=rows)]
        save(name, {"batch_label": name, labels_key: y, "data": x, "filenames": [f"{i}.png" for i in range(rows)]})
        parts.append((x, np.array(y)))
    x_train = np.concatenate([p[0] for p in parts[:5]])
    y_train = np.concatenate([p[1] for p in parts[:5]])
    return x_train, y_train, parts[5][0], parts[5][1]


def write_cifar100(root: Path, protocol: int = 4, n_train: int = 30, n_test: int = 10, seed: int = 1):
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    _dump(folder / "meta", {"fine_label_names": C100_NAMES, "coarse_label_names": [f"c{i}" for i in range(20)]},
          protocol)
    out = []
    for name, n in (("train", n_train), ("test", n_test)):
        x = _images(rng, n)
        fine = rng.integers(0, 100, size=n)
        _dump(folder / name, {"filenames": [f"{i}.png" for i in range(n)], "batch_label": name,
                              "fine_labels": [int(v) for v in fine],
                              "coarse_labels": [int(v) // 5 for v in fine], "data": x}, protocol)
        out += [x, fine]
    return out


def _idx(array: np.ndarray) -> bytes:
    magic = (0x08 << 8) | array.ndim
    return struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape) + array.tobytes()


def write_mnist(folder: Path, n_train: int = 20, n_test: int = 8, gz: bool = False, side: int = 28):
    rng = np.random.default_rng(2)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, side, side), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, side, side), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for name, a in arrays.items():
        data = _idx(a)
        if gz:
            (folder / (name + ".gz")).write_bytes(gzip.compress(data))
        else:
            (folder / name).write_bytes(data)
    return arrays


class Evil:
    """Unpickling this with pickle.load would run a shell command that creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


# ---------------------------------------------------------------------------------------------
# parse_spec / load_data basics
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec, kind, path", [
    ("digits", "digits", None),
    ("cifar10:/data/c10", "cifar10", Path("/data/c10")),
    ("cifar100:rel/dir", "cifar100", Path("rel/dir")),
    ("mnist:/m", "mnist", Path("/m")),
    ("npz:/a/b:c.npz", "npz", Path("/a/b:c.npz")),  # only the first colon separates
    ("NPZ:x.npz", "npz", Path("x.npz")),
])
def test_parse_spec(spec, kind, path):
    assert parse_spec(spec) == (kind, path)


@pytest.mark.parametrize("spec", ["imagenet:/x", "", "/data/x.npz", "cifar:/x"])
def test_parse_spec_unknown_kind_lists_valid_ones(spec):
    with pytest.raises(DataError) as info:
        parse_spec(spec)
    msg = _one_line(info)
    assert f"unknown data source {spec!r}" in msg
    assert "digits, cifar10:PATH, cifar100:PATH, mnist:PATH, npz:PATH" in msg


@pytest.mark.parametrize("spec", ["cifar10", "mnist:", "npz"])
def test_parse_spec_missing_path(spec):
    with pytest.raises(DataError, match="needs a path"):
        parse_spec(spec)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_bad_val_fraction(fraction):
    with pytest.raises(DataError, match=r"val_fraction must be between 0 and 1 \(exclusive\)"):
        load_data("digits", val_fraction=fraction)


# ---------------------------------------------------------------------------------------------
# digits
# ---------------------------------------------------------------------------------------------

def test_digits_default_source():
    split = load_data()
    assert split.name == "digits" and split.augment is None
    assert split.train.x.shape == (4000, 1, 28, 28) and split.test.x.shape == (1000, 1, 28, 28)
    assert split.train.num_classes == 10 and split.train.y.dtype == np.int64
    # Training statistics computed here are exactly the documented constants.
    assert split.train.mean[0] == pytest.approx(DIGITS_MEAN, rel=1e-6)
    assert split.train.std[0] == pytest.approx(DIGITS_STD, rel=1e-6)
    assert split.test.mean == split.train.mean and split.test.std == split.train.std
    x_old, y_old = load_digits("test")
    assert np.allclose(split.test.x, x_old, atol=1e-5) and np.array_equal(split.test.y, y_old)


def test_digits_unnormalized():
    split = load_data("digits", normalize=False)
    assert split.train.mean == (0.0,) and split.train.std == (1.0,)
    x, y = load_digits("train", normalize=False)
    assert np.array_equal(split.train.x, x) and np.array_equal(split.train.y, y)


def test_digits_other_path(tmp_path):
    with pytest.raises(DataError) as info:
        load_data(f"digits:{tmp_path / 'none.npz'}")
    assert "none.npz" in _one_line(info) and "not found" in str(info.value)


# ---------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("protocol", ["py2", 2, 3, 4, 5])
def test_cifar10_reads_every_protocol(tmp_path, protocol):
    x_train, y_train, x_test, y_test = write_cifar10(tmp_path, protocol)
    split = load_data(f"cifar10:{tmp_path}", normalize=False)
    assert split.name == "cifar10" and split.augment == CIFAR_AUGMENT
    assert split.train.x.shape == (5 * ROWS, 3, SIDE, SIDE) and split.test.x.shape == (ROWS, 3, SIDE, SIDE)
    assert split.train.x.dtype == np.float32
    # Row layout is 1024 red, 1024 green, 1024 blue bytes, each 32x32 row-major.
    assert np.array_equal(split.train.x, x_train.reshape(-1, 3, SIDE, SIDE) / np.float32(255))
    assert np.array_equal(split.test.x[:, 1], x_test[:, 1024:2048].reshape(-1, SIDE, SIDE) / np.float32(255))
    assert np.array_equal(split.train.y, y_train) and np.array_equal(split.test.y, y_test)
    assert split.train.num_classes == 10 and split.train.class_names == tuple(C10_NAMES)


def test_cifar10_accepts_the_batches_folder_itself(tmp_path):
    write_cifar10(tmp_path)
    a = load_data(f"cifar10:{tmp_path}")
    b = load_data(f"cifar10:{tmp_path / 'cifar-10-batches-py'}")
    assert np.array_equal(a.train.x, b.train.x)


def test_cifar_normalization_statistics(tmp_path):
    x_train, _, x_test, _ = write_cifar10(tmp_path, 4)
    split = load_data(f"cifar10:{tmp_path}")
    raw = x_train.reshape(-1, 3, SIDE, SIDE).astype(np.float64) / 255
    assert np.allclose(split.train.mean, raw.mean(axis=(0, 2, 3)), rtol=1e-9)
    assert np.allclose(split.train.std, raw.std(axis=(0, 2, 3)), rtol=1e-9)
    assert np.allclose(split.train.x.mean(axis=(0, 2, 3), dtype=np.float64), 0, atol=1e-5)
    assert np.allclose(split.train.x.std(axis=(0, 2, 3), dtype=np.float64), 1, atol=1e-5)
    # The test split uses the training statistics, not its own.
    raw_test = x_test.reshape(-1, 3, SIDE, SIDE).astype(np.float64) / 255
    mean, std = (np.array(v)[None, :, None, None] for v in (split.train.mean, split.train.std))
    expect = (raw_test - mean) / std
    assert np.allclose(split.test.x, expect, atol=1e-5)
    assert split.test.mean == split.train.mean and split.test.std == split.train.std


@pytest.mark.parametrize("protocol", [2, 4])
def test_cifar100(tmp_path, protocol):
    x, fine, xt, fine_t = write_cifar100(tmp_path, protocol)
    split = load_data(f"cifar100:{tmp_path}", normalize=False)
    assert split.train.num_classes == 100 and split.train.class_names == tuple(C100_NAMES)
    assert np.array_equal(split.train.y, fine) and np.array_equal(split.test.y, fine_t)
    assert np.array_equal(split.test.x, xt.reshape(-1, 3, SIDE, SIDE) / np.float32(255))
    assert split.augment == Augment(pad=4, flip=True)


def test_cifar_missing_folder(tmp_path):
    with pytest.raises(DataError) as info:
        load_data(f"cifar10:{tmp_path / 'nowhere'}")
    assert _one_line(info) == f"cifar10: {tmp_path / 'nowhere'}: folder not found"


def test_cifar_folder_without_batches(tmp_path):
    with pytest.raises(DataError) as info:
        load_data(f"cifar10:{tmp_path}")
    msg = _one_line(info)
    assert str(tmp_path) in msg and "no data_batch_1" in msg and "cifar-10-batches-py" in msg


def test_cifar_archive_not_extracted(tmp_path):
    tarball = tmp_path / "cifar-10-python.tar.gz"
    tarball.write_bytes(b"\x1f\x8b")
    with pytest.raises(DataError, match=r"is an archive; extract it first"):
        load_data(f"cifar10:{tarball}")


def test_cifar_missing_batch_file(tmp_path):
    write_cifar10(tmp_path)
    missing = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    missing.unlink()
    with pytest.raises(DataError) as info:
        load_data(f"cifar10:{tmp_path}")
    assert _one_line(info) == f"cifar10: {missing}: file not found"


def test_cifar_missing_meta(tmp_path):
    write_cifar10(tmp_path)
    meta = tmp_path / "cifar-10-batches-py" / "batches.meta"
    meta.unlink()
    with pytest.raises(DataError, match="batches.meta: file not found"):
        load_data(f"cifar10:{tmp_path}")


@pytest.mark.parametrize("protocol", [2, 4])
def test_cifar_truncated_pickle(tmp_path, protocol):
    write_cifar10(tmp_path, protocol)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    data = batch.read_bytes()
    batch.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError) as info:
        load_data(f"cifar10:{tmp_path}")
    assert _one_line(info) == f"cifar10: {batch}: truncated pickle (the file ends before its STOP opcode)"


def test_cifar_batch_with_wrong_row_count(tmp_path):
    write_cifar10(tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_4"
    _dump(batch, {"labels": [0] * (ROWS - 1), "data": np.zeros((ROWS - 1, CIFAR_ROW_BYTES), np.uint8)}, 2)
    with pytest.raises(DataError) as info:
        load_data(f"cifar10:{tmp_path}")
    assert _one_line(info) == (f"cifar10: {batch}: 'data' must be uint8 ({ROWS}, 3072), "
                               f"got uint8 ({ROWS - 1}, 3072)")


@pytest.mark.parametrize("data, shown", [
    (np.zeros((ROWS, 3071), np.uint8), "uint8 (12, 3071)"),
    (np.zeros((ROWS, 3072), np.float32), "float32 (12, 3072)"),
    (np.zeros((ROWS, 3, 32, 32), np.uint8), "uint8 (12, 3, 32, 32)"),
])
def test_cifar_wrong_data_shape(tmp_path, data, shown):
    write_cifar10(tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "test_batch"
    _dump(batch, {"labels": [0] * ROWS, "data": data}, 4)
    with pytest.raises(DataError) as info:
        load_data(f"cifar10:{tmp_path}")
    assert _one_line(info) == f"cifar10: {batch}: 'data' must be uint8 ({ROWS}, 3072), got {shown}"


def test_cifar_data_not_an_array(tmp_path):
    write_cifar10(tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    _dump(batch, {"labels": [0] * ROWS, "data": [1, 2, 3]}, 2)
    with pytest.raises(DataError, match="'data' must be a numpy array, got list"):
        load_data(f"cifar10:{tmp_path}")


@pytest.mark.parametrize("labels, what", [
    ([10] + [0] * (ROWS - 1), "'labels' has labels outside 0..9 (found 0..10)"),
    ([-1] + [0] * (ROWS - 1), "'labels' has labels outside 0..9 (found -1..0)"),
    ([0] * (ROWS + 1), f"'labels' must be a list of {ROWS} integer labels, got {ROWS + 1} values of type int64"),
    (["cat"] * ROWS, f"'labels' must be a list of {ROWS} integer labels, got {ROWS} values of type <U3"),
    ([[0], [1, 2]] + [0] * (ROWS - 2), f"'labels' must be a list of {ROWS} integer labels, got {ROWS} values of "
                                        "type object"),
    ([2 ** 70] * ROWS, f"'labels' must be a list of {ROWS} integer labels, got {ROWS} values of type object"),
    ("oops", f"'labels' must be a list of {ROWS} integer labels, got str"),
])
def test_cifar_bad_labels(tmp_path, labels, what):
    write_cifar10(tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_5"
    _dump(batch, {"labels": labels, "data": np.zeros((ROWS, CIFAR_ROW_BYTES), np.uint8)}, 2)
    with pytest.raises(DataError) as info:
        load_data(f"cifar10:{tmp_path}")
    assert _one_line(info) == f"cifar10: {batch}: {what}"


def test_cifar10_loader_on_cifar100_file_names_the_other_kind(tmp_path):
    write_cifar10(tmp_path, labels_key="fine_labels")
    with pytest.raises(DataError) as info:
        load_data(f"cifar10:{tmp_path}")
    msg = _one_line(info)
    assert "data_batch_1: has no 'labels' key; it has 'fine_labels'" in msg and "use cifar100:PATH" in msg


def test_cifar100_labels_out_of_range(tmp_path):
    write_cifar100(tmp_path)
    test_file = tmp_path / "cifar-100-python" / "test"
    _dump(test_file, {"fine_labels": [100, 3], "data": np.zeros((2, CIFAR_ROW_BYTES), np.uint8)}, 2)
    with pytest.raises(DataError) as info:
        load_data(f"cifar100:{tmp_path}")
    assert _one_line(info) == f"cifar100: {test_file}: 'fine_labels' has labels outside 0..99 (found 3..100)"


def test_cifar100_spec_on_cifar10_folder(tmp_path):
    write_cifar10(tmp_path)
    with pytest.raises(DataError, match=r"no train here or in cifar-100-python/"):
        load_data(f"cifar100:{tmp_path}")


def test_cifar100_given_a_cifar10_style_batch(tmp_path):
    write_cifar100(tmp_path)
    train = tmp_path / "cifar-100-python" / "train"
    _dump(train, {"labels": [1], "data": np.zeros((1, CIFAR_ROW_BYTES), np.uint8)}, 2)
    with pytest.raises(DataError, match=r"has no 'fine_labels' key; it has 'labels', so it is a cifar10 file"):
        load_data(f"cifar100:{tmp_path}")


def test_cifar_meta_with_wrong_names(tmp_path):
    write_cifar10(tmp_path)
    meta = tmp_path / "cifar-10-batches-py" / "batches.meta"
    _dump(meta, {"num_cases_per_batch": ROWS, "label_names": C10_NAMES[:9]}, 2)
    with pytest.raises(DataError) as info:
        load_data(f"cifar10:{tmp_path}")
    assert _one_line(info) == f"cifar10: {meta}: 'label_names' must be a list of 10 names"


def test_cifar_pickle_that_is_not_a_dict(tmp_path):
    write_cifar10(tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    _dump(batch, [1, 2, 3], 2)
    with pytest.raises(DataError, match=r"data_batch_1: holds a list, expected a dict"):
        load_data(f"cifar10:{tmp_path}")


# ---------------------------------------------------------------------------------------------
# The safe pickle reader
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("protocol, opcode", [(0, "INST"), (1, "GLOBAL"), (2, "GLOBAL"), (3, "GLOBAL"),
                                              (4, "STACK_GLOBAL"), (5, "STACK_GLOBAL")])
@pytest.mark.parametrize("victim", ["data_batch_1", "batches.meta"])
def test_malicious_pickle_is_refused_without_running(tmp_path, protocol, opcode, victim):
    write_cifar10(tmp_path / "c")
    marker = tmp_path / "pwned"
    batch = tmp_path / "c" / "cifar-10-batches-py" / victim
    payload = {"labels": [0] * ROWS, "data": Evil(marker)}
    if protocol == 0:
        # Protocol 0 writes a REDUCE too; hand-write the old-style INST form of the same call.
        batch.write_bytes(b"(ios\nsystem\n.")
    else:
        _dump(batch, payload, protocol)
    with pytest.raises(DataError) as info:
        load_data(f"cifar10:{tmp_path / 'c'}")
    msg = _one_line(info)
    assert msg.startswith(f"cifar10: {batch}: refused pickle opcode {opcode} '")
    assert "system" in msg and msg.endswith(SAFE_SUFFIX)
    assert not marker.exists()


@pytest.mark.parametrize("data, what", [
    (b"\x80\x02cbuiltins\neval\nq\x00.", "refused pickle opcode GLOBAL 'builtins eval'"),
    (b"\x80\x04\x8c\x07numpy.f\x8c\x04load\x93.", "refused pickle opcode STACK_GLOBAL 'numpy.f load'"),
    (b"\x80\x02(K\x01o.", "refused pickle opcode OBJ"),
    (b"\x80\x02]K\x01)\x81.", "refused pickle opcode NEWOBJ"),
    (b"\x80\x02K\x01Q.", "refused pickle opcode BINPERSID"),
    (b"\x80\x02\x82\x01.", "refused pickle opcode EXT1"),
    # Allowed names used outside the shape numpy writes:
    (b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00xX\x05\x00\x00\x00rot13\x86R.",
     "REDUCE _codecs.encode with unexpected arguments"),
    (b"\x80\x02cnumpy\ndtype\nX\x02\x00\x00\x00O8\x85R.",
     "REDUCE numpy.dtype 'O8': only bool, integer and float arrays are read"),
    (b"\x80\x02]K\x01\x85R.", "REDUCE on list"),
    (b"\x80\x02]}b.", "BUILD on list"),
    (b"\x80\x02cnumpy\nndarray\n.", "result holds a bare numpy.ndarray"),
    (b"\x80\x02K\x01K\x02K\x03s.", "SETITEM on int"),
    (b"\x80\x02h\x05.", "memo key 5 read before it was written"),
    (b"\x80\x02e.", "missing MARK"),
    (b"\x80\x02a.", "stack underflow"),
    (b"\x80\x02G?\xf0\x00\x00\x00\x00\x00\x00.", "unsupported pickle opcode BINFLOAT (0x47)"),
    (b"\x80\x06N.", "unsupported pickle protocol 6"),
    (b"\x80\x02}](K\x01e]s.", "dictionary key that is not hashable"),
])
def test_safe_reader_refusals(data, what):
    with pytest.raises(DataError) as info:
        loads_safe(data, "t: f")
    msg = _one_line(info)
    assert msg.startswith(f"t: f: {what} at byte ") and msg.endswith(SAFE_SUFFIX)


def test_safe_reader_refuses_object_arrays():
    data = pickle.dumps({"data": np.array([1, "a"], dtype=object)}, protocol=2)
    with pytest.raises(DataError, match=r"REDUCE numpy.dtype 'O8'"):
        loads_safe(data, "t")


def test_safe_reader_checks_array_byte_count():
    data = pickle.dumps(np.arange(6, dtype=np.uint8), protocol=4)
    bad = data.replace(b"C\x06\x00\x01\x02\x03\x04\x05", b"C\x05\x00\x01\x02\x03\x04")
    assert bad != data
    with pytest.raises(DataError, match=r"numpy array of shape \(6,\) uint8 needs 6 bytes, the file holds 5"):
        loads_safe(bad, "t")


def test_load_safe_missing_file(tmp_path):
    with pytest.raises(DataError) as info:
        load_safe(tmp_path / "x.pkl", "cifar10")
    assert _one_line(info) == f"cifar10: {tmp_path / 'x.pkl'}: file not found"


ARRAYS = {
    "u8": np.arange(24, dtype=np.uint8).reshape(4, 6),
    "big_endian_fortran": np.asfortranarray(np.arange(6, dtype=">i4").reshape(2, 3)),
    "f8": np.linspace(0, 1, 7),
    "bool": np.array([True, False, True]),
    "empty": np.zeros((0, 3), np.int16),
    "zero_d": np.array(5, dtype=np.int64),
    "strided": np.arange(12, dtype=np.int16).reshape(3, 4)[:, ::2],
}


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_safe_reader_matches_pickle_on_arrays(protocol):
    obj = {"arrays": list(ARRAYS.values()), "same": None}
    obj["same"] = obj["arrays"][0]  # memo reference to an array built earlier
    got = loads_safe(pickle.dumps(obj, protocol=protocol), "t")
    for a, b in zip(got["arrays"], ARRAYS.values()):
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
    assert got["same"] is got["arrays"][0]


plain = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2 ** 80), max_value=2 ** 80) | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.tuples(inner, inner)
    | st.dictionaries(st.text(max_size=4) | st.integers() | st.binary(max_size=4), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=60, deadline=None)
@given(value=plain, protocol=st.integers(min_value=2, max_value=5))
def test_safe_reader_matches_pickle_on_plain_values(value, protocol):
    assert loads_safe(pickle.dumps(value, protocol=protocol), "t") == value


@settings(max_examples=150, deadline=None)
@given(data=st.binary(max_size=64))
def test_safe_reader_only_ever_raises_data_error(data):
    try:
        loads_safe(b"\x80\x02" + data, "t")
    except DataError as exc:
        assert "\n" not in str(exc)


def test_every_truncation_is_a_data_error():
    data = pickle.dumps({"data": ARRAYS["u8"], "labels": [1, 2, 300, 70000], "n": "x"}, protocol=2)
    for cut in range(len(data)):
        with pytest.raises(DataError):
            loads_safe(data[:cut], "t")


# ---------------------------------------------------------------------------------------------
# MNIST
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("gz", [False, True])
def test_mnist(tmp_path, gz):
    arrays = write_mnist(tmp_path, gz=gz)
    split = load_data(f"mnist:{tmp_path}", normalize=False)
    assert split.name == "mnist" and split.augment is None and split.train.num_classes == 10
    assert split.train.x.shape == (20, 1, 28, 28) and split.test.x.shape == (8, 1, 28, 28)
    assert np.array_equal(split.train.x[:, 0], arrays["train-images-idx3-ubyte"] / np.float32(255))
    assert np.array_equal(split.test.y, arrays["t10k-labels-idx1-ubyte"])


def test_mnist_missing_file(tmp_path):
    write_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError) as info:
        load_data(f"mnist:{tmp_path}")
    assert _one_line(info) == (f"mnist: {tmp_path / 't10k-labels-idx1-ubyte'}: file not found "
                               "(nor t10k-labels-idx1-ubyte.gz)")


def test_mnist_missing_folder(tmp_path):
    with pytest.raises(DataError, match="folder not found"):
        load_data(f"mnist:{tmp_path / 'x'}")


def test_mnist_wrong_magic(tmp_path):
    write_mnist(tmp_path)
    images = tmp_path / "train-images-idx3-ubyte"
    images.write_bytes((tmp_path / "train-labels-idx1-ubyte").read_bytes())  # a labels file in its place
    with pytest.raises(DataError) as info:
        load_data(f"mnist:{tmp_path}")
    assert _one_line(info) == (f"mnist: {images}: wrong magic number 0x00000801 (expected 0x00000803); "
                               "not an IDX file of this kind")


@pytest.mark.parametrize("cut, what", [
    (-1, "truncated: 15699 bytes, the header's shape 20x28x28 needs 15696"),
    (-100, "truncated: 15596 bytes, the header's shape 20x28x28 needs 15696"),
    (5, "truncated: 5 bytes, shorter than the 16-byte IDX header"),
])
def test_mnist_truncated(tmp_path, cut, what):
    write_mnist(tmp_path)
    images = tmp_path / "train-images-idx3-ubyte"
    data = images.read_bytes()
    images.write_bytes(data[:cut])
    if cut == -1:
        images.write_bytes(data + b"\0\0\0")
        what = "has trailing bytes: 15699 bytes, the header's shape 20x28x28 needs 15696"
    with pytest.raises(DataError) as info:
        load_data(f"mnist:{tmp_path}")
    assert _one_line(info) == f"mnist: {images}: {what}"


def test_mnist_truncated_gz(tmp_path):
    write_mnist(tmp_path, gz=True)
    images = tmp_path / "t10k-images-idx3-ubyte.gz"
    data = images.read_bytes()
    images.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError) as info:
        load_data(f"mnist:{tmp_path}")
    assert _one_line(info).startswith(f"mnist: {images}: not a readable gzip file (EOFError")


def test_mnist_not_gzip(tmp_path):
    write_mnist(tmp_path, gz=True)
    labels = tmp_path / "train-labels-idx1-ubyte.gz"
    labels.write_bytes(b"plain text, not gzip")
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte.gz: not a readable gzip file \(BadGzipFile"):
        load_data(f"mnist:{tmp_path}")


def test_mnist_count_mismatch_and_bad_labels(tmp_path):
    write_mnist(tmp_path)
    labels = tmp_path / "train-labels-idx1-ubyte"
    labels.write_bytes(_idx(np.zeros(19, np.uint8)))
    with pytest.raises(DataError) as info:
        load_data(f"mnist:{tmp_path}")
    assert _one_line(info) == f"mnist: {labels}: has 19 labels but train-images-idx3-ubyte has 20 images"
    labels.write_bytes(_idx(np.full(20, 10, np.uint8)))
    with pytest.raises(DataError) as info:
        load_data(f"mnist:{tmp_path}")
    assert _one_line(info) == f"mnist: {labels}: has labels outside 0..9 (max 10)"


def test_mnist_train_and_test_sizes_differ(tmp_path):
    write_mnist(tmp_path)
    rng = np.random.default_rng(0)
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(_idx(rng.integers(0, 255, (8, 20, 20), dtype=np.uint8)))
    with pytest.raises(DataError, match="train images are 28x28 but test images 20x20"):
        load_data(f"mnist:{tmp_path}")


# ---------------------------------------------------------------------------------------------
# npz
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape, expect", [
    ((40, 28, 28), (1, 28, 28)),
    ((40, 3, 8, 8), (3, 8, 8)),
    ((40, 8, 8, 3), (3, 8, 8)),
    ((40, 8, 8, 1), (1, 8, 8)),
    ((40, 1, 8, 8), (1, 8, 8)),
    ((40, 17), (17,)),
])
def test_npz_layouts(tmp_path, shape, expect):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=shape, dtype=np.uint8)
    y = np.arange(40) % 4
    xt = rng.integers(0, 256, size=(6,) + shape[1:], dtype=np.uint8)
    p = tmp_path / "d.npz"
    np.savez(p, x=x, y=y, x_test=xt, y_test=np.arange(6) % 5)
    split = load_data(f"npz:{p}", normalize=False)
    assert split.train.sample_shape == expect and split.test.sample_shape == expect
    assert split.num_classes == 5 and split.train.num_classes == 5
    assert split.augment is None
    nchw = x.transpose(0, 3, 1, 2) if shape == (40, 8, 8, 3) or shape == (40, 8, 8, 1) else x
    assert np.array_equal(split.train.x.reshape((40,) + expect), nchw.reshape((40,) + expect) / np.float32(255))


def test_npz_float_data_and_flat_normalization(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.normal(3.0, 2.0, size=(50, 6)).astype(np.float64)
    p = tmp_path / "d.npz"
    np.savez(p, x=x, y=np.arange(50) % 2, x_test=x[:5], y_test=np.zeros(5, np.int32))
    raw = load_data(f"npz:{p}", normalize=False)
    assert np.array_equal(raw.train.x, x.astype(np.float32))
    split = load_data(f"npz:{p}")
    assert split.train.channels == 1 and len(split.train.mean) == 1  # flat vectors: one global statistic
    assert split.train.mean[0] == pytest.approx(x.astype(np.float32).astype(np.float64).mean(), rel=1e-9)
    assert abs(split.train.x.mean(dtype=np.float64)) < 1e-5
    assert split.test.y.dtype == np.int64


def test_npz_holdout_is_stratified_and_seeded(tmp_path):
    y = np.repeat(np.arange(4), [50, 30, 10, 10])
    x = np.arange(100 * 4, dtype=np.float32).reshape(100, 4)
    p = tmp_path / "d.npz"
    np.savez(p, x=x, y=y)
    split = load_data(f"npz:{p}", seed=3)
    assert len(split.test) == 10 and len(split.train) == 90
    assert np.bincount(split.test.y, minlength=4).tolist() == [5, 3, 1, 1]
    # Held-out rows and training rows are disjoint and together are all of x.
    raw = load_data(f"npz:{p}", seed=3, normalize=False)
    rows = np.concatenate([raw.train.x[:, 0], raw.test.x[:, 0]])
    assert sorted(rows.tolist()) == x[:, 0].tolist()
    again = load_data(f"npz:{p}", seed=3, normalize=False)
    assert np.array_equal(again.test.x, raw.test.x)
    other = load_data(f"npz:{p}", seed=4, normalize=False)
    assert not np.array_equal(other.test.x, raw.test.x)
    quarter = load_data(f"npz:{p}", val_fraction=0.25, normalize=False)
    assert len(quarter.test) == 25


@given(counts=st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=6),
       fraction=st.floats(min_value=0.05, max_value=0.95), seed=st.integers(0, 2 ** 32 - 1))
@settings(max_examples=60, deadline=None)
def test_stratified_holdout_properties(counts, fraction, seed):
    y = np.repeat(np.arange(len(counts)), counts)
    train, test = stratified_holdout(y, fraction, seed)
    n = len(y)
    assert len(test) == int(np.floor(n * fraction + 0.5))
    assert np.array_equal(np.sort(np.concatenate([train, test])), np.arange(n))
    per_class = np.bincount(y[test], minlength=len(counts))
    # Each class contributes its share, rounded up or down.
    assert np.all(np.abs(per_class - np.array(counts) * fraction) < 1.0)
    again = stratified_holdout(y, fraction, seed)
    assert np.array_equal(again[1], test)


def _npz(tmp_path, **arrays) -> Path:
    p = tmp_path / "d.npz"
    np.savez(p, **arrays)
    return p


X8 = np.zeros((10, 4, 4), np.uint8)
Y10 = np.arange(10) % 2


@pytest.mark.parametrize("arrays, what", [
    ({"x": X8}, "missing array(s) y (has x)"),
    ({"x": X8, "y": Y10, "x_test": X8}, "has x_test but not y_test; give both or neither"),
    ({"x": X8, "y": Y10, "y_test": Y10}, "has y_test but not x_test; give both or neither"),
    ({"x": X8.astype(np.int32), "y": Y10}, "x must be uint8 pixels or floating point, got int32"),
    ({"x": np.zeros(10, np.uint8), "y": Y10},
     "x must be (N, D), (N, H, W), (N, C, H, W) or (N, H, W, C) with N > 0, got (10,)"),
    ({"x": np.zeros((0, 4), np.uint8), "y": np.zeros(0, int)},
     "x must be (N, D), (N, H, W), (N, C, H, W) or (N, H, W, C) with N > 0, got (0, 4)"),
    ({"x": np.full((10, 3), np.nan), "y": Y10}, "x holds NaN or infinite values (as float32)"),
    ({"x": np.full((10, 3), 1e39), "y": Y10}, "x holds NaN or infinite values (as float32)"),
    ({"x": X8, "y": Y10.astype(np.float32)}, "y must hold integer class labels, got float32"),
    ({"x": X8, "y": Y10 > 0}, "y must hold integer class labels, got bool"),
    ({"x": X8, "y": Y10[:9]}, "y must have shape (10,) to match its x, got (9,)"),
    ({"x": X8, "y": Y10[:, None]}, "y must have shape (10,) to match its x, got (10, 1)"),
    ({"x": X8, "y": Y10 - 1}, "y has negative labels (min -1)"),
    ({"x": X8, "y": Y10, "x_test": np.zeros((3, 5, 5), np.uint8), "y_test": Y10[:3]},
     "x_test samples have shape (1, 5, 5) but x samples (1, 4, 4)"),
    ({"x": X8[:4], "y": Y10[:4]}, "4 samples are too few to hold out 10% for testing; add x_test and y_test"),
])
def test_npz_errors(tmp_path, arrays, what):
    p = _npz(tmp_path, **arrays)
    with pytest.raises(DataError) as info:
        load_data(f"npz:{p}")
    assert _one_line(info) == f"npz: {p}: {what}"


def test_npz_object_arrays_are_not_unpickled(tmp_path):
    marker = tmp_path / "pwned"
    p = _npz(tmp_path, x=np.array([Evil(marker)] * 10, dtype=object), y=Y10)
    with pytest.raises(DataError) as info:
        load_data(f"npz:{p}")
    assert "not a readable .npz file (Object arrays cannot be loaded when allow_pickle=False)" in _one_line(info)
    assert not marker.exists()


@pytest.mark.parametrize("content, what", [
    (None, "file not found"),
    (b"not a zip at all\n" * 4, "not a readable .npz file"),
])
def test_npz_missing_or_garbage(tmp_path, content, what):
    p = tmp_path / "d.npz"
    if content is not None:
        p.write_bytes(content)
    with pytest.raises(DataError) as info:
        load_data(f"npz:{p}")
    assert _one_line(info).startswith(f"npz: {p}: {what}")


def test_npz_truncated_and_single_npy(tmp_path):
    p = _npz(tmp_path, x=np.zeros((30, 8, 8), np.uint8), y=np.arange(30) % 3)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"d.npz: not a readable .npz file"):
        load_data(f"npz:{p}")
    npy = tmp_path / "x.npy"
    np.save(npy, np.zeros(3))
    with pytest.raises(DataError, match=r"x.npy: holds a single .npy array, expected an .npz archive with x and y"):
        load_data(f"npz:{npy}")


# ---------------------------------------------------------------------------------------------
# Normalisation and augmentation
# ---------------------------------------------------------------------------------------------

def test_channel_stats_against_numpy():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(2100, 3, 4, 5)).astype(np.float32) * np.array([1, 2, 3], np.float32)[None, :, None, None]
    mean, std = channel_stats(x)
    ref = x.astype(np.float64)
    assert np.allclose(mean, ref.mean(axis=(0, 2, 3)), rtol=1e-12, atol=1e-14)
    assert np.allclose(std, ref.std(axis=(0, 2, 3)), rtol=1e-12)


def test_constant_channel_is_not_divided_by_zero(tmp_path):
    x = np.zeros((20, 2, 4, 4), np.float32)
    x[:, 1] = np.arange(20)[:, None, None]
    p = _npz(tmp_path, x=x, y=np.arange(20) % 2)
    split = load_data(f"npz:{p}")
    assert split.train.std[0] == 1.0 and np.isfinite(split.train.x).all()
    assert np.all(split.train.x[:, 0] == 0)


def _batch(n=6, c=3, h=5, w=7) -> np.ndarray:
    return np.arange(n * c * h * w, dtype=np.float32).reshape(n, c, h, w) + 1


def test_augment_is_a_function_of_seed_and_step():
    x = _batch()
    aug = Augment(pad=2, flip=True)
    assert np.array_equal(aug(x, 0, 7), aug(x, 0, 7))
    assert not np.array_equal(aug(x, 0, 7), aug(x, 0, 8))
    assert not np.array_equal(aug(x, 1, 7), aug(x, 0, 7))
    assert np.array_equal(x, _batch())  # the input batch is left alone


def test_augment_crop_and_flip_match_a_reference():
    x = _batch()
    pad, seed, step = 2, 11, 3
    got = Augment(pad=pad, flip=True)(x, seed, step)
    rng = augment_rng(seed, step)
    dy, dx = rng.integers(0, 2 * pad + 1, size=6), rng.integers(0, 2 * pad + 1, size=6)
    flip = rng.random(6) < 0.5
    for i in range(6):
        padded = np.pad(x[i], ((0, 0), (pad, pad), (pad, pad)))
        crop = padded[:, dy[i]:dy[i] + 5, dx[i]:dx[i] + 7]
        assert np.array_equal(got[i], crop[..., ::-1] if flip[i] else crop)
    assert flip.any() and not flip.all()


def test_augment_identity_and_flat_batches():
    x = _batch()
    assert np.array_equal(Augment()(x, 0, 0), x)
    with pytest.raises(DataError, match=r"crop/flip augmentation needs NCHW images, got a batch of shape \(4, 3\)"):
        Augment(pad=4)(np.zeros((4, 3), np.float32), 0, 0)
    with pytest.raises(DataError, match="padding must be >= 0"):
        Augment(pad=-1)


# ---------------------------------------------------------------------------------------------
# Loader
# ---------------------------------------------------------------------------------------------

def _dataset(n=23, shape=(1, 2, 2)) -> Dataset:
    x = np.arange(n * int(np.prod(shape)), dtype=np.float32).reshape((n,) + shape)
    return Dataset(x, np.arange(n, dtype=np.int64) % 3, 3, "toy", (0.0,) * shape[0], (1.0,) * shape[0])


def test_loader_drops_partial_batch_and_reshuffles_each_epoch():
    loader = Loader(_dataset(23), 5, seed=9)
    assert loader.steps_per_epoch == 4
    epoch0 = np.concatenate([loader.batch_at(s)[1] for s in range(4)])
    idx0 = np.concatenate([loader.indices_at(s) for s in range(4)])
    idx1 = np.concatenate([loader.indices_at(s) for s in range(4, 8)])
    assert len(set(idx0.tolist())) == 20 and len(set(idx1.tolist())) == 20  # no repeats within an epoch
    assert not np.array_equal(idx0, idx1)
    assert np.array_equal(epoch0, np.arange(23)[idx0] % 3)
    assert all(len(loader.batch_at(s)[0]) == 5 for s in range(12))


def test_loader_matches_training_batches():
    loader = Loader(_dataset(23), 5, seed=4)
    reference = training_batches(23, 5, 4)
    for step in range(13):
        assert np.array_equal(loader.indices_at(step), next(reference))


def test_batch_at_resume_equivalence():
    data = _dataset(37, (3, 4, 4))
    uninterrupted = Loader(data, 8, seed=2, augment=Augment(pad=1, flip=True))
    straight = [uninterrupted.batch_at(s) for s in range(30)]
    resumed = Loader(data, 8, seed=2, augment=Augment(pad=1, flip=True))
    for step, (x, y) in zip(range(17, 30), resumed.batches(start_step=17)):
        assert np.array_equal(x, straight[step][0]) and np.array_equal(y, straight[step][1])
    # Random access in any order gives the same batches too (the permutation cache must not leak).
    jumpy = Loader(data, 8, seed=2, augment=Augment(pad=1, flip=True))
    for step in (29, 3, 17, 4, 28, 0):
        assert np.array_equal(jumpy.batch_at(step)[0], straight[step][0])
    assert len(list(resumed.batches(5, num_steps=3))) == 3


def test_loader_seed_changes_order():
    a, b = Loader(_dataset(), 4, seed=0), Loader(_dataset(), 4, seed=1)
    assert not np.array_equal(a.indices_at(0), b.indices_at(0))


def test_iterate_eval_in_order_with_tail():
    data = _dataset(23)
    batches = list(iterate_eval(data, 10))
    assert [len(y) for _, y in batches] == [10, 10, 3]
    assert np.array_equal(np.concatenate([x for x, _ in batches]), data.x)
    via_loader = list(Loader(data, 5, augment=Augment(pad=1, flip=True)).iterate_eval(10))
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(batches, via_loader))


def test_loader_errors():
    with pytest.raises(DataError) as info:
        Loader(_dataset(23), 24)
    assert _one_line(info) == "toy: batch size 24 is larger than the 23 training samples"
    with pytest.raises(DataError, match="batch size must be at least 1, got 0"):
        Loader(_dataset(23), 0)
    with pytest.raises(ValueError, match="step must be >= 0"):
        Loader(_dataset(23), 4).batch_at(-1)
    flat = Dataset(np.zeros((8, 5), np.float32), np.zeros(8, np.int64), 2, "flat", (0.0,), (1.0,))
    with pytest.raises(DataError, match=r"flat: crop/flip augmentation needs images, but samples have shape \(5,\)"):
        Loader(flat, 4, augment=CIFAR_AUGMENT)


# ---------------------------------------------------------------------------------------------
# check_fits and Dataset invariants
# ---------------------------------------------------------------------------------------------

def test_check_fits_with_the_shipped_model():
    model = edgetrain.load(Path(edgetrain.__file__).parent / "assets" / "lenet5_digits.onnx")
    split = load_data("digits")
    logits = model(split.test.x[:2])
    check_fits(split.train, model.input_shape, logits.shape[1])


def test_check_fits_shape_mismatch(tmp_path):
    write_cifar10(tmp_path)
    split = load_data(f"cifar10:{tmp_path}")
    with pytest.raises(DataError) as info:
        check_fits(split.train, (None, 1, 28, 28), 10)
    assert _one_line(info) == ("cifar10: data samples have shape (3, 32, 32) but the model input is (N, 1, 28, 28); "
                               "use data of the model's size or a model built for this data")
    check_fits(split.train, (None, 3, None, "width"), 10)  # free dimensions match anything
    check_fits(split.train, (3, 32, 32), 10)  # a shape without the batch dimension


def test_check_fits_too_many_classes(tmp_path):
    write_cifar100(tmp_path)
    split = load_data(f"cifar100:{tmp_path}")
    with pytest.raises(DataError) as info:
        check_fits(split.train, (1, 3, 32, 32), 10)
    assert _one_line(info) == "cifar100: data has 100 classes but the model outputs 10; use a new classifier head"
    check_fits(split.train, (1, 3, 32, 32), 100)
    check_fits(split.train, (1, 3, 32, 32), None)


def test_check_fits_flat_data():
    data = Dataset(np.zeros((4, 784), np.float32), np.zeros(4, np.int64), 10, "flat", (0.0,), (1.0,))
    check_fits(data, (None, 784), 10)
    with pytest.raises(DataError, match=r"data samples have shape \(784,\) but the model input is \(N, 1, 28, 28\)"):
        check_fits(data, (None, 1, 28, 28), 10)


def test_dataset_invariants():
    x = np.zeros((4, 1, 2, 2), np.float32)
    with pytest.raises(DataError, match="y must be int64"):
        Dataset(x, np.zeros(4, np.int32), 2, "d", (0.0,), (1.0,))
    with pytest.raises(DataError, match="x must be float32"):
        Dataset(x.astype(np.float64), np.zeros(4, np.int64), 2, "d", (0.0,), (1.0,))
    with pytest.raises(DataError, match="mean/std need 1 values"):
        Dataset(x, np.zeros(4, np.int64), 2, "d", (0.0, 0.0), (1.0,))
    split = Split(_dataset(), _dataset(5))
    assert split.augment is None and split.num_classes == 3
    assert dataclasses.replace(split, augment=CIFAR_AUGMENT).augment.pad == 4
