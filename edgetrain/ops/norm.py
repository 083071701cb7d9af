"""BatchNormalization: batch statistics and running-stat update in training, running stats in eval."""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from edgetrain.kernels import detfloat
from edgetrain.kernels.threads import pool_threads
from edgetrain.ops import norm_kernels
from edgetrain.ops.base import FusedAway, Op, register
from edgetrain.quant.qtensor import Prequantised, QTensor, QuantStats, qrange, storage_dtype
from edgetrain.quant.quantizer import NARROW_BLOCK, NEAR_HALF, narrow_margin, scale_from_range

# An integer-fed BatchNorm takes the parallel build from this many values on. Its per-value work (float64
# sums, a recomputed ReLU mask) is several times a rescale's, so it pays far below the elementwise
# kernels' `threads.SMALL_ELEMENTS`: measured on 2 threads, (8, 336, 16) forward 51 -> 20 us, backward
# 66 -> 28; (8, 16, 256) 9.0 -> 6.3 and 19 -> 11; even (8, 16, 1) 2.8 -> 2.3.
PARALLEL_MIN_VALUES = 1 << 10
# A BatchNorm hands its reader codes (`BatchNormalization._forward_codes`) on planes of at least this many
# positions. Against the plain forward plus the reader's quantisation, measured on 2 threads of a 2.6 GHz
# Xeon: (128, 16, 32x32) 1.08 -> 0.88 ms, (8, 48, 32x32) 195 -> 165 us, (8, 96, 16x16) 119 -> 108 us; on 8x8
# maps the row loops' per-row costs win: (128, 64, 8x8) 0.29-0.33 -> 0.39-0.40 ms, (8, 144, 8x8) 66 -> 70 us.
CODES_MIN_PLANE = 256


class EvalContext(NamedTuple):
    """Backward of the running-statistics forward: the affine part only (the statistics are constants)."""

    xhat: np.ndarray
    inv: np.ndarray
    scale: np.ndarray
    bshape: tuple
    axes: tuple
    y: np.ndarray  # the output (its sign masks the gradient where a Relu was folded in)


class TrainContext(NamedTuple):
    """Backward of the batch-statistics forward, and the running statistics it updates."""

    x3: np.ndarray  # the input as (N, C, spatial)
    mu: np.ndarray
    inv: np.ndarray
    scale: np.ndarray
    shape: tuple
    new_mean: np.ndarray
    new_var: np.ndarray
    bias: np.ndarray  # float64, as the forward used it: a folded Relu's mask is recomputed from x with it


@register("BatchNormalization")
class BatchNormalization(Op):
    """Inputs X, scale, B, running mean, running var.

    Running statistics follow ONNX's momentum convention (new = old * momentum + batch * (1 - momentum),
    so PyTorch's momentum 0.1 arrives as 0.9). The running variance is updated with the unbiased batch
    variance, as PyTorch does, because the models we fine-tune come from there; a graph that asks for
    ONNX training mode itself (training_mode=1) gets ONNX's population variance instead.
    """

    parallel = False  # True for a Model's own instances that follow integer layers (see norm_kernels)
    relu = False  # True where the Relu that alone reads this output was folded in (see fuse_relu)
    cap = np.inf  # the folded activation's upper bound: 6 for a ReLU6 (Clip(0, 6)), none for a Relu
    # The integer layer that alone reads this output (after the folded ReLU), set by Model._place_batchnorms:
    # in training this op then writes that layer's input codes instead of its floats (`_forward_codes`).
    codes_for = None

    def _parallel_for(self, x3: np.ndarray) -> bool:
        """The parallel build only where it pays: below `PARALLEL_MIN_VALUES` the serial one, the same
        per-channel loops and so the same bits, with no parallel launch."""
        return self.parallel and x3.size >= PARALLEL_MIN_VALUES

    def _use_batch_stats(self, training: bool) -> bool:
        return training or bool(self.attr("training_mode", 0))

    def forward(self, inputs, run):
        x, scale, bias, mean, var = inputs
        eps = np.asarray(self.attr("epsilon", 1e-5), dtype=x.dtype)
        axes = (0,) + tuple(range(2, x.ndim))
        bshape = (1, -1) + (1,) * (x.ndim - 2)
        if not self._use_batch_stats(run.training):
            inv = 1.0 / np.sqrt(var.astype(x.dtype) + eps)
            xhat = (x - mean.reshape(bshape)) * inv.reshape(bshape)
            y = (xhat * scale.reshape(bshape) + bias.reshape(bshape)).astype(x.dtype, copy=False)
            if self.relu:
                y = np.maximum(y, 0, out=y)
                if self.cap < np.inf:
                    y = np.minimum(y, y.dtype.type(self.cap), out=y)
            return [y], EvalContext(xhat, inv, scale, bshape, axes, y)
        x3 = np.ascontiguousarray(x).reshape(x.shape[0], x.shape[1], -1)
        mu = np.empty(x.shape[1], dtype=np.float64)
        bvar = np.empty(x.shape[1], dtype=np.float64)
        inv = np.empty(x.shape[1], dtype=np.float64)
        bias64 = bias.astype(np.float64)
        y = None
        if (self.codes_for is not None and run.training and x.ndim == 4 and x3.shape[2] >= CODES_MIN_PLANE
                and self._parallel_for(x3) and not self.codes_for.clips_input()):  # (codes of the batch's range)
            y = self._forward_codes(x3, x.shape, scale.astype(np.float64), bias64, float(eps), mu, bvar, inv)
        if y is None:
            y3 = np.empty_like(x3)
            args = (x3, scale.astype(np.float64), bias64, float(eps), y3, mu, bvar, inv, self.relu, float(self.cap))
            if self._parallel_for(x3):
                norm_kernels.bn_train_forward_parallel(*args, _channel_runs(x3))
            else:
                norm_kernels.bn_train_forward(*args)
            y = y3.reshape(x.shape)
        count = x.size // x.shape[1]
        onnx_training = bool(self.attr("training_mode", 0)) and not run.training
        factor = 1.0 if onnx_training or count < 2 else count / (count - 1)  # the unbiased correction, or none
        new_mean, new_var = _running_stats(mean, var, mu, bvar, float(self.attr("momentum", 0.9)), factor)
        outs = [y]
        if len(self.node.outputs) > 1:
            outs += [new_mean, new_var][: len(self.node.outputs) - 1]
        return outs, TrainContext(x3, mu, inv, scale, x.shape, new_mean, new_var, bias64)

    def _forward_codes(self, x3: np.ndarray, shape: tuple, scale64: np.ndarray, bias64: np.ndarray, eps: float,
                       mu: np.ndarray, bvar: np.ndarray, inv: np.ndarray) -> Prequantised | None:
        """The training forward with a folded ReLU writing `codes_for`'s input codes, not the floats: exactly
        `quantize(y, act_bits, signed=False)` of the y the plain forward stores (the same statistics, the
        same `relu_value`), without writing y or reading it twice.

        y's range comes from x's: within a channel y = relu_value((x - mean) * a + b) is monotone in x (IEEE
        rounding is), so its extremes are those at x's min and max, which the statistics pass takes while the
        channel is in cache. None (the caller runs the plain forward) when x or y holds a NaN or infinity:
        the reader's quantiser then reports it as it always has."""
        reader = self.codes_for
        c, cap = x3.shape[1], float(self.cap)
        a = np.empty(c)
        ys = np.empty(2 * c, x3.dtype)  # y at each channel's min of x, then at its max
        norm_kernels.bn_stats_extrema(x3, scale64, bias64, eps, cap, mu, bvar, inv, a, ys[:c], ys[c:],
                                      _channel_runs(x3))
        if not np.isfinite(ys).all():
            return None
        top = float(ys.max())  # >= -0.0: the ReLU's; quantize's unsigned range is max(top, 0)
        bits, pow2 = reader.precision.act_bits, reader.runtime.pow2_scales
        s = scale_from_range(np.array([max(top, 0.0)]), bits, signed=False, pow2=pow2)[0]
        codes = np.empty(x3.shape, storage_dtype(bits, False))
        qmax = qrange(bits, False)[1]
        norm_kernels.bn_codes(x3, mu, a, bias64, cap, s, qmax, codes, NEAR_HALF,
                              x3.dtype.type(narrow_margin(x3.dtype, qmax)), NARROW_BLOCK)
        q = QTensor.trusted(codes.reshape(shape), s, bits, False, None, QuantStats(int(codes.size), 0, abs(top)))

        def floats() -> np.ndarray:
            y3 = np.empty_like(x3)
            norm_kernels.bn_apply(x3, mu, a, bias64, True, cap, y3)
            return y3.reshape(q.q.shape)

        return Prequantised(q, x3.dtype, floats)

    def buffer_updates(self, ctx):
        if not isinstance(ctx, TrainContext):
            return {}
        return {3: ctx.new_mean, 4: ctx.new_var}

    def backward(self, ctx, grads, needed):
        g = grads[0]
        if isinstance(ctx, EvalContext):
            # Frozen statistics are constants, so the affine part is all there is to differentiate.
            xhat, inv, scale, bshape, axes, y = ctx
            if self.relu:
                g = g * ((y > 0) & (y < self.cap)) if self.cap < np.inf else g * (y > 0)
            return [g * (inv * scale).reshape(bshape), detfloat.op_sum(g * xhat, axes), detfloat.op_sum(g, axes),
                    None, None]
        x3, mu, inv, scale, shape = ctx.x3, ctx.mu, ctx.inv, ctx.scale, ctx.shape
        g3 = np.ascontiguousarray(g).reshape(x3.shape)
        dx = np.empty_like(g3)
        dscale = np.empty(x3.shape[1], dtype=np.float64)
        dbias = np.empty(x3.shape[1], dtype=np.float64)
        # d/dx of a normalised batch: the two mean terms remove the gradient along the batch mean and
        # along xhat, since both statistics depend on every sample.
        args = (x3, g3, self.relu, scale.astype(np.float64), ctx.bias, mu, inv, dx, dscale, dbias, float(self.cap))
        if self._parallel_for(x3):
            norm_kernels.bn_train_backward_parallel(*args, _channel_runs(x3))
        else:
            norm_kernels.bn_train_backward(*args)
        return [dx.reshape(shape), dscale.astype(scale.dtype), dbias.astype(scale.dtype), None, None]


def _running_stats(mean: np.ndarray, var: np.ndarray, mu: np.ndarray, bvar: np.ndarray, momentum: float,
                   factor: float) -> tuple[np.ndarray, np.ndarray]:
    """The running statistics after a batch (ONNX's momentum convention): one compiled call
    (`norm_kernels.running_stats`) for float32 or float64 statistics, NumPy's expressions for anything else
    (the same values)."""
    if (mean.dtype == var.dtype and mean.dtype in (np.float32, np.float64) and mean.ndim == var.ndim == 1
            and mean.shape == var.shape == mu.shape):
        new_mean, new_var = np.empty_like(mean), np.empty_like(var)
        norm_kernels.running_stats(mean, var, mu, bvar, momentum, factor, new_mean, new_var)
        return new_mean, new_var
    m = np.asarray(momentum, dtype=mean.dtype)
    unbiased = bvar if factor == 1.0 else bvar * factor
    return mean * m + mu.astype(mean.dtype) * (1 - m), var * m + unbiased.astype(var.dtype) * (1 - m)


def _channel_runs(x3: np.ndarray) -> int:
    """Runs of channels a parallel BatchNorm kernel deals to the threads: a few per thread, each sharing one
    set of lane buffers (allocated per channel they cost MobileNetV2's 4x4 maps 20-40%)."""
    return min(x3.shape[1], 4 * pool_threads())


def sole_reader(value: str, consumers: dict, graph_outputs: set):
    """The node that alone reads `value` (nothing else does, and it is no graph output), or None."""
    readers = consumers.get(value, [])
    return readers[0] if len(readers) == 1 and value not in graph_outputs else None


def sole_relu_reader(value: str, consumers: dict, graph_outputs: set):
    """The Relu node that alone reads `value`, or None: the condition for folding that Relu into the op
    that writes `value`."""
    reader = sole_reader(value, consumers, graph_outputs)
    return reader if reader is not None and reader.op_type == "Relu" else None


def relu6_cap(node, constants: dict) -> float | None:
    """The upper bound of a Clip that is a ReLU6-like cap (lower bound 0, a finite upper bound > 0, both
    constants), or None."""
    if node.op_type != "Clip":
        return None
    if len(node.inputs) > 1 or "min" not in node.attrs:  # opset 11+: bounds are inputs
        names = (list(node.inputs[1:3]) + ["", ""])[:2]
        if not all(n in constants and np.size(constants[n]) == 1 for n in names):
            return None
        lo, hi = (float(np.asarray(constants[n]).reshape(())) for n in names)
    else:
        lo, hi = float(node.attrs.get("min", -np.inf)), float(node.attrs.get("max", np.inf))
    return hi if lo == 0.0 and 0.0 < hi < np.inf else None


def fuse_relu(bn_node, bn_op: BatchNormalization, consumers: dict, graph_outputs: set, opset: int,
              constants: dict | None = None) -> tuple | None:
    """Fold the Relu that alone reads a BatchNorm's output into that BatchNorm: (relu node, FusedAway op)
    to put in the Relu's place, with bn_op.relu set; None (nothing changed) when another node or the
    graph's output reads the BatchNorm's output too, or the BatchNorm has more outputs in use. Given the
    graph's `constants`, a ReLU6 (Clip(0, 6)) folds the same way, with bn_op.cap = 6."""
    if any(o for o in bn_node.outputs[1:]):
        return None
    reader = sole_reader(bn_node.outputs[0], consumers, graph_outputs)
    if reader is None:
        return None
    if reader.op_type == "Relu":
        cap = np.inf
    else:
        cap = None if constants is None else relu6_cap(reader, constants)
        if cap is None:
            return None
    bn_op.relu, bn_op.cap = True, cap
    return reader, FusedAway(reader, opset)
