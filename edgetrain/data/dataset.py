"""The arrays training reads: a Dataset per split and the Split pairing train with test."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from edgetrain.data.transforms import Augment
from edgetrain.errors import DataError


@dataclass(frozen=True, eq=False)
class Dataset:
    """Samples x (float32; NCHW images or (N, D) vectors) with int64 class labels y.

    `mean`/`std` hold, per channel, what was subtracted and divided by to make x (zeros and ones if
    x was not normalised), so inference on the device can apply the same to new inputs.
    """

    x: np.ndarray
    y: np.ndarray
    num_classes: int
    name: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.x.dtype != np.float32 or self.x.ndim not in (2, 4):
            raise DataError(f"{self.name}: x must be float32 (N, C, H, W) or (N, D), got {self.x.dtype} {self.x.shape}")
        if self.y.dtype != np.int64 or self.y.shape != (self.x.shape[0],):
            raise DataError(f"{self.name}: y must be int64 ({self.x.shape[0]},), got {self.y.dtype} {self.y.shape}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise DataError(f"{self.name}: mean/std need {self.channels} values, got {len(self.mean)}/{len(self.std)}")

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one sample, without the batch dimension."""
        return tuple(int(d) for d in self.x.shape[1:])

    @property
    def channels(self) -> int:
        """Channels of image data; flat (N, D) vectors count as one channel."""
        return int(self.x.shape[1]) if self.x.ndim == 4 else 1


@dataclass(frozen=True, eq=False)
class Split:
    """A training and a test Dataset, and the augmentation their source calls for (None: none)."""

    train: Dataset
    test: Dataset
    augment: Augment | None = field(default=None)

    @property
    def name(self) -> str:
        """The data source's name (e.g. 'cifar10')."""
        return self.train.name

    @property
    def num_classes(self) -> int:
        """Classes in either split."""
        return max(self.train.num_classes, self.test.num_classes)
