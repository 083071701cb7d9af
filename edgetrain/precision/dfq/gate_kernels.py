"""A DFQ gate's forward and backward as compiled loops: the same IEEE operations as gates.py's array form,
in the same order, so the same bits (tests compare the two field by field).

Why: the array form is about 40 NumPy calls a direction on (N, 16) to (N, 64) arrays, and with
deterministic float on, every tanh and sigmoid is a dozen float64 ufunc calls more. Measured on
ResNet-20 at batch 128 (2 threads, 9 gated units): the gates took 14 ms of a 128 ms step, 11 of
them in call overhead, where issue 18 allows the gates and the grouping 5 points of a step together.

Layout of the work: every per-sample quantity (the embedding, the LSTM cell, the head, the softmax;
in backward every gradient with respect to an activation) is one parallel loop over blocks of
`kernels.ROW_BLOCK` samples, each block computed by one thread. Every matrix product is
`kernels.rows_times`, `kernels.row_times`' sums (the order of `kernels.matmul`) four rows at a time: the
forward reads its weights transposed (copied once per call, so their rows are contiguous). The parameter
gradients are sums over samples: each block of weight rows is one thread's `rows_times` of the transposed
activations (as `kernels.matmul(a.T, b)`), so no bit depends on the thread count. A block's tanh values
go through `tanh64_block` together, each value's bits its own. Measured against one sample (or weight row)
per work item, a gate's forward and backward at 128 samples, 16 / 64 channels: on 2 threads 265 -> 192 and
272 -> 226 us, on one 421 -> 273 and 472 -> 313 us; at 32 samples on one thread 113 -> 96 and 138 -> 107 us.

Arithmetic happens in the arrays' own dtype (float32 in training, float64 in gradient checks): the
constants `one` and `half` come in typed, because Numba, like NumPy's array rules, would otherwise
widen a float32 expression with a Python literal to float64, and the array form does not.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from edgetrain.kernels.detfloat import exp64_scalar, tanh64_block
from edgetrain.precision.dfq.kernels import ROW_BLOCK, rows_times


@njit(cache=True, parallel=True)
def gate_forward_rows(p, w1, b1, w2, b2, wih, whh, b, wo, bo, mask, h_prev, c_prev, one, half,
                      a1, z1, e, i, f, g, o, c, tanh_c, h, logits, probs, t_in, t_out, scratch):
    """Fill the gate's activations, logits and probabilities (gates.gate_forward's), ROW_BLOCK samples per work
    item. t_in, t_out: (N * 4 * width,) float64; scratch: (blocks, TANH_SCRATCH_ROWS, ROW_BLOCK * 4 * width)."""
    n_rows, width = h.shape
    hidden = w1.shape[0]
    k_count = wo.shape[0]
    zero = one - one
    span = 4 * width
    w1t, w2t, wiht, whht, wot = (np.ascontiguousarray(w1.T), np.ascontiguousarray(w2.T),
                                 np.ascontiguousarray(wih.T), np.ascontiguousarray(whh.T), np.ascontiguousarray(wo.T))
    for blk in prange((n_rows + ROW_BLOCK - 1) // ROW_BLOCK):
        n0 = blk * ROW_BLOCK
        count = min(ROW_BLOCK, n_rows - n0)
        acc, acc2 = np.empty((ROW_BLOCK, max(span, hidden, k_count))), np.empty((ROW_BLOCK, span))
        rows_times(p, n0, count, w1t, acc)
        for r in range(count):
            n = n0 + r
            for j in range(hidden):
                v = a1.dtype.type(acc[r, j]) + b1[j]
                a1[n, j] = v
                z1[n, j] = v if (v > zero or v != v) else zero
        rows_times(z1, n0, count, w2t, acc)
        for r in range(count):
            for j in range(width):
                e[n0 + r, j] = e.dtype.type(acc[r, j]) + b2[j]
        # The LSTM's four gates: sigmoid(v) = 0.5 (1 + tanh(v / 2)) for i, f, o, tanh(v) for g; every
        # tanh of the block's samples in one pass (tanh64_block: each value's bits its own)
        rows_times(e, n0, count, wiht, acc)
        rows_times(h_prev, n0, count, whht, acc2)
        block_in, block_out = t_in[n0 * span:(n0 + count) * span], t_out[n0 * span:(n0 + count) * span]
        for r in range(count):
            for j in range(span):
                pre = h.dtype.type(acc[r, j]) + h.dtype.type(acc2[r, j])
                pre = pre + b[j]
                block_in[r * span + j] = np.float64(pre) if j // width == 2 else np.float64(half * pre)
        tanh64_block(block_in, block_out, scratch[blk])
        for r in range(count):
            n, row_out = n0 + r, block_out[r * span:(r + 1) * span]
            for j in range(width):
                i[n, j] = half * (one + h.dtype.type(row_out[j]))
                f[n, j] = half * (one + h.dtype.type(row_out[width + j]))
                g[n, j] = h.dtype.type(row_out[2 * width + j])
                o[n, j] = half * (one + h.dtype.type(row_out[3 * width + j]))
        for r in range(count):
            n = n0 + r
            for j in range(width):
                cv = f[n, j] * c_prev[n, j] + i[n, j] * g[n, j]
                c[n, j] = cv
                block_in[r * width + j] = np.float64(cv)
        tanh64_block(block_in[:count * width], block_out[:count * width], scratch[blk])
        for r in range(count):
            n = n0 + r
            for j in range(width):
                tc = h.dtype.type(block_out[r * width + j])
                tanh_c[n, j] = tc
                h[n, j] = o[n, j] * tc
        rows_times(h, n0, count, wot, acc)
        for r in range(count):
            n = n0 + r
            top = -np.inf
            for k in range(k_count):
                lv = logits.dtype.type(acc[r, k]) + bo[k]
                if mask.size:
                    lv = lv + mask[k]
                logits[n, k] = lv
                top = max(top, np.float64(lv))
            total = 0.0
            for k in range(k_count):
                total += exp64_scalar(np.float64(logits[n, k]) - top)
            for k in range(k_count):
                probs[n, k] = exp64_scalar(np.float64(logits[n, k]) - top) / total


@njit(cache=True, parallel=True)
def gate_backward_rows(dlogits, dh_next, dc_next, w1, w2, wih, whh, wo, a1, i, f, g, o, c_prev, tanh_c, one,
                       dpre, de, da1, dp, dh_prev, dc_prev):
    """The per-sample gradients of gates.gate_backward (dL/d of the pre-activations, the embeddings, the
    pooled input and the incoming LSTM state), ROW_BLOCK samples per work item."""
    n_rows, width = dh_next.shape
    hidden, channels = w1.shape
    zero = one - one
    for blk in prange((n_rows + ROW_BLOCK - 1) // ROW_BLOCK):
        n0 = blk * ROW_BLOCK
        count = min(ROW_BLOCK, n_rows - n0)
        acc = np.empty((ROW_BLOCK, max(4 * width, hidden, channels)))
        rows_times(dlogits, n0, count, wo, acc)
        for r in range(count):
            n = n0 + r
            for j in range(width):
                dh = dh_prev.dtype.type(acc[r, j]) + dh_next[n, j]
                do = dh * tanh_c[n, j]
                dc = dh * o[n, j] * (one - tanh_c[n, j] * tanh_c[n, j]) + dc_next[n, j]
                di, df, dg = dc * g[n, j], dc * c_prev[n, j], dc * i[n, j]
                dpre[n, j] = di * i[n, j] * (one - i[n, j])
                dpre[n, width + j] = df * f[n, j] * (one - f[n, j])
                dpre[n, 2 * width + j] = dg * (one - g[n, j] * g[n, j])
                dpre[n, 3 * width + j] = do * o[n, j] * (one - o[n, j])
                dc_prev[n, j] = dc * f[n, j]
        rows_times(dpre, n0, count, wih, acc)
        for r in range(count):
            for j in range(width):
                de[n0 + r, j] = de.dtype.type(acc[r, j])
        rows_times(dpre, n0, count, whh, acc)
        for r in range(count):
            for j in range(width):
                dh_prev[n0 + r, j] = dh_prev.dtype.type(acc[r, j])
        rows_times(de, n0, count, w2, acc)
        for r in range(count):
            n = n0 + r
            for j in range(hidden):
                da1[n, j] = da1.dtype.type(acc[r, j]) * (one if a1[n, j] > zero else zero)
        rows_times(da1, n0, count, w1, acc)
        for r in range(count):
            for j in range(channels):
                dp[n0 + r, j] = dp.dtype.type(acc[r, j])


@njit(cache=True, parallel=True)
def sample_sums(pairs_a, pairs_b, weights, biases):
    """The parameter gradients: weights[m] = pairs_a[m].T @ pairs_b[m] (`row_times` of the transposed
    pairs_a[m], the order of kernels.matmul(a.T, b)), biases[m][r] = the float64 sum over samples of
    pairs_a[m][:, r], for every m."""
    for m in range(len(weights)):
        at, bb = np.ascontiguousarray(pairs_a[m].T), pairs_b[m]
        outs, cols = weights[m].shape
        # weights[m] and biases[m] are written by index: an output array bound to a name by a tuple
        # unpack here was, for biases, not written through inside the prange (Numba 0.68)
        for blk in prange((outs + ROW_BLOCK - 1) // ROW_BLOCK):
            r0 = blk * ROW_BLOCK
            count = min(ROW_BLOCK, outs - r0)
            acc = np.empty((ROW_BLOCK, cols))
            rows_times(at, r0, count, bb, acc)
            for r in range(r0, r0 + count):
                total = 0.0  # detfloat.sum64 over the samples: float64, in order
                for k in range(at.shape[1]):
                    total += at[r, k]
                for q in range(cols):
                    weights[m][r, q] = acc[r - r0, q]
                biases[m][r] = total
