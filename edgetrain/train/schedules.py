"""Learning-rate schedules as pure functions of the step, so a resumed run needs only the step count.

`schedule(step)` is the lr of update number `step` (0-based): the lr torch's scheduler holds after `step`
calls of scheduler.step(). The trainer sets `optimizer.lr = schedule(step)` before every update.

    constant  base_lr
    step      base_lr * gamma ** (number of milestones <= step)          (torch MultiStepLR)
    cosine    min_lr + (base_lr - min_lr) * (1 + cos(pi * step / total)) / 2, then min_lr  (CosineAnnealingLR)
    warm-up   any of them times start_factor + (1 - start_factor) * step / warmup_steps   (LinearLR, chained)
"""
from __future__ import annotations

import math
import operator
from bisect import bisect_right
from collections.abc import Iterable
from dataclasses import dataclass

from edgetrain.errors import EdgetrainError
from edgetrain.kernels.detfloat import cos_0_pi, powi

DEFAULT_GAMMA = 0.1
DEFAULT_MIN_LR = 0.0
DEFAULT_WARMUP_START_FACTOR = 0.1  # 0 would waste the first update on lr 0
WARMUP_OPTIONS = ("warmup_steps", "warmup_start_factor")


def _index(step: int) -> int:
    s = operator.index(step)
    if s < 0:
        raise ValueError(f"schedule step must be >= 0, got {step}")
    return s


class Schedule:
    """A learning rate as a pure function of the (0-based) update number."""

    def __call__(self, step: int) -> float:
        raise NotImplementedError


@dataclass(frozen=True)
class Constant(Schedule):
    """The same lr at every step."""

    base_lr: float

    def __call__(self, step: int) -> float:
        _index(step)
        return self.base_lr


@dataclass(frozen=True)
class StepDecay(Schedule):
    """base_lr times gamma once per milestone passed (torch.optim.lr_scheduler.MultiStepLR)."""

    base_lr: float
    milestones: tuple[int, ...]
    gamma: float = DEFAULT_GAMMA

    def __call__(self, step: int) -> float:
        # powi, not **: Python's float ** is the platform's libm pow (issue 16)
        return self.base_lr * powi(self.gamma, bisect_right(self.milestones, _index(step)))


@dataclass(frozen=True)
class Cosine(Schedule):
    """Half a cosine from base_lr down to min_lr over total_steps, then min_lr (CosineAnnealingLR)."""

    base_lr: float
    total_steps: int
    min_lr: float = DEFAULT_MIN_LR

    def __call__(self, step: int) -> float:
        # Held at the bottom afterwards: torch's would climb back up, which no fine-tuning run wants.
        t = min(_index(step), self.total_steps)
        # cos_0_pi, not math.cos: the platform's libm may round differently on the board (issue 16)
        return self.min_lr + (self.base_lr - self.min_lr) * (1 + cos_0_pi(math.pi * t / self.total_steps)) / 2


@dataclass(frozen=True)
class LinearWarmup(Schedule):
    """Another schedule scaled by a factor rising linearly from start_factor to 1 over warmup_steps."""

    inner: Schedule
    warmup_steps: int
    start_factor: float = DEFAULT_WARMUP_START_FACTOR

    def __call__(self, step: int) -> float:
        # Multiplies rather than shifts the inner schedule, so step-decay milestones stay absolute.
        s = _index(step)
        lr = self.inner(s)
        if s >= self.warmup_steps:
            return lr
        return lr * (self.start_factor + (1 - self.start_factor) * s / self.warmup_steps)


# name -> the options it takes besides the warm-up ones, with their defaults (None: required)
SCHEDULES: dict[str, dict[str, object]] = {
    "constant": {},
    "step": {"milestones": None, "gamma": DEFAULT_GAMMA},
    "cosine": {"min_lr": DEFAULT_MIN_LR},
}


def _fail(name: str, what: str) -> EdgetrainError:
    return EdgetrainError(f"schedule '{name}': {what}")


def _number(name: str, field: str, value, low: float, high: float, low_open: bool = False) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise _fail(name, f"{field} must be a number, got {value!r}") from None
    below = v <= low if low_open else v < low
    if not math.isfinite(v) or below or v > high:
        raise _fail(name, f"{field} must be in {'(' if low_open else '['}{low:g}, {high:g}], got {value!r}")
    return v


def _integer(name: str, field: str, value, low: int) -> int:
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise _fail(name, f"{field} must be an integer, got {value!r}")
    v = operator.index(value)
    if v < low:
        raise _fail(name, f"{field} must be >= {low}, got {value!r}")
    return v


def _milestones(name: str, value) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise _fail(name, f"milestones must be a list of step numbers, got {value!r}")
    steps = tuple(_integer(name, "milestones", m, 1) for m in value)
    if not steps or any(b <= a for a, b in zip(steps, steps[1:])):
        raise _fail(name, f"milestones must be a non-empty, strictly increasing list, got {list(steps)}")
    return steps


def make_schedule(name: str, base_lr: float, total_steps: int, **opts) -> Schedule:
    """Build a schedule by name ("constant", "step", "cosine"), with optional linear warm-up.

    Options: step: milestones (required), gamma; cosine: min_lr; all: warmup_steps, warmup_start_factor.
    """
    key = str(name).strip().lower()
    if key not in SCHEDULES:
        raise _fail(name, f"unknown name; valid: {', '.join(SCHEDULES)}")
    own = SCHEDULES[key]
    valid = [*own, *WARMUP_OPTIONS]
    unknown = sorted(set(opts) - set(valid))
    if unknown:
        raise _fail(key, f"unknown option(s) {', '.join(unknown)}; valid: {', '.join(valid)}")
    missing = [k for k, default in own.items() if default is None and k not in opts]
    if missing:
        raise _fail(key, f"missing option(s) {', '.join(missing)}")
    base = _number(key, "base_lr", base_lr, 0.0, math.inf, low_open=True)
    total = _integer(key, "total_steps", total_steps, 1)
    o = {**own, **opts}

    if key == "constant":
        sched: Schedule = Constant(base)
    elif key == "step":
        sched = StepDecay(base, _milestones(key, o["milestones"]), _number(key, "gamma", o["gamma"], 0.0, 1.0, True))
    else:
        sched = Cosine(base, total, _number(key, "min_lr", o["min_lr"], 0.0, base))

    warmup = _integer(key, "warmup_steps", opts.get("warmup_steps", 0), 0)
    if warmup > total:
        raise _fail(key, f"warmup_steps ({warmup}) must not exceed total_steps ({total})")
    start = _number(key, "warmup_start_factor", opts.get("warmup_start_factor", DEFAULT_WARMUP_START_FACTOR), 0.0, 1.0)
    return LinearWarmup(sched, warmup, start) if warmup else sched
