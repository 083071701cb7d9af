"""Normalisation with training-split statistics, and seeded per-batch crop/flip augmentation."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from edgetrain.data.dataset import Dataset, Split
from edgetrain.errors import DataError

PIXEL_MAX = 255.0
# Samples per chunk when summing statistics: bounds the float64 temporaries to a few MB even for
# CIFAR-100's 50,000 images on a board with little memory.
STATS_CHUNK = 1024
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


def _channel_view(x: np.ndarray) -> np.ndarray:
    """x as (N, C, rest): flat (N, D) vectors are one channel."""
    return x.reshape(x.shape[0], x.shape[1], -1) if x.ndim == 4 else x.reshape(x.shape[0], 1, -1)


def channel_stats(x: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) standard deviation of x, accumulated in float64."""
    if x.shape[0] == 0:
        raise DataError("cannot compute normalisation statistics of an empty training split")
    view = _channel_view(x)
    count = view.shape[0] * view.shape[2]
    total = np.zeros(view.shape[1])
    for start in range(0, view.shape[0], STATS_CHUNK):
        total += view[start:start + STATS_CHUNK].sum(axis=(0, 2), dtype=np.float64)
    mean = total / count
    # Second pass over deviations rather than E[x^2] - E[x]^2, which cancels badly in float64 too.
    squares = np.zeros_like(mean)
    for start in range(0, view.shape[0], STATS_CHUNK):
        dev = view[start:start + STATS_CHUNK].astype(np.float64) - mean[None, :, None]
        squares += np.einsum("ncd,ncd->c", dev, dev)
    std = np.sqrt(squares / count)
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def apply_normalization(dataset: Dataset, mean: tuple[float, ...], std: tuple[float, ...], *,
                        copy: bool = True) -> Dataset:
    """Return dataset with x = (x - mean) / std per channel, and mean/std recorded (copy=False: x in place)."""
    # A constant channel has std 0; dividing by 1 leaves it at zero instead of NaN.
    safe_std = tuple(s if s > 0.0 else 1.0 for s in std)
    shape = (1, len(mean), 1, 1) if dataset.x.ndim == 4 else (1, 1)
    x = dataset.x.copy() if copy else dataset.x
    x -= np.asarray(mean, dtype=np.float32).reshape(shape)
    x /= np.asarray(safe_std, dtype=np.float32).reshape(shape)
    return dataclasses.replace(dataset, x=x, mean=tuple(mean), std=safe_std)


def normalize_split(split: Split, *, copy: bool = True) -> Split:
    """Normalise both splits with the training split's per-channel statistics (copy=False: in place)."""
    mean, std = channel_stats(split.train.x)
    return dataclasses.replace(split, train=apply_normalization(split.train, mean, std, copy=copy),
                               test=apply_normalization(split.test, mean, std, copy=copy))


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
