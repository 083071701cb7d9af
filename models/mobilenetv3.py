"""MobileNetV3-small (Howard et al. 2019), torchvision's layout and state_dict names, for small images."""

from __future__ import annotations

import onnx

from models.graph_builder import BATCH_DIM, INPUT_NAME, OUTPUT_NAME, GraphBuilder, image_shape, require_positive_int
from models.mobilenetv2 import make_divisible

# (in, kernel, expanded, out, squeeze-excite, hardswish, stride): torchvision's mobilenet_v3_small.
SETTING: tuple[tuple[int, int, int, int, bool, bool, int], ...] = (
    (16, 3, 16, 16, True, False, 2), (16, 3, 72, 24, False, False, 2), (24, 3, 88, 24, False, False, 1),
    (24, 5, 96, 40, True, True, 2), (40, 5, 240, 40, True, True, 1), (40, 5, 240, 40, True, True, 1),
    (40, 5, 120, 48, True, True, 1), (48, 5, 144, 48, True, True, 1), (48, 5, 288, 96, True, True, 2),
    (96, 5, 576, 96, True, True, 1), (96, 5, 576, 96, True, True, 1),
)
STEM_CHANNELS = 16
LAST_CONV_FACTOR = 6  # the last 1x1 conv widens the final block's 96 channels to 576
CLASSIFIER_HIDDEN = 1024
SE_DIVISOR = 4


def _conv_bn_act(gb: GraphBuilder, x: str, out_ch: int, k: int, stride: int, groups: int, act: str | None,
                 prefix: str) -> str:
    """Conv2dNormActivation: conv (no bias) -> BN -> ReLU or Hardswish, named prefix.0/.1/.2."""
    y = gb.batchnorm(gb.conv(x, out_ch, k, stride, pad=k // 2, groups=groups, name=f"{prefix}.0"), name=f"{prefix}.1")
    if act == "RE":
        return gb.relu(y, name=f"{prefix}.2")
    if act == "HS":
        return gb.hardswish(y, name=f"{prefix}.2")
    return y


def _squeeze_excite(gb: GraphBuilder, x: str, prefix: str) -> str:
    """torchvision's SqueezeExcitation: avgpool, 1x1 conv, ReLU, 1x1 conv, Hardsigmoid, scale."""
    ch = gb.channels(x)
    s = gb.global_avg_pool(x, name=f"{prefix}.avgpool")
    s = gb.relu(gb.conv(s, make_divisible(ch // SE_DIVISOR), 1, bias=True, name=f"{prefix}.fc1"), name=f"{prefix}.act")
    s = gb.hardsigmoid(gb.conv(s, ch, 1, bias=True, name=f"{prefix}.fc2"), name=f"{prefix}.scale_activation")
    return gb.mul(x, s, name=f"{prefix}.mul")


def mobilenetv3_small(num_classes: int = 10, in_channels: int = 1, input_size: int = 28, width_mult: float = 0.5,
                      stem_stride: int = 2, seed: int = 0) -> onnx.ModelProto:
    """Build MobileNetV3-small (torchvision: stride-2 stem, so 28x28 digits end at 1x1 before the pool)."""
    for arg, value in [("num_classes", num_classes), ("in_channels", in_channels), ("input_size", input_size),
                       ("stem_stride", stem_stride)]:
        require_positive_int(arg, value)
    if not width_mult > 0:
        raise ValueError(f"width_mult must be positive, got {width_mult!r}")

    def c(ch: int) -> int:
        return make_divisible(ch * width_mult)

    gb = GraphBuilder("mobilenetv3_small", seed)
    x = gb.input(INPUT_NAME, image_shape(in_channels, input_size))
    y = _conv_bn_act(gb, x, c(STEM_CHANNELS), 3, stem_stride, 1, "HS", "features.0")
    for i, (cin, k, exp, cout, se, hs, stride) in enumerate(SETTING, start=1):
        prefix, idx, block_in = f"features.{i}.block", 0, y
        act = "HS" if hs else "RE"
        if c(exp) != c(cin):
            y = _conv_bn_act(gb, y, c(exp), 1, 1, 1, act, f"{prefix}.{idx}")
            idx += 1
        y = _conv_bn_act(gb, y, c(exp), k, stride, c(exp), act, f"{prefix}.{idx}")
        idx += 1
        if se:
            y = _squeeze_excite(gb, y, f"{prefix}.{idx}")
            idx += 1
        y = _conv_bn_act(gb, y, c(cout), 1, 1, 1, None, f"{prefix}.{idx}")
        if stride == 1 and c(cin) == c(cout):
            y = gb.add(block_in, y, name=f"features.{i}.add")
    last = LAST_CONV_FACTOR * c(SETTING[-1][3])
    y = _conv_bn_act(gb, y, last, 1, 1, 1, "HS", f"features.{len(SETTING) + 1}")
    y = gb.flatten(gb.global_avg_pool(y, name="avgpool"), name="flatten")
    y = gb.hardswish(gb.gemm(y, c(CLASSIFIER_HIDDEN), name="classifier.0"), name="classifier.1")
    # classifier.2 is torch's Dropout: the identity at inference, left out of the graph.
    gb.gemm(y, num_classes, name="classifier.3", output=OUTPUT_NAME)
    return gb.finish([x], [(OUTPUT_NAME, [BATCH_DIM, num_classes])])
