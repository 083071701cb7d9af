"""A deterministic, stratified held-out split for data that ships without a test set."""

from __future__ import annotations

import numpy as np

from edgetrain.errors import DataError

DEFAULT_VAL_FRACTION = 0.1
# Third SeedSequence word, so the held-out choice is independent of the loader's [seed, epoch] shuffles.
HOLDOUT_STREAM = 2


def check_fraction(fraction: float) -> None:
    """Refuse a held-out fraction outside (0, 1)."""
    if not 0.0 < fraction < 1.0:
        raise DataError(f"val_fraction must be between 0 and 1 (exclusive), got {fraction}")


def stratified_holdout(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, held-out) indices: round(N * fraction) samples, each class in proportion."""
    check_fraction(fraction)
    n = int(y.shape[0])
    n_test = int(np.floor(n * fraction + 0.5))
    classes, counts = np.unique(y, return_counts=True)
    # Largest-remainder apportionment: per-class quotas that sum to exactly n_test.
    exact = counts * fraction
    quota = np.floor(exact).astype(np.int64)
    short = n_test - int(quota.sum())
    if short > 0:
        # Stable sort so ties go to the smaller class label: the same data always splits the same way.
        order = np.argsort(-(exact - quota), kind="stable")
        quota[order[:short]] += 1
    rng = np.random.default_rng([seed, HOLDOUT_STREAM])
    held = [rng.permutation(np.flatnonzero(y == c))[:q] for c, q in zip(classes, quota)]
    test_idx = np.sort(np.concatenate(held)) if held else np.zeros(0, np.int64)
    mask = np.ones(n, dtype=bool)
    mask[test_idx] = False
    return np.flatnonzero(mask), test_idx
