"""One integer kernel call for all the sample groups of a gated layer.

DFQ sorts a batch into groups by the candidate each sample chose; every group is quantised with its
own bit-widths and ranges. The integer product of one sample's row never depends on another row's,
and every candidate of a gated layer quantises the weights at the same DFQ weight width, so the
groups' codes stacked into one tensor give each group exactly the integers its own kernel call would.
One call then does the work of several smaller ones (on an 8-bit integer unit a 3-bit and a 6-bit
code cost the same); the conv kernels rescale each image by its own group's scales (`scale[n, c]`)
while its results are still in cache.

Only codes of one storage type can share a call (8-bit codes and the int16 codes of 9..16 bits
cannot): consecutive groups of one type form a run, one call per run. The weight gradient is a sum
over samples whose terms carry different scales per group, so it stays one call per group.

Every float that leaves here is bit-identical to running each group through its own op
(tests/test_dfq.py checks it): the same quantisation calls in the same order, the same scale
products and roundings, the groups' weight gradients summed in the same order.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgetrain import kernels
from edgetrain.ops.base import unbroadcast
from edgetrain.quant.mac import QuantConv, QuantLinear, QuantMAC, _bound, _rescaled, _scale_product


@dataclass
class GroupedContext:
    """What the backward of a grouped call needs: each group's op, rows and quantised input."""

    ops: list[QuantMAC]
    slices: list[slice]
    inputs: list  # each group's quantised input (QTensor)
    w: np.ndarray
    x_shape: tuple
    extra: tuple  # conv: (args, has_bias); linear: (c_shape, alpha, beta)
    dtype: np.dtype


def can_group(ops: list[QuantMAC], x: np.ndarray) -> bool:
    """Whether these candidate ops of one layer can share kernel calls for input x."""
    first = ops[0]
    if type(first) not in (QuantConv, QuantLinear) or any(type(op) is not type(first) for op in ops):
        return False
    if any(op.precision.weight_bits != first.precision.weight_bits for op in ops):
        return False
    return isinstance(first, QuantConv) or x.ndim == 2


def _runs(codes: list[np.ndarray]) -> list[list[int]]:
    """Consecutive groups whose codes share a storage type: one kernel call each."""
    runs: list[list[int]] = []
    for i, q in enumerate(codes):
        if runs and codes[runs[-1][0]].dtype == q.dtype:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def _stacked(codes: list[np.ndarray], run: list[int]) -> np.ndarray:
    return codes[run[0]] if len(run) == 1 else np.concatenate([codes[i] for i in run])


def _image_rows(scales: list[np.ndarray], codes: list[np.ndarray], run: list[int]) -> np.ndarray:
    """A run's rescale as the conv kernels take it: each image the scale row of its group."""
    return np.repeat(np.stack(scales), [codes[i].shape[0] for i in run], axis=0)


def _local(slices: list[slice], run: list[int]) -> list[slice]:
    """Each of a run's groups' rows within the run's stacked codes."""
    first = slices[run[0]].start
    return [slice(slices[i].start - first, slices[i].stop - first) for i in run]


def grouped_forward(ops: list[QuantMAC], slices: list[slice], inputs: list, training: bool,
                    count) -> tuple[np.ndarray, GroupedContext]:
    """The layer's output for every group (ops[i] on rows slices[i] of inputs[0]); count(n) is told
    of every kernel call."""
    x, w = inputs[0], inputs[1]
    bias = inputs[2] if len(inputs) > 2 else None
    first = ops[0]
    xqs = [op._quantize_input(x[sl], training) for op, sl in zip(ops, slices)]
    conv = isinstance(first, QuantConv)
    wq = first._quantize_weight(w if conv else first._weight_rows(w))
    w_scale = wq.scale.astype(np.float32)
    codes = [q.q for q in xqs]
    args = first._conv_args(x.shape, w.shape) if conv else None
    runs = _runs(codes)
    parts = []
    for run in runs:
        stacked = _stacked(codes, run)
        bounds = (max(_bound(xqs[i]) for i in run), _bound(wq))
        # Each group's rows carry its own scale product, as its own call would have used.
        scales = [(np.float32(xqs[i].scale) * w_scale).astype(x.dtype) for i in run]
        count(1)
        if conv:
            rows = _image_rows(scales, codes, run)
            parts.append(kernels.conv2d_forward(stacked, wq.q, **args, bounds=bounds, rescale=(rows, x.dtype)))
        else:
            acc = kernels.linear_forward(stacked, wq.q, bounds=bounds)
            local = _local(slices, run)
            parts.append(np.concatenate([acc[sl].astype(x.dtype, order="C") * s.reshape(1, -1)
                                         for sl, s in zip(local, scales)]))
    y = parts[0] if len(parts) == 1 else np.concatenate(parts)
    if conv:
        if bias is not None:
            y += bias.reshape(1, -1, 1, 1)
        extra = (args, bias is not None)
    else:
        alpha = float(first.attr("alpha", 1.0)) if first.node.op_type == "Gemm" else 1.0
        beta = float(first.attr("beta", 1.0)) if first.node.op_type == "Gemm" else 1.0
        if alpha != 1.0:
            y *= x.dtype.type(alpha)
        if bias is not None:
            y = y + (bias * bias.dtype.type(beta) if beta != 1.0 else bias)
        extra = (None if bias is None else bias.shape, alpha, beta)
    return y, GroupedContext(list(ops), list(slices), xqs, w, x.shape, extra, x.dtype)


def grouped_backward(ctx: GroupedContext, dy: np.ndarray, count) -> list:
    """[dx, dW(, d bias)] of a grouped call: dx in one call per run, dW and the bias summed over groups."""
    first = ctx.ops[0]
    conv = isinstance(first, QuantConv)
    dtype = ctx.dtype
    args = ctx.extra[0] if conv else None
    if not conv:
        c_shape, alpha, beta = ctx.extra
        dy_in = dy
        dy = dy * dtype.type(alpha) if alpha != 1.0 else dy
    dyqs = [op._quantize_grad(dy[sl]) for op, sl in zip(ctx.ops, ctx.slices)]
    dw = None
    for dyq, xq in zip(dyqs, ctx.inputs):
        count(1)
        bounds = (_bound(dyq), _bound(xq))
        if conv:
            part = _rescaled(kernels.conv2d_backward_weight(dyq.q, xq.q, ctx.w.shape, **args, bounds=bounds),
                             dyq.scale, xq.scale, dtype)
        else:
            rows = _rescaled(kernels.linear_backward_weight(dyq.q, xq.q, bounds=bounds), dyq.scale, xq.scale, dtype)
            part = rows if rows.shape == ctx.w.shape else np.ascontiguousarray(rows.T)
        dw = part if dw is None else dw + part
    dx = None
    if not first.skip_input_grad:
        vq = first._quantize_weight(ctx.w if conv else first._weight_rows(ctx.w), per_channel=False)
        codes = [q.q for q in dyqs]
        parts = []
        for run in _runs(codes):
            stacked = _stacked(codes, run)
            bounds = (max(_bound(dyqs[i]) for i in run), _bound(vq))
            if conv:
                scales = [np.full(ctx.x_shape[1], _scale_product(dyqs[i].scale, vq.scale, dtype), dtype) for i in run]
                rows = _image_rows(scales, codes, run)
                parts.append(kernels.conv2d_backward_data(stacked, vq.q, (stacked.shape[0],) + ctx.x_shape[1:], **args,
                                                          bounds=bounds, rescale=(rows, dtype)))
            else:
                acc = kernels.linear_backward_data(stacked, vq.q, bounds=bounds)
                local = _local(ctx.slices, run)
                parts.append(np.concatenate([_rescaled(acc[sl], dyqs[i].scale, vq.scale, dtype)
                                             for i, sl in zip(run, local)]))
        dx = parts[0] if len(parts) == 1 else np.concatenate(parts)
    out = [dx, dw]
    if conv and ctx.extra[1]:
        out.append(sum((dy[sl].sum(axis=(0, 2, 3)) for sl in ctx.slices[1:]), dy[ctx.slices[0]].sum(axis=(0, 2, 3))))
    elif not conv and c_shape is not None:
        parts = [unbroadcast(dy_in[sl] * dtype.type(beta) if beta != 1.0 else dy_in[sl], c_shape) for sl in ctx.slices]
        out.append(sum(parts[1:], parts[0]))
    return out
