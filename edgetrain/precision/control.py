"""Precision controllers: who decides each MAC layer's bit-widths as training goes.

A controller says which precision is in force (`precision`, used for the first step and after a
resume) and, after every step, sees that step's number and loss (`on_step`): it returns a new spec,
applied from the next step on, or None to keep the current one. FracTrain's PFQ (precision rising as
the loss flattens) and DFQ are controllers of this shape; the fixed ones here serve fp32 and static
FW/BW runs.
"""
from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from edgetrain.errors import EdgetrainError
from edgetrain.train.config import TrainConfig

# What a controller hands the Trainer: "8/8", "fp32", or {"default": "4/8", "overrides": {"fc1": "8/8"}}.
PrecisionSpec = str | dict


@runtime_checkable
class PrecisionController(Protocol):
    """Chooses the precision of each step from the steps and losses seen so far."""

    @property
    def precision(self) -> PrecisionSpec:
        """The spec in force now: the first step's, and a resumed run's once its state is loaded."""

    def on_step(self, step: int, loss: float) -> PrecisionSpec | None:
        """After update number `step` (0-based) with this loss: a new spec for the next step, or None."""

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to decide exactly as this one would (arrays, scalars, or JSON values)."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what state_dict() returned."""


class FixedController:
    """One precision for the whole run (fp32, or static FW/BW bits)."""

    def __init__(self, spec: PrecisionSpec):
        self.precision = spec

    def on_step(self, step: int, loss: float) -> PrecisionSpec | None:
        """Never changes."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """Nothing to carry: the spec comes from the config."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Nothing to restore."""


def _turning_point_options(config: TrainConfig) -> dict[str, Any]:
    """The pfq_* keys as PFQController arguments: PFQ's own schedule, and FracTrain's indicator."""
    return {"period_steps": config.pfq_period,
            "switch_steps": None if config.pfq_switch_steps is None else tuple(config.pfq_switch_steps),
            "eps": config.pfq_eps, "alpha": config.pfq_alpha, "window": config.pfq_window,
            "normaliser_periods": config.pfq_normaliser_periods, "alpha_switches": config.pfq_alpha_switches}


def make_controller(config: TrainConfig) -> PrecisionController:
    """The controller a config's schedule names."""
    if config.precision_overrides and config.schedule in ("pfq", "dfq", "fractrain"):
        raise EdgetrainError(f"{config.schedule}: precision overrides are not supported (" +
                             ("it moves every quantised layer together)" if config.schedule == "pfq"
                              else "the gates choose the gated layers' bits)"))
    if config.schedule == "dfq":
        return FixedController({"default": config.dfq_ungated, "dfq_target": config.dfq_target})
    if config.schedule == "fractrain":
        from edgetrain.precision.fractrain import DEFAULT_TARGETS, FracTrainController

        return FracTrainController(targets=tuple(config.fractrain_targets or DEFAULT_TARGETS),
                                   ungated=config.dfq_ungated,
                                   floors=None if config.fractrain_floors is None else tuple(config.fractrain_floors),
                                   grad_bits=None if config.fractrain_grad_bits is None
                                   else tuple(config.fractrain_grad_bits),
                                   **_turning_point_options(config))
    if config.schedule == "pfq":
        from edgetrain.precision.pfq import DEFAULT_STAGES, PFQController

        return PFQController(stages=tuple(config.pfq_stages or DEFAULT_STAGES), **_turning_point_options(config))
    if not config.precision_overrides:
        return FixedController(config.precision_spec)
    return FixedController({"default": config.precision_spec, "overrides": dict(config.precision_overrides)})
