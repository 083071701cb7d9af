"""Array transforms: uint8 pixels to unit floats, and seeded per-batch crop/flip augmentation."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from edgetrain.errors import DataError

PIXEL_MAX = 255.0
# Third SeedSequence word for augmentation, so its stream never equals the loader's shuffling stream
# default_rng([seed, epoch]) when step == epoch.
AUGMENT_STREAM = 1
CIFAR_CROP_PAD = 4
FLIP_PROBABILITY = 0.5


def uint8_to_unit(x: np.ndarray) -> np.ndarray:
    """uint8 pixels to float32 in [0, 1] (x / 255)."""
    return concat_uint8_to_unit([x])


def concat_uint8_to_unit(parts: Sequence[np.ndarray]) -> np.ndarray:
    """Concatenate uint8 arrays along axis 0 into float32 in [0, 1], without a uint8 or float copy."""
    # Filling one preallocated array and dividing in place keeps the peak at the final float32 array
    # plus the uint8 input: on a 1-4 GB board, CIFAR's 600 MB of float32 leaves no room for a second.
    out = np.empty((sum(len(p) for p in parts),) + parts[0].shape[1:], dtype=np.float32)
    start = 0
    for part in parts:
        out[start:start + len(part)] = part
        start += len(part)
    np.divide(out, np.float32(PIXEL_MAX), out=out)
    return out


def augment_rng(seed: int, step: int) -> np.random.Generator:
    """The generator for the augmentation of global step `step`: a function of (seed, step) alone."""
    return np.random.default_rng([seed, step, AUGMENT_STREAM])


def random_crop(x: np.ndarray, pad: int, rng: np.random.Generator) -> np.ndarray:
    """Pad each NCHW image with `pad` zeros per side and crop back to H x W at a random offset."""
    n, c, h, w = x.shape
    padded = np.zeros((n, c, h + 2 * pad, w + 2 * pad), dtype=x.dtype)
    padded[:, :, pad:pad + h, pad:pad + w] = x
    dy = rng.integers(0, 2 * pad + 1, size=n)
    dx = rng.integers(0, 2 * pad + 1, size=n)
    rows = (dy[:, None] + np.arange(h))[:, None, :, None]
    cols = (dx[:, None] + np.arange(w))[:, None, None, :]
    return padded[np.arange(n)[:, None, None, None], np.arange(c)[None, :, None, None], rows, cols]


def random_flip(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Mirror each NCHW image left-right with probability 1/2."""
    flip = rng.random(x.shape[0]) < FLIP_PROBABILITY
    out = x.copy()
    out[flip] = x[flip][..., ::-1]
    return out


@dataclass(frozen=True)
class Augment:
    """Per-batch augmentation: random crop with `pad` zero padding (0: none) and horizontal flip."""

    pad: int = 0
    flip: bool = False

    def __post_init__(self) -> None:
        if self.pad < 0:
            raise DataError(f"augmentation padding must be >= 0, got {self.pad}")

    def __call__(self, x: np.ndarray, seed: int, step: int) -> np.ndarray:
        """Augment the batch of global step `step`; the same (seed, step) always gives the same result."""
        if x.ndim != 4:
            raise DataError(f"crop/flip augmentation needs NCHW images, got a batch of shape {x.shape}")
        # Batches from load_data are normalised already, so zero padding is the mean colour, not black.
        rng = augment_rng(seed, step)
        if self.pad:
            x = random_crop(x, self.pad, rng)
        if self.flip:
            x = random_flip(x, rng)
        return x


# Digits and MNIST get none: a mirrored 2 or 7 is not a digit, and crops cut off strokes.
CIFAR_AUGMENT = Augment(pad=CIFAR_CROP_PAD, flip=True)
