"""DFQ's cost table: what each candidate costs in each unit, per sample, and what a step's choices cost.

A unit's cost is its gated layers' training cost: BitOPs from their per-sample MACs (edgetrain.precision.cost),
or, given a table measured on a board (edgetrain.precision.latency), the sum of their seconds.
"""
from __future__ import annotations

import numpy as np

from edgetrain.errors import EdgetrainError
from edgetrain.precision.cost import FP32_STEP_FACTOR, LayerCost, layer_step_cost
from edgetrain.precision.dfq.config import Candidate
from edgetrain.precision.dfq.units import Unit
from edgetrain.precision.spec import FP32, LayerPrecision


def candidate_costs(units: list[Unit], candidates: tuple[Candidate, ...],
                    table: dict[str, dict[str, float]] | None, backward_share: float = 1.0
                    ) -> tuple[dict[int, np.ndarray], dict[int, float]]:
    """Per unit: each candidate's per-sample training cost, and the fp32 one (BitOPs, or measured seconds).
    backward_share: the share of its samples whose backward a computing candidate runs; it scales the BitOPs'
    backward terms (a measured table arrives with its backward seconds already scaled: latency.read_cost_table)."""
    costs, fp32 = {}, {}
    for u in units:
        work = sum(u.macs.values())
        fp32[u.index] = float(work * FP32_STEP_FACTOR) if table is None else _table_cost(table, u, "fp32")
        row = []
        for c in candidates:
            if c.skip:
                row.append(0.0)
            elif table is not None:
                row.append(_table_cost(table, u, str(c.precision)))
            else:
                row.append(float(sum(macs * _step_bits(c.precision, name in u.weightless, backward_share)
                                     for name, macs in u.macs.items())))
        costs[u.index] = np.array(row)
    return costs, fp32


def _layer_precision(p: LayerPrecision, weightless: bool) -> LayerPrecision:
    """A candidate's precision as one gated layer runs it (a layer without a weight: B at the activation bits)."""
    return p.without_weight() if weightless else p


def _step_bits(p: LayerPrecision, weightless: bool, backward_share: float = 1.0) -> float:
    """BitOPs per MAC of one training step (forward, error, weight gradient) at precision p, the backward run
    for a share of the samples."""
    a, w, g = _layer_precision(p, weightless).bitops_bits()
    return a * w + backward_share * (g * w + a * g)


def _table_cost(table: dict[str, dict[str, float]], u: Unit, precision: str) -> float:
    """A unit's measured cost at one precision: the sum over its gated layers."""
    total = 0.0
    for layer in u.macs:
        entry = table.get(layer, {})
        if precision not in entry:
            raise EdgetrainError(f"dfq cost table: no timing for layer '{layer}' at '{precision}' "
                                 f"(profile the model at that precision with --latency-table)")
        total += entry[precision]
    return total


def chosen_step_costs(units: list[Unit], candidates: tuple[Candidate, ...], choices: dict[int, np.ndarray],
                      batch: int, forward_only: dict[int, np.ndarray] | None = None,
                      trained: dict[int, np.ndarray] | None = None
                      ) -> tuple[dict[str, LayerCost], dict[str, LayerCost]]:
    """BitOPs of the gated layers in a forward with these choices: as chosen, and as fp32 for every sample.
    forward_only: per unit, samples per candidate that also ran forward only (the probe estimator's runs);
    trained: per unit, samples per candidate whose error ran back (default: all that computed; the rest of
    them count their forward only)."""
    costs, fp32 = {}, {}
    for u in units:
        ran = np.bincount(choices[u.index], minlength=len(candidates))
        counts = (trained or {}).get(u.index, ran)  # whole training steps
        extra = ran - counts + (forward_only or {}).get(u.index, 0)  # forward only
        for name, macs in u.macs.items():
            weightless = name in u.weightless
            cost = sum((layer_step_cost(int(counts[k]) * macs, _layer_precision(c.precision, weightless), 0)
                        for k, c in enumerate(candidates) if not c.skip and counts[k]), LayerCost(0, 0, 0, 0, 0))
            for k, c in enumerate(candidates):
                if extra[k] and not c.skip:
                    step = layer_step_cost(int(extra[k]) * macs, _layer_precision(c.precision, weightless), 0)
                    cost = cost + LayerCost(step.macs, step.forward, 0, 0, 0)
            costs[name] = cost
            fp32[name] = layer_step_cost(batch * macs, FP32, 0)
    return costs, fp32
