"""Which nodes do MAC work, and which of those the integer engine quantises by default."""
from __future__ import annotations

from .graph import Graph, Node
from .ops import MAC_OPS


def mac_nodes(graph: Graph) -> list[Node]:
    """Conv, Gemm and MatMul nodes that read at least one trainable parameter, in execution order."""
    return [n for n in graph.nodes if n.op_type in MAC_OPS and any(i in graph.params for i in n.inputs)]


def classifier_nodes(graph: Graph) -> list[Node]:
    """MAC nodes from which a graph output is reached without passing another MAC node.

    FracTrain keeps the classifier in full precision; these are the layers that rule covers.
    """
    macs = {n.name for n in mac_nodes(graph)}
    producer = graph.producer_of()
    found: list[str] = []
    seen: set[str] = set()
    stack = [o.name for o in graph.outputs]
    while stack:
        value = stack.pop()
        node = producer.get(value)
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        if node.name in macs:
            found.append(node.name)
            continue
        stack.extend(i for i in node.inputs if i)
    return [n for n in graph.nodes if n.name in found]


def default_quantised(graph: Graph) -> list[Node]:
    """MAC layers the integer engine runs in fixed point unless configured otherwise."""
    keep_float = {n.name for n in classifier_nodes(graph)}
    return [n for n in mac_nodes(graph) if n.name not in keep_float]
