"""Counter-based random numbers for stochastic rounding: reproducible on any machine and thread count.

Element i of the stream named by key (seed, step, layer) is a pure function of those four integers:

    stream = mix(mix(mix(seed ^ TAG_SEED) ^ mix(step ^ TAG_STEP)) ^ mix(layer ^ TAG_LAYER))   (64 bits)
    k0, m  = low 32 bits of stream, high 32 bits of stream | 1
    bits_i = lowbias32(i * m + k0)                               (all arithmetic mod 2^32)
    u_i    = (bits_i >> 8) * 2^-24                               (float32 on [0, 1), 24-bit grid)

`mix` is the SplitMix64 finaliser (Steele, Lea & Flood 2014; constants from Stafford's "Mix13"), so
streams whose keys differ in one component get unrelated words. `lowbias32` is Wellons' 32-bit integer
hash (xorshift-multiply, two rounds; a bijection of 32-bit words with low avalanche bias), applied to a
Weyl sequence whose odd step m and offset k0 come from the stream word: two streams are shifted copies
of each other only if their steps are equal (a 2^-31 chance for two keys), and within a stream no value
of i * m + k0 repeats for 2^32 indices, the most a stream may draw. Nothing depends on a global state,
the order of evaluation, chunking or threads: the same key gives the same bits after a resume, on any
machine.

Why 32 bits: the stochastic-rounding loop runs over every gradient of a step. SplitMix64's three 64-bit
multiplies (three micro-ops each on AVX-512, emulated on NEON) and the float64 arithmetic around them
made it 2.4 cycles a value on a 2.6 GHz Xeon; here three 32-bit multiplies (the Weyl step's and
lowbias32's two) make the bits, and the 24-bit uniform is exact in float32, so the loop stays in 32-bit
lanes throughout: 1.3 cycles a value. The 24-bit grid adds a bias below 2^-24 of a step
(docs/NUMERICS.md).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

MASK64 = (1 << 64) - 1
MASK32 = (1 << 32) - 1
MIX_MUL1 = 0xBF58476D1CE4E5B9
MIX_MUL2 = 0x94D049BB133111EB
LOWBIAS_MUL1 = 0x7FEB352D
LOWBIAS_MUL2 = 0x846CA68B
# Domain-separation tags so that, e.g., (seed=1, step=0) and (seed=0, step=1) name different streams.
TAG_SEED = 0x243F6A8885A308D3
TAG_STEP = 0x13198A2E03707344
TAG_LAYER = 0xA4093822299F31D0
UNIFORM_BITS = 24  # a float32 mantissa: every u is exactly representable
MAX_DRAWS = 1 << 32  # indices a stream may draw: its Weyl sequence repeats after that


@dataclass(frozen=True)
class RngKey:
    """Names one stream of random numbers: (seed of the run, training step, layer id)."""

    seed: int
    step: int
    layer: int

    @classmethod
    def of(cls, key: RngKey | tuple[int, int, int]) -> RngKey:
        """Accept an RngKey or a (seed, step, layer) tuple."""
        if isinstance(key, RngKey):
            return key
        seed, step, layer = key
        return cls(int(seed), int(step), int(layer))


def mix64(z: int) -> int:
    """The SplitMix64 finaliser on a Python int (a bijection of 64-bit words)."""
    z &= MASK64
    z = ((z ^ (z >> 30)) * MIX_MUL1) & MASK64
    z = ((z ^ (z >> 27)) * MIX_MUL2) & MASK64
    return z ^ (z >> 31)


@functools.lru_cache(maxsize=4096)
def _mixed(value: int, tag: int) -> int:
    """mix64(value ^ tag), kept: a run's seed and its layers' ids recur every step (a batch-8 step names
    a stream per layer, and five Python mixes cost 2.5 us each time)."""
    return mix64(value ^ tag)


def stream_seed(key: RngKey | tuple[int, int, int]) -> int:
    """The 64-bit word that names the stream of `key` (integers taken mod 2^64; `stream_words` splits it)."""
    seed, step, layer = (key.seed, key.step, key.layer) if isinstance(key, RngKey) else key
    h = mix64(_mixed(int(seed), TAG_SEED) ^ mix64(int(step) ^ TAG_STEP))
    return mix64(h ^ _mixed(int(layer), TAG_LAYER))


def check_draws(offset: int, count: int) -> None:
    """ValueError unless indices offset .. offset + count - 1 lie in a stream's 0 .. 2^32 - 1 (`MAX_DRAWS`)."""
    if offset < 0 or offset + count > MAX_DRAWS:
        raise ValueError(f"a random stream draws indices 0 .. 2^32 - 1; asked for {count} from index {offset}")


@njit(cache=True, inline="always")
def stream_words(seed: np.uint64) -> tuple[np.uint32, np.uint32]:
    """(k0, m) of a stream word (`stream_seed`, as uint64): the Weyl sequence's offset and its odd step
    (compiled: the quantiser's kernels split the word they are handed with this same function)."""
    return np.uint32(seed & np.uint64(MASK32)), np.uint32((seed >> np.uint64(32)) | np.uint64(1))


def _as_i32(builder, value):
    """value (any LLVM integer) mod 2^32."""
    width = value.type.width
    i32 = ir.IntType(32)
    return value if width == 32 else builder.trunc(value, i32) if width > 32 else builder.zext(value, i32)


@intrinsic
def uniform_at(typingctx, j, base, k0, m):
    """u_(base + j) (float32) of the stream whose words are k0, m (uint32); the index is taken mod 2^32.

    An intrinsic because Numba widens 32-bit integer arithmetic to 64 bits (64-bit multiplies take three
    micro-ops on AVX-512); here every operation is 32-bit, as written. j apart from base: a loop's
    counter, added to base in 32 bits here (their 64-bit sum made the quantiser's loop 0.64 ns a value
    instead of 0.49)."""
    if not isinstance(j, types.Integer) or not isinstance(base, types.Integer) or k0 != types.uint32 \
            or m != types.uint32:
        return None

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        i = builder.add(_as_i32(builder, args[0]), _as_i32(builder, args[1]))
        z = builder.add(builder.mul(i, args[3]), args[2])
        z = builder.xor(z, builder.lshr(z, ir.Constant(i32, 16)))
        z = builder.mul(z, ir.Constant(i32, LOWBIAS_MUL1))
        z = builder.xor(z, builder.lshr(z, ir.Constant(i32, 15)))
        z = builder.mul(z, ir.Constant(i32, LOWBIAS_MUL2))
        z = builder.xor(z, builder.lshr(z, ir.Constant(i32, 16)))
        top = builder.lshr(z, ir.Constant(i32, 32 - UNIFORM_BITS))  # < 2^24: exact as a signed conversion
        return builder.fmul(builder.sitofp(top, ir.FloatType()), ir.Constant(ir.FloatType(), 2.0 ** -UNIFORM_BITS))

    return types.float32(j, base, k0, m), codegen


def random_bits(key: RngKey | tuple[int, int, int], count: int, offset: int = 0) -> np.ndarray:
    """bits_offset .. bits_(offset+count-1) of the stream as uint32 (NumPy: the reference the compiled
    `uniform_at` is tested against)."""
    check_draws(offset, count)
    k0, m = stream_words(np.uint64(stream_seed(key)))
    z = np.arange(offset, offset + count, dtype=np.uint64).astype(np.uint32) * m + k0  # wraps mod 2^32
    z ^= z >> np.uint32(16)
    z *= np.uint32(LOWBIAS_MUL1)
    z ^= z >> np.uint32(15)
    z *= np.uint32(LOWBIAS_MUL2)
    z ^= z >> np.uint32(16)
    return z


def uniform(key: RngKey | tuple[int, int, int], count: int, offset: int = 0) -> np.ndarray:
    """u_offset .. u_(offset+count-1) of the stream: float32 in [0, 1)."""
    bits = random_bits(key, count, offset)
    return (bits >> np.uint32(32 - UNIFORM_BITS)).astype(np.float32) * np.float32(2.0 ** -UNIFORM_BITS)
