"""Ops that move data without arithmetic, and the small integer shape ops exporters emit.

Shape, Gather, Unsqueeze, Squeeze, Slice, Cast and ConstantOfShape are folded away at import when
their inputs are constant; they stay as runtime ops only where they depend on the free batch size.
"""
from __future__ import annotations

import math

import numpy as np
import onnx

from edgetrain.ops.base import Op, register


def _axes(op: Op, inputs: list, index: int, ndim: int) -> list[int] | None:
    """Axes from the attribute (older opsets) or from an input (newer ones), normalised."""
    if len(inputs) > index and inputs[index] is not None:
        axes = [int(a) for a in np.asarray(inputs[index]).reshape(-1)]
    else:
        axes = op.attr("axes")
    if axes is None:
        return None
    return [a % ndim for a in axes]


@register("Identity")
class Identity(Op):
    def forward(self, inputs, run):
        return [inputs[0]], None

    def backward(self, ctx, grads, needed):
        return [grads[0]]


@register("Dropout")
class Dropout(Op):
    """Identity in eval; in training drops with the node's ratio from the run's seeded stream."""

    def forward(self, inputs, run):
        x = inputs[0]
        ratio = float(inputs[1]) if len(inputs) > 1 and inputs[1] is not None else self.attr("ratio", 0.5)
        mode = bool(inputs[2]) if len(inputs) > 2 and inputs[2] is not None else run.training
        want_mask = len(self.node.outputs) > 1 and self.node.outputs[1]
        if not mode or ratio == 0.0:
            outs = [x]
            if want_mask:
                outs.append(np.ones(x.shape, dtype=bool))
            return outs, None
        # Keyed by (run key, node position) so masks are reproducible on any machine.
        keep = np.random.default_rng(list(run.key) + [run.position]).random(x.shape) >= ratio
        scale = np.asarray(1.0 / (1.0 - ratio), dtype=x.dtype)
        outs = [np.where(keep, x * scale, 0).astype(x.dtype, copy=False)]
        if want_mask:
            outs.append(keep)
        return outs, (keep, scale)

    def backward(self, ctx, grads, needed):
        if ctx is None:
            return [grads[0], None, None]
        keep, scale = ctx
        return [np.where(keep, grads[0] * scale, 0), None, None]


@register("Flatten")
class Flatten(Op):
    def forward(self, inputs, run):
        (x,) = inputs
        axis = self.attr("axis", 1)
        axis = axis % x.ndim if axis < 0 else axis
        rows = math.prod(x.shape[:axis])  # np.prod of a shape tuple: about 5 us a call, math.prod 0.1
        return [x.reshape(rows, -1) if x.size else x.reshape(rows, math.prod(x.shape[axis:]))], x.shape

    def backward(self, ctx, grads, needed):
        return [grads[0].reshape(ctx)]


@register("Reshape")
class Reshape(Op):
    def forward(self, inputs, run):
        x, shape = inputs
        shape = [int(s) for s in shape]
        if not self.attr("allowzero", 0):
            shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
        return [x.reshape(shape)], x.shape

    def backward(self, ctx, grads, needed):
        return [grads[0].reshape(ctx), None]


@register("Transpose")
class Transpose(Op):
    def forward(self, inputs, run):
        (x,) = inputs
        perm = self.attr("perm", list(range(x.ndim))[::-1])
        return [np.ascontiguousarray(x.transpose(perm))], perm

    def backward(self, ctx, grads, needed):
        return [np.ascontiguousarray(grads[0].transpose(np.argsort(ctx)))]


@register("Concat")
class Concat(Op):
    def forward(self, inputs, run):
        axis = self.attr("axis") % inputs[0].ndim
        return [np.concatenate(inputs, axis=axis)], (axis, [t.shape[axis] for t in inputs])

    def backward(self, ctx, grads, needed):
        axis, sizes = ctx
        return np.split(grads[0], np.cumsum(sizes)[:-1], axis=axis)


@register("Unsqueeze")
class Unsqueeze(Op):
    def forward(self, inputs, run):
        x = inputs[0]
        raw = inputs[1] if len(inputs) > 1 and inputs[1] is not None else self.attr("axes")
        raw = [int(a) for a in np.asarray(raw).reshape(-1)]
        out_ndim = x.ndim + len(raw)
        y = x
        for a in sorted(a % out_ndim for a in raw):
            y = np.expand_dims(y, a)
        return [y], x.shape

    def backward(self, ctx, grads, needed):
        return [grads[0].reshape(ctx), None]


@register("Squeeze")
class Squeeze(Op):
    def forward(self, inputs, run):
        x = inputs[0]
        axes = _axes(self, inputs, 1, x.ndim)
        y = np.squeeze(x, axis=tuple(axes)) if axes is not None else np.squeeze(x)
        return [y], x.shape

    def backward(self, ctx, grads, needed):
        return [grads[0].reshape(ctx), None]


@register("Shape")
class Shape(Op):
    def forward(self, inputs, run):
        shape = np.array(inputs[0].shape, dtype=np.int64)
        start = self.attr("start", 0)
        end = self.attr("end", None)
        return [shape[start:end]], None

    def backward(self, ctx, grads, needed):
        return [None]


@register("Gather")
class Gather(Op):
    def forward(self, inputs, run):
        x, idx = inputs
        axis = self.attr("axis", 0) % x.ndim
        idx = np.where(idx < 0, idx + x.shape[axis], idx)
        return [np.take(x, idx, axis=axis)], (x.shape, idx, axis)

    def backward(self, ctx, grads, needed):
        shape, idx, axis = ctx
        dx = np.zeros(shape, dtype=grads[0].dtype)
        moved = np.moveaxis(dx, axis, 0)
        g = grads[0].reshape(shape[:axis] + (idx.size,) + shape[axis + 1:])
        np.add.at(moved, idx.reshape(-1), np.moveaxis(g, axis, 0))
        return [dx, None]


@register("Cast")
class Cast(Op):
    def forward(self, inputs, run):
        to = onnx.helper.tensor_dtype_to_np_dtype(self.attr("to"))
        return [inputs[0].astype(to)], inputs[0].dtype

    def backward(self, ctx, grads, needed):
        return [grads[0].astype(ctx) if np.issubdtype(ctx, np.floating) else None]


@register("CastLike")
class CastLike(Op):
    """Cast to the element type of the second input (exporters' way of matching a constant to x)."""

    def forward(self, inputs, run):
        x, like = inputs
        return [x.astype(like.dtype)], (x.dtype, like.dtype)

    def backward(self, ctx, grads, needed):
        src, dst = ctx
        floats = np.issubdtype(src, np.floating) and np.issubdtype(dst, np.floating)
        return [grads[0].astype(src) if floats else None, None]


@register("Slice")
class Slice(Op):
    def forward(self, inputs, run):
        x = inputs[0]
        starts, ends = [np.asarray(v).reshape(-1) for v in inputs[1:3]]
        axes = _axes(self, inputs, 3, x.ndim) or list(range(len(starts)))
        steps = np.asarray(inputs[4]).reshape(-1) if len(inputs) > 4 and inputs[4] is not None else [1] * len(starts)
        index = [slice(None)] * x.ndim
        for a, s, e, st in zip(axes, starts, ends, steps):
            index[a] = slice(int(s), int(e), int(st))
        return [x[tuple(index)]], (x.shape, tuple(index))

    def backward(self, ctx, grads, needed):
        shape, index = ctx
        dx = np.zeros(shape, dtype=grads[0].dtype)
        dx[index] = grads[0]
        return [dx, None, None, None, None]


@register("ConstantOfShape")
class ConstantOfShape(Op):
    def forward(self, inputs, run):
        value = self.attr("value")
        arr = onnx.numpy_helper.to_array(value) if value is not None else np.zeros(1, dtype=np.float32)
        return [np.full(tuple(int(s) for s in inputs[0]), arr.reshape(-1)[0], dtype=arr.dtype)], None

    def backward(self, ctx, grads, needed):
        return [None]
