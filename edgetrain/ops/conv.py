"""Conv (N-d, grouped and depthwise) as im2col + one GEMM per group, forward and backward."""
from __future__ import annotations

import numpy as np

from edgetrain.kernels import detfloat
from edgetrain.ops.base import Op, register
from edgetrain.ops.windows import crop_spatial, geometry, pad_spatial


@register("Conv")
class Conv(Op):
    def _geometry(self, x_shape, w_shape):
        kernel = tuple(self.attr("kernel_shape", w_shape[2:]))
        return geometry(self.node.name, self.attrs, tuple(x_shape[2:]), kernel)

    def forward(self, inputs, run):
        x, w = inputs[0], inputs[1]
        b = inputs[2] if len(inputs) > 2 else None
        groups = int(self.attr("group", 1))
        n, c = x.shape[:2]
        m = w.shape[0]
        if c != w.shape[1] * groups or m % groups:
            raise self.fail(f"input has {c} channels, weight {w.shape} with group={groups} "
                            f"expects {w.shape[1] * groups}")
        geo = self._geometry(x.shape, w.shape)
        # Channels first, so stacking the windows on axis 1 gives (C, K, N, *out) with no transpose copy.
        xp = pad_spatial(x, geo, 0).swapaxes(0, 1)
        cols = np.stack([xp[(slice(None), slice(None)) + sl] for _, sl in geo.slices()], axis=1)
        length = n * int(np.prod(geo.out))
        cols = cols.reshape(groups, (c // groups) * geo.window_size, length)
        wg = w.reshape(groups, m // groups, -1)
        y = detfloat.op_matmul(wg, cols).reshape((m, n) + geo.out).swapaxes(0, 1)
        if b is not None:
            y = y + b.reshape((1, m) + (1,) * len(geo.out))
        y = np.ascontiguousarray(y)
        return [y], (cols, w, x.shape, geo, groups, b is not None)

    def backward(self, ctx, grads, needed):
        cols, w, x_shape, geo, groups, has_bias = ctx
        g = grads[0]
        n, c = x_shape[:2]
        m = w.shape[0]
        gy = np.ascontiguousarray(g.swapaxes(0, 1)).reshape(groups, m // groups, -1)
        dw = detfloat.op_matmul(gy, cols.transpose(0, 2, 1)).reshape(w.shape)
        if not needed[0]:  # nobody needs dL/dx (the first layer)
            return [None, dw] + ([detfloat.op_channel_sum(g)] if has_bias else [])
        dcols = detfloat.op_matmul(w.reshape(groups, m // groups, -1).transpose(0, 2, 1), gy)
        dcols = dcols.reshape((c, geo.window_size, n) + geo.out)
        padded = tuple(s + b + e + x for s, b, e, x in zip(x_shape[2:], geo.pads_begin, geo.pads_end, geo.ceil_extra))
        dxp = np.zeros((c, n) + padded, dtype=g.dtype)
        for i, sl in geo.slices():
            dxp[(slice(None), slice(None)) + sl] += dcols[:, i]
        dx = np.ascontiguousarray(crop_spatial(dxp, geo, tuple(x_shape[2:])).swapaxes(0, 1))
        out = [dx, dw]
        if has_bias:
            out.append(detfloat.op_channel_sum(g))
        return out

    def macs(self, in_shapes, out_shapes):
        w = in_shapes[1]
        return int(np.prod(out_shapes[0][2:])) * int(w[0]) * int(np.prod(w[1:]))
