"""Conv2d shape arithmetic in the ONNX convention (floor output size, explicit pads)."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np


def _pair(v: int | Sequence[int], name: str) -> tuple[int, int]:
    if np.ndim(v) == 0:
        return int(v), int(v)  # type: ignore[arg-type]
    t = tuple(int(e) for e in v)  # type: ignore[union-attr]
    if len(t) != 2:
        raise ValueError(f"{name} must be an int or a pair, got {v!r}")
    return t  # type: ignore[return-value]


@dataclass(frozen=True)
class Conv2dGeometry:
    """Every size and offset a 2-D convolution needs; built (and validated) by `conv2d_geometry`."""

    batch: int
    in_channels: int
    height: int
    width: int
    out_channels: int
    kernel_h: int
    kernel_w: int
    stride_h: int
    stride_w: int
    pad_top: int
    pad_left: int
    pad_bottom: int
    pad_right: int
    dilation_h: int
    dilation_w: int
    groups: int
    out_h: int
    out_w: int

    @property
    def x_shape(self) -> tuple[int, int, int, int]:
        return (self.batch, self.in_channels, self.height, self.width)

    @property
    def w_shape(self) -> tuple[int, int, int, int]:
        return (self.out_channels, self.in_channels // self.groups, self.kernel_h, self.kernel_w)

    @property
    def y_shape(self) -> tuple[int, int, int, int]:
        return (self.batch, self.out_channels, self.out_h, self.out_w)

    @property
    def in_per_group(self) -> int:
        return self.in_channels // self.groups

    @property
    def out_per_group(self) -> int:
        return self.out_channels // self.groups

    @property
    def taps(self) -> int:
        return self.kernel_h * self.kernel_w

    @property
    def macs(self) -> int:
        """Multiply-accumulates of one forward pass (the same count for each backward product)."""
        return self.batch * self.out_h * self.out_w * self.out_channels * self.in_per_group * self.taps


def conv2d_geometry(x_shape: Sequence[int], w_shape: Sequence[int], stride: int | Sequence[int] = 1,
                    pads: Sequence[int] = (0, 0, 0, 0), dilation: int | Sequence[int] = 1,
                    groups: int = 1) -> Conv2dGeometry:
    """Validate a conv's arguments; pads are ONNX order (top, left, bottom, right). Cached: a
    training step asks for the same few geometries many times."""
    args = (x_shape, w_shape, stride, pads, dilation, groups)
    try:  # the arguments as given (shapes and tuples of ints): one dict lookup, where normalising them
        return _BY_ARGS[args]  # took 3 us, 26 times a step
    except KeyError:
        remember = len(_BY_ARGS) < _BY_ARGS_MAX
    except TypeError:  # unhashable (a list): normalised every time
        remember = False
    key = (tuple(int(v) for v in x_shape), tuple(int(v) for v in w_shape), _key(stride), _key(pads), _key(dilation),
           int(groups))
    geo = _conv2d_geometry(*key)
    if remember:
        _BY_ARGS[args] = geo
    return geo


_BY_ARGS: dict = {}  # conv2d_geometry's arguments as given -> their geometry (equal values, equal geometry)
_BY_ARGS_MAX = 4096


def _key(v):
    if isinstance(v, (int, np.integer)):
        return int(v)
    return int(v) if np.ndim(v) == 0 else tuple(int(e) for e in v)  # type: ignore[union-attr]


@lru_cache(maxsize=1024)
def _conv2d_geometry(x_shape, w_shape, stride, pads, dilation, groups) -> Conv2dGeometry:
    if len(x_shape) != 4 or len(w_shape) != 4:
        raise ValueError(f"conv2d wants NCHW x and (M, C/groups, kH, kW) w, got {tuple(x_shape)} and {tuple(w_shape)}")
    n, c, h, w = (int(v) for v in x_shape)
    m, cg, kh, kw = (int(v) for v in w_shape)
    sh, sw = _pair(stride, "stride")
    dh, dw = _pair(dilation, "dilation")
    if len(pads) != 4:
        raise ValueError(f"pads must be (top, left, bottom, right), got {tuple(pads)}")
    pt, pl, pb, pr = (int(p) for p in pads)
    groups = int(groups)
    if min(sh, sw, dh, dw, groups) < 1 or min(pt, pl, pb, pr) < 0:
        raise ValueError(f"stride, dilation and groups must be >= 1 and pads >= 0: "
                         f"stride={(sh, sw)} dilation={(dh, dw)} groups={groups} pads={(pt, pl, pb, pr)}")
    if c != cg * groups or m % groups:
        raise ValueError(f"x has {c} channels, w {tuple(w_shape)} with groups={groups} expects {cg * groups} "
                         f"and an output-channel count divisible by {groups}")
    span_h = h + pt + pb - (dh * (kh - 1) + 1)
    span_w = w + pl + pr - (dw * (kw - 1) + 1)
    if span_h < 0 or span_w < 0 or min(kh, kw) < 1:
        raise ValueError(f"kernel {(kh, kw)} dilated by {(dh, dw)} does not fit the padded input "
                         f"{(h + pt + pb, w + pl + pr)}")
    return Conv2dGeometry(n, c, h, w, m, kh, kw, sh, sw, pt, pl, pb, pr, dh, dw, groups,
                          span_h // sh + 1, span_w // sw + 1)
