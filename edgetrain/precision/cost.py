"""Training cost in FracTrain's unit: BitOPs of the MAC work, per layer and step, and run totals.

A GEMM of a-bit by w-bit operands over M MACs costs M*a*w BitOPs. One training step of a layer is its
forward (a*w), error back-propagation (g*w) and weight gradient (a*g); a float layer counts 32 bits.
The paper's relative figure divides by the same work at 32/32/32: (a*w + g*w + a*g) / (3*32*32).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from edgetrain.precision.spec import FP32_BITS, LayerPrecision

FP32_STEP_FACTOR = 3 * FP32_BITS * FP32_BITS


@dataclass(frozen=True)
class LayerCost:
    """One layer's BitOPs in one step (frozen: Model.step_cost hands out cached ones)."""

    macs: int  # for the whole batch
    forward: int
    backward_data: int
    backward_weight: int
    saved_bits: int  # activation memory held for backward, in bits

    @property
    def total(self) -> int:
        return self.forward + self.backward_data + self.backward_weight

    def __add__(self, other: LayerCost) -> LayerCost:
        """Field-wise sum: one layer's cost over several groups of samples (DFQ)."""
        return LayerCost(self.macs + other.macs, self.forward + other.forward,
                         self.backward_data + other.backward_data, self.backward_weight + other.backward_weight,
                         self.saved_bits + other.saved_bits)


def layer_step_cost(macs: int, precision: LayerPrecision, saved_elements: int,
                    needs_input_grad: bool = True) -> LayerCost:
    """BitOPs of one training step of a layer with `macs` multiply-accumulates over the batch.

    The first layer has no error to back-propagate into the input: `needs_input_grad=False` drops it.
    """
    a, w, g = precision.bitops_bits()
    return LayerCost(macs, macs * a * w, macs * g * w if needs_input_grad else 0, macs * a * g, saved_elements * a)


@dataclass
class CostMeter:
    """Accumulates BitOPs over a run; the fp32 reference is accumulated alongside."""

    steps: int = 0
    bitops: int = 0
    fp32_bitops: int = 0
    per_layer: dict[str, int] = field(default_factory=dict)
    last_step: dict[str, LayerCost] = field(default_factory=dict)

    def add_step(self, costs: dict[str, LayerCost], fp32_costs: dict[str, LayerCost]) -> None:
        """Record one step's per-layer costs and the same step's cost in fp32."""
        self.steps += 1
        self.last_step = costs
        for name, c in costs.items():
            self.bitops += c.total
            self.per_layer[name] = self.per_layer.get(name, 0) + c.total
        self.fp32_bitops += sum(c.total for c in fp32_costs.values())

    @property
    def percent_of_fp32(self) -> float:
        """The paper's metric: run cost as a percentage of the same run in fp32."""
        return 100.0 * self.bitops / self.fp32_bitops if self.fp32_bitops else 0.0

    def as_dict(self) -> dict:
        """JSON-ready totals."""
        return {"steps": self.steps, "bitops": self.bitops, "fp32_bitops": self.fp32_bitops,
                "percent_of_fp32": self.percent_of_fp32, "per_layer": dict(self.per_layer)}
