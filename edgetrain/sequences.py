"""Tensor sequences that are only a Split in disguise, rewritten as one.

torch's dynamo exporter writes `x.chunk(n)` and `torch.split(x, sizes)` as SplitToSequence followed by
SequenceAt at constant positions. Where every reader of the sequence is such a SequenceAt and the split axis
has a known length, the pair is exactly a Split (plus a Squeeze where keepdims=0) whose parts the readers
take: the rewrite keeps every value's name, so errors, `info` and export still speak of the user's graph.
Anything else stays as it is, and the importer refuses it by name.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper


def _constant_values(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Initializers and Constant nodes' values, by name."""
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant" and n.domain in ("", "ai.onnx"):
            for a in n.attribute:
                if a.name == "value":
                    values[n.output[0]] = numpy_helper.to_array(a.t)
                elif a.name in ("value_int", "value_ints"):
                    values[n.output[0]] = np.array(helper.get_attribute_value(a), dtype=np.int64)
    return values


def _part_sizes(length: int, split: np.ndarray | None) -> list[int] | None:
    if split is None:
        return [1] * length
    if split.ndim == 0:  # chunks of this size, the last one smaller
        step = int(split)
        if step <= 0:
            return None
        return [step] * (length // step) + ([length % step] if length % step else [])
    sizes = [int(s) for s in split.reshape(-1)]
    return sizes if sum(sizes) == length and min(sizes, default=0) >= 0 else None


def split_sequences(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """The model with each SplitToSequence read only by constant SequenceAt nodes turned into a Split.

    The model given is not modified; without such a pattern it is returned as it is.
    """
    g = model.graph
    nodes = list(g.node)  # held, so each node keeps one identity below
    if not any(n.op_type == "SplitToSequence" for n in nodes):
        return model
    constants = _constant_values(model)
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {vi.name: [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
              for vi in list(inferred.graph.value_info) + list(inferred.graph.input)
              if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape")}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in nodes:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    outputs = {o.name for o in g.output}
    replace: dict[int, list[onnx.NodeProto]] = {}  # node id -> the nodes standing in its place
    inits: list[onnx.TensorProto] = []
    for n in nodes:
        if n.op_type != "SplitToSequence" or n.domain not in ("", "ai.onnx"):
            continue
        seq = n.output[0]
        reads = readers.get(seq, [])
        if seq in outputs or not reads or any(r.op_type != "SequenceAt" or r.input[1] not in constants for r in reads):
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        shape = shapes.get(n.input[0])
        if not shape:
            continue
        axis = int(attrs.get("axis", 0)) % len(shape)
        split = constants.get(n.input[1]) if len(n.input) > 1 and n.input[1] else None
        if shape[axis] is None or (len(n.input) > 1 and n.input[1] and split is None):
            continue
        sizes = _part_sizes(shape[axis], split)
        if not sizes:
            continue
        squeeze = split is None and not attrs.get("keepdims", 1)
        parts = [f"{seq}/part{i}" for i in range(len(sizes))]
        sizes_name = f"{seq}/sizes"
        if opset >= 13:
            inits.append(numpy_helper.from_array(np.array(sizes, dtype=np.int64), sizes_name))
            stand_in = [helper.make_node("Split", [n.input[0], sizes_name], parts, name=n.name, axis=axis)]
        else:
            stand_in = [helper.make_node("Split", [n.input[0]], parts, name=n.name, axis=axis, split=sizes)]
        replace[id(n)] = stand_in
        for r in reads:
            part = parts[int(constants[r.input[1]].reshape(-1)[0]) % len(parts)]
            if not squeeze:
                replace[id(r)] = [helper.make_node("Identity", [part], [r.output[0]], name=r.name)]
            elif opset >= 13:
                axes_name = f"{seq}/axes"
                if not any(t.name == axes_name for t in inits):
                    inits.append(numpy_helper.from_array(np.array([axis], dtype=np.int64), axes_name))
                replace[id(r)] = [helper.make_node("Squeeze", [part, axes_name], [r.output[0]], name=r.name)]
            else:
                replace[id(r)] = [helper.make_node("Squeeze", [part], [r.output[0]], name=r.name, axes=[axis])]
    if not replace:
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:]
    out.graph.node.extend([m for n in nodes for m in replace.get(id(n), [n])])
    out.graph.initializer.extend(inits)
    return out
