"""Deterministic batching: any global step's batch is a function of (seed, step) alone, so resumes match."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from edgetrain.data.dataset import Dataset
from edgetrain.data.transforms import Augment
from edgetrain.errors import DataError

Batch = tuple[np.ndarray, np.ndarray]


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The sample order of one epoch (the same stream edgetrain.train.loop.batches uses)."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def iterate_eval(dataset: Dataset, batch_size: int) -> Iterator[Batch]:
    """Batches in dataset order, the last one possibly short, without augmentation."""
    if batch_size < 1:
        raise DataError(f"batch size must be at least 1, got {batch_size}")
    for start in range(0, len(dataset), batch_size):
        yield dataset.x[start:start + batch_size], dataset.y[start:start + batch_size]


class Loader:
    """Training batches of a Dataset: a fresh permutation per epoch, last partial batch dropped."""

    def __init__(self, dataset: Dataset, batch_size: int, *, seed: int = 0, augment: Augment | None = None):
        if batch_size < 1:
            raise DataError(f"batch size must be at least 1, got {batch_size}")
        if batch_size > len(dataset):
            raise DataError(f"{dataset.name}: batch size {batch_size} is larger than the {len(dataset)} "
                            "training samples")
        if augment is not None and dataset.x.ndim != 4:
            raise DataError(f"{dataset.name}: crop/flip augmentation needs images, but samples have shape "
                            f"{dataset.sample_shape}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.augment = augment
        self.steps_per_epoch = len(dataset) // batch_size
        self._cached: tuple[int, np.ndarray] | None = None  # steps run in order: one permutation per epoch

    def permutation(self, epoch: int) -> np.ndarray:
        """Sample order of an epoch (cached: consecutive steps share it)."""
        if self._cached is None or self._cached[0] != epoch:
            self._cached = (epoch, epoch_permutation(len(self.dataset), self.seed, epoch))
        return self._cached[1]

    def indices_at(self, step: int) -> np.ndarray:
        """Sample indices of global step `step` (epoch = step // steps_per_epoch)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        epoch, within = divmod(step, self.steps_per_epoch)
        start = within * self.batch_size
        return self.permutation(epoch)[start:start + self.batch_size]

    def batch_at(self, step: int) -> Batch:
        """The (x, y) batch of global step `step`, augmented if the loader has an augmentation."""
        idx = self.indices_at(step)
        x, y = self.dataset.x[idx], self.dataset.y[idx]
        if self.augment is not None:
            x = self.augment(x, self.seed, step)
        return x, y

    def batches(self, start_step: int = 0, num_steps: int | None = None) -> Iterator[Batch]:
        """Batches from start_step on (endless if num_steps is None), exactly as batch_at gives them."""
        step = start_step
        while num_steps is None or step < start_step + num_steps:
            yield self.batch_at(step)
            step += 1

    def iterate_eval(self, batch_size: int | None = None) -> Iterator[Batch]:
        """The loader's dataset in order, for evaluation (no shuffling, no augmentation, keeps the tail)."""
        return iterate_eval(self.dataset, self.batch_size if batch_size is None else batch_size)
