"""ONNX model builders for edgetrain: a registry of seeded, torch-named reference models."""

from __future__ import annotations

import functools
import os
import secrets
from typing import Callable

import onnx

from .lenet import lenet5
from .mlp import mlp_classifier
from .mobilenetv2 import mobilenetv2_cifar
from .resnet import cifar_resnet

BUILDERS: dict[str, Callable[..., onnx.ModelProto]] = {
    "resnet8": functools.partial(cifar_resnet, 8),
    "resnet20": functools.partial(cifar_resnet, 20),
    "resnet38": functools.partial(cifar_resnet, 38),
    "resnet74": functools.partial(cifar_resnet, 74),
    "mobilenetv2": mobilenetv2_cifar,
    "lenet5": lenet5,
    "mlp": mlp_classifier,
}

NEW_FILE_MODE = 0o666
TEMP_SUFFIX_BYTES = 4

__all__ = ["BUILDERS", "build_model", "save_model", "write_bytes_atomic"]


def build_model(name: str, **kwargs: object) -> onnx.ModelProto:
    """Build the registered model `name`; kwargs go to its builder (e.g. num_classes, seed)."""
    try:
        builder = BUILDERS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(BUILDERS)}") from None
    return builder(**kwargs)


def write_bytes_atomic(data: bytes, path: str | os.PathLike[str]) -> None:
    """Write data to path via a temp file in the same directory, so readers never see half a file."""
    path = os.fspath(path)
    directory, base = os.path.split(os.path.abspath(path))
    tmp = os.path.join(directory, f".{base}.{os.getpid()}.{secrets.token_hex(TEMP_SUFFIX_BYTES)}.tmp")
    # os.open with NEW_FILE_MODE lets the umask decide permissions (mkstemp would force 0600).
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, NEW_FILE_MODE)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        # Leave no stray temp file behind on any failure, including KeyboardInterrupt.
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_model(model: onnx.ModelProto, path: str | os.PathLike[str]) -> None:
    """Serialise model to path atomically."""
    write_bytes_atomic(model.SerializeToString(), path)
