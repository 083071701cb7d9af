"""The quota selection: the gates' ranking, not their argmax, decides which samples compute at the dearer candidate.

With argmax selection a gate whose learned preference for the dearer candidate is weak never sends any sample
there: the probe's budget rule sends 10-25% of the probed samples up, the gates rank those samples above the
rest (ROC area 0.59-0.69 on ResNet-20), yet no sample's logit for the dearer candidate overtakes the modal
one's, so every test sample takes one candidate per block (docs/GATE_ESTIMATOR.md).

The quota selection spends what the cost target allows one sample in a unit (its share of the unit's fp32 cost,
the budget rule's allowance) on the samples the gate ranks highest. The allowance lies between two computing
candidates, the bracket (cheap, dear), and buys the dearer one for a share q = (allowance - cost[cheap]) /
(cost[dear] - cost[cheap]) of the computing samples. A unit's choice is then

    argmax over {skip, cheap, dear} of (logits[skip], logits[cheap], logits[dear] - threshold_u)

so whether to compute stays with the gates (skip against the bracket), and a computing sample goes up when its
score logits[dear] - logits[cheap] beats the unit's threshold. That is the rule at eval and in the exported
gates, where the threshold is fixed: a model buffer, checkpointed, and an offset on the dear candidate's logit in
the ONNX gates, the other computing candidates masked out.

In training the batch's computing samples are split exactly: the floor(q * n + carry) with the highest scores
go up (`split`; the carry keeps the long-run share exact at small batches), and the threshold moves a share
QUOTA_RATE of the way to the batch's (1 - q) score quantile (the first batch, or the first after a new target,
sets it outright), an average like BatchNorm's running statistics. Why exact in training: on ResNet-20 the
scores of one batch lie close together while the gates' common offset moves from step to step (the cost
regulariser's sign flips), so a threshold that lags by a few batches sent whole batches up or down at once and
the gates never trained on a split. With the allowance at or below the cheapest computing candidate every
computing sample takes that one (at or above the dearest, that one).

Why a tracked quantile and not a price moved by dual ascent (tried first): the gates' scores are close together
(a weak ranking), so a price moving at a rate large enough to cross the gates' gap in one target stage sent
whole batches up and down at once, and priced linearly in cost it jumped from 3/6 straight to 6/8; on ResNet-20
one tuning seed ended with every block skipped (docs/GATE_ESTIMATOR.md).
"""
from __future__ import annotations

import numpy as np

# Share of the way the threshold moves to each training batch's quantile (an average over about 1/rate batches).
QUOTA_RATE = 0.1


def split(scores: np.ndarray, share: float, carry: float) -> tuple[np.ndarray, float]:
    """Which of a training batch's computing samples go up (the floor(share * n + carry) highest scores, ties to
    the lower index), and the carry after: the share's fraction that one batch could not send."""
    want = share * len(scores) + carry
    count = min(int(np.floor(want)), len(scores))
    up = np.zeros(len(scores), bool)
    up[np.argsort(-np.asarray(scores, np.float64), kind="stable")[:count]] = True
    return up, want - count


def bracket(unit_cost: np.ndarray, computing: np.ndarray, allowance: float) -> tuple[int, int, float]:
    """(cheap, dear, q): the computing candidates whose costs bracket the allowance and the share of computing
    samples the allowance buys the dearer one for; cheap == dear (q 0) when there is nothing to split."""
    order = [k for k in np.lexsort((np.arange(len(unit_cost)), unit_cost)) if computing[k]]
    below = [k for k in order if unit_cost[k] <= allowance]
    above = [k for k in order if unit_cost[k] > allowance]
    if not below or not above:
        only = int(order[0] if not below else order[-1])
        return only, only, 0.0
    cheap, dear = int(below[-1]), int(above[0])
    return cheap, dear, (allowance - float(unit_cost[cheap])) / float(unit_cost[dear] - unit_cost[cheap])


def quota_mask(skips: np.ndarray, cheap: int, dear: int, threshold: float | None) -> np.ndarray:
    """What the quota selection adds to one unit's logits before their argmax (module doc): 0 on skip and on
    cheap, -threshold on dear (0 before any threshold: None), -inf on every other candidate. A unit that may not
    skip has its skip logit at -inf already (the gates' own mask, `gates.logit_mask`)."""
    out = np.full(len(skips), -np.inf)
    out[skips] = 0.0
    out[cheap] = 0.0
    if dear != cheap:
        out[dear] = 0.0 if threshold is None else -threshold
    return out


def next_threshold(threshold: float | None, scores: np.ndarray, share: float) -> float | None:
    """The threshold after a training batch whose computing samples scored `scores` (dear's logit minus cheap's):
    QUOTA_RATE of the way to the scores' (1 - share) quantile, or that quantile with none yet (None)."""
    if not len(scores):
        return threshold
    target = float(np.quantile(np.asarray(scores, np.float64), 1.0 - share))
    return target if threshold is None else threshold + QUOTA_RATE * (target - threshold)
