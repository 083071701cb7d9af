"""Finite-difference gradient checking for edgetrain models, in float64."""
from __future__ import annotations

import numpy as np

import edgetrain

# A coordinate whose central differences at h and h/4 disagree by more than this (relative) sits
# within reach of a kink (ReLU, Clip, max): finite differences say nothing there, so it is skipped.
KINK_AGREEMENT = 1e-5
# Below this the two differences are both rounding noise (a gradient that is exactly zero).
NOISE_FLOOR = 1e-7
FD_RESOLUTION = 10 * NOISE_FLOOR
# Tensors whose true gradient is exactly zero (a bias that a later batch-statistics BatchNorm cancels)
# would compare noise with noise; errors are measured against at least this fraction of the largest
# gradient norm in the model.
SCALE_FLOOR = 1e-4


def relative_error(analytic: np.ndarray, numeric: np.ndarray, floor: float = 1e-30) -> float:
    """Norm-wise relative error: ||a - n|| / max(||n||, ||a||, floor)."""
    a, n = np.ravel(analytic), np.ravel(numeric)
    scale = max(np.linalg.norm(n), np.linalg.norm(a), floor)
    return float(np.linalg.norm(a - n) / scale)


def relative_errors(analytic: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> dict[str, float]:
    """Per-tensor relative errors, with the floor set by the largest reference gradient."""
    floor = SCALE_FLOOR * max(np.linalg.norm(v) for v in reference.values())
    return {k: relative_error(analytic[k], reference[k], floor) for k in reference}


def check_model_gradients(model: edgetrain.Model, feeds: dict, *, training: bool = True, samples: int = 24,
                          h: float = 1e-6, seed: int = 0) -> dict[str, float]:
    """Compare analytic gradients of L = sum(R * outputs) with central differences.

    Checks every parameter and every float graph input on up to `samples` random coordinates each;
    returns {tensor name: relative error}.
    """
    rng = np.random.default_rng(seed)
    model = model.astype(np.float64) if model.dtype != np.float64 else model
    feeds = {k: (v.astype(np.float64) if np.issubdtype(v.dtype, np.floating) else v) for k, v in feeds.items()}
    state = model._state()
    env, tape = model.executor.forward(model._feeds(feeds), state, training, record=True, key=(0, 0))
    weights = {o.name: rng.standard_normal(env[o.name].shape) for o in model.graph.outputs
               if np.issubdtype(env[o.name].dtype, np.floating)}

    def loss() -> float:
        out, _ = model.executor.forward(model._feeds(feeds), state, training, key=(0, 0))
        return float(sum((w * out[k]).sum() for k, w in weights.items()))

    def central(flat: np.ndarray, i: int, step: float) -> float:
        old = flat[i]
        flat[i] = old + step
        up = loss()
        flat[i] = old - step
        down = loss()
        flat[i] = old
        return (up - down) / (2 * step)

    grads = model.executor.backward(tape, weights)
    targets = {**model.parameters(), **{k: v for k, v in feeds.items() if np.issubdtype(v.dtype, np.floating)}}
    analytic, numeric = {}, {}
    for name, tensor in targets.items():
        flat = tensor.reshape(-1)
        idx = rng.choice(flat.size, size=min(samples, flat.size), replace=False)
        keep, values = [], []
        for i in idx:
            d1, d2 = central(flat, i, h), central(flat, i, h / 4)
            if abs(d1 - d2) <= KINK_AGREEMENT * max(abs(d1), abs(d2)) + NOISE_FLOOR:
                keep.append(i)
                values.append(d2)
        if len(keep) < max(1, idx.size // 2):
            raise AssertionError(f"{name}: {idx.size - len(keep)} of {idx.size} sampled coordinates sit at kinks")
        analytic[name] = grads.get(name, np.zeros_like(tensor)).reshape(-1)[keep]
        numeric[name] = np.array(values)
    errors = relative_errors(analytic, numeric)
    for name in errors:
        # Both below what central differences resolve: the gradient is zero as far as FD can tell.
        if max(np.abs(analytic[name]).max(), np.abs(numeric[name]).max()) < FD_RESOLUTION:
            errors[name] = 0.0
    return errors
