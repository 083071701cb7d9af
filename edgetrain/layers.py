"""Graph facts the precision machinery needs: which nodes do MAC work, which of them is the classifier,
and which values can never be negative."""
from __future__ import annotations

from edgetrain.graph import Graph, Node
from edgetrain.ops import DATA_MOVEMENT_OPS, MAC_OPS


def mac_nodes(graph: Graph) -> list[Node]:
    """MAC nodes (ops.MAC_OPS) that read at least one trainable parameter, and MatMuls between two activations
    (attention's products: MAC work with bits and BitOPs, but no weight), in execution order.

    An LSTM/GRU counts when its weights W are a parameter or computed from parameters (torch's exporter
    slices and stacks its own tensors into W), not when they are a constant or a graph input."""
    produced = {o for n in graph.nodes for o in n.outputs if o}
    return [n for n in graph.nodes if n.op_type in MAC_OPS and (
        any(i in graph.params for i in n.inputs) or is_activation_product(graph, n)
        or (n.op_type in ("LSTM", "GRU") and n.inputs[1] in produced))]


def is_activation_product(graph: Graph, node: Node) -> bool:
    """A MatMul whose two operands are both computed values (neither an initializer nor a folded constant)."""
    fixed = graph.params.keys() | graph.buffers.keys() | graph.constants.keys()
    return node.op_type == "MatMul" and len(node.inputs) == 2 and not any(i in fixed for i in node.inputs)


def param_sources(graph: Graph, name: str) -> set[str]:
    """The parameters a value is, or is sliced, reordered and stacked from through data-movement ops only
    (torch's LSTM/GRU export builds W, R, B from its own tensors so)."""
    producer = graph.producer_of()
    found: set[str] = set()
    stack = [name]
    while stack:
        value = stack.pop()
        if value in graph.params:
            found.add(value)
        elif value in producer and producer[value].op_type in DATA_MOVEMENT_OPS:
            node = producer[value]
            slots = DATA_MOVEMENT_OPS[node.op_type]
            stack.extend(x for p, x in enumerate(node.inputs) if x and (slots is None or p in slots))
    return found


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


# Ops whose output is non-negative whenever every data input is (pooling and reshaping move values,
# Add and Mul of non-negatives stay non-negative).
_PRESERVES_SIGN = frozenset({"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Flatten", "Reshape",
                             "Transpose", "Identity", "Dropout", "Concat", "Add", "Mul", "Squeeze", "Unsqueeze",
                             "Slice", "Gather", "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "Max", "Min",
                             "Split", "Expand", "Tile", "DepthToSpace", "SpaceToDepth"})
_ALWAYS_NON_NEGATIVE = frozenset({"Relu", "Sigmoid", "Softmax", "HardSigmoid", "Softplus", "Exp", "Abs", "Sqrt",
                                  "ReduceL1", "ReduceL2", "ReduceSumSquare"})


def non_negative_values(graph: Graph) -> set[str]:
    """Values that can never be negative, found from the graph alone (after ReLU, ReLU6, pooling of those).

    The integer engine stores these in an unsigned format, so no bit is spent on a sign that is
    always positive.
    """
    known: set[str] = {name for name, v in graph.constants.items() if getattr(v, "size", 0) and (v >= 0).all()}
    data_inputs = {"Reshape": 1, "Squeeze": 1, "Unsqueeze": 1, "Slice": 1, "Gather": 1, "Dropout": 1,
                   "ReduceMean": 1, "ReduceSum": 1, "ReduceMax": 1, "ReduceMin": 1, "Split": 1, "Expand": 1,
                   "Tile": 1}
    for node in graph.nodes:
        out = node.outputs[0]
        if node.op_type in _ALWAYS_NON_NEGATIVE:
            known.add(out)
        elif node.op_type == "Clip":
            lo = node.inputs[1] if len(node.inputs) > 1 else ""
            if lo and lo in graph.constants and (graph.constants[lo] >= 0).all():
                known.add(out)
        elif node.op_type in _PRESERVES_SIGN:
            count = data_inputs.get(node.op_type, len(node.inputs))
            if all(i in known for i in node.inputs[:count] if i):
                known.update(o for o in node.outputs if o)  # every part of a Split
        elif node.op_type == "Resize" and node.inputs[0] in known:
            # Nearest and linear weights are convex; cubic's lobes overshoot below zero.
            if node.attrs.get("mode", "nearest") != "cubic":
                known.add(out)
        elif node.op_type == "Pad" and node.inputs[0] in known:
            value = node.inputs[2] if len(node.inputs) > 2 else ""
            if not value or value in known:
                known.add(out)
    return known
