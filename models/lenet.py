"""LeNet-5 (LeCun et al. 1998) with ReLU and max pooling, as in most modern tutorials."""

from __future__ import annotations

import onnx

from models.graph_builder import (
    BATCH_DIM,
    INPUT_NAME,
    OUTPUT_NAME,
    GraphBuilder,
    image_shape,
    require_positive_int,
)

CONV_KERNEL = 5
# Conv1 pads so 28x28 MNIST keeps its size, matching the 32x32 input of the original.
CONV1_PAD = 2
CONV_CHANNELS = (6, 16)
HIDDEN_FEATURES = (120, 84)
POOL = 2


def lenet_feature_size(input_size: int) -> int:
    """Return the spatial size after the conv/pool stack, or raise if the input is too small."""
    size = (input_size + 2 * CONV1_PAD - CONV_KERNEL + 1) // POOL
    size = (size - CONV_KERNEL + 1) // POOL
    if size < 1:
        raise ValueError(f"lenet5 input_size {input_size} is too small: the conv/pool stack needs at least 12")
    return size


def lenet5(num_classes: int = 10, in_channels: int = 1, input_size: int = 28, seed: int = 0) -> onnx.ModelProto:
    """Build LeNet-5: two conv5x5-ReLU-maxpool stages, then Gemm 120-84-num_classes."""
    for arg, value in [("num_classes", num_classes), ("in_channels", in_channels), ("input_size", input_size)]:
        require_positive_int(arg, value)
    spatial = lenet_feature_size(input_size)
    gb = GraphBuilder("lenet5", seed)
    x = gb.input(INPUT_NAME, image_shape(in_channels, input_size))
    y = x
    for i, channels in enumerate(CONV_CHANNELS, start=1):
        pad = CONV1_PAD if i == 1 else 0
        y = gb.conv(y, channels, CONV_KERNEL, 1, pad=pad, bias=True, name=f"conv{i}")
        y = gb.relu(y, name=f"relu{i}")
        y = gb.maxpool(y, POOL, name=f"pool{i}")
    y = gb.flatten(y, features=CONV_CHANNELS[-1] * spatial * spatial, name="flatten")
    for i, features in enumerate(HIDDEN_FEATURES, start=1):
        y = gb.relu(gb.gemm(y, features, name=f"fc{i}"), name=f"relu{len(CONV_CHANNELS) + i}")
    gb.gemm(y, num_classes, name=f"fc{len(HIDDEN_FEATURES) + 1}", output=OUTPUT_NAME)
    return gb.finish([x], [(OUTPUT_NAME, [BATCH_DIM, num_classes])])
