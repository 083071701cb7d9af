"""A BatchNorm with a folded ReLU that writes its integer reader's input codes instead of floats
(`ops.norm.BatchNormalization.codes_for`, `Model._hand_codes_on`): the codes, scale and stats against
`quantize` of the floats the plain forward stores, and whole training runs with and without it, bit for bit."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from seeded_steps import fixed_batch, sgd_steps

import edgetrain
import edgetrain.model
import models
from edgetrain.errors import NonFiniteError
from edgetrain.graph import Node
from edgetrain.ops import norm, norm_kernels
from edgetrain.ops.base import Run
from edgetrain.ops.norm import BatchNormalization
from edgetrain.quant import quantize
from edgetrain.quant.qtensor import Prequantised, qrange


class _Reader:
    """What the BatchNorm asks of the layer it quantises for: the activation bits and the scale form."""

    def __init__(self, bits: int, pow2: bool):
        self.precision = type("P", (), {"act_bits": bits})()
        self.runtime = type("R", (), {"pow2_scales": pow2})()

    def clips_input(self) -> bool:
        """A clipping layer takes floats, not codes of the batch's range (QuantMAC.clips_input): never here."""
        return False


def _bn(cap: float, reader=None) -> BatchNormalization:
    node = Node("bn", "BatchNormalization", ["x", "s", "b", "m", "v"], ["y"], {"epsilon": 1e-5, "momentum": 0.9})
    op = BatchNormalization(node, 17)
    op.parallel, op.relu, op.cap, op.codes_for = True, True, cap, reader
    return op


@settings(max_examples=40, deadline=None)
@given(st.sampled_from([np.float32, np.float64]), st.integers(1, 16), st.booleans(), st.sampled_from([np.inf, 6.0]),
       st.integers(1, 4), st.sampled_from([(2, 3), (4, 4), (1, 40), (16, 17)]), st.integers(0, 2 ** 31 - 1))
def test_codes_equal_the_quantised_floats(dtype, bits, pow2, cap, channels, plane, seed):
    """Codes, scale, stats and running statistics equal those of the plain forward's floats quantised by
    `quantize` (negative scales included, so y falls as x rises in some channels); the stand-in's floats
    are the plain forward's, bit for bit."""
    rng = np.random.default_rng(seed)
    n = -(-norm.PARALLEL_MIN_VALUES // (channels * plane[0] * plane[1]))  # the hand-over's smallest size on
    default, norm.CODES_MIN_PLANE = norm.CODES_MIN_PLANE, 1  # small planes too: short rows and tails
    try:
        _check_codes(dtype, bits, pow2, cap, channels, plane, rng, n)
    finally:
        norm.CODES_MIN_PLANE = default


def _check_codes(dtype, bits, pow2, cap, channels, plane, rng, n):
    x = (rng.standard_normal((n, channels) + plane) * rng.uniform(0.1, 30)).astype(dtype)
    inputs = [x, rng.uniform(-2, 2, channels).astype(dtype), rng.uniform(-1, 1, channels).astype(dtype),
              np.zeros(channels, dtype), np.ones(channels, dtype)]
    fused_out, fused_ctx = _bn(cap, _Reader(bits, pow2)).forward(inputs, Run(True))
    plain_out, plain_ctx = _bn(cap).forward(inputs, Run(True))
    pre, y = fused_out[0], plain_out[0]
    assert isinstance(pre, Prequantised) and pre.shape == y.shape and pre.dtype == y.dtype
    want = quantize(y, bits, signed=False, pow2=pow2)
    assert pre.codes.q.dtype == want.q.dtype and np.array_equal(pre.codes.q, want.q)
    assert pre.codes.scale == want.scale and type(pre.codes.scale) is np.float32
    assert pre.codes.stats == want.stats and not pre.codes.signed and pre.codes.bits == bits
    assert np.array_equal(np.asarray(pre), y) and np.array_equal(np.signbit(np.asarray(pre)), np.signbit(y))
    for a, b in zip(fused_out[1:] + list(fused_ctx[1:3]), plain_out[1:] + list(plain_ctx[1:3])):
        assert np.array_equal(a, b)


def test_a_nan_takes_the_plain_forward():
    """With a NaN in x the BatchNorm writes floats as before, so the reader's quantiser reports it."""
    x = np.random.default_rng(0).standard_normal((8, 4, 16, 16)).astype(np.float32)
    x[3, 1, 2, 2] = np.nan
    inputs = [x, np.ones(4, np.float32), np.zeros(4, np.float32), np.zeros(4, np.float32), np.ones(4, np.float32)]
    (y, *_), _ = _bn(np.inf, _Reader(8, False)).forward(inputs, Run(True))
    assert isinstance(y, np.ndarray)
    with pytest.raises(NonFiniteError):
        quantize(y, 8, signed=False)


def _train(name: str, fuse: bool, monkeypatch, pow2: bool = False, **kwargs):
    """Three seeded SGD steps of a small model at 8/8; its state, eval output and how many convs took codes."""
    from edgetrain.quant import mac

    monkeypatch.setattr(edgetrain.model, "FUSE_BN_CODES", fuse)
    monkeypatch.setattr(norm, "CODES_MIN_PLANE", 1)  # these small models' maps are below it
    taken = []
    original = mac.QuantMAC._prequantised_input
    monkeypatch.setattr(mac.QuantMAC, "_prequantised_input",
                        lambda self, *a: taken.append(original(self, *a)) or taken[-1])
    model = edgetrain.load(models.build_model(name, in_channels=1, input_size=12, seed=1, **kwargs), seed=0)
    model.set_precision("8/8", pow2_scales=pow2)
    x, y = fixed_batch()
    sgd_steps(model, x, y)
    return model.state_dict(), model(x), sum(q is not None for q in taken)


@pytest.mark.parametrize("name,kwargs,pow2", [
    ("resnet8", {}, False),
    ("resnet8", {}, True),
    ("mobilenetv2", {"width_mult": 0.35}, False),  # ReLU6: capped codes
])
def test_training_with_codes_handed_on_gives_the_same_bits(monkeypatch, name, kwargs, pow2):
    """Whole training runs with and without the hand-over end on the same weights, BatchNorm statistics and
    eval outputs, bit for bit; and the hand-over did happen (convs took a BatchNorm's codes every step)."""
    fused_state, fused_out, taken = _train(name, True, monkeypatch, pow2, **kwargs)
    plain_state, plain_out, none = _train(name, False, monkeypatch, pow2, **kwargs)
    assert taken >= 3 and none == 0
    assert fused_state.keys() == plain_state.keys()
    for k in fused_state:
        assert np.array_equal(fused_state[k], plain_state[k]), k
    assert np.array_equal(fused_out, plain_out)


def test_gated_blocks_keep_their_floats(monkeypatch):
    """With DFQ attached the blocks' convs run inside gated units (Model.replace_nodes): a BatchNorm hands
    codes on only to a conv the executor still runs itself, and a gated MobileNetV2 trains."""
    from edgetrain.precision.dfq.config import DFQConfig
    from edgetrain.precision.dfq.controller import DFQ

    monkeypatch.setattr(norm, "CODES_MIN_PLANE", 1)
    model = edgetrain.load(models.build_model("mobilenetv2", in_channels=1, input_size=12, seed=1, width_mult=0.35),
                           seed=0)
    model.set_precision("8/8")
    handing = [op for op in model.executor.ops.values() if isinstance(op, BatchNormalization) and op.codes_for]
    DFQ.attach(model, DFQConfig())
    running = {model.executor.ops[n.name] for n in model.executor.graph.nodes}
    after = [op for op in model.executor.ops.values() if isinstance(op, BatchNormalization) and op.codes_for]
    assert handing and len(after) < len(handing) and all(op.codes_for in running for op in after)
    x, y = fixed_batch()
    sgd_steps(model, x, y, steps=1)


def _train_gated(fuse: bool, candidates: tuple[str, ...], monkeypatch):
    """`_train` of a ResNet-8 whose blocks run as DFQ's gated units, every gate forced to the batch's choices
    0, 1, 2, ... in turn (so with three candidates two groups compute in every unit)."""
    from edgetrain.precision.dfq.config import DFQConfig
    from edgetrain.precision.dfq.controller import DFQ
    from edgetrain.quant import mac

    monkeypatch.setattr(edgetrain.model, "FUSE_BN_CODES", fuse)
    monkeypatch.setattr(norm, "CODES_MIN_PLANE", 1)
    taken = []
    original = mac.QuantMAC._prequantised_input
    monkeypatch.setattr(mac.QuantMAC, "_prequantised_input",
                        lambda self, *a: taken.append(original(self, *a)) or taken[-1])
    model = edgetrain.load(models.build_model("resnet8", in_channels=1, input_size=12, seed=1), seed=0)
    model.set_precision("8/8")
    dfq = DFQ.attach(model, DFQConfig(candidates=candidates, weight_bits=8))
    x, y = fixed_batch()
    dfq.force = {u.index: np.arange(len(x)) % len(candidates) for u in dfq.units}
    sgd_steps(model, x, y)
    return model.state_dict(), model(x), sum(q is not None for q in taken)


@pytest.mark.parametrize("candidates", [("0", "8/8"), ("0", "4/8", "8/8")])
def test_gated_units_hand_codes_on_with_the_same_bits(monkeypatch, candidates):
    """Inside DFQ's gated units a BatchNorm hands its conv the codes of the one candidate its executing samples
    chose, and nothing where they chose several (GatedUnit._branch): the same bits either way."""
    fused_state, fused_out, taken = _train_gated(True, candidates, monkeypatch)
    plain_state, plain_out, none = _train_gated(False, candidates, monkeypatch)
    assert none == 0
    # One computing candidate: every unit took codes each step; two: none could.
    assert taken == (3 * 3 if len(candidates) == 2 else 0)
    assert fused_state.keys() == plain_state.keys()
    for k in fused_state:
        assert np.array_equal(fused_state[k], plain_state[k]), k
    assert np.array_equal(fused_out, plain_out)


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 8), st.integers(0, 2 ** 31))
def test_codes_at_near_ties_are_the_divisions(bits, seed):
    """`bn_codes`'s float32 products (`quantizer._nearest_narrow`'s rule) give rint(y / scale) of the float64
    division where it matters: fed only values whose product lies near a half-integer but not on it (with
    mean 0, a = 1, b = 0 the stored y is x itself), under 32 scales."""
    from edgetrain.quant.quantizer import NARROW_BLOCK, NARROW_NEAR_HALF, NEAR_HALF

    rng = np.random.default_rng(seed)
    qmax = qrange(bits, False)[1]
    k = np.arange(0, qmax).astype(np.float64)
    for s in (rng.uniform(1, 10, 32) * 10.0 ** rng.integers(-4, 3, 32)).astype(np.float32):
        ties = ((k + 0.5) * float(s)).astype(np.float32)
        x = np.concatenate([ties, *(np.nextafter(ties, np.float32(d)) for d in (-np.inf, np.inf))])
        v = x * np.float32(1.0 / np.float64(s))
        gap = np.float32(0.5) - np.abs(v - np.rint(v))
        x = x[(gap > 0) & (gap <= 2.0 ** -13) & (x.astype(np.float64) / float(s) <= qmax)]
        x = np.concatenate([x, (rng.uniform(0, qmax, 64) * float(s)).astype(np.float32)]).reshape(1, 1, -1)
        codes = np.empty(x.shape, np.uint8)
        norm_kernels.bn_codes(x, np.zeros(1), np.ones(1), np.zeros(1), np.inf, s, qmax, codes, NEAR_HALF,
                              np.float32(NARROW_NEAR_HALF), NARROW_BLOCK)
        want = np.clip(np.rint(x.astype(np.float64) / np.float64(s)), 0, qmax)
        assert np.array_equal(codes.astype(np.int64), want.astype(np.int64))
