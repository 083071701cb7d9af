"""Training losses: each returns (mean loss, gradient with respect to the prediction)."""
from __future__ import annotations

import numpy as np

from edgetrain.errors import DataError
from edgetrain.kernels import detfloat


def softmax_cross_entropy(logits: np.ndarray, labels: np.ndarray,
                          label_smoothing: float = 0.0) -> tuple[float, np.ndarray]:
    """Mean softmax cross-entropy of (N, K) logits against class indices (N,) or target rows (N, K)."""
    if logits.ndim != 2:
        raise DataError(f"cross-entropy needs (batch, classes) logits, got shape {logits.shape}")
    n, k = logits.shape
    labels = np.asarray(labels)
    if labels.ndim == 1:
        if labels.shape[0] != n:
            raise DataError(f"{labels.shape[0]} labels for a batch of {n}")
        if labels.dtype.kind not in "iu":  # np.issubdtype(.., np.integer), without its 4 us a call in a step
            raise DataError(f"class labels must be integers, got {labels.dtype}")
        if labels.size and (labels.min() < 0 or labels.max() >= k):
            raise DataError(f"labels must lie in 0..{k - 1}, got {labels.min()}..{labels.max()}")
        target = np.zeros((n, k), dtype=logits.dtype)
        target[np.arange(n), labels] = 1
    elif labels.shape == (n, k):
        target = labels.astype(logits.dtype)
    else:
        raise DataError(f"targets of shape {labels.shape} do not fit logits of shape {logits.shape}")
    if not 0.0 <= label_smoothing < 1.0:
        raise DataError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    if label_smoothing:
        target = target * (1 - label_smoothing) + label_smoothing / k
    if detfloat.active():  # float64 throughout, fixed-order sums, portable exp/log; rounded once at the end
        grad = np.empty((n, k), np.float64)
        loss = -detfloat.softmax_xent64(np.ascontiguousarray(logits), target.astype(np.float64), grad) / n
        return loss, grad.astype(logits.dtype, copy=False)
    z = logits - logits.max(axis=1, keepdims=True)
    log_softmax = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    loss = -(target * log_softmax).sum() / n
    grad = (np.exp(log_softmax) - target) / n
    return float(loss), grad.astype(logits.dtype, copy=False)


def mean_squared_error(pred: np.ndarray, target: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean over all elements of (pred - target)^2."""
    target = np.asarray(target, dtype=pred.dtype)
    if target.shape != pred.shape:
        raise DataError(f"targets of shape {target.shape} do not fit predictions of shape {pred.shape}")
    diff = pred - target
    return float(detfloat.op_mean(diff * diff)), (2.0 / diff.size) * diff


LOSSES = {"cross_entropy": softmax_cross_entropy, "mse": mean_squared_error}
