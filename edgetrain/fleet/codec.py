"""Compact updates: a client's weight deltas quantised with the engine's own quantiser, and back.

Each tensor's delta is quantised to `bits` (2..16, signed) with one scale per output channel (axis 0 of a
tensor of two or more axes; one scale for a vector or scalar) and seeded stochastic rounding, so the error is
unbiased and below one scale step, and the same seed gives the same bytes. On the wire a tensor NAME is two
arrays: NAME.q (int8 up to 8 bits, int16 above) and NAME.scale (float32). `fp32` sends NAME as float32.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from edgetrain.errors import EdgetrainError
from edgetrain.quant import QTensor, RngKey, quantize, storage_dtype
from edgetrain.quant.qtensor import MAX_BITS, MIN_BITS_SIGNED

FP32 = "fp32"
Q_SUFFIX, SCALE_SUFFIX = ".q", ".scale"
MAX_TENSORS = 1 << 16  # the rounding stream of tensor i is layer (client << 16 | i) of the key


def parse_update_bits(text: str | int) -> int | None:
    """'8' -> 8, 'fp32' -> None (float deltas); refuses widths outside 2..16."""
    if str(text).strip().lower() == FP32:
        return None
    try:
        bits = int(str(text))
    except ValueError:
        bits = -1
    if not MIN_BITS_SIGNED <= bits <= MAX_BITS:
        raise EdgetrainError(f"--update-bits {text!r}: give a width {MIN_BITS_SIGNED}..{MAX_BITS} or {FP32}")
    return bits


def channel_axis(shape: tuple[int, ...]) -> int | None:
    """The axis with one scale per index: output channels (axis 0) of a tensor of two or more axes."""
    return 0 if len(shape) >= 2 else None


def wire_layout(shapes: Mapping[str, tuple[int, ...]], bits: int | None) -> dict[str, tuple[np.dtype, tuple]]:
    """Every array an update of these tensors puts on the wire: name -> (dtype, shape)."""
    out: dict[str, tuple[np.dtype, tuple]] = {}
    for name in sorted(shapes):
        shape = tuple(shapes[name])
        if bits is None:
            out[name] = (np.dtype(np.float32), shape)
            continue
        axis = channel_axis(shape)
        out[name + Q_SUFFIX] = (storage_dtype(bits), shape)
        out[name + SCALE_SUFFIX] = (np.dtype(np.float32), (shape[axis],) if axis is not None else ())
    return out


def payload_bytes(arrays: Mapping[str, np.ndarray]) -> int:
    """Bytes of array data an update carries (the sum of nbytes; the wire adds small per-array headers)."""
    return int(sum(int(a.nbytes) for a in arrays.values()))


def encode(deltas: Mapping[str, np.ndarray], bits: int | None, *, seed: int, round: int,
           client: int) -> dict[str, np.ndarray]:
    """Wire arrays of a client's deltas: float32 for fp32, else NAME.q and NAME.scale per tensor."""
    if len(deltas) > MAX_TENSORS:
        raise EdgetrainError(f"an update of {len(deltas)} tensors is more than {MAX_TENSORS}")
    out: dict[str, np.ndarray] = {}
    for i, name in enumerate(sorted(deltas)):
        d = np.asarray(deltas[name])
        if bits is None:
            out[name] = np.ascontiguousarray(d, dtype=np.float32)
            continue
        # One stream per (run seed, round, client, tensor): replays reproduce the bytes, clients never share.
        key = RngKey(int(seed), int(round), (int(client) << 16) | i)
        qt = quantize(d.astype(np.float32), bits, axis=channel_axis(d.shape), rounding="stochastic", key=key)
        out[name + Q_SUFFIX] = qt.q.reshape(d.shape)  # the quantiser returns a 0-d tensor as shape (1,)
        out[name + SCALE_SUFFIX] = np.asarray(qt.scale, np.float32)
    return out


def decode(arrays: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]],
           bits: int | None) -> dict[str, np.ndarray]:
    """float32 deltas from wire arrays laid out as `wire_layout` says (the caller has checked the layout)."""
    out: dict[str, np.ndarray] = {}
    for name in sorted(shapes):
        if bits is None:
            out[name] = np.asarray(arrays[name], np.float32)
            continue
        q = np.asarray(arrays[name + Q_SUFFIX])
        qt = QTensor(q, np.asarray(arrays[name + SCALE_SUFFIX], np.float32).reshape(-1 if q.ndim >= 2 else ()),
                     bits, True, channel_axis(q.shape))
        out[name] = qt.dequantize()
    return out
