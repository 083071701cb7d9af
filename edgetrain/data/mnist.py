"""MNIST-format IDX files (MNIST, Fashion-MNIST, KMNIST): raw or .gz, magic numbers and sizes checked (a .gz is
inflated only as far as its header says, within the memory budget: edgetrain.limits)."""

from __future__ import annotations

import gzip
import math
import zlib
from pathlib import Path
from typing import BinaryIO

import numpy as np

from edgetrain import limits
from edgetrain.data.dataset import Dataset, Split
from edgetrain.data.transforms import uint8_to_unit
from edgetrain.errors import DataError

MNIST_NAME = "mnist"
MNIST_CLASSES = 10
GZ_SUFFIX = ".gz"
# IDX header: two zero bytes, element type, dimension count; then one big-endian uint32 per dimension.
IDX_UINT8 = 0x08
IMAGES_MAGIC = (IDX_UINT8 << 8) | 3  # 0x00000803: uint8, 3 dimensions (N, rows, cols)
LABELS_MAGIC = (IDX_UINT8 << 8) | 1  # 0x00000801: uint8, 1 dimension (N)
HEADER_WORD = 4
FILES = {  # split -> (images, labels)
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _fail(path: Path, what: str) -> DataError:
    return DataError(f"{MNIST_NAME}: {path}: {what}")


def _find(folder: Path, name: str) -> Path:
    for candidate in (folder / name, folder / (name + GZ_SUFFIX)):
        if candidate.is_file():
            return candidate
    raise _fail(folder / name, f"file not found (nor {name}{GZ_SUFFIX})")


def _open(path: Path) -> BinaryIO:
    """The file's bytes as a stream: decompressed as it is read for a .gz (never inflated whole up front)."""
    try:
        raw = open(path, "rb")
    except OSError as exc:
        raise _fail(path, f"cannot be read ({exc.strerror or type(exc).__name__})") from None
    return gzip.GzipFile(fileobj=raw, mode="rb") if path.name.endswith(GZ_SUFFIX) else raw


def _read(stream: BinaryIO, path: Path, n: int) -> bytes:
    """Up to n bytes; a broken .gz is one line (gzip.BadGzipFile is an OSError, a cut-off one EOFError)."""
    try:
        return stream.read(n)
    except (OSError, EOFError, zlib.error) as exc:
        raise _fail(path, f"not a readable gzip file ({type(exc).__name__}: {exc})") from None


def read_idx(path: Path, magic: int) -> np.ndarray:
    """Read an IDX uint8 file whose magic number must be `magic`; shape from its header.

    The header's size is checked against the memory budget before the data is read, and a .gz is inflated
    only up to that size plus one byte: a file that inflates past it is refused, however far it would go.
    """
    ndim = magic & 0xFF
    header = HEADER_WORD * (1 + ndim)
    stream = _open(path)
    with stream:
        head = _read(stream, path, header)
        if len(head) < header:
            raise _fail(path, f"truncated: {len(head)} bytes, shorter than the {header}-byte IDX header")
        found = int.from_bytes(head[:HEADER_WORD], "big")
        if found != magic:
            raise _fail(path, f"wrong magic number 0x{found:08x} (expected 0x{magic:08x}); "
                              "not an IDX file of this kind")
        shape = tuple(int.from_bytes(head[HEADER_WORD * (i + 1):HEADER_WORD * (i + 2)], "big") for i in range(ndim))
        size = math.prod(shape)
        limits.check(size, f"{MNIST_NAME}: {path}: data of shape {'x'.join(map(str, shape))} (uint8)")
        data = _read(stream, path, size)
        if len(data) < size:
            raise _fail(path, f"truncated: {header + len(data)} bytes, the header's shape "
                              f"{'x'.join(map(str, shape))} needs {header + size}")
        if _read(stream, path, 1):
            # a .gz is not inflated further to count how many more there are
            found = "more" if path.name.endswith(GZ_SUFFIX) else str(path.stat().st_size)
            raise _fail(path, f"has trailing bytes: {found} bytes, the header's shape {'x'.join(map(str, shape))} "
                              f"needs {header + size}")
    return np.frombuffer(data, dtype=np.uint8).reshape(shape)


def _load(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    images_name, labels_name = FILES[split]
    images_path, labels_path = _find(folder, images_name), _find(folder, labels_name)
    images, labels = read_idx(images_path, IMAGES_MAGIC), read_idx(labels_path, LABELS_MAGIC)
    if len(images) != len(labels):
        raise _fail(labels_path, f"has {len(labels)} labels but {images_path.name} has {len(images)} images")
    if len(images) == 0:
        raise _fail(images_path, "holds no images")
    if labels.max() >= MNIST_CLASSES:
        raise _fail(labels_path, f"has labels outside 0..{MNIST_CLASSES - 1} (max {int(labels.max())})")
    return images, labels


def load_mnist_split(folder: Path) -> Split:
    """Read train-* and t10k-* IDX files from a folder as a Split in [0, 1]."""
    if not folder.is_dir():
        raise _fail(folder, "folder not found")
    (x, y), (xt, yt) = _load(folder, "train"), _load(folder, "test")
    if x.shape[1:] != xt.shape[1:]:
        raise _fail(folder, f"train images are {x.shape[1]}x{x.shape[2]} but test images {xt.shape[1]}x{xt.shape[2]}")
    identity = ((0.0,), (1.0,))
    return Split(Dataset(uint8_to_unit(x)[:, None], y.astype(np.int64), MNIST_CLASSES, MNIST_NAME, *identity),
                 Dataset(uint8_to_unit(xt)[:, None], yt.astype(np.int64), MNIST_CLASSES, MNIST_NAME, *identity))
