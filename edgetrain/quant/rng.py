"""Counter-based random numbers for stochastic rounding: reproducible on any machine and thread count.

Element i of the stream named by key (seed, step, layer) is a pure function of those four integers:

    stream = mix(mix(mix(seed ^ TAG_SEED) ^ mix(step ^ TAG_STEP)) ^ mix(layer ^ TAG_LAYER))
    bits_i = mix(stream + (i + 1) * GAMMA)          (all arithmetic mod 2^64)
    u_i    = (bits_i >> 11) * 2^-53                  (uniform on [0, 1), 53-bit grid)

`mix` is the SplitMix64 finaliser (Steele, Lea & Flood 2014; constants from Stafford's "Mix13")
and GAMMA the golden-ratio increment, so bits_0, bits_1, ... are exactly the outputs of a SplitMix64
generator seeded with `stream` (a generator that passes BigCrush). Because mix is a bijection of
64-bit words, streams whose keys differ in one component have different seeds; two streams only
overlap if their seeds differ by a multiple of GAMMA within the drawn length (probability about
n / 2^64). Nothing depends on a global state, the order of evaluation, chunking or threads: the
same key gives the same bits after a resume, on any machine.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit, prange

from edgetrain.kernels.threads import threads_for

MASK64 = (1 << 64) - 1
GAMMA = 0x9E3779B97F4A7C15
MIX_MUL1 = 0xBF58476D1CE4E5B9
MIX_MUL2 = 0x94D049BB133111EB
# Domain-separation tags so that, e.g., (seed=1, step=0) and (seed=0, step=1) name different streams.
TAG_SEED = 0x243F6A8885A308D3
TAG_STEP = 0x13198A2E03707344
TAG_LAYER = 0xA4093822299F31D0
UNIFORM_BITS = 53  # a float64 mantissa: every u is exactly representable
_CHUNK = 1 << 16  # elements per parallel work item


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


def stream_seed(key: RngKey | tuple[int, int, int]) -> int:
    """The 64-bit SplitMix64 state that starts the stream of `key` (integers taken mod 2^64)."""
    k = RngKey.of(key)
    h = mix64(k.seed ^ TAG_SEED)
    h = mix64(h ^ mix64(k.step ^ TAG_STEP))
    return mix64(h ^ mix64(k.layer ^ TAG_LAYER))


@njit(inline="always", cache=True)
def _bits(seed, index):
    """bits_index of the stream starting at `seed` (both uint64)."""
    z = seed + (index + np.uint64(1)) * np.uint64(GAMMA)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(MIX_MUL1)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(MIX_MUL2)
    return z ^ (z >> np.uint64(31))


@njit(inline="always", cache=True)
def uniform_at(seed, index):
    """u_index in [0, 1) as float64."""
    return np.float64(_bits(seed, index) >> np.uint64(64 - UNIFORM_BITS)) * (1.0 / (1 << UNIFORM_BITS))


@njit(parallel=True, cache=True)
def _fill_bits(seed, offset, out):
    n = out.size
    chunks = (n + _CHUNK - 1) // _CHUNK
    for ch in prange(chunks):
        for i in range(ch * _CHUNK, min(n, (ch + 1) * _CHUNK)):
            out[i] = _bits(seed, np.uint64(offset + i))


def random_bits(key: RngKey | tuple[int, int, int], count: int, offset: int = 0) -> np.ndarray:
    """bits_offset .. bits_(offset+count-1) of the stream as uint64."""
    out = np.empty(int(count), np.uint64)
    with threads_for(out.size, _CHUNK):
        _fill_bits(np.uint64(stream_seed(key)), np.int64(offset), out)
    return out


def uniform(key: RngKey | tuple[int, int, int], count: int, offset: int = 0) -> np.ndarray:
    """u_offset .. u_(offset+count-1) of the stream: float64 in [0, 1)."""
    bits = random_bits(key, count, offset)
    return (bits >> np.uint64(64 - UNIFORM_BITS)).astype(np.float64) * (1.0 / (1 << UNIFORM_BITS))
