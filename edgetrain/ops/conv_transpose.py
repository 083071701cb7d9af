"""ConvTranspose (N-d, grouped): the adjoint of Conv, built from the same window slices.

Forward is Conv's input-gradient path: one GEMM per group (W^T x) and a scatter of the columns into the
full output (col2im), then the pads are cropped. Backward is Conv's forward path: the output gradient's
windows gathered into columns (im2col), one GEMM for dx and one for dW.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from edgetrain.kernels import detfloat
from edgetrain.ops.base import Op, register
from edgetrain.ops.windows import WindowGeometry


class Layout(NamedTuple):
    """Where the transposed convolution's full result sits in a buffer, and which part is the output."""

    geo: WindowGeometry  # windows over the buffer, one per input position
    buffer: tuple[int, ...]  # spatial size of the buffer the columns are scattered into
    crop: tuple[slice, ...]  # the output's part of the buffer


@register("ConvTranspose")
class ConvTranspose(Op):
    """X (N, C, *S), W (C, M / group, *k), optional B (M) -> Y (N, M, *out).

    out = stride * (S - 1) + output_padding + (k - 1) * dilation + 1 - pad_begin - pad_end, unless
    output_shape or auto_pad SAME_* fix it; then the total padding follows from it and is split as the
    spec says (SAME_UPPER: the smaller half first; otherwise the larger half first).
    """

    def _layout(self, x_shape: tuple, w_shape: tuple) -> Layout:
        spatial = tuple(x_shape[2:])
        nd = len(spatial)
        kernel = tuple(int(k) for k in self.attr("kernel_shape", w_shape[2:]))
        if kernel != tuple(w_shape[2:]):
            raise self.fail(f"kernel_shape {list(kernel)} does not match the weight {tuple(w_shape)}")
        strides = tuple(self.attr("strides", [1] * nd))
        dilations = tuple(self.attr("dilations", [1] * nd))
        out_pad = tuple(self.attr("output_padding", [0] * nd))
        if not (len(strides) == len(dilations) == len(out_pad) == nd):
            raise self.fail(f"strides, dilations and output_padding must have {nd} entries")
        extent = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
        natural = [s * (n - 1) + p + e for s, n, p, e in zip(strides, spatial, out_pad, extent)]
        auto_pad = self.attr("auto_pad", "NOTSET")
        auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
        if auto_pad not in ("NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID"):
            raise self.fail(f"unknown auto_pad '{auto_pad}'")
        out_shape = self.attr("output_shape")
        if out_shape is not None:
            out_shape = [int(v) for v in out_shape][-nd:]
        elif auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            out_shape = [n * s for n, s in zip(spatial, strides)]
        if out_shape is not None:
            total = [f - o for f, o in zip(natural, out_shape)]
            if auto_pad == "SAME_UPPER":
                begin = [t // 2 for t in total]
            else:
                begin = [t - t // 2 for t in total]
            out = list(out_shape)
        else:
            pads = [0] * (2 * nd) if auto_pad == "VALID" else list(self.attr("pads", [0] * (2 * nd)))
            if len(pads) != 2 * nd:
                raise self.fail(f"pads must have {2 * nd} entries, has {len(pads)}")
            begin = pads[:nd]
            out = [f - b - e for f, b, e in zip(natural, begin, pads[nd:])]
        if min(out, default=1) <= 0:
            raise self.fail(f"output size {out} is not positive")
        # The buffer holds the full result and whatever the output reaches beyond it (output_padding,
        # a larger output_shape), so cropping never falls outside it.
        lead = [max(0, -b) for b in begin]
        full = [s * (n - 1) + e for s, n, e in zip(strides, spatial, extent)]
        buffer = tuple(ld + max(f, b + o) for ld, f, b, o in zip(lead, full, begin, out))
        crop = tuple(slice(ld + b, ld + b + o) for ld, b, o in zip(lead, begin, out))
        geo = WindowGeometry(kernel, strides, dilations, tuple(lead), tuple(0 for _ in lead), spatial,
                             tuple(0 for _ in lead))
        return Layout(geo, buffer, crop)

    def forward(self, inputs, run):
        x, w = inputs[0], inputs[1]
        b = inputs[2] if len(inputs) > 2 else None
        groups = int(self.attr("group", 1))
        if x.ndim < 3 or w.ndim != x.ndim:
            raise self.fail(f"input {x.shape} and weight {w.shape} must both be (N, C, *spatial)")
        n, c = x.shape[:2]
        if c != w.shape[0] or c % groups:
            raise self.fail(f"input has {c} channels, weight {w.shape} with group={groups} expects {w.shape[0]}")
        m = w.shape[1] * groups
        lay = self._layout(x.shape, w.shape)
        geo = lay.geo
        k = geo.window_size
        xg = np.ascontiguousarray(x.swapaxes(0, 1)).reshape(groups, c // groups, -1)
        wg = w.reshape(groups, c // groups, -1)  # (G, C/G, M/G * k)
        cols = detfloat.op_matmul(wg.transpose(0, 2, 1), xg).reshape((m, k, n) + geo.out)
        buf = np.zeros((m, n) + lay.buffer, dtype=np.result_type(x, w))
        for i, sl in geo.slices():
            buf[(slice(None), slice(None)) + _shift(sl, geo.pads_begin)] += cols[:, i]
        y = buf[(slice(None), slice(None)) + lay.crop].swapaxes(0, 1)
        if b is not None:
            y = y + b.reshape((1, m) + (1,) * (x.ndim - 2))
        return [np.ascontiguousarray(y)], (x, w, lay, groups, b is not None)

    def backward(self, ctx, grads, needed):
        x, w, lay, groups, has_bias = ctx
        g = grads[0]
        geo = lay.geo
        n, c = x.shape[:2]
        m = g.shape[1]
        gbuf = np.zeros((m, n) + lay.buffer, dtype=g.dtype)
        gbuf[(slice(None), slice(None)) + lay.crop] = g.swapaxes(0, 1)
        gcols = np.stack([gbuf[(slice(None), slice(None)) + _shift(sl, geo.pads_begin)] for _, sl in geo.slices()],
                         axis=1)  # (M, k, N, *S)
        gcols = gcols.reshape(groups, (m // groups) * geo.window_size, -1)
        xg = np.ascontiguousarray(x.swapaxes(0, 1)).reshape(groups, c // groups, -1)
        dw = detfloat.op_matmul(xg, gcols.transpose(0, 2, 1)).reshape(w.shape)
        dx = None
        if needed[0]:
            wg = w.reshape(groups, c // groups, -1)
            dx = detfloat.op_matmul(wg, gcols).reshape((c, n) + tuple(x.shape[2:])).swapaxes(0, 1)
            dx = np.ascontiguousarray(dx)
        out = [dx, dw]
        if has_bias:
            out.append(detfloat.op_channel_sum(g))
        return out

    def macs(self, in_shapes, out_shapes):
        x, w = in_shapes[0], in_shapes[1]
        return int(np.prod(x[2:])) * int(x[1]) * int(np.prod(w[1:]))


def _shift(sl: tuple[slice, ...], offset: tuple[int, ...]) -> tuple[slice, ...]:
    """Window slices moved by the buffer's lead (room kept before the full result)."""
    return tuple(slice(s.start + o, s.stop + o, s.step) for s, o in zip(sl, offset))
