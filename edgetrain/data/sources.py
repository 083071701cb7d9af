"""Data specs ("digits", "cifar10:PATH", ...) and load_data, which reads and prepares a Split."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from edgetrain.data.cifar import load_cifar_split
from edgetrain.data.dataset import Split
from edgetrain.data.digits import load_digits_split
from edgetrain.data.holdout import DEFAULT_VAL_FRACTION, check_fraction
from edgetrain.data.mnist import load_mnist_split
from edgetrain.data.normalize import normalize_split
from edgetrain.data.npz import load_npz_split
from edgetrain.data.transforms import CIFAR_AUGMENT, Augment
from edgetrain.errors import DataError

DEFAULT_SPEC = "digits"
# kind -> whether it needs a PATH; digits takes an optional one (another digits.npz).
KINDS = {"digits": False, "cifar10": True, "cifar100": True, "mnist": True, "npz": True}
DEFAULT_AUGMENT: dict[str, Augment | None] = {
    "digits": None, "mnist": None, "npz": None,  # unknown or digit data: flips and crops could be wrong
    "cifar10": CIFAR_AUGMENT, "cifar100": CIFAR_AUGMENT,
}
SEPARATOR = ":"


def _valid() -> str:
    return ", ".join(kind + (f"{SEPARATOR}PATH" if needs else "") for kind, needs in KINDS.items())


def parse_spec(spec: str) -> tuple[str, Path | None]:
    """Split 'kind:PATH' into (kind, Path); 'digits' alone gives ('digits', None)."""
    kind, sep, rest = spec.strip().partition(SEPARATOR)
    kind = kind.lower()
    if kind not in KINDS:
        raise DataError(f"unknown data source {spec!r} (valid: {_valid()})")
    if not sep or not rest:
        if KINDS[kind]:
            raise DataError(f"data source {spec!r} needs a path: {kind}{SEPARATOR}PATH")
        return kind, None
    return kind, Path(rest).expanduser()


def load_data(spec: str = DEFAULT_SPEC, *, seed: int = 0, normalize: bool = True,
              val_fraction: float = DEFAULT_VAL_FRACTION) -> Split:
    """Read a data source; normalise both splits with training statistics; attach its default augmentation."""
    check_fraction(val_fraction)
    kind, path = parse_spec(spec)
    if kind == "digits":
        split = load_digits_split(path)
    elif kind in ("cifar10", "cifar100"):
        split = load_cifar_split(kind, path)
    elif kind == "mnist":
        split = load_mnist_split(path)
    else:
        split = load_npz_split(path, seed=seed, val_fraction=val_fraction)
    if normalize:
        split = normalize_split(split, copy=False)  # the arrays were just made here; a copy would double memory
    augment = DEFAULT_AUGMENT[kind] if split.train.x.ndim == 4 else None
    return dataclasses.replace(split, augment=augment)
