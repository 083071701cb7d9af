"""Ops that copy, repeat or rearrange values: Split, Pad, Expand, Tile, Trilu, DepthToSpace, SpaceToDepth;
and the integer generators Range and Size.

Every backward here is the exact adjoint of its forward's index map: gradients of repeated or
reflected values are summed in a fixed order, never by threads.
"""
from __future__ import annotations

import numpy as np

from edgetrain.ops.base import Op, register, unbroadcast
from edgetrain.ops.taps import apply_taps, taps_of


def _ints(v) -> list[int]:
    return [int(a) for a in np.asarray(v).reshape(-1)]


@register("Split")
class Split(Op):
    """Sizes from the `split` attribute (opset < 13) or input (>= 13), else equal parts: as many as the
    node has outputs, or `num_outputs` (opset 18), the last part smaller when the axis does not divide."""

    all_outputs_differentiable = True  # any output may carry the only gradient (the engine asks every output)

    def _sizes(self, inputs, length: int) -> list[int]:
        count = len(self.node.outputs)
        if self.opset >= 13:
            split = inputs[1] if len(inputs) > 1 and inputs[1] is not None else None
        else:
            split = self.attr("split")
        if split is not None:
            sizes = _ints(split)
            if len(sizes) != count or sum(sizes) != length or min(sizes, default=0) < 0:
                raise self.fail(f"split {sizes} does not cut an axis of {length} into {count} outputs")
            return sizes
        parts = int(self.attr("num_outputs", count))
        if parts != count:
            raise self.fail(f"num_outputs={parts} but the node has {count} outputs")
        step = -(-length // parts)
        if self.attr("num_outputs") is None and length % parts:
            raise self.fail(f"an axis of {length} does not split into {parts} equal parts")
        return [max(0, min(step, length - i * step)) for i in range(parts)]

    def forward(self, inputs, run):
        x = inputs[0]
        axis = int(self.attr("axis", 0)) % x.ndim
        sizes = self._sizes(inputs, x.shape[axis])
        outs = np.split(x, np.cumsum(sizes)[:-1], axis=axis)
        return [np.ascontiguousarray(o) for o in outs], (axis, sizes, x.shape, x.dtype)

    def backward(self, ctx, grads, needed):
        axis, sizes, shape, dtype = ctx
        parts = []
        for g, n in zip(grads, sizes):
            if g is None:
                part_shape = shape[:axis] + (n,) + shape[axis + 1:]
                g = np.zeros(part_shape, dtype=dtype)
            parts.append(g)
        return [np.concatenate(parts, axis=axis), None]


def _pad_index(length: int, begin: int, end: int, mode: str) -> np.ndarray:
    """For each output position along one axis, the input position it copies (-1: the constant)."""
    src = np.arange(-begin, length + end, dtype=np.int64)
    inside = (src >= 0) & (src < length)
    if mode == "constant":
        return np.where(inside, src, -1)
    if mode == "edge":
        return np.clip(src, 0, length - 1)
    if mode == "wrap":
        return src % length
    # reflect: the triangle wave of period 2 (length - 1), which numpy's repeated reflection also gives
    if length == 1:
        return np.zeros_like(src)
    period = 2 * (length - 1)
    r = src % period
    return np.where(r >= length, period - r, r)


@register("Pad")
class Pad(Op):
    """Pads (and, where negative, crops) with modes constant, reflect, edge and wrap (opset 19).

    pads, constant_value and axes (opset 18) are inputs; the pads list gives every padded axis's begin,
    then every padded axis's end.
    """

    def forward(self, inputs, run):
        x = inputs[0]
        pads = _ints(inputs[1]) if len(inputs) > 1 and inputs[1] is not None else _ints(self.attr("pads", []))
        axes = _ints(inputs[3]) if len(inputs) > 3 and inputs[3] is not None else list(range(x.ndim))
        if len(pads) != 2 * len(axes):
            raise self.fail(f"pads has {len(pads)} entries, {2 * len(axes)} expected for axes {axes}")
        begin, end = [0] * x.ndim, [0] * x.ndim
        for i, a in enumerate(axes):
            if not -x.ndim <= a < x.ndim:
                raise self.fail(f"axis {a} is out of range for a rank-{x.ndim} input")
            begin[a % x.ndim], end[a % x.ndim] = pads[i], pads[len(axes) + i]
        mode = self.attr("mode", "constant")
        if isinstance(mode, bytes):
            mode = mode.decode()
        if mode not in ("constant", "reflect", "edge", "wrap"):
            raise self.fail(f"unknown mode '{mode}'")
        value = inputs[2] if len(inputs) > 2 and inputs[2] is not None else None
        value = np.asarray(0 if value is None or value.size == 0 else value.reshape(-1)[0]).astype(x.dtype)
        for a in range(x.ndim):
            if mode != "constant" and x.shape[a] == 0 and begin[a] + end[a] > 0:
                raise self.fail(f"cannot pad an empty axis {a} in mode '{mode}'")
        index = [_pad_index(n, b, e, mode) for n, b, e in zip(x.shape, begin, end)]
        y = x
        for a, idx in enumerate(index):
            if begin[a] == 0 and end[a] == 0:
                continue
            y = np.take(y, np.maximum(idx, 0), axis=a)
            if (idx < 0).any():
                sel = [slice(None)] * y.ndim
                sel[a] = idx < 0
                y[tuple(sel)] = value
        return [np.ascontiguousarray(y)], (x.shape, index, begin, end)

    def backward(self, ctx, grads, needed):
        shape, index, begin, end = ctx
        g = grads[0]
        for a in reversed(range(len(shape))):
            if begin[a] == 0 and end[a] == 0:
                continue
            idx = index[a]
            keep = idx >= 0
            # The adjoint of "output o copies input idx[o]": each input sums the outputs that copied it.
            copies = np.zeros((idx.size, shape[a]), dtype=np.int8)
            copies[np.nonzero(keep)[0], idx[keep]] = 1
            g = apply_taps(g, a, taps_of(copies.T))
        return [np.ascontiguousarray(g), None, None, None]


@register("Expand")
class Expand(Op):
    """Bidirectional broadcast of the input against the shape input."""

    def forward(self, inputs, run):
        x, shape = inputs[0], tuple(_ints(inputs[1]))
        try:
            out = np.broadcast_shapes(x.shape, shape)
        except ValueError:
            raise self.fail(f"input {x.shape} does not broadcast with shape {shape}") from None
        return [np.array(np.broadcast_to(x, out))], x.shape

    def backward(self, ctx, grads, needed):
        return [unbroadcast(grads[0], ctx), None]


@register("Tile")
class Tile(Op):
    def forward(self, inputs, run):
        x, reps = inputs[0], _ints(inputs[1])
        if len(reps) != x.ndim or min(reps, default=0) < 0:
            raise self.fail(f"repeats {reps} must be {x.ndim} non-negative counts")
        return [np.tile(x, reps)], (x.shape, reps)

    def backward(self, ctx, grads, needed):
        shape, reps = ctx
        # Output axis a is (repeat, original) flattened: split it and sum over the repeats.
        split = [d for r, n in zip(reps, shape) for d in (r, n)]
        g = grads[0].reshape(split).sum(axis=tuple(range(0, 2 * len(shape), 2)))
        return [g.reshape(shape), None]


@register("Range")
class Range(Op):
    """start + i * delta for i < max(ceil((limit - start) / delta), 0), in the inputs' type."""

    def forward(self, inputs, run):
        start, limit, delta = (np.asarray(v).reshape(-1)[0] for v in inputs)
        if delta == 0:
            raise self.fail("delta must not be 0")
        count = max(int(np.ceil((float(limit) - float(start)) / float(delta))), 0)
        dtype = np.asarray(inputs[0]).dtype
        return [(start + np.arange(count, dtype=dtype) * delta).astype(dtype)], None

    def backward(self, ctx, grads, needed):
        return [None, None, None]


@register("Size")
class Size(Op):
    def forward(self, inputs, run):
        return [np.array(inputs[0].size, dtype=np.int64)], None

    def backward(self, ctx, grads, needed):
        return [None]


@register("Trilu")
class Trilu(Op):
    """Keep the upper (upper=1) or lower triangle of the last two axes, shifted by the diagonal k."""

    def forward(self, inputs, run):
        x = inputs[0]
        k = int(np.asarray(inputs[1]).reshape(-1)[0]) if len(inputs) > 1 and inputs[1] is not None else 0
        if x.ndim < 2:
            raise self.fail(f"input must have rank >= 2, has {x.ndim}")
        rows, cols = x.shape[-2:]
        i = np.arange(rows)[:, None]
        j = np.arange(cols)[None, :]
        mask = (j - i >= k) if self.attr("upper", 1) else (j - i <= k)
        return [np.where(mask, x, np.zeros((), dtype=x.dtype))], mask

    def backward(self, ctx, grads, needed):
        return [np.where(ctx, grads[0], np.zeros((), dtype=grads[0].dtype)), None]


def _block_mode(op: Op) -> tuple[int, str]:
    size = int(op.attr("blocksize", 0))
    if size <= 0:
        raise op.fail("blocksize must be a positive integer")
    mode = op.attr("mode", "DCR")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode not in ("DCR", "CRD"):
        raise op.fail(f"unknown mode '{mode}'")
    return size, mode


@register("DepthToSpace")
class DepthToSpace(Op):
    """(N, C*b*b, H, W) -> (N, C, H*b, W*b); DCR reads depth as (b, b, C), CRD as (C, b, b)."""

    def forward(self, inputs, run):
        x = inputs[0]
        b, mode = _block_mode(self)
        if x.ndim != 4 or x.shape[1] % (b * b):
            raise self.fail(f"input {x.shape} must be (N, C * {b * b}, H, W)")
        n, c, h, w = x.shape
        if mode == "DCR":
            t = x.reshape(n, b, b, c // (b * b), h, w).transpose(0, 3, 4, 1, 5, 2)
        else:
            t = x.reshape(n, c // (b * b), b, b, h, w).transpose(0, 1, 4, 2, 5, 3)
        return [np.ascontiguousarray(t).reshape(n, c // (b * b), h * b, w * b)], (x.shape, b, mode)

    def backward(self, ctx, grads, needed):
        (n, c, h, w), b, mode = ctx
        g = grads[0]
        if mode == "DCR":
            t = g.reshape(n, c // (b * b), h, b, w, b).transpose(0, 3, 5, 1, 2, 4)
        else:
            t = g.reshape(n, c // (b * b), h, b, w, b).transpose(0, 1, 3, 5, 2, 4)
        return [np.ascontiguousarray(t).reshape(n, c, h, w)]


@register("SpaceToDepth")
class SpaceToDepth(Op):
    """(N, C, H*b, W*b) -> (N, C*b*b, H, W), the inverse of DepthToSpace of the same mode."""

    def forward(self, inputs, run):
        x = inputs[0]
        b, mode = _block_mode(self)
        if x.ndim != 4 or x.shape[2] % b or x.shape[3] % b:
            raise self.fail(f"input {x.shape} must be (N, C, H * {b}, W * {b})")
        n, c, hb, wb = x.shape
        t = x.reshape(n, c, hb // b, b, wb // b, b)
        t = t.transpose(0, 3, 5, 1, 2, 4) if mode == "DCR" else t.transpose(0, 1, 3, 5, 2, 4)
        return [np.ascontiguousarray(t).reshape(n, c * b * b, hb // b, wb // b)], (x.shape, b, mode)

    def backward(self, ctx, grads, needed):
        (n, c, hb, wb), b, mode = ctx
        h, w = hb // b, wb // b
        g = grads[0]
        if mode == "DCR":
            t = g.reshape(n, b, b, c, h, w).transpose(0, 3, 4, 1, 5, 2)
        else:
            t = g.reshape(n, c, b, b, h, w).transpose(0, 1, 4, 2, 5, 3)
        return [np.ascontiguousarray(t).reshape(n, c, hb, wb)]
