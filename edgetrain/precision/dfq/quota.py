"""The quota selection: the gates' ranking, not their argmax, decides which samples compute at a dearer candidate.

With argmax selection a gate whose learned preference for the dearer candidate is weak never sends any sample
there: the probe's budget rule sends 10-25% of the probed samples up, the gates rank those samples above the
rest (ROC area 0.59-0.69 on ResNet-20), yet no sample's logit for the dearer candidate overtakes the modal
one's, so every test sample takes one candidate per block (docs/GATE_ESTIMATOR.md). The quota selection
subtracts a per-unit price from the logits of the computing candidates, in proportion to how much dearer each is
than the unit's cheapest computing one, in units of the step between the two computing candidates whose costs
bracket the allowance (what the cost target allows one sample: its share of the unit's fp32 cost):

    choice = argmax(logits - price_u * (cost_u[k] - cost_u[cheapest]) / (cost_u[above] - cost_u[below]))

and moves price_u by dual ascent after each training step, so that the unit's computing samples spend, on
average, the allowance (held within the computing candidates' range). So a price of 1 moves the dearer candidate
of the bracket one logit against the cheaper, whatever the costs, and the samples whose logit gap to the dearer
candidate is largest (those the gate ranks highest) go up first: a unit whose allowance lies between two
candidates splits its samples between them by construction. Whether to compute at all stays with the gates'
argmax: the skip candidate's logit and the cheapest computing one's are not moved. At eval and in the exported
gates the price is fixed (a model buffer, checkpointed; export folds it into each unit's logit offset). A new
cost target (`DFQ.aim`) starts every price again from 0, as it starts the gates' head bias again.
"""
from __future__ import annotations

import numpy as np

# Largest move of a unit's price per training step, in logits of the bracket's dearer candidate against its
# cheaper (at a batch that overspends or underspends by a whole bracket step). Measured on ResNet-20 (tuning seeds
# 10 and 11): the probe's budget rule trains the gates towards probabilities, about 1.3 logits apart where a
# fifth of the samples are sent up; priced in the whole computing range at 0.05 (then 0.5) a step, the price
# took 150 steps to cross that gap, longer than FracTrain's last target stage.
QUOTA_RATE = 0.5


def quota_offsets(price: float, unit_cost: np.ndarray, computing: np.ndarray, allowance: float) -> np.ndarray:
    """What the quota selection adds to one unit's logits (module doc): 0 on the skip candidate, on candidates
    the unit cannot take and on its cheapest computing one; -price times the extra cost in bracket steps on the
    rest."""
    offsets = np.zeros(len(unit_cost))
    low, step, _ = _bracket(unit_cost, computing, allowance)
    if step > 0 and price != 0.0:
        offsets[computing] = -price * (unit_cost[computing] - low) / step
    return offsets


def next_price(price: float, unit_cost: np.ndarray, computing: np.ndarray, choice: np.ndarray,
               allowance: float) -> float:
    """The unit's price after a training step in which its samples chose `choice`: moved by QUOTA_RATE times the
    computing samples' mean overspend in bracket steps, clipped to one step (unchanged when none computes)."""
    _, step, held = _bracket(unit_cost, computing, allowance)
    ran = computing[choice]
    if step <= 0 or not ran.any():
        return price
    spent = 0.0
    for k in choice[ran]:  # fixed order, plain floats: the same bits on every machine
        spent += float(unit_cost[k])
    spent /= int(ran.sum())
    return price + QUOTA_RATE * min(max((spent - held) / step, -1.0), 1.0)


def _bracket(unit_cost: np.ndarray, computing: np.ndarray, allowance: float) -> tuple[float, float, float]:
    """(the cheapest computing cost, the step between the two computing costs around the allowance, the allowance
    held within the computing range); a step of 0 when fewer than two computing costs differ: nothing to price."""
    costs = np.unique(unit_cost[computing])
    if len(costs) < 2:
        return (float(costs[0]) if len(costs) else 0.0), 0.0, allowance
    held = min(max(allowance, float(costs[0])), float(costs[-1]))
    above = min(int(np.searchsorted(costs, held, side="right")), len(costs) - 1)
    return float(costs[0]), float(costs[above] - costs[above - 1]), held
