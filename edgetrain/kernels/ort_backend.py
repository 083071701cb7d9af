"""onnxruntime backend: 8-bit products on ONNX Runtime's u8 x s8 integer GEMM (MatMulInteger).

ONNX Runtime's MLAS library multiplies uint8 by int8 matrices into int32 with the CPU's integer
dot-product instructions (VNNI `vpdpbusd` on x86, `udot`/`usdot` on Arm), 5-20x the throughput of
the Numba int16 kernels. Its int8 x int8 and uint8 x uint8 paths are far slower, so every product
is arranged as A (uint8) @ B (int8) with zero points:

* an int8 operand on the A side is re-encoded as a + 128 (XOR 0x80) with zero point 128;
* a uint8 operand on the B side is re-encoded as b - 128 (XOR 0x80) with zero point -128;

MatMulInteger computes sum((A - za) * (B - zb)), which is the product of the original values. The
XOR rides along the copies the layout needs anyway (`im2col`). Layouts are chosen so results come
out in the caller's layout with no transpose:

* conv forward: W (M, K) @ patches (N, K, P) -> (N, M, P), which is NCHW;
* conv backward-data: per stride phase, the same with dy's patches and the transposed taps;
* conv backward-weight: patches^T (blocks, K, L) @ dy^T (blocks, L, M), summed over blocks.

Exactness: with |A| <= 255 and |B| <= 128 a reduction of L <= `RAW_TERMS` terms cannot leave
int32 even before the zero-point correction, so every int32 intermediate is the exact integer
(longer reductions are split into such runs and added in int64). That also makes the result exact
whatever order MLAS sums in; what it cannot rule out is an implementation that saturates (the
int16 `vpmaddubsw` of x86 CPUs without VNNI saturates pairs above 32767). So before first use the
backend runs a probe of worst-case operands against a NumPy int64 reference and, if any result
differs, hands every call to the Numba backend instead (`OrtBackend.usable`).

Threads: each product is cut into chunks of images (of rows, for a GEMM) and a Numba `prange`
loop runs them, laying out a chunk's patches (`im2col`) and multiplying it on the same thread while
it is in cache, through onnxruntime's C API with single-threaded sessions (`ort_capi`): one thread
pool for everything, no Python and no GIL inside the loop.

Anything this backend cannot run exactly on 8-bit codes (operands beyond 8 bits, grouped convs,
reductions longer than one image allows) goes to the Numba backend, unchanged.
"""
from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from numba import njit, prange

from edgetrain.kernels import im2col as _lay
from edgetrain.kernels.numba_backend import NumbaBackend, phase_plans
from edgetrain.kernels.ort_capi import OrtCApi, matmul_views
from edgetrain.kernels.rescale import scale_rows
from edgetrain.kernels.sync import fetch_add
from edgetrain.kernels.threads import pool_threads, threads_for

# Longest reduction whose raw u8 x s8 sum provably stays in int32: 255 * 128 per term.
RAW_TERMS = int(np.iinfo(np.int32).max) // (255 * 128)
# Bytes of patch matrix per work item: a chunk of images is laid out and multiplied while it is
# still in the core's L2 (measured: the GEMM on cache-resident patches runs ~2x faster).
CHUNK_BYTES = 1 << 19
# Output elements per work item of a plain GEMM (rows of A are cut into chunks of about this size).
GEMM_CHUNK = 1 << 16
_XOR = 0x80


def _coded(x: np.ndarray, xor: int, dtype) -> np.ndarray:
    """x's bytes ^ xor as a C-contiguous array of `dtype` (no copy when already so and xor is 0)."""
    if not xor and x.flags.c_contiguous:
        return x.view(dtype)
    out = np.empty(x.shape, np.uint8)
    if x.ndim == 2 and x.T.flags.c_contiguous and x.shape[0] % 8 == 0 and x.shape[1] % 8 == 0 and x.size:
        # a transposed view of a C-contiguous matrix: transpose that matrix in 8x8 blocks
        _lay.transpose_words(x.T.view(np.uint8).view(np.uint64), out.view(np.uint64), xor)
    elif x.ndim == 2 and not x.flags.c_contiguous:
        _lay.copy_xor(x.view(np.uint8), out, xor)  # any other strides: tiled, not numpy's byte gather
    else:
        np.bitwise_xor(np.ascontiguousarray(x).view(np.uint8), np.uint8(xor), out=out)
    return out.view(dtype)


def _enc_a(x: np.ndarray) -> tuple[np.ndarray, int]:
    """An 8-bit operand as MatMulInteger's uint8 A: (codes, zero point)."""
    if x.dtype == np.uint8:
        return _coded(x, 0, np.uint8), 0
    return _coded(x, _XOR, np.uint8), 128


def _enc_b(x: np.ndarray) -> tuple[np.ndarray, int]:
    """An 8-bit operand as MatMulInteger's int8 B: (codes, zero point)."""
    if x.dtype == np.int8:
        return _coded(x, 0, np.int8), 0
    return _coded(x, _XOR, np.int8), -128


def _coding_cost(x: np.ndarray, as_a: bool) -> int:
    """Bytes `_enc_a`/`_enc_b` would copy (a transposing copy counts double)."""
    xor = (x.dtype == np.int8) if as_a else (x.dtype == np.uint8)
    if x.flags.c_contiguous:
        return x.size if xor else 0
    return 2 * x.size


def _as8(x: np.ndarray, amax: int) -> np.ndarray | None:
    """x as int8/uint8 if its values fit (int16 storage of small values is narrowed), else None."""
    if x.dtype in (np.int8, np.uint8):
        return x
    if x.dtype == np.int16 and amax <= 127:
        return x.astype(np.int8)
    return None


def _probe(run) -> bool:
    """True when MatMulInteger gives the exact int64 results on worst-case and random operands."""
    rng = np.random.default_rng(12345)
    k = 4096
    cases = []
    for a_val, b_val in ((255, 127), (255, -128), (0, -128), (128, 127)):
        cases.append((np.full((5, k), a_val, np.uint8), np.full((k, 7), b_val, np.int8)))
    a = rng.integers(0, 256, (37, 611), dtype=np.uint8)
    b = rng.integers(-128, 128, (611, 29), dtype=np.int8)
    a[:, ::2] = 255
    b[::2] = -128
    cases.append((a, b))
    cases.append((rng.integers(0, 256, (3, 17, 300), dtype=np.uint8),
                  rng.integers(-128, 128, (3, 300, 11), dtype=np.int8)))
    for a, b in cases:
        for za, zb in ((0, 0), (128, 0), (0, -128), (128, -128)):
            want = np.matmul(a.astype(np.int64) - za, b.astype(np.int64) - zb)
            got = run(a, b, za, zb)
            if got.shape != want.shape or not np.array_equal(got.astype(np.int64), want):
                return False
    return True


@dataclass(frozen=True)
class PatchPlan:
    """How `im2col.patches` lays out one conv as a GEMM: phase planes, taps and the output grid."""

    kernel: tuple[int, int]
    stride: tuple[int, int]
    off: tuple[int, int]
    lo_hi: tuple[int, int, int, int]
    out_h: int
    out_w: int
    hq: int
    wq: int
    used: np.ndarray
    tap_phase: np.ndarray
    tap_off: np.ndarray

    @property
    def columns(self) -> int:
        """GEMM columns per image: out_h rows of wq (the last wq - out_w of each are junk)."""
        return self.out_h * self.wq

    def params(self) -> np.ndarray:
        """The integers `im2col.patches` takes, in `_P_*` order, for the Numba drivers."""
        return np.array([self.stride[0], self.stride[1], self.off[0], self.off[1], *self.lo_hi, self.hq, self.wq,
                         self.out_h, self.out_w], np.int64)


# Positions in PatchPlan.params().
_P_SH, _P_SW, _P_OFFH, _P_OFFW, _P_LOH, _P_HIH, _P_LOW, _P_HIW, _P_HQ, _P_WQ, _P_OUTH, _P_OUTW = range(12)


@lru_cache(maxsize=1024)
def patch_plan(kernel, stride, dilation, off, lo_hi, out_hw) -> PatchPlan:
    """Output pixel (oh, ow), tap (r, s) reads x[oh*sh + r*dh + off_h, ow*sw + s*dw + off_w] (zero
    outside lo_hi): phase plane ((r*dh) % sh, (s*dw) % sw) at row oh + (r*dh) // sh, column
    ow + (s*dw) // sw. Planes are wq = out_w + max column shift wide, so a tap's patch row is one
    contiguous run; one extra row keeps the shifted runs of the last output row inside the plane."""
    (kh, kw), (sh, sw), (dh, dw) = kernel, stride, dilation
    out_h, out_w = out_hw
    rows = [((r * dh) % sh, (r * dh) // sh) for r in range(kh)]
    cols = [((s * dw) % sw, (s * dw) // sw) for s in range(kw)]
    imax, jmax = max(i for _, i in rows), max(j for _, j in cols)
    wq = out_w + jmax
    hq = out_h + imax + (1 if jmax else 0)
    used = np.zeros(sh * sw, np.bool_)
    tap_phase = np.empty(kh * kw, np.int64)
    tap_off = np.empty(kh * kw, np.int64)
    for r, (a, i) in enumerate(rows):
        for s, (b, j) in enumerate(cols):
            used[a * sw + b] = True
            tap_phase[r * kw + s] = a * sw + b
            tap_off[r * kw + s] = i * wq + j
    return PatchPlan((kh, kw), (sh, sw), tuple(off), tuple(lo_hi), out_h, out_w, hq, wq, used, tap_phase, tap_off)


# ------------------------------------------------------------------------- Numba drivers
# Each runs `workers` threads (prange), thread w taking chunks w, w + workers, ...: a chunk is laid
# out in the thread's scratch and multiplied by MatMulInteger through the C API. A failing call
# leaves its OrtStatus* in `status` for the caller to report.

_DRIVER = dict(parallel=True, nogil=True, cache=True)


@njit(inline="always", nogil=True, cache=True)
def _lay_out(x, out, n0, n1, per_block, used, tap_phase, tap_off, prm, xor):
    _lay.patches(x, out, n0, n1, per_block, used, tap_phase, tap_off, prm[_P_SH], prm[_P_SW], prm[_P_OFFH],
                 prm[_P_OFFW], prm[_P_LOH], prm[_P_HIH], prm[_P_LOW], prm[_P_HIW], prm[_P_HQ], prm[_P_WQ],
                 prm[_P_OUTH], xor)


@njit(**_DRIVER)
def _conv_driver(create, run, release, info, sess, in_names, out_names, x, a, out, outf, scale, scratch, y_scratch,
                 chunk, used, tap_phase, tap_off, prm, xor, counter, status):
    """a (M, K) @ patches of x, chunk by chunk, into out (N, M, cols) int32 or, when outf is not
    empty, rescaled (times scale[m]) into outf (N, M, out_h, out_w) floats while the chunk is in cache."""
    n = x.shape[0]
    m, k = a.shape
    cols = prm[_P_OUTH] * prm[_P_WQ]
    fused = outf.size > 0
    workers = scratch.shape[0]
    chunks = (n + chunk - 1) // chunk
    for w in prange(workers):
        shapes = np.zeros((3, 3), np.int64)
        values = np.zeros(3, np.int64)
        while True:
            ci = fetch_add(counter.ctypes.data, 1)  # chunks go to whichever thread is free (`sync`)
            if ci >= chunks:
                break
            n0 = ci * chunk
            n1 = min(n, n0 + chunk)
            b = scratch[w, :(n1 - n0) * k * cols].reshape((n1 - n0, k, cols))
            if fused:
                y = y_scratch[w, :(n1 - n0) * m * cols].reshape((n1 - n0, m, cols))
            else:
                y = out[n0:n1]
            _lay_out(x, b, n0, n1, 1, used, tap_phase, tap_off, prm, xor)
            st = matmul_views(create, run, release, info, sess, in_names, out_names, a, b, y, shapes, values)
            if st != 0:
                status[ci] = st
            elif fused:
                _lay.rescale_chunk(y, outf, n0, scale, prm[_P_OUTW], prm[_P_WQ])


@njit(**_DRIVER)
def _phase_driver(create, run, release, info, sess, in_names, out_names, x, a_all, jobs, taps_all, out, outf, scale,
                  scratch, y_scratch, chunk, step_h, step_w, xor, counter, status):
    """Several stride-1 convs of x (the stride phases of a transposed conv) per chunk, each placed
    at its phase of out (N, C, H, W) int32, or of outf (floats, times scale[c]) when that is not
    empty. jobs[j] = (m, k, a offset, tap offset, taps, first_h, first_w, then the PatchPlan params)."""
    n = x.shape[0]
    workers = scratch.shape[0]
    chunks = (n + chunk - 1) // chunk
    fused = outf.size > 0
    used = np.ones(1, np.bool_)
    for w in prange(workers):
        shapes = np.zeros((3, 3), np.int64)
        values = np.zeros(3, np.int64)
        while True:
            ci = fetch_add(counter.ctypes.data, 1)  # chunks go to whichever thread is free (`sync`)
            if ci >= chunks:
                break
            n0 = ci * chunk
            n1 = min(n, n0 + chunk)
            cnt = n1 - n0
            for j in range(jobs.shape[0]):
                m, k, a0, t0, taps = jobs[j, 0], jobs[j, 1], jobs[j, 2], jobs[j, 3], jobs[j, 4]
                prm = jobs[j, 7:]
                cols = prm[_P_OUTH] * prm[_P_WQ]
                a = a_all[a0:a0 + m * k].reshape((m, k))
                b = scratch[w, :cnt * k * cols].reshape((cnt, k, cols))
                y = y_scratch[w, :cnt * m * cols].reshape((cnt, m, cols))
                tap_phase = np.zeros(taps, np.int64)
                _lay_out(x, b, n0, n1, 1, used, tap_phase, taps_all[t0:t0 + taps], prm, xor)
                st = matmul_views(create, run, release, info, sess, in_names, out_names, a, b, y, shapes, values)
                if st != 0:
                    status[ci] = st
                elif fused:
                    _lay.place_phase_scaled(y, outf, n0, jobs[j, 5], jobs[j, 6], step_h, step_w, prm[_P_OUTW],
                                            prm[_P_WQ], scale)
                else:
                    _lay.place_phase(y, out, n0, jobs[j, 5], jobs[j, 6], step_h, step_w, prm[_P_OUTW], prm[_P_WQ])


@njit(nogil=True, cache=True)
def _threads_sum_transposed(acc, out):
    """out (M, K) = sum over threads w of acc[w] (K, M), in out's integer type (which holds dW: the caller's
    accumulator bound). As NumPy's sum, transposed copy and cast it cost 72 us a call at batch 8."""
    for k in range(acc.shape[1]):
        for m in range(acc.shape[2]):
            total = np.int64(0)
            for w in range(acc.shape[0]):
                total += acc[w, k, m]
            out[m, k] = total


@njit(**_DRIVER)
def _wgrad_driver(create, run, release, info, sess, in_names, out_names, x, dy, dy64, a_scratch, b_scratch,
                  y_scratch, acc, chunk, used, tap_phase, tap_off, prm, a_xor, b_xor, counter, status):
    """acc[w] (K, M) int64 += patches^T (K, L) @ dy rows (L, M) over thread w's chunks of images."""
    n = x.shape[0]
    m = dy.shape[1]
    k = acc.shape[1]
    workers = acc.shape[0]
    cols = prm[_P_OUTH] * prm[_P_WQ]
    out_h, out_w, wq = prm[_P_OUTH], prm[_P_OUTW], prm[_P_WQ]
    words = dy64.shape[0] > 0
    chunks = (n + chunk - 1) // chunk
    for w in prange(workers):
        shapes = np.zeros((3, 3), np.int64)
        values = np.zeros(3, np.int64)
        while True:
            ci = fetch_add(counter.ctypes.data, 1)  # chunks go to whichever thread is free (`sync`)
            if ci >= chunks:
                break
            n0 = ci * chunk
            n1 = min(n, n0 + chunk)
            span = (n1 - n0) * cols
            a = a_scratch[w, :k * span].reshape((1, k, span))
            b = b_scratch[w, :span * m].reshape((span, m))
            y = y_scratch[w]
            _lay_out(x, a, n0, n1, n1 - n0, used, tap_phase, tap_off, prm, a_xor)
            if words:
                _lay.pixel_rows8(dy64, b.view(np.uint64), n0, n1, out_h, out_w, wq, b_xor)
            else:
                _lay.pixel_rows(dy, b, n0, n1, out_h, out_w, wq, b_xor)
            st = matmul_views(create, run, release, info, sess, in_names, out_names, a[0], b, y, shapes, values)
            if st != 0:
                status[ci] = st
                continue
            acc_w = acc[w]
            for i in range(k):
                for j in range(m):
                    acc_w[i, j] += y[i, j]


@njit(**_DRIVER)
def _gemm_driver(create, run, release, info, sess, in_names, out_names, a, b, out, workers, chunk, counter, status):
    """out (M, N) int32 = a (M, K) @ b (K, N), in chunks of rows."""
    m = a.shape[0]
    chunks = (m + chunk - 1) // chunk
    for _w in prange(workers):
        shapes = np.zeros((3, 3), np.int64)
        values = np.zeros(3, np.int64)
        while True:
            ci = fetch_add(counter.ctypes.data, 1)  # chunks go to whichever thread is free (`sync`)
            if ci >= chunks:
                break
            r0 = ci * chunk
            r1 = min(m, r0 + chunk)
            st = matmul_views(create, run, release, info, sess, in_names, out_names, a[r0:r1], b, out[r0:r1],
                              shapes, values)
            if st != 0:
                status[ci] = st


def _chunking(items: int, item_bytes: int, limit: int | None = None) -> tuple[int, int, int]:
    """(chunk, chunks, workers): items per chunk of about CHUNK_BYTES (at most `limit`), with the
    chunk count a multiple of the threads Numba may use, so each thread gets the same share."""
    threads = max(1, pool_threads())
    chunks = max(1, -(-items * max(1, item_bytes) // CHUNK_BYTES))
    if limit is not None:
        chunks = max(chunks, -(-items // max(1, limit)))
    if items >= threads:
        chunks = -(-chunks // threads) * threads
    chunk = max(1, -(-items // min(items, chunks)))
    chunks = -(-items // chunk)
    return chunk, chunks, max(1, min(threads, chunks))


class _Scratch:
    """Per-thread scratch buffers, kept between calls and grown on demand."""

    def __init__(self):
        self._bufs: dict[tuple[str, object], np.ndarray] = {}

    def get(self, name: str, workers: int, size: int, dtype) -> np.ndarray:
        key = (name, np.dtype(dtype))
        buf = self._bufs.get(key)
        if buf is None or buf.shape[0] < workers or buf.shape[1] < size:
            buf = np.empty((workers, max(size, 1)), dtype)
            self._bufs[key] = buf
        return buf[:workers]


class OrtBackend:
    """8-bit products on onnxruntime's MatMulInteger; everything else on the Numba backend."""

    name = "onnxruntime"

    def __init__(self, fallback: NumbaBackend | None = None):
        self.fallback = fallback or NumbaBackend()
        self._api: OrtCApi | None = None
        self._usable: bool | None = None
        self._lock = threading.Lock()  # one call at a time: the scratch buffers are shared
        self._scratch = _Scratch()
        # Calls per route, e.g. {"conv2d_forward": 3, "conv2d_forward:numba": 1}: what ran where.
        self.routes: Counter = Counter()

    # ------------------------------------------------------------------------------ plumbing

    @property
    def FAST_INT8(self) -> bool:
        """8-bit products run on onnxruntime's integer GEMM (not the Numba fallback): wide operands
        are worth splitting into 8-bit parts."""
        return self.usable

    @property
    def usable(self) -> bool:
        """onnxruntime's library loads and passes the exactness probe (checked once, on first use).

        The library is first tried in a child process (`routes.route_ok`): loading it through ctypes
        can crash a process outright, and only a library that survived there is loaded here."""
        if self._usable is None:
            from edgetrain.kernels.routes import route_ok

            self._usable = route_ok("onnxruntime") and self.library_passes()[0]
        return self._usable

    def library_passes(self) -> tuple[bool, str]:
        """Load onnxruntime's C API in this process and run the exactness probe: (passed, why not)."""
        try:
            self._api = OrtCApi()
            if _probe(self._run):
                return True, "ok"
            return False, "MatMulInteger is not exact on this CPU (saturating 8-bit products)"
        except Exception as exc:
            return False, f"onnxruntime's C API did not load: {type(exc).__name__}: {exc}"

    def _call(self, driver, za: int, zb: int, *args, status_size: int) -> None:
        """Run a Numba driver with the C API's entry points and report any failed chunk."""
        api = self._api
        status = np.zeros(max(1, status_size), np.uint64)
        driver(api.create_tensor, api.run, api.release_value, api.memory_info, api.session(za, zb),
               api.input_names, api.output_names, *args, np.zeros(1, np.int64), status)
        failed = [int(st) for st in status if st]
        if failed:
            for st in failed[1:]:  # free every status, report the first
                api.release_status(st)
            api.check(failed[0])

    def _run(self, a: np.ndarray, b: np.ndarray, za: int, zb: int) -> np.ndarray:
        """sum((a - za) * (b - zb)) by one MatMulInteger: a uint8 (..., M, K), b int8 (..., K, N) -> int32."""
        a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
        out = np.empty(np.broadcast_shapes(a.shape[:-2], b.shape[:-2]) + (a.shape[-2], b.shape[-1]), np.int32)
        api = self._api
        api.check(int(matmul_views(api.create_tensor, api.run, api.release_value, api.memory_info,
                                   api.session(za, zb), api.input_names, api.output_names, a, b, out,
                                   np.zeros((3, 3), np.int64), np.zeros(3, np.int64))))
        return out

    # -------------------------------------------------------------------------------- GEMM

    # Below this many multiply-accumulates a GEMM takes the Numba kernels: a session run costs about
    # 20 us at any size (measured on the Zen 5 machine: (8, 120) x (120, 84) 23.7 us here against
    # 11.8 us in Numba, (8, 400) x (400, 120) 27.5 against 23.3, (128, 784) x (784, 256) 82 against 254).
    # Both routes are exact, so the integers are the same.
    SMALL_GEMM_WORK = 1 << 19

    def gemm_nt(self, a, bt, out_dtype, seg, amax=None):
        a8, b8 = (_as8(a, amax[0]), _as8(bt, amax[1])) if amax is not None else (None, None)
        if a8 is None or b8 is None or not self.usable or a.shape[0] * a.shape[1] * bt.shape[0] < self.SMALL_GEMM_WORK:
            self.routes["gemm_nt:numba"] += 1
            return self.fallback.gemm_nt(a, bt, out_dtype, seg)
        self.routes["gemm_nt"] += 1
        m, k = a.shape
        n = bt.shape[0]
        if k == 0:
            return np.zeros((m, n), out_dtype)
        # out = a @ bt^T (A = a, B = bt^T), or its transpose bt @ a^T (A = bt, B = a^T), returned as
        # a transposed view: whichever copies fewer bytes to get C-contiguous, coded operands.
        plain = _coding_cost(a8, True) + _coding_cost(b8.T, False)
        flip = _coding_cost(b8, True) + _coding_cost(a8.T, False) < plain
        lhs, rhs_t = (b8, a8.T) if flip else (a8, b8.T)
        rows = lhs.shape[0]
        total = None
        with threads_for(m * k * n), self._lock:
            for k0 in range(0, k, RAW_TERMS):
                k1 = min(k, k0 + RAW_TERMS)
                ea, za = _enc_a(lhs[:, k0:k1] if k1 - k0 < k else lhs)
                eb, zb = _enc_b(rhs_t[k0:k1] if k1 - k0 < k else rhs_t)
                part = np.empty((rows, eb.shape[1]), np.int32)
                chunk, chunks, workers = _chunking(rows, CHUNK_BYTES * eb.shape[1] // GEMM_CHUNK)
                self._call(_gemm_driver, za, zb, ea, eb, part, workers, chunk, status_size=chunks)
                if k1 - k0 == k:
                    total = part
                else:
                    total = part.astype(np.int64) if total is None else total + part
        out = total.T if flip else total
        return out.astype(out_dtype, copy=False)

    # -------------------------------------------------------------------------------- conv

    def _conv_as_gemm(self, x8: np.ndarray, wmat8: np.ndarray, plan: PatchPlan, rescale=None) -> np.ndarray:
        """wmat (M, C*taps) @ patches of x, chunk by chunk: (N, M, out_h, out_w) int32 NCHW values (a
        view that skips the junk columns), or with rescale = (scale[M], dtype) those times scale[m]
        as a new float array (rescaled chunk by chunk, while in cache)."""
        n = x8.shape[0]
        m, k = wmat8.shape
        cols = plan.columns
        ea, za = _enc_a(wmat8)
        xor = _XOR if x8.dtype == np.uint8 else 0  # B must be int8
        chunk, chunks, workers = _chunking(n, k * cols)
        if rescale is None:
            out = np.empty((n, m, cols), np.int32)
            outf, scale = np.zeros((0, 0, 0, 0), np.float32), np.zeros((1, 1), np.float32)
        else:
            out = np.zeros((0, 0, 0), np.int32)
            scale = scale_rows(rescale[0])
            outf = np.empty((n, m, plan.out_h, plan.out_w), rescale[1])
        with self._lock:
            scratch = self._scratch.get("patches", workers, chunk * k * cols, np.uint8)
            y_scratch = self._scratch.get("conv_out", workers, chunk * m * cols if rescale is not None else 0, np.int32)
            self._call(_conv_driver, za, -128 if xor else 0, np.ascontiguousarray(x8).view(np.uint8), ea, out,
                       outf, scale, scratch, y_scratch, chunk, plan.used, plan.tap_phase, plan.tap_off,
                       plan.params(), xor, status_size=chunks)
        if rescale is not None:
            return outf
        return out.reshape(n, m, plan.out_h, plan.wq)[:, :, :, :plan.out_w]

    def _phases_as_gemm(self, x8: np.ndarray, jobs: list, out: np.ndarray, step: tuple[int, int],
                        scale: np.ndarray | None = None) -> None:
        """Several stride-1 convs of the same x, each (wmat, plan, (first_h, first_w)) placing its
        pixel (i, j) at out[:, :, first_h + i*step_h, first_w + j*step_w]: the stride phases of a
        transposed conv, computed chunk by chunk so each chunk's phases are placed while in cache.
        A float `out` receives the values times scale[c] (or scale[n, c])."""
        n = x8.shape[0]
        xor = _XOR if x8.dtype == np.uint8 else 0
        codes, table, taps, za = [], [], [], 0
        a_off = t_off = 0
        for wmat8, plan, (fh, fw) in jobs:
            ea, za = _enc_a(wmat8)
            m, k = ea.shape
            table.append([m, k, a_off, t_off, plan.tap_off.size, fh, fw, *plan.params()])
            codes.append(ea.reshape(-1))
            taps.append(plan.tap_off)
            a_off += m * k
            t_off += plan.tap_off.size
        table = np.array(table, np.int64)
        cols = table[:, 7 + _P_OUTH] * table[:, 7 + _P_WQ]
        per_image = int((table[:, 1] * cols).max())
        out_per_image = int((table[:, 0] * cols).max())
        chunk, chunks, workers = _chunking(n, per_image)
        if scale is None:
            outi, outf, scale = out, np.zeros((0, 0, 0, 0), np.float32), np.zeros((1, 1), np.float32)
        else:
            outi, outf = np.zeros((0, 0, 0, 0), np.int32), out
        with self._lock:
            scratch = self._scratch.get("patches", workers, chunk * per_image, np.uint8)
            y_scratch = self._scratch.get("conv_out", workers, chunk * out_per_image, np.int32)
            self._call(_phase_driver, za, -128 if xor else 0, np.ascontiguousarray(x8).view(np.uint8),
                       np.concatenate(codes), table, np.concatenate(taps), outi, outf, scale_rows(scale),
                       scratch, y_scratch, chunk, step[0], step[1], xor, status_size=chunks)

    def _conv_ok(self, geo, a8, b8, k_len):
        return a8 is not None and b8 is not None and geo.groups == 1 and 0 < k_len <= RAW_TERMS and self.usable

    def conv2d_forward(self, x, w, geo, out_dtype, seg, amax=None, rescale=None):
        x8, w8 = (_as8(x, amax[0]), _as8(w, amax[1])) if amax is not None else (None, None)
        k_len = geo.in_per_group * geo.taps
        if not self._conv_ok(geo, x8, w8, k_len) or geo.out_h * geo.out_w == 0 or geo.batch == 0:
            self.routes["conv2d_forward:numba"] += 1
            return self.fallback.conv2d_forward(x, w, geo, out_dtype, seg, amax, rescale)
        self.routes["conv2d_forward"] += 1
        plan = patch_plan((geo.kernel_h, geo.kernel_w), (geo.stride_h, geo.stride_w),
                          (geo.dilation_h, geo.dilation_w), (-geo.pad_top, -geo.pad_left),
                          (0, geo.height, 0, geo.width), (geo.out_h, geo.out_w))
        with threads_for(geo.macs):
            y = self._conv_as_gemm(x8, w8.reshape(geo.out_channels, k_len), plan, rescale)
        return y if rescale is not None else y.astype(out_dtype, copy=False)

    def conv2d_backward_data(self, dy, w, geo, out_dtype, seg, amax=None, rescale=None):
        dy8, w8 = (_as8(dy, amax[0]), _as8(w, amax[1])) if amax is not None else (None, None)
        k_len = geo.out_per_group * geo.taps
        if not self._conv_ok(geo, dy8, w8, k_len) or geo.batch == 0 or geo.height * geo.width == 0:
            self.routes["conv2d_backward_data:numba"] += 1
            return self.fallback.conv2d_backward_data(dy, w, geo, out_dtype, seg, amax, rescale)
        _, c, h, wd = geo.x_shape
        m = geo.out_channels
        wt = w8.transpose(1, 0, 2, 3)  # (C, M, kh, kw): dx's channels are the phase convs' outputs
        phs = phase_plans(geo.height, geo.out_h, geo.kernel_h, geo.stride_h, geo.dilation_h, geo.pad_top)
        pws = phase_plans(geo.width, geo.out_w, geo.kernel_w, geo.stride_w, geo.dilation_w, geo.pad_left)
        jobs, empty = [], False
        for ph in phs:
            for pw in pws:
                if ph.count == 0 or pw.count == 0:
                    continue
                if ph.crop_lo >= ph.crop_hi or pw.crop_lo >= pw.crop_hi:  # no tap reaches dy: zeros
                    empty = True
                    continue
                taps = wt[:, :, list(ph.taps[::-1]), :][:, :, :, list(pw.taps[::-1])]
                kernel = (len(ph.taps), len(pw.taps))
                plan = patch_plan(kernel, (1, 1), (ph.dilation, pw.dilation),
                                  (ph.crop_lo - ph.pad_lo, pw.crop_lo - pw.pad_lo),
                                  (ph.crop_lo, ph.crop_hi, pw.crop_lo, pw.crop_hi), (ph.count, pw.count))
                jobs.append((np.ascontiguousarray(taps.reshape(c, m * kernel[0] * kernel[1])), plan,
                             (ph.first, pw.first)))
        self.routes["conv2d_backward_data"] += 1
        dtype = np.dtype(np.int32) if rescale is None else np.dtype(rescale[1])
        if not jobs:
            return np.zeros(geo.x_shape, out_dtype if rescale is None else dtype)
        with threads_for(geo.macs):
            if len(jobs) == 1 and not empty and jobs[0][1].out_h == h and jobs[0][1].out_w == wd:
                y = self._conv_as_gemm(dy8, jobs[0][0], jobs[0][1], rescale)
                return y if rescale is not None else y.astype(out_dtype, copy=False)
            out = (np.zeros if empty else np.empty)(geo.x_shape, dtype)
            self._phases_as_gemm(dy8, jobs, out, (geo.stride_h, geo.stride_w),
                                 None if rescale is None else rescale[0])
        return out if rescale is not None else out.astype(out_dtype, copy=False)

    def conv2d_backward_weight(self, dy, x, geo, out_dtype, seg, amax=None):
        dy8, x8 = (_as8(dy, amax[0]), _as8(x, amax[1])) if amax is not None else (None, None)
        k_len = geo.in_per_group * geo.taps
        plan = patch_plan((geo.kernel_h, geo.kernel_w), (geo.stride_h, geo.stride_w),
                          (geo.dilation_h, geo.dilation_w), (-geo.pad_top, -geo.pad_left),
                          (0, geo.height, 0, geo.width), (geo.out_h, geo.out_w))
        cols = plan.columns
        if not self._conv_ok(geo, dy8, x8, cols) or geo.batch == 0 or k_len == 0:
            self.routes["conv2d_backward_weight:numba"] += 1
            return self.fallback.conv2d_backward_weight(dy, x, geo, out_dtype, seg)
        self.routes["conv2d_backward_weight"] += 1
        n, m = geo.batch, geo.out_channels
        a_xor = _XOR if x8.dtype == np.int8 else 0  # A must be uint8
        b_xor = _XOR if dy8.dtype == np.uint8 else 0  # B must be int8
        dyb = np.ascontiguousarray(dy8).view(np.uint8).reshape(n, m, geo.out_h * geo.out_w)
        words = geo.out_w % 8 == 0 and m % 8 == 0  # the 8x8-block transpose applies
        dy64 = dyb.view(np.uint64) if words else np.zeros((0, 0, 0), np.uint64)
        # A chunk's reduction runs over its images' columns: at most RAW_TERMS of them per call.
        with threads_for(geo.macs), self._lock:
            chunk, chunks, workers = _chunking(n, k_len * cols, RAW_TERMS // cols)
            a_scratch = self._scratch.get("patches", workers, chunk * k_len * cols, np.uint8)
            b_scratch = self._scratch.get("rows", workers, chunk * cols * m, np.uint8)
            y_scratch = self._scratch.get("wgrad_out", workers, k_len * m, np.int32)
            acc = np.zeros((workers, k_len, m), np.int64)
            self._call(_wgrad_driver, 128 if a_xor else 0, -128 if b_xor else 0,
                       np.ascontiguousarray(x8).view(np.uint8), dyb, dy64, a_scratch, b_scratch,
                       y_scratch[:, :k_len * m].reshape(workers, k_len, m), acc, chunk, plan.used, plan.tap_phase,
                       plan.tap_off, plan.params(), a_xor, b_xor, status_size=chunks)
        dw = np.empty((m, k_len), out_dtype)
        _threads_sum_transposed(acc, dw)
        return dw.reshape(geo.w_shape)
