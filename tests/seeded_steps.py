"""The seeded training run several bit-for-bit tests compare: SGD steps of a small model on one fixed batch."""
from __future__ import annotations

import numpy as np

from edgetrain.train.optim import SGD

BATCH = 16


def fixed_batch(shape: tuple = (1, 12, 12)) -> tuple[np.ndarray, np.ndarray]:
    """The batch every such run trains on: 16 seeded images of `shape` and labels 0..9 in turn."""
    return np.random.default_rng(5).standard_normal((BATCH,) + shape).astype(np.float32), np.arange(BATCH) % 10


def sgd_steps(model, x: np.ndarray, y: np.ndarray, steps: int = 3) -> None:
    """`steps` SGD updates (lr 0.05, momentum 0.9) on (x, y), each numbered as the model's step."""
    opt = SGD(model.parameters(), 0.05, momentum=0.9)
    for step in range(steps):
        model.step = step
        _, g = model.loss_and_grad(x, y)
        opt.step(g)
