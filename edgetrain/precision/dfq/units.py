"""What DFQ gates: residual blocks (edgetrain.blocks), or, in a model without blocks, single MAC layers."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from edgetrain.blocks import find_blocks, layer_units
from edgetrain.errors import EdgetrainError
from edgetrain.graph import Graph, Node
from edgetrain.layers import is_activation_product
from edgetrain.ops.base import Op


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
    weightless: frozenset[str] = frozenset()  # gated layers without a weight (MatMuls of two activations)
    input_shape: tuple[int, ...] = ()  # the fork's shape (sample_shape: a free batch dimension counts 1)


def find_units(graph: Graph) -> list[Unit]:
    """The units DFQ gates in this graph: its residual blocks, else its gateable layers (edgetrain.blocks)."""
    blocks = find_blocks(graph)
    if blocks:
        return [Unit(b.index, f"block{b.index}", b.fork, b.shortcut_input, b.branch, b.output, b.residual_input)
                for b in blocks]
    return [Unit(u.index, u.node.name, u.node.inputs[0], None, (u.node,), u.node.outputs[0], u.node.outputs[0])
            for u in layer_units(graph)]


def sample_shape(graph: Graph, name: str) -> tuple[int, ...]:
    """The shape of value `name` as the importer inferred it (Graph.shapes), a free batch dimension set to 1."""
    shape = graph.shapes.get(name)
    if shape is None or any(d is None for d in shape[1:]):
        raise EdgetrainError(f"{graph.source}: DFQ needs the shape of '{name}', which ONNX shape inference "
                             f"left {'unknown' if shape is None else shape}")
    return tuple(1 if d is None else d for d in shape)


def measure_units(units: list[Unit], graph: Graph, gated_layers: set[str], float_op: Callable[[str], Op]) -> None:
    """Fill each unit's input shape and its gated layers' per-sample MACs from the graph's shapes."""
    for u in units:
        u.input_shape = sample_shape(graph, u.fork)
        u.weightless = frozenset(n.name for n in u.branch if n.name in gated_layers and is_activation_product(graph, n))
        for node in u.branch:
            if node.name in gated_layers:
                ins = [sample_shape(graph, i) if i else () for i in node.inputs]
                outs = [sample_shape(graph, o) for o in node.outputs if o]
                u.macs[node.name] = int(float_op(node.name).macs(ins, outs))


def gating_plan(graph: Graph) -> dict[str, Any]:
    """What DFQ would gate in this graph, without building anything: residual blocks, else layers."""
    blocks = find_blocks(graph)
    if blocks:
        return {"kind": "blocks", "units": [
            {"name": f"block{b.index}", "fork": b.fork, "output": b.output, "can_skip": True,
             "layers": [n.name for n in b.mac_nodes], "shortcut": [n.name for n in b.shortcut]} for b in blocks]}
    return {"kind": "layers", "units": [{"name": u.node.name, "fork": u.node.inputs[0], "output": u.node.outputs[0],
                                         "can_skip": False, "layers": [u.node.name]} for u in layer_units(graph)]}
