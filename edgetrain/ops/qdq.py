"""Quantised ONNX ops: QuantizeLinear, DequantizeLinear, DynamicQuantizeLinear, MatMulInteger, ConvInteger,
QLinearMatMul, QLinearConv.

Eval computes what onnxruntime computes: x / scale in float32, round half to even, add the zero point,
saturate; the QLinear ops accumulate in integers and requantise with a float32 multiplier
(x_scale * w_scale / y_scale), as onnxruntime's MLAS does.

Training: a QuantizeLinear -> DequantizeLinear pair is fake quantisation with a clipped straight-through
gradient: QuantizeLinear passes dL/dy / scale where x did not saturate (0 where it did), DequantizeLinear
passes dL/dy * scale, so the pair passes dL/dy unchanged inside the representable range. Scales and zero
points take no gradient. The integer MAC ops (MatMulInteger, ConvInteger, QLinear*) have no gradient.
"""
from __future__ import annotations

import numpy as np
from onnx import helper

from edgetrain.ops.base import Op, register
from edgetrain.ops.conv import Conv

INT_RANGES = {np.dtype(t): (np.iinfo(t).min, np.iinfo(t).max)
              for t in (np.int8, np.uint8, np.int16, np.uint16, np.int32)}


def _axis_shape(param: np.ndarray, ndim: int, axis: int) -> np.ndarray:
    """A per-axis scale or zero point reshaped to broadcast along `axis` of an ndim tensor."""
    if param.ndim == 0 or param.size == 1 and ndim == 0:
        return param.reshape(())
    if param.ndim == 1:
        shape = [1] * ndim
        shape[axis % ndim] = param.shape[0]
        return param.reshape(shape)
    return param  # blocked quantisation: same rank as x


def _along(param: np.ndarray, x: np.ndarray, axis: int, block: int) -> np.ndarray:
    """A scale or zero point (per tensor, per axis or blocked) shaped to broadcast against x."""
    size = x.shape[axis % x.ndim] if x.ndim else None
    return _axis_shape(_expand_blocks(param, x.ndim, axis, block, size), x.ndim, axis)


def _expand_blocks(param: np.ndarray, ndim: int, axis: int, block: int, size: int | None = None) -> np.ndarray:
    """A blocked scale or zero point (one value per `block` elements along axis) repeated to x's length."""
    if block and param.ndim == ndim and param.ndim > 0:
        full = np.repeat(param, block, axis=axis % ndim)
        return full if size is None else np.take(full, np.arange(size), axis=axis % ndim)
    return param


def quantize_values(x: np.ndarray, scale: np.ndarray, zero: np.ndarray | int, dtype: np.dtype,
                    saturate_only: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """onnxruntime's quantisation (float32 x / scale, half to even, + zero point, saturate), and the mask
    of values inside the range (the straight-through gradient's)."""
    lo, hi = INT_RANGES[np.dtype(dtype)]
    v = np.rint(np.asarray(x, np.float32) / np.asarray(scale, np.float32)) + np.asarray(zero, np.float32)
    inside = (v >= lo) & (v <= hi)
    return np.clip(v, lo, hi).astype(dtype), inside


def _out_dtype(op: Op, zero: np.ndarray | None) -> np.dtype:
    if zero is not None:
        return zero.dtype
    code = op.attr("output_dtype", 0)
    if code:
        return np.dtype(helper.tensor_dtype_to_np_dtype(code))
    return np.dtype(np.uint8)


@register("QuantizeLinear")
class QuantizeLinear(Op):
    def forward(self, inputs, run):
        x, scale = inputs[0], inputs[1]
        zero = inputs[2] if len(inputs) > 2 and inputs[2] is not None else None
        dtype = _out_dtype(self, zero)
        if dtype not in INT_RANGES:
            raise self.fail(f"output type {dtype} is not an integer type edgetrain quantises to")
        axis, block = int(self.attr("axis", 1)), int(self.attr("block_size", 0))
        s = _along(scale, x, axis, block)
        z = _along(zero, x, axis, block) if zero is not None else 0
        y, inside = quantize_values(x, s, z, dtype)
        return [y], (inside, s, x.dtype)

    def backward(self, ctx, grads, needed):
        inside, s, dtype = ctx
        g = np.where(inside, grads[0] / s, 0).astype(dtype, copy=False)
        return [g, None, None]


@register("DequantizeLinear")
class DequantizeLinear(Op):
    def forward(self, inputs, run):
        x, scale = inputs[0], inputs[1]
        zero = inputs[2] if len(inputs) > 2 and inputs[2] is not None else None
        axis, block = int(self.attr("axis", 1)), int(self.attr("block_size", 0))
        s = _along(scale, x, axis, block)
        v = x.astype(np.int64)
        if zero is not None:
            v = v - _along(zero, x, axis, block).astype(np.int64)
        # onnxruntime computes in the scale's type: float32 (x - zero) * scale
        y = (v.astype(scale.dtype) * s).astype(scale.dtype, copy=False)
        return [y], s

    def backward(self, ctx, grads, needed):
        return [grads[0] * ctx, None, None]


@register("DynamicQuantizeLinear")
class DynamicQuantizeLinear(Op):
    """uint8 with the range widened to include 0, as ONNX defines it."""

    def forward(self, inputs, run):
        x = np.asarray(inputs[0], np.float32)
        lo = min(float(x.min()), 0.0) if x.size else 0.0
        hi = max(float(x.max()), 0.0) if x.size else 0.0
        scale = np.float32((np.float32(hi) - np.float32(lo)) / np.float32(255))
        if scale == 0:
            scale = np.float32(1)  # all zeros: any scale reproduces them
        zero = np.clip(np.rint(np.float32(0) - np.float32(lo) / scale), 0, 255).astype(np.uint8)
        y, _ = quantize_values(x, scale, zero, np.uint8)
        return [y, np.asarray(scale, np.float32), np.asarray(zero, np.uint8)], None


def _centered(x: np.ndarray, zero: np.ndarray | None, ndim_axis: int | None = None) -> np.ndarray:
    """x - zero point in float64: exact for every integer sum an int8/uint8 MAC can reach (< 2**53)."""
    v = x.astype(np.float64)
    if zero is None:
        return v
    z = zero.astype(np.float64)
    if ndim_axis is not None and z.ndim == 1 and z.size > 1:
        shape = [1] * x.ndim
        shape[ndim_axis] = z.size
        z = z.reshape(shape)
    return v - z


def _requantize(acc: np.ndarray, multiplier: np.ndarray, zero: np.ndarray | None, dtype: np.dtype) -> np.ndarray:
    """MLAS's requantisation: float32(acc) * float32 multiplier, half to even, + zero point, saturate."""
    lo, hi = INT_RANGES[np.dtype(dtype)]
    v = np.rint(acc.astype(np.float32) * multiplier.astype(np.float32))
    if zero is not None:
        v = v + zero.astype(np.float32)
    return np.clip(v, lo, hi).astype(dtype)


def _multiplier(a_scale: np.ndarray, b_scale: np.ndarray, y_scale: np.ndarray) -> np.ndarray:
    # onnxruntime forms it in float32, product first, then the division
    return (np.asarray(a_scale, np.float32) * np.asarray(b_scale, np.float32)) / np.asarray(y_scale, np.float32)


@register("MatMulInteger")
class MatMulInteger(Op):
    def forward(self, inputs, run):
        a, b = inputs[0], inputs[1]
        az = inputs[2] if len(inputs) > 2 else None
        bz = inputs[3] if len(inputs) > 3 else None
        a_c = _centered(a, az.reshape(-1, 1) if az is not None and az.ndim == 1 and az.size > 1 and a.ndim >= 2
                        else az)
        y = np.matmul(a_c, _centered(b, bz))
        return [y.astype(np.int32)], None


@register("QLinearMatMul")
class QLinearMatMul(Op):
    def forward(self, inputs, run):
        a, a_s, a_z, b, b_s, b_z, y_s, y_z = inputs
        acc = np.matmul(_centered(a, a_z), _centered(b, b_z))
        m = _multiplier(a_s, b_s, y_s)
        return [_requantize(acc, m, y_z, y_z.dtype if y_z is not None else np.dtype(np.uint8))], None


class _IntegerConv(Op):
    """The integer convolution both ConvInteger and QLinearConv run: Conv's im2col in exact float64."""

    def __init__(self, node, opset):
        super().__init__(node, opset)
        self.conv = Conv(node, opset)

    def accumulate(self, x, xz, w, wz, bias=None) -> np.ndarray:
        xc = _centered(x, xz)
        wc = _centered(w, wz, ndim_axis=0)
        (acc,), _ = self.conv.forward([xc, wc] + ([bias.astype(np.float64)] if bias is not None else []),
                                      None)
        return acc


@register("ConvInteger")
class ConvInteger(_IntegerConv):
    def forward(self, inputs, run):
        x, w = inputs[0], inputs[1]
        xz = inputs[2] if len(inputs) > 2 else None
        wz = inputs[3] if len(inputs) > 3 else None
        return [self.accumulate(x, xz, w, wz).astype(np.int32)], None

    def macs(self, in_shapes, out_shapes):
        return self.conv.macs([in_shapes[0], in_shapes[1]], out_shapes)


@register("QLinearConv")
class QLinearConv(_IntegerConv):
    def forward(self, inputs, run):
        x, x_s, x_z, w, w_s, w_z, y_s, y_z = inputs[:8]
        bias = inputs[8] if len(inputs) > 8 else None
        acc = self.accumulate(x, x_z, w, w_z, bias)
        m = _multiplier(x_s, w_s, y_s)
        if m.ndim == 1 and m.size > 1:  # per output channel
            m = m.reshape((1, -1) + (1,) * (acc.ndim - 2))
        return [_requantize(acc, m, y_z, y_z.dtype if y_z is not None else np.dtype(np.uint8))], None

    def macs(self, in_shapes, out_shapes):
        return self.conv.macs([in_shapes[0], in_shapes[3]], out_shapes)


@register("QGemm")
class QGemm(Op):
    """onnxruntime's com.microsoft.QGemm (its QOperator quantiser writes Gemm as it): integer A'B' + int32 C,
    then requantised with alpha * a_scale * b_scale / y_scale, or scaled to float32 without y_scale."""

    def forward(self, inputs, run):
        inputs = list(inputs) + [None] * (9 - len(inputs))
        a, a_s, a_z, b, b_s, b_z, c, y_s, y_z = inputs[:9]
        a_c = _centered(a, a_z)
        b_c = _centered(b, b_z, ndim_axis=0 if self.attr("transB", 0) else 1)
        at = a_c.T if self.attr("transA", 0) else a_c
        bt = b_c.T if self.attr("transB", 0) else b_c
        acc = at @ bt
        if c is not None:
            acc = acc + c.astype(np.float64)
        m = np.float32(self.attr("alpha", 1.0)) * np.asarray(a_s, np.float32) * np.asarray(b_s, np.float32)
        if y_s is None:
            return [(acc.astype(np.float32) * m).astype(np.float32)], None
        m = m / np.asarray(y_s, np.float32)
        return [_requantize(acc, m, y_z, y_z.dtype if y_z is not None else np.dtype(np.uint8))], None

    def macs(self, in_shapes, out_shapes):
        a = in_shapes[0]
        return int(np.prod(out_shapes[0][1:])) * int(a[0] if self.attr("transA", 0) else a[1])
