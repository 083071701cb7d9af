"""PyTorch as the reference for exported models: settled BatchNorm statistics and autograd gradients.

Imported only by tests that have already skipped themselves without torch.
"""
from __future__ import annotations

import copy

import numpy as np
import torch
from gradcheck import relative_errors


def settle_batchnorm(module: torch.nn.Module, x: torch.Tensor) -> None:
    """One training-mode pass, so running statistics are not the trivial 0/1 of a fresh model."""
    module.train()
    with torch.no_grad():
        module(x)
    module.eval()


def torch_grads(module: torch.nn.Module, x: np.ndarray, labels: np.ndarray, dtype: torch.dtype):
    """Training-mode cross-entropy loss, parameter gradients (float64 arrays) and the stepped-through copy
    of module in the given float type. Dropout draws its own mask, so it is set to eval: the exporters
    leave it out of an eval-mode export, so the deterministic part is what edgetrain runs."""
    m = copy.deepcopy(module).to(dtype)
    m.train()
    for sub in m.modules():
        if isinstance(sub, torch.nn.Dropout):
            sub.eval()
    loss = torch.nn.functional.cross_entropy(m(torch.from_numpy(x).to(dtype)), torch.from_numpy(labels))
    loss.backward()
    return loss.item(), {k: p.grad.numpy().astype(np.float64) for k, p in m.named_parameters()}, m


def float64_gradients_match(name: str, model64, x: np.ndarray, labels: np.ndarray, t64_loss: float,
                            t64: dict[str, np.ndarray], tol: float) -> None:
    """Assert edgetrain's float64 loss and every parameter gradient are within tol (relative) of autograd's,
    under torch's parameter names."""
    loss64, g64 = model64.loss_and_grad(x, labels)
    assert abs(loss64 - t64_loss) / abs(t64_loss) < tol
    assert set(g64) == set(t64), "parameter names differ from torch's"
    err64 = relative_errors(g64, t64)
    worst = max(err64, key=err64.get)
    assert err64[worst] < tol, f"{name} float64: {worst} relative error {err64[worst]:.2e}"
