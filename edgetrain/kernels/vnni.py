"""Fused 8-bit conv kernels on AVX-512 VNNI (`vpdpbusd`), the same steps on AVX2 (`vpmaddwd`), or on Arm's
dot product (`sdot`: Cortex-A76/A78, the Raspberry Pi 5, Jetson Orin), emitted from Numba through LLVM intrinsics.

`vpdpbusd` multiplies 64 unsigned bytes by 64 signed bytes and adds each group of four products
to one of 16 int32 lanes, exactly (no saturation: 4 * 255 * 128 fits easily). The micro-kernels
keep a block of int32 accumulators in registers (8 x 32 or 16 x 16); per step of 4 reduction
elements they load the unsigned operand (16 columns x 4 bytes per vector: the "VNNI layout") and
broadcast 4 signed bytes of each row (measured ~400-500 G multiply-adds/s on one Zen 5 core,
against ~180-350 for onnxruntime's MLAS on the same convs once its packing is counted).

The kernels lay out their own operands, per image and in cache: the input's channels are copied
once into zero-padded phase planes (as in `im2col`), then

* forward / backward-data (`conv_fused`): the unsigned operand is the patches in VNNI layout,
  B[(tap, c/4)][q][c%4], and the signed rows are the weights; results are rescaled (or stored as
  int32) straight into NCHW. B is never built: the planes are interleaved once per image into
  words of 4 channels (`_interleave`), and B's row (tap, c/4) is then one contiguous run of that
  group's plane from the tap's offset (positions q of the plane grid, whose last columns per row are
  junk and dropped), read in place through a table of row addresses (implicit im2col). Packing B
  per tap cost about as much as the GEMM where the output has few channels (16) to reuse it: forward
  and backward-data of a 16-channel 32x32 conv went 1.3-1.4x faster without it. The stride phases
  of a backward-data all read one plane layout of dy.
* weight gradient (`wgrad_fused`): the unsigned operand is dy in VNNI layout (16 output channels per
  vector; a small transpose), and the signed rows are the patch rows read straight out of the
  planes through per-row pointers (`_make_row_tile`): no patch matrix at all.

A data operand of the wrong signedness is coded with XOR 0x80 (u8 x -> x - 128, s8 dy -> dy + 128)
and the exact correction (the zero-point terms, from sums of the operands) is applied in integers:
folded into the accumulators' initial values (forward) or added after (weight gradient). `sdot`
multiplies s8 by s8, so there the lanes are coded signed instead (`lane_coding`: a u8 operand becomes
x - 128, the correction's sign flips); the rows are s8 in every form.

Exactness: every product and every partial sum is an exact integer in int32 as long as a reduction
has at most `RAW_TERMS` terms (255 * 128 per term), which the backend checks; results never depend
on the thread count or which thread took an image (each output element is summed by one thread in
a fixed order, partial sums are exact integers).

The GEMMs (linear layers, 1x1 convs on small maps) on the same tiles are in `vnni_gemm`.

Only compiled and used when the CPU has AVX-512 VNNI, AVX2 or Arm's dot product (`available()`): emitting
an intrinsic for a CPU without it would abort LLVM, so nothing here is compiled before that check. On AVX2 the
tiles emit each 4-byte step as two `vpmaddwd` (`_TileCode`), the same integers: every layout, tile walk
and bound here holds for both. Measured on a 2-core Zen 3 without VNNI (`tools/bench_kernels.py`,
ResNet-20's convs and GEMMs at batch 128): 100-186 G integer operations/s, against 12-65 for the numba
route's int16 kernels and 70-185 for NumPy's float32 BLAS on the same GEMMs.
"""
from __future__ import annotations

import functools
import os

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from edgetrain.kernels.im2col import channel_planes
from edgetrain.kernels.rescale import image_scale, scale_pair, scale_row
from edgetrain.kernels.sync import fetch_add

# Two tile shapes: 8 rows x 32 columns (2 vectors) where the columns come in 32s, else 16 x 16.
MT = 16  # rows are padded to a multiple of this (the larger tile height)
LANES = 16  # columns are padded to a multiple of this (the narrower tile width)
RAW_TERMS = int(np.iinfo(np.int32).max) // (255 * 128)
# Words a tile may read past the end of an interleaved plane: the junk columns of a job's last tile
# (its columns are rounded up to LANES), computed and dropped.
PLANE_SLACK = 2 * LANES

_JIT = dict(cache=True, fastmath=False, nogil=True)


@functools.lru_cache(maxsize=1)  # the CPU does not change within a process; has_vnni/available/isa all ask
def _host_features() -> dict:
    """LLVM's view of the host CPU's features, or {} where Numba targets a portable CPU (a shared cache
    may then run on a CPU without the instructions these kernels emit). Read only."""
    try:
        import llvmlite.binding as llvm
        import numba

        if numba.config.CPU_NAME not in (None, "host") or numba.config.CPU_FEATURES:
            return {}
        return dict(llvm.get_host_cpu_features())
    except Exception:
        return {}


# Set to "avx2" (tests only, with a NUMBA_CACHE_DIR of their own), the tiles take their AVX2 form on a
# VNNI host too, so that one machine checks both forms. Numba keys its cache by the CPU, not by this.
ISA_ENV = "EDGETRAIN_TILE_ISA"


def _forced() -> str:
    return os.environ.get(ISA_ENV, "").strip().lower()


def has_vnni() -> bool:
    """True when the host has AVX-512 (F, BW) with VNNI (and `ISA_ENV` does not ask for another form):
    the tiles then emit `vpdpbusd`."""
    if _forced() in ("avx2", "sdot"):
        return False
    features = _host_features()
    return all(features.get(f, False) for f in ("avx512f", "avx512bw", "avx512vnni"))


def has_sdot() -> bool:
    """True on an Arm CPU with the dot-product instructions (Armv8.2 `dotprod`: Cortex-A76/A78, the
    Raspberry Pi 5, Jetson Orin), where the tiles emit `sdot`; or where `ISA_ENV` asks for that form (tests
    under emulation, with NUMBA_CPU_NAME naming such a CPU: Numba then reports no host features)."""
    forced = _forced()
    if forced:
        return forced == "sdot"
    return bool(_host_features().get("dotprod", False))


def available() -> bool:
    """True when Numba compiles for this host and the host has AVX-512 VNNI, at least AVX2 (the tiles'
    `vpmaddwd` form), or Arm's dot product (the `sdot` form)."""
    return has_vnni() or has_sdot() or bool(_host_features().get("avx2", False))


def isa() -> str:
    """The instruction set the tiles are emitted for on this host: "avx512vnni", "sdot", "avx2" or ""."""
    if has_vnni():
        return "avx512vnni"
    if has_sdot():
        return "sdot"
    return "avx2" if _host_features().get("avx2", False) else ""


# The forms `auto` takes the tiles in (`routes.choose`): measured faster than onnxruntime's route and Numba's
# (README "Benchmarks"). The `sdot` form is exact (checked on an emulated Cortex-A76) but not yet timed on a
# board, where onnxruntime's own dot-product kernel is the alternative: it runs when asked for.
AUTO_FORMS = ("avx512vnni", "avx2")


def lanes_signed() -> bool:
    """Whether the tiles' lane operand is coded signed: `sdot` multiplies s8 by s8, where `vpdpbusd` (and its
    AVX2 form) multiplies the lanes' u8 by the rows' s8. The rows are s8 in every form; a lane operand of
    the other signedness is coded with XOR 0x80 (`lane_coding`)."""
    return isa() == "sdot"


def lane_coding(lanes_are_signed: bool, tiles_signed: bool | None = None) -> tuple[int, int]:
    """(xor, zero point) for a lane operand of this signedness on this host's tiles (`tiles_signed`: their
    `lanes_signed`, asked when not given): the XOR that codes it into the tiles' lane type, and z with value =
    code + z (u8 x coded s8: x - 128, so z = 128; s8 x coded u8: x + 128, z = -128; 0 when no coding is
    needed). sum rows * values = sum rows * codes + z * sum rows."""
    if lanes_are_signed == (lanes_signed() if tiles_signed is None else tiles_signed):
        return 0, 0
    return 0x80, (-128 if lanes_are_signed else 128)


class _TileCode:
    """The LLVM IR both tile kernels share: one 4-byte dot-product step per int32 lane, C's vectors, the
    k loop. The instruction set is chosen when a tile is compiled (Numba keys its cache by the CPU's
    features, so a cached tile never runs on a CPU it was not emitted for):

    * AVX-512 VNNI: `vpdpbusd` on 16 lanes, the whole tile in registers (32 of them).
    * AVX2: the same step, exactly, in 8 lanes: each word's bytes split into the even and odd bytes
      as int16 (u8 zero- and s8 sign-extended), two `vpmaddwd` (u0*s0 + u2*s2, u1*s1 + u3*s3, each
      at most 2 * 255 * 128 in magnitude) and two int32 adds, which wrap as `vpdpbusd` does. With 16
      registers the tile is computed in sub-tiles of `AVX2_ROWS` rows by `AVX2_VECS` vectors (8
      accumulators, 4 split operand vectors, 2-3 for the broadcast row), each with its own k loop over
      the same operands, which stay in L1. Measured on a 2-core Zen 3 (no VNNI) at ResNet-20's
      shapes, against the int16 kernels of the numba route: see `tools/bench_kernels.py`.
    * Arm dot product: `sdot` by element, 4 int32 lanes a vector, each lane's 4 s8 codes times the row's
      4 s8 codes (the lanes coded signed, `lane_coding`), in sub-tiles of `SDOT_ROWS` x `SDOT_VECS`.
      Checked for exactness on an emulated Cortex-A76 (tools/arm64_board.sh); its speed has not been
      measured on a real board.
    """

    AVX2_ROWS = 4
    AVX2_VECS = 2
    # Arm: 32 registers of 4 int32 lanes, so 4 x 4 accumulators, 4 lane vectors and the broadcast row.
    SDOT_ROWS = 4
    SDOT_VECS = 4

    def __init__(self, builder, c_addr, k4, ldc, split: bool = False):
        self.builder = builder
        self.i8, self.i16, self.i32 = ir.IntType(8), ir.IntType(16), ir.IntType(32)
        self.split = split
        self.sdot = has_sdot()  # split rows too (`_word`): every tile compiles wherever gemm_tile does
        self.wide = has_vnni() and not split
        self.lanes = 16 if self.wide else (4 if self.sdot else 8)
        self.vec = ir.VectorType(self.i32, self.lanes)
        if self.wide:
            self.fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(self.vec, [self.vec] * 3),
                                                     "llvm.x86.avx512.vpdpbusd.512")
        elif self.sdot:
            self.b16 = ir.VectorType(self.i8, 16)
            self.fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(self.vec, [self.vec, self.b16,
                                                                                                 self.b16]),
                                                     "llvm.aarch64.neon.sdot.v4i32.v16i8")
        else:
            self.h16 = ir.VectorType(self.i16, 16)
            self.fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(self.vec, [self.h16] * 2),
                                                     "llvm.x86.avx2.pmadd.wd")
        self.idx = k4.type
        self.k4, self.ldc = k4, ldc
        self.cp = builder.inttoptr(c_addr, self.i8.as_pointer())

    def const(self, value: int):
        return ir.Constant(self.idx, value)

    def vectors(self, columns: int) -> int:
        """How many of this ISA's vectors hold `columns` int32 lanes."""
        return columns // self.lanes

    def c_ptr(self, m: int, v: int):
        """C's vector v (lanes v*lanes..) of row m."""
        b = self.builder
        off = b.add(b.mul(b.mul(self.const(m), self.ldc), self.const(4)), self.const(4 * self.lanes * v))
        return b.bitcast(b.gep(self.cp, [off]), self.vec.as_pointer())

    def splat(self, word):
        """One int32 in every lane."""
        b = self.builder
        v = b.insert_element(ir.Constant(self.vec, ir.Undefined), word, ir.Constant(self.i32, 0))
        return b.shuffle_vector(v, ir.Constant(self.vec, ir.Undefined), ir.Constant(self.vec, None))

    def _halves(self, v, signed: bool):
        """(even bytes, odd bytes) of every word of v as int16 lanes, sign- or zero-extended."""
        b = self.builder
        w = b.bitcast(v, self.h16)
        eight = ir.Constant(self.h16, [8] * 16)
        if signed:
            return b.ashr(b.shl(w, eight), eight), b.ashr(w, eight)
        return b.and_(w, ir.Constant(self.h16, [0xFF] * 16)), b.lshr(w, eight)

    def _word(self, ptr):
        """A split row's step (int16 codes in the order 0, 2, 1, 3, `split_words`) as its 4 int8 codes in one
        int32: the backend splits rows for the AVX2 form only, but the split tiles compile on every host."""
        b = self.builder
        halves = b.load(b.bitcast(ptr, ir.VectorType(self.i16, 4).as_pointer()), align=1)
        codes = b.trunc(halves, ir.VectorType(self.i8, 4))
        undef = ir.Constant(ir.VectorType(self.i8, 4), ir.Undefined)
        return b.bitcast(b.shuffle_vector(codes, undef, ir.Constant(ir.VectorType(self.i32, 4), [0, 2, 1, 3])),
                         self.i32)

    def tile(self, rows: int, vecs: int, init, b_row, a_word_ptr) -> None:
        """C's rows x vecs vectors = init(m, v) + the k loop's dot products, stored: a_word_ptr(m, 4i) points
        at row m's 4 int8 codes of step i (split: a_word_ptr(m, 8i) at its two words of int16 halves), b_row(i)
        at B's row i, the codes of every lane (4 per lane: uint8, or int8 in the `sdot` form)."""
        rg, vg = ((rows, vecs) if self.wide else (self.SDOT_ROWS, self.SDOT_VECS) if self.sdot
                  else (self.AVX2_ROWS, self.AVX2_VECS))
        # Down the rows first: the sub-tiles of one column group read the same run of B, which then stays in
        # L1 (a 1024-long reduction's B is 16 KiB per 16 columns; across the columns first, 32 KiB).
        for v0 in range(0, vecs, vg):
            for r0 in range(0, rows, rg):
                ms, vs = range(r0, min(r0 + rg, rows)), range(v0, min(v0 + vg, vecs))
                accs = {(m, v): cgutils.alloca_once_value(self.builder, init(m, v)) for m in ms for v in vs}
                self._k_loop(accs, ms, vs, b_row, a_word_ptr)
                for (m, v), acc in accs.items():
                    self.builder.store(self.builder.load(acc), self.c_ptr(m, v), align=4)

    def _k_loop(self, accs, ms, vs, b_row, a_word_ptr) -> None:
        b = self.builder
        with cgutils.for_range(b, self.k4) as loop:
            i = loop.index
            brow = b_row(i)
            bvecs = {v: b.load(b.bitcast(b.gep(brow, [self.const(4 * self.lanes * v)]), self.vec.as_pointer()),
                               align=1) for v in vs}
            if self.sdot:
                bvecs = {v: b.bitcast(bv, self.b16) for v, bv in bvecs.items()}
            elif not self.wide:
                bvecs = {v: self._halves(bv, signed=False) for v, bv in bvecs.items()}
            a_off = b.mul(i, self.const(8 if self.split else 4))
            for m in ms:
                ptr = b.bitcast(a_word_ptr(m, a_off), self.i32.as_pointer())
                splat = self.splat(self._word(ptr) if self.sdot and self.split else b.load(ptr, align=1))
                if self.wide:
                    for v in vs:
                        b.store(b.call(self.fn, [b.load(accs[m, v]), bvecs[v], splat]), accs[m, v])
                    continue
                if self.sdot:  # sdot by element: each lane's 4 bytes times the row's 4 bytes, all signed
                    s16 = b.bitcast(splat, self.b16)
                    for v in vs:
                        b.store(b.call(self.fn, [b.load(accs[m, v]), bvecs[v], s16]), accs[m, v])
                    continue
                if self.split:  # the row's halves, split when the weights were packed (`split_words`)
                    s_even = b.bitcast(splat, self.h16)
                    s_odd = b.bitcast(self.splat(b.load(b.gep(ptr, [self.const(1)]), align=1)), self.h16)
                else:
                    s_even, s_odd = self._halves(splat, signed=True)
                for v in vs:
                    u_even, u_odd = bvecs[v]
                    acc = b.add(b.load(accs[m, v]), b.call(self.fn, [u_even, s_even]))
                    b.store(b.add(acc, b.call(self.fn, [u_odd, s_odd])), accs[m, v])


def _make_tile(MT: int, NT: int, split: bool = False):
    @intrinsic
    def tile(typingctx, c_addr, a_addr, brows_addr, b_off, k4, lda, ldc, init_addr):
        """C[m, l] = init[m] + sum_i sum_j A[m*lda + 4i + j] (int8) * B_i[b_off + 4l + j] (uint8; int8 for
        `sdot`) for m < MT, l < 16*NT, i < k4, where B_i starts at the address brows[i] (int64 (k4,) at
        brows_addr): each step's row read straight out of the interleaved planes, at its own offset. C int32 with row
        stride ldc (elements), lda and b_off in bytes, init int32 (MT,). Split: A holds each step's 4 codes
        as int16 in the order 0, 2, 1, 3 (`split_words`), 8 bytes a step, and the tile takes the AVX2 form (on
        Arm, `sdot` of the codes taken back out, `_TileCode._word`)."""
        sig = types.void(types.uintp, types.uintp, types.uintp, types.intp, types.intp, types.intp, types.intp,
                         types.uintp)

        def codegen(context, builder, signature, args):
            c_addr, a_addr, brows_addr, b_off, k4, lda, ldc, init_addr = args
            code = _TileCode(builder, c_addr, k4, ldc, split)
            ap = builder.inttoptr(a_addr, code.i8.as_pointer())
            ip = builder.inttoptr(init_addr, code.i32.as_pointer())
            rp = builder.inttoptr(brows_addr, ir.IntType(64).as_pointer())
            bias = [code.splat(builder.load(builder.gep(ip, [code.const(m)]), align=4)) for m in range(MT)]

            def b_row(i):
                row = builder.inttoptr(builder.load(builder.gep(rp, [i]), align=8), code.i8.as_pointer())
                return builder.gep(row, [b_off])

            code.tile(MT, code.vectors(LANES * NT), lambda m, v: bias[m], b_row,
                      lambda m, off: builder.gep(ap, [builder.add(builder.mul(code.const(m), lda), off)]))
            return context.get_dummy_value()

        return sig, codegen

    return tile


def _make_row_tile(MT: int, NT: int):
    @intrinsic
    def tile(typingctx, c_addr, rows_addr, b_addr, k4, ldb, ldc):
        """C[m, l] += sum_i sum_j A_m[4i + j] (int8) * B[i*ldb + 4l + j] (uint8; int8 for `sdot`) for m < MT, l < 16*NT,
        i < k4, where A_m starts at the address rows[m] (int64 (MT,) at rows_addr): rows read straight
        out of the phase planes, each at its own offset. C int32 with row stride ldc elements."""
        sig = types.void(types.uintp, types.uintp, types.uintp, types.intp, types.intp, types.intp)

        def codegen(context, builder, signature, args):
            c_addr, rows_addr, b_addr, k4, ldb, ldc = args
            code = _TileCode(builder, c_addr, k4, ldc)
            bp = builder.inttoptr(b_addr, code.i8.as_pointer())
            rp = builder.inttoptr(rows_addr, ir.IntType(64).as_pointer())
            rows = [builder.inttoptr(builder.load(builder.gep(rp, [code.const(m)]), align=8), code.i8.as_pointer())
                    for m in range(MT)]
            code.tile(MT, code.vectors(LANES * NT), lambda m, v: builder.load(code.c_ptr(m, v), align=4),
                      lambda i: builder.gep(bp, [builder.mul(i, ldb)]),
                      lambda m, four_i: builder.gep(rows[m], [four_i]))
            return context.get_dummy_value()

        return sig, codegen

    return tile


_row_tile_8x32 = _make_row_tile(8, 2)
_row_tile_16x16 = _make_row_tile(16, 1)
tile_8x32 = _make_tile(8, 2)
tile_16x16 = _make_tile(16, 1)
_split_tile_8x32 = _make_tile(8, 2, split=True)
_split_tile_16x16 = _make_tile(16, 1, split=True)


@njit(**_JIT)
def split_words(packed):
    """The broadcast rows of the AVX2 form, split once: each group of 4 int8 codes (c0, c1, c2, c3) as
    int16 (c0, c2, c1, c3), the two words `vpmaddwd` multiplies with the even and the odd bytes of the
    lanes. Done in the tile, that split costs 3 of a step's 11 vector operations per row."""
    out = np.empty(packed.size, np.int16)
    whole = packed.size // 4
    for g in range(whole):
        out[4 * g] = packed[4 * g]
        out[4 * g + 1] = packed[4 * g + 2]
        out[4 * g + 2] = packed[4 * g + 1]
        out[4 * g + 3] = packed[4 * g + 3]
    for i in range(4 * whole, packed.size):  # no group: as they are (the packed rows come in whole groups)
        out[i] = packed[i]
    return out


@njit(inline="always", **_JIT)
def gemm_tile_count(c):
    """How many output tiles `gemm_tile` splits c into: 8 x 32 where c's width allows, else 16 x 16 (no
    padding to 32 columns)."""
    wide = c.shape[1] % 32 == 0
    return (c.shape[1] // (32 if wide else 16)) * (c.shape[0] // (8 if wide else 16))


@njit(inline="always", **_JIT)
def gemm_tile(a, brows, c, k4, init, t):
    """Output tile t of c = init[row] + a (rows x 4*k4, int8 bytes, or int16 in `split_words`' order) @ B,
    where B's row i (4 bytes per column, uint8) starts at the address brows[i]: c's rows a multiple of MT,
    its columns of LANES, a and c C-contiguous, init int32 (rows,). Tiles go down a column first, so B's
    tile columns stay in L1 across the rows. The conv kernels and the GEMMs (`vnni_gemm`) share this one tile walk."""
    lda = a.shape[1] * a.itemsize
    ldc = c.shape[1]
    wide = ldc % 32 == 0
    rows, cols = (8, 32) if wide else (16, 16)
    row_tiles = c.shape[0] // rows
    p0, m0 = (t // row_tiles) * cols, (t % row_tiles) * rows
    args = (c.ctypes.data + (m0 * ldc + p0) * 4, a.ctypes.data + m0 * lda, brows.ctypes.data, p0 * 4, k4, lda, ldc,
            init.ctypes.data + m0 * 4)
    if a.itemsize == 2:  # rows split by `split_words`
        if wide:
            _split_tile_8x32(*args)
        else:
            _split_tile_16x16(*args)
    elif wide:
        tile_8x32(*args)
    else:
        tile_16x16(*args)


@njit(inline="always", **_JIT)
def gemm_tiles(a, brows, c, k4, init):
    """Every tile of c (`gemm_tile`), on this thread."""
    for t in range(gemm_tile_count(c)):
        gemm_tile(a, brows, c, k4, init, t)


@njit(inline="always", **_JIT)
def _fill(dst, n, value):
    for t in range(n):
        dst[t] = value


@njit(inline="always", **_JIT)
def _image_planes(x, n, planes, used, prm, x8):
    """Phase planes of every channel of image n (`im2col.channel_planes`): planes (C', phases, size)
    arrive with the padding code everywhere (channels beyond C stay so); valid pixels are written."""
    for c in range(x.shape[1]):
        channel_planes(x[n, c], planes[c], used, prm[0], prm[1], prm[2], prm[3], prm[4], prm[5], prm[6], prm[7],
                       prm[8], prm[9], x8)


@njit(inline="always", **_JIT)
def _image_words(x, n, words, prm, x8):
    """What `_image_planes` and `_interleave` write, for a stride-1 layout (one plane), in one pass
    straight from image n: words[c4, 0, i*wq + j] = the codes of channels 4*c4..4*c4+3 at row i + off_h,
    column j + off_w, inside [lo, hi); padding and channels beyond C keep the code the words arrived with
    (measured 1.4 + 0.35 us -> 0.6 us for 16 channels of 32x32)."""
    off_h, off_w, lo_h, hi_h, lo_w, hi_w, hq, wq = prm[2], prm[3], prm[4], prm[5], prm[6], prm[7], prm[8], prm[9]
    i0 = min(hq, max(0, lo_h - off_h))
    i1 = max(i0, min(hq, hi_h - off_h))
    j0 = min(wq, max(0, lo_w - off_w))
    j1 = max(j0, min(wq, hi_w - off_w))
    c_ = x.shape[1]
    pad = np.uint32(x8)
    for c4 in range(words.shape[0]):
        d = words[c4, 0]
        full = 4 * c4 + 3 < c_
        for i in range(i0, i1):
            dst = d[i * wq + j0:i * wq + j1]
            r = i + off_h
            if full:
                r0 = x[n, 4 * c4, r, j0 + off_w:j1 + off_w]
                r1 = x[n, 4 * c4 + 1, r, j0 + off_w:j1 + off_w]
                r2 = x[n, 4 * c4 + 2, r, j0 + off_w:j1 + off_w]
                r3 = x[n, 4 * c4 + 3, r, j0 + off_w:j1 + off_w]
                for t in range(j1 - j0):
                    dst[t] = (np.uint32(r0[t] ^ x8) | (np.uint32(r1[t] ^ x8) << np.uint32(8))
                              | (np.uint32(r2[t] ^ x8) << np.uint32(16)) | (np.uint32(r3[t] ^ x8) << np.uint32(24)))
            else:  # the last group of a channel count that is not a multiple of 4 (an RGB stem)
                for t in range(j1 - j0):
                    word = np.uint32(0)
                    for k in range(4):
                        b = x[n, 4 * c4 + k, r, j0 + off_w + t] ^ x8 if 4 * c4 + k < c_ else pad
                        word |= np.uint32(b) << np.uint32(8 * k)
                    dst[t] = word


@njit(inline="always", **_JIT)
def _interleave(planes, words, used):
    """words[c4, ph, q] (uint32) = the bytes of channels 4*c4..4*c4+3 at position q of phase plane ph:
    the planes in VNNI layout. A tap's patch row of channel group c4 is then the contiguous run
    words[c4, ph, off:off + n_cols], read in place by the tile (implicit im2col: one pass over the
    planes per image instead of one per tap, 9x fewer words written for a 3x3 conv)."""
    for c4 in range(words.shape[0]):
        for ph in range(planes.shape[1]):
            if not used[ph]:
                continue
            r0 = planes[4 * c4, ph]
            r1 = planes[4 * c4 + 1, ph]
            r2 = planes[4 * c4 + 2, ph]
            r3 = planes[4 * c4 + 3, ph]
            d = words[c4, ph]
            for q in range(r0.size):
                d[q] = (np.uint32(r0[q]) | (np.uint32(r1[q]) << np.uint32(8))
                        | (np.uint32(r2[q]) << np.uint32(16)) | (np.uint32(r3[q]) << np.uint32(24)))


@njit(inline="always", **_JIT)
def _emit(cbuf, n, rows, out_h, out_w, wq, scale, fused, out_i, out_f, first_h, first_w, step_h, step_w, row_f):
    """Rows 0..rows-1 of cbuf (the plane grid: out_h rows of wq, junk beyond out_w) into out_i (int32)
    or, fused, times scale[row] (or scale[n, row], see `rescale.scale_rows`) into out_f (`scale_row`), pixel (oh, ow) at
    (first_h + oh*step_h,
    first_w + ow*step_w). Simple loops on purpose: this runs once per output row."""
    if fused and step_w == 1:
        for m in range(rows):
            s = image_scale(scale, n, m)
            crow = cbuf[m]
            for oh in range(out_h):
                scale_row(out_f[n, m, first_h + oh * step_h, first_w:], crow[oh * wq:oh * wq + out_w], s, out_w)
    elif fused:
        for m in range(rows):
            s = image_scale(scale, n, m)
            crow = cbuf[m]
            for oh in range(out_h):
                scale_row(row_f, crow[oh * wq:oh * wq + out_w], s, out_w)
                d = out_f[n, m, first_h + oh * step_h, first_w:]
                for ow in range(out_w):
                    d[ow * step_w] = row_f[ow]
    else:
        for m in range(rows):
            crow = cbuf[m]
            for oh in range(out_h):
                src = crow[oh * wq:oh * wq + out_w]
                d = out_i[n, m, first_h + oh * step_h, first_w:]
                for ow in range(out_w):
                    d[ow * step_w] = src[ow]


@njit(inline="always", **_JIT)
def _emit_pair(acc0, acc1, n, rows, out_h, w0, w1, wq, scale, fused, out_i, out_f, first_h, first_w, step_h):
    """`_emit` of two jobs whose columns interleave in the output (stride 2 across, first columns
    first_w and first_w + 1, w0 and w1 = w0 or w0 - 1 of them): each output row written once, in
    one pass, instead of twice with stride 2."""
    for m in range(rows):
        c0 = acc0[m]
        c1 = acc1[m]
        s = image_scale(scale, n, m) if fused else np.float32(0)
        for oh in range(out_h):
            a = c0[oh * wq:oh * wq + w0]
            b = c1[oh * wq:oh * wq + w1]
            if fused:
                d = out_f[n, m, first_h + oh * step_h, first_w:]
                scale_pair(d, a, b, s, w1)
                if w0 > w1:
                    scale_row(d[2 * w1:], a[w1:], s, 1)
            else:
                d = out_i[n, m, first_h + oh * step_h, first_w:]
                for ow in range(w1):
                    d[2 * ow] = a[ow]
                    d[2 * ow + 1] = b[ow]
                if w0 > w1:
                    d[2 * w1] = a[w1]


@njit(inline="always", **_JIT)
def _job(j, jobs, weights, brows, groups, cbuf, wq, corr_all):
    """Job j's GEMM for the image in the planes, into cbuf: its accumulators (Mpad, cols)."""
    rows, k4, w0, t0, out_h = jobs[j, 0], jobs[j, 1], jobs[j, 2], jobs[j, 3], jobs[j, 5]
    cols = -((-(out_h * wq)) // LANES) * LANES
    mpad = -((-rows) // MT) * MT
    a = weights[w0:w0 + mpad * 4 * k4].reshape((mpad, 4 * k4))
    acc = cbuf[:mpad * cols].reshape((mpad, cols))
    # Accumulators start at -corr[row]: the zero-point correction costs nothing.
    gemm_tiles(a, brows[t0 * groups:t0 * groups + k4], acc, k4, corr_all[j])
    return acc


@njit(parallel=True, **_JIT)
def conv_fused(x, jobs, weights, taps, corr_all, scale, out_i, out_f, planes_w, words_w, brows_w, c_w, rowf_w, used,
               plane_prm, step_h, step_w, xor, workers, counter):
    """Convs of x (N, C, H, W) bytes sharing one phase-plane layout (`plane_prm`): the forward (one
    job) or the stride phases of a backward-data. jobs[j] = (rows M, k4, weight offset, tap offset,
    taps, out_h, out_w, first_h, first_w, pair: job j + 1's columns interleave with j's, `_emit_pair`);
    weights hold each job's (Mpad, 4*k4) int8 rows (order
    (tap, channel)), taps its (phase, offset) pairs, corr_all its per-row corrections (the negated
    zero-point terms, int32 (jobs, Mpad)). Results go to out_f (times scale[row]) when it is not
    empty, else to out_i. words_w[w]: (C'/4, phases, plane + slack) uint32, the slack covering the
    junk columns a tile reads past the last plane; brows_w[w]: int64 (taps * C'/4,), each k step's row
    address; c_w[w]: room for two jobs' accumulators (a pair). counter: int64 (1,) zero, the next image
    to take."""
    n_ = x.shape[0]
    fused = out_f.size > 0
    x8 = np.uint8(xor)
    direct = plane_prm[0] == 1 and plane_prm[1] == 1  # stride 1: one plane, written as words straight away
    for w in prange(workers):
        planes = planes_w[w]
        words = words_w[w]
        brows = brows_w[w]
        cbuf = c_w[w]
        half = cbuf.size // 2  # a pair's second job accumulates in the second half
        row_f = rowf_w[w]
        if not direct:  # the byte planes are used at strides above 1 only
            for ph in range(planes.shape[1]):
                for c in range(planes.shape[0]):
                    _fill(planes[c, ph], planes.shape[2], x8)
        # The padding code in every byte (the slack: junk columns, dropped); valid pixels are written.
        _fill(words.reshape(-1), words.size, np.uint32(x8) * np.uint32(0x01010101))
        groups = words.shape[0]
        # Step i = (tap t, channel group c4) of the taps table reads words[c4, phase(t), offset(t):].
        base = words.ctypes.data
        for t in range(taps.shape[0]):
            for c4 in range(groups):
                brows[t * groups + c4] = base + ((c4 * words.shape[1] + taps[t, 0]) * words.shape[2] + taps[t, 1]) * 4
        while True:
            n = fetch_add(counter.ctypes.data, 1)  # images go to whichever thread is free (`sync`)
            if n >= n_:
                break
            if direct:
                _image_words(x, n, words, plane_prm, x8)
            else:
                _image_planes(x, n, planes, used, plane_prm, x8)
                _interleave(planes, words, used)
            wq = plane_prm[9]
            j = 0
            while j < jobs.shape[0]:
                rows, out_h, out_w, first_h, first_w = jobs[j, 0], jobs[j, 5], jobs[j, 6], jobs[j, 7], jobs[j, 8]
                acc = _job(j, jobs, weights, brows, groups, cbuf[:half], wq, corr_all)
                if jobs[j, 9]:  # job j + 1 fills the columns between job j's
                    acc1 = _job(j + 1, jobs, weights, brows, groups, cbuf[half:], wq, corr_all)
                    _emit_pair(acc, acc1, n, rows, out_h, out_w, jobs[j + 1, 6], wq, scale, fused, out_i, out_f,
                               first_h, first_w, step_h)
                    j += 2
                else:
                    _emit(acc, n, rows, out_h, out_w, wq, scale, fused, out_i, out_f, first_h, first_w, step_h, step_w,
                          row_f)
                    j += 1


@njit(inline="always", **_JIT)
def _add_codes(seg, dst):
    """dst (int32) += the bytes of seg as int8 values."""
    vals = seg.view(np.int8)
    for q in range(vals.size):
        dst[q] += np.int32(vals[q])


@njit(**_JIT)
def _windows(tap_phase, tap_off, span, phases):
    """Per phase plane, the window [lo, hi) covering every tap's run [off, off + span) on it (empty for
    a plane no tap reads)."""
    win = np.zeros((phases, 2), np.int64)
    win[:, 0] = np.iinfo(np.int64).max
    for t in range(tap_phase.size):
        p = tap_phase[t]
        win[p, 0] = min(win[p, 0], tap_off[t])
        win[p, 1] = max(win[p, 1], tap_off[t] + span)
    for p in range(phases):
        if win[p, 1] == 0:
            win[p, 0] = 0
    return win


@njit(**_JIT)
def row_addresses(planes_w, row_off):
    """(workers, K) int64: the address of patch row k in thread w's planes, planes_w[w] + row_off[k] bytes
    (compiled: NumPy's ctypes.data alone took 10 us a call)."""
    out = np.empty((planes_w.shape[0], row_off.size), np.int64)
    for w in range(planes_w.shape[0]):
        base = planes_w[w].ctypes.data
        for k in range(row_off.size):
            out[w, k] = base + row_off[k]
    return out


# k rows of wgrad_finish's transposed store per block: each output row then takes a cache line of them
# at a time instead of one strided value per store.
FINISH_BLOCK = 8


@njit(**_JIT)
def wgrad_finish(total, sx_total, sdy_total, zx, zdy, count, out):
    """out (M, K) = dW from `wgrad_fused`'s per-thread sums: sum over threads of total[:, k, m], less the
    zero-point terms, sum (x - zx)(dy + zdy) = the product - zx * sum(dy) + zdy * sum(x) - zx * zdy * count,
    stored transposed (out's integer type holds dW: the caller's accumulator bound). As NumPy array
    operations (three sums, the correction, a transposed copy) it cost 55 us a call at batch 8, more than
    the 64-channel 8x8 layers' tiles; summed with the threads innermost and stored one value at a time,
    64 us (2 threads, K = 576, M = 64); rows summed over m (which vectorises) and stored in blocks of
    FINISH_BLOCK k, 30 us. Integers: the same values in any order."""
    m_out, k_out = out.shape
    workers = total.shape[0]
    corr = np.empty(m_out, np.int64)  # the terms that depend on m alone: zx * sum(dy) + zx * zdy * count
    for m in range(m_out):
        sdy = np.int64(0)
        for w in range(workers):
            sdy += sdy_total[w, m]
        corr[m] = zx * sdy + zx * zdy * count
    block = np.empty((FINISH_BLOCK, m_out), np.int64)
    for k0 in range(0, k_out, FINISH_BLOCK):
        kb = min(FINISH_BLOCK, k_out - k0)
        for i in range(kb):
            sx = np.int64(0)
            for w in range(workers):
                sx += sx_total[w, k0 + i]
            row = block[i]
            first = total[0, k0 + i]
            for m in range(m_out):
                row[m] = first[m] + corr[m] - zdy * sx
            for w in range(1, workers):
                part = total[w, k0 + i]
                for m in range(m_out):
                    row[m] += part[m]
        for m in range(m_out):
            dst = out[m, k0:k0 + kb]
            for i in range(kb):
                dst[i] = block[i, m]


@njit(parallel=True, **_JIT)
def wgrad_fused(x, dy, total, sx_total, sdy_total, row_addr, planes_w, dyq_w, dyw_w, c_w, used, plane_prm,
                tap_phase, tap_off, out_h, out_w, q4, chunk, x_xor, dy_xor, dy_signed, workers, counter):
    """Weight gradient, lanes = output channels (unsigned codes; signed in the `sdot` form), signed broadcast
    rows = patch rows (c, tap)
    read straight from the phase planes (row_addr[w, k]: their addresses in thread w's planes):
    total[w] (Kpad, Mlanes) int64 += sum over pixels q of xcode[k, q] * dycode[m, q], with xcode the
    plane bytes (x ^ x_xor as int8) over the 4*q4 positions q = oh*wq + ow of the plane grid and
    dycode = dy ^ dy_xor (the lanes' type; the code of 0 at junk and padding positions; dy_signed: dy is
    int8); sx_total[w, k] += the
    plane's real values summed over the same positions and sdy_total[w, m] += dy's (for the zero-point
    correction). Images go to
    whichever thread is free; each thread moves its int32 partial sums to int64 every `chunk` images.
    A patch row's sum is linear in the images, so each thread adds its images' plane codes into int32
    planes (|sum| <= 128 per image) and takes every tap's run of them once at the end: summed per image,
    the runs' heads and tails cost as much as the tiles on 8x8 maps (604 -> 425 us, 32 x 64 x 8 x 8)."""
    n_ = x.shape[0]
    m_ = dy.shape[1]
    x8 = np.uint8(x_xor)
    d8 = np.uint8(dy_xor)
    wq = plane_prm[9]
    kpad = total.shape[1]
    mlanes = total.shape[2]
    k_real = tap_phase.size * x.shape[1]
    zx = 128 if x_xor else 0
    span = 4 * q4
    win = _windows(tap_phase, tap_off, span, planes_w.shape[2])
    for w in prange(workers):
        planes = planes_w[w]
        codes = np.zeros(planes.shape, np.int32)  # this thread's images' plane codes (as int8), summed
        images = 0
        dyq = dyq_w[w]
        dyw = dyw_w[w]
        acc = c_w[w]
        for ph in range(planes.shape[1]):
            for c in range(planes.shape[0]):
                _fill(planes[c, ph], planes.shape[2], x8)
        _fill(dyq.reshape(-1), dyq.size, d8)  # junk and padding: the code of 0, for every image
        acc[:, :] = 0
        done = 0
        while True:
            n = fetch_add(counter.ctypes.data, 1)
            if n >= n_:
                break
            _image_planes(x, n, planes, used, plane_prm, x8)
            for m in range(m_):
                src = dy[n, m]
                row = dyq[m]
                for oh in range(out_h):
                    seg = src[oh * out_w:(oh + 1) * out_w]
                    dst = row[oh * wq:oh * wq + out_w]
                    for t in range(out_w):
                        dst[t] = seg[t] ^ d8
                dsum = np.int32(0)  # dy's real values, int8 or uint8 (whichever way the lanes code them)
                if dy_signed:
                    vals = src.view(np.int8)
                    for p in range(vals.size):
                        dsum += np.int32(vals[p])
                else:
                    for p in range(src.size):
                        dsum += np.int32(src[p])
                sdy_total[w, m] += dsum
            # dyw[g, m] (uint32) = bytes q = 4g..4g+3 of row m: the unsigned operand in VNNI layout.
            words = dyq.view(np.uint32)
            for g in range(q4):
                d = dyw[g]
                for m in range(mlanes):
                    d[m] = words[m, g]
            if mlanes % 32 == 0:
                for k0 in range(0, kpad, 8):
                    for l0 in range(0, mlanes, 32):
                        _row_tile_8x32(acc.ctypes.data + (k0 * mlanes + l0) * 4, row_addr[w, k0:].ctypes.data,
                                       dyw.ctypes.data + l0 * 4, q4, mlanes * 4, mlanes)
            else:
                for k0 in range(0, kpad, 16):
                    for l0 in range(0, mlanes, 16):
                        _row_tile_16x16(acc.ctypes.data + (k0 * mlanes + l0) * 4, row_addr[w, k0:].ctypes.data,
                                        dyw.ctypes.data + l0 * 4, q4, mlanes * 4, mlanes)
            # The codes every tap's run reads, over the window the runs cover on each phase plane.
            for c in range(x.shape[1]):
                for p in range(win.shape[0]):
                    lo, hi = win[p, 0], win[p, 1]
                    _add_codes(planes[c, p, lo:hi], codes[c, p, lo:hi])
            images += 1
            done += 1
            if done == chunk:
                for i in range(k_real):
                    for j in range(m_):
                        total[w, i, j] += acc[i, j]
                acc[:, :] = 0
                done = 0
        for i in range(k_real):
            for j in range(m_):
                total[w, i, j] += acc[i, j]
        # The real values each patch row read, over this thread's images: its run of the summed codes,
        # plus the zero point's 128 for every position of every image.
        for c in range(x.shape[1]):
            for t in range(tap_phase.size):
                run = codes[c, tap_phase[t], tap_off[t]:tap_off[t] + span]
                ssum = np.int64(0)
                for q in range(run.size):
                    ssum += run[q]
                sx_total[w, c * tap_phase.size + t] += ssum + zx * span * images

