"""DFQ's settings and candidates: what a gate may choose, the cost target, the regulariser's weight."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from edgetrain.errors import EdgetrainError
from edgetrain.precision.spec import MAX_BITS, MIN_BITS, LayerPrecision, parse_precision

# FracTrain's CIFAR candidates (FW/BW), plus skipping; weights at a fixed 4 bits.
DEFAULT_CANDIDATES = ("0", "3/6", "4/6", "4/8", "6/8", "6/12")
DEFAULT_WEIGHT_BITS = 4
DEFAULT_TARGET = 3.0  # percent of the gated layers' fp32 training cost (FracTrain, CIFAR)
DEFAULT_BETA = 1e-3
DEFAULT_UNGATED = "8/8"  # stem and shortcut convs: outside every gate, at the static baseline's bits
INITIAL_LOGIT = 2.0  # head bias lead of the candidate training starts from
CANDIDATE_STREAM_STRIDE = 1 << 20  # keeps each candidate's stochastic-rounding streams apart
SKIP_WORDS = ("0", "0/0", "skip")
MAX_TARGET = 100.0  # the target is a percentage of the gated layers' fp32 cost
ESTIMATORS = ("ste", "probe")  # how gates learn: straight-through only, or probed candidates (docs/GATE_ESTIMATOR.md)
DEFAULT_PROBE_SHARE = 0.125  # share of each batch whose gated units also run a second candidate
DEFAULT_PROBE_WEIGHT = 1.0  # weight of the probe's distillation loss on the gates
DEFAULT_PROBE_MARGIN = 0.01  # per-sample loss a cheaper candidate may trail the best by and still be the target
PROBE_RULES = ("margin", "budget")  # how the probe's scores become targets (edgetrain.precision.dfq.probe)
# How a gate's logits become a sample's candidate: their argmax, or the share of computing samples the cost target's
# allowance buys sent to the dearer candidate by the gate's ranking (edgetrain.precision.dfq.quota)
SELECTIONS = ("argmax", "quota")
# Batches that re-estimate the exported network's statistics (edgetrain.precision.dfq.recalibrate). With the
# running statistics' momentum of 0.9 (PyTorch's 0.1) the gated statistics keep a weight of 0.9^25, about
# 7%; measured on ResNet-38, 25 and 100 batches scored alike.
DEFAULT_RECALIBRATION_BATCHES = 25


@dataclass(frozen=True)
class GatedPrecision(LayerPrecision):
    """What a gated layer reports as its precision: chosen per sample, weights at a fixed width."""

    def __str__(self) -> str:
        return f"dfq:w{self.weight_bits}"


@dataclass(frozen=True)
class Candidate:
    """One choice a gate can make: an FW/BW pair (weights at the DFQ width), or skip."""

    text: str
    precision: LayerPrecision | None  # None: skip the unit

    @property
    def skip(self) -> bool:
        return self.precision is None


def parse_candidates(specs, weight_bits: int) -> tuple[Candidate, ...]:
    """Read candidates like ("0", "3/6", "4/8"); "0" (or "skip") means skip the block."""
    out = []
    for spec in specs:
        text = str(spec).strip().lower()
        if text in SKIP_WORDS:
            out.append(Candidate("skip", None))
            continue
        p = parse_precision(text)
        if p.is_float:
            raise EdgetrainError(f"dfq candidate '{spec}': candidates are FW/BW bits (or 0 to skip), not fp32")
        out.append(Candidate(f"{p.act_bits}/{p.grad_bits}", LayerPrecision(p.act_bits, weight_bits, p.grad_bits)))
    if len({c.text for c in out}) != len(out):
        raise EdgetrainError(f"dfq candidates {list(specs)}: each candidate may appear once")
    if not any(not c.skip for c in out):
        raise EdgetrainError(f"dfq candidates {list(specs)}: at least one must compute (FW/BW bits)")
    return tuple(out)


def _real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class DFQConfig:
    """Every knob of DFQ, with FracTrain's CIFAR values as defaults."""

    candidates: tuple[str, ...] = DEFAULT_CANDIDATES
    weight_bits: int = DEFAULT_WEIGHT_BITS
    target: float = DEFAULT_TARGET
    beta: float = DEFAULT_BETA
    initial_logit: float = INITIAL_LOGIT
    initial_choice: str | None = None  # default: the computing candidate whose cost is nearest the target
    cost_table: dict[str, dict[str, float]] | None = None  # layer -> precision -> seconds (edgetrain.precision.latency)
    estimator: str = "ste"  # "ste": straight-through only; "probe": plus measured second candidates
    probe_share: float = DEFAULT_PROBE_SHARE
    probe_weight: float = DEFAULT_PROBE_WEIGHT
    probe_margin: float = DEFAULT_PROBE_MARGIN
    probe_rule: str = "margin"  # "margin": cheapest within a margin of the best; "budget": priced sensitivity
    min_exec_share: float = 0.0  # floor on each skippable unit's executed share of a batch (guards collapse)
    selection: str = "argmax"  # "argmax": each sample its gate's top candidate; "quota": by ranking (dfq.quota)
    # Share of each unit's computing samples whose error runs back through its MAC layers: those whose output
    # gradient peaks highest; the rest take 0-bit gradients there (GatedUnit._trained_rows). 1: every sample.
    backward_share: float = 1.0

    def __post_init__(self) -> None:
        """Refuse values no DFQ run can use, whoever builds the config (the CLI, a TOML file, the API)."""
        target, beta, logit = self.target, self.beta, self.initial_logit
        if not _real(target) or not 0 < target <= MAX_TARGET:
            raise EdgetrainError(f"dfq target must be a percentage in (0, {MAX_TARGET:g}], got {target!r}")
        if not _real(beta) or beta < 0:
            raise EdgetrainError(f"dfq beta must be a finite number >= 0, got {beta!r}")
        if not _real(logit):
            raise EdgetrainError(f"dfq initial_logit must be a finite number, got {logit!r}")
        if self.estimator not in ESTIMATORS:
            raise EdgetrainError(f"dfq estimator must be one of {', '.join(ESTIMATORS)}, got {self.estimator!r}")
        if self.probe_rule not in PROBE_RULES:
            raise EdgetrainError(f"dfq probe_rule must be one of {', '.join(PROBE_RULES)}, got {self.probe_rule!r}")
        if self.selection not in SELECTIONS:
            raise EdgetrainError(f"dfq selection must be one of {', '.join(SELECTIONS)}, got {self.selection!r}")
        if not _real(self.probe_share) or not 0 < self.probe_share <= 1:
            raise EdgetrainError(f"dfq probe_share must be a share in (0, 1], got {self.probe_share!r}")
        for name in ("probe_weight", "probe_margin"):
            if not _real(getattr(self, name)) or getattr(self, name) < 0:
                raise EdgetrainError(f"dfq {name} must be a finite number >= 0, got {getattr(self, name)!r}")
        if not _real(self.min_exec_share) or not 0 <= self.min_exec_share <= 1:
            raise EdgetrainError(f"dfq min_exec_share must be a share in [0, 1], got {self.min_exec_share!r}")
        if not _real(self.backward_share) or not 0 < self.backward_share <= 1:
            raise EdgetrainError(f"dfq backward_share must be a share in (0, 1], got {self.backward_share!r}")
        if isinstance(self.weight_bits, bool) or not isinstance(self.weight_bits, int):
            raise EdgetrainError(f"dfq weight_bits must be an integer, got {self.weight_bits!r}")
        if isinstance(self.candidates, str) or not all(isinstance(c, str) for c in self.candidates):
            raise EdgetrainError(f"dfq candidates must be a sequence of strings, got {self.candidates!r}")
        self.candidates = tuple(self.candidates)
        self.check()

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready settings, for the run's record."""
        return {"candidates": list(self.candidates), "weight_bits": self.weight_bits, "target": self.target,
                "beta": self.beta, "initial_logit": self.initial_logit, "initial_choice": self.initial_choice,
                "estimator": self.estimator, "probe_share": self.probe_share, "probe_weight": self.probe_weight,
                "probe_margin": self.probe_margin, "probe_rule": self.probe_rule, "min_exec_share": self.min_exec_share,
                "selection": self.selection, "backward_share": self.backward_share}

    def check(self) -> tuple[Candidate, ...]:
        """Refuse weight bits no kernel has and candidates no gate can take; returns the parsed candidates.
        (__post_init__ runs it, and bounds the target and beta.)"""
        if not MIN_BITS <= self.weight_bits <= MAX_BITS:
            raise EdgetrainError(f"option 'dfq_weight_bits' must be in {MIN_BITS}..{MAX_BITS}, got {self.weight_bits}")
        return parse_candidates(self.candidates, self.weight_bits)
