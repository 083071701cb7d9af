"""FracTrain: PFQ's turning-point indicator driving DFQ's cost target.

The same rule PFQ uses to raise precision (edgetrain.precision.pfq: period means of the training loss, a
window, eps shrinking by alpha) here moves the DFQ cost target through a rising list, so the gates
are pushed to cheap choices early and allowed more bits as training settles. The gates start from
the computing candidate nearest the first target, and at every switch the trainer points them at the
costliest candidate at or below the new one (`DFQ.aim`): a stretch at one target saturates their
softmax, and the straight-through estimator could not move them on by itself.

With `grad_bits`, each target comes with the gradient bits every computing candidate's backward runs at (0:
each candidate's own; `DFQ.set_grad_bits`): gradients, not only the forward, can rise with the stages.

With `floors`, each target comes with its own floor on every block's executed share (`DFQ.floor`,
edgetrain.precision.dfq.guard): where only skipping saves time (a measured-time cost on an 8-bit
unit), the executed share is the precision that rises, as bits rise in the paper.
"""
from __future__ import annotations

from typing import Any

from edgetrain.errors import EdgetrainError
from edgetrain.precision.pfq import (
    DEFAULT_ALPHA,
    DEFAULT_ALPHA_SWITCHES,
    DEFAULT_EPS,
    DEFAULT_NORMALISER_PERIODS,
    DEFAULT_WINDOW,
    PFQController,
)

DEFAULT_TARGETS = (1.5, 2.0, 2.5, 3.0)  # percent of the gated layers' fp32 training cost (FracTrain, CIFAR)


class FracTrainController:
    """Precision controller of --schedule fractrain: spec {"default": ungated bits, "dfq_target": t}."""

    def __init__(self, targets: tuple[float, ...] = DEFAULT_TARGETS, ungated: str = "8/8",
                 floors: tuple[float, ...] | None = None, grad_bits: tuple[int, ...] | None = None,
                 period_steps: int = 400,
                 switch_steps: tuple[int, ...] | None = None, eps: float = DEFAULT_EPS, alpha: float = DEFAULT_ALPHA,
                 window: int = DEFAULT_WINDOW, normaliser_periods: int = DEFAULT_NORMALISER_PERIODS,
                 alpha_switches: int = DEFAULT_ALPHA_SWITCHES):
        if not targets:
            raise EdgetrainError("fractrain: at least one cost target is needed")
        self.targets = tuple(float(t) for t in targets)
        if floors is not None and len(floors) != len(self.targets):
            raise EdgetrainError(f"fractrain: {len(floors)} floors for {len(self.targets)} targets: one per target")
        self.floors = None if floors is None else tuple(float(f) for f in floors)
        if grad_bits is not None and len(grad_bits) != len(self.targets):
            raise EdgetrainError(f"fractrain: {len(grad_bits)} gradient widths for {len(self.targets)} targets: "
                                 "one per target")
        self.grad_bits = None if grad_bits is None else tuple(int(b) for b in grad_bits)
        self.ungated = ungated
        # The indicator is PFQ's, run over placeholder stages: one per target.
        self.indicator = PFQController(stages=tuple("8/8" for _ in self.targets), period_steps=period_steps,
                                       switch_steps=switch_steps, eps=eps, alpha=alpha, window=window,
                                       normaliser_periods=normaliser_periods, alpha_switches=alpha_switches)

    @property
    def precision(self) -> dict:
        """The spec in force: the ungated layers' bits, the current DFQ target (and floor, if staged)."""
        spec = {"default": self.ungated, "dfq_target": self.targets[self.indicator.stage]}
        if self.floors is not None:
            spec["dfq_floor"] = self.floors[self.indicator.stage]
        if self.grad_bits is not None:
            spec["dfq_grad_bits"] = self.grad_bits[self.indicator.stage]
        return spec

    @property
    def switches(self) -> list[dict]:
        """Every target change so far, with its step, loss window and eps."""
        out = []
        for s in self.indicator.switches:
            d = s.as_dict()
            d.pop("precision")
            d["dfq_target"] = self.targets[s.stage]
            if self.floors is not None:
                d["dfq_floor"] = self.floors[s.stage]
            if self.grad_bits is not None:
                d["dfq_grad_bits"] = self.grad_bits[s.stage]
            out.append(d)
        return out

    def on_step(self, step: int, loss: float) -> dict | None:
        """Feed the indicator; a new spec when it moves to the next target."""
        return self.precision if self.indicator.on_step(step, loss) is not None else None

    def state_dict(self) -> dict[str, Any]:
        """The indicator's state (JSON-ready)."""
        return self.indicator.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what state_dict returned."""
        self.indicator.load_state_dict(state)

    def settings(self) -> dict:
        """The parameters of this controller, for the run's record."""
        out = self.indicator.settings()
        out.pop("stages")
        floors = {} if self.floors is None else {"floors": list(self.floors)}
        grad_bits = {} if self.grad_bits is None else {"grad_bits": list(self.grad_bits)}
        return {"targets": list(self.targets), "ungated": self.ungated, **floors, **grad_bits, **out}
