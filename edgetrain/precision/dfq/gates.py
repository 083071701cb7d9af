"""DFQ's gates: the small float network that picks each sample's precision for each gated unit.

Per unit j (a residual block, or a single layer in a model without blocks), from the unit's input x:

    p  = global average pool of x                      (N, C)
    z  = relu(p W1^T + b1)                             (N, 32)   a 1x1 conv C -> 32
    e  = z W2^T + b2                                   (N, 16)   a 1x1 conv 32 -> 16
    h, c = LSTM step(e; h, c)                          (N, 16)   one cell shared by every unit;
                                                                 state carried unit to unit, reset per forward
    logits = h Wo^T + bo                               (N, K)    shared head over the K candidates
    choice = argmax(logits); the STE passes dL/d(one-hot) through softmax(logits)

Everything here is float and has a hand-written backward, checked against finite differences in the
tests. `gate_forward_arrays` and `gate_backward_arrays` state the computation in NumPy; `gate_forward`
and `gate_backward` run it as compiled loops (gate_kernels.py) with the same bits, while deterministic
float is on, which it is whenever integer layers train.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgetrain.kernels import detfloat
from edgetrain.kernels.threads import threads_for
from edgetrain.precision.dfq.gate_kernels import gate_backward_rows, gate_forward_rows, sample_sums
from edgetrain.precision.dfq.kernels import ROW_BLOCK, channel_means  # mm, not BLAS: kernels.matmul says why
from edgetrain.precision.dfq.kernels import matmul as mm

EMBED_HIDDEN = 32  # the first 1x1 conv's width (FracTrain: C -> 32)
EMBED_WIDTH = 16  # the second 1x1 conv's width, and the LSTM's input and hidden size
# Below this many multiply-adds a gate's compiled loops run on one thread (a gate at batch 128 is about
# 600,000; a parallel launch costs tens of microseconds, a gate at batch 8 a few microseconds in all).
GATE_PARALLEL_MIN = 1 << 16
PREFIX = "dfq."  # every gate parameter's name starts with this


def unit_param_names(index: int) -> tuple[str, str, str, str]:
    """Names of unit `index`'s own embedding parameters (W1, b1, W2, b2)."""
    base = f"{PREFIX}unit{index}."
    return base + "embed1.weight", base + "embed1.bias", base + "embed2.weight", base + "embed2.bias"


SHARED_NAMES = (PREFIX + "lstm.weight_ih", PREFIX + "lstm.weight_hh", PREFIX + "lstm.bias",
                PREFIX + "head.weight", PREFIX + "head.bias")


def _uniform(rng: np.random.Generator, shape: tuple, fan_in: int, dtype) -> np.ndarray:
    # PyTorch's default for Linear/Conv/LSTM: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    bound = 1.0 / np.sqrt(fan_in)
    return rng.uniform(-bound, bound, size=shape).astype(dtype)


def init_gate_params(channels: list[int], candidates: int, seed: int, initial_choice: int, initial_logit: float,
                     dtype=np.float32) -> dict[str, np.ndarray]:
    """Fresh gate parameters for units with these input channel counts; the head's bias starts
    `initial_logit` higher on candidate `initial_choice`, so training starts from a known mix."""
    rng = np.random.default_rng([seed, 0xDF0])
    params: dict[str, np.ndarray] = {}
    for j, c in enumerate(channels):
        w1, b1, w2, b2 = unit_param_names(j)
        params[w1] = _uniform(rng, (EMBED_HIDDEN, c), c, dtype)
        params[b1] = _uniform(rng, (EMBED_HIDDEN,), c, dtype)
        params[w2] = _uniform(rng, (EMBED_WIDTH, EMBED_HIDDEN), EMBED_HIDDEN, dtype)
        params[b2] = _uniform(rng, (EMBED_WIDTH,), EMBED_HIDDEN, dtype)
    wih, whh, b, wo, bo = SHARED_NAMES
    params[wih] = _uniform(rng, (4 * EMBED_WIDTH, EMBED_WIDTH), EMBED_WIDTH, dtype)
    params[whh] = _uniform(rng, (4 * EMBED_WIDTH, EMBED_WIDTH), EMBED_WIDTH, dtype)
    params[b] = _uniform(rng, (4 * EMBED_WIDTH,), EMBED_WIDTH, dtype)
    params[wo] = _uniform(rng, (candidates, EMBED_WIDTH), EMBED_WIDTH, dtype)
    bias = _uniform(rng, (candidates,), EMBED_WIDTH, dtype)
    bias[initial_choice] += initial_logit
    params[bo] = bias
    return params


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + detfloat.op_tanh(0.5 * x))  # no overflow for large |x|


def softmax(z: np.ndarray) -> np.ndarray:
    """Row-wise softmax."""
    if detfloat.active():
        return detfloat.softmax(z, axis=1)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@dataclass
class GateContext:
    """What one unit's gate forward keeps for its backward."""

    pooled: np.ndarray
    a1: np.ndarray
    z1: np.ndarray
    e: np.ndarray
    h_prev: np.ndarray
    c_prev: np.ndarray
    i: np.ndarray
    f: np.ndarray
    g: np.ndarray
    o: np.ndarray
    c: np.ndarray
    tanh_c: np.ndarray
    h: np.ndarray
    probs: np.ndarray
    x_shape: tuple


def logit_mask(allowed, candidates: int) -> np.ndarray | None:
    """What gate_forward adds to the logits: -inf on candidates not in `allowed`; None when all are."""
    if len(allowed) == candidates:
        return None
    mask = np.full(candidates, -np.inf, np.float32)
    mask[list(allowed)] = 0.0
    return mask


def _compiled_dtype(arrays) -> np.dtype | None:
    """The one float dtype every array has (the compiled loops' case), else None."""
    dtype = arrays[0].dtype
    if dtype not in (np.float32, np.float64) or any(a.dtype != dtype for a in arrays):
        return None
    return dtype


def gate_forward(x: np.ndarray, unit: tuple[np.ndarray, ...], shared: tuple[np.ndarray, ...],
                 h_prev: np.ndarray, c_prev: np.ndarray, mask: np.ndarray | None = None,
                 pooled: np.ndarray | None = None) -> tuple[np.ndarray, GateContext]:
    """Logits (N, K) of one unit's gate, plus `mask` (logit_mask) so masked candidates have probability 0;
    the context carries the new LSTM state (ctx.h, ctx.c). `pooled`: channel_means(x), when the caller
    already has it. Compiled; the bits of `gate_forward_arrays` with deterministic float on."""
    p = np.ascontiguousarray(channel_means(x) if pooled is None else pooled)
    unit = tuple(np.ascontiguousarray(a) for a in unit)
    shared = tuple(np.ascontiguousarray(a) for a in shared)
    h_prev, c_prev = np.ascontiguousarray(h_prev), np.ascontiguousarray(c_prev)
    dtype = _compiled_dtype((p,) + unit + shared + (h_prev, c_prev))
    if dtype is None:  # mixed dtypes: the array form's promotions
        return gate_forward_arrays(x, unit, shared, h_prev, c_prev, mask)
    w1, wo = unit[0], shared[3]
    n, width, k_count = p.shape[0], h_prev.shape[1], wo.shape[0]
    a1, z1 = np.empty((n, w1.shape[0]), dtype), np.empty((n, w1.shape[0]), dtype)
    e, i, f, g, o, c, tanh_c, h = (np.empty((n, width), dtype) for _ in range(8))
    logits, probs = np.empty((n, k_count), dtype), np.empty((n, k_count), dtype)
    m = np.zeros(0, dtype) if mask is None else np.ascontiguousarray(mask, dtype)
    t_in, t_out = np.empty(n * 4 * width), np.empty(n * 4 * width)
    scratch = np.empty((-(-n // ROW_BLOCK), detfloat.TANH_SCRATCH_ROWS, ROW_BLOCK * 4 * width))
    with threads_for(n * (w1.size + 9 * width * width + k_count * width), GATE_PARALLEL_MIN):
        gate_forward_rows(p, *unit, *shared, m, h_prev, c_prev, dtype.type(1), dtype.type(0.5),
                          a1, z1, e, i, f, g, o, c, tanh_c, h, logits, probs, t_in, t_out, scratch)
    return logits, GateContext(p, a1, z1, e, h_prev, c_prev, i, f, g, o, c, tanh_c, h, probs, x.shape)


def gate_forward_arrays(x: np.ndarray, unit: tuple[np.ndarray, ...], shared: tuple[np.ndarray, ...],
                        h_prev: np.ndarray, c_prev: np.ndarray,
                        mask: np.ndarray | None = None) -> tuple[np.ndarray, GateContext]:
    """`gate_forward` in NumPy: the statement of the computation, and the compiled loops' reference."""
    w1, b1, w2, b2 = unit
    wih, whh, b, wo, bo = shared
    p = channel_means(x)
    a1 = mm(p, w1.T) + b1
    z1 = np.maximum(a1, 0)
    e = mm(z1, w2.T) + b2
    pre = mm(e, wih.T) + mm(h_prev, whh.T) + b
    n = EMBED_WIDTH
    i, f, o = _sigmoid(pre[:, :n]), _sigmoid(pre[:, n:2 * n]), _sigmoid(pre[:, 3 * n:])
    g = detfloat.op_tanh(pre[:, 2 * n:3 * n])
    c = f * c_prev + i * g
    tanh_c = detfloat.op_tanh(c)
    h = o * tanh_c
    logits = mm(h, wo.T) + bo
    if mask is not None:
        logits = logits + mask.astype(logits.dtype)
    ctx = GateContext(p, a1, z1, e, h_prev, c_prev, i, f, g, o, c, tanh_c, h, softmax(logits), x.shape)
    return logits, ctx


def gate_backward(ctx: GateContext, dlogits: np.ndarray, dh_next: np.ndarray, dc_next: np.ndarray,
                  unit: tuple[np.ndarray, ...], shared: tuple[np.ndarray, ...]):
    """Gradients of one unit's gate: (d pooled x, unit param grads, shared param grads, dh_prev, dc_prev).

    dh_next and dc_next are dL/d(this unit's h, c) that later units' gates sent back. Compiled; the bits
    of `gate_backward_arrays` with deterministic float on.
    """
    w1, _, w2, _ = (np.ascontiguousarray(a) for a in unit)
    wih, whh, _, wo, _ = (np.ascontiguousarray(a) for a in shared)
    dlogits, dh_next, dc_next = (np.ascontiguousarray(a) for a in (dlogits, dh_next, dc_next))
    acts = (ctx.pooled, ctx.a1, ctx.z1, ctx.e, ctx.h_prev, ctx.c_prev, ctx.i, ctx.f, ctx.g, ctx.o, ctx.tanh_c, ctx.h)
    dtype = _compiled_dtype((dlogits, dh_next, dc_next, w1, w2, wih, whh, wo) + acts)
    if dtype is None:
        return gate_backward_arrays(ctx, dlogits, dh_next, dc_next, unit, shared)
    n, width = dh_next.shape
    dpre = np.empty((n, 4 * width), dtype)
    de, dh_prev, dc_prev = (np.empty((n, width), dtype) for _ in range(3))
    da1, dp = np.empty((n, w1.shape[0]), dtype), np.empty((n, w1.shape[1]), dtype)
    work = n * (w1.size + 9 * width * width + wo.shape[0] * width)
    with threads_for(work, GATE_PARALLEL_MIN):
        gate_backward_rows(dlogits, dh_next, dc_next, w1, w2, wih, whh, wo, ctx.a1, ctx.i, ctx.f, ctx.g, ctx.o,
                           ctx.c_prev, ctx.tanh_c, dtype.type(1), dpre, de, da1, dp, dh_prev, dc_prev)
        weights = tuple(np.empty(w.shape, dtype) for w in (wo, wih, whh, w2, w1))  # dwo, dwih, dwhh, dw2, dw1
        biases = tuple(np.empty(w.shape[0], dtype) for w in weights)  # dbo, db, (db again), db2, db1
        sample_sums((dlogits, dpre, dpre, de, da1), (ctx.h, ctx.e, ctx.h_prev, ctx.z1, ctx.pooled), weights, biases)
    dwo, dwih, dwhh, dw2, dw1 = weights
    dbo, db, _, db2, db1 = biases
    return dp, (dw1, db1, dw2, db2), (dwih, dwhh, db, dwo, dbo), dh_prev, dc_prev


def gate_backward_arrays(ctx: GateContext, dlogits: np.ndarray, dh_next: np.ndarray, dc_next: np.ndarray,
                         unit: tuple[np.ndarray, ...], shared: tuple[np.ndarray, ...]):
    """`gate_backward` in NumPy: the statement of the computation, and the compiled loops' reference."""
    w1, _, w2, _ = unit
    wih, whh, _, wo, _ = shared
    dwo = mm(dlogits.T, ctx.h)
    dbo = detfloat.op_sum(dlogits, 0)
    dh = mm(dlogits, wo) + dh_next
    do = dh * ctx.tanh_c
    dc = dh * ctx.o * (1 - ctx.tanh_c ** 2) + dc_next
    di, df, dg = dc * ctx.g, dc * ctx.c_prev, dc * ctx.i
    dpre = np.concatenate([di * ctx.i * (1 - ctx.i), df * ctx.f * (1 - ctx.f), dg * (1 - ctx.g ** 2),
                           do * ctx.o * (1 - ctx.o)], axis=1)
    dwih = mm(dpre.T, ctx.e)
    dwhh = mm(dpre.T, ctx.h_prev)
    db = detfloat.op_sum(dpre, 0)
    de = mm(dpre, wih)
    dh_prev = mm(dpre, whh)
    dc_prev = dc * ctx.f
    dw2 = mm(de.T, ctx.z1)
    db2 = detfloat.op_sum(de, 0)
    da1 = mm(de, w2) * (ctx.a1 > 0)
    dw1 = mm(da1.T, ctx.pooled)
    db1 = detfloat.op_sum(da1, 0)
    dp = mm(da1, w1)
    return dp, (dw1, db1, dw2, db2), (dwih, dwhh, db, dwo, dbo), dh_prev, dc_prev


def pooled_grad_to_input(dpooled: np.ndarray, x_shape: tuple) -> np.ndarray:
    """dL/dx (a read-only broadcast view) from dL/d(pooled x), as gate_backward returns it."""
    if len(x_shape) == 2:
        return dpooled
    spatial = int(np.prod(x_shape[2:]))
    return np.broadcast_to((dpooled / spatial).reshape(dpooled.shape + (1,) * (len(x_shape) - 2)), x_shape)


def straight_through(probs: np.ndarray, d_onehot: np.ndarray) -> np.ndarray:
    """dL/d(logits) from dL/d(hard one-hot choice): the forward's argmax is taken as its softmax."""
    prod = probs * d_onehot
    if not detfloat.active():
        return probs * (d_onehot - prod.sum(axis=1, keepdims=True))
    # detfloat.sum_ over the few candidates, written out: float64 from 0 in candidate order, rounded once
    # (the same bits without its parallel machinery, which cost 0.1 ms a call on a (128, 2) array)
    total = np.zeros(prod.shape[0])
    for k in range(prod.shape[1]):
        total = total + prod[:, k]
    return probs * (d_onehot - total.astype(prod.dtype)[:, None])
