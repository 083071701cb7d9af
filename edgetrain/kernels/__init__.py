"""Exact integer kernels of the fixed-point engine: GEMM, Linear and Conv2d (forward and both backwards).

This module is the one entry point: it validates arguments, chooses the accumulator from the
worst-case bound (see `bounds`), and hands canonical operands to the active backend, so a faster
backend can be swapped in with `set_backend` without touching any caller.

Operands are integer arrays (int8, uint8, int16, or uint16) holding quantised values (a
QTensor's `.q`); results are int32 when every partial sum provably fits int32 (judged from the
operands' actual maxima, so the dtype can differ between calls), else int64, and are always exact:
bit for bit what an int64 reference computes (results may be strided views, e.g. transposed).
Rescaling by the operands' scales is the caller's, or, with `rescale=` on the convs, fused into the
kernel with the same arithmetic. Conv arrays are NCHW, weights (M, C/groups, kH, kW), pads in ONNX
order (top, left, bottom, right), with the floor output size of ONNX/PyTorch (edgetrain.ops.conv.Conv
with explicit pads).

Backends (`use_backend` by a user's choice or $EDGETRAIN_BACKEND, probed safely by `routes`;
`set_backend` by name; every one exact, and tests/test_kernels.py runs every test on each):

* "vnni" (default): 8-bit convs and GEMMs on fused tile kernels emitted from Numba (`vnni`): one
  `vpdpbusd` per 4-byte step on AVX-512 VNNI, the same step as two `vpmaddwd` on AVX2; the rest as
  "onnxruntime". Used only on CPUs with one of the two, after a self-check.
* "onnxruntime": 8-bit products on onnxruntime's MatMulInteger (MLAS u8 x s8 GEMM) through its C API
  from Numba threads (`ort_backend`, `ort_capi`), after an exactness probe; the rest as "numba".
* "numba": the portable int16 kernels (`numba_backend`), any bit-width up to 16.

Each falls back per call (operands beyond 8 bits, grouped convs, overlong reductions) and for good
when its CPU or library check fails, so the result never depends on which one ran.
Every call with less than `threads.SMALL_WORK` multiply-accumulates runs single-threaded, and the
elementwise kernels around them (padding, rescaling, quantising) take a serial branch below
`threads.SMALL_ELEMENTS` values.
`tools/bench_kernels.py` measures the kernels at ResNet-20 shapes, `tools/bench.py` whole steps.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np

from edgetrain.kernels.batched import batched_gemm_nt_small
from edgetrain.kernels.bounds import INT32_MAX, accumulator_dtype, amax_abs, dot_bound, segment_length
from edgetrain.kernels.geometry import Conv2dGeometry, conv2d_geometry
from edgetrain.kernels.memory import tune_malloc
from edgetrain.kernels.numba_backend import NumbaBackend
from edgetrain.kernels.ort_backend import OrtBackend
from edgetrain.kernels.rescale import rescaled
from edgetrain.kernels.vnni_backend import VnniBackend

__all__ = [
    "gemm", "gemm_nt", "batched_gemm_nt", "linear_forward", "linear_backward_data", "linear_backward_weight",
    "conv2d_forward", "conv2d_backward_data", "conv2d_backward_weight",
    "accumulator_dtype", "dot_bound", "segment_length", "conv2d_geometry", "Conv2dGeometry",
    "KernelBackend", "register_backend", "set_backend", "use_backend", "get_backend", "SUPPORTED_DTYPES", "INT32_MAX",
]

SUPPORTED_DTYPES = (np.dtype(np.int8), np.dtype(np.uint8), np.dtype(np.int16), np.dtype(np.uint16))
_INT16_MAX = 32767
_UINT16_SPLIT = 15  # uint16 values >= 2^15 are split at this bit into two int16-safe halves
# A signed operand wider than 8 bits (a 12-bit gradient, say) is split at this bit into a low part in
# [0, 127] and a signed high part, both int8, when the backend multiplies 8-bit codes far faster than
# wider ones: two 8-bit passes beat one wide pass.
_BYTE_SPLIT = 7
_INT8_MAX = 127


class KernelBackend(Protocol):
    """What a backend implements. Operands arrive as int8/uint8/int16 arrays whose values fit int16;
    `seg` is the longest run of terms whose int32 sum is exact; `amax` holds upper bounds of the
    operands' max |value| (None: unknown); results must be exact and of `out_dtype` (any strides).
    Shapes are already validated; `geo` is a `Conv2dGeometry`."""

    name: str

    def gemm_nt(self, a: np.ndarray, bt: np.ndarray, out_dtype: np.dtype, seg: int,
                amax: tuple[int, int] | None = None) -> np.ndarray: ...

    def conv2d_forward(self, x: np.ndarray, w: np.ndarray, geo: Conv2dGeometry, out_dtype: np.dtype,
                       seg: int, amax: tuple[int, int] | None = None) -> np.ndarray: ...

    def conv2d_backward_data(self, dy: np.ndarray, w: np.ndarray, geo: Conv2dGeometry, out_dtype: np.dtype,
                             seg: int, amax: tuple[int, int] | None = None) -> np.ndarray: ...

    def conv2d_backward_weight(self, dy: np.ndarray, x: np.ndarray, geo: Conv2dGeometry, out_dtype: np.dtype,
                               seg: int, amax: tuple[int, int] | None = None) -> np.ndarray: ...


tune_malloc()  # keep big freed blocks for the next layer: no page faults per step (see `memory`)

_NUMBA = NumbaBackend()
_BACKENDS: dict[str, KernelBackend] = {"numba": _NUMBA, "onnxruntime": OrtBackend(_NUMBA), "vnni": VnniBackend(_NUMBA)}
# Chosen on first use from $EDGETRAIN_BACKEND (`routes.choose`; auto: the fastest route that passes its
# probe). Below the chosen route, each step down (vnni -> onnxruntime -> numba) also happens per call,
# for operands a route cannot take.
_active: list[str | None] = [None]


def register_backend(backend: KernelBackend) -> None:
    """Make a backend selectable by its `name`."""
    _BACKENDS[backend.name] = backend


def set_backend(name: str) -> str:
    """Route every kernel call to the named backend; returns the previous backend's name."""
    if name not in _BACKENDS:
        raise KeyError(f"unknown kernel backend '{name}'; registered: {sorted(_BACKENDS)}")
    previous = get_backend().name
    _active[0] = name
    return previous


def use_backend(choice: str | None = None) -> str:
    """Route kernel calls by a user's choice (auto|vnni|onnxruntime|numba; None: $EDGETRAIN_BACKEND),
    stepping down to a route this machine can take; returns the route taken."""
    from edgetrain.kernels.routes import choose

    _active[0] = choose(choice)
    return _active[0]


def get_backend() -> KernelBackend:
    """The backend kernel calls currently go to."""
    if _active[0] is None:
        use_backend()
    return _BACKENDS[_active[0]]


# ------------------------------------------------------------------------------------- helpers


def _check(x: np.ndarray, name: str, ndim: int) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} must be int8, uint8, int16 or uint16 (quantised values), got {x.dtype}")
    if x.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {x.shape}")
    return x


def _int16_parts(x: np.ndarray) -> list[tuple[np.ndarray, int]]:
    """x as a sum of (part << shift) with int16-safe parts; one part unless uint16 exceeds 2^15-1."""
    if x.dtype != np.uint16:
        return [(x, 0)]
    if amax_abs(x) <= _INT16_MAX:
        return [(x.view(np.int16), 0)]
    low_mask = np.uint16((1 << _UINT16_SPLIT) - 1)
    return [((x & low_mask).view(np.int16), 0), ((x >> np.uint16(_UINT16_SPLIT)).view(np.int16), _UINT16_SPLIT)]


Bounds = "tuple[int, int] | None"
Rescale = "tuple[np.ndarray, np.dtype] | None"


def _byte_parts(x: np.ndarray, amax: int) -> list[tuple[np.ndarray, int, int]] | None:
    """x (int16, |x| <= amax, amax > 127) as [(part, shift, bound)] with int8 parts summing to x, or
    None when the high part would not fit int8 either."""
    high_bound = (amax >> _BYTE_SPLIT) + 1
    if x.dtype != np.int16 or high_bound > _INT8_MAX:
        return None
    low = (x & _INT8_MAX).astype(np.int8)  # x - 128 * floor(x / 128): always in [0, 127]
    high = (x >> _BYTE_SPLIT).astype(np.int8)  # arithmetic shift: floor(x / 128)
    return [(low, 0, _INT8_MAX), (high, _BYTE_SPLIT, high_bound)]


def _fits8(x: np.ndarray, amax: int) -> bool:
    return x.dtype in (np.int8, np.uint8) or amax <= _INT8_MAX


def _split_wide(op: Callable[..., np.ndarray], a: np.ndarray, b: np.ndarray, length: int, amax_a: int, amax_b: int,
                rescale: Rescale) -> np.ndarray | None:
    """The product as a sum of 8-bit products when one operand is a wide int16, the other fits 8 bits
    and the backend has fast 8-bit products; None when that route does not apply."""
    if not getattr(get_backend(), "FAST_INT8", False):
        return None
    if not _fits8(a, amax_a) and _fits8(b, amax_b):
        wide_first, wide, amax_wide, other, amax_other = True, a, amax_a, b, amax_b
    elif _fits8(a, amax_a) and not _fits8(b, amax_b):
        wide_first, wide, amax_wide, other, amax_other = False, b, amax_b, a, amax_a
    else:
        return None
    parts = _byte_parts(wide, amax_wide)
    if parts is None:
        return None
    # Bounds every shifted part and the sum (the high part's bound is rounded up by one step).
    total_dtype = accumulator_dtype(length, amax_wide + (1 << _BYTE_SPLIT), amax_other)
    total = None
    for part, shift, bound in parts:
        pa, pb, amax = (part, other, (bound, amax_other)) if wide_first else (other, part, (amax_other, bound))
        out = op(pa, pb, accumulator_dtype(length, *amax), segment_length(length, *amax), amax)
        out = out.astype(total_dtype, copy=False)
        if shift:
            out = out << shift
        total = out if total is None else total + out
    return total if rescale is None else rescaled(total, rescale)


_BYTE_CODES = "bB"  # dtype.char of int8 and uint8


@functools.lru_cache(maxsize=1024)
def _accumulation(length: int, amax_a: int, amax_b: int) -> tuple[np.dtype, int]:
    """accumulator_dtype and segment_length of a reduction, kept: a layer asks the same every step, and a
    batch-8 step makes a hundred products ((8, 400) x (400, 120): 12.5 -> 9.8 us a call with the 8-bit path)."""
    return accumulator_dtype(length, amax_a, amax_b), segment_length(length, amax_a, amax_b)


def _exact(op: Callable[..., np.ndarray], a: np.ndarray, b: np.ndarray, length: int,
           bounds: Bounds = None, rescale: Rescale = None) -> np.ndarray:
    """Run a bilinear kernel on a and b whose reductions have `length` terms, with a safe accumulator.

    `bounds` are guaranteed upper bounds of max|a| and max|b| (a quantiser's qmax: every value was
    clipped into range); they spare two full scans of the operands per call. Without them the
    operands' actual maxima are measured. The backend receives them too (`amax`): they tell it
    which exact route an operand fits (8-bit codes, float BLAS, ...). With `rescale` the result is
    returned as floats (see `conv2d_forward`), by the backend itself when it can fuse that.
    """
    # Two 8-bit operands (every 8-bit layer) are one product as they are: no int16 split to try or take.
    bytes_only = a.dtype.char in _BYTE_CODES and b.dtype.char in _BYTE_CODES
    if bounds is not None and (bytes_only or (a.dtype != np.uint16 and b.dtype != np.uint16)):
        amax_a, amax_b = int(bounds[0]), int(bounds[1])
    else:
        amax_a, amax_b = amax_abs(a), amax_abs(b)
    out_dtype, seg = _accumulation(length, amax_a, amax_b)
    if bytes_only:
        parts_a, parts_b = [(a, 0)], [(b, 0)]
    else:
        if a.dtype != np.uint16 and b.dtype != np.uint16:
            split = _split_wide(op, a, b, length, amax_a, amax_b, rescale)
            if split is not None:
                return split.astype(out_dtype, copy=False) if rescale is None else split
        parts_a, parts_b = _int16_parts(a), _int16_parts(b)
    if len(parts_a) == 1 and len(parts_b) == 1:
        extra = {} if rescale is None else {"rescale": rescale}
        out = op(parts_a[0][0], parts_b[0][0], out_dtype, seg, (amax_a, amax_b), **extra)
        if rescale is None or out.dtype.kind == "f":
            return out
        return rescaled(out, rescale)
    total = None
    for pa, sa in parts_a:
        for pb, sb in parts_b:
            ma, mb = amax_abs(pa), amax_abs(pb)
            part = op(pa, pb, np.dtype(np.int64), segment_length(length, ma, mb), (ma, mb))
            part = part.astype(np.int64, copy=False) << (sa + sb)
            total = part if total is None else total + part
    total = total.astype(out_dtype, copy=False)
    return total if rescale is None else rescaled(total, rescale)


# ---------------------------------------------------------------------------------- GEMM, Linear


def gemm_nt(a: np.ndarray, bt: np.ndarray, bounds: Bounds = None) -> np.ndarray:
    """a (M, K) @ bt (N, K)^T, exact; the layout every other product reduces to."""
    a, bt = _check(a, "a", 2), _check(bt, "bt", 2)
    if a.shape[1] != bt.shape[1]:
        raise ValueError(f"gemm_nt: a {a.shape} and bt {bt.shape} disagree on K")
    return _exact(get_backend().gemm_nt, a, bt, a.shape[1], bounds)


# Below this many multiply-accumulates per matrix, batched_gemm_nt runs the whole batch in one Numba call
# rather than one backend GEMM per matrix (whose dispatch then outweighs the arithmetic).
_BATCHED_SMALL_MACS = 1 << 16


def batched_gemm_nt(a: np.ndarray, bt: np.ndarray, bounds: Bounds = None) -> np.ndarray:
    """a (..., M, K) @ bt (..., N, K)^T with the batch axes broadcast as numpy.matmul does, exact, int64.

    Small matrices (attention's, per sample and head) go through one batched Numba call, larger ones
    through `gemm_nt` one matrix at a time; both are exact, so which one ran never shows in the result.
    """
    a, bt = np.asarray(a), np.asarray(bt)
    for name, t in (("a", a), ("bt", bt)):
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} must be int8, uint8, int16 or uint16 (quantised values), got {t.dtype}")
        if t.ndim < 2:
            raise ValueError(f"{name} must be at least 2-D, got shape {t.shape}")
    if a.shape[-1] != bt.shape[-1]:
        raise ValueError(f"batched_gemm_nt: a {a.shape} and bt {bt.shape} disagree on K")
    batch = np.broadcast_shapes(a.shape[:-2], bt.shape[:-2])
    a3 = np.broadcast_to(a, batch + a.shape[-2:]).reshape((-1,) + a.shape[-2:])
    b3 = np.broadcast_to(bt, batch + bt.shape[-2:]).reshape((-1,) + bt.shape[-2:])
    m, n, k = a.shape[-2], bt.shape[-2], a.shape[-1]
    if m * n * k < _BATCHED_SMALL_MACS:
        out = batched_gemm_nt_small(a3, b3)
    else:
        out = np.empty((a3.shape[0], m, n), np.int64)
        for i in range(a3.shape[0]):
            out[i] = gemm_nt(a3[i], b3[i], bounds)
    return out.reshape(batch + (m, n))


def gemm(a: np.ndarray, b: np.ndarray, bounds: Bounds = None) -> np.ndarray:
    """a (M, K) @ b (K, N), exact, int32 or int64 by the worst-case bound."""
    a, b = _check(a, "a", 2), _check(b, "b", 2)
    if a.shape[1] != b.shape[0]:
        raise ValueError(f"gemm: a {a.shape} and b {b.shape} disagree on K")
    return _exact(get_backend().gemm_nt, a, b.T, a.shape[1], bounds)


def linear_forward(x: np.ndarray, w: np.ndarray, bounds: Bounds = None) -> np.ndarray:
    """y = x W^T for x (B, in) and w (out, in), as torch.nn.Linear without bias."""
    return gemm_nt(x, w, bounds)


def linear_backward_data(dy: np.ndarray, w: np.ndarray, bounds: Bounds = None) -> np.ndarray:
    """dx = dy W for dy (B, out) and w (out, in)."""
    return gemm(dy, w, bounds)


def linear_backward_weight(dy: np.ndarray, x: np.ndarray, bounds: Bounds = None) -> np.ndarray:
    """dW = dy^T x for dy (B, out) and x (B, in): a reduction over the batch."""
    dy, x = _check(dy, "dy", 2), _check(x, "x", 2)
    if dy.shape[0] != x.shape[0]:
        raise ValueError(f"linear_backward_weight: dy {dy.shape} and x {x.shape} disagree on the batch")
    return _exact(get_backend().gemm_nt, dy.T, x.T, dy.shape[0], bounds)


# ---------------------------------------------------------------------------------------- Conv2d


def conv2d_forward(x: np.ndarray, w: np.ndarray, stride: int | Sequence[int] = 1,
                   pads: Sequence[int] = (0, 0, 0, 0), dilation: int | Sequence[int] = 1,
                   groups: int = 1, bounds: Bounds = None, rescale: Rescale = None) -> np.ndarray:
    """y (N, M, OH, OW) = conv(x (N, C, H, W), w (M, C/groups, kH, kW)), exact.

    With rescale = (scale, dtype), scale holding one float per output channel (or one row of them per
    image, scale[n, m]), the result is the new C-contiguous float array y * scale[m] of `dtype` instead, each value
    computed from the exact
    integer as `rescale.scale_row` does (one rounding): the same bits as rescaling the integer result
    afterwards, but the backend may do it while each chunk of y is still in cache.
    """
    x, w = _check(x, "x", 4), _check(w, "w", 4)
    geo = conv2d_geometry(x.shape, w.shape, stride, pads, dilation, groups)
    backend = get_backend()
    return _exact(lambda a, b, dt, seg, amax, **kw: backend.conv2d_forward(a, b, geo, dt, seg, amax, **kw), x, w,
                  geo.in_per_group * geo.taps, bounds, rescale)


def conv2d_backward_data(dy: np.ndarray, w: np.ndarray, x_shape: Sequence[int], stride: int | Sequence[int] = 1,
                         pads: Sequence[int] = (0, 0, 0, 0), dilation: int | Sequence[int] = 1,
                         groups: int = 1, bounds: Bounds = None, rescale: Rescale = None) -> np.ndarray:
    """dx (N, C, H, W) = the transposed conv of dy (N, M, OH, OW) with w, exact; `rescale` (one
    scale per input channel) as in `conv2d_forward`."""
    dy, w = _check(dy, "dy", 4), _check(w, "w", 4)
    geo = conv2d_geometry(x_shape, w.shape, stride, pads, dilation, groups)
    if dy.shape != geo.y_shape:
        raise ValueError(f"dy has shape {dy.shape}, the conv's output is {geo.y_shape}")
    backend = get_backend()
    return _exact(lambda a, b, dt, seg, amax, **kw: backend.conv2d_backward_data(a, b, geo, dt, seg, amax, **kw),
                  dy, w, geo.out_per_group * geo.taps, bounds, rescale)


def conv2d_backward_weight(dy: np.ndarray, x: np.ndarray, w_shape: Sequence[int], stride: int | Sequence[int] = 1,
                           pads: Sequence[int] = (0, 0, 0, 0), dilation: int | Sequence[int] = 1,
                           groups: int = 1, bounds: Bounds = None) -> np.ndarray:
    """dW (M, C/groups, kH, kW) = sum over batch and output pixels of dy x patches, exact."""
    dy, x = _check(dy, "dy", 4), _check(x, "x", 4)
    geo = conv2d_geometry(x.shape, w_shape, stride, pads, dilation, groups)
    if dy.shape != geo.y_shape:
        raise ValueError(f"dy has shape {dy.shape}, the conv's output is {geo.y_shape}")
    backend = get_backend()
    return _exact(lambda a, b, dt, seg, amax: backend.conv2d_backward_weight(a, b, geo, dt, seg, amax), dy, x,
                  geo.batch * geo.out_h * geo.out_w, bounds)
