"""A floor on each gated unit's executed share: the guard against collapse when only skipping saves cost.

Priced in measured time, every candidate below 8 bits costs what 8/8 costs, so the cost regulariser
pulls only towards skipping; a unit whose samples all skip gets no task gradient at all and cannot
learn its way back (FracTrain lost 21.9 points on ResNet-8 that way). With a floor f, a batch in
which fewer than ceil(f * N) samples execute the unit has its most reluctant skippers, those whose
best computing logit trails their skip logit least, moved to that computing candidate. The gate's
choice is otherwise untouched; the moved samples train, and are priced, at their new candidate.
"""
from __future__ import annotations

import math

import numpy as np


def share_count(share: float, n: int) -> int:
    """ceil(share * n), with round() first: 0.25 * 8 must give 2, not 3 from a float that lands a hair above 2."""
    return math.ceil(round(share * n, 9))


def apply_floor(logits: np.ndarray, choice: np.ndarray, skips: np.ndarray, floor: float) -> np.ndarray:
    """`choice` with at least ceil(floor * N) samples at a computing candidate (ties: lower sample index first)."""
    n = len(choice)
    need = share_count(floor, n) - int((~skips[choice]).sum())
    if need <= 0:
        return choice
    computing = np.where(skips[None, :], -np.inf, logits)
    best = computing.argmax(axis=1)
    rows = np.arange(n)
    reluctance = logits[rows, choice] - computing[rows, best]  # how much more a skipper prefers skipping
    skippers = np.flatnonzero(skips[choice])
    moved = skippers[np.argsort(reluctance[skippers], kind="stable")[:need]]
    out = choice.copy()
    out[moved] = best[moved]
    return out
