"""Exact products of many small integer matrices (attention's Q K^T and A V per sample and head).

One backend GEMM call per matrix costs more in dispatch than in arithmetic when the matrices are as
small as attention's (tokens x head width). This kernel takes the whole batch in one Numba call:
every output element is one int64 sum in a fixed order (exact for any operands up to 16 bits and
reductions below 2^33 terms, and the same bits for any thread count).
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from edgetrain.kernels.threads import threads_for


@njit(parallel=True, cache=True)
def _bmm_nt(a, bt, out):
    batch, m, k = a.shape
    n = bt.shape[1]
    for row in prange(batch * m):
        p = row // m
        i = row % m
        for j in range(n):
            acc = np.int64(0)
            for t in range(k):
                acc += np.int64(a[p, i, t]) * np.int64(bt[p, j, t])
            out[p, i, j] = acc


def batched_gemm_nt_small(a: np.ndarray, bt: np.ndarray) -> np.ndarray:
    """out[p] = a[p] @ bt[p]^T in int64, for a (P, M, K) and bt (P, N, K) integer arrays."""
    a, bt = np.ascontiguousarray(a), np.ascontiguousarray(bt)
    out = np.empty((a.shape[0], a.shape[1], bt.shape[1]), np.int64)
    with threads_for(a.size * bt.shape[1]):
        _bmm_nt(a, bt, out)
    return out
