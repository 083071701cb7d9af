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
>= 0, large for the samples whose loss the lower precision moves most. Each probed sample may spend what the
cost target allows it (the target's share of the unit's fp32 cost), and the probed samples' total is spent as
a fractional knapsack: every sample starts at its cheaper candidate and samples move to their dearer one in
order of sensitivity per unit of cost until the budget is spent (the last one in part: soft targets). So the
targets say which samples should sit above the target's level and which below; docs/GATE_ESTIMATOR.md gives
the reasoning and the cost per step.
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
    rank = np.lexsort((np.arange(len(unit_cost)), unit_cost))  # cheapest first, ties by index
    ordered = eligible[:, rank]
    return rank[ordered.argmax(axis=1)]


def budget_targets(sensitivity: np.ndarray, cheap: np.ndarray, dear: np.ndarray, unit_cost: np.ndarray,
                   spend: np.ndarray) -> np.ndarray:
    """Soft targets (n, K) of the budget rule: the samples' pairs (cheap, dear) share out the total `spend` as a
    fractional knapsack by sensitivity per unit of extra cost (ties: the earlier sample first); each row sums to
    1, and the targets' expected cost is the spend, within what the pairs can cost (all cheap, all dear)."""
    n, k_count = len(sensitivity), len(unit_cost)
    extra = unit_cost[dear] - unit_cost[cheap]
    free = extra <= 0
    ratio = np.where(free, np.inf, sensitivity / np.where(free, 1.0, extra))
    spare = 0.0
    for s in range(n):  # fixed order, plain floats: the same bits on every machine
        spare += float(spend[s]) - float(unit_cost[cheap[s]])
    up = np.zeros(n)
    for s in np.lexsort((np.arange(n), -ratio)):
        if free[s]:
            up[s] = 1.0
        elif spare > 0:
            up[s] = min(1.0, spare / float(extra[s]))
            spare -= up[s] * float(extra[s])
    targets = np.zeros((n, k_count))
    targets[np.arange(n), cheap] += 1.0 - up
    targets[np.arange(n), dear] += up
    return targets


def distill_grad(probs: np.ndarray, rows: np.ndarray, targets: np.ndarray, weight: float,
                 among: np.ndarray | None = None) -> np.ndarray:
    """dL/d(logits) of weight * mean over probed rows of cross-entropy(q, target), q the softmax over the
    candidates in `among` (a boolean mask; None: all), so the other logits get nothing; targets are candidate
    indices (one-hot) or (rows, K) distributions."""
    out = np.zeros_like(probs)
    if len(rows):
        part = probs[rows].copy()
        if among is not None:
            part = np.where(among[None, :], part, 0)
            part /= part.sum(axis=1, keepdims=True)
        if targets.ndim == 2:
            part -= targets
        else:
            part[np.arange(len(rows)), targets] -= 1
        out[rows] = part * (weight / len(rows))
    return out
