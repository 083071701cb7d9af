"""Broadcasting arithmetic beyond Add/Sub/Mul/Div: Pow, Mod, variadic Max/Min/Sum/Mean, and Where.

Gradients reach float operands only, summed back to each operand's shape (unbroadcast). An operand that
is a constant (a Pow exponent, a Where branch of zeros) is not differentiated: `needed` says so.
"""
from __future__ import annotations

import numpy as np

from edgetrain.kernels import detfloat
from edgetrain.ops.base import Op, register, unbroadcast


def _floating(a: np.ndarray) -> bool:
    return np.issubdtype(a.dtype, np.floating)


@register("Pow")
class Pow(Op):
    """a ** b in a's type (ONNX's rule). Gradients as PyTorch's: d/da = b * a^(b-1), 0 where b == 0;
    d/db = a^b * log(a), 0 where a == 0 and b >= 0 (NaN for a < 0, where a^b is not real)."""

    def forward(self, inputs, run):
        a, b = inputs
        with np.errstate(all="ignore"):
            if _floating(a):
                y = detfloat.op_power(a, b.astype(a.dtype, copy=False))
            elif not _floating(b) and (b >= 0).all():
                y = np.power(a, b.astype(a.dtype, copy=False))
            else:
                # An integer base with a negative or fractional exponent: through float64, truncated back.
                y = np.power(a.astype(np.float64), b.astype(np.float64)).astype(a.dtype)
        return [y], (a, b, y)

    def backward(self, ctx, grads, needed):
        a, b, y = ctx
        (g,) = grads
        da = db = None
        with np.errstate(all="ignore"):
            if needed[0] and _floating(a):
                e = b.astype(a.dtype, copy=False)
                da = unbroadcast(np.where(e == 0, 0, g * (e * detfloat.op_power(a, e - 1))), a.shape).astype(a.dtype)
            if len(needed) > 1 and needed[1] and _floating(b) and _floating(a):
                term = np.where((a == 0) & (b >= 0), 0, y * detfloat.op_log(a)).astype(b.dtype, copy=False)
                db = unbroadcast(g.astype(b.dtype, copy=False) * term, b.shape)
        return [da, db]


@register("Mod")
class Mod(Op):
    """fmod=1: C's fmod (the result takes the dividend's sign); fmod=0: the floored remainder (the divisor's
    sign, Python's %). ONNX asks fmod=1 of floats; a float node with fmod=0 gets the floored remainder,
    PyTorch's remainder. Gradients: 1 for the dividend, -trunc(a/b) (fmod) or -floor(a/b) for the divisor."""

    def forward(self, inputs, run):
        a, b = inputs
        fmod = bool(self.attr("fmod", 0))
        with np.errstate(all="ignore"):
            y = (np.fmod if fmod else np.mod)(a, b)
        return [y.astype(a.dtype, copy=False)], (a, b, fmod)

    def backward(self, ctx, grads, needed):
        a, b, fmod = ctx
        (g,) = grads
        if not _floating(a):
            return [None, None]
        db = None
        if needed[1]:
            with np.errstate(all="ignore"):
                q = (np.trunc if fmod else np.floor)(a / b)
            db = unbroadcast(-g * q, b.shape)
        return [unbroadcast(g, a.shape), db]


class Extreme(Op):
    """Variadic elementwise max/min with broadcasting. The gradient goes to the inputs equal to the result,
    split equally among ties (PyTorch's maximum/minimum give each of two tied inputs half)."""

    ufunc: np.ufunc

    def forward(self, inputs, run):
        y = inputs[0]
        for t in inputs[1:]:
            y = self.ufunc(y, t)
        return [np.asarray(y)], ([t.shape for t in inputs], list(inputs), y)

    def backward(self, ctx, grads, needed):
        shapes, inputs, y = ctx
        if not _floating(y):
            return [None] * len(shapes)
        (g,) = grads
        hits = [np.broadcast_to(t == y, y.shape) for t in inputs]
        count = np.maximum(sum(h.astype(np.int64) for h in hits), 1).astype(y.dtype)
        share = g / count
        return [unbroadcast(np.where(h, share, 0), s) if need else None
                for h, s, need in zip(hits, shapes, needed)]


@register("Max")
class Max(Extreme):
    ufunc = np.maximum


@register("Min")
class Min(Extreme):
    ufunc = np.minimum


@register("Sum")
class Sum(Op):
    """Variadic broadcasting sum, added left to right."""

    def forward(self, inputs, run):
        y = inputs[0]
        for t in inputs[1:]:
            y = y + t
        return [np.asarray(y)], [t.shape for t in inputs]

    def backward(self, ctx, grads, needed):
        return [unbroadcast(grads[0], s) for s in ctx]


@register("Mean")
class Mean(Op):
    """Variadic broadcasting mean: the left-to-right sum divided by the count."""

    def forward(self, inputs, run):
        y = inputs[0]
        for t in inputs[1:]:
            y = y + t
        return [(y / np.asarray(len(inputs), dtype=y.dtype)).astype(y.dtype, copy=False)], [t.shape for t in inputs]

    def backward(self, ctx, grads, needed):
        g = grads[0] / np.asarray(len(ctx), dtype=grads[0].dtype)
        return [unbroadcast(g, s) for s in ctx]


@register("Where")
class Where(Op):
    """cond ? x : y with broadcasting; each branch's gradient is the output's where it was chosen."""

    def forward(self, inputs, run):
        cond, x, y = inputs
        cond = cond.astype(bool, copy=False)
        return [np.where(cond, x, y)], (cond, x.shape, y.shape, _floating(x))

    def backward(self, ctx, grads, needed):
        cond, xs, ys, floating = ctx
        if not floating:
            return [None, None, None]
        (g,) = grads
        zero = np.zeros((), dtype=g.dtype)
        dx = unbroadcast(np.where(cond, g, zero), xs) if needed[1] else None
        dy = unbroadcast(np.where(cond, zero, g), ys) if needed[2] else None
        return [None, dx, dy]
