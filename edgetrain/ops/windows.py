"""Sliding-window geometry shared by Conv and the pools: padding, output size, window slices.

Everything is N-dimensional (1-D, 2-D and 3-D spatial), following the ONNX attribute conventions:
`pads` lists every axis's begin padding, then every axis's end padding.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from edgetrain.errors import ModelError


@dataclass(frozen=True)
class WindowGeometry:
    """Where each window of a conv or pool sits over the (padded) input."""

    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pads_begin: tuple[int, ...]
    pads_end: tuple[int, ...]  # may exceed the attribute's padding in ceil mode
    out: tuple[int, ...]
    ceil_extra: tuple[int, ...]  # padding added only so ceil-mode windows fit (never counted)

    def slices(self):
        """Yield (kernel offset index, slices of the padded input that this offset touches)."""
        ranges = [range(k) for k in self.kernel]
        for i, offs in enumerate(itertools.product(*ranges)):
            yield i, tuple(
                slice(o * d, o * d + s * (n - 1) + 1, s)
                for o, d, s, n in zip(offs, self.dilations, self.strides, self.out)
            )

    def offsets(self) -> np.ndarray:
        """Kernel offsets as a (prod(kernel), ndim) table, in the order `slices` yields them."""
        return np.array(list(itertools.product(*[range(k) for k in self.kernel])), dtype=np.int64).reshape(
            -1, len(self.kernel)
        )

    @property
    def window_size(self) -> int:
        return int(np.prod(self.kernel))


def geometry(node_name: str, attrs: dict, spatial: tuple[int, ...], kernel: tuple[int, ...],
             ceil_mode: bool = False) -> WindowGeometry:
    """Resolve strides, dilations, pads and auto_pad of a node for one input size."""
    nd = len(spatial)
    strides = tuple(attrs.get("strides", [1] * nd))
    dilations = tuple(attrs.get("dilations", [1] * nd))
    auto_pad = attrs.get("auto_pad", "NOTSET")
    if len(strides) != nd or len(dilations) != nd or len(kernel) != nd:
        raise ModelError(f"node '{node_name}': kernel, strides and dilations must have {nd} entries")
    extent = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        out = [-(-n // s) for n, s in zip(spatial, strides)]
        total = [max(0, (o - 1) * s + e - n) for o, s, e, n in zip(out, strides, extent, spatial)]
        if auto_pad == "SAME_UPPER":
            begin = [t // 2 for t in total]
        else:
            begin = [t - t // 2 for t in total]
        end = [t - b for t, b in zip(total, begin)]
    elif auto_pad == "VALID":
        begin, end = [0] * nd, [0] * nd
    elif auto_pad == "NOTSET":
        pads = list(attrs.get("pads", [0] * (2 * nd)))
        if len(pads) != 2 * nd:
            raise ModelError(f"node '{node_name}': pads must have {2 * nd} entries, has {len(pads)}")
        begin, end = pads[:nd], pads[nd:]
    else:
        raise ModelError(f"node '{node_name}': unknown auto_pad '{auto_pad}'")
    out = []
    extra = []
    for n, b, e, k, s in zip(spatial, begin, end, extent, strides):
        span = n + b + e - k
        if span < 0:
            raise ModelError(f"node '{node_name}': window of {k} is larger than the padded input {n + b + e}")
        o = (-(-span // s) if ceil_mode else span // s) + 1
        if ceil_mode and (o - 1) * s >= n + b:
            o -= 1  # a window may not start in the end padding
        out.append(o)
        extra.append(max(0, (o - 1) * s + k - (n + b + e)))
    return WindowGeometry(tuple(kernel), strides, dilations, tuple(begin), tuple(end), tuple(out), tuple(extra))


def pad_spatial(x: np.ndarray, geo: WindowGeometry, value, lead: int = 2) -> np.ndarray:
    """Pad the spatial axes (all after the first `lead`) by the geometry's pads plus ceil extra."""
    widths = [(0, 0)] * lead + [(b, e + c) for b, e, c in zip(geo.pads_begin, geo.pads_end, geo.ceil_extra)]
    if all(w == (0, 0) for w in widths):
        return x
    return np.pad(x, widths, mode="constant", constant_values=value)


def crop_spatial(xp: np.ndarray, geo: WindowGeometry, spatial: tuple[int, ...], lead: int = 2) -> np.ndarray:
    """Undo pad_spatial."""
    sl = tuple(slice(b, b + n) for b, n in zip(geo.pads_begin, spatial))
    return xp[(slice(None),) * lead + sl]
