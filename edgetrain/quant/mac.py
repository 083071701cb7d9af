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

A layer runs as sample groups (`Group`): DFQ sorts a batch by the candidate each sample chose, and each
group is quantised with its own bit-widths, stream and running range; a static layer is one group.
The integer product of one sample's row never depends on another row's, and every group of a layer
that shares a weight width shares the weight codes, so groups' codes stacked into one tensor give
each group exactly the integers its own kernel call would: with `merge`, consecutive groups whose
codes share a storage type (8-bit codes and the int16 codes of 9..16 bits cannot) and whose weights
share a width take one kernel call, the convs rescaling each image by its own group's scales
(`scale[n, c]`) while its results are still in cache. The weight gradient is a sum over samples whose
terms carry different scales per group, so it stays one call per group. Merged or not, every float
is bit-identical (tests/test_dfq.py checks it): the same quantisation calls, scale products and
roundings, the groups' weight gradients summed in the same order.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from edgetrain import kernels
from edgetrain.graph import Node
from edgetrain.kernels.rescale import rescale_planes
from edgetrain.ops.base import Op, Run, unbroadcast
from edgetrain.ops.norm_kernels import rescale_flat
from edgetrain.ops.windows import geometry
from edgetrain.precision.spec import LayerPrecision
from edgetrain.quant import QTensor, RunningRange, quantize
from edgetrain.quant.rnn import QUANT_RECURRENT

STREAMS_PER_LAYER = 1  # random-bit streams a layer draws per step: its output gradient's rounding


@dataclass
class QuantRuntime:
    """What the quantised ops of one model share: scale form, eval ranges, counters.

    The run key (seed, step) is not here: it arrives with each forward (`Run.key`), and the backward
    reads it from the forward's context.
    """

    pow2_scales: bool = False
    range_momentum: float = 0.1  # weight of a new batch in the running activation range eval uses
    act_ranges: dict[str, RunningRange] = field(default_factory=dict)
    saturated: dict[str, int] = field(default_factory=dict)  # elements clipped, per layer

    def count(self, layer: str, n: int) -> None:
        """Add clipped elements to a layer's counter (never silent)."""
        if n:
            self.saturated[layer] = self.saturated.get(layer, 0) + int(n)


class Group(NamedTuple):
    """One sample group of a MAC layer: its rows of the batch, and the op whose settings (bit-widths,
    stochastic-rounding stream, running range) quantise them. A layer's groups tile its batch in order."""

    rows: slice
    op: QuantMAC


@dataclass
class MACContext:
    """What a MAC layer's backward needs of its forward (fields common to Conv and Linear)."""

    groups: list[Group]
    inputs: list[QTensor]  # each group's quantised input (a Linear's as 2-D rows)
    w: np.ndarray  # the float master weights
    x_shape: tuple
    dtype: np.dtype
    key: tuple[int, int]  # the run key: the output gradient's stochastic rounding draws from it
    merge: bool  # groups may share kernel calls
    calls: int  # kernel calls the forward made (the backward makes one weight-gradient call per group)


@dataclass
class ConvContext(MACContext):
    args: dict = field(default_factory=dict)  # stride, pads, dilation, groups as the kernels take them
    has_bias: bool = False


@dataclass
class LinearContext(MACContext):
    rows: list[slice] = field(default_factory=list)  # each group's rows of the 2-D input
    c_shape: tuple | None = None
    alpha: float = 1.0
    beta: float = 1.0


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
        # Names this layer's running activation range and clip counter; DFQ gives each candidate its own.
        self.range_key = float_op.node.name

    def forward(self, inputs, run):
        """The layer as one sample group: every row quantised by this op."""
        return self.forward_groups(inputs, run, [Group(slice(None), self)])

    def forward_groups(self, inputs: list[np.ndarray | None], run: Run, groups: Sequence[Group],
                       merge: bool = True) -> tuple[list[np.ndarray], MACContext]:
        """The layer's output with each group's rows quantised by its op (every op runs this node);
        with merge, groups share kernel calls where their codes allow (module doc)."""
        raise NotImplementedError

    def _quantize_input(self, x: np.ndarray, training: bool) -> QTensor:
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

    def _quantize_weight(self, w_rows: np.ndarray, per_channel: bool = True) -> QTensor:
        """Weights: nearest, from the float master copy each step; per output channel (rows) for the
        forward, per tensor for the error back-propagation."""
        return quantize(w_rows, self.precision.weight_bits, signed=True, axis=0 if per_channel else None,
                        pow2=self.runtime.pow2_scales)

    def _quantize_grad(self, g: np.ndarray, key: tuple[int, int]) -> QTensor:
        return quantize(g, self.precision.grad_bits, signed=True, rounding="stochastic",
                        key=(*key, self.layer_index * STREAMS_PER_LAYER), pow2=self.runtime.pow2_scales)

    def macs(self, in_shapes, out_shapes):
        return self.float_op.macs(in_shapes, out_shapes)


class QuantConv(QuantMAC):
    """2-D Conv (groups, depthwise, strides, pads, dilations) on integer kernels."""

    def _conv_args(self, x_shape, w_shape):
        geo = geometry(self.node.name, self.attrs, tuple(x_shape[2:]), tuple(self.attr("kernel_shape", w_shape[2:])))
        pads = (geo.pads_begin[0], geo.pads_begin[1], geo.pads_end[0], geo.pads_end[1])
        return dict(stride=geo.strides, pads=pads, dilation=geo.dilations, groups=int(self.attr("group", 1)))

    def forward_groups(self, inputs, run, groups, merge=True):
        x, w = inputs[0], inputs[1]
        b = inputs[2] if len(inputs) > 2 else None
        args = self._conv_args(x.shape, w.shape)
        xqs = [g.op._quantize_input(x[g.rows], run.training) for g in groups]
        wqs = _weight_codes(groups, w, per_channel=True)
        codes = [q.q for q in xqs]
        runs = _runs(codes, wqs, merge)
        parts = []
        for members in runs:
            wq = wqs[members[0]]
            scales = _forward_scales(xqs, wq, members, x.dtype)
            parts.append(kernels.conv2d_forward(_stacked(codes, members), wq.q, **args,
                                                bounds=_run_bounds(xqs, wq, members),
                                                rescale=(_image_scales(scales, codes, members), x.dtype)))
        y = parts[0] if len(parts) == 1 else np.concatenate(parts)
        if b is not None:
            y += b.reshape(1, -1, 1, 1)
        return [y], ConvContext(list(groups), xqs, w, x.shape, x.dtype, run.key, merge, len(runs), args, b is not None)

    def backward(self, ctx: ConvContext, grads, needed):
        dy, dtype, args = grads[0], ctx.dtype, ctx.args
        dyqs = [g.op._quantize_grad(dy[g.rows], ctx.key) for g in ctx.groups]
        dw = None
        for dyq, xq in zip(dyqs, ctx.inputs):
            part = _rescaled(kernels.conv2d_backward_weight(dyq.q, xq.q, ctx.w.shape, **args,
                                                            bounds=(_bound(dyq), _bound(xq))),
                             dyq.scale, xq.scale, dtype)
            dw = part if dw is None else dw + part
        dx = None
        if needed[0]:
            vqs = _weight_codes(ctx.groups, ctx.w, per_channel=False)
            codes = [q.q for q in dyqs]
            parts = []
            for members in _runs(codes, vqs, ctx.merge):
                vq = vqs[members[0]]
                stacked = _stacked(codes, members)
                bounds = _run_bounds(dyqs, vq, members)
                scales = [np.full(ctx.x_shape[1], _scale_product(dyqs[i].scale, vq.scale, dtype), dtype=dtype)
                          for i in members]
                parts.append(kernels.conv2d_backward_data(stacked, vq.q, (stacked.shape[0],) + ctx.x_shape[1:], **args,
                                                          bounds=bounds,
                                                          rescale=(_image_scales(scales, codes, members), dtype)))
            dx = parts[0] if len(parts) == 1 else np.concatenate(parts)
        out = [dx, dw]
        if ctx.has_bias:
            first, *others = ctx.groups
            out.append(sum((dy[g.rows].sum(axis=(0, 2, 3)) for g in others), dy[first.rows].sum(axis=(0, 2, 3))))
        return out


class QuantLinear(QuantMAC):
    """Gemm (transA=0) and MatMul with a 2-D weight: y = x W^T as torch's Linear, in integers."""

    def _rows_are_weight(self) -> bool:
        # Rows must be output channels: Gemm with transB=1 stores (out, in), MatMul and transB=0 (in, out).
        return self.node.op_type == "Gemm" and bool(self.attr("transB", 0))

    def _weight_rows(self, w: np.ndarray) -> np.ndarray:
        return w if self._rows_are_weight() else w.T

    def forward_groups(self, inputs, run, groups, merge=True):
        x, w = inputs[0], inputs[1]
        c = inputs[2] if len(inputs) > 2 else None
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        rows = _flat_rows(groups, x.shape, x2.shape[0])
        xqs = [g.op._quantize_input(x2[r], run.training) for g, r in zip(groups, rows)]
        wqs = _weight_codes(groups, self._weight_rows(w), per_channel=True)
        codes = [q.q for q in xqs]
        runs = _runs(codes, wqs, merge)
        parts = []
        for members in runs:
            wq = wqs[members[0]]
            # may be a transposed view
            acc = kernels.linear_forward(_stacked(codes, members), wq.q, bounds=_run_bounds(xqs, wq, members))
            for scale, sl in zip(_forward_scales(xqs, wq, members, x.dtype), _local(codes, members)):
                parts.append((acc if len(members) == 1 else acc[sl]).astype(x.dtype, order="C") * scale.reshape(1, -1))
        y = parts[0] if len(parts) == 1 else np.concatenate(parts)
        alpha = float(self.attr("alpha", 1.0)) if self.node.op_type == "Gemm" else 1.0
        beta = float(self.attr("beta", 1.0)) if self.node.op_type == "Gemm" else 1.0
        if alpha != 1.0:
            y *= x.dtype.type(alpha)
        if c is not None:
            y = y + (c * c.dtype.type(beta) if beta != 1.0 else c)
        y = y.reshape(lead + (y.shape[-1],))
        return [y], LinearContext(list(groups), xqs, w, x.shape, x.dtype, run.key, merge, len(runs), rows,
                                  None if c is None else c.shape, alpha, beta)

    def backward(self, ctx: LinearContext, grads, needed):
        dtype, w = ctx.dtype, ctx.w
        dy = grads[0].reshape(-1, grads[0].shape[-1])
        dy_a = dy * dtype.type(ctx.alpha) if ctx.alpha != 1.0 else dy
        dyqs = [g.op._quantize_grad(dy_a[r], ctx.key) for g, r in zip(ctx.groups, ctx.rows)]
        dw = None
        for dyq, xq in zip(dyqs, ctx.inputs):
            dw_rows = _rescaled(kernels.linear_backward_weight(dyq.q, xq.q, bounds=(_bound(dyq), _bound(xq))),
                                dyq.scale, xq.scale, dtype)
            # By layout, not shape: a square weight stored (in, out) needs the transpose too.
            part = dw_rows if self._rows_are_weight() else np.ascontiguousarray(dw_rows.T)
            dw = part if dw is None else dw + part
        dx = None
        if needed[0]:
            vqs = _weight_codes(ctx.groups, self._weight_rows(w), per_channel=False)
            codes = [q.q for q in dyqs]
            parts = []
            for members in _runs(codes, vqs, ctx.merge):
                vq = vqs[members[0]]
                acc = kernels.linear_backward_data(_stacked(codes, members), vq.q,
                                                   bounds=_run_bounds(dyqs, vq, members))
                parts += [_rescaled(acc if len(members) == 1 else acc[sl], dyqs[i].scale, vq.scale, dtype)
                          for i, sl in zip(members, _local(codes, members))]
            dx = (parts[0] if len(parts) == 1 else np.concatenate(parts)).reshape(ctx.x_shape)
        out = [dx, dw]
        if ctx.c_shape is not None:
            beta = dtype.type(ctx.beta)
            terms = [unbroadcast(grads[0][g.rows] * beta if ctx.beta != 1.0 else grads[0][g.rows], ctx.c_shape)
                     for g in ctx.groups]
            out.append(sum(terms[1:], terms[0]))
        return out


def _weight_codes(groups: Sequence[Group], w_rows: np.ndarray, per_channel: bool) -> list[QTensor]:
    """Each group's weight codes; groups of one weight width share one quantisation (the same codes)."""
    by_width: dict[int, QTensor] = {}
    for g in groups:
        if g.op.precision.weight_bits not in by_width:
            by_width[g.op.precision.weight_bits] = g.op._quantize_weight(w_rows, per_channel)
    return [by_width[g.op.precision.weight_bits] for g in groups]


def _runs(codes: list[np.ndarray], weights: list[QTensor], merge: bool) -> list[list[int]]:
    """The kernel calls: with merge, consecutive groups whose codes share a storage type and whose
    weights share their codes go in one call; without, one call per group."""
    runs: list[list[int]] = []
    for i, q in enumerate(codes):
        if merge and runs and codes[runs[-1][0]].dtype == q.dtype and weights[runs[-1][0]] is weights[i]:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def _stacked(codes: list[np.ndarray], members: list[int]) -> np.ndarray:
    return codes[members[0]] if len(members) == 1 else np.concatenate([codes[i] for i in members])


def _local(codes: list[np.ndarray], members: list[int]) -> list[slice]:
    """Each member group's rows within its run's stacked codes."""
    ends = np.cumsum([codes[i].shape[0] for i in members])
    return [slice(int(e - codes[i].shape[0]), int(e)) for i, e in zip(members, ends)]


def _image_scales(scales: list[np.ndarray], codes: list[np.ndarray], members: list[int]) -> np.ndarray:
    """A run's rescale as the conv kernels take it: one row for a single group, else each image the
    scale row of its group."""
    if len(members) == 1:
        return scales[0]
    return np.repeat(np.stack(scales), [codes[i].shape[0] for i in members], axis=0)


def _flat_rows(groups: Sequence[Group], x_shape: tuple, n_rows: int) -> list[slice]:
    """Each group's rows of a Linear's input flattened to 2-D (samples may span several rows)."""
    per = n_rows // x_shape[0] if len(x_shape) > 1 and x_shape[0] else 1
    return [slice(None if g.rows.start is None else g.rows.start * per,
                  None if g.rows.stop is None else g.rows.stop * per) for g in groups]


def _run_bounds(qs: list[QTensor], other: QTensor, members: list[int]) -> tuple[int, int]:
    """The kernel's operand bounds for one run of stacked groups: the widest group's, and the other operand's."""
    return max(_bound(qs[i]) for i in members), _bound(other)


def _forward_scales(xqs: list[QTensor], wq: QTensor, members: list[int], dtype: np.dtype) -> list[np.ndarray]:
    """Each member group's forward rescale per output channel: its input scale times the weight scales, in
    float32 (the product each group's own call would have used)."""
    w_scale = wq.scale.astype(np.float32)
    return [(np.float32(xqs[i].scale) * w_scale).astype(dtype) for i in members]


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


def integer_form(node: Node, params: dict[str, np.ndarray]) -> type[QuantMAC] | type[Op] | None:
    """The integer op that can run this MAC node, or None where the float path stays (1-D/3-D conv,
    a Gemm with transA, a MatMul whose weight is not a 2-D parameter)."""
    if node.op_type in QUANT_RECURRENT:  # its weights may be torch's tensors routed through Slice/Concat
        return QUANT_RECURRENT[node.op_type]
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
