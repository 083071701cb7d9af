"""CIFAR-10/100 "python version" folders, read with the safe pickle reader (nothing is unpickled)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgetrain.data.dataset import Dataset, Split
from edgetrain.data.safe_pickle import load_safe
from edgetrain.data.transforms import concat_uint8_to_unit
from edgetrain.errors import DataError

CIFAR_CHANNELS = 3
CIFAR_SIDE = 32
CIFAR_ROW_BYTES = CIFAR_CHANNELS * CIFAR_SIDE * CIFAR_SIDE  # one image: 1024 R, 1024 G, 1024 B bytes
DATA_KEY = "data"
ROWS_KEY = "num_cases_per_batch"  # CIFAR-10's batches.meta: 10000 in the real files
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")


@dataclass(frozen=True)
class Layout:
    """Where one CIFAR variant keeps its files and what its pickles call things."""

    name: str
    folder: str
    train: tuple[str, ...]
    test: tuple[str, ...]
    meta: str
    label_key: str
    names_key: str
    classes: int
    other_name: str
    other_label_key: str


CIFAR10 = Layout("cifar10", "cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",),
                 "batches.meta", "labels", "label_names", 10, "cifar100", "fine_labels")
CIFAR100 = Layout("cifar100", "cifar-100-python", ("train",), ("test",), "meta",
                  "fine_labels", "fine_label_names", 100, "cifar10", "labels")
LAYOUTS = {layout.name: layout for layout in (CIFAR10, CIFAR100)}


def _fail(layout: Layout, path: Path, what: str) -> DataError:
    return DataError(f"{layout.name}: {path}: {what}")


def _field(record: dict[Any, Any], key: str) -> Any:
    """record[key]; Python 2 pickles (the original files) have bytes keys, re-saved ones str keys."""
    if key in record:
        return record[key]
    return record.get(key.encode("ascii"))


def _read_dict(layout: Layout, path: Path) -> dict[Any, Any]:
    record = load_safe(path, layout.name)
    if not isinstance(record, dict):
        raise _fail(layout, path, f"holds a {type(record).__name__}, expected a dict")
    return record


def find_folder(layout: Layout, path: Path) -> Path:
    """The folder holding the batch files: PATH itself or PATH/<standard folder name>."""
    if path.is_file() and path.name.endswith(ARCHIVE_SUFFIXES):
        raise _fail(layout, path, f"is an archive; extract it first (tar xf {path.name}) and give the folder")
    if not path.is_dir():
        raise _fail(layout, path, "folder not found")
    for folder in (path, path / layout.folder):
        if (folder / layout.train[0]).is_file():
            return folder
    raise _fail(layout, path, f"no {layout.train[0]} here or in {layout.folder}/ "
                              f"(expected the {layout.name} python-version layout)")


def _class_names(layout: Layout, folder: Path) -> tuple[tuple[str, ...], int | None]:
    """Class names and, if the meta file gives one, the row count of every batch."""
    path = folder / layout.meta
    meta = _read_dict(layout, path)
    names = _field(meta, layout.names_key)
    if (not isinstance(names, list) or len(names) != layout.classes
            or not all(isinstance(n, (str, bytes)) for n in names)):
        raise _fail(layout, path, f"'{layout.names_key}' must be a list of {layout.classes} names")
    rows = _field(meta, ROWS_KEY)
    if rows is not None and (type(rows) is not int or rows <= 0):
        raise _fail(layout, path, f"'{ROWS_KEY}' must be a positive integer, got {rows!r}")
    decoded = tuple(n.decode("utf-8", "replace") if isinstance(n, bytes) else n for n in names)
    return decoded, rows


def _read_batch(layout: Layout, path: Path, rows: int | None) -> tuple[np.ndarray, np.ndarray]:
    record = _read_dict(layout, path)
    data = _field(record, DATA_KEY)
    labels = _field(record, layout.label_key)
    if labels is None:
        other = layout.other_name
        hint = (f"; it has '{layout.other_label_key}', so it is a {other} file (use {other}:PATH)"
                if _field(record, layout.other_label_key) is not None else "")
        raise _fail(layout, path, f"has no '{layout.label_key}' key{hint}")
    if not isinstance(data, np.ndarray):
        raise _fail(layout, path, f"'{DATA_KEY}' must be a numpy array, got {type(data).__name__}")
    n = data.shape[0] if data.ndim else 0
    want = rows if rows is not None else n
    if data.dtype != np.uint8 or data.shape != (want, CIFAR_ROW_BYTES) or n == 0:
        raise _fail(layout, path,
                    f"'{DATA_KEY}' must be uint8 ({want}, {CIFAR_ROW_BYTES}), got {data.dtype} {data.shape}")
    return data, _labels(layout, path, labels, n)


def _labels(layout: Layout, path: Path, labels: Any, n: int) -> np.ndarray:
    """The label list as int64, checked against the row count and the class count."""
    want = f"'{layout.label_key}' must be a list of {n} integer labels"
    if not isinstance(labels, (list, np.ndarray)):
        raise _fail(layout, path, f"{want}, got {type(labels).__name__}")
    try:
        y = np.asarray(labels)
    except (ValueError, OverflowError):  # ragged nesting
        y = np.zeros(0, object)
    if y.dtype.kind not in "iu" or y.shape != (n,):
        raise _fail(layout, path, f"{want}, got {len(labels)} values of type {y.dtype}")
    if y.min() < 0 or y.max() >= layout.classes:
        raise _fail(layout, path, f"'{layout.label_key}' has labels outside 0..{layout.classes - 1} "
                                  f"(found {int(y.min())}..{int(y.max())})")
    return y.astype(np.int64)


def _dataset(layout: Layout, folder: Path, files: tuple[str, ...], rows: int | None,
             names: tuple[str, ...]) -> Dataset:
    batches = [_read_batch(layout, folder / f, rows) for f in files]
    x = concat_uint8_to_unit([b[0].reshape(-1, CIFAR_CHANNELS, CIFAR_SIDE, CIFAR_SIDE) for b in batches])
    y = np.concatenate([b[1] for b in batches])
    identity = ((0.0,) * CIFAR_CHANNELS, (1.0,) * CIFAR_CHANNELS)
    return Dataset(x, y, layout.classes, layout.name, *identity, class_names=names)


def load_cifar_split(name: str, path: Path) -> Split:
    """Read a CIFAR-10 ('cifar10') or CIFAR-100 ('cifar100') folder as a Split in [0, 1]."""
    layout = LAYOUTS[name]
    folder = find_folder(layout, path)
    names, rows = _class_names(layout, folder)
    return Split(_dataset(layout, folder, layout.train, rows, names),
                 _dataset(layout, folder, layout.test, rows, names))
