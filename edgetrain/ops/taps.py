"""Sparse per-axis linear maps (interpolation, padding) as a few gathers summed in a fixed order.

A map along one axis is an (out, in) matrix with few nonzeros per row; applying it row by row as gathers is
exact, deterministic (no BLAS, no threads) and cheap. Its adjoint is the same kind of map, built from the
matrix's transpose: a scatter-add written as a gather.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np


class Taps(NamedTuple):
    """A sparse (out, in) matrix by rows: y[o] = sum_t weights[o, t] * x[index[o, t]], t in a fixed order."""

    index: np.ndarray  # (out, taps): a row's nonzero columns, ascending, padded with weight-0 entries
    weights: np.ndarray  # (out, taps)


def taps_of(matrix: np.ndarray) -> Taps:
    """The nonzero entries of each row of a dense matrix, as Taps."""
    nonzero = matrix != 0
    count = max(1, int(nonzero.sum(axis=1).max(initial=0)))
    index = np.argsort(~nonzero, axis=1, kind="stable")[:, :count]
    return Taps(index, np.take_along_axis(matrix, index, axis=1))


def apply_taps(x: np.ndarray, axis: int, taps: Taps) -> np.ndarray:
    """Apply the map along `axis`: a few gathers, summed in the taps' fixed order (no BLAS, no threads)."""
    shape = (1,) * axis + (-1,) + (1,) * (x.ndim - axis - 1)
    w = taps.weights.astype(x.dtype)
    y = np.take(x, taps.index[:, 0], axis=axis) * w[:, 0].reshape(shape)
    for t in range(1, w.shape[1]):
        y += np.take(x, taps.index[:, t], axis=axis) * w[:, t].reshape(shape)
    return y
