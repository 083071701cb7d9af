"""Reply checks before a client's update may join the aggregate: layout, size, finiteness.

Every check reads what the wire says (dtype, shape, byte length) before any array is decoded, so an
oversized or malformed reply costs no decoding; a reply that fails gets one reason, which the server logs.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from edgetrain.fleet.codec import decode

NPY_HEADER_ALLOWANCE = 256  # bytes the .npy header of one array may add on the wire


class RejectedReply(Exception):
    """A client's reply that is left out of the aggregate; the message is the reason (one line)."""


def max_wire_bytes(layout: Mapping[str, tuple[np.dtype, tuple]], factor: float) -> int:
    """The largest reply accepted: `factor` times the expected data, plus a header allowance per array."""
    data = sum(np.dtype(dt).itemsize * int(np.prod(shape, dtype=np.int64)) for dt, shape in layout.values())
    return int(math.ceil(factor * data)) + NPY_HEADER_ALLOWANCE * len(layout)


def check_layout(arrays: Mapping[str, Any], layout: Mapping[str, tuple[np.dtype, tuple]], limit: int) -> int:
    """Raise RejectedReply unless the reply has exactly the expected arrays, dtypes and shapes within `limit`
    wire bytes; returns the wire bytes. `arrays` maps names to Flower Arrays (dtype, shape, data)."""
    wire = sum(len(a.data) for a in arrays.values())
    if wire > limit:
        raise RejectedReply(f"oversized payload: {wire} bytes, limit {limit}")
    names, want = set(arrays), set(layout)
    if names != want:
        missing, extra = sorted(want - names), sorted(names - want)
        raise RejectedReply(f"wrong arrays: missing {missing[:3]}, unexpected {extra[:3]}")
    for name in sorted(layout):
        dtype, shape = layout[name]
        got = arrays[name]
        if np.dtype(got.dtype) != dtype:
            raise RejectedReply(f"'{name}': dtype {got.dtype}, expected {dtype}")
        if tuple(got.shape) != tuple(shape):
            raise RejectedReply(f"'{name}': shape {tuple(got.shape)}, expected {tuple(shape)}")
    return wire


def decode_checked(arrays: Mapping[str, np.ndarray], shapes: Mapping[str, tuple], bits: int | None
                   ) -> dict[str, np.ndarray]:
    """Decoded float32 deltas, or RejectedReply naming the first tensor holding NaN or infinity."""
    for name in sorted(arrays):
        a = arrays[name]
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise RejectedReply(f"'{name}' holds NaN or infinity")
    with np.errstate(over="ignore", invalid="ignore"):
        deltas = decode(arrays, shapes, bits)
    for name, d in deltas.items():
        if not np.isfinite(d).all():  # finite scales times integers can still overflow float32
            raise RejectedReply(f"'{name}' decodes to NaN or infinity")
    return deltas


def check_examples(metrics: Mapping[str, Any]) -> int:
    """The reply's example count: a positive integer, or RejectedReply."""
    n = metrics.get("num-examples")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise RejectedReply(f"num-examples {n!r} is not a positive integer")
    return n
