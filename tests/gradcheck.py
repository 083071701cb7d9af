"""Finite-difference gradient checking for edgetrain models, in float64."""
from __future__ import annotations

import numpy as np

import edgetrain


def relative_error(analytic: np.ndarray, numeric: np.ndarray) -> float:
    """Norm-wise relative error: ||a - n|| / max(||n||, ||a||, tiny)."""
    a, n = np.ravel(analytic), np.ravel(numeric)
    scale = max(np.linalg.norm(n), np.linalg.norm(a), 1e-30)
    return float(np.linalg.norm(a - n) / scale)


def check_model_gradients(model: "edgetrain.Model", feeds: dict, *, training: bool = True, samples: int = 24,
                          h: float = 1e-6, seed: int = 0) -> dict[str, float]:
    """Compare analytic gradients of L = sum(R * outputs) with central differences.

    Checks every parameter and every float graph input on up to `samples` random coordinates each;
    returns {tensor name: relative error}.
    """
    rng = np.random.default_rng(seed)
    model = model.astype(np.float64) if model.dtype != np.float64 else model
    feeds = {k: (v.astype(np.float64) if np.issubdtype(v.dtype, np.floating) else v) for k, v in feeds.items()}
    state = model._state()
    env, tape = model.executor.forward(model._feeds(feeds), state, training, record=True, seed=(0, 0))
    weights = {o.name: rng.standard_normal(env[o.name].shape) for o in model.graph.outputs
               if np.issubdtype(env[o.name].dtype, np.floating)}

    def loss() -> float:
        out, _ = model.executor.forward(model._feeds(feeds), state, training, seed=(0, 0))
        return float(sum((w * out[k]).sum() for k, w in weights.items()))

    grads = model.executor.backward(tape, weights)
    targets = {**{k: v for k, v in model.parameters().items()},
               **{k: v for k, v in feeds.items() if np.issubdtype(v.dtype, np.floating)}}
    errors = {}
    for name, tensor in targets.items():
        flat = tensor.reshape(-1)
        idx = rng.choice(flat.size, size=min(samples, flat.size), replace=False)
        numeric = np.empty(idx.size)
        for j, i in enumerate(idx):
            old = flat[i]
            flat[i] = old + h
            up = loss()
            flat[i] = old - h
            down = loss()
            flat[i] = old
            numeric[j] = (up - down) / (2 * h)
        analytic = grads.get(name, np.zeros_like(tensor)).reshape(-1)[idx]
        errors[name] = relative_error(analytic, numeric)
    return errors
