"""Per-layer precision: which MAC layers run in fixed point, and at how many bits.

FracTrain's vocabulary: FW bits (activations, and weights unless set apart) and BW bits (the gradient
of a layer's output, used for both the error back-propagation and the weight gradient). "8/8" means
FW 8, BW 8; "4/8:w6" sets weights apart at 6 bits; "fp32" keeps a layer on the float path.
"""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass

from edgetrain.errors import EdgetrainError
from edgetrain.graph import Graph
from edgetrain.layers import classifier_nodes, mac_nodes

# How an integer layer's output gradient takes its ranges: "tensor", one per gradient (FracTrain's and SBM's), or
# "split", quantised twice: per output channel for the weight gradient (a row of dW each) and per sample for the
# error (a row of dX each), so a sample whose gradient is small keeps its bits (docs/NUMERICS.md).
GRAD_RANGES = ("tensor", "split")
MIN_BITS = 2
MAX_BITS = 16
FP32_BITS = 32  # what a float layer counts as in BitOPs


@dataclass(frozen=True)
class LayerPrecision:
    """Bit-widths of one MAC layer; None everywhere means the fp32 path."""

    act_bits: int | None
    weight_bits: int | None
    grad_bits: int | None

    @property
    def is_float(self) -> bool:
        return self.act_bits is None

    def bitops_bits(self) -> tuple[int, int, int]:
        """(a, w, g) as they enter the cost model; fp32 counts as 32 bits."""
        if self.is_float:
            return FP32_BITS, FP32_BITS, FP32_BITS
        return self.act_bits, self.weight_bits, self.grad_bits

    def without_weight(self) -> LayerPrecision:
        """The precision of a layer with no weight (a MatMul between two activations): its second
        operand is an activation, so it takes the activation bits where a weight would take its own."""
        return self if self.is_float else LayerPrecision(self.act_bits, self.act_bits, self.grad_bits)

    def __str__(self) -> str:
        if self.is_float:
            return "fp32"
        s = f"{self.act_bits}/{self.grad_bits}"
        return s if self.weight_bits == self.act_bits else f"{s}:w{self.weight_bits}"


FP32 = LayerPrecision(None, None, None)

_SPEC = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*(?::\s*w\s*(\d+))?\s*$")


def parse_precision(spec: str | LayerPrecision | tuple) -> LayerPrecision:
    """Read "FW/BW", "FW/BW:wW", "fp32", a (fw, bw[, w]) tuple or a LayerPrecision."""
    if isinstance(spec, LayerPrecision):
        return spec
    if isinstance(spec, tuple):
        fw, bw, *w = spec
        return _checked(fw, bw, w[0] if w else fw, str(spec))
    text = str(spec).strip().lower()
    if text in ("fp32", "float", "float32"):
        return FP32
    m = _SPEC.match(text)
    if not m:
        raise EdgetrainError(f"precision '{spec}': expected FW/BW (e.g. 8/8), FW/BW:wW (e.g. 4/8:w6) or fp32")
    fw, bw = int(m.group(1)), int(m.group(2))
    return _checked(fw, bw, int(m.group(3)) if m.group(3) else fw, spec)


def _checked(fw: int, bw: int, w: int, spec) -> LayerPrecision:
    for name, bits in (("FW", fw), ("BW", bw), ("weight", w)):
        if not MIN_BITS <= int(bits) <= MAX_BITS:
            raise EdgetrainError(f"precision '{spec}': {name} bits must be in {MIN_BITS}..{MAX_BITS}, got {bits}")
    return LayerPrecision(int(fw), int(w), int(bw))


@dataclass
class PrecisionConfig:
    """A default for every MAC layer, then overrides by node or parameter name pattern (last match wins).

    The classifier stays fp32 unless `quantize_classifier` is set, as in FracTrain; BatchNorm and the
    other elementwise ops always compute in float32 (docs/NUMERICS.md says why).
    """

    default: LayerPrecision = FP32
    overrides: tuple[tuple[str, LayerPrecision], ...] = ()
    quantize_classifier: bool = False

    @classmethod
    def make(cls, default="fp32", overrides: dict | None = None, quantize_classifier: bool = False) -> PrecisionConfig:
        """Build from user-facing values (strings like "8/8", patterns like "layer1.*")."""
        return cls(parse_precision(default),
                   tuple((pat, parse_precision(p)) for pat, p in (overrides or {}).items()),
                   quantize_classifier)

    def resolve(self, graph: Graph) -> dict[str, LayerPrecision]:
        """Precision of every MAC node, by node name."""
        classifier = {n.name for n in classifier_nodes(graph)}
        out = {}
        unused = {pat for pat, _ in self.overrides}
        for node in mac_nodes(graph):
            p = FP32 if node.name in classifier and not self.quantize_classifier else self.default
            names = [node.name] + [i for i in node.inputs if i in graph.params]
            for pat, prec in self.overrides:
                if any(fnmatch.fnmatchcase(n, pat) for n in names):
                    p = prec
                    unused.discard(pat)
            out[node.name] = p
        if unused:
            raise EdgetrainError(f"precision override pattern{'s' if len(unused) > 1 else ''} "
                                 f"{', '.join(repr(u) for u in sorted(unused))} match no MAC layer of the model")
        return out
