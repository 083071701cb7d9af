"""Reductions over axes (Reduce*), ArgMax/ArgMin, and CumSum (the running sum along one axis).

Axes come from the `axes` attribute (ReduceSum before opset 13, the others before 18) or from the optional
second input (later opsets); whichever the node carries is used. No axes reduces over every axis, unless
noop_with_empty_axes is set: then the reduction runs over no axis at all (ReduceSumSquare gives x*x,
ReduceMax gives x), as ONNX's reference does. Results are computed with keepdims and reshaped, so every
backward broadcasts a keepdims-shaped gradient back over the reduced axes.
"""
from __future__ import annotations

import numpy as np

from edgetrain.kernels import detfloat
from edgetrain.ops.base import Op, register


def _spread(g: np.ndarray, shape: tuple) -> np.ndarray:
    """A keepdims gradient repeated over the reduced axes, as a writable array."""
    return np.array(np.broadcast_to(g, shape))


class Reduce(Op):
    """The shared axes handling and output shaping; subclasses give the reduction and its derivative."""

    def reduce_axes(self, inputs: list, ndim: int) -> tuple[int, ...]:
        """The axes to reduce, normalised and sorted; () for noop_with_empty_axes with no axes."""
        if len(inputs) > 1 and inputs[1] is not None:
            axes = [int(a) for a in np.asarray(inputs[1]).reshape(-1)]
        else:
            axes = list(self.attr("axes", None) or [])
        if not axes:
            return () if self.attr("noop_with_empty_axes", 0) else tuple(range(ndim))
        bad = [a for a in axes if not -ndim <= a < ndim]
        if bad:
            raise self.fail(f"axes {bad} out of range for a {ndim}-d input")
        norm = sorted(a % ndim for a in axes)
        if len(set(norm)) != len(norm):
            raise self.fail(f"axes {axes} repeat an axis")
        return tuple(norm)

    def forward(self, inputs, run):
        x = inputs[0]
        axes = self.reduce_axes(inputs, x.ndim)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            y = np.asarray(self.reduce(x, axes))
        y = y.astype(x.dtype, copy=False)
        out = y if self.attr("keepdims", 1) else y.reshape([d for i, d in enumerate(x.shape) if i not in axes])
        return [out], (x, y, axes)

    def backward(self, ctx, grads, needed):
        x, y, axes = ctx
        if not np.issubdtype(x.dtype, np.floating):
            return [None, None]
        g = grads[0].reshape(y.shape)
        with np.errstate(divide="ignore", invalid="ignore"):
            dx = self.derivative(x, y, g, axes)
        return [dx.astype(x.dtype, copy=False), None]

    def reduce(self, x: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
        """The reduction with keepdims."""
        raise NotImplementedError

    def derivative(self, x: np.ndarray, y: np.ndarray, g: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
        """dL/dx from the keepdims output y and its gradient g."""
        raise NotImplementedError


def _count(shape: tuple, axes: tuple[int, ...]) -> int:
    return int(np.prod([shape[a] for a in axes], dtype=np.int64))


@register("ReduceSum")
class ReduceSum(Reduce):
    def reduce(self, x, axes):
        return detfloat.op_sum(x, axes, keepdims=True).astype(x.dtype, copy=False)

    def derivative(self, x, y, g, axes):
        return _spread(g, x.shape)


@register("ReduceMean")
class ReduceMean(Reduce):
    def reduce(self, x, axes):
        return detfloat.op_mean(x, axes, keepdims=True)

    def derivative(self, x, y, g, axes):
        return _spread(g / np.asarray(_count(x.shape, axes), dtype=x.dtype), x.shape)


@register("ReduceSumSquare")
class ReduceSumSquare(Reduce):
    def reduce(self, x, axes):
        return detfloat.op_sum(x * x, axes, keepdims=True).astype(x.dtype, copy=False)

    def derivative(self, x, y, g, axes):
        return 2 * x * g


@register("ReduceL1")
class ReduceL1(Reduce):
    def reduce(self, x, axes):
        return np.abs(x).sum(axis=axes, keepdims=True, dtype=x.dtype)

    def derivative(self, x, y, g, axes):
        return np.sign(x) * g


@register("ReduceL2")
class ReduceL2(Reduce):
    """sqrt(sum x^2); where the norm is 0 the gradient is 0, as PyTorch's norm gives."""

    def reduce(self, x, axes):
        return np.sqrt((x * x).sum(axis=axes, keepdims=True))

    def derivative(self, x, y, g, axes):
        return np.where(y == 0, 0, x * (g / np.where(y == 0, 1, y)))


@register("ReduceLogSum")
class ReduceLogSum(Reduce):
    def reduce(self, x, axes):
        return detfloat.op_log(detfloat.op_sum(x, axes, keepdims=True))

    def derivative(self, x, y, g, axes):
        return _spread(g / detfloat.op_exp(y), x.shape)


@register("ReduceLogSumExp")
class ReduceLogSumExp(Reduce):
    """max + log(sum(exp(x - max))): no overflow; an all -inf (or empty) slice gives -inf."""

    def reduce(self, x, axes):
        if not np.issubdtype(x.dtype, np.floating):
            x = x.astype(np.float64)
        m = np.max(x, axis=axes, keepdims=True, initial=-np.inf)
        shift = np.where(np.isfinite(m), m, 0)
        return detfloat.op_log(detfloat.op_sum(detfloat.op_exp(x - shift), axes, keepdims=True)) + shift

    def derivative(self, x, y, g, axes):
        return g * detfloat.op_exp(x - y)


@register("ReduceProd")
class ReduceProd(Reduce):
    """Backward is the product of the other elements (prefix times suffix products): exact with zeros."""

    def reduce(self, x, axes):
        return x.prod(axis=axes, keepdims=True, dtype=x.dtype)

    def derivative(self, x, y, g, axes):
        kept = [a for a in range(x.ndim) if a not in axes]
        perm = kept + list(axes)
        moved = x.transpose(perm)
        flat = moved.reshape(int(np.prod(moved.shape[:len(kept)], dtype=np.int64)), -1)
        ones = np.ones((flat.shape[0], 1), dtype=x.dtype)
        before = np.cumprod(np.concatenate([ones, flat[:, :-1]], axis=1), axis=1)
        after = np.cumprod(np.concatenate([ones, flat[:, :0:-1]], axis=1), axis=1)[:, ::-1]
        others = (before * after).reshape(moved.shape).transpose(np.argsort(perm))
        return others * g


class ReduceExtreme(Reduce):
    """Max/Min: the gradient goes to the elements equal to the extreme, split equally among ties (as
    PyTorch's amax/amin). An empty slice gives the identity of the reduction (-inf for max)."""

    ufunc: np.ufunc

    def reduce(self, x, axes):
        if x.dtype == np.bool_:
            start = self.ufunc is np.minimum
        elif np.issubdtype(x.dtype, np.integer):
            info = np.iinfo(x.dtype)
            start = info.min if self.ufunc is np.maximum else info.max
        else:
            start = -np.inf if self.ufunc is np.maximum else np.inf
        return self.ufunc.reduce(x, axis=axes, keepdims=True, initial=start)

    def derivative(self, x, y, g, axes):
        hit = x == y
        count = hit.sum(axis=axes, keepdims=True)
        return np.where(hit, g / np.maximum(count, 1).astype(x.dtype), 0)


@register("ReduceMax")
class ReduceMax(ReduceExtreme):
    ufunc = np.maximum


@register("ReduceMin")
class ReduceMin(ReduceExtreme):
    ufunc = np.minimum


class ArgExtreme(Op):
    """Index of the first (or, with select_last_index, last) extreme along `axis`; int64, no gradient."""

    pick = staticmethod(np.argmax)

    def forward(self, inputs, run):
        (x,) = inputs
        axis = self.attr("axis", 0)
        if not -x.ndim <= axis < max(x.ndim, 1):
            raise self.fail(f"axis {axis} out of range for a {x.ndim}-d input")
        axis %= max(x.ndim, 1)
        if self.attr("select_last_index", 0):
            idx = x.shape[axis] - 1 - self.pick(np.flip(x, axis), axis=axis)
        else:
            idx = self.pick(x, axis=axis)
        idx = np.asarray(idx, dtype=np.int64)
        return [np.expand_dims(idx, axis) if self.attr("keepdims", 1) else idx], None

    def backward(self, ctx, grads, needed):
        return [None]


@register("ArgMax")
class ArgMax(ArgExtreme):
    pick = staticmethod(np.argmax)


@register("ArgMin")
class ArgMin(ArgExtreme):
    pick = staticmethod(np.argmin)


def _cumsum(x: np.ndarray, axis: int, exclusive: bool, reverse: bool) -> np.ndarray:
    if reverse:
        x = np.flip(x, axis)
    y = np.cumsum(x, axis=axis, dtype=x.dtype)
    if exclusive:
        # Each position sums what comes strictly before it: shift by one, 0 first.
        y = np.concatenate([np.zeros_like(np.take(y, [0], axis=axis)), np.delete(y, -1, axis=axis)], axis=axis)
    return np.flip(y, axis) if reverse else y


@register("CumSum")
class CumSum(Op):
    """Running sum along the axis given as the second input (exclusive, reverse as attributes). Its gradient
    is the running sum of the gradient the other way round."""

    def forward(self, inputs, run):
        x, axis = inputs
        axis = int(np.asarray(axis).reshape(-1)[0])
        if not -x.ndim <= axis < x.ndim:
            raise self.fail(f"axis {axis} out of range for a {x.ndim}-d input")
        axis %= x.ndim
        exclusive, reverse = bool(self.attr("exclusive", 0)), bool(self.attr("reverse", 0))
        return [np.ascontiguousarray(_cumsum(x, axis, exclusive, reverse))], (axis, exclusive, reverse)

    def backward(self, ctx, grads, needed):
        axis, exclusive, reverse = ctx
        return [np.ascontiguousarray(_cumsum(grads[0], axis, exclusive, not reverse)), None]
