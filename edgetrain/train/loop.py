"""The one training step every loop shares (`TrainStep`), a minimal supervised loop on it (`fit`: fixed steps,
deterministic shuffling) and top-1 evaluation.

`fit` is kept for scripts; `edgetrain.train.trainer.Trainer` is the full loop (schedules, precision control,
evaluation, logs, checkpoints, resume) and firmware_bridge's workload the profiled one; all three run their
updates through TrainStep. `batches` here and `data.Loader` share the epoch permutation stream, so the same
seed draws the same batches.
"""
from __future__ import annotations

from collections.abc import Callable

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


class TrainStep:
    """One update: number it (`model.step` keys dropout and stochastic rounding), set the learning rate from
    the schedule, forward and backward, let `check` refuse the result, then the optimizer step.

    Everything a step computes is a function of its number and the state before it, in this order; a loop
    only chooses the numbers and the batches (bit-identical runs and resumes depend on it).
    """

    def __init__(self, model: Model, optimizer: Optimizer, schedule: Callable[[int], float] | None = None, *,
                 label_smoothing: float = 0.0, update_buffers: bool = True,
                 check: Callable[[int, float, dict[str, np.ndarray]], None] | None = None):
        self.model = model
        self.optimizer = optimizer
        self.schedule = schedule
        self.label_smoothing = label_smoothing
        self.update_buffers = update_buffers
        self.check = check

    def __call__(self, step: int, x: np.ndarray, y: np.ndarray) -> float:
        """Train on one batch as update number `step`; returns its loss."""
        self.model.step = step
        if self.schedule is not None:
            self.optimizer.lr = self.schedule(step)
        loss, grads = self.model.loss_and_grad(x, y, label_smoothing=self.label_smoothing,
                                               update_buffers=self.update_buffers)
        if self.check is not None:
            self.check(step, loss, grads)
        self.optimizer.step(grads)
        return loss


def fit(model: Model, x: np.ndarray, y: np.ndarray, *, steps: int, batch_size: int, optimizer: Optimizer,
        seed: int = 0, progress: bool = False, desc: str = "train",
        schedule: Callable[[int], float] | None = None) -> list[float]:
    """Train for a number of steps (learning rate from `schedule(step)` if given); returns every step's loss."""
    train_step = TrainStep(model, optimizer, schedule)
    losses = []
    bar = tqdm(total=steps, desc=desc, disable=not progress, leave=False, dynamic_ncols=True)
    for step, idx in zip(range(steps), batches(len(x), batch_size, seed)):
        losses.append(train_step(step, x[idx], y[idx]))
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
