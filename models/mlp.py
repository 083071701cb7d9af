"""Multi-layer perceptrons: Gemm-ReLU stacks with a linear output layer."""

from __future__ import annotations

import math
from collections.abc import Sequence

import onnx

from models.graph_builder import BATCH_DIM, INPUT_NAME, OUTPUT_NAME, GraphBuilder, require_positive_int

DEFAULT_SIZES = (784, 512, 256, 10)
DEFAULT_HIDDEN = DEFAULT_SIZES[1:-1]
# MNIST-shaped image input used when the registry builder gets image arguments.
DEFAULT_IMAGE_CHANNELS = 1
DEFAULT_IMAGE_SIZE = 28


def mlp(sizes: Sequence[int] = DEFAULT_SIZES, in_shape: Sequence[int] | None = None, seed: int = 0) -> onnx.ModelProto:
    """Build an MLP with layer widths `sizes`; an image in_shape (C, H, W) adds a leading Flatten."""
    sizes = [require_positive_int(f"sizes[{i}]", s) for i, s in enumerate(sizes)]
    if len(sizes) < 2:
        raise ValueError(f"mlp needs at least an input and an output size, got sizes={sizes}")
    gb = GraphBuilder("mlp", seed)
    if in_shape is None:
        x = gb.input(INPUT_NAME, [BATCH_DIM, sizes[0]])
        y = x
    else:
        dims = [require_positive_int(f"in_shape[{i}]", d) for i, d in enumerate(in_shape)]
        if math.prod(dims) != sizes[0]:
            raise ValueError(f"mlp in_shape {tuple(dims)} has {math.prod(dims)} features but sizes[0] is {sizes[0]}")
        x = gb.input(INPUT_NAME, [BATCH_DIM, *dims])
        y = gb.flatten(x, features=sizes[0], name="flatten")
    last = len(sizes) - 1
    for i, features in enumerate(sizes[1:], start=1):
        if i == last:
            gb.gemm(y, features, name=f"fc{i}", output=OUTPUT_NAME)
        else:
            y = gb.relu(gb.gemm(y, features, name=f"fc{i}"), name=f"relu{i}")
    return gb.finish([x], [(OUTPUT_NAME, [BATCH_DIM, sizes[-1]])])


def mlp_classifier(
    num_classes: int = 10,
    in_channels: int | None = None,
    input_size: int | None = None,
    hidden: Sequence[int] = DEFAULT_HIDDEN,
    seed: int = 0,
) -> onnx.ModelProto:
    """Registry adapter: flat 784-feature input by default, image input if C or size is given."""
    if in_channels is None and input_size is None:
        return mlp((DEFAULT_SIZES[0], *hidden, num_classes), None, seed)
    channels = DEFAULT_IMAGE_CHANNELS if in_channels is None else require_positive_int("in_channels", in_channels)
    size = DEFAULT_IMAGE_SIZE if input_size is None else require_positive_int("input_size", input_size)
    in_shape = (channels, size, size)
    return mlp((math.prod(in_shape), *hidden, num_classes), in_shape, seed)
