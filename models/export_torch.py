"""torchvision-style PyTorch demo models (ResNet-18, MobileNetV2), exported with `edgetrain.from_torch`.

    python -m models.export_torch --demo resnet18|mobilenetv2 --out FILE [--num-classes K]
        [--width W] [--width-mult M] [--input-size S] [--seed S]

This is the only module in models/ that imports torch.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

import torch
from torch import nn

from edgetrain import from_torch
from models.mobilenetv2 import make_divisible

RESNET18_LAYERS = (2, 2, 2, 2)
RESNET_STEM_KERNEL = 7
RESNET_STEM_STRIDE = 2
RESNET_MAXPOOL_KERNEL = 3
DOWNSAMPLE_STRIDE = 2

# ImageNet MobileNetV2 setting (t, c, n, s) as in torchvision.
MOBILENETV2_SETTING: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
MOBILENETV2_STEM_CHANNELS = 32
MOBILENETV2_LAST_CHANNELS = 1280
MOBILENETV2_DROPOUT = 0.2
# torchvision initialises the MobileNetV2 classifier with N(0, 0.01).
MOBILENETV2_CLASSIFIER_STD = 0.01

DEMO_IMAGE_CHANNELS = 3
DEMO_INPUT_SIZE = 32
DEMO_EXAMPLE_BATCH = 1


# ------------------------------------------------------------ ResNet-18 (torchvision)
def _init_conv_bn(module: nn.Module) -> None:
    """torchvision init: Kaiming-normal fan_out convs, BN weight 1 / bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs with a (possibly projected) shortcut."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """torchvision-style ResNet built from BasicBlocks."""

    def __init__(self, layers: Sequence[int], num_classes: int, width: int,
                 in_channels: int = DEMO_IMAGE_CHANNELS) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, RESNET_STEM_KERNEL, RESNET_STEM_STRIDE,
                               RESNET_STEM_KERNEL // 2, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(RESNET_MAXPOOL_KERNEL, DOWNSAMPLE_STRIDE, RESNET_MAXPOOL_KERNEL // 2)
        in_ch = width
        for i, blocks in enumerate(layers):
            out_ch = width * 2**i
            stride = 1 if i == 0 else DOWNSAMPLE_STRIDE
            stage = [BasicBlock(in_ch if b == 0 else out_ch, out_ch, stride if b == 0 else 1) for b in range(blocks)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*stage))
            in_ch = out_ch
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(in_ch, num_classes)
        self.num_stages = len(layers)
        _init_conv_bn(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits for an [N, C, H, W] batch."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def torch_resnet18(num_classes: int = 10, width: int = 64) -> nn.Module:
    """Return a torchvision-style ResNet-18 with stage widths width, 2w, 4w, 8w."""
    return ResNet(RESNET18_LAYERS, num_classes, width)


# ---------------------------------------------------------- MobileNetV2 (torchvision)
class ConvBNReLU6(nn.Sequential):
    """Conv (no bias) -> BN -> ReLU6, indexed .0/.1/.2 like torchvision's Conv2dNormActivation."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> None:
        super().__init__(
            nn.Conv2d(in_ch, out_ch, kernel, stride, kernel // 2, groups=groups, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    """Expand 1x1 -> depthwise 3x3 -> linear 1x1, residual when shapes match."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = round(in_ch * expand)
        self.use_res_connect = stride == 1 and in_ch == out_ch
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(ConvBNReLU6(in_ch, hidden, kernel=1))
        layers += [
            ConvBNReLU6(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, out_ch, 1, bias=False),
            nn.BatchNorm2d(out_ch),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block."""
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """torchvision-style MobileNetV2 (ImageNet strides)."""

    def __init__(self, num_classes: int, width_mult: float, in_channels: int = DEMO_IMAGE_CHANNELS) -> None:
        super().__init__()
        in_ch = make_divisible(MOBILENETV2_STEM_CHANNELS * width_mult)
        last = make_divisible(MOBILENETV2_LAST_CHANNELS * max(1.0, width_mult))
        features: list[nn.Module] = [ConvBNReLU6(in_channels, in_ch, stride=DOWNSAMPLE_STRIDE)]
        for expand, channels, repeats, first_stride in MOBILENETV2_SETTING:
            out_ch = make_divisible(channels * width_mult)
            for i in range(repeats):
                features.append(InvertedResidual(in_ch, out_ch, first_stride if i == 0 else 1, expand))
                in_ch = out_ch
        features.append(ConvBNReLU6(in_ch, last, kernel=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(MOBILENETV2_DROPOUT), nn.Linear(last, num_classes))
        _init_conv_bn(self)
        nn.init.normal_(self.classifier[1].weight, 0.0, MOBILENETV2_CLASSIFIER_STD)
        nn.init.zeros_(self.classifier[1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits for an [N, C, H, W] batch."""
        x = nn.functional.adaptive_avg_pool2d(self.features(x), (1, 1))
        return self.classifier(torch.flatten(x, 1))


def torch_mobilenetv2(num_classes: int = 10, width_mult: float = 1.0) -> nn.Module:
    """Return a torchvision-style MobileNetV2; width_mult scales all but the last conv."""
    return MobileNetV2(num_classes, width_mult)


# ------------------------------------------------------------------------- CLI
PROG = "python -m models.export_torch"
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


class _OneLineParser(argparse.ArgumentParser):
    """ArgumentParser whose errors are a single stderr line (no usage dump)."""

    def error(self, message: str) -> NoReturn:
        """Print one line and exit with the usage status."""
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _demo_factories(args: argparse.Namespace) -> dict[str, Callable[[], nn.Module]]:
    return {
        "resnet18": lambda: torch_resnet18(args.num_classes, args.width),
        "mobilenetv2": lambda: torch_mobilenetv2(args.num_classes, args.width_mult),
    }


def _positive(cast: Callable[[str], float | int]) -> Callable[[str], float | int]:
    def parse(text: str) -> float | int:
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"expected a positive value, got {text!r}")
        return value
    return parse


def make_parser() -> argparse.ArgumentParser:
    """Return the argument parser for the export CLI."""
    parser = _OneLineParser(prog=PROG, description="Export a torchvision-style demo model to ONNX.")
    parser.add_argument("--demo", required=True, choices=["resnet18", "mobilenetv2"])
    parser.add_argument("--out", required=True, metavar="FILE")
    parser.add_argument("--num-classes", type=_positive(int), default=10)
    parser.add_argument("--width", type=_positive(int), default=64, help="ResNet-18 stem width")
    parser.add_argument("--width-mult", type=_positive(float), default=1.0, help="MobileNetV2 width multiplier")
    parser.add_argument("--input-size", type=_positive(int), default=DEMO_INPUT_SIZE)
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit status."""
    args = make_parser().parse_args(argv)
    torch.manual_seed(args.seed)
    module = _demo_factories(args)[args.demo]()
    example = torch.randn(DEMO_EXAMPLE_BATCH, DEMO_IMAGE_CHANNELS, args.input_size, args.input_size)
    try:
        from_torch(module, example, args.out)
    except OSError as exc:
        print(f"{PROG}: error: cannot write {args.out}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_FAILURE
    print(f"wrote {args.out} ({args.demo})")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
