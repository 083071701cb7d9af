"""DFQ's backward share: a unit's MAC layers back-propagate only the samples whose output gradient peaks highest.

A conv's fast form (kernels on the kept rows' codes alone) is checked against the definition (every other row's
gradient set to zero and every row run), exactly; the unit keeps the rows it documents, counts them in the step's
BitOPs, and stays bit-identical on one and two threads."""
import math

import numba
import numpy as np
import pytest

import edgetrain
import models
from edgetrain.errors import EdgetrainError
from edgetrain.ops.base import Run
from edgetrain.precision.dfq.config import DFQConfig
from edgetrain.precision.dfq.controller import DFQ
from edgetrain.quant import quantize
from edgetrain.quant.mac import QuantConv, QuantMAC


def _tiny(config: DFQConfig | None = None):
    m = edgetrain.load(models.build_model("resnet8", num_classes=10, in_channels=1, input_size=12, width=8, seed=0),
                       seed=0)
    m.set_precision("8/8")
    return m, (DFQ.attach(m, config) if config is not None else None)


def _batch(n=16, seed=5):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 1, 12, 12)).astype(np.float32), rng.integers(0, 10, n)


def _inner_conv(m) -> tuple[QuantConv, str]:
    """A 3x3 conv inside a block (not the stem): the kind a gated unit runs."""
    for node in m.graph.nodes:
        op = m.executor.ops.get(node.name)
        if type(op) is QuantConv and not op.subsamples() and node.inputs[0] != m.graph.inputs[0].name:
            return op, node.inputs[1]
    raise AssertionError("no inner conv")


@pytest.mark.parametrize("rows", [[0, 3, 4, 9], [7], list(range(10))[1:], []])
def test_conv_backward_on_kept_rows_equals_zeroing_the_others(rows):
    m, _ = _tiny()
    op, weight = _inner_conv(m)
    w = m.parameters()[weight]
    rng = np.random.default_rng(1)
    x = np.abs(rng.standard_normal((10, w.shape[1], 6, 6))).astype(np.float32)
    (y,), ctx = op.forward([x, w], Run(True, (0, 2)))
    dy = rng.standard_normal(y.shape).astype(np.float32)
    rows = np.array(rows, np.int64)
    keep = np.zeros(len(x), bool)
    keep[rows] = True
    dy[~keep] *= 0.5  # the dropped rows' gradients stay below the kept ones': the same per-tensor scale either way
    # Nearest rounding, so both forms quantise a kept row to the same codes (stochastic rounding draws by position).
    op._quantize_grad = lambda g, key, axis=None, stream=0: quantize(g, op.precision.grad_bits, signed=True, axis=axis)
    fast = op.backward_rows(ctx, [dy], [True, True], rows)
    if not len(rows):
        assert not fast[0].any() and not fast[1].any()
        return
    zeroed = dy.copy()
    zeroed[~keep] = 0
    by_definition = QuantMAC.backward_rows(op, ctx, [dy], [True, True], rows)
    plain = op.backward(ctx, [zeroed], [True, True])
    for a, b, c in zip(fast, by_definition, plain):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)
    assert not fast[0][~keep].any()


def test_kept_rows_are_those_whose_gradient_peaks_highest_and_bitops_count_them():
    x, y = _batch(16)
    m, d = _tiny(DFQConfig(candidates=("0", "8/8"), backward_share=0.4))
    force = np.array([0, 1] * 8)  # half skip: 8 samples compute in every unit
    d.force = {u.index: force for u in d.units}
    m.step = 1
    m.loss_and_grad(x, y)
    kept = math.ceil(0.4 * 8)
    for u in d.units:
        assert d.record.trained[u.index].tolist() == [0, kept]
    plain, dp = _tiny(DFQConfig(candidates=("0", "8/8")))
    dp.force = d.force
    plain.step = 1
    plain.loss_and_grad(x, y)
    assert not dp.record.trained
    for u in d.units:
        for name in u.macs:
            cut, full = m.last_cost[name], plain.last_cost[name]
            assert cut.forward == full.forward
            assert cut.backward_weight == full.backward_weight * kept // 8
            assert cut.backward_data == full.backward_data * kept // 8


def test_rows_chosen_by_peak_gradient(monkeypatch):
    from edgetrain.precision.dfq import gated_unit

    seen = []
    real = gated_unit.GatedUnit._trained_rows

    def spy(self, ctx, dr):
        rows = real(self, ctx, dr)
        seen.append((np.abs(dr.reshape(len(dr), -1)).max(axis=1), rows))
        return rows

    monkeypatch.setattr(gated_unit.GatedUnit, "_trained_rows", spy)
    x, y = _batch(12)
    m, d = _tiny(DFQConfig(candidates=("0", "8/8"), backward_share=0.5))
    d.force = {u.index: 1 for u in d.units}
    m.loss_and_grad(x, y)
    assert seen
    for peaks, rows in seen:
        dropped = np.setdiff1d(np.arange(len(peaks)), rows)
        assert len(rows) == 6 and peaks[rows].min() >= peaks[dropped].max()


def test_share_one_changes_nothing():
    x, y = _batch(16)
    outs = []
    for config in (DFQConfig(candidates=("0", "8/8")), DFQConfig(candidates=("0", "8/8"), backward_share=1.0)):
        m, _ = _tiny(config)
        loss, g = m.loss_and_grad(x, y)
        outs.append([np.float64(loss).tobytes()] + [g[k].tobytes() for k in sorted(g)])
    assert outs[0] == outs[1]


def test_bit_identical_on_one_and_two_threads():
    def step():
        x, y = _batch(24)
        m, d = _tiny(DFQConfig(candidates=("0", "8/8"), backward_share=0.5, min_exec_share=0.5))
        m.step = 3
        loss, g = m.loss_and_grad(x, y)
        return [np.float64(loss).tobytes()] + [g[k].tobytes() for k in sorted(g)]

    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = step()
        numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
        two = step()
    finally:
        numba.set_num_threads(before)
    assert one == two


@pytest.mark.parametrize("share", [0.0, 1.5, float("nan")])
def test_bad_share_is_refused(share):
    with pytest.raises(EdgetrainError, match="backward_share"):
        DFQConfig(backward_share=share)


def test_gates_price_the_backward_at_the_share():
    """In BitOPs a 4/6 candidate with 4-bit weights costs 16 + 24 + 24 per MAC; at share 0.5 its backward halves."""
    _, full = _tiny(DFQConfig(candidates=("0", "4/6")))
    _, half = _tiny(DFQConfig(candidates=("0", "4/6"), backward_share=0.5))
    for u in full.units:
        assert half.unit_cost[u.index][1] == pytest.approx(full.unit_cost[u.index][1] * (16 + 24) / 64)
        assert half.unit_fp32[u.index] == full.unit_fp32[u.index]  # the reference stays fp32's whole step
