"""Clipped activation ranges (`clip_act_bits`): the range of least squared error among fractions of a sample's
maximum, checked against a brute-force reference built on the quantiser itself; applied only at or below the
set bit-width, in training, with eval quantising at the running clipped range."""
import math

import numpy as np
import pytest
from test_grad_ranges import step_bits
from test_integer_paths import KEY, _op

from edgetrain.ops.base import Run
from edgetrain.quant import mac as qops
from edgetrain.quant import quantize
from edgetrain.quant.clip import CLIP_FRACTIONS, CLIP_SAMPLE, clipped_range, sample_values


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


def _conv(bits, clip):
    op = _op("Conv", dict(pads=[1, 1, 1, 1]), qops.QuantConv, bits=bits, unsigned=True)
    op.runtime.clip_act_bits = clip
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
    """Through BatchNorms that would otherwise hand the convs codes of the batch's range."""
    one = step_bits(1, "4/8", None, clip_act_bits=4)
    assert one == step_bits(2, "4/8", None, clip_act_bits=4)
    assert one[0] != step_bits(1, "4/8", None, clip_act_bits=0)[0]


def test_a_run_configured_with_a_clip_trains_with_it(tmp_path):
    import models
    from edgetrain.data import load_data
    from edgetrain.model import Model
    from edgetrain.onnx_import import Importer
    from edgetrain.train.config import TrainConfig
    from edgetrain.train.trainer import Trainer

    split = load_data("digits", seed=0, val_fraction=0.1)
    model = Model(Importer(models.build_model("lenet5", seed=0), "lenet5").run(), seed=0)
    config = TrainConfig(schedule="static", bits="4/6", clip_act_bits=4, steps=2, batch_size=8, eval_every=2,
                         checkpoint_every=2, out=str(tmp_path / "run"), data="digits")
    Trainer(model, split, config, export_model=False).fit()
    assert model.runtime.clip_act_bits == 4
    assert '"clip_act_bits": 4' in (tmp_path / "run" / "config.json").read_text()
