"""Normalisation of a Split with its training split's per-channel statistics."""

from __future__ import annotations

import dataclasses

import numpy as np

from edgetrain.data.dataset import Dataset, Split
from edgetrain.errors import DataError

# Samples per chunk when summing statistics: bounds the float64 temporaries to a few MB even for
# CIFAR-100's 50,000 images on a board with little memory.
STATS_CHUNK = 1024


def _channel_view(x: np.ndarray) -> np.ndarray:
    """x as (N, C, rest): flat (N, D) vectors are one channel."""
    return x.reshape(x.shape[0], x.shape[1], -1) if x.ndim == 4 else x.reshape(x.shape[0], 1, -1)


def channel_stats(x: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) standard deviation of x, accumulated in float64."""
    if x.shape[0] == 0:
        raise DataError("cannot compute normalisation statistics of an empty training split")
    view = _channel_view(x)
    count = view.shape[0] * view.shape[2]
    total = np.zeros(view.shape[1])
    for start in range(0, view.shape[0], STATS_CHUNK):
        total += view[start:start + STATS_CHUNK].sum(axis=(0, 2), dtype=np.float64)
    mean = total / count
    # Second pass over deviations rather than E[x^2] - E[x]^2, which cancels badly in float64 too.
    squares = np.zeros_like(mean)
    for start in range(0, view.shape[0], STATS_CHUNK):
        dev = view[start:start + STATS_CHUNK].astype(np.float64) - mean[None, :, None]
        squares += np.einsum("ncd,ncd->c", dev, dev)
    std = np.sqrt(squares / count)
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def apply_normalization(dataset: Dataset, mean: tuple[float, ...], std: tuple[float, ...], *,
                        copy: bool = True) -> Dataset:
    """Return dataset with x = (x - mean) / std per channel, and mean/std recorded (copy=False: x in place)."""
    # A constant channel has std 0; dividing by 1 leaves it at zero instead of NaN.
    safe_std = tuple(s if s > 0.0 else 1.0 for s in std)
    shape = (1, len(mean), 1, 1) if dataset.x.ndim == 4 else (1, 1)
    x = dataset.x.copy() if copy else dataset.x
    x -= np.asarray(mean, dtype=np.float32).reshape(shape)
    x /= np.asarray(safe_std, dtype=np.float32).reshape(shape)
    return dataclasses.replace(dataset, x=x, mean=tuple(mean), std=safe_std)


def normalize_split(split: Split, *, copy: bool = True) -> Split:
    """Normalise both splits with the training split's per-channel statistics (copy=False: in place)."""
    mean, std = channel_stats(split.train.x)
    return dataclasses.replace(split, train=apply_normalization(split.train, mean, std, copy=copy),
                               test=apply_normalization(split.test, mean, std, copy=copy))
