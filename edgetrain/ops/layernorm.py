"""LayerNormalization, GroupNormalization, InstanceNormalization: per-sample statistics, learned affine.

All three normalise rows of a 2-D view of the input (a row: the values one mean and variance cover) and
share one forward and one backward of that view; they differ only in how rows are cut and how the
scale and bias broadcast. Statistics are always of the batch at hand, in training and in eval alike.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from edgetrain.kernels import detfloat
from edgetrain.ops.base import Op, register, unbroadcast


class RowStats(NamedTuple):
    """A normalised (rows, cols) view: xhat = (x - mean) * inv, row by row."""

    xhat: np.ndarray
    mean: np.ndarray  # (rows, 1)
    inv: np.ndarray  # (rows, 1): 1 / sqrt(var + eps)


def compute_dtype(x: np.ndarray) -> np.dtype:
    """float64 stays float64; every narrower float is computed in float32 (ONNX's stash_type 1)."""
    return np.dtype(np.float64) if x.dtype == np.float64 else np.dtype(np.float32)


def normalise_rows(x2: np.ndarray, eps: float) -> RowStats:
    """Population mean and variance of each row: numpy's pairwise sums (no thread dependence), or
    detfloat's fixed-order ones when active (no SIMD-width dependence either)."""
    cols = x2.shape[1]
    mean = detfloat.op_sum(x2, 1, keepdims=True) / cols
    diff = x2 - mean
    var = detfloat.op_sum(diff * diff, 1, keepdims=True) / cols
    inv = 1 / np.sqrt(var + np.asarray(eps, dtype=x2.dtype))
    return RowStats(diff * inv, mean, inv)


def normalise_rows_backward(dxhat: np.ndarray, stats: RowStats) -> np.ndarray:
    """dL/dx of xhat = (x - mean) * inv: the mean and variance depend on every value of the row."""
    xhat, inv = stats.xhat, stats.inv
    m1 = detfloat.op_mean(dxhat, 1, keepdims=True)
    m2 = detfloat.op_mean(dxhat * xhat, 1, keepdims=True)
    return inv * (dxhat - m1 - xhat * m2)


def _eps(op: Op) -> float:
    return float(op.attr("epsilon", 1e-5))


@register("LayerNormalization")
class LayerNormalization(Op):
    """Normalise over axes [axis, rank); Scale and B broadcast to those axes (B optional).

    Outputs Y and, when asked for, Mean and InvStdDev (shape: the leading axes, ones after), which
    also carry gradients.
    """

    all_outputs_differentiable = True  # Mean or InvStdDev may carry the only gradient

    def forward(self, inputs, run):
        x, scale = inputs[0], inputs[1]
        bias = inputs[2] if len(inputs) > 2 else None
        axis = int(self.attr("axis", -1))
        if not -x.ndim <= axis < x.ndim:
            raise self.fail(f"axis {axis} is out of range for a rank-{x.ndim} input")
        axis %= x.ndim
        dt = compute_dtype(x)
        rows = int(np.prod(x.shape[:axis], dtype=np.int64))
        stats = normalise_rows(x.reshape(rows, -1).astype(dt, copy=False), _eps(self))
        xhat = stats.xhat.reshape(x.shape)
        y = xhat * scale.astype(dt, copy=False)
        if bias is not None:
            y = y + bias.astype(dt, copy=False)
        reduced = x.shape[:axis] + (1,) * (x.ndim - axis)
        outs = [y.astype(x.dtype, copy=False), stats.mean.reshape(reduced), stats.inv.reshape(reduced)]
        ctx = (stats, scale, None if bias is None else bias.shape, x.shape, x.dtype)
        return outs[: max(1, len(self.node.outputs))], ctx

    def backward(self, ctx, grads, needed):
        stats, scale, bias_shape, shape, dtype = ctx
        g = np.zeros(shape, stats.xhat.dtype) if grads[0] is None else grads[0].astype(stats.xhat.dtype, copy=False)
        xhat = stats.xhat.reshape(shape)
        dscale = unbroadcast(g * xhat, scale.shape).astype(scale.dtype, copy=False)
        out = [None, dscale]
        if bias_shape is not None:
            out.append(unbroadcast(g, bias_shape).astype(scale.dtype, copy=False))
        if needed[0]:
            rows = stats.xhat.shape[0]
            dx = normalise_rows_backward((g * scale).reshape(rows, -1), stats)
            cols = stats.xhat.shape[1]
            gmean = grads[1] if len(grads) > 1 else None
            ginv = grads[2] if len(grads) > 2 else None
            if gmean is not None:  # d mean / dx = 1 / cols
                dx = dx + gmean.reshape(rows, 1) / cols
            if ginv is not None:  # d inv / dx = -inv^2 * xhat / cols
                dx = dx - ginv.reshape(rows, 1) * stats.inv ** 2 * stats.xhat / cols
            out[0] = dx.reshape(shape).astype(dtype, copy=False)
        return out


class _ChannelNorm(Op):
    """Shared by Group- and InstanceNormalization: rows are (sample, group), affine is per channel."""

    def _groups(self, channels: int) -> int:
        raise NotImplementedError

    def _per_channel(self, v: np.ndarray, channels: int, groups: int) -> np.ndarray:
        return v.reshape(-1)

    def forward(self, inputs, run):
        x, scale, bias = inputs[0], inputs[1], inputs[2]
        if x.ndim < 2:
            raise self.fail(f"input must have a channel axis (rank >= 2), has rank {x.ndim}")
        n, c = x.shape[:2]
        groups = self._groups(c)
        if groups <= 0 or c % groups:
            raise self.fail(f"{c} channels cannot be split into {groups} groups")
        sc = self._per_channel(scale, c, groups)
        bc = self._per_channel(bias, c, groups)
        if sc.size != c or bc.size != c:
            raise self.fail(f"scale {scale.shape} and bias {bias.shape} do not fit {c} channels in {groups} groups")
        dt = compute_dtype(x)
        stats = normalise_rows(x.reshape(n * groups, -1).astype(dt, copy=False), _eps(self))
        bshape = (1, c) + (1,) * (x.ndim - 2)
        xhat = stats.xhat.reshape(x.shape)
        y = xhat * sc.astype(dt, copy=False).reshape(bshape) + bc.astype(dt, copy=False).reshape(bshape)
        return [y.astype(x.dtype, copy=False)], (stats, sc.astype(dt, copy=False), scale.shape, groups, x.shape,
                                                 x.dtype, scale.dtype)

    def _fold(self, v: np.ndarray, shape: tuple, groups: int) -> np.ndarray:
        """A per-channel gradient back to the parameter's own shape."""
        return v.reshape(shape)

    def backward(self, ctx, grads, needed):
        stats, sc, pshape, groups, shape, dtype, pdtype = ctx
        g = grads[0].astype(stats.xhat.dtype, copy=False)
        c = shape[1]
        xhat = stats.xhat.reshape(shape)
        axes = (0,) + tuple(range(2, len(shape)))
        dscale = self._fold(detfloat.op_sum(g * xhat, axes), pshape, groups).astype(pdtype, copy=False)
        dbias = self._fold(detfloat.op_sum(g, axes), pshape, groups).astype(pdtype, copy=False)
        dx = None
        if needed[0]:
            dxhat = g * sc.reshape((1, c) + (1,) * (len(shape) - 2))
            dx = normalise_rows_backward(dxhat.reshape(stats.xhat.shape), stats).reshape(shape).astype(dtype)
        return [dx, dscale, dbias]


@register("InstanceNormalization")
class InstanceNormalization(_ChannelNorm):
    """Each (sample, channel) normalised over its spatial axes; scale and B per channel."""

    def _groups(self, channels):
        return channels


@register("GroupNormalization")
class GroupNormalization(_ChannelNorm):
    """Each (sample, group of channels) normalised together.

    Scale and bias are per group at opset 18..20 (the definition ONNX later deprecated) and per channel
    from opset 21, as the spec of each version says.
    """

    def _groups(self, channels):
        groups = self.attr("num_groups")
        if groups is None:
            raise self.fail("num_groups attribute is required")
        return int(groups)

    def _per_channel(self, v, channels, groups):
        if self.opset < 21 and groups:
            if v.size != groups:
                raise self.fail(f"opset {self.opset}: scale and bias must have num_groups={groups} entries, "
                                f"have {v.size}")
            return np.repeat(v.reshape(-1), channels // groups)
        return v.reshape(-1)

    def _fold(self, v, shape, groups):
        if self.opset < 21:
            return detfloat.op_sum(v.reshape(groups, -1), 1).reshape(shape)
        return v.reshape(shape)
