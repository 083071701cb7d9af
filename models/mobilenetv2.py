"""MobileNetV2 (Sandler et al. 2018), CIFAR variant, with torchvision state_dict names."""

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

# (expansion t, output channels c, repeats n, first stride s); the CIFAR variant keeps
# stride 1 in the second row (ImageNet uses 2) so 32x32 inputs end at 4x4, not 1x1.
CIFAR_INVERTED_RESIDUAL_SETTING: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
STEM_CHANNELS = 32
LAST_CHANNELS = 1280
CHANNEL_DIVISOR = 8
CIFAR_STEM_STRIDE = 1
DEPTHWISE_KERNEL = 3
STEM_KERNEL = 3


def make_divisible(value: float, divisor: int = CHANNEL_DIVISOR) -> int:
    """Round a channel count to a multiple of divisor, never dropping below 90% (torchvision)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    # Rounding down by more than 10% would lose too much capacity.
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def _conv_bn_relu6(gb: GraphBuilder, x: str, out_ch: int, k: int, stride: int, groups: int, prefix: str) -> str:
    """Conv2dNormActivation: conv (no bias) -> BN -> ReLU6, named prefix.0/.1/.2."""
    y = gb.conv(x, out_ch, k, stride, pad=k // 2, groups=groups, name=f"{prefix}.0")
    y = gb.batchnorm(y, name=f"{prefix}.1")
    return gb.relu6(y, name=f"{prefix}.2")


def _inverted_residual(gb: GraphBuilder, x: str, out_ch: int, stride: int, expand: int, prefix: str) -> str:
    """Expand 1x1 -> depthwise 3x3 -> linear 1x1 projection, residual if shapes match."""
    in_ch = gb.channels(x)
    hidden = round(in_ch * expand)
    y = x
    idx = 0
    if expand != 1:
        y = _conv_bn_relu6(gb, y, hidden, 1, 1, 1, f"{prefix}.conv.{idx}")
        idx += 1
    y = _conv_bn_relu6(gb, y, hidden, DEPTHWISE_KERNEL, stride, hidden, f"{prefix}.conv.{idx}")
    y = gb.conv(y, out_ch, 1, 1, pad=0, name=f"{prefix}.conv.{idx + 1}")
    y = gb.batchnorm(y, name=f"{prefix}.conv.{idx + 2}")
    if stride == 1 and in_ch == out_ch:
        y = gb.add(x, y, name=f"{prefix}.add")
    return y


def mobilenetv2_cifar(
    num_classes: int = 10,
    in_channels: int = 3,
    input_size: int = 32,
    width_mult: float = 1.0,
    seed: int = 0,
) -> onnx.ModelProto:
    """Build the CIFAR MobileNetV2 (stride-1 stem and second stage); width_mult scales channels."""
    for arg, value in [("num_classes", num_classes), ("in_channels", in_channels), ("input_size", input_size)]:
        require_positive_int(arg, value)
    if not width_mult > 0:
        raise ValueError(f"width_mult must be positive, got {width_mult!r}")
    gb = GraphBuilder("mobilenetv2", seed)
    x = gb.input(INPUT_NAME, image_shape(in_channels, input_size))
    y = _conv_bn_relu6(
        gb, x, make_divisible(STEM_CHANNELS * width_mult), STEM_KERNEL, CIFAR_STEM_STRIDE, 1, "features.0"
    )
    feature = 1
    for expand, channels, repeats, first_stride in CIFAR_INVERTED_RESIDUAL_SETTING:
        out_ch = make_divisible(channels * width_mult)
        for i in range(repeats):
            stride = first_stride if i == 0 else 1
            y = _inverted_residual(gb, y, out_ch, stride, expand, f"features.{feature}")
            feature += 1
    # Like torchvision, the last conv only grows with width_mult > 1, never shrinks.
    last = make_divisible(LAST_CHANNELS * max(1.0, width_mult))
    y = _conv_bn_relu6(gb, y, last, 1, 1, 1, f"features.{feature}")
    y = gb.flatten(gb.global_avg_pool(y, name="avgpool"), name="flatten")
    # "classifier.1" because torchvision's classifier is Sequential(Dropout, Linear).
    gb.gemm(y, num_classes, name="classifier.1", output=OUTPUT_NAME)
    return gb.finish([x], [(OUTPUT_NAME, [BATCH_DIM, num_classes])])
