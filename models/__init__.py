"""ONNX model builders for edgetrain: a registry of seeded, torch-named reference models."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import onnx

from edgetrain.fileio import write_atomic
from models.lenet import lenet5
from models.mlp import mlp_classifier
from models.mobilenetv2 import mobilenetv2_cifar
from models.mobilenetv3 import mobilenetv3_small
from models.resnet import cifar_resnet
from models.vit import vit_tiny

BUILDERS: dict[str, Callable[..., onnx.ModelProto]] = {
    "resnet8": functools.partial(cifar_resnet, 8),
    "resnet20": functools.partial(cifar_resnet, 20),
    "resnet38": functools.partial(cifar_resnet, 38),
    "resnet74": functools.partial(cifar_resnet, 74),
    "mobilenetv2": mobilenetv2_cifar,
    "mobilenetv3_small": mobilenetv3_small,
    "vit_tiny": vit_tiny,
    "lenet5": lenet5,
    "mlp": mlp_classifier,
}


__all__ = ["BUILDERS", "build_model", "save_model"]


def build_model(name: str, **kwargs: object) -> onnx.ModelProto:
    """Build the registered model `name`; kwargs go to its builder (e.g. num_classes, seed)."""
    try:
        builder = BUILDERS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(BUILDERS)}") from None
    return builder(**kwargs)


def save_model(model: onnx.ModelProto, path: str | os.PathLike[str]) -> None:
    """Serialise model to path atomically."""
    write_atomic(path, model.SerializeToString())
