"""Gemm and MatMul: the fully-connected MAC ops."""
from __future__ import annotations

import numpy as np

from edgetrain.ops.base import Op, register, unbroadcast


@register("Gemm")
class Gemm(Op):
    """Y = alpha * A' B' + beta * C, with A' = A^T if transA and B' = B^T if transB."""

    def forward(self, inputs, run):
        a, b = inputs[0], inputs[1]
        c = inputs[2] if len(inputs) > 2 else None
        alpha = self.attr("alpha", 1.0)
        beta = self.attr("beta", 1.0)
        at = a.T if self.attr("transA", 0) else a
        bt = b.T if self.attr("transB", 0) else b
        y = at @ bt
        if alpha != 1.0:
            y = y * np.asarray(alpha, dtype=y.dtype)
        if c is not None:
            y = y + (c * np.asarray(beta, dtype=c.dtype) if beta != 1.0 else c)
        return [y.astype(a.dtype, copy=False)], (at, bt, None if c is None else c.shape, alpha, beta)

    def backward(self, ctx, grads, needed):
        at, bt, c_shape, alpha, beta = ctx
        g = grads[0] * np.asarray(alpha, dtype=grads[0].dtype) if alpha != 1.0 else grads[0]
        dat = g @ bt.T
        dbt = at.T @ g
        da = dat.T if self.attr("transA", 0) else dat
        db = dbt.T if self.attr("transB", 0) else dbt
        out = [da, db]
        if c_shape is not None:
            gc = grads[0] * np.asarray(beta, dtype=grads[0].dtype) if beta != 1.0 else grads[0]
            out.append(unbroadcast(gc, c_shape))
        return out

    def macs(self, in_shapes, out_shapes):
        a = in_shapes[0]
        k = a[0] if self.attr("transA", 0) else a[1]
        return int(np.prod(out_shapes[0][1:])) * int(k)  # per sample: out features x reduction


@register("MatMul")
class MatMul(Op):
    """numpy.matmul semantics: 1-D operands are promoted, batch dimensions broadcast."""

    def forward(self, inputs, run):
        a, b = inputs
        return [np.matmul(a, b)], (a, b)

    def backward(self, ctx, grads, needed):
        a, b = ctx
        a2 = a[None, :] if a.ndim == 1 else a
        b2 = b[:, None] if b.ndim == 1 else b
        g = grads[0].reshape(np.matmul(a2, b2).shape)
        da = np.matmul(g, np.swapaxes(b2, -1, -2))
        db = np.matmul(np.swapaxes(a2, -1, -2), g)
        return [unbroadcast(da, a2.shape).reshape(a.shape), unbroadcast(db, b2.shape).reshape(b.shape)]

    def macs(self, in_shapes, out_shapes):
        a = in_shapes[0]
        return int(np.prod(out_shapes[0][1:])) * int(a[-1])
