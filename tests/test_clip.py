"""Clipped ranges (`quant.clip`): for activations (`clip_act_bits`) the range of least squared error among fractions
of a sample's maximum, for weights (`clip_weight_bits`) each output channel's among fractions of its largest weight;
both checked against a brute-force reference built on the quantiser itself, applied only at or below the set
bit-width, and bit-identical on any thread count. Activations clip in training (eval quantises at the running clipped
range), weights in training and eval alike."""
import math

import numpy as np
import pytest
from test_grad_ranges import step_bits
from test_integer_paths import KEY, _op

from edgetrain.ops.base import Run
from edgetrain.quant import mac as qops
from edgetrain.quant import quantize
from edgetrain.quant.clip import CLIP_FRACTIONS, CLIP_SAMPLE, clipped_range, clipped_rows, sample_values

SETTINGS = ("clip_act_bits", "clip_weight_bits")


# -- activations ------------------------------------------------------------------------------------------------
def _reference_range(values: np.ndarray, bits: int, signed: bool) -> float:
    """Each candidate range's codes from `quantize` itself, dequantised, their squared error summed exactly
    (math.fsum); the first least."""
    top = float(np.abs(values).max())
    errors = []
    for f in CLIP_FRACTIONS:
        q = quantize(values.astype(np.float32), bits, signed=signed, range=top * f)
        back = q.q.astype(np.float64) * np.float64(q.scale)
        errors.append(math.fsum(((back - values) ** 2).tolist()))
    return top * CLIP_FRACTIONS[int(np.argmin(errors))]


@pytest.mark.parametrize("shape", ["half-normal", "uniform", "heavy-tail", "signed-normal"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_the_chosen_range_is_the_least_error_candidate(shape, bits):
    rng = np.random.default_rng(bits)
    n = 3000
    values = {"half-normal": np.abs(rng.standard_normal(n)), "uniform": rng.uniform(0, 2, n),
              "heavy-tail": np.abs(rng.standard_cauchy(n)), "signed-normal": rng.standard_normal(n)}[shape]
    values = values.astype(np.float32).astype(np.float64)  # activations are float32
    signed = shape == "signed-normal"
    assert clipped_range(values, bits, signed=signed) == pytest.approx(_reference_range(values, bits, signed),
                                                                        rel=1e-12)


def test_low_bits_clip_a_half_normal_and_eight_bits_keep_its_maximum():
    values = np.abs(np.random.default_rng(0).standard_normal(CLIP_SAMPLE))
    top = values.max()
    assert clipped_range(values, 3, signed=False) < 0.8 * top  # near 2.5-3 sigma, where the max is near 4
    assert clipped_range(values, 8, signed=False) == top


def test_no_range_for_zeros_nan_or_nothing():
    assert clipped_range(np.zeros(10), 4, signed=False) is None
    assert clipped_range(np.array([1.0, np.nan]), 4, signed=False) is None
    assert clipped_range(np.zeros(0), 4, signed=False) is None


def test_the_sample_is_fixed_spread_and_bounded():
    x = np.arange(64 * 16 * 32 * 32, dtype=np.float32).reshape(64, 16, 32, 32)
    v = sample_values(x)
    assert v.size <= CLIP_SAMPLE + 1 and np.array_equal(v, sample_values(x))
    assert len(np.unique(v // x[0].size)) == 8  # 8 samples of the batch, first and last included
    assert v.min() == 0 and v.max() >= x[63].min()
    assert len(np.unique(v % 32)) == 32  # every column, not one pixel position again and again
    rows = np.array([5, 9, 2])
    np.testing.assert_array_equal(sample_values(x, rows), sample_values(x[rows]))


def _conv(bits, clip, setting="clip_act_bits"):
    op = _op("Conv", dict(pads=[1, 1, 1, 1]), qops.QuantConv, bits=bits, unsigned=True)
    setattr(op.runtime, setting, clip)
    return op


def test_a_conv_at_or_below_the_bits_quantises_to_the_clipped_range_and_eval_uses_it():
    rng = np.random.default_rng(1)
    x = np.abs(rng.standard_normal((16, 4, 8, 8))).astype(np.float32)
    w = rng.standard_normal((5, 4, 3, 3)).astype(np.float32)
    op = _conv((4, 4, 8), 4)
    (_,), ctx = op.forward([x, w], Run(True, KEY))
    want = clipped_range(sample_values(x), 4, signed=False)
    assert want < float(x.max())
    assert ctx.inputs[0].scale == quantize(x, 4, signed=False, range=want).scale
    assert op.runtime.saturated["layer"] > 0  # the clip is counted, never silent
    assert op.runtime.act_ranges["layer"].value == want  # eval quantises at the clipped range
    (y_eval,), _ = op.forward([x, w], Run(False, KEY))
    ref = _conv((4, 4, 8), 0)
    ref.runtime.act_ranges["layer"] = op.runtime.act_ranges["layer"]
    np.testing.assert_array_equal(y_eval, ref.forward([x, w], Run(False, KEY))[0][0])



# -- weights ----------------------------------------------------------------------------------------------------
def _reference_rows(w: np.ndarray, bits: int) -> list[float]:
    """Each row's signed reference range: a row of weights is searched as a sample of values is."""
    return [_reference_range(row, bits, True) for row in w.astype(np.float64)]


@pytest.mark.parametrize("shape", ["normal", "uniform", "heavy-tail", "one-outlier"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_each_row_takes_its_least_error_candidate(shape, bits):
    rng = np.random.default_rng(bits)
    rows, k = 12, 72
    w = {"normal": rng.standard_normal((rows, k)), "uniform": rng.uniform(-1, 1, (rows, k)),
         "heavy-tail": rng.standard_cauchy((rows, k)),
         "one-outlier": np.concatenate([rng.standard_normal((rows, k - 1)) * 0.1, np.full((rows, 1), 2.0)], 1)}[shape]
    w = w.astype(np.float32)
    np.testing.assert_allclose(clipped_rows(w, bits), _reference_rows(w, bits), rtol=1e-12)


def test_four_bits_clip_a_normal_row_and_eight_bits_keep_its_maximum():
    w = np.random.default_rng(0).standard_normal((4, 576)).astype(np.float32)
    top = np.abs(w).max(axis=1)
    assert (clipped_rows(w, 4) < 0.9 * top).all()
    np.testing.assert_array_equal(clipped_rows(w, 8), top)


def test_zero_rows_take_any_range_and_nan_takes_none():
    w = np.zeros((3, 5), np.float32)
    w[1] = [1, -2, 0.5, 0, 0]
    ranges = clipped_rows(w, 4)
    assert ranges[0] == ranges[2] == 1.0 and ranges[1] > 0
    w[2, 3] = np.nan
    assert clipped_rows(w, 4) is None


def _float_conv(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """A plain float64 3x3 conv with padding 1 (the reference)."""
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)))
    win = np.lib.stride_tricks.sliding_window_view(xp, (3, 3), axis=(2, 3))  # (n, c, h, w, 3, 3)
    return np.einsum("nchwij,mcij->nmhw", win, w.astype(np.float64))


def test_a_conv_at_or_below_the_bits_computes_with_each_channel_s_clipped_weights():
    """Forward, in training and eval: the product of the input's codes and the weights quantised per output channel
    at the clipped ranges (float64 reference); the backward's per-tensor weight codes take the widest of them."""
    rng = np.random.default_rng(1)
    x = np.abs(rng.standard_normal((4, 8, 6, 6))).astype(np.float32)
    w = rng.standard_normal((5, 8, 3, 3)).astype(np.float32)
    rows = w.reshape(5, -1)
    ranges = clipped_rows(rows, 4)
    assert (ranges < np.abs(rows).max(axis=1)).sum() == 1  # of 72 normal weights, one channel's largest is far out
    xq = quantize(x, 8, signed=False)
    wq = quantize(rows, 4, signed=True, axis=0, range=ranges)
    want = _float_conv(xq.q * np.float64(xq.scale), (wq.q * wq.scale.astype(np.float64)[:, None]).reshape(w.shape))
    op = _conv((8, 4, 8), 4, "clip_weight_bits")
    (y,), ctx = op.forward([x, w], Run(True, KEY))
    np.testing.assert_allclose(y, want, rtol=2e-6, atol=1e-5)
    assert ctx.tensor_codes[0].scale == quantize(rows, 4, signed=True, range=ranges.max()).scale
    op.runtime.act_ranges["layer"].value = float(x.max())  # eval quantises x at its running range: the same here
    (y_eval,), _ = op.forward([x, w], Run(False, KEY))
    np.testing.assert_allclose(y_eval, want, rtol=2e-6, atol=1e-5)
    (y_max,), _ = _conv((8, 4, 8), 0, "clip_weight_bits").forward([x, w], Run(True, KEY))
    assert not np.allclose(y_max, want, rtol=1e-3)  # the clip mattered



# -- both -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("setting", SETTINGS)
def test_above_the_bits_nothing_changes(setting):
    rng = np.random.default_rng(2)
    x = np.abs(rng.standard_normal((6, 4, 8, 8))).astype(np.float32)
    w = rng.standard_normal((5, 4, 3, 3)).astype(np.float32)
    dy = rng.standard_normal((6, 5, 8, 8)).astype(np.float32)
    outs = []
    for clip in (0, 4):
        op = _conv((8, 8, 8), clip, setting)
        (y,), ctx = op.forward([x, w], Run(True, KEY))
        outs.append([y, *op.backward(ctx, [dy], [True, True])])
    for a, b in zip(*outs):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("setting, candidates", [("clip_act_bits", None), ("clip_weight_bits", None),
                                                 ("clip_weight_bits", ("0", "4/6", "6/8"))])
def test_clipped_steps_are_bit_identical_on_one_and_two_threads_and_differ_from_unclipped(setting, candidates):
    """Static 4/8 (4-bit weights; the activations through BatchNorms that would otherwise hand the convs codes of
    the batch's range) and gated 4/6, 6/8 candidates."""
    one = step_bits(1, "4/8", candidates, **{setting: 4})
    assert one == step_bits(2, "4/8", candidates, **{setting: 4})
    assert one[0] != step_bits(1, "4/8", candidates, **{setting: 0})[0]


@pytest.mark.parametrize("setting", SETTINGS)
def test_a_copy_of_a_model_and_a_configured_run_keep_the_setting(tmp_path, setting):
    import models
    from edgetrain.data import load_data
    from edgetrain.model import Model
    from edgetrain.onnx_import import Importer
    from edgetrain.train.config import TrainConfig
    from edgetrain.train.trainer import Trainer

    split = load_data("digits", seed=0, val_fraction=0.1)
    model = Model(Importer(models.build_model("lenet5", seed=0), "lenet5").run(), seed=0)
    config = TrainConfig(schedule="static", bits="4/6", steps=2, batch_size=8, eval_every=2, checkpoint_every=2,
                         out=str(tmp_path / "run"), data="digits", **{setting: 4})
    Trainer(model, split, config, export_model=False).fit()
    assert getattr(model.runtime, setting) == 4 and getattr(model.astype(np.float64).runtime, setting) == 4
    assert f'"{setting}": 4' in (tmp_path / "run" / "config.json").read_text()
