"""Sizes of ONNX values before they exist: what a constant node will fold to, what a declared shape holds.

The importer folds constant subgraphs with onnx's reference evaluator, which allocates whatever a node
asks for (ConstantOfShape of [2^20, 2^20] is 4 TiB). Here ONNX's own shape inference, run on a one-node
model whose inputs are the node's constant values, says each output's shape first, from the op's
semantics (ConstantOfShape, Expand, Tile, Range, Resize, Pad, Concat, OneHot, broadcasting ...), so the
importer can refuse before evaluating.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

# Inputs up to this many elements go in as initializers (shape inference reads their values: a shape, a
# repeat count, pads, scales); larger ones only as typed inputs, to avoid copying weights into a proto.
VALUE_ELEMENTS = 4096
# Ops whose output size comes from an input's values, not its size: when shape inference cannot tell their
# output shape, the importer does not fold them blindly.
EXPANDING_OPS = frozenset({"ConstantOfShape", "Expand", "Tile", "Range", "Resize", "Upsample", "Pad", "OneHot",
                           "CenterCropPad", "Col2Im"})


def subgraph_expands(node: onnx.NodeProto) -> bool:
    """True if a subgraph of `node` (If, Loop, Scan) holds an op whose output size comes from values: what it
    allocates inside cannot be told from the node's output shape."""
    for attr in node.attribute:
        for graph in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
            if any(n.op_type in EXPANDING_OPS or subgraph_expands(n) for n in graph.node):
                return True
    return False


def elem_bytes(elem_type: int) -> int:
    """Bytes per element of an ONNX tensor type (strings and unknown types: 8, a pointer)."""
    try:
        return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)).itemsize
    except (KeyError, TypeError, ValueError):
        return 8


def shape_bytes(shape: Sequence[int | None], itemsize: int) -> int:
    """Exact bytes of a tensor (Python ints, no overflow); unknown dimensions count as 1 (one sample)."""
    return math.prod(max(int(d), 0) if isinstance(d, int) else 1 for d in shape) * itemsize


def _input_proto(name: str, value: np.ndarray) -> onnx.TensorProto | onnx.ValueInfoProto:
    if value.size <= VALUE_ELEMENTS and value.dtype != object:
        return numpy_helper.from_array(np.array(value, order="C"), name)  # ascontiguousarray makes 0-d 1-d
    elem = helper.np_dtype_to_tensor_dtype(value.dtype)
    return helper.make_tensor_value_info(name, elem, list(value.shape))


def fold_output_sizes(node: onnx.NodeProto, constants: Mapping[str, np.ndarray],
                      opset: int) -> list[tuple[tuple[int, ...], int] | None]:
    """(shape, bytes) of each output of `node` if its inputs are `constants`, from ONNX shape inference;
    None for an output whose shape inference cannot tell (an op it does not know, a failure)."""
    inits, inputs = [], []
    for name in node.input:
        if not name:
            continue
        proto = _input_proto(name, np.asarray(constants[name]))
        (inits if isinstance(proto, onnx.TensorProto) else inputs).append(proto)
    outputs = [onnx.ValueInfoProto(name=o) for o in node.output if o]
    bare = onnx.NodeProto()
    bare.CopyFrom(node)
    graph = helper.make_graph([bare], "fold", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(node.domain or "", opset)])
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # onnx raises several types; any failure just means "unknown"
        return [None for _ in outputs]
    by_name = {vi.name: vi for vi in list(inferred.graph.output) + list(inferred.graph.value_info)}
    result: list[tuple[tuple[int, ...], int] | None] = []
    for o in outputs:
        t = by_name[o.name].type if o.name in by_name else None
        if t is None or not t.HasField("tensor_type") or not t.tensor_type.HasField("shape"):
            result.append(None)
            continue
        dims = t.tensor_type.shape.dim
        if not all(d.HasField("dim_value") for d in dims):
            result.append(None)
            continue
        shape = tuple(d.dim_value for d in dims)
        result.append((shape, shape_bytes(shape, elem_bytes(t.tensor_type.elem_type))))
    return result
