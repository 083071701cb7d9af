"""The int8 export's graph rewriting: BatchNorm folded into the preceding Conv/Gemm, and QuantizeLinear/
DequantizeLinear placed on tensors (not layer inputs) in the pattern onnxruntime's graph optimiser fuses
into its integer kernels (QLinearConv, QGemm/QLinearMatMul, QLinearAdd). A convolution on fewer than 4
input channels stays float (MIN_INT8_CONV_CHANNELS).

Works on a ModelProto only; edgetrain.export says which layers are integer and at what activation scale.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from edgetrain.errors import ModelError

INT8_MAX = 127
UINT8_MAX = 255
# Ops a quantised tensor passes through unchanged in value (so one scale serves both sides): onnxruntime drops
# the DQ -> op -> Q around them when the scales match.
VALUE_PRESERVING = {"MaxPool", "Flatten", "Reshape", "Identity", "Squeeze", "Unsqueeze", "Transpose"}
# Every activation is uint8: onnxruntime fuses DQ -> Conv -> Q only when input and output share a type, so a
# signed tensor is written on the engine's symmetric int8 grid shifted by 128 (the same scale and values, plus
# the code -128 the engine does not use).
SIGNED_ZERO_POINT = 128
# Activations onnxruntime removes in front of a QuantizeLinear whose range lies inside theirs (Relu, ReLU6).
ACTIVATIONS = ("Relu", "Clip")
# A convolution with fewer input channels per group than this (a first layer on grey or RGB pixels) stays float:
# onnxruntime's symmetric int8 conv kernels need a multiple of 4, and its fallback (im2col, then a GEMM with
# K = 9..75) ran 5.7x (1 channel) and 1.9x (3 channels) slower than its float conv on an AVX2 EPYC at batch 64.
# Its weights keep the engine's int8 grid (stored dequantised); only its input is not rounded to 8 bits.
MIN_INT8_CONV_CHANNELS = 4


@dataclass(frozen=True)
class ActFormat:
    """An activation's 8-bit format: scale, and uint8 (zero point 0, non-negative values) or int8."""

    scale: float
    unsigned: bool


@dataclass(frozen=True)
class IntLayer:
    """One integer MAC node to write: its output tensor (in the source graph) and its input format."""

    output: str
    act: ActFormat
    weight_bits: int = 8


def _consumers(nodes: list[onnx.NodeProto]) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list[onnx.NodeProto]] = {}
    for n in nodes:
        for i in n.input:
            out.setdefault(i, []).append(n)
    return out


def _attr(node: onnx.NodeProto, name: str, default: object) -> object:
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def fold_batchnorm(proto: onnx.ModelProto) -> int:
    """Fold every inference BatchNorm that alone reads a Conv's or Gemm's output into that layer, in place;
    return how many were folded. The layer's output takes the BatchNorm's output name."""
    g = proto.graph
    inits = {t.name: t for t in g.initializer}
    nodes = list(g.node)
    consumers = _consumers(nodes)
    producer = {o: n for n in nodes for o in n.output}
    graph_outputs = {o.name for o in g.output}
    removed: set[int] = set()
    folded = 0
    for bn in nodes:
        if bn.op_type != "BatchNormalization" or len(bn.output) != 1 or _attr(bn, "training_mode", 0):
            continue
        layer = producer.get(bn.input[0])
        if layer is None or layer.op_type not in ("Conv", "Gemm") or bn.input[0] in graph_outputs:
            continue
        constants = list(layer.input[1:]) + list(bn.input[1:])
        if len(consumers.get(bn.input[0], [])) != 1 or not all(i in inits for i in constants):
            continue
        if layer.op_type == "Gemm" and (_attr(layer, "alpha", 1.0) != 1.0 or _attr(layer, "beta", 1.0) != 1.0):
            continue
        gamma, beta, mean, var = (numpy_helper.to_array(inits[i]).astype(np.float64) for i in bn.input[1:5])
        k = gamma / np.sqrt(var + float(_attr(bn, "epsilon", 1e-5)))
        w = numpy_helper.to_array(inits[layer.input[1]]).astype(np.float64)
        out_axis = 0 if layer.op_type == "Conv" or _attr(layer, "transB", 0) else 1
        b = numpy_helper.to_array(inits[layer.input[2]]).astype(np.float64) if len(layer.input) > 2 and layer.input[2] \
            else np.zeros(w.shape[out_axis])
        if b.shape != (w.shape[out_axis],):
            continue  # a broadcast Gemm bias: leave this one to onnxruntime
        shape = [1] * w.ndim
        shape[out_axis] = -1
        dtype = numpy_helper.to_array(inits[layer.input[1]]).dtype
        # New names: a weight shared with another layer keeps its unfolded value there.
        w_name, b_name = layer.name + bn.name + ".folded_weight", layer.name + bn.name + ".folded_bias"
        g.initializer.extend([numpy_helper.from_array((w * k.reshape(shape)).astype(dtype), w_name),
                              numpy_helper.from_array(((b - mean) * k + beta).astype(dtype), b_name)])
        del layer.input[1:]
        layer.input.extend([w_name, b_name])
        layer.output[0] = bn.output[0]
        removed.add(id(bn))
        folded += 1
    keep = [n for n in nodes if id(n) not in removed]
    del g.node[:]
    g.node.extend(keep)  # extend copies each message, as the importer's reordering relies on
    _drop_unread(g)
    return folded


def _drop_unread(g: onnx.GraphProto) -> None:
    read = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    for field in (g.initializer, g.input):
        for i in reversed(range(len(field))):
            if field is g.initializer and field[i].name not in read:
                del field[i]
            elif field is g.input and field[i].name not in read and field[i].name in {t.name for t in g.initializer}:
                del field[i]


def calibrate(proto: onnx.ModelProto, tensors: list[str], x: np.ndarray,
              batch_size: int = 256) -> dict[str, tuple[float, float]]:
    """(min, max) of each named float tensor over calibration inputs x, run by onnxruntime."""
    if not tensors:
        return {}
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    known = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None)
                              for t in tensors if t not in known)
    sess = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    lo = {t: np.inf for t in tensors}
    hi = {t: -np.inf for t in tensors}
    for i in range(0, len(x), batch_size):
        for name, v in zip(names, sess.run(None, {sess.get_inputs()[0].name: x[i:i + batch_size]})):
            if name in lo:
                lo[name], hi[name] = min(lo[name], float(v.min())), max(hi[name], float(v.max()))
    return {t: (lo[t], hi[t]) for t in tensors}


def stays_float(node: onnx.NodeProto, w: np.ndarray) -> bool:
    """True for a convolution onnxruntime runs faster in float than on its int8 kernels (MIN_INT8_CONV_CHANNELS)."""
    # Not a grouped (depthwise) conv: its weights also have one input channel, but onnxruntime has int8 kernels for it.
    return (node.op_type == "Conv" and _attr(node, "group", 1) == 1 and w.ndim > 2
            and w.shape[1] < MIN_INT8_CONV_CHANNELS)


def _format_from_range(lo: float, hi: float) -> ActFormat:
    if lo >= 0:
        return ActFormat(max(hi, 1e-12) / UINT8_MAX, True)
    return ActFormat(max(-lo, hi, 1e-12) / INT8_MAX, False)


def quantise_graph(proto: onnx.ModelProto, layers: list[IntLayer], calibration: np.ndarray | None,
                   fold: bool = True) -> onnx.ModelProto:
    """A copy of a float export with BatchNorm folded and the integer layers in QDQ form onnxruntime fuses.

    Each integer layer's input tensor gets one QuantizeLinear/DequantizeLinear pair that every reader of the
    tensor shares, its weights int8 (symmetric, per output channel, from the folded weights) and its bias
    int32 at scale input x weight. Its output (after a Relu that alone reads it) is quantised too, so that
    onnxruntime sees DQ -> Conv -> Q: with the format of the integer layer it feeds (through MaxPool,
    Flatten...), else with the range measured on `calibration` inputs; without calibration inputs such an
    output stays float (correct, but that layer runs as a float convolution). Add nodes whose inputs and
    output are all quantised become QLinearAdd in onnxruntime.
    """
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    g = out.graph
    # Find the layers by output before folding renames their outputs.
    by_output = {n.output[0]: n for n in g.node}
    for layer in layers:
        if layer.output not in by_output:
            raise ModelError(f"int8 export: no node writes '{layer.output}'")
    names = [by_output[layer.output].name or f"#{i}" for i, layer in enumerate(layers)]
    for i, layer in enumerate(layers):
        by_output[layer.output].name = names[i]
    if fold:
        fold_batchnorm(out)
    node_of = {n.name: n for n in g.node}
    int_nodes = [(node_of[names[i]], layer) for i, layer in enumerate(layers)]
    inits = {t.name: t for t in g.initializer}
    consumers = _consumers(list(g.node))
    float_convs = {node.name for node, _ in int_nodes
                   if node.input[1] in inits and stays_float(node, numpy_helper.to_array(inits[node.input[1]]))}

    formats: dict[str, ActFormat] = {}  # quantised tensor -> format
    for node, layer in int_nodes:
        t = node.input[0]
        if node.name in float_convs:
            continue  # its input stays float; its output is quantised below like any integer layer's
        if t in formats and formats[t] != layer.act:
            continue  # two integer layers read it with different ranges: the first one's serves both
        formats[t] = layer.act

    def downstream_format(t: str) -> ActFormat | None:
        # Follow single value-preserving readers to a tensor an integer layer quantises.
        seen = 0
        while seen < 16:
            if t in formats:
                return formats[t]
            readers = consumers.get(t, [])
            if len(readers) != 1 or readers[0].op_type not in VALUE_PRESERVING:
                return None
            t = readers[0].output[0]
            seen += 1
        return None

    need_range: list[str] = []
    outputs: dict[str, str] = {}  # integer layer name -> the tensor ending its quantised region
    graph_outputs = {o.name for o in g.output}
    for node, _ in int_nodes:
        t = node.output[0]
        readers = consumers.get(t, [])
        if len(readers) == 1 and readers[0].op_type in ACTIVATIONS and t not in graph_outputs:
            t = readers[0].output[0]  # onnxruntime folds a Relu/Clip before a Q whose range it covers
        if t in graph_outputs:
            continue
        outputs[node.name] = t
        if t not in formats:
            f = downstream_format(t)
            if f is not None:
                formats[t] = f
            else:
                need_range.append(t)
    # Residual joins: an Add whose inputs are quantised outputs gets its own output quantised (QLinearAdd).
    for n in g.node:
        if n.op_type == "Add" and n.output[0] not in formats and n.output[0] not in graph_outputs \
                and all(i in formats or i in need_range for i in n.input):
            t = n.output[0]
            readers = consumers.get(t, [])
            if len(readers) == 1 and readers[0].op_type in ACTIVATIONS:
                t = readers[0].output[0]
            f = downstream_format(t)
            if f is not None:
                formats.setdefault(t, f)
            elif t not in formats:
                need_range.append(t)
    if need_range and calibration is not None:
        for t, (lo, hi) in calibrate(out, need_range, calibration).items():
            formats[t] = _format_from_range(lo, hi)

    new_inits: list[onnx.TensorProto] = []
    after: dict[str, list[onnx.NodeProto]] = {}  # nodes to insert after the node writing this tensor
    graph_inputs = {i.name for i in g.input} - set(inits)
    head: list[onnx.NodeProto] = []
    for t, f in formats.items():
        s, z, q, dq = t + ".scale", t + ".zero_point", t + ".quantized", t + ".dequantized"
        new_inits += [numpy_helper.from_array(np.asarray(f.scale, np.float32).reshape(()), s),
                      numpy_helper.from_array(np.asarray(0 if f.unsigned else SIGNED_ZERO_POINT, np.uint8), z)]
        pair = [onnx.helper.make_node("QuantizeLinear", [t, s, z], [q], name=t + ".quantize"),
                onnx.helper.make_node("DequantizeLinear", [q, s, z], [dq], name=t + ".dequantize")]
        for reader in consumers.get(t, []):
            if reader.name in float_convs:
                continue  # a DQ input would let onnxruntime quantise its float weights back into a QLinearConv
            for k, name in enumerate(reader.input):
                if name == t:
                    reader.input[k] = dq
        if t in graph_inputs:
            head += pair
        else:
            after.setdefault(t, []).extend(pair)

    for node, layer in int_nodes:
        w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float64)
        axis = 0 if node.op_type == "Conv" or (node.op_type == "Gemm" and _attr(node, "transB", 0)) else 1
        rows = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
        top = 2 ** (min(layer.weight_bits, 8) - 1) - 1  # a layer trained at fewer bits keeps its grid
        w_scale = np.maximum(np.abs(rows).max(axis=1), 1e-12) / top
        codes = np.clip(np.rint(rows / w_scale[:, None]), -top, top).astype(np.int8)
        codes = np.moveaxis(codes.reshape(np.moveaxis(w, axis, 0).shape), 0, axis)
        base = node.name + ".weight"
        if node.name in float_convs:
            # The engine's int8 weights, dequantised: onnxruntime runs this layer as a float Conv. Stored under
            # the name the importer gives a quantised weight's parameter, unless another node reads that name.
            grid = codes.astype(np.float64) * np.moveaxis(w_scale.reshape((-1,) + (1,) * (w.ndim - 1)), 0, axis)
            name = base
            if base in inits:
                if any(base in n.input for n in g.node if n is not node):
                    name = base + "_int8_grid"
                else:
                    g.initializer.remove(inits.pop(base))
            new_inits.append(numpy_helper.from_array(grid.astype(np.float32), name))
            node.input[1] = name
            continue
        in_format = formats[node.input[0].removesuffix(".dequantized")]
        new_inits += [numpy_helper.from_array(np.ascontiguousarray(codes), base + "_quantized"),
                      numpy_helper.from_array(w_scale.astype(np.float32), base + "_scale"),
                      numpy_helper.from_array(np.zeros(w_scale.shape, np.int8), base + "_zero_point")]
        pre = [onnx.helper.make_node("DequantizeLinear", [base + "_quantized", base + "_scale", base + "_zero_point"],
                                     [base + "_dequantized"], axis=axis, name=base + ".dequantize")]
        node.input[1] = base + "_dequantized"
        if len(node.input) > 2 and node.input[2] and node.input[2] in inits:
            b = numpy_helper.to_array(inits[node.input[2]]).astype(np.float64)
            if b.shape == w_scale.shape:
                # int32 bias at scale input x weight, the form QLinearConv and QGemm take.
                b_scale = (in_format.scale * w_scale).astype(np.float32)
                bq = np.clip(np.rint(b / b_scale), -2**31, 2**31 - 1).astype(np.int32)
                bn = node.name + ".bias"
                new_inits += [numpy_helper.from_array(bq, bn + "_quantized"),
                              numpy_helper.from_array(b_scale, bn + "_scale"),
                              numpy_helper.from_array(np.zeros(b_scale.shape, np.int32), bn + "_zero_point")]
                pre.append(onnx.helper.make_node("DequantizeLinear",
                                                 [bn + "_quantized", bn + "_scale", bn + "_zero_point"],
                                                 [bn + "_dequantized"], axis=0, name=bn + ".dequantize"))
                node.input[2] = bn + "_dequantized"
        after.setdefault("^" + node.name, []).extend(pre)  # placed before the node

    nodes: list[onnx.NodeProto] = list(head)
    for n in g.node:
        nodes.extend(after.get("^" + n.name, []))
        c = onnx.NodeProto()
        c.CopyFrom(n)
        nodes.append(c)
        for o in n.output:
            nodes.extend(after.get(o, []))
    del g.node[:]
    g.node.extend(nodes)
    g.initializer.extend(new_inits)
    _drop_unread(g)
    onnx.checker.check_model(out)
    return out
