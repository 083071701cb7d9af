"""Gemm and MatMul: the fully-connected MAC ops."""
from __future__ import annotations

import numpy as np

from edgetrain.kernels import detfloat
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
        if detfloat.active() and alpha == 1.0 and beta == 1.0:
            y = detfloat.linear_forward(at, bt, c)
            return [y.astype(a.dtype, copy=False)], (at, bt, None if c is None else c.shape, alpha, beta)
        y = detfloat.gemm(at, bt) if detfloat.active() else at @ bt
        if alpha != 1.0:
            y = y * np.asarray(alpha, dtype=y.dtype)
        if c is not None:
            y = y + (c * np.asarray(beta, dtype=c.dtype) if beta != 1.0 else c)
        return [y.astype(a.dtype, copy=False)], (at, bt, None if c is None else c.shape, alpha, beta)

    def backward(self, ctx, grads, needed):
        at, bt, c_shape, alpha, beta = ctx
        g = grads[0] * np.asarray(alpha, dtype=grads[0].dtype) if alpha != 1.0 else grads[0]
        if detfloat.active() and alpha == 1.0 and beta == 1.0 and c_shape in (None, bt.shape[1:]):
            dat, dbt, dc = detfloat.linear_backward(g, at, bt, c_shape is not None)
            out = [dat.T if self.attr("transA", 0) else dat, dbt.T if self.attr("transB", 0) else dbt]
            return out if dc is None else out + [dc]
        if detfloat.active():
            dat, dbt = detfloat.gemm(g, bt.T), detfloat.gemm(at.T, g)
        else:
            dat, dbt = g @ bt.T, at.T @ g
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
        return [matmul(a, b)], (a, b)

    def backward(self, ctx, grads, needed):
        a, b = ctx
        a2 = a[None, :] if a.ndim == 1 else a
        b2 = b[:, None] if b.ndim == 1 else b
        shape = np.broadcast_shapes(a2.shape[:-2], b2.shape[:-2]) + (a2.shape[-2], b2.shape[-1])
        g = grads[0].reshape(shape)
        da = db = None
        if needed[0]:
            da = unbroadcast(matmul(g, np.swapaxes(b2, -1, -2)), a2.shape).reshape(a.shape)
        if needed[1]:
            if b2.ndim == 2:  # a weight shared by every row: one product over all of them
                db = matmul(a2.reshape(-1, a2.shape[-1]).T, g.reshape(-1, g.shape[-1]))
            else:
                db = unbroadcast(matmul(np.swapaxes(a2, -1, -2), g), b2.shape)
            db = db.reshape(b.shape)
        return [da, db]

    def macs(self, in_shapes, out_shapes):
        a = in_shapes[0]
        return int(np.prod(out_shapes[0][1:])) * int(a[-1])


def matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """np.matmul, with stacks against one shared matrix folded into one 2-D product.

    numpy hands a stack of matrices to BLAS only when both operands are stacks; [N, T, C] @ [C, D] runs
    its own loop instead, 100x slower at transformer sizes (1 s against 8 ms for 64x49x64 @ 64x192).
    In deterministic float mode (kernels.detfloat) the fixed-order product instead, BLAS never.
    """
    if detfloat.active():
        return detfloat.matmul(a, b)
    if a.ndim > 2 and b.ndim == 2:
        return (np.ascontiguousarray(a).reshape(-1, a.shape[-1]) @ b).reshape(a.shape[:-1] + (b.shape[-1],))
    if a.ndim > 2 and b.ndim > 2 and a.shape[:-2] != b.shape[:-2]:
        batch = np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
        a = np.ascontiguousarray(np.broadcast_to(a, batch + a.shape[-2:]))
        b = np.ascontiguousarray(np.broadcast_to(b, batch + b.shape[-2:]))
    elif a.ndim == 2 and b.ndim > 2:
        a = np.ascontiguousarray(np.broadcast_to(a, b.shape[:-2] + a.shape))
    return np.matmul(a, b)
