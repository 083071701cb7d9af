"""Write a trained Model back to ONNX: the user's own graph with updated initializers."""
from __future__ import annotations

import os

import numpy as np
import onnx
from onnx import numpy_helper

from .errors import ModelError
from .fileio import write_atomic
from .model import Model


def to_onnx(model: Model) -> onnx.ModelProto:
    """The imported graph, unchanged, with every parameter and buffer set to the model's values."""
    proto = onnx.ModelProto()
    proto.CopyFrom(model.graph.original)
    g = proto.graph
    inits = {t.name: t for t in g.initializer}
    values = {**model.parameters(), **model.buffers()}
    for name, arr in values.items():
        if name in inits:
            dtype = onnx.helper.tensor_dtype_to_np_dtype(inits[name].data_type)
            inits[name].CopyFrom(numpy_helper.from_array(np.asarray(arr, dtype=dtype), name))
            continue
        # The importer split an Identity(initializer) alias into its own tensor; write it as one.
        producers = [n for n in g.node if n.op_type == "Identity" and list(n.output) == [name]]
        if not producers:
            raise ModelError(f"cannot export tensor '{name}': it is not an initializer of the source graph")
        source = inits[producers[0].input[0]]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(source.data_type)
        g.node.remove(producers[0])
        g.initializer.append(numpy_helper.from_array(np.asarray(arr, dtype=dtype), name))
    onnx.checker.check_model(proto)
    return proto


def export_onnx(model: Model, path: str | os.PathLike) -> None:
    """Save the trained model as a float ONNX file that onnxruntime can serve."""
    write_atomic(path, to_onnx(model).SerializeToString())
