"""Import rewrite of quantised ONNX models: dequantised weights become float initializers (so parameters).

A DequantizeLinear whose input, scale and zero point are all initializers (an int8/uint8 weight or an
int32 bias of a QDQ model) is evaluated at import, as onnxruntime evaluates it (float32 (q - zero) * scale),
and replaced by a float initializer its consumers read directly. The initializer is named after the
quantised one without its `_quantized` suffix (`conv1.weight_quantized` -> `conv1.weight`, the name both
edgetrain's and onnxruntime's quantisers derived it from) when that name is free, else after the
DequantizeLinear's output. The importer applies the same rewrite to the graph it keeps for export, so a
float export writes the trained float weights in place of the quantised ones; QuantizeLinear ->
DequantizeLinear pairs on activations stay in the graph (fake quantisation, in edgetrain and in the file),
they and their tensors renamed with a `.imported` suffix so that an int8 export of the fine-tuned model
(edgetrain.export.export_int8, after training at 8/8) can add its own QDQ pairs in front of each integer
layer under its own names: the file then quantises such a layer's input twice, with the imported scale and
with the trained one, as the engine computes it.

QOperator models (QLinearConv, QLinearMatMul, ConvInteger, MatMulInteger) keep their integer weights: they
are constants, evaluated exactly and written back unchanged, and those layers do not train.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from edgetrain.errors import ModelError

QUANTIZED_SUFFIX = "_quantized"
IMPORTED_SUFFIX = ".imported"
INTEGER_TYPES = frozenset({np.dtype(t) for t in (np.int8, np.uint8, np.int16, np.uint16, np.int32)})


def _dequantize(node: onnx.NodeProto, q: np.ndarray, scale: np.ndarray, zero: np.ndarray | None) -> np.ndarray:
    """The DequantizeLinear's value, per tensor or per axis, as onnxruntime computes it."""
    axis = 1
    block = 0
    for a in node.attribute:
        if a.name == "axis":
            axis = a.i
        elif a.name == "block_size":
            block = a.i
    if block and scale.ndim != q.ndim:
        raise ModelError(f"node '{node.name}' (DequantizeLinear): block_size {block} needs a scale of the "
                         f"weight's rank {q.ndim}, got shape {scale.shape}")
    v = q.astype(np.int64)
    s = scale
    if block:  # one scale (and zero point) per `block` elements along axis
        a = axis % q.ndim
        s = np.take(np.repeat(scale, block, axis=a), np.arange(q.shape[a]), axis=a)
        if zero is not None:
            zero = np.take(np.repeat(zero, block, axis=a), np.arange(q.shape[a]), axis=a)
    elif scale.ndim == 1 and q.ndim > 0:
        shape = [1] * q.ndim
        shape[axis % q.ndim] = scale.shape[0]
        s = scale.reshape(shape)
        if zero is not None:
            zero = zero.reshape(shape)
    if zero is not None:
        v = v - zero.astype(np.int64)
    return (v.astype(scale.dtype) * s).astype(scale.dtype)


def dequantize_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """Replace every DequantizeLinear of constant integer tensors by a float initializer (in place), and
    mark the activations' quantisation tensors as imported."""
    model = _dequantize_weights(model)
    _mark_imported(model)
    return model


def _mark_imported(model: onnx.ModelProto) -> None:
    """Suffix the outputs, scales and zero points of the Quantize/DequantizeLinear nodes left (activations')
    with IMPORTED_SUFFIX: an int8 export of the fine-tuned model adds its own QDQ pairs under its own names
    (`conv1.input_scale`, the names the imported file used), and they must not collide."""
    g = model.graph
    fixed = {i.name for i in g.input} | {o.name for o in g.output}
    inits = {t.name: t for t in g.initializer}
    renamed: dict[str, str] = {}
    for n in g.node:
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear") or n.domain not in ("", "ai.onnx"):
            continue
        names = list(n.output) + [x for x in list(n.input)[1:] if x in inits]
        if n.name:
            n.name += IMPORTED_SUFFIX
        renamed.update({x: x + IMPORTED_SUFFIX for x in names if x and x not in fixed})
    if not renamed:
        return
    for n in g.node:
        n.input[:] = [renamed.get(x, x) for x in n.input]
        n.output[:] = [renamed.get(x, x) for x in n.output]
    for t in g.initializer:
        t.name = renamed.get(t.name, t.name)
    for vi in g.value_info:
        vi.name = renamed.get(vi.name, vi.name)


def _dequantize_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    outputs = {o.name for o in g.output}
    taken = set(inits) | {i.name for i in g.input} | {o for n in g.node for o in n.output}
    renamed: dict[str, str] = {}
    kept = []
    for n in g.node:
        args = list(n.input) + [""] * (3 - len(n.input))
        if (n.op_type != "DequantizeLinear" or n.domain not in ("", "ai.onnx") or n.output[0] in outputs
                or not all(a in inits for a in args[:2]) or (args[2] and args[2] not in inits)):
            kept.append(n)
            continue
        q = numpy_helper.to_array(inits[args[0]])
        if q.dtype not in INTEGER_TYPES:
            kept.append(n)
            continue
        scale = numpy_helper.to_array(inits[args[1]])
        zero = numpy_helper.to_array(inits[args[2]]) if args[2] else None
        value = _dequantize(n, q, scale, zero)
        name = n.output[0]
        if args[0].endswith(QUANTIZED_SUFFIX):
            base = args[0][: -len(QUANTIZED_SUFFIX)]
            if base and base not in taken:
                name = base
        taken.add(name)
        renamed[n.output[0]] = name
        g.initializer.append(numpy_helper.from_array(value, name))
        inits[name] = g.initializer[-1]
    if not renamed:
        return model
    del g.node[:]
    g.node.extend(kept)
    for n in g.node:
        for i, x in enumerate(n.input):
            if x in renamed:
                n.input[i] = renamed[x]
    # The quantised tensors, scales and zero points nothing reads any more go (a scale shared with an
    # activation's QuantizeLinear stays).
    used = {x for n in g.node for x in n.input} | outputs
    dead = [t for t in g.initializer if t.name not in used]
    for t in dead:
        g.initializer.remove(t)
    dead_names = {t.name for t in dead}
    for vi in [i for i in g.input if i.name in dead_names]:
        g.input.remove(vi)
    return model


def _dims(model: onnx.ModelProto, name: str) -> list | None:
    for vi in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        if vi.name == name and vi.type.tensor_type.HasField("shape"):
            return list(vi.type.tensor_type.shape.dim)
    for t in model.graph.initializer:
        if t.name == name:
            return [onnx.TensorShapeProto.Dimension(dim_value=d) for d in t.dims]
    return None


def infer_qgemm_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Shapes through onnxruntime's QGemm, which ONNX's shape inference does not know: each QGemm's output
    is recorded as value_info once its operands' shapes are known, and inference runs again past it."""
    pending = [n for n in model.graph.node if n.op_type == "QGemm" and n.domain == "com.microsoft"]
    inits = {t.name: t for t in model.graph.initializer}
    while pending:
        model = onnx.shape_inference.infer_shapes(model)
        ready = [n for n in pending if _dims(model, n.input[0]) and _dims(model, n.input[3])]
        if not ready:
            return model  # the importer's strict inference reports what stays unknown
        for n in ready:
            attrs = {a.name: a for a in n.attribute}
            a, b = _dims(model, n.input[0]), _dims(model, n.input[3])
            rows = a[1] if "transA" in attrs and attrs["transA"].i else a[0]
            cols = b[0] if "transB" in attrs and attrs["transB"].i else b[1]
            if len(n.input) > 7 and n.input[7]:
                zero = inits.get(n.input[8]) if len(n.input) > 8 else None
                elem = zero.data_type if zero is not None else onnx.TensorProto.UINT8
            else:
                elem = onnx.TensorProto.FLOAT
            vi = model.graph.value_info.add()
            vi.name = n.output[0]
            vi.type.tensor_type.elem_type = elem
            vi.type.tensor_type.shape.dim.extend([rows, cols])
            pending.remove(n)
    return model
