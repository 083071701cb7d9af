"""Optimizers: update a Model's parameters in place from a dict of gradients."""
from __future__ import annotations

import numpy as np


class SGD:
    """Stochastic gradient descent with momentum, Nesterov and decoupled-from-nothing L2 weight decay,
    matching torch.optim.SGD's update rule."""

    def __init__(self, params: dict[str, np.ndarray], lr: float, momentum: float = 0.0,
                 nesterov: bool = False, weight_decay: float = 0.0):
        if lr <= 0:
            raise ValueError(f"learning rate must be positive, got {lr}")
        self.params = params
        self.lr = lr
        self.momentum = momentum
        self.nesterov = nesterov
        self.weight_decay = weight_decay
        self.velocity: dict[str, np.ndarray] = {}

    def step(self, grads: dict[str, np.ndarray]) -> None:
        """Apply one update; parameters without a gradient are left alone."""
        for name, p in self.params.items():
            g = grads.get(name)
            if g is None:
                continue
            if self.weight_decay:
                g = g + self.weight_decay * p
            if self.momentum:
                v = self.velocity.get(name)
                v = g.copy() if v is None else v * self.momentum + g
                self.velocity[name] = v
                g = g + self.momentum * v if self.nesterov else v
            p -= (self.lr * g).astype(p.dtype, copy=False)
