"""The probe estimator: a per-candidate learning signal for DFQ's gates at a bounded price.

On a seeded share of each training batch, a gated unit also runs the probed samples that compute at a
second, randomly drawn computing candidate (and again at their chosen one, so both are measured
alike). The probe decides at which precision; whether to compute at all stays with straight-through,
which has a signal for that (skip adds nothing). For a probed sample s and measured candidate k,

    score[s, k] = dL/dy_s . r_k(s)  +  price[k]

is the first-order change of the training loss L if s took k (r_k: what the branch adds at k, dL/dy_s:
the gradient at the unit's output, price: the cost regulariser's dL/d(choice k)). The target of s is
the cheapest measured candidate whose score is within `margin` (per-sample loss, so divided by N)
of the best, and the gate is trained towards it with a cross-entropy over the computing
candidates' renormalised softmax, mean over probed samples, times `weight`. That is the "margin" rule.

The "budget" rule prices the gap instead of thresholding it. A probed sample's measured pair (cheap, dear)
differs by delta = r_cheap - r_dear at the unit's output, and the loss's sensitivity to that difference is
taken as the empirical-Fisher term (dL/dy_s . delta)^2 (as Fisher pruning prices removing a channel): always
>= 0, large for the samples whose loss the lower precision moves most. Each sample may spend what the cost
target allows it (the target's share of the unit's fp32 cost). A pair that costs no more than that allowance
goes dear, one that costs more than it at its cheaper candidate goes cheap, and a pair across it goes dear
when its sensitivity per unit of extra cost exceeds the unit's running price. The price is the Lagrange
multiplier of "spend the allowance": after each probe it moves by a bounded ratio towards spending what the
allowed share would have (dual ascent), so over the run the samples sent up are the most sensitive share of
the distribution, not of the few samples one batch probes, and every target is decisive.
docs/GATE_ESTIMATOR.md gives the reasoning and the cost per step.
"""
from __future__ import annotations

import numpy as np

PROBE_STREAM = 0x9B0E  # keeps the probe's draws apart from every other seeded stream of a step


def probe_plan(choice: np.ndarray, allowed: tuple[int, ...], skips: np.ndarray, share: float,
               key: tuple[int, int], unit_index: int) -> tuple[np.ndarray, np.ndarray]:
    """Probed samples (sorted) and each one's second candidate (-1: no other computing candidate), drawn from
    the run's (seed, step) key and the unit's index, so a step probes the same samples on any thread count."""
    n = len(choice)
    rng = np.random.default_rng([int(key[0]), int(key[1]), int(unit_index), PROBE_STREAM])
    count = min(n, max(1, round(share * n)))
    rows = np.sort(rng.choice(n, size=count, replace=False))
    draws = rng.random(count)
    computing = [k for k in allowed if not skips[k]]
    alt = np.full(count, -1, np.int64)
    for i, s in enumerate(rows):
        others = [k for k in computing if k != choice[s]]
        if others:
            alt[i] = others[min(int(draws[i] * len(others)), len(others) - 1)]
    return rows, alt


def probe_targets(scores: np.ndarray, unit_cost: np.ndarray, margin: float) -> np.ndarray:
    """Per probed sample: the cheapest candidate (by unit_cost, then index) whose score is within `margin` of
    its best; NaN scores are candidates not measured."""
    best = np.nanmin(scores, axis=1, keepdims=True)
    with np.errstate(invalid="ignore"):
        eligible = scores <= best + margin
    rank = cheapest_first(unit_cost)
    ordered = eligible[:, rank]
    return rank[ordered.argmax(axis=1)]


def cheapest_first(unit_cost: np.ndarray) -> np.ndarray:
    """Candidate indices from the cheapest to the dearest, ties by index (how both rules order candidates)."""
    return np.lexsort((np.arange(len(unit_cost)), unit_cost))


def measured_pairs(scores: np.ndarray, unit_cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's two measured candidates (its non-NaN scores), as (cheap, dear) in `cheapest_first` order."""
    measured = np.argwhere(~np.isnan(scores))[:, 1].reshape(len(scores), 2)
    position = cheapest_first(unit_cost).argsort()
    cheap, dear = np.take_along_axis(measured, position[measured].argsort(axis=1), axis=1).T
    return cheap, dear


PRICE_RATE = 0.1  # largest relative move of the price per probe (at the most over- or under-spent batch)


def priced_targets(sensitivity: np.ndarray, cheap: np.ndarray, dear: np.ndarray, unit_cost: np.ndarray,
                   allowance: float, price: float) -> tuple[np.ndarray, float]:
    """The budget rule's targets (candidate indices) and the price after this probe (module doc). A price of 0
    (none yet) starts at the median ratio of the pairs across the allowance."""
    low, high = unit_cost[cheap], unit_cost[dear]
    extra = high - low
    across = (low < allowance) & (allowance < high)
    ratio = sensitivity / np.where(across, extra, 1.0)
    if price == 0.0 and across.any():
        price = float(np.sort(ratio[across])[(int(across.sum()) - 1) // 2])
    up = (high <= allowance) | (across & (ratio > price))
    targets = np.where(up, dear, cheap)
    if across.any() and price > 0:
        spent = wanted = whole = 0.0
        for s in np.flatnonzero(across):  # fixed order, plain floats: the same bits on every machine
            spent += float(extra[s]) if up[s] else 0.0
            wanted += allowance - float(low[s])
            whole += float(extra[s])
        price *= 1.0 + PRICE_RATE * (spent - wanted) / whole
    return targets, price


def distill_grad(probs: np.ndarray, rows: np.ndarray, targets: np.ndarray, weight: float,
                 among: np.ndarray | None = None) -> np.ndarray:
    """dL/d(logits) of weight * mean over probed rows of cross-entropy(q, one-hot target), q the softmax over
    the candidates in `among` (a boolean mask; None: all), so the other logits get nothing."""
    out = np.zeros_like(probs)
    if len(rows):
        part = probs[rows].copy()
        if among is not None:
            part = np.where(among[None, :], part, 0)
            part /= part.sum(axis=1, keepdims=True)
        part[np.arange(len(rows)), targets] -= 1
        out[rows] = part * (weight / len(rows))
    return out
