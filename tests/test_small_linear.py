"""The small-Linear path (`quant.small_linear`): every float it returns is bit-identical to the general
integer path's (`QuantLinear` with the path refused), forward and backward, with detfloat on and off; its
float32 products are the exact integer products up to the bound `fits` admits, against a plain NumPy int64
reference on worst-case codes; a model trains bit-identically either way."""
import numpy as np
import pytest

from edgetrain.errors import NonFiniteError
from edgetrain.graph import Node
from edgetrain.kernels import detfloat
from edgetrain.ops.base import OPS, Run
from edgetrain.precision.spec import LayerPrecision
from edgetrain.quant import mac, quantize, small_linear

KEY = (7, 11)


def _linear(bits, unsigned, bias, pow2=False):
    inputs = ["x", "w"] + (["c"] if bias else [])
    float_op = OPS["Gemm"](Node("fc", "Gemm", inputs, ["y"], {"transB": 1}), 17)
    return mac.QuantLinear(float_op, LayerPrecision(*bits), 3, unsigned, mac.QuantRuntime(pow2_scales=pow2))


def _step(op, args, dy, deterministic):
    with detfloat.using(deterministic):
        (y,), ctx = op.forward(args, Run(True, KEY))
        grads = op.backward(ctx, [dy], [True] * len(args))
    return y, grads, ctx


@pytest.mark.parametrize("deterministic", [True, False])
@pytest.mark.parametrize("x_shape,outs,bits,unsigned,bias,pow2", [
    ((8, 400), 120, (8, 8, 8), True, True, False),   # LeNet-5's first hidden layer
    ((8, 120), 84, (8, 8, 8), True, True, True),
    ((5, 33), 10, (6, 4, 8), False, False, False),
    ((2, 3, 17), 9, (8, 8, 6), False, True, False),  # samples spanning rows (a sequence model's Linear)
    ((1, 7), 3, (2, 2, 2), True, True, False),
])
def test_bit_identical_to_the_general_path(monkeypatch, x_shape, outs, bits, unsigned, bias, pow2, deterministic):
    rng = np.random.default_rng(sum(x_shape) + outs)
    x = rng.standard_normal(x_shape).astype(np.float32)
    if unsigned:
        x = np.maximum(x, 0)
    w = (rng.standard_normal((outs, x_shape[-1])) * 0.1).astype(np.float32)
    args = [x, w] + ([rng.standard_normal(outs).astype(np.float32)] if bias else [])
    dy = (rng.standard_normal(x_shape[:-1] + (outs,)) * 1e-2).astype(np.float32)

    small_op = _linear(bits, unsigned, bias, pow2)
    y, grads, ctx = _step(small_op, args, dy, deterministic)
    assert ctx.small is not None, "the case should take the small path"
    monkeypatch.setattr(small_linear, "fits", lambda *a: False)
    general_op = _linear(bits, unsigned, bias, pow2)
    y_ref, grads_ref, ctx_ref = _step(general_op, args, dy, deterministic)
    assert ctx_ref.small is None

    assert y.dtype == y_ref.dtype == np.float32 and y.shape == y_ref.shape
    assert np.array_equal(y, y_ref)
    assert len(grads) == len(grads_ref)
    for got, want in zip(grads, grads_ref):
        assert got.shape == want.shape and np.array_equal(got, want)
    # what the layer records for eval: the running range and the clip counter
    assert small_op.runtime.act_ranges["fc"].value == general_op.runtime.act_ranges["fc"].value
    assert small_op.runtime.saturated == general_op.runtime.saturated


@pytest.mark.parametrize("x_bits,w_bits", [(8, 8), (8, 5), (4, 8)])
def test_products_are_exact_up_to_the_bound(x_bits, w_bits):
    """Worst-case codes (every input at its largest code, weights at both ends of theirs) with the longest
    reduction `fits` admits: the float32 GEMM's sums reach just under 2^24 and must still equal the int64
    reference; one term more and `fits` refuses the layer."""
    x_max, w_max = (1 << x_bits) - 1, 1 << (w_bits - 1)
    bound = (1 << x_bits) * w_max
    inner = (small_linear.EXACT_FLOAT32 - 1) // bound
    assert small_linear.fits(4, inner, 3, x_bits, w_bits, 8, np.float32)
    assert not small_linear.fits(4, inner + 1, 3, x_bits, w_bits, 8, np.float32)
    rng = np.random.default_rng(x_bits * 10 + w_bits)
    x = np.full((4, inner), 3.0, np.float32)
    x[1] = rng.uniform(0, 3, inner).astype(np.float32)
    w = np.full((3, inner), -1.0, np.float32)  # per row: every code at -w_max ...
    w[1] = 1.0  # ... at +qmax ...
    w[2] = rng.uniform(-1, 1, inner).astype(np.float32)  # ... and mixed
    y, stats, codes = small_linear.forward(x, w, None, x_bits, False, w_bits, False)
    xq = quantize(x, x_bits, signed=False)
    wq = quantize(w, w_bits, axis=0)
    acc = xq.q.astype(np.int64) @ wq.q.astype(np.int64).T
    assert np.abs(acc).max() >= small_linear.EXACT_FLOAT32 // 2  # the sums do come near the bound
    assert np.abs(acc[0]).max() == inner * x_max * w_max or np.abs(acc[0]).max() == inner * x_max * (w_max - 1)
    expect = acc.astype(np.float32) * (np.float32(xq.scale) * wq.scale.astype(np.float32))
    assert np.array_equal(y, expect)
    assert np.array_equal(codes.x, xq.q.astype(np.float32)) and stats.saturated == 0


def test_fits_refuses_what_the_path_cannot_take():
    assert small_linear.fits(8, 400, 120, 8, 8, 8, np.float32)
    assert not small_linear.fits(8, 400, 120, 8, 8, 8, np.float64)  # float64 models take the general path
    assert not small_linear.fits(128, 784, 512, 8, 8, 8, np.float32)  # large: the tiled integer GEMMs
    assert not small_linear.fits(8, 400, 120, 8, 8, 16, np.float32)  # 16-bit gradient codes overflow 2^24


def test_a_non_finite_input_is_refused_as_the_general_path_refuses_it():
    op = _linear((8, 8, 8), True, True)
    x = np.ones((4, 6), np.float32)
    x[2, 3] = np.nan
    with pytest.raises(NonFiniteError, match="1 NaN or infinite"):
        op.forward([x, np.ones((5, 6), np.float32), np.zeros(5, np.float32)], Run(True, KEY))


def test_training_is_bit_identical_with_and_without_the_path(monkeypatch):
    """LeNet-5 at batch 8 (its two hidden Linears take the path) for a few SGD steps: the same weights."""
    from tools.bench_step import make_edgetrain_step

    def train():
        step, model = make_edgetrain_step("lenet5", 8, (1, 28, 28), "8/8")
        for _ in range(4):
            step()
        return model.state_dict()

    taken = []
    real = small_linear.forward
    with monkeypatch.context() as m:
        m.setattr(small_linear, "forward", lambda *a: taken.append(1) or real(*a))
        fast = train()
    assert len(taken) == 8  # two layers, four steps
    with monkeypatch.context() as m:
        m.setattr(small_linear, "fits", lambda *a: False)
        slow = train()
    assert fast.keys() == slow.keys()
    assert [k for k in fast if not np.array_equal(fast[k], slow[k])] == []
