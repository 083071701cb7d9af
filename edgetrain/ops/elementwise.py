"""Elementwise arithmetic and activations, with numpy (multidirectional) broadcasting."""
from __future__ import annotations

import numpy as np

from edgetrain.kernels import detfloat
from edgetrain.kernels.threads import SMALL_ELEMENTS
from edgetrain.ops.base import Op, register, unbroadcast
from edgetrain.ops.norm_kernels import (
    add_relu_parallel,
    clip_forward,
    relu_backward,
    relu_backward_over,
    relu_backward_parallel,
)


@register("Add")
class Add(Op):
    def forward(self, inputs, run):
        a, b = inputs
        return [a + b], (a.shape, b.shape)

    def backward(self, ctx, grads, needed):
        (g,) = grads
        return [unbroadcast(g, ctx[0]), unbroadcast(g, ctx[1])]


class AddRelu(Op):
    """An Add and the Relu that alone reads its output, as one op (Model fuses them in integer models,
    where the join of a residual block is a full pass of its own): y = max(a + b, 0), the same values
    as the two ops, in one parallel pass each way."""

    def forward(self, inputs, run):
        a, b = inputs
        if a.shape == b.shape and a.dtype == b.dtype and a.dtype.kind == "f" and a.size >= SMALL_ELEMENTS:
            y = np.empty(a.shape, a.dtype)
            add_relu_parallel(np.ascontiguousarray(a).reshape(-1), np.ascontiguousarray(b).reshape(-1), y.reshape(-1))
        else:
            s = a + b
            y = np.maximum(s, 0).astype(s.dtype, copy=False)
        return [y], (y, a.shape, b.shape)

    reuses_grads = True  # the ReLU's gradient is written over the output gradient where that is ours (Op)

    def backward(self, ctx, grads, needed, owned: tuple[bool, ...] = ()):
        y, a_shape, b_shape = ctx
        g = grads[0]
        if y.size >= SMALL_ELEMENTS and y.flags.c_contiguous and g.flags.c_contiguous and y.dtype == g.dtype:
            if owned and owned[0]:
                relu_backward_over(y.reshape(-1), g.reshape(-1))
                masked = g
            else:
                masked = np.empty_like(g)
                relu_backward_parallel(y.reshape(-1), g.reshape(-1), masked.reshape(-1))
        else:
            masked = g * (y > 0)
        return [unbroadcast(masked, a_shape), unbroadcast(masked, b_shape)]


@register("Sub")
class Sub(Op):
    def forward(self, inputs, run):
        a, b = inputs
        return [a - b], (a.shape, b.shape)

    def backward(self, ctx, grads, needed):
        (g,) = grads
        return [unbroadcast(g, ctx[0]), unbroadcast(-g, ctx[1])]


@register("Mul")
class Mul(Op):
    def forward(self, inputs, run):
        a, b = inputs
        return [a * b], (a, b)

    def backward(self, ctx, grads, needed):
        a, b = ctx
        (g,) = grads
        return [unbroadcast(g * b, a.shape), unbroadcast(g * a, b.shape)]


@register("Div")
class Div(Op):
    def forward(self, inputs, run):
        a, b = inputs
        if np.issubdtype(a.dtype, np.integer):
            # ONNX integer division truncates toward zero, numpy's // floors.
            return [np.trunc(a / b).astype(a.dtype)], None
        return [a / b], (a, b)

    def backward(self, ctx, grads, needed):
        a, b = ctx
        (g,) = grads
        return [unbroadcast(g / b, a.shape), unbroadcast(-g * a / (b * b), b.shape)]


def relu(x: np.ndarray) -> np.ndarray:
    """The Relu op's output: np.maximum(x, 0) in x's type (NaN stays NaN, -0.0 becomes +0.0)."""
    return np.maximum(x, 0).astype(x.dtype, copy=False)


def relu_grad(y: np.ndarray, g: np.ndarray) -> np.ndarray:
    """The Relu op's input gradient from its output y and output gradient g: g where y > 0, else 0."""
    if not (y.flags.c_contiguous and g.flags.c_contiguous and y.dtype == g.dtype):
        return g * (y > 0)
    out = np.empty_like(g)
    relu_backward(y.reshape(-1), g.reshape(-1), out.reshape(-1))
    return out


@register("Relu")
class Relu(Op):
    def forward(self, inputs, run):
        y = relu(inputs[0])
        return [y], y  # y > 0 exactly where x > 0: no separate mask to build and keep

    def backward(self, ctx, grads, needed):
        return [relu_grad(ctx, grads[0])]


@register("LeakyRelu")
class LeakyRelu(Op):
    def forward(self, inputs, run):
        (x,) = inputs
        alpha = np.asarray(self.attr("alpha", 0.01), dtype=x.dtype)
        pos = x >= 0
        return [np.where(pos, x, x * alpha)], (pos, alpha)

    def backward(self, ctx, grads, needed):
        pos, alpha = ctx
        return [np.where(pos, grads[0], grads[0] * alpha)]


@register("Sigmoid")
class Sigmoid(Op):
    def forward(self, inputs, run):
        (x,) = inputs
        y = detfloat.op_sigmoid(x)
        return [y], y

    def backward(self, ctx, grads, needed):
        y = ctx
        return [grads[0] * y * (1 - y)]


@register("Clip")
class Clip(Op):
    """Clip with min/max as optional inputs (opset 11+): ReLU6 is Clip(0, 6)."""

    def forward(self, inputs, run):
        x = inputs[0]
        lo = inputs[1] if len(inputs) > 1 else None
        hi = inputs[2] if len(inputs) > 2 else None
        if (x.dtype.kind == "f" and x.flags.c_contiguous and all(b is None or np.size(b) == 1 for b in (lo, hi))
                and (lo is not None or hi is not None)):
            y, keep = np.empty_like(x), np.empty(x.shape, dtype=bool)
            lo_v, hi_v = (x.dtype.type(0 if b is None else np.asarray(b).reshape(())) for b in (lo, hi))
            clip_forward(x.reshape(-1), lo_v, hi_v, lo is not None, hi is not None, y.reshape(-1), keep.reshape(-1))
            return [y], keep
        y = x
        if lo is not None:
            y = np.maximum(y, lo.astype(x.dtype))
        if hi is not None:
            y = np.minimum(y, hi.astype(x.dtype))
        # No gradient at a bound itself, as for Relu (x > 0) and PyTorch's ReLU6/hardtanh: a value sitting
        # exactly on the bound (a BatchNorm output of a channel constant across the batch) is clipped.
        keep = np.ones(x.shape, dtype=bool)
        if lo is not None:
            keep &= x > lo
        if hi is not None:
            keep &= x < hi
        return [y.astype(x.dtype, copy=False)], keep

    def backward(self, ctx, grads, needed):
        g = grads[0]
        if g.shape != ctx.shape or not g.flags.c_contiguous:
            return [g * ctx, None, None]
        out = np.empty_like(g)
        relu_backward(ctx.reshape(-1), g.reshape(-1), out.reshape(-1))  # keep > 0: True where Clip passes
        return [out, None, None]


def _softmax_rows(op: Op, x: np.ndarray) -> tuple[np.ndarray, int]:
    """x viewed so the softmax runs along one axis: the node's axis (opset 13+), or the flattened trailing
    axes from it (opset < 13)."""
    default_axis = -1 if op.opset >= 13 else 1
    axis = op.attr("axis", default_axis) % max(x.ndim, 1)
    if op.opset < 13:
        return x.reshape(int(np.prod(x.shape[:axis], dtype=np.int64)), -1), 1
    return x, axis


@register("Softmax")
class Softmax(Op):
    """Softmax over one axis (opset 13+), or over the flattened trailing axes (opset < 13)."""

    def forward(self, inputs, run):
        (x,) = inputs
        shape = x.shape
        x, axis = _softmax_rows(self, x)
        if detfloat.active():
            y = detfloat.softmax(x, axis)
        else:
            z = x - x.max(axis=axis, keepdims=True)
            e = np.exp(z)
            y = e / e.sum(axis=axis, keepdims=True)
        return [y.reshape(shape)], (y, axis, shape)

    def backward(self, ctx, grads, needed):
        y, axis, shape = ctx
        g = grads[0].reshape(y.shape)
        dx = y * (g - detfloat.op_sum(g * y, axis, keepdims=True))
        return [dx.reshape(shape)]


@register("LogSoftmax")
class LogSoftmax(Op):
    """x - max - log(sum(exp(x - max))) along Softmax's axis: no overflow, no log of 0."""

    def forward(self, inputs, run):
        (x,) = inputs
        shape = x.shape
        x, axis = _softmax_rows(self, x)
        if detfloat.active():
            y = detfloat.log_softmax(x, axis).astype(x.dtype, copy=False)
        else:
            z = x - x.max(axis=axis, keepdims=True)
            y = z - np.log(np.exp(z).sum(axis=axis, keepdims=True))
        return [y.reshape(shape)], (y, axis, shape)

    def backward(self, ctx, grads, needed):
        y, axis, shape = ctx
        g = grads[0].reshape(y.shape)
        return [(g - detfloat.op_exp(y) * detfloat.op_sum(g, axis, keepdims=True)).reshape(shape)]


@register("Hardmax")
class Hardmax(Op):
    """One-hot of the first maximum along Softmax's axis; piecewise constant, so a zero gradient."""

    def forward(self, inputs, run):
        (x,) = inputs
        shape = x.shape
        x, axis = _softmax_rows(self, x)
        y = np.zeros_like(x)
        np.put_along_axis(y, np.expand_dims(np.argmax(x, axis=axis), axis), 1, axis=axis)
        return [y.reshape(shape)], None

    def backward(self, ctx, grads, needed):
        return [np.zeros_like(grads[0])]


@register("PRelu")
class PRelu(Op):
    """x where x > 0, slope * x elsewhere; the slope (a weight, broadcast to x) gets its gradient as PyTorch's."""

    def forward(self, inputs, run):
        x, slope = inputs
        pos = x > 0
        return [np.where(pos, x, x * slope).astype(x.dtype, copy=False)], (x, slope, pos)

    def backward(self, ctx, grads, needed):
        x, slope, pos = ctx
        (g,) = grads
        dx = np.where(pos, g, g * slope).astype(x.dtype, copy=False) if needed[0] else None
        ds = unbroadcast(np.where(pos, 0, g * x), slope.shape).astype(slope.dtype, copy=False) if needed[1] else None
        return [dx, ds]
