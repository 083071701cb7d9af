"""MaxPool, AveragePool and GlobalAveragePool (N-d, pads, strides, dilations, ceil mode)."""
from __future__ import annotations

import numpy as np

from edgetrain.graph import Node
from edgetrain.kernels import detfloat
from edgetrain.ops import pool_kernels
from edgetrain.ops.base import FusedAway, Op, register
from edgetrain.ops.windows import crop_spatial, geometry, pad_spatial


def _lowest(dtype) -> float | int:
    return -np.inf if np.issubdtype(dtype, np.floating) else np.iinfo(dtype).min


@register("MaxPool")
class MaxPool(Op):
    """MaxPool; with `relu` set (Model places it: `fuse_relu_pool`), also the Relu before it, whose node
    then passes its input through (FusedAway): max(relu(x)) in one pass each way, the same bits."""

    relu = False

    def __init__(self, node: Node, opset: int):
        super().__init__(node, opset)
        self._plans: dict[tuple, tuple] = {}  # input shape -> _plan's

    def _plan(self, x_shape: tuple) -> tuple:
        """(window geometry, the padded spatial shape) for one input shape, kept: a node's attributes never
        change, and resolving them cost a batch-8 pool call about 10 us each way."""
        plan = self._plans.get(x_shape)
        if plan is None:
            geo = geometry(self.node.name, self.attrs, x_shape[2:], tuple(self.attr("kernel_shape")),
                           bool(self.attr("ceil_mode", 0)))
            padded = tuple(s + b + e + c for s, b, e, c in zip(x_shape[2:], geo.pads_begin, geo.pads_end,
                                                                geo.ceil_extra))
            plan = self._plans[x_shape] = (geo, padded)
        return plan

    def forward(self, inputs, run):
        (x,) = inputs
        geo, padded = self._plan(x.shape)
        xp = pad_spatial(x, geo, _lowest(x.dtype))
        if pool_kernels.compiled_case(x.ndim, x.dtype, geo.kernel):
            y, arg = _pool2d(xp, geo, self.relu)
        else:
            if self.relu:
                # the padding becomes 0 too: it can tie only with a window's maximum of 0, marked below
                xp = np.maximum(xp, 0).astype(xp.dtype, copy=False)
            wins = np.stack([xp[(slice(None), slice(None)) + sl] for _, sl in geo.slices()])
            arg = wins.argmax(axis=0)
            y = np.take_along_axis(wins, arg[None], axis=0)[0]
            if self.relu:
                arg[~(y > 0)] = pool_kernels.NO_GRADIENT  # the Relu's backward passes nothing there
        outs = [y]
        if len(self.node.outputs) > 1 and self.node.outputs[1]:
            outs.append(self._indices(arg, x.shape, geo))
        return outs, (arg, x.shape, geo, padded)

    def _indices(self, arg, x_shape, geo):
        """Flat positions of each maximum in the unpadded input, as ONNX's Indices output."""
        offs = geo.offsets()[arg]  # (..., nd)
        spatial = x_shape[2:]
        n, c = x_shape[:2]
        pos = []
        for d in range(len(spatial)):
            grid = np.arange(geo.out[d]) * geo.strides[d]
            grid = grid.reshape((1, 1) + tuple(-1 if k == d else 1 for k in range(len(spatial))))
            pos.append(grid + offs[..., d] * geo.dilations[d] - geo.pads_begin[d])
        if self.attr("storage_order", 0) == 1:
            pos, dims = pos[::-1], spatial[::-1]
        else:
            dims = spatial
        flat = np.zeros(arg.shape, dtype=np.int64)
        for p, size in zip(pos, dims):
            flat = flat * size + p
        base = (np.arange(n).reshape(-1, 1) * c + np.arange(c).reshape(1, -1)) * int(np.prod(spatial))
        return flat + base.reshape(base.shape + (1,) * len(spatial))

    def backward(self, ctx, grads, needed):
        arg, x_shape, geo, padded = ctx
        g = grads[0]
        if pool_kernels.compiled_case(g.ndim, g.dtype, geo.kernel):
            dxp = _unpool2d(np.ascontiguousarray(g), arg, geo, padded)
        else:
            dxp = np.zeros(tuple(x_shape[:2]) + padded, dtype=g.dtype)
            for i, sl in geo.slices():
                dxp[(slice(None), slice(None)) + sl] += np.where(arg == i, g, 0)
        return [np.ascontiguousarray(crop_spatial(dxp, geo, tuple(x_shape[2:])))]


def fuse_relu_pool(relu_node, pool_node, opset: int) -> tuple[MaxPool, FusedAway] | None:
    """A MaxPool that also runs the Relu that alone feeds it, and the Relu's stand-in; None when the pool's
    Indices output is in use (the fused argmax marks windows whose maximum is 0 `NO_GRADIENT`, which is no
    index)."""
    if pool_node.op_type != "MaxPool" or any(o for o in pool_node.outputs[1:]):
        return None
    pool = MaxPool(pool_node, opset)
    pool.relu = True
    return pool, FusedAway(relu_node, opset)


def _pool2d(xp: np.ndarray, geo, relu: bool) -> tuple[np.ndarray, np.ndarray]:
    """MaxPool's output and argmax (offset index per output, int8) of a padded NCHW float input, compiled."""
    n, c = xp.shape[:2]
    planes = np.ascontiguousarray(xp).reshape((n * c,) + xp.shape[2:])
    y = np.empty((n * c,) + tuple(geo.out), xp.dtype)
    arg = np.empty(y.shape, np.int8)
    pool_kernels.maxpool2d_forward(planes, *geo.kernel, *geo.strides, *geo.dilations, y, arg,
                                   pool_kernels.PARALLEL_MIN_OUTPUTS, relu)
    return y.reshape((n, c) + y.shape[1:]), arg.reshape((n, c) + y.shape[1:])


def _unpool2d(g: np.ndarray, arg: np.ndarray, geo, padded: tuple) -> np.ndarray:
    """dx over the padded NCHW input: g at each window's argmax, compiled."""
    n, c = g.shape[:2]
    planes = (n * c,) + g.shape[2:]
    dxp = pool_kernels.maxpool2d_backward(g.reshape(planes), arg.reshape(planes), *geo.kernel, *geo.strides,
                                          *geo.dilations, padded, pool_kernels.PARALLEL_MIN_OUTPUTS)
    return dxp.reshape((n, c) + tuple(padded))


@register("AveragePool")
class AveragePool(Op):
    def _counts(self, x_shape, geo, dtype):
        """How many elements each window averages: pads count only with count_include_pad."""
        ones = np.ones((1, 1) + tuple(x_shape[2:]), dtype=dtype)
        if self.attr("count_include_pad", 0):
            ones = np.pad(ones, [(0, 0), (0, 0)] + [(b, e) for b, e in zip(geo.pads_begin, geo.pads_end)],
                          constant_values=1)
            ones = np.pad(ones, [(0, 0), (0, 0)] + [(0, c) for c in geo.ceil_extra])
        else:
            ones = pad_spatial(ones, geo, 0)
        return sum(ones[(slice(None), slice(None)) + sl] for _, sl in geo.slices())

    def forward(self, inputs, run):
        (x,) = inputs
        geo = geometry(self.node.name, self.attrs, x.shape[2:], tuple(self.attr("kernel_shape")),
                       bool(self.attr("ceil_mode", 0)))
        xp = pad_spatial(x, geo, 0)
        total = sum(xp[(slice(None), slice(None)) + sl] for _, sl in geo.slices())
        counts = self._counts(x.shape, geo, x.dtype)
        return [(total / counts).astype(x.dtype, copy=False)], (counts, x.shape, geo)

    def backward(self, ctx, grads, needed):
        counts, x_shape, geo = ctx
        g = grads[0] / counts
        padded = tuple(s + b + e + x for s, b, e, x in zip(x_shape[2:], geo.pads_begin, geo.pads_end, geo.ceil_extra))
        dxp = np.zeros(tuple(x_shape[:2]) + padded, dtype=g.dtype)
        for _, sl in geo.slices():
            dxp[(slice(None), slice(None)) + sl] += g
        return [np.ascontiguousarray(crop_spatial(dxp, geo, tuple(x_shape[2:])))]


@register("GlobalAveragePool")
class GlobalAveragePool(Op):
    def forward(self, inputs, run):
        (x,) = inputs
        axes = tuple(range(2, x.ndim))
        return [detfloat.op_mean(x, axes, keepdims=True)], x.shape

    def backward(self, ctx, grads, needed):
        shape = ctx
        size = int(np.prod(shape[2:]))
        return [np.broadcast_to(grads[0] / size, shape).copy()]


@register("GlobalMaxPool")
class GlobalMaxPool(Op):
    def forward(self, inputs, run):
        (x,) = inputs
        flat = x.reshape(x.shape[:2] + (-1,))
        arg = flat.argmax(axis=2)
        y = np.take_along_axis(flat, arg[..., None], axis=2)
        return [y.reshape(x.shape[:2] + (1,) * (x.ndim - 2))], (arg, x.shape)

    def backward(self, ctx, grads, needed):
        arg, shape = ctx
        d = np.zeros(shape[:2] + (int(np.prod(shape[2:])),), dtype=grads[0].dtype)
        np.put_along_axis(d, arg[..., None], grads[0].reshape(shape[:2] + (1,)), axis=2)
        return [d.reshape(shape)]
