"""What DFQ gates: residual blocks (edgetrain.blocks), or, in a model without blocks, single MAC layers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from edgetrain.blocks import find_blocks, layer_units
from edgetrain.graph import Graph, Node

if TYPE_CHECKING:
    pass

@dataclass
class Unit:
    """One gated unit, as built from a Block or a single layer."""

    index: int
    name: str
    fork: str
    shortcut: str | None  # None: no shortcut, so no skip candidate (a gated layer)
    branch: tuple[Node, ...]
    output: str  # the value the unit writes (the join's output, or the layer's)
    branch_output: str  # the branch's last value (the join's residual input, or the layer's output)
    macs: dict[str, int] = field(default_factory=dict)  # per-sample MACs of each gated layer



def gating_plan(graph: Graph) -> dict[str, Any]:
    """What DFQ would gate in this graph, without building anything: residual blocks, else layers."""
    blocks = find_blocks(graph)
    if blocks:
        return {"kind": "blocks", "units": [
            {"name": f"block{b.index}", "fork": b.fork, "output": b.output, "can_skip": True,
             "layers": [n.name for n in b.mac_nodes], "shortcut": [n.name for n in b.shortcut]} for b in blocks]}
    return {"kind": "layers", "units": [{"name": u.node.name, "fork": u.node.inputs[0], "output": u.node.outputs[0],
                                         "can_skip": False, "layers": [u.node.name]} for u in layer_units(graph)]}


