"""Numba loops for the DFQ gate's full-tensor passes: channel means, per-sample dot products, and the
branch gradient plus the gate's pooled gradient.

Where a ReLU's backward is taken here, `y` (its output) may be that output's mask instead (`relu_join`): only
y > 0 is read, and a bool mask is a quarter of float32's memory traffic.

These are the only parts of a gated unit that touch a whole activation tensor outside the integer
kernels, so they run once per unit per step on every sample. NumPy does each in one or two passes
with temporaries; these do one parallel sweep. Sums accumulate in float64 in a fixed order per row
(edgetrain.kernels.lanes), so results do not depend on the thread count or the machine's vector width.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from edgetrain.kernels.lanes import LANES, dot_row, sum_row, sum_row_into


@njit(cache=True, inline="always")
def row_times(a, i, b, acc) -> None:
    """acc[j] = row i of a @ b: the float64 sum over k in order of a[i, k] * b[k, j], from 0.

    The gate's matrix products are this: every output's sum runs over k in order, so the order is the
    code's on every machine, and the loop over j is independent sums LLVM vectorises without
    reassociating (b's rows are contiguous). Measured against eight interleaved running sums per
    output (a dot product each, then a horizontal add), 32 samples, 1 thread: the gate's forward
    74 -> 45 us, its backward with the parameter sums 103 -> 53 us."""
    m = b.shape[1]
    for j in range(m):
        acc[j] = 0.0
    for k in range(a.shape[1]):
        aik = np.float64(a[i, k])  # float32 x float32 formed in float64: exact
        for j in range(m):
            acc[j] += aik * np.float64(b[k, j])


ROW_BLOCK = 4  # rows of a that rows_times takes at once


@njit(cache=True, inline="always")
def rows_times(a, i0, count, b, acc) -> None:
    """acc[r, j] = row i0 + r of a @ b for r < count (at most ROW_BLOCK): `row_times`' sums, the same order and
    bits, with four rows at once sharing each read of b's row k (measured, one thread, 128 rows: (64 -> 32) 35 ->
    21 us, (32 -> 16) 13 -> 7 us, (16 -> 2) 8 -> 3 us)."""
    if count < ROW_BLOCK:
        for r in range(count):
            row_times(a, i0 + r, b, acc[r])
        return
    m = b.shape[1]
    for j in range(m):
        acc[0, j] = 0.0
        acc[1, j] = 0.0
        acc[2, j] = 0.0
        acc[3, j] = 0.0
    for k in range(a.shape[1]):
        a0, a1 = np.float64(a[i0, k]), np.float64(a[i0 + 1, k])
        a2, a3 = np.float64(a[i0 + 2, k]), np.float64(a[i0 + 3, k])
        for j in range(m):
            bkj = np.float64(b[k, j])
            acc[0, j] += a0 * bkj
            acc[1, j] += a1 * bkj
            acc[2, j] += a2 * bkj
            acc[3, j] += a3 * bkj


@njit(cache=True, parallel=True)
def _row_means(x, out):
    rows, length = x.shape
    for r in prange(rows):
        out[r] = sum_row(x[r], length) / length


@njit(cache=True, parallel=True)
def _row_dots(a, b, out):
    rows, length = a.shape
    for r in prange(rows):
        out[r] = dot_row(a[r], b[r], length)


def channel_means(x: np.ndarray) -> np.ndarray:
    """(N, C, ...) -> (N, C): the mean over every axis after the channel axis; a 2-D input is returned as is."""
    if x.ndim == 2:
        return x
    rows = np.ascontiguousarray(x).reshape(x.shape[0] * x.shape[1], -1)
    out = np.empty(rows.shape[0], x.dtype)
    _row_means(rows, out)
    return out.reshape(x.shape[:2])


def sample_dots(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, ...) x (N, ...) -> (N,): each sample's dot product of a and b."""
    n = a.shape[0]
    out = np.empty(n, np.result_type(a.dtype, b.dtype))
    _row_dots(np.ascontiguousarray(a).reshape(n, -1), np.ascontiguousarray(b).reshape(n, -1), out)
    return out


@njit(cache=True, parallel=True)
def _rows_plus_part(base, part, pos, relu, channels, out, means, mask):
    """One sample per work item, its channels in turn; each row's case (added to or not, ReLU or not) picked
    once, outside its loop, so every loop is branch-free and vectorises (5-15% faster than one loop testing
    both per value, one thread). (Names unlike `sum_row_into`'s: inlined into a parallel loop, a shared name
    once gave wrong results.)"""
    samples, row_len = out.shape[0] // channels, out.shape[1]
    zero = base.dtype.type(0)
    want = means.size > 0
    keep_mask = mask.size > 0
    for s in prange(samples):
        lanes_buf = np.empty(LANES)
        k = pos[s]
        for c in range(channels):
            r = s * channels + c
            brow, orow = base[r], out[r]
            # np.maximum(v, 0), the Relu op's: NaN stays NaN (v <= 0 is false for it), -0.0 becomes 0
            if k >= 0:
                prow = part[k * channels + c]
                if relu:
                    for j in range(row_len):
                        v = brow[j] + prow[j]
                        orow[j] = zero if v <= zero else v
                else:
                    for j in range(row_len):
                        orow[j] = brow[j] + prow[j]
            elif relu:
                for j in range(row_len):
                    v = brow[j]
                    orow[j] = zero if v <= zero else v
            else:
                for j in range(row_len):
                    orow[j] = brow[j]
            if want:  # channel_means of out, while the row is in cache
                means[r] = sum_row_into(lanes_buf, orow, row_len) / row_len
            if keep_mask:  # what the ReLU's backward reads of out (out > 0)
                mrow = mask[r]
                for j in range(row_len):
                    mrow[j] = orow[j] > zero


@njit(cache=True, parallel=True)
def _relu_part_over(x, part, order, channels, means, mask):
    """Written over x, whose values are a ReLU's outputs (>= +0.0 or NaN, so max(x, 0) is x, bit for bit): row
    order[k] becomes max(x + part[k], 0), mask[k] its mask and means its channel means; no other row is read."""
    row_len = x.shape[1]
    zero = x.dtype.type(0)
    for k in prange(order.size):
        lanes_buf = np.empty(LANES)
        s = order[k]
        for c in range(channels):
            r, q = s * channels + c, k * channels + c
            xrow, prow, mrow = x[r], part[q], mask[q]
            for j in range(row_len):
                v = xrow[j] + prow[j]
                xrow[j] = zero if v <= zero else v
            for j in range(row_len):
                mrow[j] = xrow[j] > zero
            means[r] = sum_row_into(lanes_buf, xrow, row_len) / row_len


@njit(cache=True, parallel=True)
def _relu_grad_rows(dout, y, pos, other, g, part, dots, every_row):
    rows, length = dout.shape
    zero = dout.dtype.type(0)
    for r in prange(rows):
        grow, drow, yrow = g[r], dout[r], y[r]
        for j in range(length):
            grow[j] = drow[j] if yrow[j] > zero else zero  # the Relu op's backward (norm_kernels.relu_backward)
        if every_row:  # the rows wanted are g's own (part is unused): no copy
            dots[r] = dot_row(grow, other[r], length)
            continue
        k = pos[r]
        if k >= 0:
            prow = part[k]
            for j in range(length):
                prow[j] = grow[j]
            dots[k] = dot_row(prow, other[k], length)


@njit(cache=True, parallel=True)
def _constants_plus_part(d, size, part, pos, channels, extra, has_extra, out):
    """One sample per work item, each row's case picked outside its loop (as `_rows_plus_part`)."""
    samples, length = out.shape[0] // channels, out.shape[1]
    for s in prange(samples):
        k = pos[s]
        for c in range(channels):
            r = s * channels + c
            v = d[r] / size
            orow = out[r]
            if k >= 0:
                prow = part[k * channels + c]
                if has_extra:
                    erow = extra[r]
                    for j in range(length):
                        orow[j] = (v + prow[j]) + erow[j]
                else:
                    for j in range(length):
                        orow[j] = v + prow[j]
            elif has_extra:
                erow = extra[r]
                for j in range(length):
                    orow[j] = v + erow[j]
            else:
                for j in range(length):
                    orow[j] = v


@njit(cache=True, parallel=True)
def _relu_grad_part(dout, y, order, other, part, dots, y_by_part):
    """part[k] = row order[k] of dout where y > 0 (else 0), dots[k] its dot product with other[k]; y's row is
    order[k], or k with y_by_part."""
    rows, length = part.shape
    zero = dout.dtype.type(0)
    for k in prange(rows):
        r = order[k]
        prow, drow, yrow = part[k], dout[r], y[k] if y_by_part else y[r]
        for j in range(length):
            prow[j] = drow[j] if yrow[j] > zero else zero  # the Relu op's backward (norm_kernels.relu_backward)
        dots[k] = dot_row(prow, other[k], length)


@njit(cache=True, parallel=True)
def _relu_joined(d, size, branch, part, pos, dout, y, channels, out, masked_rest):
    """One sample per work item, each row's case picked outside its loop (as `_rows_plus_part`). A row in the
    part sums as `_constants_plus_part` does with the ReLU's gradient as its extra; a row outside it forms that
    gradient from dout and y here, so no full-size copy of it is ever written (without masked_rest, dout as it
    is: relu_joined_grad says when)."""
    samples, length = out.shape[0] // channels, out.shape[1]
    zero = dout.dtype.type(0)
    for s in prange(samples):
        k = pos[s]
        for c in range(channels):
            r = s * channels + c
            v = d[r] / size
            orow = out[r]
            if k >= 0:
                brow, prow = branch[k * channels + c], part[k * channels + c]
                for j in range(length):
                    orow[j] = (v + brow[j]) + prow[j]
            elif masked_rest:
                drow, yrow = dout[r], y[r]
                for j in range(length):
                    orow[j] = v + (drow[j] if yrow[j] > zero else zero)
            else:
                drow = dout[r]
                for j in range(length):
                    orow[j] = v + drow[j]


@njit(cache=True, parallel=True)
def _relu_joined_over(d, size, branch, part, pos, g, y, channels, masked_rest):
    """`_relu_joined` written over its dout (g): the same sums. A kernel of its own because, handed one array
    as both dout and out, `_relu_joined`'s loops failed LLVM's overlap check and ran scalar (4-10x slower)."""
    samples, length = g.shape[0] // channels, g.shape[1]
    zero = g.dtype.type(0)
    for s in prange(samples):
        k = pos[s]
        for c in range(channels):
            r = s * channels + c
            v = d[r] / size
            grow = g[r]
            if k >= 0:
                brow, prow = branch[k * channels + c], part[k * channels + c]
                for j in range(length):
                    grow[j] = (v + brow[j]) + prow[j]
            elif masked_rest:
                yrow = y[r]
                for j in range(length):
                    grow[j] = v + (grow[j] if yrow[j] > zero else zero)
            else:
                for j in range(length):
                    grow[j] = v + grow[j]


def _positions(order: np.ndarray | None, n: int) -> np.ndarray:
    """Each of n rows' index into the part (-1: not in it); order None: row k is part's row k."""
    if order is None:
        return np.arange(n, dtype=np.int64)
    pos = np.full(n, -1, np.int64)
    pos[order] = np.arange(len(order))
    return pos


def relu_join(base: np.ndarray, part: np.ndarray | None, order: np.ndarray | None,
              means: bool) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """max(base + part at the rows in order, 0), as scatter_add(base, part, order, relu=True): (a new array, its
    channel_means or None, its mask: out > 0, which is all the ReLU's backward reads), in one pass. Over a base
    that is a ReLU's output: relu_join_rows."""
    n = base.shape[0]
    channels = base.shape[1] if base.ndim >= 3 else 1
    dtype = base.dtype if part is None else np.result_type(base.dtype, part.dtype)
    if part is None:
        part, order = np.zeros((1,) + base.shape[1:], dtype), np.zeros(0, np.int64)
    want = means and base.ndim >= 3
    sums = np.empty(n * channels if want else 0, dtype)
    mask = np.empty(base.shape, np.bool_)
    rows_of = (n * channels, -1)
    part_rows = np.ascontiguousarray(part).reshape(part.shape[0] * channels, -1)
    out = np.empty(base.shape, dtype)
    _rows_plus_part(np.ascontiguousarray(base).reshape(rows_of), part_rows, _positions(order, n), True, channels,
                    out.reshape(rows_of), sums, mask.reshape(rows_of))
    return out, (sums.reshape(n, channels) if want else None), mask


def relu_join_rows(base: np.ndarray, part: np.ndarray, order: np.ndarray | None,
                   base_means: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """relu_join(base, part, order, means=True) written over base and touching only the rows in order (None:
    every row): (base, its channel means, the mask of the rows in order, row k for order[k]). base must be a
    ReLU's output, so a row outside order is its own output and is neither read nor written; its means are
    base_means' (channel_means(base), which the means relu_join fuses equal bit for bit)."""
    n = base.shape[0]
    order = np.arange(n, dtype=np.int64) if order is None else np.asarray(order, np.int64)
    if base.dtype != part.dtype or not base.flags.c_contiguous or not base.flags.writeable:
        raise ValueError(f"relu_join_rows: base must be a writeable C-contiguous {part.dtype} array")
    if base.ndim < 3:
        raise ValueError("relu_join_rows: base must have a channel axis and a spatial one")
    channels = base.shape[1]
    means = np.array(base_means, dtype=base.dtype, copy=True, order="C")
    mask = np.empty((len(order),) + base.shape[1:], np.bool_)
    row_len = base[0, 0].size
    _relu_part_over(base.reshape(n * channels, row_len),
                    np.ascontiguousarray(part).reshape(len(order) * channels, row_len), order, channels,
                    means.reshape(-1), mask.reshape(len(order) * channels, row_len))
    return base, means, mask


def scatter_add(base: np.ndarray, part: np.ndarray | None, order: np.ndarray | None = None, relu: bool = False,
                means: bool = False):
    """A new array: base, plus part[k] added to row order[k] (rows not in order are base's; order
    None: every row, in order; part None: no row); with relu, then max(., 0) (NaN stays NaN).
    With means (an input of 3 or more axes), (the array, its channel_means) from the same pass."""
    n = base.shape[0]
    dtype = base.dtype if part is None else np.result_type(base.dtype, part.dtype)
    if part is None:
        part, order = np.zeros((1,) + base.shape[1:], dtype), np.zeros(0, np.int64)
    channels = base.shape[1] if base.ndim >= 3 else 1
    out = np.empty(base.shape, dtype)
    sums = np.empty(n * channels if means else 0, dtype)
    _rows_plus_part(np.ascontiguousarray(base).reshape(n * channels, -1),
                    np.ascontiguousarray(part).reshape(part.shape[0] * channels, -1), _positions(order, n),
                    bool(relu), channels, out.reshape(n * channels, -1), sums, np.zeros((0, 0), np.bool_))
    return (out, sums.reshape(n, channels)) if means else out


def relu_grad_rows(dout: np.ndarray, y: np.ndarray, order: np.ndarray | None,
                   other: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Through a ReLU whose output is y, in one pass: g = dout where y > 0 (else 0), its rows g[order]
    (order None: every row, and g itself), and each of those rows' dot product with the same row of
    `other` (sample_dots; other None: no rows wanted, both None)."""
    n = dout.shape[0]
    g = np.empty(dout.shape, dout.dtype)
    every_row = other is not None and order is None
    if other is None or every_row:
        part, pos = np.zeros((1, 1), dout.dtype), np.full(n, -1, np.int64)
    else:
        part, pos = np.empty((len(order),) + dout.shape[1:], dout.dtype), _positions(order, n)
    rows = 0 if other is None else other.shape[0]
    dots = np.empty(rows, dout.dtype if other is None else np.result_type(dout.dtype, other.dtype))
    _relu_grad_rows(np.ascontiguousarray(dout).reshape(n, -1), np.ascontiguousarray(y).reshape(n, -1), pos,
                    np.ascontiguousarray(other).reshape(rows, -1) if other is not None else part,
                    g.reshape(n, -1), part.reshape(part.shape[0], -1), dots, every_row)
    if other is None:
        return g, None, None
    return g, (g if every_row else part), dots


def pooled_grad_scatter_add(dmeans: np.ndarray, x_shape: tuple, part: np.ndarray | None,
                            order: np.ndarray | None = None, extra: np.ndarray | None = None) -> np.ndarray:
    """A new array of x_shape: the gradient through channel_means of dmeans (N, C), plus part[k] added to
    sample order[k] (order None: every sample, in order; part None: none), plus `extra` (another
    gradient of the same input, of x_shape) when given."""
    dtype = dmeans.dtype if part is None else part.dtype
    if part is None:
        part, order = np.zeros((1,) + tuple(x_shape[1:]), dtype), np.zeros(0, np.int64)
    if len(x_shape) == 2:  # channel_means passed a 2-D input through
        out = scatter_add(dmeans.astype(dtype, copy=False), part, order)
        return out if extra is None else out + extra
    n, c = x_shape[:2]
    out = np.empty(x_shape, dtype)
    rows = out.reshape(n * c, -1)
    more = np.zeros((1, 1), dtype) if extra is None else np.ascontiguousarray(extra, dtype).reshape(n * c, -1)
    _constants_plus_part(np.ascontiguousarray(dmeans, dtype=dtype).reshape(-1), dtype.type(rows.shape[1]),
                         np.ascontiguousarray(part).reshape(part.shape[0] * c, -1), _positions(order, n), c,
                         more, extra is not None, rows)
    return out


def relu_grad_part(dout: np.ndarray, y: np.ndarray, order: np.ndarray | None, other: np.ndarray,
                   y_rows: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Through a ReLU whose output is y, for the rows in order only (None: every row, in order), in one pass:
    part[k] = dout[order[k]] where y > 0 (else 0), and part[k]'s dot product with other[k] (sample_dots).
    y_rows: y holds only those rows, row k for order[k] (relu_join_rows' mask)."""
    n = dout.shape[0]
    order = np.arange(n, dtype=np.int64) if order is None else np.asarray(order, np.int64)
    part = np.empty((len(order),) + dout.shape[1:], dout.dtype)
    dots = np.empty(len(order), np.result_type(dout.dtype, other.dtype))
    _relu_grad_part(np.ascontiguousarray(dout).reshape(n, -1), np.ascontiguousarray(y).reshape(y.shape[0], -1), order,
                    np.ascontiguousarray(other).reshape(len(order), -1), part.reshape(len(order), -1), dots,
                    bool(y_rows))
    return part, dots


def relu_grad_of_rows(dout: np.ndarray, y: np.ndarray, rows: np.ndarray,
                      y_order: np.ndarray | None = None) -> np.ndarray:
    """dout's given rows where y > 0 (else 0): the values `relu_grad_part` writes for them. y_order: y holds only
    these rows of the batch, row k for y_order[k] (relu_join_rows' mask), and every one of `rows` is among them."""
    y_rows = rows if y_order is None else _positions(y_order, dout.shape[0])[rows]
    return np.where(y[y_rows] > 0, dout[rows], dout.dtype.type(0))


def relu_joined_grad(dmeans: np.ndarray, dout: np.ndarray, y: np.ndarray | None, branch: np.ndarray | None,
                     part: np.ndarray | None, order: np.ndarray | None, out: np.ndarray | None = None) -> np.ndarray:
    """The gradient of a unit's input x when its identity shortcut and its branch join under a ReLU of output y
    and its gate read channel_means(x): the pooled gradient of dmeans, plus the ReLU's gradient, plus for the
    rows in order (None: every row, in order) the branch's gradient branch[k]. part is the ReLU's gradient of
    those rows (relu_grad_part; both None: no row ran the branch). Bit-equal to pooled_grad_scatter_add(dmeans,
    x.shape, branch, order, relu_grad_rows(dout, y, ...)[0]). out=dout writes it over dout (`_relu_joined_over`);
    None, into a new array.

    y None: the rows outside order take dout unmasked. That is the same gradient for whoever reads it through
    the ReLU whose output x is, where those rows of y are x's own (relu_join_rows): that ReLU's mask is then
    this one's, and a select by the same mask twice is a select once (GatedUnit.over_input)."""
    n = dout.shape[0]
    c = dout.shape[1]  # rows of one channel; a 2-D x is its own means, so its rows hold one value
    dtype = dout.dtype if branch is None else branch.dtype
    masked_rest = y is not None
    y = np.zeros((n * c, 1), np.bool_) if y is None else y  # not read
    if branch is None:
        branch = part = np.zeros((1,) + dout.shape[1:], dtype)
        order = np.zeros(0, np.int64)
    if out is dout:
        if dout.dtype != dtype or not dout.flags.c_contiguous or not dout.flags.writeable:
            raise ValueError(f"relu_joined_grad: to write over dout, it must be a writeable C-contiguous {dtype} array")
        _relu_joined_over(np.ascontiguousarray(dmeans, dtype=dtype).reshape(-1), dtype.type(dout[0].size // c),
                          np.ascontiguousarray(branch).reshape(branch.shape[0] * c, -1),
                          np.ascontiguousarray(part).reshape(part.shape[0] * c, -1), _positions(order, n),
                          dout.reshape(n * c, -1), np.ascontiguousarray(y).reshape(n * c, -1), c, masked_rest)
        return dout
    if out is not None:
        raise ValueError("relu_joined_grad: out is dout itself or None")
    out = np.empty(dout.shape, dtype)
    rows = out.reshape(n * c, -1)
    _relu_joined(np.ascontiguousarray(dmeans, dtype=dtype).reshape(-1), dtype.type(rows.shape[1]),
                 np.ascontiguousarray(branch).reshape(branch.shape[0] * c, -1),
                 np.ascontiguousarray(part).reshape(part.shape[0] * c, -1), _positions(order, n),
                 np.ascontiguousarray(dout).reshape(n * c, -1), np.ascontiguousarray(y).reshape(n * c, -1), c, rows,
                 masked_rest)
    return out


@njit(cache=True)
def _matmul(a, b, out):
    acc = np.empty(b.shape[1])
    for i in range(a.shape[0]):
        row_times(a, i, b, acc)
        for j in range(b.shape[1]):
            out[i, j] = acc[j]


def matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a @ b for the gate's small 2-D operands: float64 sums over k in order (`row_times`), one thread, no BLAS.

    Two reasons not to use BLAS here. Its result depends on the CPU it picks kernels for, and a gate's
    argmax decides which work runs, so a run would not repeat bit for bit on another machine. And
    its worker threads, woken between the integer kernels' parallel loops, fight those for the
    cores: measured on 2 cores, DFQ on the shipped LeNet-5 trained 6.2x slower than static 8/8 with
    BLAS on 2 threads, 1.2x with BLAS on one.
    """
    out = np.empty((a.shape[0], b.shape[1]), np.result_type(a.dtype, b.dtype))
    _matmul(np.ascontiguousarray(a), np.ascontiguousarray(b), out)
    return out
