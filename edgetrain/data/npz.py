"""User arrays in an .npz file: x and y, optionally x_test and y_test."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgetrain.data.dataset import Dataset, Split
from edgetrain.data.holdout import DEFAULT_VAL_FRACTION, stratified_holdout
from edgetrain.data.npzfile import NpzError, read_npz
from edgetrain.data.transforms import uint8_to_unit
from edgetrain.errors import DataError

NPZ_NAME = "npz"
TRAIN_KEYS = ("x", "y")
TEST_KEYS = ("x_test", "y_test")
# A last axis of this size (and a second that is not) marks channels-last images.
CHANNEL_COUNTS = (1, 3)
FLAT, GRAY, IMAGE = 2, 3, 4  # x.ndim of (N, D), (N, H, W), (N, C, H, W) / (N, H, W, C)


def _fail(path: Path, what: str) -> DataError:
    return DataError(f"{NPZ_NAME}: {path}: {what}")


def _read(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise _fail(path, "file not found")
    try:
        arrays = read_npz(path, TRAIN_KEYS, TEST_KEYS, where=f"{NPZ_NAME}: {path}")
    except NpzError as exc:
        raise _fail(path, exc.describe("an .npz archive with x and y")) from exc
    present = [k for k in TEST_KEYS if k in arrays]
    if len(present) == 1:
        other = TEST_KEYS[1 - TEST_KEYS.index(present[0])]
        raise _fail(path, f"has {present[0]} but not {other}; give both or neither")
    return arrays


def _to_float(path: Path, key: str, x: np.ndarray) -> np.ndarray:
    """x as float32 NCHW (or (N, D)); uint8 is read as pixels and scaled to [0, 1]."""
    if x.ndim not in (FLAT, GRAY, IMAGE) or x.shape[0] == 0 or 0 in x.shape:
        raise _fail(path, f"{key} must be (N, D), (N, H, W), (N, C, H, W) or (N, H, W, C) with N > 0, got {x.shape}")
    if x.dtype == np.uint8:
        out = uint8_to_unit(x)
    elif np.issubdtype(x.dtype, np.floating):
        with np.errstate(over="ignore"):  # values beyond float32 become inf, which the check below reports
            out = x.astype(np.float32)
        if not np.isfinite(out).all():
            raise _fail(path, f"{key} holds NaN or infinite values (as float32)")
    else:
        raise _fail(path, f"{key} must be uint8 pixels or floating point, got {x.dtype}")
    if out.ndim == GRAY:
        out = out[:, None, :, :]
    elif out.ndim == IMAGE and out.shape[3] in CHANNEL_COUNTS and out.shape[1] not in CHANNEL_COUNTS:
        out = out.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(out)


def _labels(path: Path, key: str, y: np.ndarray, n: int) -> np.ndarray:
    if not (np.issubdtype(y.dtype, np.integer) and not np.issubdtype(y.dtype, np.bool_)):
        raise _fail(path, f"{key} must hold integer class labels, got {y.dtype}")
    if y.shape != (n,):
        raise _fail(path, f"{key} must have shape ({n},) to match its x, got {y.shape}")
    if y.min() < 0:
        raise _fail(path, f"{key} has negative labels (min {int(y.min())})")
    return y.astype(np.int64)


def load_npz_split(path: Path, *, seed: int = 0, val_fraction: float = DEFAULT_VAL_FRACTION) -> Split:
    """Read an .npz; without x_test/y_test, hold out a stratified val_fraction of x/y for testing."""
    arrays = _read(path)
    x = _to_float(path, "x", arrays["x"])
    y = _labels(path, "y", arrays["y"], x.shape[0])
    if "x_test" in arrays:
        x_test = _to_float(path, "x_test", arrays["x_test"])
        if x_test.shape[1:] != x.shape[1:]:
            raise _fail(path, f"x_test samples have shape {x_test.shape[1:]} but x samples {x.shape[1:]}")
        y_test = _labels(path, "y_test", arrays["y_test"], x_test.shape[0])
    else:
        train_idx, test_idx = stratified_holdout(y, val_fraction, seed)
        if len(test_idx) == 0 or len(train_idx) == 0:
            raise _fail(path, f"{len(y)} samples are too few to hold out {val_fraction:.0%} for testing; "
                              "add x_test and y_test")
        x, x_test, y, y_test = x[train_idx], x[test_idx], y[train_idx], y[test_idx]
    num_classes = int(max(y.max(), y_test.max())) + 1
    channels = x.shape[1] if x.ndim == IMAGE else 1
    identity = ((0.0,) * channels, (1.0,) * channels)
    return Split(Dataset(x, y, num_classes, NPZ_NAME, *identity),
                 Dataset(x_test, y_test, num_classes, NPZ_NAME, *identity))
