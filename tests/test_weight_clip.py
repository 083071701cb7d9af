"""Clipped weight ranges (`clip_weight_bits`): each output channel's range of least squared error among fractions of
its largest weight, checked against a brute-force reference built on the quantiser itself; applied only at or below
the set bit-width, in training and eval alike; bit-identical on any thread count."""
import math

import numpy as np
import pytest
from test_grad_ranges import step_bits
from test_integer_paths import KEY, _op

from edgetrain.ops.base import Run
from edgetrain.quant import mac as qops
from edgetrain.quant import quantize
from edgetrain.quant.clip import CLIP_FRACTIONS, clipped_rows


def _reference_rows(w: np.ndarray, bits: int) -> list[float]:
    """Per row, each candidate range's codes from `quantize` itself, dequantised, their squared error summed
    exactly (math.fsum); the first least."""
    out = []
    for row in w.astype(np.float64):
        top = float(np.abs(row).max())
        errors = []
        for f in CLIP_FRACTIONS:
            q = quantize(row.astype(np.float32), bits, signed=True, range=top * f)
            back = q.q.astype(np.float64) * np.float64(q.scale)
            errors.append(math.fsum(((back - row) ** 2).tolist()))
        out.append(top * CLIP_FRACTIONS[int(np.argmin(errors))])
    return out


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


def _conv(bits, clip):
    op = _op("Conv", dict(pads=[1, 1, 1, 1]), qops.QuantConv, bits=bits, unsigned=True)
    op.runtime.clip_weight_bits = clip
    return op


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
    op = _conv((8, 4, 8), 4)
    (y,), ctx = op.forward([x, w], Run(True, KEY))
    np.testing.assert_allclose(y, want, rtol=2e-6, atol=1e-5)
    assert ctx.tensor_codes[0].scale == quantize(rows, 4, signed=True, range=ranges.max()).scale
    op.runtime.act_ranges["layer"].value = float(x.max())  # eval quantises x at its running range: the same here
    (y_eval,), _ = op.forward([x, w], Run(False, KEY))
    np.testing.assert_allclose(y_eval, want, rtol=2e-6, atol=1e-5)
    (y_max,), _ = _conv((8, 4, 8), 0).forward([x, w], Run(True, KEY))
    assert not np.allclose(y_max, want, rtol=1e-3)  # the clip mattered


def test_above_the_bits_nothing_changes():
    rng = np.random.default_rng(2)
    x = np.abs(rng.standard_normal((6, 4, 8, 8))).astype(np.float32)
    w = rng.standard_normal((5, 4, 3, 3)).astype(np.float32)
    dy = rng.standard_normal((6, 5, 8, 8)).astype(np.float32)
    outs = []
    for clip in (0, 4):
        op = _conv((8, 8, 8), clip)
        (y,), ctx = op.forward([x, w], Run(True, KEY))
        outs.append([y, *op.backward(ctx, [dy], [True, True])])
    for a, b in zip(*outs):
        np.testing.assert_array_equal(a, b)


def test_clipped_steps_are_bit_identical_on_one_and_two_threads_and_differ_from_unclipped():
    """Static 4/8 (4-bit weights) and gated 4/6, 6/8 candidates alike."""
    for candidates in (None, ("0", "4/6", "6/8")):
        one = step_bits(1, "4/8", candidates, clip_weight_bits=4)
        assert one == step_bits(2, "4/8", candidates, clip_weight_bits=4)
        assert one[0] != step_bits(1, "4/8", candidates, clip_weight_bits=0)[0]


def test_a_copy_of_a_model_and_a_configured_run_keep_the_setting(tmp_path):
    import models
    from edgetrain.data import load_data
    from edgetrain.model import Model
    from edgetrain.onnx_import import Importer
    from edgetrain.train.config import TrainConfig
    from edgetrain.train.trainer import Trainer

    split = load_data("digits", seed=0, val_fraction=0.1)
    model = Model(Importer(models.build_model("lenet5", seed=0), "lenet5").run(), seed=0)
    config = TrainConfig(schedule="static", bits="4/6", clip_weight_bits=4, steps=2, batch_size=8, eval_every=2,
                         checkpoint_every=2, out=str(tmp_path / "run"), data="digits")
    Trainer(model, split, config, export_model=False).fit()
    assert model.runtime.clip_weight_bits == 4 and model.astype(np.float64).runtime.clip_weight_bits == 4
    assert '"clip_weight_bits": 4' in (tmp_path / "run" / "config.json").read_text()
