"""PFQ, progressive fractional quantisation: precision rises in stages as training settles.

Two modes. Manual: switch to the next stage at given steps. Automatic, FracTrain's turning-point
rule: once per evaluation period take the period's mean training loss L_e; the normaliser S is the
mean of L_1..L_e, frozen after `normaliser_periods` periods; a window keeps the last `window` values,
and once it is full, d_i = |L_i - L_newest| / S for the older ones; if every d_i <= eps the loss has
flattened: move to the next stage, clear the window, and multiply eps by alpha (the reference does
that after its first two switches only: `alpha_switches`). Every constant of the reference is a
parameter here, with the reference's value as default, and every switch is logged.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from edgetrain.errors import EdgetrainError
from edgetrain.precision.spec import parse_precision

# FracTrain's default schedule: FW 3,4,6,8 / BW 6,6,8,8, ending at the static 8/8 baseline.
DEFAULT_STAGES = ("3/6", "4/6", "6/8", "8/8")
DEFAULT_PERIOD = 400  # steps per evaluation period: an epoch; FracTrain's CIFAR runs use 400 steps
DEFAULT_EPS = 0.05  # the paper's README; the reference scripts default to 0.15
DEFAULT_ALPHA = 0.3  # the paper's README; the reference scripts default to 0.4
DEFAULT_WINDOW = 5
DEFAULT_NORMALISER_PERIODS = 10
DEFAULT_ALPHA_SWITCHES = 2


@dataclass
class Switch:
    """One move to the next stage, as the log records it."""

    step: int
    stage: int
    precision: str
    window: list[float]
    eps: float
    reason: str

    def as_dict(self) -> dict:
        return {"step": self.step, "stage": self.stage, "precision": self.precision,
                "window": list(self.window), "eps": self.eps, "reason": self.reason}


@dataclass
class PFQController:
    """Chooses the precision stage of every step from the training loss (or from a step list)."""

    stages: tuple[str, ...] = DEFAULT_STAGES
    period_steps: int = DEFAULT_PERIOD
    switch_steps: tuple[int, ...] | None = None  # manual mode: switch at these steps
    eps: float = DEFAULT_EPS
    alpha: float = DEFAULT_ALPHA
    window: int = DEFAULT_WINDOW
    normaliser_periods: int = DEFAULT_NORMALISER_PERIODS
    alpha_switches: int = DEFAULT_ALPHA_SWITCHES
    # run state
    stage: int = 0
    current_eps: float | None = None
    period_sum: float = 0.0
    period_count: int = 0
    period_losses: list[float] = field(default_factory=list)  # L_1, L_2, ... of every period so far
    recent: list[float] = field(default_factory=list)  # the turning-point window
    switches: list[Switch] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.stages = tuple(str(parse_precision(s)) for s in self.stages)
        if not self.stages:
            raise EdgetrainError("pfq: at least one stage is needed")
        if self.period_steps < 1:
            raise EdgetrainError(f"pfq: period_steps must be >= 1, got {self.period_steps}")
        if self.window < 2:
            raise EdgetrainError(f"pfq: window must be >= 2, got {self.window}")
        # the normaliser averages the first normaliser_periods losses: none would divide by zero
        if self.normaliser_periods < 1:
            raise EdgetrainError(f"pfq: normaliser_periods must be >= 1, got {self.normaliser_periods}")
        if self.alpha_switches < 0:
            raise EdgetrainError(f"pfq: alpha_switches must be >= 0, got {self.alpha_switches}")
        if not self.eps > 0 or not 0 < self.alpha <= 1:
            raise EdgetrainError(f"pfq: need eps > 0 and 0 < alpha <= 1, got eps={self.eps}, alpha={self.alpha}")
        if self.switch_steps is not None:
            steps = tuple(int(s) for s in self.switch_steps)
            if len(steps) != len(self.stages) - 1 or list(steps) != sorted(set(steps)):
                raise EdgetrainError(f"pfq: manual mode needs {len(self.stages) - 1} increasing switch steps "
                                     f"for {len(self.stages)} stages, got {list(steps)}")
            self.switch_steps = steps
        if self.current_eps is None:
            self.current_eps = self.eps

    @property
    def precision(self) -> str:
        """The stage in force."""
        return self.stages[self.stage]

    @property
    def finished(self) -> bool:
        return self.stage == len(self.stages) - 1

    def on_step(self, step: int, loss: float) -> str | None:
        """Record the loss of a finished step; return the new precision when the stage changes."""
        if self.finished:
            return None
        if self.switch_steps is not None:
            if step + 1 >= self.switch_steps[self.stage]:
                return self._advance(step, "manual")
            return None
        self.period_sum += float(loss)
        self.period_count += 1
        if self.period_count < self.period_steps:
            return None
        return self._end_period(step, self.period_sum / self.period_count)

    def _end_period(self, step: int, mean_loss: float) -> str | None:
        self.period_sum, self.period_count = 0.0, 0
        self.period_losses.append(mean_loss)
        frozen = self.period_losses[: self.normaliser_periods]
        normaliser = sum(frozen) / len(frozen)
        self.recent.append(mean_loss)
        if len(self.recent) > self.window:
            self.recent.pop(0)
        if len(self.recent) < self.window or normaliser <= 0:
            return None
        newest = self.recent[-1]
        if all(abs(old - newest) / normaliser <= self.current_eps for old in self.recent[:-1]):
            return self._advance(step, f"loss flat within eps={self.current_eps:.4g} of normaliser {normaliser:.4g}")
        return None

    def _advance(self, step: int, reason: str) -> str:
        window = list(self.recent)
        eps_used = self.current_eps
        self.stage += 1
        self.recent.clear()
        if len(self.switches) < self.alpha_switches:  # FracTrain tightens eps at its first two turning points only
            self.current_eps *= self.alpha
        self.switches.append(Switch(step, self.stage, self.precision, window, eps_used, reason))
        return self.precision

    def state_dict(self) -> dict:
        """Everything a resumed run needs to continue exactly (JSON-ready)."""
        return {"stage": self.stage, "current_eps": self.current_eps, "period_sum": self.period_sum,
                "period_count": self.period_count, "period_losses": list(self.period_losses),
                "recent": list(self.recent), "switches": [s.as_dict() for s in self.switches]}

    def load_state_dict(self, state: dict) -> None:
        """Restore what state_dict returned."""
        self.stage = int(state["stage"])
        self.current_eps = float(state["current_eps"])
        self.period_sum = float(state["period_sum"])
        self.period_count = int(state["period_count"])
        self.period_losses = [float(v) for v in state["period_losses"]]
        self.recent = [float(v) for v in state["recent"]]
        self.switches = [Switch(**s) for s in state["switches"]]

    def settings(self) -> dict:
        """The parameters of this controller, for the run's record."""
        return {"stages": list(self.stages), "period_steps": self.period_steps,
                "switch_steps": None if self.switch_steps is None else list(self.switch_steps),
                "eps": self.eps, "alpha": self.alpha, "window": self.window,
                "normaliser_periods": self.normaliser_periods, "alpha_switches": self.alpha_switches}
