"""The quota selection: the gates' ranking, not their argmax, decides which samples compute at a dearer candidate.

With argmax selection a gate whose learned preference for the dearer candidate is weak never sends any sample
there: the probe's budget rule sends 10-25% of the probed samples up, the gates rank those samples above the
rest (ROC area 0.59-0.69 on ResNet-20), yet no sample's logit for the dearer candidate overtakes the modal
one's, so every test sample takes one candidate per block (docs/GATE_ESTIMATOR.md). The quota selection
subtracts a per-unit price from the logits of the computing candidates, in proportion to how much dearer each is
than the unit's cheapest computing one:

    choice = argmax(logits - price_u * (cost_u[k] - cost_u[cheapest]) / (cost_u[dearest] - cost_u[cheapest]))

and moves price_u by dual ascent after each training step, so that the unit's computing samples spend, on
average, what the cost target allows each (its share of the unit's fp32 cost, held within the computing
candidates' range). The samples whose logit gap to the dearer candidate is largest (those the gate ranks
highest) go up first, so a unit whose allowance lies between two candidates splits its samples between them
by construction. Whether to compute at all stays with the gates' argmax: the skip candidate's logit and the
cheapest computing one's are not moved. At eval and in the exported gates the price is fixed (a model buffer,
checkpointed; export folds it into each unit's logit offset). A new cost target (`DFQ.aim`) starts every
price again from 0, as it starts the gates' head bias again.
"""
from __future__ import annotations

import numpy as np

# Largest move of a unit's price per training step, in logits: the shift between the unit's cheapest and
# dearest computing candidates moves by at most this much (at a batch all at one end of the range). At 0.05
# (ResNet-20, tuning seeds 10 and 11) the price moved 0.4-1.4 logits in the 150 steps of FracTrain's last
# target, short of the 2-logit lead `DFQ.aim` gives one candidate, and no sample went up.
QUOTA_RATE = 0.5


def quota_offsets(price: float, unit_cost: np.ndarray, computing: np.ndarray) -> np.ndarray:
    """What the quota selection adds to one unit's logits (module doc): 0 on the skip candidate, on candidates
    the unit cannot take and on its cheapest computing one; -price times the relative extra cost on the rest."""
    offsets = np.zeros(len(unit_cost))
    low, high = _range(unit_cost, computing)
    if high > low and price != 0.0:
        offsets[computing] = -price * (unit_cost[computing] - low) / (high - low)
    return offsets


def next_price(price: float, unit_cost: np.ndarray, computing: np.ndarray, choice: np.ndarray,
               allowance: float) -> float:
    """The unit's price after a training step in which its samples chose `choice`: moved by QUOTA_RATE times the
    computing samples' mean overspend, relative to the computing candidates' cost range (0 when none computes)."""
    low, high = _range(unit_cost, computing)
    ran = computing[choice]
    if high <= low or not ran.any():
        return price
    spent = 0.0
    for k in choice[ran]:  # fixed order, plain floats: the same bits on every machine
        spent += float(unit_cost[k])
    spent /= int(ran.sum())
    return price + QUOTA_RATE * (spent - min(max(allowance, low), high)) / (high - low)


def _range(unit_cost: np.ndarray, computing: np.ndarray) -> tuple[float, float]:
    """The cheapest and dearest computing candidate's cost ((0, 0) without one: nothing to price)."""
    costs = unit_cost[computing]
    return (float(costs.min()), float(costs.max())) if len(costs) else (0.0, 0.0)
