"""Conv, Gemm and MatMul on integer kernels: the MAC work of training in fixed point.

Each op quantises its operands, hands the integer tensors to `edgetrain.kernels` (exact integer
results), and rescales the integer result into the float domain where BatchNorm, ReLU and the rest
run (docs/NUMERICS.md). Per layer and step:

    forward          y  = (x_q * w_q) * s_x * s_w[c]      x: nearest, per tensor; w: nearest, per output channel
    weight gradient  dW = (dy_q * x_q) * s_dy * s_x       dy: stochastic, per tensor, once per layer and step
    error backprop   dx = (dy_q * v_q) * s_dy * s_v       v: the weights again, nearest, per tensor

The error back-propagation sums over output channels, along which per-channel weight scales vary, so
it takes the weights quantised per tensor (a small tensor: re-quantising it costs next to nothing),
and the one quantised gradient feeds both products, as in FracTrain. The float master weights receive
dW directly (straight-through estimator over the weight quantiser).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from edgetrain import kernels
from edgetrain.graph import Node
from edgetrain.kernels.rescale import rescale_planes
from edgetrain.ops.base import Op, unbroadcast
from edgetrain.ops.norm_kernels import rescale_flat
from edgetrain.ops.windows import geometry
from edgetrain.precision.spec import LayerPrecision
from edgetrain.quant import RunningRange, quantize

STREAMS_PER_LAYER = 1  # random-bit streams a layer draws per step: its output gradient's rounding


@dataclass
class QuantRuntime:
    """What the quantised ops of one model share: run key, eval ranges, counters."""

    seed: int = 0
    step: int = 0
    pow2_scales: bool = False
    range_momentum: float = 0.1  # weight of a new batch in the running activation range eval uses
    act_ranges: dict[str, RunningRange] = field(default_factory=dict)
    saturated: dict[str, int] = field(default_factory=dict)  # elements clipped, per layer

    def count(self, layer: str, n: int) -> None:
        """Add clipped elements to a layer's counter (never silent)."""
        if n:
            self.saturated[layer] = self.saturated.get(layer, 0) + int(n)


class QuantMAC(Op):
    """Shared machinery of the integer Conv and Gemm/MatMul: operand quantisation and rescaling."""

    def __init__(self, float_op: Op, precision: LayerPrecision, layer_index: int, unsigned_input: bool,
                 runtime: QuantRuntime):
        super().__init__(float_op.node, float_op.opset)
        self.float_op = float_op
        self.precision = precision
        self.layer_index = layer_index
        self.unsigned_input = unsigned_input
        self.runtime = runtime
        self.skip_input_grad = False  # set by the executor when nobody needs dL/dx
        # Names this layer's running activation range and clip counter; DFQ gives each candidate its own.
        self.range_key = float_op.node.name

    def _key(self) -> tuple[int, int, int]:
        rt = self.runtime
        return (rt.seed, rt.step, self.layer_index * STREAMS_PER_LAYER)

    def _quantize_input(self, x: np.ndarray, training: bool):
        """Activations: per-tensor range from the batch in training, the running range in eval."""
        rt = self.runtime
        running = rt.act_ranges.setdefault(self.range_key, RunningRange(rt.range_momentum))
        # Eval quantises with the range seen in training, so one odd batch cannot rescale the layer;
        # before any training step there is no such range and the batch's own is used.
        fixed = running.value if not training and running.value else None
        q = quantize(x, self.precision.act_bits, signed=not self.unsigned_input, range=fixed, pow2=rt.pow2_scales)
        if training:
            running.update(q.stats.observed_max)
        rt.count(self.range_key, q.stats.saturated)
        return q

    def _quantize_weight(self, w_rows: np.ndarray, per_channel: bool = True):
        """Weights: nearest, from the float master copy each step; per output channel (rows) for the
        forward, per tensor for the error back-propagation."""
        return quantize(w_rows, self.precision.weight_bits, signed=True, axis=0 if per_channel else None,
                        pow2=self.runtime.pow2_scales)

    def _quantize_grad(self, g: np.ndarray):
        return quantize(g, self.precision.grad_bits, signed=True, rounding="stochastic", key=self._key(),
                        pow2=self.runtime.pow2_scales)

    def macs(self, in_shapes, out_shapes):
        return self.float_op.macs(in_shapes, out_shapes)


class QuantConv(QuantMAC):
    """2-D Conv (groups, depthwise, strides, pads, dilations) on integer kernels."""

    def _conv_args(self, x_shape, w_shape):
        geo = geometry(self.node.name, self.attrs, tuple(x_shape[2:]), tuple(self.attr("kernel_shape", w_shape[2:])))
        pads = (geo.pads_begin[0], geo.pads_begin[1], geo.pads_end[0], geo.pads_end[1])
        return dict(stride=geo.strides, pads=pads, dilation=geo.dilations, groups=int(self.attr("group", 1)))

    def forward(self, inputs, training):
        x, w = inputs[0], inputs[1]
        b = inputs[2] if len(inputs) > 2 else None
        args = self._conv_args(x.shape, w.shape)
        xq = self._quantize_input(x, training)
        wq = self._quantize_weight(w)
        scale = (np.float32(xq.scale) * wq.scale.astype(np.float32)).astype(x.dtype)
        bounds = (_bound(xq), _bound(wq))
        if getattr(kernels, "RESCALES", False):  # the kernel rescales each chunk while it is in cache
            y = kernels.conv2d_forward(xq.q, wq.q, **args, bounds=bounds, rescale=(scale, x.dtype))
        else:
            acc = kernels.conv2d_forward(xq.q, wq.q, **args, bounds=bounds)
            y = np.empty(acc.shape, dtype=x.dtype)
            rescale_planes(acc, scale, y)  # acc may be a strided view: read in place
        if b is not None:
            y += b.reshape(1, -1, 1, 1)
        return [y], (xq, w, x.shape, args, b is not None, x.dtype)

    def backward(self, ctx, grads):
        xq, w, x_shape, args, has_bias, dtype = ctx
        dy = grads[0]
        dyq = self._quantize_grad(dy)
        dw = _rescaled(kernels.conv2d_backward_weight(dyq.q, xq.q, w.shape, **args, bounds=(_bound(dyq), _bound(xq))), dyq.scale, xq.scale, dtype)
        dx = None
        if not self.skip_input_grad:
            vq = self._quantize_weight(w, per_channel=False)
            bounds = (_bound(dyq), _bound(vq))
            if getattr(kernels, "RESCALES", False):
                scale = np.full(x_shape[1], _scale_product(dyq.scale, vq.scale, dtype), dtype=dtype)
                dx = kernels.conv2d_backward_data(dyq.q, vq.q, x_shape, **args, bounds=bounds, rescale=(scale, dtype))
            else:
                dx = _rescaled(kernels.conv2d_backward_data(dyq.q, vq.q, x_shape, **args, bounds=bounds),
                               dyq.scale, vq.scale, dtype)
        out = [dx, dw]
        if has_bias:
            out.append(dy.sum(axis=(0, 2, 3)))
        return out


class QuantLinear(QuantMAC):
    """Gemm (transA=0) and MatMul with a 2-D weight: y = x W^T as torch's Linear, in integers."""

    def _weight_rows(self, w: np.ndarray) -> np.ndarray:
        # Rows must be output channels: Gemm with transB=1 stores (out, in), MatMul and transB=0 (in, out).
        if self.node.op_type == "Gemm" and self.attr("transB", 0):
            return w
        return w.T

    def forward(self, inputs, training):
        x, w = inputs[0], inputs[1]
        c = inputs[2] if len(inputs) > 2 else None
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        xq = self._quantize_input(x2, training)
        wq = self._quantize_weight(self._weight_rows(w))
        acc = kernels.linear_forward(xq.q, wq.q, bounds=(_bound(xq), _bound(wq)))
        scale = (np.float32(xq.scale) * wq.scale.astype(np.float32)).reshape(1, -1)
        alpha = float(self.attr("alpha", 1.0)) if self.node.op_type == "Gemm" else 1.0
        beta = float(self.attr("beta", 1.0)) if self.node.op_type == "Gemm" else 1.0
        y = acc.astype(x.dtype, order="C") * scale.astype(x.dtype)  # acc may be a transposed view
        if alpha != 1.0:
            y *= x.dtype.type(alpha)
        if c is not None:
            y = y + (c * c.dtype.type(beta) if beta != 1.0 else c)
        y = y.reshape(lead + (y.shape[-1],))
        return [y], (xq, w, x.shape, None if c is None else c.shape, alpha, beta, x.dtype)

    def backward(self, ctx, grads):
        xq, w, x_shape, c_shape, alpha, beta, dtype = ctx
        dy = grads[0].reshape(-1, grads[0].shape[-1])
        dy_a = dy * dtype.type(alpha) if alpha != 1.0 else dy
        dyq = self._quantize_grad(dy_a)
        dw_rows = _rescaled(kernels.linear_backward_weight(dyq.q, xq.q, bounds=(_bound(dyq), _bound(xq))), dyq.scale, xq.scale, dtype)
        dw = dw_rows if dw_rows.shape == w.shape else np.ascontiguousarray(dw_rows.T)
        dx = None
        if not self.skip_input_grad:
            vq = self._quantize_weight(self._weight_rows(w), per_channel=False)
            dx = _rescaled(kernels.linear_backward_data(dyq.q, vq.q, bounds=(_bound(dyq), _bound(vq))), dyq.scale, vq.scale, dtype).reshape(x_shape)
        out = [dx, dw]
        if c_shape is not None:
            out.append(unbroadcast(grads[0] * dtype.type(beta) if beta != 1.0 else grads[0], c_shape))
        return out


def _bound(t) -> int:
    """max |value| a QTensor can hold: its values were clipped into [qmin, qmax]."""
    return max(-t.qmin, t.qmax)


def _scale_product(s_a, s_b, dtype):
    """The float32 product of two per-tensor scales, as the output dtype's scalar."""
    return dtype.type(np.float32(s_a) * np.float32(s_b))


def _rescaled(acc: np.ndarray, s_a, s_b, dtype) -> np.ndarray:
    """An integer accumulator times the float32 product of two per-tensor scales, in one pass
    (a 4-D accumulator may be a strided view: it is read in place, not copied first)."""
    out = np.empty(acc.shape, dtype=dtype)
    scale = _scale_product(s_a, s_b, dtype)
    if acc.ndim == 4:
        rescale_planes(acc, np.full(acc.shape[1], scale, dtype=dtype), out)
    elif acc.flags.c_contiguous:
        rescale_flat(acc.reshape(-1), scale, out.reshape(-1))
    else:  # e.g. a GEMM returned as a transposed view: read in place
        rescale_planes(acc.reshape((1, 1) + acc.shape[-2:]) if acc.ndim == 2 else np.ascontiguousarray(acc),
                       np.full(1, scale, dtype=dtype), out.reshape((1, 1) + out.shape[-2:]))
    return out


def integer_form(node: Node, params: dict[str, np.ndarray]) -> type[QuantMAC] | None:
    """The integer op that can run this MAC node, or None where the float path stays (1-D/3-D conv,
    a Gemm with transA, a MatMul whose weight is not a 2-D parameter)."""
    w = params.get(node.inputs[1]) if len(node.inputs) > 1 else None
    if w is None:
        return None
    if node.op_type == "Conv":
        return QuantConv if w.ndim == 4 else None
    if node.op_type == "Gemm":
        return QuantLinear if not node.attrs.get("transA", 0) else None
    if node.op_type == "MatMul":
        return QuantLinear if w.ndim == 2 else None
    return None
