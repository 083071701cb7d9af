"""The models users bring, written as torchvision and timm write them, at any width and depth.

torchvision's wheel that pairs with the CPU build of torch 2.13 cannot be installed beside it (PyPI's
torchvision needs a CUDA torch; its import fails with "operator torchvision::nms does not exist"), so the
architectures a user would pick from torchvision and timm are written here, module for module: the same
layers in the same order, hence the same ONNX ops when exported. Each builder takes width and depth knobs
so the zoo test runs them small; at their defaults they are the published configurations.

This module imports torch; nothing in edgetrain does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from models.mobilenetv2 import make_divisible


def conv_bn_act(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1,
                act: Callable[[], nn.Module] | None = nn.ReLU) -> nn.Sequential:
    """torchvision's Conv2dNormActivation: conv (no bias), BatchNorm, activation."""
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False),
                               nn.BatchNorm2d(cout)]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


# ------------------------------------------------------------ MobileNetV3-small (torchvision)
class SqueezeExcitation(nn.Module):
    """torchvision.ops.SqueezeExcitation: avgpool, 1x1 conv, act, 1x1 conv, gate, scale."""

    def __init__(self, channels: int, squeeze: int, act=nn.ReLU, gate=nn.Hardsigmoid):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.activation = act()
        self.scale_activation = gate()

    def forward(self, x):
        s = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))
        return x * s


class MobileNetV3Block(nn.Module):
    """InvertedResidual of MobileNetV3: expand, depthwise, squeeze-excite, project."""

    def __init__(self, cin: int, k: int, exp: int, cout: int, se: bool, hs: bool, stride: int):
        super().__init__()
        act = nn.Hardswish if hs else nn.ReLU
        layers: list[nn.Module] = []
        if exp != cin:
            layers.append(conv_bn_act(cin, exp, 1, act=act))
        layers.append(conv_bn_act(exp, exp, k, stride, groups=exp, act=act))
        if se:
            layers.append(SqueezeExcitation(exp, make_divisible(exp // 4, 8)))
        layers.append(conv_bn_act(exp, cout, 1, act=None))
        self.block = nn.Sequential(*layers)
        self.use_res_connect = stride == 1 and cin == cout

    def forward(self, x):
        y = self.block(x)
        return x + y if self.use_res_connect else y


# (in, kernel, expanded, out, squeeze-excite, hardswish, stride) as in torchvision's mobilenet_v3_small.
MOBILENETV3_SMALL = (
    (16, 3, 16, 16, True, False, 2), (16, 3, 72, 24, False, False, 2), (24, 3, 88, 24, False, False, 1),
    (24, 5, 96, 40, True, True, 2), (40, 5, 240, 40, True, True, 1), (40, 5, 240, 40, True, True, 1),
    (40, 5, 120, 48, True, True, 1), (48, 5, 144, 48, True, True, 1), (48, 5, 288, 96, True, True, 2),
    (96, 5, 576, 96, True, True, 1), (96, 5, 576, 96, True, True, 1),
)


class MobileNetV3Small(nn.Module):
    """torchvision.models.mobilenet_v3_small, with its width multiplier and an input channel count."""

    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0, in_channels: int = 3, last: int = 1024):
        super().__init__()

        def c(ch: int) -> int:
            return make_divisible(ch * width_mult, 8)

        layers = [conv_bn_act(in_channels, c(16), 3, 2, act=nn.Hardswish)]
        for cin, k, exp, cout, se, hs, stride in MOBILENETV3_SMALL:
            layers.append(MobileNetV3Block(c(cin), k, c(exp), c(cout), se, hs, stride))
        layers.append(conv_bn_act(c(96), 6 * c(96), 1, act=nn.Hardswish))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(6 * c(96), last), nn.Hardswish(), nn.Dropout(0.2),
                                        nn.Linear(last, num_classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


# ------------------------------------------------------------ ShuffleNetV2 (torchvision)
def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """torchvision's channel shuffle: view, transpose, view."""
    n, c, h, w = x.size()
    x = x.view(n, groups, c // groups, h, w).transpose(1, 2).contiguous()
    return x.view(n, -1, h, w)


class ShuffleBlock(nn.Module):
    """ShuffleNetV2's InvertedResidual: channel split (stride 1) or two branches (stride 2), then shuffle."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.stride = stride
        half = cout // 2
        if stride > 1:
            self.branch1 = nn.Sequential(conv_bn_act(cin, cin, 3, stride, groups=cin, act=None),
                                         conv_bn_act(cin, half, 1))
        self.branch2 = nn.Sequential(conv_bn_act(cin if stride > 1 else half, half, 1),
                                     conv_bn_act(half, half, 3, stride, groups=half, act=None),
                                     conv_bn_act(half, half, 1))

    def forward(self, x):
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    """torchvision.models.shufflenet_v2_x0_5 (stages [4, 8, 4]; channels 24, 48, 96, 192, 1024)."""

    def __init__(self, num_classes: int = 1000, repeats: Sequence[int] = (4, 8, 4),
                 channels: Sequence[int] = (24, 48, 96, 192, 1024), in_channels: int = 3):
        super().__init__()
        self.conv1 = conv_bn_act(in_channels, channels[0], 3, 2)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        stages, cin = [], channels[0]
        for n, cout in zip(repeats, channels[1:4]):
            blocks = [ShuffleBlock(cin, cout, 2)] + [ShuffleBlock(cout, cout, 1) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
            cin = cout
        self.stages = nn.Sequential(*stages)
        self.conv5 = conv_bn_act(cin, channels[4], 1)
        self.fc = nn.Linear(channels[4], num_classes)

    def forward(self, x):
        x = self.conv5(self.stages(self.maxpool(self.conv1(x))))
        return self.fc(x.mean([2, 3]))


# ------------------------------------------------------------ MNASNet (torchvision)
class MnasBlock(nn.Module):
    """MNASNet's _InvertedResidual: 1x1 expand, depthwise, 1x1 project, residual when shapes match."""

    def __init__(self, cin: int, cout: int, k: int, stride: int, expansion: int):
        super().__init__()
        mid = cin * expansion
        self.apply_residual = cin == cout and stride == 1
        self.layers = nn.Sequential(conv_bn_act(cin, mid, 1), conv_bn_act(mid, mid, k, stride, groups=mid),
                                    conv_bn_act(mid, cout, 1, act=None))

    def forward(self, x):
        return self.layers(x) + x if self.apply_residual else self.layers(x)


# (out, kernel, stride, expansion, repeats) after the stem, as in torchvision's MNASNet.
MNASNET_STACKS = ((24, 3, 2, 3, 3), (40, 5, 2, 3, 3), (80, 5, 2, 6, 3), (96, 3, 1, 6, 2), (192, 5, 2, 6, 4),
                  (320, 3, 1, 6, 1))


class MNASNet(nn.Module):
    """torchvision.models.mnasnet0_5 (alpha 0.5), with a depth cap on each stack for small tests."""

    def __init__(self, num_classes: int = 1000, alpha: float = 0.5, in_channels: int = 3, max_repeats: int = 6):
        super().__init__()

        def d(ch: int) -> int:
            return make_divisible(ch * alpha, 8)

        layers = [conv_bn_act(in_channels, d(32), 3, 2), conv_bn_act(d(32), d(32), 3, 1, groups=d(32)),
                  conv_bn_act(d(32), d(16), 1, act=None)]
        cin = d(16)
        for out, k, stride, exp, repeats in MNASNET_STACKS:
            for i in range(min(repeats, max_repeats)):
                layers.append(MnasBlock(cin, d(out), k, stride if i == 0 else 1, exp))
                cin = d(out)
        layers.append(conv_bn_act(cin, 1280, 1))
        self.layers = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))

    def forward(self, x):
        return self.classifier(self.layers(x).mean([2, 3]))


# ------------------------------------------------------------ EfficientNet-B0 (torchvision)
class MBConv(nn.Module):
    """EfficientNet's MBConv: expand (SiLU), depthwise (SiLU), squeeze-excite (SiLU, sigmoid), project."""

    def __init__(self, cin: int, cout: int, k: int, stride: int, expand: int):
        super().__init__()
        mid = cin * expand
        layers: list[nn.Module] = []
        if mid != cin:
            layers.append(conv_bn_act(cin, mid, 1, act=nn.SiLU))
        layers += [conv_bn_act(mid, mid, k, stride, groups=mid, act=nn.SiLU),
                   SqueezeExcitation(mid, max(1, cin // 4), act=nn.SiLU, gate=nn.Sigmoid),
                   conv_bn_act(mid, cout, 1, act=None)]
        self.block = nn.Sequential(*layers)
        self.use_res_connect = stride == 1 and cin == cout

    def forward(self, x):
        y = self.block(x)
        return x + y if self.use_res_connect else y  # stochastic depth is the identity in eval


# (expand, kernel, stride, in, out, layers) as in torchvision's efficientnet_b0.
EFFICIENTNET_B0 = ((1, 3, 1, 32, 16, 1), (6, 3, 2, 16, 24, 2), (6, 5, 2, 24, 40, 2), (6, 3, 2, 40, 80, 3),
                   (6, 5, 1, 80, 112, 3), (6, 5, 2, 112, 192, 4), (6, 3, 1, 192, 320, 1))


class EfficientNet(nn.Module):
    """torchvision.models.efficientnet_b0 with width and depth multipliers."""

    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0, depth_mult: float = 1.0,
                 in_channels: int = 3):
        super().__init__()

        def c(ch: int) -> int:
            return make_divisible(ch * width_mult, 8)

        layers = [conv_bn_act(in_channels, c(32), 3, 2, act=nn.SiLU)]
        for expand, k, stride, cin, cout, n in EFFICIENTNET_B0:
            for i in range(max(1, round(n * depth_mult))):
                layers.append(MBConv(c(cin) if i == 0 else c(cout), c(cout), k, stride if i == 0 else 1, expand))
        layers.append(conv_bn_act(c(320), 4 * c(320), 1, act=nn.SiLU))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(4 * c(320), num_classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


# ------------------------------------------------------------ SqueezeNet 1.1 (torchvision)
class Fire(nn.Module):
    """SqueezeNet's Fire module: squeeze 1x1, then 1x1 and 3x3 expands concatenated."""

    def __init__(self, cin: int, squeeze: int, e1: int, e3: int):
        super().__init__()
        self.squeeze = nn.Conv2d(cin, squeeze, 1)
        self.expand1x1 = nn.Conv2d(squeeze, e1, 1)
        self.expand3x3 = nn.Conv2d(squeeze, e3, 3, padding=1)

    def forward(self, x):
        x = F.relu(self.squeeze(x))
        return torch.cat([F.relu(self.expand1x1(x)), F.relu(self.expand3x3(x))], 1)


class SqueezeNet(nn.Module):
    """torchvision.models.squeezenet1_1 (ceil-mode max pools, a conv classifier)."""

    def __init__(self, num_classes: int = 1000, width_div: int = 1, in_channels: int = 3):
        super().__init__()

        def w(ch: int) -> int:
            return max(4, ch // width_div)

        pool = partial(nn.MaxPool2d, kernel_size=3, stride=2, ceil_mode=True)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, w(64), 3, 2), nn.ReLU(), pool(),
            Fire(w(64), w(16), w(64), w(64)), Fire(2 * w(64), w(16), w(64), w(64)), pool(),
            Fire(2 * w(64), w(32), w(128), w(128)), Fire(2 * w(128), w(32), w(128), w(128)), pool(),
            Fire(2 * w(128), w(48), w(192), w(192)), Fire(2 * w(192), w(48), w(192), w(192)),
            Fire(2 * w(192), w(64), w(256), w(256)), Fire(2 * w(256), w(64), w(256), w(256)))
        self.classifier = nn.Sequential(nn.Dropout(0.5), nn.Conv2d(2 * w(256), num_classes, 1), nn.ReLU(),
                                        nn.AdaptiveAvgPool2d(1))

    def forward(self, x):
        return torch.flatten(self.classifier(self.features(x)), 1)


# ------------------------------------------------------------ ConvNeXt (torchvision)
class LayerNorm2d(nn.LayerNorm):
    """torchvision's LayerNorm2d: LayerNorm over channels of an NCHW tensor (permute, norm, permute)."""

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class CNBlock(nn.Module):
    """ConvNeXt block: depthwise 7x7, channels-last LayerNorm, MLP with GELU, layer scale, residual."""

    def __init__(self, dim: int, layer_scale: float = 1e-6):
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(dim, dim, 7, padding=3, groups=dim), Permute((0, 2, 3, 1)),
                                   nn.LayerNorm(dim, eps=1e-6), nn.Linear(dim, 4 * dim), nn.GELU(),
                                   nn.Linear(4 * dim, dim), Permute((0, 3, 1, 2)))
        self.layer_scale = nn.Parameter(torch.ones(dim, 1, 1) * layer_scale)

    def forward(self, x):
        return x + self.layer_scale * self.block(x)


class Permute(nn.Module):
    """torchvision.ops.Permute."""

    def __init__(self, dims: Sequence[int]):
        super().__init__()
        self.dims = list(dims)

    def forward(self, x):
        return torch.permute(x, self.dims)


class ConvNeXt(nn.Module):
    """torchvision.models.convnext_tiny (dims 96..768, depths 3, 3, 9, 3), with its dims and depths as knobs."""

    def __init__(self, num_classes: int = 1000, dims: Sequence[int] = (96, 192, 384, 768),
                 depths: Sequence[int] = (3, 3, 9, 3), in_channels: int = 3, layer_scale: float = 1e-6):
        super().__init__()
        layers: list[nn.Module] = [nn.Sequential(nn.Conv2d(in_channels, dims[0], 4, 4), LayerNorm2d(dims[0], eps=1e-6))]
        for i, (dim, depth) in enumerate(zip(dims, depths)):
            layers.append(nn.Sequential(*[CNBlock(dim, layer_scale) for _ in range(depth)]))
            if i + 1 < len(dims):
                layers.append(nn.Sequential(LayerNorm2d(dim, eps=1e-6), nn.Conv2d(dim, dims[i + 1], 2, 2)))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(LayerNorm2d(dims[-1], eps=1e-6), nn.Flatten(1),
                                        nn.Linear(dims[-1], num_classes))

    def forward(self, x):
        return self.classifier(self.avgpool(self.features(x)))


# ------------------------------------------------------------ ViT (timm's VisionTransformer)
class Attention(nn.Module):
    """timm's Attention: one qkv Linear, heads split by reshape/permute, fused scaled-dot-product, proj."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class EncoderBlock(nn.Module):
    """timm's Block: pre-norm attention and MLP (GELU), each with a residual."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, int(dim * mlp_ratio)), nn.GELU(), nn.Linear(int(dim * mlp_ratio), dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """timm's vit_tiny_patch16_224 layout (dim 192, depth 12, 3 heads): patch conv, class token, position
    embedding, pre-norm blocks, final norm, class-token head."""

    def __init__(self, num_classes: int = 1000, image_size: int = 224, patch: int = 16, dim: int = 192,
                 depth: int = 12, heads: int = 3, in_channels: int = 3, mlp_ratio: float = 4.0):
        super().__init__()
        self.patch_embed = nn.Conv2d(in_channels, dim, patch, patch)
        tokens = (image_size // patch) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[EncoderBlock(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)
        nn.init.normal_(self.cls_token, std=1e-6)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(x))[:, 0])


# ------------------------------------------------------------ recurrent sequence classifiers
class RecurrentClassifier(nn.Module):
    """A sensor or text classifier: LSTM or GRU over [N, T, F], the last step's state into a Linear."""

    def __init__(self, cell: str = "lstm", features: int = 8, hidden: int = 32, num_classes: int = 10,
                 layers: int = 1, bidirectional: bool = False):
        super().__init__()
        rnn = {"lstm": nn.LSTM, "gru": nn.GRU}[cell]
        self.rnn = rnn(features, hidden, num_layers=layers, batch_first=True, bidirectional=bidirectional)
        self.fc = nn.Linear(hidden * (2 if bidirectional else 1), num_classes)

    def forward(self, x):
        y, _ = self.rnn(x)
        return self.fc(y[:, -1])


# Builders at a size the zoo test runs in seconds, and the input each takes (without the batch).
SMALL: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "mobilenet_v3_small": (lambda: MobileNetV3Small(10, width_mult=0.25, last=64), (3, 32, 32)),
    "shufflenet_v2": (lambda: ShuffleNetV2(10, (2, 2, 1), (8, 16, 32, 64, 64)), (3, 32, 32)),
    "mnasnet": (lambda: MNASNet(10, alpha=0.25, max_repeats=1), (3, 32, 32)),
    "efficientnet_b0": (lambda: EfficientNet(10, width_mult=0.25, depth_mult=0.34), (3, 32, 32)),
    "squeezenet1_1": (lambda: SqueezeNet(10, width_div=8), (3, 48, 48)),
    "convnext": (lambda: ConvNeXt(10, (8, 16, 32, 64), (1, 1, 2, 1), layer_scale=0.5), (3, 32, 32)),
    "vit": (lambda: VisionTransformer(10, image_size=16, patch=4, dim=32, depth=2, heads=2, mlp_ratio=2.0),
            (3, 16, 16)),
    "lstm": (lambda: RecurrentClassifier("lstm", 8, 16, 10), (6, 8)),
    "gru": (lambda: RecurrentClassifier("gru", 8, 16, 10), (6, 8)),
    "lstm_2layer_bidirectional": (lambda: RecurrentClassifier("lstm", 8, 12, 10, layers=2, bidirectional=True),
                                  (5, 8)),
}
