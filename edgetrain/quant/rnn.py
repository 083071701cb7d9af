"""LSTM and GRU on integer kernels: the gate products X W^T and H R^T in fixed point, the rest in float.

The recurrence, gate nonlinearities and cell state stay in the float op (`edgetrain/ops/rnn.py`); this
module swaps its `Products` for quantised GEMMs, as QuantLinear does for a Gemm (docs/NUMERICS.md):

    input product      X W^T    x: nearest, per tensor (all steps at once); w: nearest, per gate row
    recurrent product  H R^T    h: nearest, per tensor and step;           r: nearest, per gate row
    weight gradients   dW = dG^T X, dR = sum_t dG_t^T H_t     dG: stochastic, per tensor, quantised once
    error backprop     dX = dG W,   dH_t = dG_t R             w, r again, nearest, per tensor

dG is the gradient of the gate pre-activations: over all steps at once for the input product, per step
for the recurrent one (the next step back needs dH_t before dG_(t-1) exists); each quantised gradient
feeds both its products, as in QuantLinear. Each layer draws its stochastic rounding from its one stream
(seed, step, layer), each direction from its own range of element indices (DIRECTION_STRIDE apart),
in the fixed order of the backward, so the bits do not depend on threads or timing. Eval quantises X
and H with the running ranges training saw (keys `<node>` and `<node>.h`).

This module imports nothing of quant/mac.py (which dispatches here from `integer_form`), so the
activation and weight quantisers are the same few calls written out again.
"""
from __future__ import annotations

import numpy as np

from edgetrain import kernels
from edgetrain.errors import EdgetrainError
from edgetrain.ops.base import Op, Run
from edgetrain.ops.rnn import GRU, LSTM, Products
from edgetrain.precision.spec import LayerPrecision
from edgetrain.quant.quantizer import RunningRange, quantize, quantize_weights

# Element indices of the layer's stream each direction's gradients draw from: half of the 2^32 a stream
# has (`rng.MAX_DRAWS`) each, far more than the gradients of one step through any sequence.
DIRECTION_STRIDE = 1 << 31


def _bound(q) -> int:
    return max(-q.qmin, q.qmax)


def _rescale(acc: np.ndarray, scale, dtype) -> np.ndarray:
    """int accumulator times float32 scales (a scalar or a row per output column), in the layer's dtype."""
    return acc.astype(dtype) * np.asarray(scale, np.float32).astype(dtype)


class QuantProducts(Products):
    """The quantised GEMMs of one direction of one forward (and its backward)."""

    def __init__(self, op: QuantRecurrent, run: Run, direction: int, shared: dict):
        super().__init__()
        self.shared = shared
        self.op, self.training = op, run.training
        self.key = (*run.key, op.layer_index)  # the layer's stream: (seed, step, layer)
        self.drawn = direction * DIRECTION_STRIDE
        self.weights: dict[str, tuple] = {}  # slot -> (per-row codes, per-tensor codes)

    def _weights(self, slot: str, w: np.ndarray):
        if slot not in self.weights:
            bits, pow2 = self.op.precision.weight_bits, self.op.runtime.pow2_scales
            self.weights[slot] = quantize_weights(w, bits, pow2=pow2)
        return self.weights[slot]

    def _grad(self, g: np.ndarray):
        q = quantize(g, self.op.precision.grad_bits, signed=True, rounding="stochastic", key=self.key,
                     index_offset=self.drawn, pow2=self.op.runtime.pow2_scales)
        self.drawn += g.size
        return q

    def _forward_gemm(self, xq, wq, dtype) -> np.ndarray:
        acc = kernels.linear_forward(xq.q, wq.q, bounds=(_bound(xq), _bound(wq)))
        return _rescale(acc, np.float32(xq.scale) * wq.scale.astype(np.float32), dtype)

    def input(self, x2, w):
        if "xq" not in self.shared:  # both directions read X: one quantisation, one range update
            self.shared["xq"] = self.op.quantize_act(x2, self.training, self.op.range_key, not self.op.unsigned_input)
        self.xq = self.shared["xq"]
        self.dtype = x2.dtype
        return self._forward_gemm(self.xq, self._weights("input", w)[0], x2.dtype)

    def input_back(self, dg2, need_x):
        gq = self._grad(dg2)
        dw = _rescale(kernels.linear_backward_weight(gq.q, self.xq.q, bounds=(_bound(gq), _bound(self.xq))),
                      np.float32(gq.scale) * np.float32(self.xq.scale), self.dtype)
        dx = None
        if need_x:
            vq = self.weights["input"][1]
            dx = _rescale(kernels.linear_backward_data(gq.q, vq.q, bounds=(_bound(gq), _bound(vq))),
                          np.float32(gq.scale) * np.float32(vq.scale), self.dtype)
        return dx, dw

    def recurrent(self, slot, h, r):
        hq = self.op.quantize_act(h, self.training, f"{self.op.range_key}.h", True)
        self.saved.setdefault(slot, []).append(hq)
        return self._forward_gemm(hq, self._weights(slot, r)[0], h.dtype)

    def recurrent_back(self, slot, dg):
        hq = self.saved[slot].pop()
        gq = self._grad(dg)
        dr = _rescale(kernels.linear_backward_weight(gq.q, hq.q, bounds=(_bound(gq), _bound(hq))),
                      np.float32(gq.scale) * np.float32(hq.scale), dg.dtype)
        self.grads[slot] = dr if slot not in self.grads else self.grads[slot] + dr
        vq = self.weights[slot][1]
        return _rescale(kernels.linear_backward_data(gq.q, vq.q, bounds=(_bound(gq), _bound(vq))),
                        np.float32(gq.scale) * np.float32(vq.scale), dg.dtype)


class QuantRecurrent:
    """Mixin over the float LSTM/GRU: the same recurrence with quantised gate products.

    Constructed as every integer layer is (`edgetrain.quant.mac.integer_form` names the class):
    (float op, precision, layer index, whether X is provably non-negative, the model's QuantRuntime).
    """

    def __init__(self, float_op: Op, precision: LayerPrecision, layer_index: int, unsigned_input: bool,
                 runtime, unsigned_other: bool = False):  # unsigned_other: the MAC layers' signature; no second operand
        super().__init__(float_op.node, float_op.opset)
        self.float_op = float_op
        self.precision = precision
        self.layer_index = layer_index
        self.unsigned_input = unsigned_input
        self.runtime = runtime
        self.range_key = float_op.node.name

    def products(self, direction: int, run: Run, shared: dict) -> Products:
        return QuantProducts(self, run, direction, shared)

    def quantize_act(self, x: np.ndarray, training: bool, range_key: str, signed: bool):
        """Activations: per tensor; the batch's range in training, the running range in eval."""
        rt = self.runtime
        running = rt.act_ranges.setdefault(range_key, RunningRange(rt.range_momentum))
        fixed = running.value if not training and running.value else None
        q = quantize(x, self.precision.act_bits, signed=signed, range=fixed, pow2=rt.pow2_scales)
        if training:
            running.update(q.stats.observed_max)
        rt.count(self.range_key, q.stats.saturated)
        return q

    def forward_groups(self, inputs, run, groups, merge=True):
        """One group over every row only: per-sample bit-widths would split the recurrence's batch."""
        if len(groups) != 1 or groups[0].rows != slice(None):
            raise EdgetrainError(f"layer '{self.node.name}' ({self.node.op_type}): sample groups at several "
                                 "precisions are not supported for LSTM/GRU")
        return self.forward(inputs, run)


class QuantLSTM(QuantRecurrent, LSTM):
    """LSTM with integer gate products."""


class QuantGRU(QuantRecurrent, GRU):
    """GRU with integer gate products."""


QUANT_RECURRENT = {"LSTM": QuantLSTM, "GRU": QuantGRU}
