"""Clipped ranges for low-bit operands: for activations, the fraction of the batch's largest magnitude whose codes
give a sample of the batch the least squared error; for weights, the same search per output channel over all of
its weights (`clipped_rows`).

At 3 or 4 bits a per-tensor range set by the batch's largest value spends most codes on a tail few values
reach: post-ReLU activations of a BatchNorm are roughly half-normal, whose maximum over a batch of 10^5 to
10^6 values lies near 4.5-5 sigma, where the squared error of 4-bit codes is least at a range near 3 sigma
(ACIQ's analysis, Banner et al. 2019). The search below makes no such assumption about the shape: it tries
`CLIP_FRACTIONS` of the sample's maximum and keeps the one whose nearest-rounded codes (the quantiser's
rounding and scale formula) err least in float64, summed in `detfloat`'s fixed order, so the choice is the
same on every CPU and thread count. Values beyond the range saturate (the layer's clip counter counts them)
and pass their gradient straight through, as every other value does (the engine's straight-through
estimator over the activation quantiser).

Cost: up to `CLIP_SAMPLE` values read (evenly spaced samples, then an odd stride so that no pixel or channel
position is favoured) and one (fractions x sample) float64 pass per quantised activation.

Weights at 4 bits per output channel have the same problem where a channel holds a few large weights: 15 codes
spread to its largest weight leave the bulk of them on two or three. `clipped_rows` picks each channel's range the
same way from all of its weights (a ResNet-20 has about 270,000: one (fractions x weights) pass a step, as the
weights change every step), and the clipped weights pass their gradient straight through, as every weight does.
"""
from __future__ import annotations

import numpy as np

from edgetrain.kernels import detfloat
from edgetrain.quant.quantizer import qrange, scale_from_range

CLIP_FRACTIONS = (1.0, 0.85, 0.7, 0.6, 0.5, 0.42, 0.35, 0.28)  # of the sample's largest magnitude; 1.0 first
CLIP_SAMPLE = 4096  # values the error is measured on
CLIP_ROWS = 8  # samples of the batch those values come from, evenly spaced


def sample_values(x: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
    """Up to CLIP_SAMPLE values of x (of its samples `rows`, if given), as float64: a fixed choice of the same
    shape for the same input shape."""
    n = x.shape[0] if rows is None else len(rows)
    pick = np.unique(np.linspace(0, n - 1, min(n, CLIP_ROWS)).round().astype(np.int64))
    sub = x[pick] if rows is None else x[np.asarray(rows)[pick]]
    flat = sub.reshape(-1)
    stride = max(1, flat.size // CLIP_SAMPLE) | 1  # odd: every residue of a power-of-two plane or channel count
    return flat[::stride].astype(np.float64)


def clipped_range(values: np.ndarray, bits: int, *, signed: bool, pow2: bool = False) -> float | None:
    """The range among CLIP_FRACTIONS of max |values| whose codes at `bits` err least on `values`; None when
    values hold no finite nonzero magnitude (the quantiser then decides, and reports NaN or infinity)."""
    top = float(np.abs(values).max()) if values.size else 0.0
    if not (np.isfinite(top) and top > 0.0):  # a NaN or an infinity anywhere makes the max one
        return None
    return float(_least_error(values.reshape(1, -1), np.array([top]), bits, signed, pow2)[0])


def clipped_rows(w_rows: np.ndarray, bits: int, *, pow2: bool = False) -> np.ndarray | None:
    """Per row of w_rows (an output channel's weights), the range among CLIP_FRACTIONS of the row's max |w| whose
    signed codes at `bits` err least on the row, as float64; a row of zeros gets 1.0 (any range codes it
    exactly). None when a weight is NaN or infinite (the quantiser then reports it)."""
    w = np.asarray(w_rows, np.float64).reshape(len(w_rows), -1)
    top = np.abs(w).max(axis=1) if w.size else np.zeros(len(w))
    if not np.isfinite(top).all():
        return None
    return _least_error(w, np.where(top > 0.0, top, 1.0), bits, True, pow2)


def _least_error(rows: np.ndarray, top: np.ndarray, bits: int, signed: bool, pow2: bool) -> np.ndarray:
    """Per row of `rows` (float64), the range among CLIP_FRACTIONS of its `top` whose nearest codes (the quantiser's
    scale formula) err least on the row, the squared errors summed in detfloat's fixed order; ties: the first, the
    widest range."""
    qmin, qmax = qrange(bits, signed)
    ranges = np.array(CLIP_FRACTIONS)[:, None] * top[None, :]  # (fractions, rows)
    scales = scale_from_range(ranges.reshape(-1), bits, signed=signed, pow2=pow2).astype(np.float64)
    scales = scales.reshape(ranges.shape)[:, :, None]
    err = np.clip(np.rint(rows[None] / scales), qmin, qmax) * scales - rows[None]
    totals = detfloat.sum64(err * err, axis=2)
    return ranges[np.argmin(totals, axis=0), np.arange(len(rows))]
