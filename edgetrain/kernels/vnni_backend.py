"""VNNI backend: convs on the fused AVX-512 VNNI kernels of `vnni`; GEMMs and everything else as
the onnxruntime backend does them (which in turn hands what it cannot do to Numba).

A conv runs here when both operands are 8-bit codes, groups == 1, the operand broadcast by the
micro-kernel is int8 (the weights; the output gradient in a weight gradient) and every reduction
fits `vnni.RAW_TERMS`; otherwise the onnxruntime backend takes the call. Before first use the backend
checks the CPU (`vnni.available`) and compares the kernels on worst-case operands with a NumPy int64
reference (`usable`).
"""
from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from numba import njit

from edgetrain.kernels import vnni as _vn
from edgetrain.kernels import vnni_gemm as _vg
from edgetrain.kernels.geometry import conv2d_geometry
from edgetrain.kernels.im2col import channel_major, position_major
from edgetrain.kernels.numba_backend import NumbaBackend, phase_plans
from edgetrain.kernels.ort_backend import OrtBackend, _as8, patch_plan
from edgetrain.kernels.rescale import rescaled, rescaled_channel_major, scale_rows
from edgetrain.kernels.threads import pool_threads, threads_for
from edgetrain.kernels.unfold import fold, unfold

_XOR = 0x80


def _round_up(v: int, m: int) -> int:
    return -(-v // m) * m


class _Scratch:
    """Scratch buffers (one slab per name), kept between calls and grown on demand; handed out as
    C-contiguous arrays of the asked shape (per-thread parts are the leading axis)."""

    MAX_SETS = 512

    def __init__(self):
        self._bufs: dict[str, np.ndarray] = {}
        self._sets: dict[tuple, tuple[np.ndarray, ...]] = {}  # get_set's, dropped whenever a slab grows

    def get(self, name: str, shape: tuple, dtype) -> np.ndarray:
        size = math.prod(shape)
        buf = self._bufs.get(name)
        if buf is None or buf.dtype != dtype or buf.size < size:
            buf = np.empty(max(size, 1), dtype)
            self._bufs[name] = buf
            self._sets.clear()  # their views may hold the old slab: neither stale nor kept alive
        return buf[:size].reshape(shape)

    def get_set(self, key: tuple, specs: Callable[[], list[tuple[str, tuple, np.dtype]]]) -> tuple[np.ndarray, ...]:
        """`get` of each (name, shape, dtype) that specs() lists, kept under key (which must fix them) until a
        slab grows: a conv's five buffers cost 8 us a call one by one, which at batch 8 is a fifth of a
        small conv's time outside its kernel."""
        arrays = self._sets.get(key)
        if arrays is None:
            if len(self._sets) >= self.MAX_SETS:  # keys hold geometry programs, which their caches may evict
                self._sets.clear()
            arrays = tuple(self.get(*spec) for spec in specs())
            self._sets[key] = arrays
        return arrays


@dataclass(frozen=True, eq=False)
class _ConvProgram:
    """Everything `conv_fused` needs that depends on the geometry only (cached per geometry): the
    plane layout, the jobs table and taps, and where each packed weight byte comes from."""

    plane: dict
    # (jobs, 10) int64: rows, k4, weight offset, tap offset, taps, out_h, out_w, first_h, first_w, pair
    table: np.ndarray
    taps: np.ndarray  # (T, 2) int64: (phase, offset)
    w_index: np.ndarray  # flat index into w.reshape(-1) of every packed weight byte; -1: a zero pad
    job_blocks: np.ndarray  # (jobs, 4) int64, per job: weight offset, padded rows, K, rows
    corr_len: int
    out_shape: tuple
    step: tuple
    zero: bool  # some output positions are reached by no job (they must be 0)
    cpad: int
    words_per_plane: int  # a plane's words plus the slack the last tile's junk columns read past it
    c_size: int
    out_w_max: int


def _rows_index(idx_mck: np.ndarray, cpad: int) -> np.ndarray:
    """Weights (M, C, taps) as the kernel's rows (Mpad, taps*cpad) in (tap, channel) order, for an index
    tensor of them: each packed byte's flat index into w, -1 for the zero padding."""
    m, c, taps = idx_mck.shape
    rows = np.full((_round_up(m, _vn.MT), taps, cpad), -1, np.int64)
    rows[:m, :, :c] = idx_mck.transpose(0, 2, 1)
    return rows.reshape(rows.shape[0], taps * cpad)


def _pairs(table: np.ndarray, step: tuple) -> np.ndarray:
    """pair[j] = 1 where job j + 1 writes the columns between job j's (stride 2 across, the same rows:
    `vnni._emit_pair` writes both at once), each job in at most one pair."""
    pair = np.zeros(len(table), np.int64)
    if step[1] != 2:
        return pair
    j = 0
    while j + 1 < len(table):
        a, b = table[j], table[j + 1]
        if (a[0] == b[0] and a[5] == b[5] and a[7] == b[7] and b[8] == a[8] + 1 and a[6] - 1 <= b[6] <= a[6]):
            pair[j] = 1
            j += 2
        else:
            j += 1
    return pair


def _program(plane, cpad, jobs, out_shape, step, zero) -> _ConvProgram:
    """jobs: (weight index rows (Mpad, K), rows, taps [(phase, offset)], (out_h, out_w), (first_h, first_w))."""
    table, index, taps, blocks = [], [], [], []
    w_off = t_off = 0
    for rows_idx, rows, tap_list, (oh, ow), (fh, fw) in jobs:
        rows_pad, k = rows_idx.shape
        table.append([rows, k // 4, w_off, t_off, len(tap_list), oh, ow, fh, fw])
        index.append(rows_idx.reshape(-1))
        taps.extend(tap_list)
        blocks.append((w_off, rows_pad, k, rows))
        w_off += rows_idx.size
        t_off += len(tap_list)
    table = np.array(table, np.int64)
    table = np.concatenate([table, _pairs(table, step)[:, None]], axis=1)
    cols = [_round_up(int(oh) * plane["wq"], _vn.LANES) for oh in table[:, 5]]
    return _ConvProgram(
        plane=plane, table=table, taps=np.array(taps, np.int64).reshape(-1, 2), w_index=np.concatenate(index),
        job_blocks=np.array(blocks, np.int64).reshape(-1, 4), corr_len=_round_up(int(table[:, 0].max()), _vn.MT),
        out_shape=tuple(out_shape),
        step=tuple(step), zero=zero, cpad=cpad,
        words_per_plane=plane["hq"] * plane["wq"] + _vn.PLANE_SLACK,
        c_size=max(_round_up(int(r), _vn.MT) * cl for r, cl in zip(table[:, 0], cols)),
        out_w_max=int(table[:, 6].max()))


@lru_cache(maxsize=256)
def _forward_program(geo) -> _ConvProgram:
    plan = patch_plan((geo.kernel_h, geo.kernel_w), (geo.stride_h, geo.stride_w),
                      (geo.dilation_h, geo.dilation_w), (-geo.pad_top, -geo.pad_left),
                      (0, geo.height, 0, geo.width), (geo.out_h, geo.out_w))
    plane = {"phases": plan.stride[0] * plan.stride[1], "hq": plan.hq, "wq": plan.wq, "used": plan.used,
             "prm": np.array([plan.stride[0], plan.stride[1], plan.off[0], plan.off[1], *plan.lo_hi,
                              plan.hq, plan.wq], np.int64)}
    m, cpad = geo.out_channels, _round_up(geo.in_channels, 4)
    idx = np.arange(m * geo.in_channels * geo.taps).reshape(m, geo.in_channels, geo.taps)
    taps = list(zip(plan.tap_phase.tolist(), plan.tap_off.tolist()))
    return _program(plane, cpad, [(_rows_index(idx, cpad), m, taps, (geo.out_h, geo.out_w), (0, 0))],
                    geo.y_shape, (1, 1), False)


@lru_cache(maxsize=256)
def _backward_data_program(geo) -> _ConvProgram | None:
    c, m = geo.in_channels, geo.out_channels
    oh_, ow_ = geo.out_h, geo.out_w
    phs = phase_plans(geo.height, oh_, geo.kernel_h, geo.stride_h, geo.dilation_h, geo.pad_top)
    pws = phase_plans(geo.width, ow_, geo.kernel_w, geo.stride_w, geo.dilation_w, geo.pad_left)
    live = [(ph, pw) for ph in phs for pw in pws if ph.count and pw.count
            and ph.crop_lo < ph.crop_hi and pw.crop_lo < pw.crop_hi]
    if not live:
        return None
    full = sum(ph.count for ph in phs) * sum(pw.count for pw in pws)
    covered = sum(ph.count * pw.count for ph, pw in live)

    # A phase reads dy rows i + ti*dil + crop_lo - pad_lo: one plane, shifted by `top` rows, holds them all.
    def margins(plans, size):
        lo = max(0, max(p.pad_lo - p.crop_lo for p in plans))
        hi = max(0, max((p.count - 1) + (len(p.taps) - 1) * p.dilation + p.crop_lo - p.pad_lo - size + 1
                        for p in plans))
        return lo, hi

    top, bottom = margins([ph for ph, _ in live], oh_)
    left, right = margins([pw for _, pw in live], ow_)
    wq = ow_ + left + right
    hq = oh_ + top + bottom + 1
    plane = {"phases": 1, "hq": hq, "wq": wq, "used": np.ones(1, np.bool_),
             "prm": np.array([1, 1, -top, -left, 0, oh_, 0, ow_, hq, wq], np.int64)}
    mpad4 = _round_up(m, 4)
    wt = np.arange(m * c * geo.taps).reshape(m, c, geo.kernel_h, geo.kernel_w).transpose(1, 0, 2, 3)  # (C, M, kh, kw)
    jobs = []
    for ph, pw in live:
        sub = wt[:, :, list(ph.taps[::-1]), :][:, :, :, list(pw.taps[::-1])]
        th, tw = len(ph.taps), len(pw.taps)
        taps = [(0, (i * ph.dilation + ph.crop_lo - ph.pad_lo + top) * wq
                 + j * pw.dilation + pw.crop_lo - pw.pad_lo + left) for i in range(th) for j in range(tw)]
        jobs.append((_rows_index(sub.reshape(c, m, th * tw), mpad4), c, taps, (ph.count, pw.count),
                     (ph.first, pw.first)))
    step = (geo.stride_h, geo.stride_w)
    return _program(plane, mpad4, jobs, geo.x_shape, step, covered < full)


@njit(cache=True, nogil=True)
def _pack_weights(w_flat, w_index, blocks, corr, zp):
    """The kernel's weight rows: packed[i] = w_flat[w_index[i]], 0 where the index is -1 (padding). With
    a zero point zp (the data operand coded with XOR 0x80, data = code + zp: `vnni.lane_coding`),
    corr[j, r] = zp * (sum of job j's row r): the accumulators start there. One compiled call for what took a
    gather and a NumPy sum per job (about 15 us a conv at batch 8)."""
    packed = np.empty(w_index.size, np.int8)
    for i in range(w_index.size):
        k = w_index[i]
        packed[i] = w_flat[k] if k >= 0 else 0
    if zp:
        for j in range(blocks.shape[0]):
            w0, k, rows = blocks[j, 0], blocks[j, 2], blocks[j, 3]
            for r in range(rows):
                row = packed[w0 + r * k:w0 + (r + 1) * k]
                total = 0
                for t in range(k):
                    total += np.int64(row[t])
                corr[j, r] = zp * total
    return packed


# A one-channel conv runs unfolded (`unfold_rows`) when that saves at least this many reduction steps of
# 4 codes. Measured forward, 2 threads, min of 5 interleaved runs: LeNet-5's 5x5 first conv (25 -> 10
# steps) 167 -> 155 us at batch 8 and 911 -> 870 us at 128, a 5x5 to 16 channels 170 -> 152 us, a 7x7
# stride-2 stem on 64x64 (49 -> 14) 196 -> 187 us; a 3x3 stem (9 -> 3) went 198 -> 206 us at batch 8 and
# 1117 -> 1165 us at 128: the unfolding pass costs more than 6 steps save.
UNFOLD_MIN_STEPS_SAVED = 12


def unfolds_rows(geo) -> bool:
    """Whether `unfold_rows` pays for this forward: the kernel's rows as channels save at least
    `UNFOLD_MIN_STEPS_SAVED` reduction steps (a conv of one channel, a grayscale stem: the VNNI words
    hold 4 channels, so 3 bytes of each are padding), and the unfolded input is no larger than the output."""
    steps = geo.kernel_h * geo.kernel_w * -(-geo.in_channels // 4)
    unfolded = geo.kernel_w * -(-(geo.in_channels * geo.kernel_h) // 4)
    return (geo.groups == 1 and steps - unfolded >= UNFOLD_MIN_STEPS_SAVED
            and geo.in_channels * geo.kernel_h <= geo.out_channels)


@njit(cache=True, nogil=True)
def _unfold_rows(x, out, sh, dh, top):
    """out[n, c, r, i] = x[n, c, i*sh + r*dh - top], or 0 where that row is padding (one compiled pass:
    as NumPy slices it cost 12 us of LeNet-5's 120 us first conv)."""
    h = x.shape[2]
    for n in range(out.shape[0]):
        for c in range(out.shape[1]):
            for r in range(out.shape[2]):
                for i in range(out.shape[3]):
                    row = i * sh + r * dh - top
                    dst = out[n, c, r, i]
                    if 0 <= row < h:
                        src = x[n, c, row]
                        for j in range(dst.size):
                            dst[j] = src[j]
                    else:
                        for j in range(dst.size):
                            dst[j] = 0


def unfold_rows(x8: np.ndarray, w8: np.ndarray, geo):
    """The same conv with the kernel's rows as channels: x8 (N, C, H, W) becomes (N, C*kH, OH, W), channel
    c*kH + r of output row i holding input row i*sH + r*dH - pad_top of channel c (the code 0, the value 0
    in either signedness, where that row is padding), and the weights (M, C, kH, kW) their (M, C*kH, 1, kW)
    view; a (1, kW) kernel, stride (1, sW), the same columns' padding. Every product and sum is the
    original's, so the integers are the same."""
    n, c, h, w = x8.shape
    kh = geo.kernel_h
    out = np.empty((n, c, kh, geo.out_h, w), x8.dtype)
    _unfold_rows(np.ascontiguousarray(x8).view(np.uint8), out.view(np.uint8), geo.stride_h, geo.dilation_h,
                 geo.pad_top)
    ugeo = conv2d_geometry((n, c * kh, geo.out_h, w), (geo.out_channels, c * kh, 1, geo.kernel_w),
                           (1, geo.stride_w), (0, geo.pad_left, 0, geo.pad_right), (1, geo.dilation_w))
    return (out.reshape(n, c * kh, geo.out_h, w),
            np.ascontiguousarray(w8).reshape(geo.out_channels, c * kh, 1, geo.kernel_w), ugeo)


class VnniBackend(OrtBackend):
    """Convs on the fused 8-bit tiles of `vnni` (AVX-512 VNNI, or their AVX2 form); the rest as `OrtBackend`."""

    name = "vnni"
    # Weight gradients of small images (fewer reduction positions per image than this) go to the
    # onnxruntime backend: this kernel reduces one image per pass, whose few steps then cannot
    # amortise loading and storing the accumulator tiles (measured 8x8 images: 2.05 vs 1.75 ms)...
    WGRAD_MIN_SPAN = 256
    # ...unless those tiles are small (patch rows times output channels up to this): then onnxruntime's
    # per-call cost is the larger. Measured at batch 8, VNNI against onnxruntime: LeNet-5's conv2 (150 x 16,
    # 10x10) 47 against 66 us, 16 -> 16 channels 3x3 on 8x8 38 against 48 us; at 16 -> 32 channels on 8x8
    # (4,608) they are level (58 against 55), at 32 -> 32 (9,216) onnxruntime wins (82 against 94).
    # Where onnxruntime is not usable (an AVX2 CPU, whose MatMulInteger saturates) they stay here: Numba's
    # int16 kernels are the next step down, and the tiles beat them 4-5x (Zen 3, 64 -> 64 channels on 8x8).
    WGRAD_SMALL_TILES = 3072

    def __init__(self, fallback: NumbaBackend | None = None):
        super().__init__(fallback)
        self._vnni_ok: bool | None = None
        self._split: bool | None = None
        self._lanes_signed: bool | None = None
        self._vlock = threading.Lock()
        self._vscratch = _Scratch()

    @property
    def vnni_usable(self) -> bool:
        """The CPU has AVX-512 VNNI or AVX2 and the kernels pass a worst-case exactness check."""
        if self._vnni_ok is None:
            from edgetrain.kernels.routes import route_ok

            self._vnni_ok = route_ok("vnni") and self.vnni_kernels_pass()  # route_ok asks vnni.available() first
        return self._vnni_ok

    @property
    def _split_rows(self) -> bool:
        """The convs' weight rows go in split (`vnni.split_words`): the tiles' AVX2 form."""
        if self._split is None:
            self._split = _vn.isa() == "avx2"
        return self._split

    def _lane_coding(self, lanes_are_signed: bool) -> tuple[int, int]:
        """`vnni.lane_coding` on this backend's tiles, their lanes' signedness asked once (as `_split_rows`):
        asking per call read the environment three times a conv call, 200 times a MobileNetV2 step."""
        if self._lanes_signed is None:
            self._lanes_signed = _vn.lanes_signed()
        return _vn.lane_coding(lanes_are_signed, self._lanes_signed)

    def vnni_kernels_pass(self) -> bool:
        """Compile the VNNI kernels in this process and check them on worst-case operands."""
        try:
            return self._self_check()
        except Exception:
            return False

    def _self_check(self) -> bool:
        from edgetrain.kernels.geometry import conv2d_geometry

        rng = np.random.default_rng(7)
        for x, w in ((np.full((2, 9, 5, 6), 255, np.uint8), np.full((10, 9, 3, 3), -128, np.int8)),
                     (rng.integers(0, 256, (3, 5, 7, 7), dtype=np.uint8), rng.integers(-128, 128, (9, 5, 3, 3),
                                                                                        dtype=np.int8)),
                     (np.full((2, 4, 4, 4), -128, np.int8), np.full((3, 4, 3, 3), 127, np.int8))):
            geo = conv2d_geometry(x.shape, w.shape, 1, (1, 1, 1, 1))
            y = self._forward(x, w, geo, None)
            xp = np.pad(x.astype(np.int64), ((0, 0), (0, 0), (1, 1), (1, 1)))
            want = np.zeros(geo.y_shape, np.int64)
            for r in range(3):
                for s in range(3):
                    want += np.einsum("nchw,mc->nmhw", xp[:, :, r:r + geo.out_h, s:s + geo.out_w],
                                      w[:, :, r, s].astype(np.int64))
            if not np.array_equal(y, want):
                return False
            dy = rng.integers(-128, 128, geo.y_shape, dtype=np.int8)
            dw = self._wgrad(dy, x, geo, np.dtype(np.int64))
            want_w = np.zeros(w.shape, np.int64)
            for r in range(3):
                for s in range(3):
                    want_w[:, :, r, s] = np.einsum("nmhw,nchw->mc", dy.astype(np.int64),
                                                   xp[:, :, r:r + geo.out_h, s:s + geo.out_w])
            if not np.array_equal(dw, want_w):
                return False
        for a, b in ((np.full((3, 37), 255, np.uint8), np.full((5, 37), -128, np.int8)),
                     (np.full((17, 9), -128, np.int8), np.full((4, 9), -128, np.int8)),
                     (rng.integers(-128, 128, (6, 70), dtype=np.int8), rng.integers(0, 256, (33, 70), dtype=np.uint8))):
            if not np.array_equal(self._gemm(a, b), a.astype(np.int64) @ b.astype(np.int64).T):
                return False
        return True

    # -------------------------------------------------------------------------------- GEMM

    # From this many multiply-accumulates a VNNI GEMM deals its tiles to the threads; below, one thread
    # (a parallel launch costs more than such a GEMM: (8, 400) x (400, 120) runs in about 2 us).
    GEMM_PARALLEL_WORK = 1 << 21

    def gemm_nt(self, a, bt, out_dtype, seg, amax=None):
        a8, b8 = (_as8(a, amax[0]), _as8(bt, amax[1])) if amax is not None else (None, None)
        if (a8 is None or b8 is None or (a8.dtype == np.uint8 and b8.dtype == np.uint8) or a.shape[0] == 0
                or bt.shape[0] == 0 or not 0 < a.shape[1] <= _vn.RAW_TERMS or not self.vnni_usable):
            return super().gemm_nt(a, bt, out_dtype, seg, amax)
        self.routes["gemm_nt:vnni"] += 1
        return self._gemm(a8, b8).astype(out_dtype, copy=False)

    def _gemm(self, a8, b8):
        """a8 @ b8^T (int32) on the VNNI tiles: an int8 operand gives the broadcast rows, the other the
        lanes (in `vnni_gemm.pack_words`' layout, coded unsigned with XOR 0x80 if it is int8, the zero-point
        term then folded into the accumulators' start). Replaces a session run (about 20 us whatever
        the size) or Numba's loops for the linear layers: (8, 400) x (400, 120) 20 -> 9 us a call."""
        # flip: rows from bt, lanes from a, the result transposed. The rows must be the int8 operand; where
        # both are, the one with more rows when it can serve in place, since only the lanes are packed
        # (a transpose): the MLP's (128, 784) x (512, 784) int8 forward 168 -> 139 us a call.
        flip = a8.dtype != np.int8 or (b8.dtype == np.int8 and b8.shape[0] > a8.shape[0]
                                       and b8.shape[0] % _vn.MT == 0 and b8.shape[1] % 4 == 0
                                       and b8.flags.c_contiguous and a8.flags.c_contiguous)
        s, u = (b8, a8) if flip else (a8, b8)
        xor, zp = self._lane_coding(u.dtype == np.int8)
        rows, lanes = s.shape[0], u.shape[0]
        work = rows * lanes * s.shape[1]
        # Rows of whole words go in as words: their transpose is the packing (`vnni_gemm.transpose_u32`).
        u = u.view(np.uint32) if u.flags.c_contiguous and u.shape[1] % 4 == 0 else u.view(np.uint8)
        if work < self.GEMM_PARALLEL_WORK:
            c = _vg.gemm_small(s, u, xor, zp)
        else:
            k4, rpad, lpad = -(-s.shape[1] // 4), _round_up(rows, _vn.MT), _round_up(lanes, _vn.LANES)
            with threads_for(work), self._vlock:
                sc = self._vscratch
                c = np.empty((rpad, lpad), np.int32)
                _vg.gemm_large(s, u, xor, zp, pool_threads(),
                               sc.get("gemm_s", (rpad, 4 * k4), np.int8), sc.get("gemm_u", (k4, lpad), np.uint32),
                               sc.get("gemm_init", (rpad,), np.int32), c)
        out = c[:rows, :lanes]
        return out.T if flip else out

    # -------------------------------------------------------------------------------- routing

    def _vnni_conv(self, geo, data8, w8, k_len) -> bool:
        return (data8 is not None and w8 is not None and w8.dtype == np.int8 and geo.groups == 1 and geo.batch > 0
                and 0 < k_len <= _vn.RAW_TERMS and self.vnni_usable)

    # 1x1 convs (stride 1, no padding) whose images have at most this many positions run as one GEMM
    # over the whole batch: image by image, the tiles' 16 lanes hold one image's few positions
    # (MobileNetV2's last 1x1 conv, 112 -> 1280 channels on 1x1 maps at batch 8: forward 160 -> 17 us,
    # weight gradient 321 -> 19 us). Measured at batch 8: the GEMM wins forward and backward-data up
    # to 8x8 maps (36-59 -> 24-48 us), loses at 16x16 (48-64 -> 71-89 us, the transposes), while the
    # weight gradient still wins there (47-82 -> 15-79 us).
    POINTWISE_GEMM_POSITIONS = 64
    POINTWISE_WGRAD_POSITIONS = 256

    def _pointwise(self, geo, a8, b8, positions: int) -> bool:
        """A 1x1 conv with at most `positions` per image, both operands 8-bit codes, one of them int8."""
        return (geo.kernel_h == geo.kernel_w == 1 and geo.stride_h == geo.stride_w == 1
                and geo.dilation_h == geo.dilation_w == 1 and geo.groups == 1
                and geo.pad_top == geo.pad_left == geo.pad_bottom == geo.pad_right == 0
                and 0 < geo.height * geo.width <= positions and geo.batch > 0
                and a8 is not None and b8 is not None and np.int8 in (a8.dtype, b8.dtype) and self.vnni_usable)

    # Convs (groups 1, not the pointwise ones above) with at most this many output positions per image and at
    # least this many weights run as one GEMM over the batch's patch matrix (`unfold`), the input gradient
    # folded back onto the pixels (`unfold.fold`): per image, the fused tiles' columns are mostly padding there
    # (a 4x4 output reads 6-wide plane rows: 16 positions in 32 columns) and each image reads the weights
    # again, where the patch matrix costs a pass over its bytes, which few output channels do not repay.
    # Measured on one Zen 3 thread (AVX2), 3x3 convs, fused -> patches (forward / backward-data / weight
    # gradient, ms): 512 channels on 4x4 maps at batch 4 8.0 / 9.9 / 12.0 -> 4.2 / 3.9 / 4.1; 256 -> 512 at
    # stride 2 onto 4x4 4.2 / 4.7 / 5.5 -> 1.9 / 1.9 / 1.9; 1024 channels on 2x2 22 / 33 / 41 -> 3.4 / 5.4 / 9.6;
    # 256 on 5x5 2.4 / 3.1 / 2.7 -> 1.7 / 1.8 / 1.7, on 6x6 level, on 8x8 level or worse; 128 on 4x4 at batch
    # 8 0.77 / 0.75 / 0.95 -> 0.68 / 0.68 / 0.70, at batch 32 level; 64 on 4x4 at batch 8 0.23 / 0.31 / 0.50
    # -> 0.51 / 0.51 / 0.51 (fused).
    SMALL_MAP_POSITIONS = 25
    SMALL_MAP_MIN_WEIGHTS = 1 << 17  # 128 -> 128 channels at 3x3 is 147,456; 96 -> 96, about level, 82,944

    def _small_map(self, geo, a8, b8) -> bool:
        """A conv with few output positions per image and many weights (`SMALL_MAP_POSITIONS`), both operands
        8-bit codes, one of them int8."""
        return (geo.groups == 1 and 0 < geo.out_h * geo.out_w <= self.SMALL_MAP_POSITIONS and geo.batch > 0
                and geo.out_channels * geo.in_channels * geo.taps >= self.SMALL_MAP_MIN_WEIGHTS
                and geo.height * geo.width > 0 and a8 is not None and b8 is not None
                and np.int8 in (a8.dtype, b8.dtype) and self.vnni_usable)

    @staticmethod
    def _patches(t8: np.ndarray, geo) -> np.ndarray:
        """The batch's patch matrix (C*kH*kW, N*OH*OW) of t8 (N, C, H, W), in t8's dtype (`unfold.unfold`)."""
        out = np.empty((geo.in_channels * geo.taps, geo.batch * geo.out_h * geo.out_w), t8.dtype)
        unfold(np.ascontiguousarray(t8).view(np.uint8), out.view(np.uint8), geo.kernel_h, geo.kernel_w, geo.stride_h,
               geo.stride_w, geo.dilation_h, geo.dilation_w, geo.pad_top, geo.pad_left, geo.out_h, geo.out_w)
        return out

    @staticmethod
    def _positions(t8: np.ndarray) -> np.ndarray:
        """(N, C, H, W) -> (N*H*W, C): one row per position, its channels contiguous (`im2col.position_major`)."""
        n, c, h, w = t8.shape
        if h * w == 1:
            return t8.reshape(n, c)
        out = np.empty((n * h * w, c), t8.dtype)
        position_major(np.ascontiguousarray(t8).reshape(n, c, -1).view(np.uint8), out.view(np.uint8))
        return out

    @staticmethod
    def _channels(t8: np.ndarray) -> np.ndarray:
        """(N, C, H, W) -> (C, N*H*W): one row per channel, every position of the batch in it (on 1x1
        maps a transposed view, which the GEMM's packing reads as it is; else `im2col.channel_major`)."""
        n, c = t8.shape[:2]
        if t8.shape[2] * t8.shape[3] == 1:
            return t8.reshape(n, c).T
        out = np.empty((c, n * t8.shape[2] * t8.shape[3]), t8.dtype)
        channel_major(np.ascontiguousarray(t8).reshape(n, c, -1).view(np.uint8), out.view(np.uint8))
        return out

    def _pointwise_out(self, acc: np.ndarray, shape: tuple, out_dtype, rescale):
        """acc (C, N*H*W) back to (N, C, H, W): rescaled as every conv route does (`rescaled`), or int."""
        n, c, h, w = shape
        if rescale is not None and acc.flags.c_contiguous:
            return rescaled_channel_major(acc, shape, rescale)
        nchw = acc.reshape(c, n, h, w).transpose(1, 0, 2, 3)
        if rescale is not None:
            return rescaled(nchw, rescale)
        return np.ascontiguousarray(nchw).astype(out_dtype, copy=False)

    def conv2d_forward(self, x, w, geo, out_dtype, seg, amax=None, rescale=None):
        x8, w8 = (_as8(x, amax[0]), _as8(w, amax[1])) if amax is not None else (None, None)
        k_len = geo.taps * _round_up(geo.in_channels, 4)
        if self._pointwise(geo, x8, w8, self.POINTWISE_GEMM_POSITIONS) and k_len <= _vn.RAW_TERMS:
            self.routes["conv2d_forward:vnni_gemm"] += 1
            acc = self._gemm(w8.reshape(geo.out_channels, geo.in_channels), self._positions(x8))
            return self._pointwise_out(acc, geo.y_shape, out_dtype, rescale)
        if self._small_map(geo, x8, w8) and geo.in_channels * geo.taps <= _vn.RAW_TERMS:
            self.routes["conv2d_forward:vnni_patches"] += 1
            acc = self._gemm(w8.reshape(geo.out_channels, -1), self._patches(x8, geo).T)
            return self._pointwise_out(acc, geo.y_shape, out_dtype, rescale)
        if not self._vnni_conv(geo, x8, w8, k_len) or geo.out_h * geo.out_w == 0:
            return super().conv2d_forward(x, w, geo, out_dtype, seg, amax, rescale)
        self.routes["conv2d_forward:vnni"] += 1
        with threads_for(geo.macs):
            if unfolds_rows(geo):
                self.routes["conv2d_forward:vnni_rows"] += 1
                x8, w8, geo = unfold_rows(x8, w8, geo)
            y = self._forward(x8, w8, geo, rescale)
        return y if rescale is not None else y.astype(out_dtype, copy=False)

    def conv2d_backward_data(self, dy, w, geo, out_dtype, seg, amax=None, rescale=None):
        dy8, w8 = (_as8(dy, amax[0]), _as8(w, amax[1])) if amax is not None else (None, None)
        k_len = geo.taps * _round_up(geo.out_channels, 4)
        if self._pointwise(geo, dy8, w8, self.POINTWISE_GEMM_POSITIONS) and k_len <= _vn.RAW_TERMS:
            self.routes["conv2d_backward_data:vnni_gemm"] += 1
            # dy's positions as the rows (in place), the weights' columns as the lanes: (N*H*W, C)
            acc = self._gemm(self._positions(dy8), w8.reshape(geo.out_channels, geo.in_channels).T)
            return self._pointwise_out(acc.T, geo.x_shape, out_dtype, rescale)
        if self._small_map(geo, dy8, w8) and k_len <= _vn.RAW_TERMS:
            self.routes["conv2d_backward_data:vnni_patches"] += 1
            # each patch's gradient (N*OH*OW, C*kH*kW), then folded onto the pixels it read: k_len bounds every sum
            cols = self._gemm(self._positions(dy8), w8.reshape(geo.out_channels, -1).T)
            dx = np.empty(geo.x_shape, np.int32)
            fold(cols, dx, geo.kernel_h, geo.kernel_w, geo.stride_h, geo.stride_w, geo.dilation_h, geo.dilation_w,
                 geo.pad_top, geo.pad_left, geo.out_h, geo.out_w)
            return rescaled(dx, rescale) if rescale is not None else dx.astype(out_dtype, copy=False)
        if not self._vnni_conv(geo, dy8, w8, k_len) or geo.height * geo.width == 0:
            return super().conv2d_backward_data(dy, w, geo, out_dtype, seg, amax, rescale)
        self.routes["conv2d_backward_data:vnni"] += 1
        with threads_for(geo.macs):
            dx = self._backward_data(dy8, w8, geo, rescale)
        return dx if rescale is not None else dx.astype(out_dtype, copy=False)

    def conv2d_backward_weight(self, dy, x, geo, out_dtype, seg, amax=None):
        dy8, x8 = (_as8(dy, amax[0]), _as8(x, amax[1])) if amax is not None else (None, None)
        span = _round_up(geo.out_h * (geo.out_w + (geo.kernel_w - 1) * geo.dilation_w // geo.stride_w + 1), 4)
        if (self._pointwise(geo, dy8, x8, self.POINTWISE_WGRAD_POSITIONS)
                and geo.batch * geo.out_h * geo.out_w <= _vn.RAW_TERMS):
            self.routes["conv2d_backward_weight:vnni_gemm"] += 1
            acc = self._gemm(self._channels(dy8), self._channels(x8))  # (M, C): every position of the batch
            return np.ascontiguousarray(acc).reshape(geo.w_shape).astype(out_dtype, copy=False)
        if self._small_map(geo, dy8, x8) and geo.batch * geo.out_h * geo.out_w <= _vn.RAW_TERMS:
            self.routes["conv2d_backward_weight:vnni_patches"] += 1
            acc = self._gemm(self._channels(dy8), self._patches(x8, geo))  # (M, C*kH*kW): every position of the batch
            return np.ascontiguousarray(acc).reshape(geo.w_shape).astype(out_dtype, copy=False)
        if ((span < self.WGRAD_MIN_SPAN and geo.in_channels * geo.taps * geo.out_channels > self.WGRAD_SMALL_TILES
             and self.usable)
                or x8 is None or dy8 is None or geo.groups != 1 or geo.batch == 0
                or geo.out_h * geo.out_w == 0 or geo.in_channels * geo.taps == 0 or span > _vn.RAW_TERMS
                or not self.vnni_usable):
            return super().conv2d_backward_weight(dy, x, geo, out_dtype, seg, amax)
        self.routes["conv2d_backward_weight:vnni"] += 1
        with threads_for(geo.macs):
            return self._wgrad(dy8, x8, geo, out_dtype)

    # ----------------------------------------------------------------------------- the kernels

    def _run_convs(self, x8, w8, prog: _ConvProgram, rescale):
        """Run `vnni.conv_fused` for a program (the forward, or the stride phases of a backward-data)."""
        n = x8.shape[0]
        xor, zp = self._lane_coding(x8.dtype == np.int8)  # the data operand takes the lanes' signedness
        corr = np.zeros((prog.job_blocks.shape[0], prog.corr_len), np.int32)
        weights = _pack_weights(np.ascontiguousarray(w8).reshape(-1), prog.w_index, prog.job_blocks, corr, zp)
        if self._split_rows:
            weights = _vn.split_words(weights)
        if rescale is None:
            out_i = (np.zeros if prog.zero else np.empty)(prog.out_shape, np.int32)
            out_f = np.zeros((0, 0, 0, 0), np.float32)
            scale = np.zeros((1, 1), np.float32)
            row_dtype = np.dtype(np.float32)
        else:
            out_i = np.zeros((0, 0, 0, 0), np.int32)
            out_f = (np.zeros if prog.zero else np.empty)(prog.out_shape, rescale[1])
            scale = scale_rows(rescale[0])
            row_dtype = out_f.dtype
        workers = max(1, min(pool_threads(), n))
        plane = prog.plane
        with self._vlock:
            planes_w, words_w, brows_w, c_w, rowf_w = self._vscratch.get_set(
                (prog, workers, row_dtype.char), lambda: [  # .char, not .name: 1 us
                    ("planes", (workers, prog.cpad, plane["phases"], plane["hq"] * plane["wq"]), np.uint8),
                    ("words", (workers, prog.cpad // 4, plane["phases"], prog.words_per_plane), np.uint32),
                    ("brows", (workers, len(prog.taps) * (prog.cpad // 4)), np.int64),
                    ("c", (workers, 2 * prog.c_size), np.int32),
                    ("rowf_" + row_dtype.char, (workers, prog.out_w_max), row_dtype)])
            _vn.conv_fused(np.ascontiguousarray(x8).view(np.uint8), prog.table, weights, prog.taps, corr, scale,
                           out_i, out_f, planes_w, words_w, brows_w, c_w, rowf_w, plane["used"], plane["prm"],
                           prog.step[0], prog.step[1], xor, workers, np.zeros(1, np.int64))
        return out_f if rescale is not None else out_i

    def _forward(self, x8, w8, geo, rescale):
        return self._run_convs(x8, w8, _forward_program(geo), rescale)

    def _backward_data(self, dy8, w8, geo, rescale):
        """dx as the stride phases of the transposed conv (see `numba_backend.phase_plans`), all read
        from one zero-padded stride-1 plane layout of dy, per image in one pass."""
        prog = _backward_data_program(geo)
        if prog is None:  # no tap reaches dy at all
            return np.zeros(geo.x_shape, np.int32 if rescale is None else rescale[1])
        return self._run_convs(dy8, w8, prog, rescale)

    def _wgrad(self, dy8, x8, geo, out_dtype):
        """dW from patch rows read straight out of x's phase planes (signed codes, broadcast) and dy in
        VNNI layout (unsigned codes, 16 output channels per vector): see `vnni.wgrad_fused`."""
        g = _wgrad_geometry(geo)
        n, c, m = geo.batch, geo.in_channels, geo.out_channels
        x_xor = _XOR if x8.dtype == np.uint8 else 0  # the broadcast operand is signed
        dy_signed = dy8.dtype == np.int8
        dy_xor, dy_zp = self._lane_coding(dy_signed)  # the vector operand takes the lanes' signedness
        workers = max(1, min(pool_threads(), n))
        with self._vlock:
            planes_w, dyq_w, dyw_w, c_w = self._vscratch.get_set((g, workers, c), lambda: [
                ("planes", (workers, c, g.phases, g.plane_size), np.uint8),
                ("dyq", (workers, g.mlanes, g.span), np.uint8),
                ("dyw", (workers, g.q4, g.mlanes), np.uint32),
                ("cw", (workers, g.kpad, g.mlanes), np.int32)])
            row_addr = _vn.row_addresses(planes_w, g.row_off)
            total = np.zeros((workers, g.kpad, g.mlanes), np.int64)
            sx_total = np.zeros((workers, g.kpad), np.int64)
            sdy_total = np.zeros((workers, m), np.int64)
            _vn.wgrad_fused(np.ascontiguousarray(x8).view(np.uint8),
                            np.ascontiguousarray(dy8).view(np.uint8).reshape(n, m, geo.out_h * geo.out_w), total,
                            sx_total, sdy_total, row_addr, planes_w, dyq_w, dyw_w, c_w, g.used, g.prm, g.tap_phase,
                            g.tap_off, geo.out_h, geo.out_w, g.q4, g.chunk, x_xor, dy_xor, dy_signed, workers,
                            np.zeros(1, np.int64))
        dw = np.empty((m, g.k_real), out_dtype)
        _vn.wgrad_finish(total, sx_total, sdy_total, 128 if x_xor else 0, -dy_zp, g.span * n, dw)
        return dw.reshape(geo.w_shape)


@dataclass(frozen=True, eq=False)
class _WgradGeometry:
    used: np.ndarray
    prm: np.ndarray
    tap_phase: np.ndarray
    tap_off: np.ndarray
    phases: int
    plane_size: int
    q4: int
    span: int
    k_real: int
    kpad: int
    mlanes: int
    chunk: int
    row_off: np.ndarray  # byte offset of patch row k in one thread's planes (C, phases, plane_size)


@lru_cache(maxsize=256)
def _wgrad_geometry(geo) -> _WgradGeometry:
    plan = patch_plan((geo.kernel_h, geo.kernel_w), (geo.stride_h, geo.stride_w),
                      (geo.dilation_h, geo.dilation_w), (-geo.pad_top, -geo.pad_left),
                      (0, geo.height, 0, geo.width), (geo.out_h, geo.out_w))
    taps = geo.taps
    k_real = geo.in_channels * taps
    kpad = _round_up(k_real, 16)
    q4 = -(-geo.out_h * plan.wq // 4)
    phases = plan.stride[0] * plan.stride[1]
    plane_size = plan.hq * plan.wq + 4  # a shifted run of span bytes may end 3 bytes past the grid
    ks = np.arange(kpad)
    cc, tt = ks // taps, np.minimum(ks % taps, taps - 1)
    row_off = np.where(ks < k_real, (cc * phases + plan.tap_phase[tt]) * plane_size + plan.tap_off[tt], 0)
    prm = np.array([plan.stride[0], plan.stride[1], plan.off[0], plan.off[1], *plan.lo_hi, plan.hq, plan.wq],
                   np.int64)
    return _WgradGeometry(used=plan.used, prm=prm, tap_phase=plan.tap_phase, tap_off=plan.tap_off, phases=phases,
                          plane_size=plane_size, q4=q4, span=4 * q4, k_real=k_real, kpad=kpad,
                          mlanes=_round_up(geo.out_channels, 16), chunk=max(1, _vn.RAW_TERMS // (4 * q4)),
                          row_off=row_off.astype(np.int64))
