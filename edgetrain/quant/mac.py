"""Conv (1-D, 2-D, 3-D), Gemm and MatMul on integer kernels: the MAC work of training in fixed point.

Each op quantises its operands, hands the integer tensors to `edgetrain.kernels` (exact integer
results), and rescales the integer result into the float domain where BatchNorm, ReLU and the rest
run (docs/NUMERICS.md). Per layer and step:

    forward          y  = (x_q * w_q) * s_x * s_w[c]      x: nearest, per tensor; w: nearest, per output channel
    weight gradient  dW = (dy_q * x_q) * s_dy * s_x       dy: stochastic, per tensor, once per layer and step
    error backprop   dx = (dy_q * v_q) * s_dy * s_v       v: the weights again, nearest, per tensor

The error back-propagation sums over output channels, along which per-channel weight scales vary, so
it takes the weights quantised per tensor (in training the forward makes both codes from one scan,
`quantize_weights`, and hands the backward these), and the one quantised gradient feeds both products,
as in FracTrain. The float master weights receive
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

A MatMul between two activations (`QuantMatMul`, attention) has no weight: both operands are quantised
as activations, and its backward returns dA = dY B^T and dB = A^T dY from the same quantised dY.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from itertools import accumulate
from typing import NamedTuple

import numpy as np

from edgetrain import kernels
from edgetrain.graph import Node
from edgetrain.kernels import detfloat
from edgetrain.kernels.rescale import rescale_matrix, rescale_planes
from edgetrain.kernels.strided import Dilated, dense, subsample
from edgetrain.kernels.threads import SMALL_ELEMENTS
from edgetrain.ops.base import Op, Run, unbroadcast
from edgetrain.ops.elementwise import relu, relu_grad
from edgetrain.ops.norm_kernels import rescale_flat
from edgetrain.ops.windows import geometry
from edgetrain.precision.spec import LayerPrecision
from edgetrain.quant import QTensor, RunningRange, quantize, small_linear
from edgetrain.quant.clip import clipped_range, clipped_rows, sample_values
from edgetrain.quant.qtensor import Prequantised, QuantStats, SampleRows
from edgetrain.quant.quantizer import quantize_rows, quantize_weights
from edgetrain.quant.rnn import QUANT_RECURRENT

# The QuantRuntime fields a run's config sets (TrainConfig keys of the same names): what a copy of a model keeps.
RUNTIME_SETTINGS = ("grad_ranges", "clip_act_bits", "clip_weight_bits")
STREAMS_PER_LAYER = 1  # random-bit streams a layer draws per step: its output gradient's rounding
SPLIT_STREAM = 1 << 32  # the error's codes of a split output gradient draw from stream layer + this


@dataclass
class QuantRuntime:
    """What the quantised ops of one model share: scale form, eval ranges, counters.

    The run key (seed, step) is not here: it arrives with each forward (`Run.key`), and the backward
    reads it from the forward's context.
    """

    pow2_scales: bool = False
    grad_ranges: str = "tensor"  # one of precision.spec.GRAD_RANGES
    clip_act_bits: int = 0  # activations at this many bits or fewer take a clipped range in training (quant.clip)
    clip_weight_bits: int = 0  # weights at this many bits or fewer take a clipped range per output channel
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
    tensor_codes: list[QTensor] | None  # each group's weights quantised per tensor, for the error backprop


@dataclass
class ConvContext(MACContext):
    args: dict = field(default_factory=dict)  # stride, pads, dilation, groups as the kernels take them
    has_bias: bool = False
    out_ndim: int = 4  # 3: a 1-D conv, run (and saved here: inputs, w, x_shape) as its 2-D view
    subsampled: tuple | None = None  # (the input's 2-D shape, strides): run on every stride-th pixel (kernels.strided)


@dataclass
class LinearContext(MACContext):
    rows: list[slice] = field(default_factory=list)  # each group's rows of the 2-D input
    c_shape: tuple | None = None
    alpha: float = 1.0
    beta: float = 1.0
    small: small_linear.Codes | None = None  # the forward took `small_linear`'s path: the backward's codes
    relu_out: np.ndarray | None = None  # the output, where the layer applied the Relu that reads it (QuantLinear.relu)


class QuantMAC(Op):
    """Shared machinery of the integer Conv and Gemm/MatMul: operand quantisation and rescaling."""

    HAS_WEIGHT = True  # reads a parameter weight (an act-act MatMul does not: export and DFQ ask)

    def __init__(self, float_op: Op, precision: LayerPrecision, layer_index: int, unsigned_input: bool,
                 runtime: QuantRuntime, unsigned_other: bool = False):
        """unsigned_input / unsigned_other: the graph proves the first / second activation operand
        non-negative (the second is read only by a MatMul between two activations)."""
        super().__init__(float_op.node, float_op.opset)
        self.float_op = float_op
        self.precision = precision
        self.layer_index = layer_index
        self.unsigned_input = unsigned_input
        self.unsigned_other = unsigned_other
        self.runtime = runtime
        # Names this layer's running activation range and clip counter; DFQ gives each candidate its own.
        self.range_key = float_op.node.name
        self._args_by_shape: dict[tuple, dict] = {}  # a conv's kernel arguments per (x, w) shape pair

    def forward(self, inputs, run):
        """The layer as one sample group: every row quantised by this op."""
        return self.forward_groups(inputs, run, [Group(slice(None), self)])

    def forward_groups(self, inputs: list[np.ndarray | None], run: Run, groups: Sequence[Group],
                       merge: bool = True) -> tuple[list[np.ndarray], MACContext]:
        """The layer's output with each group's rows quantised by its op (every op runs this node);
        with merge, groups share kernel calls where their codes allow (module doc)."""
        raise NotImplementedError

    def backward_rows(self, ctx: MACContext, grads, needed, rows: np.ndarray):
        """backward with an error for the samples `rows` (sorted) only: the others take 0-bit gradients here, so
        they add nothing to the weight gradient and get a zero input gradient. This form zeroes their rows and
        runs every row (no time saved); a conv runs the kernels on `rows` alone (QuantConv.backward_rows)."""
        if len(rows) == grads[0].shape[0]:
            return self.backward(ctx, grads, needed)
        dy = np.zeros_like(grads[0])
        dy[rows] = grads[0][rows]
        return self.backward(ctx, [dy, *grads[1:]], needed)

    def _quantize_input(self, x: np.ndarray, training: bool, operand: int = 0) -> QTensor:
        """Activations: per-tensor range from the batch in training, the running range in eval.
        operand 1 is the second activation of a MatMul between two (its own range and counter)."""
        rt = self.runtime
        key = self.range_key if operand == 0 else f"{self.range_key}#{operand}"
        running = rt.act_ranges.setdefault(key, RunningRange(rt.range_momentum))
        # Eval quantises with the range seen in training, so one odd batch cannot rescale the layer;
        # before any training step there is no such range and the batch's own is used.
        fixed = running.value if not training and running.value else None
        unsigned = self.unsigned_input if operand == 0 else self.unsigned_other
        # a gated unit's executing rows are read where they lie: the same codes as the gathered copy's
        source, rows = (x.source, x.rows) if isinstance(x, SampleRows) else (x, None)
        clipped = None
        if training and self.clips_input():
            clipped = fixed = clipped_range(sample_values(source, rows), self.precision.act_bits, signed=not unsigned,
                                            pow2=rt.pow2_scales)
        if rows is not None:
            q = quantize_rows(source, rows, self.precision.act_bits, signed=not unsigned, range=fixed,
                              pow2=rt.pow2_scales)
        else:
            q = quantize(x, self.precision.act_bits, signed=not unsigned, range=fixed, pow2=rt.pow2_scales)
        if training:  # eval quantises with the range training used: the batch's, or its clipped one
            running.update(q.stats.observed_max if clipped is None else clipped)
        rt.count(key, q.stats.saturated)
        return q

    def clips_input(self) -> bool:
        """Whether this layer's activations take a clipped range in training (QuantRuntime.clip_act_bits)."""
        return 0 < self.precision.act_bits <= self.runtime.clip_act_bits

    def _record_input(self, stats: QuantStats) -> None:
        """What `_quantize_input` records of a training batch's codes made elsewhere: the running range and
        the clip counter."""
        rt = self.runtime
        rt.act_ranges.setdefault(self.range_key, RunningRange(rt.range_momentum)).update(stats.observed_max)
        rt.count(self.range_key, stats.saturated)

    def _prequantised_input(self, x, groups: Sequence[Group], training: bool) -> QTensor | None:
        """x's codes where its producer already wrote them for this layer (a BatchNorm's `codes_for`:
        exactly what `_quantize_input` would make of the floats, in training, with a range from the batch),
        with the running range and counter updated as `_quantize_input` does; else None."""
        if not isinstance(x, Prequantised):
            return None
        q = x.codes
        n = q.q.shape[0]
        # One group of every row: a static layer's slice(None), or a gated unit's slice(0, n) of its samples.
        if not (training and len(groups) == 1 and groups[0].op is self and groups[0].rows.indices(n) == (0, n, 1)
                and self.unsigned_input and not q.signed and q.bits == self.precision.act_bits):
            return None
        self._record_input(q.stats)
        return q

    def _quantize_weight(self, w_rows: np.ndarray, training: bool) -> tuple[QTensor, QTensor | None]:
        """Weights: nearest, from the float master copy each step; per output channel (rows) for the
        forward and, in training, per tensor for the error back-propagation, both from one scan (the
        weights cannot change between a forward and its backward)."""
        bits, pow2 = self.precision.weight_bits, self.runtime.pow2_scales
        ranges = clipped_rows(w_rows, bits, pow2=pow2) if self.clips_weight() else None
        if ranges is not None:  # the backward's per-tensor codes at the widest row's clipped range
            rows = quantize(w_rows, bits, signed=True, axis=0, pow2=pow2, range=ranges)
            return rows, quantize(w_rows, bits, signed=True, pow2=pow2, range=ranges.max()) if training else None
        if training:
            return quantize_weights(w_rows, bits, pow2=pow2)
        return quantize(w_rows, bits, signed=True, axis=0, pow2=pow2), None

    def clips_weight(self) -> bool:
        """Whether this layer's weights take a clipped range per output channel (QuantRuntime.clip_weight_bits)."""
        return self.HAS_WEIGHT and 0 < self.precision.weight_bits <= self.runtime.clip_weight_bits

    def _quantize_grad(self, g: np.ndarray, key: tuple[int, int], axis: int | None = None, stream: int = 0) -> QTensor:
        return quantize(g, self.precision.grad_bits, signed=True, rounding="stochastic", axis=axis,
                        key=(*key, self.layer_index * STREAMS_PER_LAYER + stream * SPLIT_STREAM),
                        pow2=self.runtime.pow2_scales)

    def macs(self, in_shapes, out_shapes):
        return self.float_op.macs(in_shapes, out_shapes)


def takes_codes(op: Op | None, node: Node, value: str) -> bool:
    """Whether `op`, running `node`, can take `value` as codes its producer wrote (`Prequantised`): an integer
    conv reading it as its data input only, with unsigned codes (a folded ReLU's output), and every pixel of it
    (a subsampling conv quantises only the pixels it reads)."""
    return (type(op) is QuantConv and op.unsigned_input and node.inputs[0] == value
            and value not in node.inputs[1:] and not op.subsamples())


def takes_rows(op: Op | None, node: Node, value: str) -> bool:
    """Whether `op`, running `node`, can take `value` as rows not yet gathered (`SampleRows`): an integer conv
    reading it as its data input only, which quantises it and keeps nothing else of it."""
    return type(op) is QuantConv and node.inputs[0] == value and value not in node.inputs[1:]


def _groups_channel_sum(dy: np.ndarray, groups: list) -> np.ndarray:
    """A conv's bias gradient over its sample groups: each group's channel sum, added in group order."""
    first, *others = groups
    return sum((detfloat.op_channel_sum(dy[g.rows]) for g in others), detfloat.op_channel_sum(dy[first.rows]))


class QuantConv(QuantMAC):
    """Conv over 1 or 2 spatial dims (groups, depthwise, strides, pads, dilations) on the 2-D integer
    kernels. A 1-D conv (N, C, L) runs as the 2-D conv of (N, C, 1, L) with a (1, k) kernel: the same
    sums term by term, so the same exact integers."""

    def _conv_args(self, x_shape, w_shape):
        """The kernels' arguments for the 2-D view of this conv (a 1-D conv's height axis is trivial);
        kept per shape pair, as a node's attributes never change (resolving them took 5 us a call)."""
        key = (tuple(x_shape), tuple(w_shape))
        if key not in self._args_by_shape:
            self._args_by_shape[key] = self._resolve_conv_args(x_shape, w_shape)
        return self._args_by_shape[key]

    def _resolve_conv_args(self, x_shape, w_shape):
        geo = geometry(self.node.name, self.attrs, tuple(x_shape[2:]), tuple(self.attr("kernel_shape", w_shape[2:])))
        if len(x_shape) == 3:
            return dict(stride=(1, geo.strides[0]), pads=(0, geo.pads_begin[0], 0, geo.pads_end[0]),
                        dilation=(1, geo.dilations[0]), groups=int(self.attr("group", 1)))
        pads = (geo.pads_begin[0], geo.pads_begin[1], geo.pads_end[0], geo.pads_end[1])
        return dict(stride=geo.strides, pads=pads, dilation=geo.dilations, groups=int(self.attr("group", 1)))

    def subsamples(self) -> bool:
        """Whether this conv may run as the stride-1 conv of every stride-th pixel (`_pointwise_strides`): strides
        above 1 on a kernel of 1x1, or of a shape not named (the weights' decides)."""
        kernel = self.attr("kernel_shape", None)
        return any(s != 1 for s in self.attr("strides", ())) and (kernel is None or all(k == 1 for k in kernel))

    def forward_groups(self, inputs, run, groups, merge=True):
        x, w = inputs[0], inputs[1]
        b = inputs[2] if len(inputs) > 2 else None
        pre = self._prequantised_input(x, groups, run.training)
        if pre is None and isinstance(x, Prequantised) or isinstance(x, SampleRows) and x.ndim != 4:
            x = x.floats()  # codes made for another setting, or a 1-D conv's rows: quantise the floats as usual
        args = self._conv_args(x.shape, w.shape)
        out_ndim = x.ndim
        w = _as_2d_conv(w)
        strides = _pointwise_strides(args, w.shape)
        subsampled = None
        if strides is not None and pre is None:  # the stride-1 conv of the pixels it reads (kernels.strided)
            x = _as_2d_conv(x.floats() if isinstance(x, SampleRows) else x)
            subsampled = (x.shape, strides)
            x, args = subsample(x, strides), dict(args, stride=(1, 1))
        if pre is not None:
            xqs = [pre]
        else:
            x = _as_2d_conv(x)
            xqs = [g.op._quantize_input(x[g.rows], run.training) for g in groups]
        wqs, vqs = _weight_codes(groups, w, run.training)
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
        if out_ndim == 3:
            y = y.reshape(y.shape[:2] + y.shape[3:])
        return [y], ConvContext(list(groups), xqs, w, x.shape, x.dtype, run.key, merge, len(runs), vqs, args,
                                b is not None, out_ndim, subsampled)

    def backward(self, ctx: ConvContext, grads, needed):
        dy, dtype, args = _as_2d_conv(grads[0]), ctx.dtype, ctx.args
        split = self.runtime.grad_ranges == "split"
        rescaled = _rows_rescaled if split else _rescaled
        dyqs = [g.op._quantize_grad(dy[g.rows], ctx.key, axis=1 if split else None) for g in ctx.groups]
        dw = None
        for dyq, xq in zip(dyqs, ctx.inputs):
            acc = kernels.conv2d_backward_weight(dyq.q, xq.q, ctx.w.shape, **args, bounds=(_bound(dyq), _bound(xq)))
            part = rescaled(acc, dyq.scale, xq.scale, dtype)
            dw = part if dw is None else dw + part
        dx = None
        if needed[0]:
            if split:
                dyqs = [g.op._quantize_grad(dy[g.rows], ctx.key, axis=0, stream=1) for g in ctx.groups]
            vqs = _tensor_codes(ctx, ctx.w)
            codes = [q.q for q in dyqs]
            parts = []
            for members in _runs(codes, vqs, ctx.merge):
                vq = vqs[members[0]]
                stacked = _stacked(codes, members)
                bounds = _run_bounds(dyqs, vq, members)
                if split:
                    rescale = np.concatenate([_per_image_scales(dyqs[i].scale, vq.scale, ctx.x_shape[1], dtype)
                                              for i in members])
                else:
                    scales = [np.full(ctx.x_shape[1], _scale_product(dyqs[i].scale, vq.scale, dtype), dtype=dtype)
                              for i in members]
                    rescale = _image_scales(scales, codes, members)
                parts.append(kernels.conv2d_backward_data(stacked, vq.q, (stacked.shape[0],) + ctx.x_shape[1:], **args,
                                                          bounds=bounds, rescale=(rescale, dtype)))
            dx = parts[0] if len(parts) == 1 else np.concatenate(parts)
        if ctx.subsampled is not None and dx is not None:  # zero on every pixel the forward did not read
            dx = Dilated(dx, *ctx.subsampled)
        if ctx.out_ndim == 3:  # back from the 2-D view: drop the height-1 axis (a full array: no 3-D Dilated)
            dw = dw.reshape(dw.shape[:2] + dw.shape[3:])
            dx = None if dx is None else dense(dx).reshape(dx.shape[:2] + dx.shape[3:])
        out = [dx, dw]
        if ctx.has_bias:
            out.append(_groups_channel_sum(dy, ctx.groups))
        return out

    def backward_rows(self, ctx: ConvContext, grads, needed, rows: np.ndarray):
        """backward with an error for the samples `rows` (sorted) only (QuantMAC.backward_rows), its kernels run
        on those rows' codes alone: the weight gradient and error of the others are never computed."""
        n = ctx.x_shape[0]
        if len(rows) == n:
            return self.backward(ctx, grads, needed)
        if ctx.subsampled is not None or ctx.out_ndim != 4:  # (a strided or 1-D view: rare inside a gated unit)
            return super().backward_rows(ctx, grads, needed, rows)
        groups, inputs, codes, start = [], [], [], 0
        for i, (g, xq) in enumerate(zip(ctx.groups, ctx.inputs)):
            first, stop, _ = g.rows.indices(n)
            lo, hi = np.searchsorted(rows, (first, stop))
            if hi == lo:
                continue
            inputs.append(replace(xq, q=xq.q[rows[lo:hi] - first]))
            groups.append(Group(slice(start, start + int(hi - lo)), g.op))
            if ctx.tensor_codes is not None:
                codes.append(ctx.tensor_codes[i])
            start += int(hi - lo)
        dy = grads[0]
        if not groups:  # no sample carries an error here: nothing to compute
            dw = np.zeros_like(ctx.w)
            out = [np.zeros(ctx.x_shape, ctx.dtype) if needed[0] else None, dw]
            return out + [np.zeros(dy.shape[1], dy.dtype)] if ctx.has_bias else out
        sub = replace(ctx, groups=groups, inputs=inputs, tensor_codes=codes if ctx.tensor_codes is not None else None,
                      x_shape=(start,) + tuple(ctx.x_shape[1:]))
        dx_rows, *rest = self.backward(sub, [dy[rows]], needed)
        if dx_rows is None:
            return [None, *rest]
        dx = np.zeros(ctx.x_shape, dx_rows.dtype)
        dx[rows] = dx_rows
        return [dx, *rest]


def _pointwise_strides(args: dict, w_shape: tuple) -> tuple[int, int] | None:
    """The strides of a 1x1 conv with strides above 1 and no padding, which reads every stride-th pixel only and
    so runs as the stride-1 conv of those (`kernels.strided`: the same integers); None for any other conv."""
    stride = tuple(args["stride"])
    if tuple(w_shape[2:]) != (1, 1) or stride == (1, 1) or any(args["pads"]):
        return None
    return stride


def _as_2d_conv(a: np.ndarray) -> np.ndarray:
    """A 1-D conv's (N, C, L) tensor (or (M, C/g, k) weight) as the 2-D kernels' (N, C, 1, L) view."""
    return a.reshape(a.shape[:2] + (1,) + a.shape[2:]) if a.ndim == 3 else a


class QuantConv3d(QuantMAC):
    """Conv over 3 spatial dims on the 2-D integer kernels: for each kernel depth offset kd, the input's
    depth slices that offset reads (every output depth's, stacked on the batch axis) convolved with the
    weights' kd plane. The kd terms are exact integers summed in int64 before one rescale, so the result
    is the exact 3-D sum. Sample groups run one after another (no merged calls)."""

    def _geometry(self, x_shape, w_shape):
        geo = geometry(self.node.name, self.attrs, tuple(x_shape[2:]), tuple(self.attr("kernel_shape", w_shape[2:])))
        args = dict(stride=geo.strides[1:], pads=(geo.pads_begin[1], geo.pads_begin[2], geo.pads_end[1],
                                                  geo.pads_end[2]),
                    dilation=geo.dilations[1:], groups=int(self.attr("group", 1)))
        return geo, args

    def forward_groups(self, inputs, run, groups, merge=True):
        x, w = inputs[0], inputs[1]
        b = inputs[2] if len(inputs) > 2 else None
        geo, args = self._geometry(x.shape, w.shape)
        xqs = [g.op._quantize_input(x[g.rows], run.training) for g in groups]
        wqs, vqs = _weight_codes(groups, w, run.training)
        parts = []
        for xq, wq in zip(xqs, wqs):
            acc = _conv3d_forward(xq.q, wq.q, geo, args, (_bound(xq), _bound(wq)))
            scale = (np.float32(xq.scale) * wq.scale.astype(np.float32)).astype(x.dtype)
            out = np.empty(acc.shape, x.dtype)
            rescale_planes(acc.reshape(acc.shape[:2] + (-1, acc.shape[-1])), scale,
                           out.reshape(acc.shape[:2] + (-1, acc.shape[-1])))
            parts.append(out)
        y = parts[0] if len(parts) == 1 else np.concatenate(parts)
        if b is not None:
            y += b.reshape(1, -1, 1, 1, 1)
        return [y], ConvContext(list(groups), xqs, w, x.shape, x.dtype, run.key, merge, len(groups) * w.shape[2], vqs,
                                dict(args, geo=geo), b is not None, 5)

    def backward(self, ctx: ConvContext, grads, needed):
        dy, dtype = grads[0], ctx.dtype
        geo, args = ctx.args["geo"], {k: v for k, v in ctx.args.items() if k != "geo"}
        dyqs = [g.op._quantize_grad(dy[g.rows], ctx.key) for g in ctx.groups]
        dw = None
        for dyq, xq in zip(dyqs, ctx.inputs):
            acc = _conv3d_backward_weight(dyq.q, xq.q, ctx.w.shape, geo, args, (_bound(dyq), _bound(xq)))
            part = _rescaled(acc.reshape(acc.shape[:2] + (-1, acc.shape[-1])), dyq.scale, xq.scale, dtype)
            dw = part.reshape(ctx.w.shape) if dw is None else dw + part.reshape(ctx.w.shape)
        dx = None
        if needed[0]:
            vqs = _tensor_codes(ctx, ctx.w)
            parts = []
            for dyq, xq, vq in zip(dyqs, ctx.inputs, vqs):
                acc = _conv3d_backward_data(dyq.q, vq.q, xq.q.shape, geo, args, (_bound(dyq), _bound(vq)))
                parts.append(_rescaled(acc.reshape(acc.shape[:2] + (-1, acc.shape[-1])), dyq.scale, vq.scale,
                                       dtype).reshape(acc.shape))
            dx = parts[0] if len(parts) == 1 else np.concatenate(parts)
        out = [dx, dw]
        if ctx.has_bias:
            out.append(_groups_channel_sum(dy, ctx.groups))
        return out


def _depth_slabs(xq: np.ndarray, geo, kd: int) -> np.ndarray:
    """The depth slices kernel offset kd reads for every output depth, as a batch of 2-D images:
    (N, C, D, H, W) codes, depth-padded by the caller, -> (N * OD, C, H, W)."""
    start = kd * geo.dilations[0]
    slab = xq[:, :, start:start + geo.strides[0] * (geo.out[0] - 1) + 1:geo.strides[0]]
    return np.ascontiguousarray(slab.transpose(0, 2, 1, 3, 4)).reshape((-1,) + slab.shape[1:2] + slab.shape[3:])


def _depth_padded(xq: np.ndarray, geo) -> np.ndarray:
    return np.pad(xq, [(0, 0), (0, 0), (geo.pads_begin[0], geo.pads_end[0]), (0, 0), (0, 0)])


def _as_depth_batch(t: np.ndarray) -> np.ndarray:
    """(N, M, OD, OH, OW) -> (N * OD, M, OH, OW): each output depth an image of the 2-D kernels."""
    return np.ascontiguousarray(t.transpose(0, 2, 1, 3, 4)).reshape((-1,) + t.shape[1:2] + t.shape[3:])


def _conv3d_forward(xq: np.ndarray, wq: np.ndarray, geo, args: dict, bounds: tuple[int, int]) -> np.ndarray:
    """The exact int64 3-D conv of codes xq (N, C, D, H, W) and wq (M, C/g, KD, KH, KW): (N, M, OD, OH, OW)."""
    xp = _depth_padded(xq, geo)
    total = None
    for kd in range(wq.shape[2]):
        acc = kernels.conv2d_forward(_depth_slabs(xp, geo, kd), np.ascontiguousarray(wq[:, :, kd]), **args,
                                     bounds=bounds).astype(np.int64)
        total = acc if total is None else total + acc
    n, od = xq.shape[0], geo.out[0]
    return np.ascontiguousarray(total.reshape((n, od) + total.shape[1:]).transpose(0, 2, 1, 3, 4))


def _conv3d_backward_weight(dyq: np.ndarray, xq: np.ndarray, w_shape: tuple, geo, args: dict,
                            bounds: tuple[int, int]) -> np.ndarray:
    """dW (int64, w_shape) = the exact weight gradient of the 3-D conv, one kernel depth plane at a time."""
    xp, dy2 = _depth_padded(xq, geo), _as_depth_batch(dyq)
    plane = w_shape[:2] + w_shape[3:]
    return np.stack([kernels.conv2d_backward_weight(dy2, _depth_slabs(xp, geo, kd), plane, **args,
                                                    bounds=bounds).astype(np.int64)
                     for kd in range(w_shape[2])], axis=2)


def _conv3d_backward_data(dyq: np.ndarray, vq: np.ndarray, x_shape: tuple, geo, args: dict,
                          bounds: tuple[int, int]) -> np.ndarray:
    """dX (int64, x_shape) = the exact transposed 3-D conv of dY with v, each depth plane's 2-D result
    added into the depth slices it came from."""
    n, c, d = x_shape[:3]
    dy2 = _as_depth_batch(dyq)
    od, sd, dd = geo.out[0], geo.strides[0], geo.dilations[0]
    dxp = np.zeros((n, d + geo.pads_begin[0] + geo.pads_end[0], c) + tuple(x_shape[3:]), np.int64)
    for kd in range(vq.shape[2]):
        part = kernels.conv2d_backward_data(dy2, np.ascontiguousarray(vq[:, :, kd]), (n * od, c) + tuple(x_shape[3:]),
                                            **args, bounds=bounds)
        dxp[:, kd * dd:kd * dd + sd * (od - 1) + 1:sd] += part.reshape((n, od, c) + part.shape[2:])
    return np.ascontiguousarray(dxp[:, geo.pads_begin[0]:geo.pads_begin[0] + d].transpose(0, 2, 1, 3, 4))


class QuantLinear(QuantMAC):
    """Gemm (transA=0) and MatMul with a 2-D weight: y = x W^T as torch's Linear, in integers. A small static
    layer in training takes `small_linear` (the same floats, in three calls a step instead of about ten).

    With `relu` set (Model._fuse_linear_relus: a Relu alone reads this layer's output, as in an MLP's hidden
    layers), the layer applies that Relu itself, inside the rescale's pass together with the bias where one
    run of codes made the whole output, and its backward masks the output gradient as the Relu's backward
    would: the bits of the two ops, two passes over the output fewer in the forward."""

    relu = False

    def _rows_are_weight(self) -> bool:
        # Rows must be output channels: Gemm with transB=1 stores (out, in), MatMul and transB=0 (in, out).
        return self.node.op_type == "Gemm" and bool(self.attr("transB", 0))

    def _weight_rows(self, w: np.ndarray) -> np.ndarray:
        return w if self._rows_are_weight() else w.T

    def forward_groups(self, inputs, run, groups, merge=True):
        x, w = inputs[0], inputs[1]
        c = inputs[2] if len(inputs) > 2 else None
        if self._small(x, w, c, run, groups):
            (y,), ctx = self._small_forward(x, w, c, run, groups)
            if self.relu:
                y = ctx.relu_out = relu(y)
            return [y], ctx
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        rows = _flat_rows(groups, x.shape, x2.shape[0])
        xqs = [g.op._quantize_input(x2[r], run.training) for g, r in zip(groups, rows)]
        wqs, vqs = _weight_codes(groups, self._weight_rows(w), run.training)
        codes = [q.q for q in xqs]
        runs = _runs(codes, wqs, merge)
        alpha = float(self.attr("alpha", 1.0)) if self.node.op_type == "Gemm" else 1.0
        beta = float(self.attr("beta", 1.0)) if self.node.op_type == "Gemm" else 1.0
        # One run of codes making the whole output takes the bias (a plain one, of x's type) and the Relu in
        # the rescale's pass: the same operations as the array expressions below, in the same order.
        fused = (len(runs) == 1 and len(runs[0]) == 1 and alpha == 1.0
                 and (c is None or (beta == 1.0 and c.shape == self._weight_rows(w).shape[:1] and c.dtype == x.dtype)))
        parts = []
        for members in runs:
            wq = wqs[members[0]]
            # may be a transposed view
            acc = kernels.linear_forward(_stacked(codes, members), wq.q, bounds=_run_bounds(xqs, wq, members))
            for scale, sl in zip(_forward_scales(xqs, wq, members, x.dtype), _local(codes, members)):
                parts.append(rescale_matrix(acc if len(members) == 1 else acc[sl], scale, x.dtype, cast_first=True,
                                            bias=c if fused else None, relu=fused and self.relu))
        y = parts[0] if len(parts) == 1 else np.concatenate(parts)
        if not fused:
            if alpha != 1.0:
                y *= x.dtype.type(alpha)
            if c is not None:
                y = y + (c * c.dtype.type(beta) if beta != 1.0 else c)
            if self.relu:
                y = relu(y)
        y = y.reshape(lead + (y.shape[-1],))
        return [y], LinearContext(list(groups), xqs, w, x.shape, x.dtype, run.key, merge, len(runs), vqs, rows,
                                  None if c is None else c.shape, alpha, beta, relu_out=y if self.relu else None)

    def _small(self, x, w, c, run: Run, groups: Sequence[Group]) -> bool:
        """Whether this step takes `small_linear`: training, one group of every row, weights stored as rows,
        a plain bias, a product small enough (`small_linear.fits`), and one range per output gradient (the
        kernel's), its input's and weights' ranges their largest values (no clip)."""
        if self.runtime.grad_ranges != "tensor" or self.clips_input() or self.clips_weight():
            return False
        if not (run.training and len(groups) == 1 and groups[0].op is self and x.ndim >= 2 and x.size
                and groups[0].rows.indices(x.shape[0]) == (0, x.shape[0], 1) and self._rows_are_weight()
                and x.flags.c_contiguous and w.flags.c_contiguous and w.dtype == x.dtype):
            return False
        gemm = self.node.op_type == "Gemm"
        if gemm and (float(self.attr("alpha", 1.0)) != 1.0 or float(self.attr("beta", 1.0)) != 1.0):
            return False
        if c is not None and (c.shape != w.shape[:1] or c.dtype != x.dtype or not c.flags.c_contiguous):
            return False
        p = self.precision
        return small_linear.fits(x.size // x.shape[-1], x.shape[-1], w.shape[0], p.act_bits, p.weight_bits,
                                 p.grad_bits, x.dtype)

    def _small_forward(self, x, w, c, run: Run, groups: Sequence[Group]):
        y, stats, codes = small_linear.forward(x.reshape(-1, x.shape[-1]), w, c, self.precision.act_bits,
                                               not self.unsigned_input, self.precision.weight_bits,
                                               self.runtime.pow2_scales)
        self._record_input(stats)
        # The codes live in `small` (as float32): inputs and tensor_codes stay empty.
        return [y.reshape(x.shape[:-1] + (w.shape[0],))], LinearContext(
            list(groups), [], w, x.shape, x.dtype, run.key, True, 1, None, [slice(None)],
            None if c is None else c.shape, small=codes)

    def _small_backward(self, ctx: LinearContext, grads, needed):
        g = np.ascontiguousarray(grads[0]).reshape(-1, grads[0].shape[-1])
        # The kernel's bias gradient is detfloat's fixed-order sum; with detfloat off, NumPy's (as the general path).
        fused_bias = ctx.c_shape is not None and detfloat.active()
        dw, dx, db = small_linear.backward(g, self.precision.grad_bits, self.runtime.pow2_scales,
                                           (*ctx.key, self.layer_index * STREAMS_PER_LAYER), ctx.small,
                                           bool(needed[0]), fused_bias)
        out = [None if dx is None else dx.reshape(ctx.x_shape), dw]
        if ctx.c_shape is not None:
            out.append(db if fused_bias else unbroadcast(grads[0], ctx.c_shape))
        return out

    def backward(self, ctx: LinearContext, grads, needed):
        if ctx.relu_out is not None:  # through the Relu this layer applied: the gradient of its own output
            grads = [relu_grad(ctx.relu_out, grads[0])]
        if ctx.small is not None:
            return self._small_backward(ctx, grads, needed)
        dtype, w = ctx.dtype, ctx.w
        dy = grads[0].reshape(-1, grads[0].shape[-1])
        dy_a = dy * dtype.type(ctx.alpha) if ctx.alpha != 1.0 else dy
        split = self.runtime.grad_ranges == "split"
        rescaled = _rows_rescaled if split else _rescaled
        dyqs = [g.op._quantize_grad(dy_a[r], ctx.key, axis=1 if split else None) for g, r in zip(ctx.groups, ctx.rows)]
        dw = None
        for dyq, xq in zip(dyqs, ctx.inputs):
            acc = kernels.linear_backward_weight(dyq.q, xq.q, bounds=(_bound(dyq), _bound(xq)))
            dw_rows = rescaled(acc, dyq.scale, xq.scale, dtype)
            # By layout, not shape: a square weight stored (in, out) needs the transpose too.
            part = dw_rows if self._rows_are_weight() else np.ascontiguousarray(dw_rows.T)
            dw = part if dw is None else dw + part
        dx = None
        if needed[0]:
            if split:
                dyqs = [g.op._quantize_grad(dy_a[r], ctx.key, axis=0, stream=1) for g, r in zip(ctx.groups, ctx.rows)]
            vqs = _tensor_codes(ctx, self._weight_rows(w))
            codes = [q.q for q in dyqs]
            parts = []
            for members in _runs(codes, vqs, ctx.merge):
                vq = vqs[members[0]]
                acc = kernels.linear_backward_data(_stacked(codes, members), vq.q,
                                                   bounds=_run_bounds(dyqs, vq, members))
                parts += [rescaled(acc if len(members) == 1 else acc[sl], dyqs[i].scale, vq.scale, dtype)
                          for i, sl in zip(members, _local(codes, members))]
            dx = (parts[0] if len(parts) == 1 else np.concatenate(parts)).reshape(ctx.x_shape)
        out = [dx, dw]
        if ctx.c_shape is not None:
            beta = dtype.type(ctx.beta)
            terms = [unbroadcast(grads[0][g.rows] * beta if ctx.beta != 1.0 else grads[0][g.rows], ctx.c_shape)
                     for g in ctx.groups]
            out.append(sum(terms[1:], terms[0]))
        return out


@dataclass
class MatMulContext(MACContext):
    others: list[QTensor] = field(default_factory=list)  # each group's quantised second operand B
    b_shape: tuple = ()
    sliced: tuple[bool, bool] = (True, True)  # whether A, B have the samples on axis 0 (else shared by all)


class QuantMatMul(QuantMAC):
    """MatMul between two activations (attention's Q K^T and A V), numpy.matmul semantics (1-D operands
    promoted, batch dimensions broadcast), both operands quantised as activations (nearest, per tensor,
    each with its own running range): Y = (A_q B_q) s_A s_B, dA = (dY_q B_q^T) s_dY s_B,
    dB = (A_q^T dY_q) s_A s_dY, every product one exact integer GEMM per matrix of the batch, sums over
    broadcast axes taken on the integers. There is no weight: B takes the activation bits, so the
    layer's precision has weight bits = activation bits (what its BitOPs count)."""

    HAS_WEIGHT = False

    def __init__(self, float_op: Op, precision: LayerPrecision, layer_index: int, unsigned_input: bool,
                 runtime: QuantRuntime, unsigned_other: bool = False):
        super().__init__(float_op, precision.without_weight(), layer_index, unsigned_input, runtime, unsigned_other)

    def forward_groups(self, inputs, run, groups, merge=True):
        a, b = inputs[0], inputs[1]
        a2 = a[None, :] if a.ndim == 1 else a
        b2 = b[:, None] if b.ndim == 1 else b
        out_ndim = max(a2.ndim, b2.ndim)
        if len(groups) > 1 and out_ndim < 3:
            raise self.fail("sample groups need a batch axis, but this MatMul's output is 2-D")
        batch = max(a2.shape[0] if a2.ndim == out_ndim else 1, b2.shape[0] if b2.ndim == out_ndim else 1)
        # An operand without the samples on axis 0 (broadcast over them) is shared by every group.
        sliced = tuple(out_ndim >= 3 and t.ndim == out_ndim and t.shape[0] == batch for t in (a2, b2))
        aqs, bqs, parts = [], [], []
        calls = 0
        for g in groups:
            aq = g.op._quantize_input(a2[g.rows] if sliced[0] else a2, run.training, 0)
            bq = g.op._quantize_input(b2[g.rows] if sliced[1] else b2, run.training, 1)
            acc = kernels.batched_gemm_nt(aq.q, np.swapaxes(bq.q, -1, -2), (_bound(aq), _bound(bq)))
            parts.append(_rescaled(acc, aq.scale, bq.scale, a.dtype))  # acc: C-contiguous int64
            calls += int(np.prod(acc.shape[:-2]))
            aqs.append(aq)
            bqs.append(bq)
        y = parts[0] if len(parts) == 1 else np.concatenate(parts)
        y = _matmul_result(y, a, b)
        return [y], MatMulContext(list(groups), aqs, None, a.shape, a.dtype, run.key, merge, calls, None,
                                  bqs, b.shape, sliced)

    def backward(self, ctx: MatMulContext, grads, needed):
        dtype = ctx.dtype
        a_shape, b_shape = ctx.x_shape, ctx.b_shape
        a2_shape = (1,) + a_shape if len(a_shape) == 1 else a_shape
        b2_shape = b_shape + (1,) if len(b_shape) == 1 else b_shape
        # dY in the promoted product's shape (a 1-D operand's axis put back)
        dy = grads[0].reshape(np.broadcast_shapes(a2_shape[:-2], b2_shape[:-2]) + (a2_shape[-2], b2_shape[-1]))
        das, dbs = [], []
        for g, aq, bq in zip(ctx.groups, ctx.inputs, ctx.others):
            dyq = g.op._quantize_grad(dy[g.rows], ctx.key)
            if needed[0]:
                acc = unbroadcast(kernels.batched_gemm_nt(dyq.q, bq.q, (_bound(dyq), _bound(bq))), aq.q.shape)
                das.append(_rescaled(np.ascontiguousarray(acc), dyq.scale, bq.scale, dtype))
            if needed[1]:
                acc = unbroadcast(kernels.batched_gemm_nt(np.swapaxes(aq.q, -1, -2), np.swapaxes(dyq.q, -1, -2),
                                                          (_bound(aq), _bound(dyq))), bq.q.shape)
                dbs.append(_rescaled(np.ascontiguousarray(acc), aq.scale, dyq.scale, dtype))
        return [_gathered(das, ctx.sliced[0], a_shape), _gathered(dbs, ctx.sliced[1], b_shape)]


def _matmul_result(y: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The promoted product back to numpy.matmul's shape: a 1-D operand's added axis removed."""
    if a.ndim == 1:
        y = y.reshape(y.shape[:-2] + y.shape[-1:])
    if b.ndim == 1:
        y = y.reshape(y.shape[:-1])
    return y


def _gathered(parts: list[np.ndarray], sliced: bool, shape: tuple) -> np.ndarray | None:
    """One operand's gradient from its groups' parts: stacked where the groups own rows of it,
    summed in group order where every group read all of it."""
    if not parts:
        return None
    if len(parts) == 1:
        return parts[0].reshape(shape)
    if sliced:
        return np.concatenate(parts).reshape(shape)
    return sum(parts[1:], parts[0]).reshape(shape)


def _weight_codes(groups: Sequence[Group], w_rows: np.ndarray,
                  training: bool) -> tuple[list[QTensor], list[QTensor] | None]:
    """Each group's weight codes per output channel and (in training, for the backward) per tensor;
    groups of one weight width share one quantisation (the same codes)."""
    by_width: dict[int, tuple[QTensor, QTensor | None]] = {}
    for g in groups:
        if g.op.precision.weight_bits not in by_width:
            by_width[g.op.precision.weight_bits] = g.op._quantize_weight(w_rows, training)
    pairs = [by_width[g.op.precision.weight_bits] for g in groups]
    return [p[0] for p in pairs], [p[1] for p in pairs] if training else None


def _tensor_codes(ctx: MACContext, w_rows: np.ndarray) -> list[QTensor]:
    """Each group's weights quantised per tensor: the forward's (in training), else quantised now."""
    if ctx.tensor_codes is not None:
        return ctx.tensor_codes
    return _weight_codes(ctx.groups, w_rows, training=True)[1]


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
    """Each member group's rows within its run's stacked codes (Python ints: np.cumsum cost 2 us a call)."""
    ends = list(accumulate(codes[i].shape[0] for i in members))
    return [slice(e - codes[i].shape[0], e) for i, e in zip(members, ends)]


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


def _per_image_scales(image_scales: np.ndarray, s_b, channels: int, dtype) -> np.ndarray:
    """(images, channels) rescale rows as the kernels take them: each image's scale times a per-tensor one, the
    float32 product as dtype (what `_scale_product` makes of two per-tensor scales)."""
    scale = (image_scales.astype(np.float32) * np.float32(s_b)).astype(dtype)
    return np.ascontiguousarray(np.broadcast_to(scale[:, None], (scale.size, channels)))


def _rows_rescaled(acc: np.ndarray, row_scales: np.ndarray, s_b, dtype) -> np.ndarray:
    """An integer accumulator (2-D or 4-D, any strides) whose rows (axis 0) carry their own scale, times the
    float32 product of that scale and a per-tensor one: the planes' rescale with one row per "image" (a row of
    dW, a sample of dX), so the one rescaling expression (`kernels.rescale.scale_row`) and one pass."""
    planes = acc[:, :, None, None] if acc.ndim == 2 else acc
    out = np.empty(planes.shape, dtype=dtype)
    rescale_planes(planes, _per_image_scales(row_scales, s_b, planes.shape[1], dtype), out)
    return out.reshape(acc.shape)


def _rescaled(acc: np.ndarray, s_a, s_b, dtype) -> np.ndarray:
    """An integer accumulator times the float32 product of two per-tensor scales, in one pass
    (a 4-D accumulator may be a strided view: it is read in place, not copied first)."""
    out = np.empty(acc.shape, dtype=dtype)
    scale = _scale_product(s_a, s_b, dtype)
    if acc.flags.c_contiguous:  # one flat loop: a weight gradient's planes are 1x1 or 3x3, and a
        # loop per plane cost 140 us for MobileNetV2's (336, 56, 1, 1) (the same floats either way)
        rescale_flat(acc.reshape(-1), scale, out.reshape(-1), SMALL_ELEMENTS)
    elif acc.ndim == 4:
        rescale_planes(acc, np.full(acc.shape[1], scale, dtype=dtype), out)
    elif acc.ndim == 2:  # e.g. a GEMM returned as a transposed view: read in place, in tiles
        rescale_matrix(acc, scale, dtype, out=out)
    else:
        rescale_flat(np.ascontiguousarray(acc).reshape(-1), scale, out.reshape(-1), SMALL_ELEMENTS)
    return out


def integer_form(node: Node, params: dict[str, np.ndarray]) -> type[QuantMAC] | type[Op] | None:
    """The integer op that can run this MAC node, or None where the float path stays (`float_reason`
    says why: a Gemm with transA, a MatMul whose weight is not a 2-D parameter)."""
    if node.op_type in QUANT_RECURRENT:  # its weights may be torch's tensors routed through Slice/Concat
        return QUANT_RECURRENT[node.op_type]
    w = params.get(node.inputs[1]) if len(node.inputs) > 1 else None
    if node.op_type == "MatMul" and w is None and node.inputs[0] not in params:
        return QuantMatMul  # two activations (layers.mac_nodes takes such a MatMul only then)
    if w is None:
        return None
    if node.op_type == "Conv":
        return QuantConv if w.ndim in (3, 4) else QuantConv3d if w.ndim == 5 else None
    if node.op_type == "Gemm":
        return QuantLinear if not node.attrs.get("transA", 0) else None
    if node.op_type == "MatMul":
        return QuantLinear if w.ndim == 2 else None
    return None


def float_reason(node: Node, params: dict[str, np.ndarray]) -> str:
    """Why integer_form gives this MAC node no integer op: one phrase, for `edgetrain info`."""
    w = params.get(node.inputs[1]) if len(node.inputs) > 1 else None
    if node.op_type == "Conv":
        if w is None:
            return "Conv weight is not a parameter: not quantised"
        return f"Conv over {w.ndim - 2} spatial dims: not quantised"
    if node.op_type == "Gemm":
        return "Gemm B is not a parameter: not quantised" if w is None else "Gemm with transA: not quantised"
    if node.op_type == "MatMul":
        if w is None:
            return "MatMul weight is its first operand (W @ x): not quantised"
        return f"MatMul weight is not a 2-D parameter ({w.ndim}-D): not quantised"
    return f"{node.op_type} has no integer form"
