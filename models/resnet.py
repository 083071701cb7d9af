"""CIFAR-style ResNets (He et al. 2016, section 4.2) with option-B projection shortcuts."""

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

NUM_STAGES = 3
LAYERS_PER_BLOCK = 2
# Depth counts the stem conv and the classifier on top of the block convs: 6n + 2.
EXTRA_LAYERS = 2
DOWNSAMPLE_STRIDE = 2
KERNEL = 3


def blocks_per_stage(depth: int) -> int:
    """Return n for a depth of 6n+2, or raise ValueError naming the bad depth."""
    per_block_layers = NUM_STAGES * LAYERS_PER_BLOCK
    if (
        isinstance(depth, bool)
        or not isinstance(depth, int)
        or depth < per_block_layers + EXTRA_LAYERS
        or (depth - EXTRA_LAYERS) % per_block_layers
    ):
        raise ValueError(
            f"CIFAR ResNet depth {depth!r} is invalid: it must be 6n+2 with n >= 1 "
            "(8, 14, 20, 32, 38, 44, 56, 74, 110, ...)"
        )
    return (depth - EXTRA_LAYERS) // per_block_layers


def _basic_block(gb: GraphBuilder, x: str, out_ch: int, stride: int, prefix: str) -> str:
    """conv3x3-BN-ReLU-conv3x3-BN, plus identity or 1x1-conv-BN shortcut, then ReLU."""
    needs_projection = stride != 1 or gb.channels(x) != out_ch
    y = gb.conv(x, out_ch, KERNEL, stride, pad=1, name=f"{prefix}.conv1")
    y = gb.relu(gb.batchnorm(y, name=f"{prefix}.bn1"), name=f"{prefix}.relu1")
    y = gb.conv(y, out_ch, KERNEL, 1, pad=1, name=f"{prefix}.conv2")
    y = gb.batchnorm(y, name=f"{prefix}.bn2")
    shortcut = x
    if needs_projection:
        # torchvision names the projection "downsample" (Sequential of conv, bn).
        shortcut = gb.conv(x, out_ch, 1, stride, pad=0, name=f"{prefix}.downsample.0")
        shortcut = gb.batchnorm(shortcut, name=f"{prefix}.downsample.1")
    y = gb.add(y, shortcut, name=f"{prefix}.add")
    return gb.relu(y, name=f"{prefix}.relu2")


def cifar_resnet(
    depth: int,
    num_classes: int = 10,
    in_channels: int = 3,
    input_size: int = 32,
    width: int = 16,
    seed: int = 0,
) -> onnx.ModelProto:
    """Build a CIFAR ResNet-`depth` (depth = 6n+2) with stages of width, 2*width, 4*width."""
    n = blocks_per_stage(depth)
    for arg, value in [("num_classes", num_classes), ("in_channels", in_channels),
                       ("input_size", input_size), ("width", width)]:
        require_positive_int(arg, value)
    gb = GraphBuilder(f"resnet{depth}", seed)
    x = gb.input(INPUT_NAME, image_shape(in_channels, input_size))
    y = gb.conv(x, width, KERNEL, 1, pad=1, name="conv1")
    y = gb.relu(gb.batchnorm(y, name="bn1"), name="relu")
    for stage in range(NUM_STAGES):
        stage_width = width * 2**stage
        for block in range(n):
            stride = DOWNSAMPLE_STRIDE if stage > 0 and block == 0 else 1
            y = _basic_block(gb, y, stage_width, stride, prefix=f"layer{stage + 1}.{block}")
    y = gb.flatten(gb.global_avg_pool(y, name="avgpool"), name="flatten")
    gb.gemm(y, num_classes, name="fc", output=OUTPUT_NAME)
    return gb.finish([x], [(OUTPUT_NAME, [BATCH_DIM, num_classes])])
