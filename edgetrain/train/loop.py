"""A minimal supervised loop (fixed steps, SGD, deterministic shuffling) and top-1 evaluation.

Kept for scripts and the board workload, which need nothing more; `edgetrain.train.trainer.Trainer` is the
full loop (schedules, precision control, evaluation, logs, checkpoints, resume). Both draw the same
batches for a seed: `batches` here and `data.Loader` share the epoch permutation stream.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
from tqdm import tqdm

from edgetrain.data.loader import epoch_permutation
from edgetrain.model import Model
from edgetrain.train.optim import Optimizer


def batches(n: int, batch_size: int, seed: int):
    """Endless minibatch index arrays: a fresh permutation per epoch, from the seed alone."""
    epoch = 0
    while True:
        order = epoch_permutation(n, seed, epoch)
        for start in range(0, n - batch_size + 1, batch_size):
            yield order[start:start + batch_size]
        epoch += 1


def fit(model: Model, x: np.ndarray, y: np.ndarray, *, steps: int, batch_size: int, optimizer: Optimizer,
        seed: int = 0, progress: bool = False, desc: str = "train",
        schedule: Callable[[int], float] | None = None) -> list[float]:
    """Train for a number of steps (learning rate from `schedule(step)` if given); returns every step's loss."""
    losses = []
    bar = tqdm(total=steps, desc=desc, disable=not progress, leave=False, dynamic_ncols=True)
    for step, idx in zip(range(steps), batches(len(x), batch_size, seed)):
        model.step = step
        if schedule is not None:
            optimizer.lr = schedule(step)
        loss, grads = model.loss_and_grad(x[idx], y[idx])
        optimizer.step(grads)
        losses.append(loss)
        bar.update(1)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-10:]):.3f}")
    bar.close()
    return losses


def predict(model: Model, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Eval-mode logits of a whole array, in batches."""
    return np.concatenate([model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])


def accuracy(model: Model, x: np.ndarray, y: np.ndarray, batch_size: int = 256) -> float:
    """Top-1 accuracy in [0, 1]."""
    return float((predict(model, x, batch_size).argmax(axis=1) == y).mean())
