"""Split output-gradient ranges (`grad_ranges = "split"`): the weight gradient from codes with a range per output
channel, the error from codes with a range per sample, each exactly what a plain NumPy int64 reference makes of
the same codes; nearer the float gradient than one range per tensor where samples' gradients differ in size."""
import numpy as np
import pytest
from test_integer_paths import KEY, _codes, _conv_grads_ref, _op, _product, _rescale

from edgetrain.ops.base import Run
from edgetrain.precision.spec import GRAD_RANGES
from edgetrain.quant import mac as qops
from edgetrain.quant import quantize


def _split(op):
    op.runtime.grad_ranges = "split"
    return op


def _grad_codes(dy, bits, layer, axis, stream):
    """The codes `_quantize_grad` must make: stochastic, from the layer's stream (or its split error stream)."""
    return quantize(np.ascontiguousarray(dy), bits, rounding="stochastic", axis=axis,
                    key=(*KEY, layer * qops.STREAMS_PER_LAYER + stream * qops.SPLIT_STREAM))


def _row_rescale(acc, row_scales, s_b):
    """Each row of exact integers times its own float32 scale product, formed in float64, stored as float32."""
    scale = np.array([_product(s, s_b) for s in row_scales], np.float32)
    return _rescale(acc, scale.reshape((-1,) + (1,) * (acc.ndim - 1)))


@pytest.mark.parametrize("attrs,geo", [
    (dict(pads=[1, 1, 1, 1]), ((1, 1), (1, 1), (1, 1), (1, 1), 1)),
    (dict(strides=[2, 2], pads=[0, 1, 1, 0], group=2), ((2, 2), (0, 1), (1, 0), (1, 1), 2)),
])
def test_split_conv_gradients_equal_the_int64_reference(attrs, geo):
    strides, pb, pe, dil, group = geo
    rng = np.random.default_rng(3)
    x = np.abs(rng.standard_normal((5, 4, 7, 6))).astype(np.float32)
    w = rng.standard_normal((6, 4 // group, 3, 3)).astype(np.float32)
    op = _split(_op("Conv", attrs, qops.QuantConv, bits=(4, 4, 6), unsigned=True))
    (y,), ctx = op.forward([x, w], Run(True, KEY))
    # samples whose gradients differ by orders of magnitude: what one range per tensor serves badly
    dy = (rng.standard_normal(y.shape) * np.logspace(-3, 0, y.shape[0]).reshape(-1, 1, 1, 1)).astype(np.float32)
    dx, dw = op.backward(ctx, [dy], [True, True])

    xq, vq = _codes(x, 4, signed=False), _codes(w, 4)
    wq = _codes(w, 4, axis=0)
    by_channel, by_sample = _grad_codes(dy, 6, 0, 1, 0), _grad_codes(dy, 6, 0, 0, 1)
    ref_dw, _ = _conv_grads_ref(by_channel.q, xq.q, wq.q, strides, pb, pe, dil, group)
    _, ref_dx = _conv_grads_ref(by_sample.q, xq.q, vq.q, strides, pb, pe, dil, group)
    np.testing.assert_array_equal(dw, _row_rescale(ref_dw, by_channel.scale, xq.scale))
    np.testing.assert_array_equal(dx, _row_rescale(ref_dx, by_sample.scale, vq.scale))


def test_split_conv_sample_groups_each_take_their_own_ranges():
    """DFQ's groups of samples (two precisions, kernel calls merged): each group's error from its own codes."""
    rng = np.random.default_rng(4)
    x = np.abs(rng.standard_normal((6, 3, 5, 5))).astype(np.float32)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    a = _split(_op("Conv", dict(pads=[1, 1, 1, 1]), qops.QuantConv, bits=(4, 4, 6), unsigned=True))
    b = qops.QuantConv(a.float_op, a.precision.__class__(6, 4, 8), 0, True, a.runtime)
    groups = [qops.Group(slice(0, 2), a), qops.Group(slice(2, 6), b)]
    (y,), ctx = a.forward_groups([x, w], Run(True, KEY), groups)
    dy = rng.standard_normal(y.shape).astype(np.float32)
    dx, dw = a.backward(ctx, [dy], [True, True])
    vq = _codes(w, 4)
    ref_dw = np.zeros(w.shape, np.float32)
    for g, bits, xbits in ((slice(0, 2), 6, 4), (slice(2, 6), 8, 6)):
        xq = _codes(x[g], xbits, signed=False)
        by_channel, by_sample = _grad_codes(dy[g], bits, 0, 1, 0), _grad_codes(dy[g], bits, 0, 0, 1)
        part, _ = _conv_grads_ref(by_channel.q, xq.q, _codes(w, 4, axis=0).q, (1, 1), (1, 1), (1, 1), (1, 1), 1)
        _, ref_dx = _conv_grads_ref(by_sample.q, xq.q, vq.q, (1, 1), (1, 1), (1, 1), (1, 1), 1)
        ref_dw = ref_dw + _row_rescale(part, by_channel.scale, xq.scale)
        np.testing.assert_array_equal(dx[g], _row_rescale(ref_dx, by_sample.scale, vq.scale))
    np.testing.assert_array_equal(dw, ref_dw)


@pytest.mark.parametrize("rows", [4, 9])
def test_split_linear_gradients_equal_the_int64_reference(rows):
    rng = np.random.default_rng(rows)
    x = rng.standard_normal((rows, 12)).astype(np.float32)
    w = rng.standard_normal((5, 12)).astype(np.float32)  # Gemm with transB: stored (out, in) as rows
    op = _split(_op("Gemm", dict(transB=1), qops.QuantLinear, bits=(4, 4, 6)))
    (y,), ctx = op.forward([x, w], Run(True, KEY))
    assert ctx.small is None  # the small-product kernel keeps one range per tensor: split never takes it
    dy = (rng.standard_normal(y.shape) * np.logspace(-3, 0, rows).reshape(-1, 1)).astype(np.float32)
    dx, dw = op.backward(ctx, [dy], [True, True])
    xq, vq = _codes(x, 4), _codes(w, 4)
    by_channel, by_sample = _grad_codes(dy, 6, 0, 1, 0), _grad_codes(dy, 6, 0, 0, 1)
    ref_dw = by_channel.q.astype(np.int64).T @ xq.q.astype(np.int64)
    ref_dx = by_sample.q.astype(np.int64) @ vq.q.astype(np.int64)
    np.testing.assert_array_equal(dw, _row_rescale(ref_dw, by_channel.scale, xq.scale))
    np.testing.assert_array_equal(dx, _row_rescale(ref_dx, by_sample.scale, vq.scale))


def test_split_ranges_keep_small_samples_errors_where_one_range_loses_them():
    """The reason for the mode: at 6 bits, a sample whose gradient is 1/1000 of the largest keeps its error to
    to within 10% with its own range, and loses nearly all of it under the batch's one range."""
    rng = np.random.default_rng(5)
    x = np.abs(rng.standard_normal((6, 4, 8, 8))).astype(np.float32)
    w = rng.standard_normal((8, 4, 3, 3)).astype(np.float32)
    dy = (rng.standard_normal((6, 8, 8, 8)) * np.logspace(-3, 0, 6).reshape(-1, 1, 1, 1)).astype(np.float32)
    errors = {}
    for mode in GRAD_RANGES:
        op = _op("Conv", dict(pads=[1, 1, 1, 1]), qops.QuantConv, bits=(8, 8, 6), unsigned=True)
        op.runtime.grad_ranges = mode
        exact = _op("Conv", dict(pads=[1, 1, 1, 1]), qops.QuantConv, bits=(8, 8, 16), unsigned=True)
        (_,), ctx = op.forward([x, w], Run(True, KEY))
        (_,), ref_ctx = exact.forward([x, w], Run(True, KEY))
        dx = op.backward(ctx, [dy], [True, True])[0]
        ref = exact.backward(ref_ctx, [dy], [True, True])[0]
        errors[mode] = np.linalg.norm(dx[0] - ref[0]) / np.linalg.norm(ref[0])
    assert errors["split"] < 0.1 < 0.5 < errors["tensor"], errors


def step_bits(threads: int, precision: str = "8/8", candidates: tuple[str, ...] | None = ("0", "4/6", "6/8"),
              **runtime) -> list[bytes]:
    """The loss and every gradient's bytes of one training step of a small ResNet-8 at `precision` (DFQ on its
    blocks with `candidates`, None: static), `runtime` set on its QuantRuntime, on `threads` threads."""
    import numba

    import edgetrain
    import models
    from edgetrain.precision.dfq.config import DFQConfig
    from edgetrain.precision.dfq.controller import DFQ

    m = edgetrain.load(models.build_model("resnet8", num_classes=10, in_channels=1, input_size=12, width=8, seed=0),
                       seed=0)
    m.set_precision(precision)
    for name, value in runtime.items():
        setattr(m.runtime, name, value)
    if candidates is not None:
        DFQ.attach(m, DFQConfig(candidates=candidates))
    rng = np.random.default_rng(5)
    x, y = rng.standard_normal((24, 1, 12, 12)).astype(np.float32), rng.integers(0, 10, 24)
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        m.step = 3
        loss, g = m.loss_and_grad(x, y)
    finally:
        numba.set_num_threads(before)
    return [np.float64(loss).tobytes()] + [g[k].tobytes() for k in sorted(g)]


def test_split_gated_steps_are_bit_identical_on_one_and_two_threads_and_differ_from_one_range():
    one = step_bits(1, grad_ranges="split")
    assert one == step_bits(2, grad_ranges="split")
    tensor = step_bits(1, grad_ranges="tensor")
    assert one[0] == tensor[0]  # the same forward
    assert one[1:] != tensor[1:]


def test_a_run_configured_with_split_ranges_trains_with_them(tmp_path):
    import models
    from edgetrain.data import load_data
    from edgetrain.model import Model
    from edgetrain.onnx_import import Importer
    from edgetrain.train.config import TrainConfig
    from edgetrain.train.trainer import Trainer

    split = load_data("digits", seed=0, val_fraction=0.1)
    proto = models.build_model("lenet5", seed=0)
    model = Model(Importer(proto, "lenet5").run(), seed=0)
    config = TrainConfig(schedule="static", bits="4/6", grad_ranges="split", steps=2, batch_size=8, eval_every=2,
                         checkpoint_every=2, out=str(tmp_path / "run"), data="digits")
    Trainer(model, split, config, export_model=False).fit()
    assert model.runtime.grad_ranges == "split"
    assert '"grad_ranges": "split"' in (tmp_path / "run" / "config.json").read_text()
