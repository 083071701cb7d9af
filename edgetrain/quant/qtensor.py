"""QTensor: integer values and the float scale that maps them back, x ~= q * scale."""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

MIN_BITS_SIGNED = 2  # 1-bit signed would be {0} with a symmetric range
MIN_BITS_UNSIGNED = 1
MAX_BITS = 16


def check_bits(bits: int, signed: bool) -> int:
    """Validate a bit-width for the signed or unsigned form and return it as an int."""
    lo = MIN_BITS_SIGNED if signed else MIN_BITS_UNSIGNED
    if not isinstance(bits, (int, np.integer)) or not lo <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an integer in {lo}..{MAX_BITS} for the {'signed' if signed else 'unsigned'} "
                         f"form, got {bits!r}")
    return int(bits)


@lru_cache(maxsize=128)  # a pure function of (bits, signed), asked ~1,000 times a MobileNetV2 step
def qrange(bits: int, signed: bool = True) -> tuple[int, int]:
    """Integer range: symmetric [-(2^(b-1)-1), 2^(b-1)-1] signed, [0, 2^b-1] unsigned."""
    bits = check_bits(bits, signed)
    if signed:
        top = (1 << (bits - 1)) - 1
        return -top, top
    return 0, (1 << bits) - 1


@lru_cache(maxsize=128)
def storage_dtype(bits: int, signed: bool = True) -> np.dtype:
    """Smallest numpy integer dtype holding the range: int8/int16 signed, uint8/uint16 unsigned."""
    bits = check_bits(bits, signed)
    if signed:
        return np.dtype(np.int8 if bits <= 8 else np.int16)
    return np.dtype(np.uint8 if bits <= 8 else np.uint16)


@dataclass(frozen=True)
class QuantStats:
    """What one quantisation saw: element count, how many were clipped, the largest |x|."""

    elements: int
    saturated: int
    observed_max: float


@dataclass
class QTensor:
    """Fixed-point tensor: integers `q` and a float32 `scale` (a scalar, or one per index of `axis`).

    `stats` records what quantisation saw (saturations, observed range); it is not part of the
    tensor's value and is ignored by ==.
    """

    q: np.ndarray
    scale: np.float32 | np.ndarray
    bits: int
    signed: bool = True
    axis: int | None = None
    stats: QuantStats | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        want = storage_dtype(self.bits, self.signed)
        if self.q.dtype != want:
            raise TypeError(f"{self.bits}-bit {'signed' if self.signed else 'unsigned'} values are stored as {want}, "
                            f"got {self.q.dtype}")
        scale = np.asarray(self.scale)
        if scale.dtype != np.float32:
            raise TypeError(f"scale must be float32, got {scale.dtype}")
        if self.axis is None:
            if scale.ndim != 0:
                raise ValueError(f"a per-tensor scale must be a scalar, got shape {scale.shape}")
            self.scale = np.float32(scale)
        else:
            self.axis = int(self.axis) % self.q.ndim
            if scale.shape != (self.q.shape[self.axis],):
                raise ValueError(f"per-channel scale must have shape ({self.q.shape[self.axis]},) for axis "
                                 f"{self.axis} of {self.q.shape}, got {scale.shape}")

    @classmethod
    def trusted(cls, q: np.ndarray, scale, bits: int, signed: bool, axis: int | None,
                stats: QuantStats | None) -> QTensor:
        """A QTensor from fields its producer already made consistent (quantize: q of storage_dtype, a
        float32 scale of the right shape, axis normalised), without __post_init__'s checks, which cost
        a small tensor's quantisation about a fifth of its time."""
        t = object.__new__(cls)
        t.q, t.scale, t.bits, t.signed, t.axis, t.stats = q, scale, bits, signed, axis, stats
        return t

    @property
    def qmin(self) -> int:
        return qrange(self.bits, self.signed)[0]

    @property
    def qmax(self) -> int:
        return qrange(self.bits, self.signed)[1]

    @property
    def shape(self) -> tuple[int, ...]:
        return self.q.shape

    def scale_broadcast(self) -> np.ndarray:
        """The scale shaped to broadcast against q."""
        if self.axis is None:
            return np.asarray(self.scale)
        shape = [1] * self.q.ndim
        shape[self.axis] = -1
        return np.asarray(self.scale).reshape(shape)

    def dequantize(self) -> np.ndarray:
        """float32 q * scale."""
        return self.q.astype(np.float32) * self.scale_broadcast()


class FloatsStandIn:
    """A value an op hands on in place of a float tensor it never wrote (subclasses say what stands in): its
    reader may take the stand-in as it is; anything else asks for the floats (`floats`, np.asarray), made once,
    on the first request, by `_make`. Shape and dtype are the floats'."""

    __slots__ = ("shape", "dtype", "_floats")

    def __init__(self, shape: tuple, dtype: np.dtype):
        """shape, dtype: the floats'."""
        self.shape = tuple(shape)
        self.dtype = np.dtype(dtype)
        self._floats: np.ndarray | None = None

    @property
    def ndim(self) -> int:
        """Number of axes, as the floats'."""
        return len(self.shape)

    @property
    def size(self) -> int:
        """Number of values, as the floats'."""
        return int(np.prod(self.shape))

    def _make(self) -> np.ndarray:
        raise NotImplementedError

    def floats(self) -> np.ndarray:
        """The float tensor this stands in for (made once, on the first request)."""
        if self._floats is None:
            self._floats = self._make()
        return self._floats

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        """np.asarray(this): the floats."""
        out = self.floats()
        return out if dtype is None else out.astype(dtype, copy=False)


class Prequantised(FloatsStandIn):
    """An activation its producer wrote as its reader's codes instead of floats: a BatchNorm with a folded
    ReLU whose output only an integer layer reads (`ops.norm.BatchNormalization.codes_for`). `codes` is
    exactly what `quantize` would make of the floats, so the reader takes it as its quantised input.

    The floats are never written, but anything else that asks (np.asarray, a debugging hook) gets them:
    `materialise` recomputes them, with the bits the producer would have stored."""

    __slots__ = ("codes", "_materialise")

    def __init__(self, codes: QTensor, dtype: np.dtype, materialise):
        """codes: the reader's quantised input; materialise: () -> the floats, computed on demand."""
        super().__init__(codes.q.shape, dtype)
        self.codes = codes
        self._materialise = materialise

    def _make(self) -> np.ndarray:
        return self._materialise()


class SampleRows(FloatsStandIn):
    """Some samples of a float tensor, not gathered: a gated unit's executing rows, handed to the integer conv
    that reads them (`edgetrain.precision.dfq.gated_unit`), which quantises them where they lie
    (`quantizer.quantize_rows`) instead of from a gathered copy. Anything else that asks gets the copy."""

    __slots__ = ("source", "rows")

    def __init__(self, source: np.ndarray, rows: np.ndarray):
        """source: the whole tensor (samples on axis 0, C-contiguous); rows: the samples, in their order."""
        super().__init__((len(rows),) + source.shape[1:], source.dtype)
        self.source = source
        self.rows = rows

    def __getitem__(self, rows: slice) -> SampleRows:
        """A run of these rows (a sample group's slice), still not gathered."""
        if not isinstance(rows, slice):
            raise TypeError("SampleRows takes a slice of its rows")
        return SampleRows(self.source, self.rows[rows])

    def _make(self) -> np.ndarray:
        return self.source[self.rows]
