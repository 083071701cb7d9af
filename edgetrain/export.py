"""Write a trained Model back to ONNX: the user's own graph with updated initializers (float), or the
same graph with QuantizeLinear/DequantizeLinear around the integer layers (int8, for onnxruntime)."""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from edgetrain.bn_audit import as_inference_batchnorms
from edgetrain.errors import ModelError, OutputError
from edgetrain.fileio import write_atomic
from edgetrain.int8_graph import ActFormat, IntLayer, quantise_graph
from edgetrain.layers import mac_nodes
from edgetrain.model import Model
from edgetrain.precision.dfq.controller import DFQ
from edgetrain.quant import quantize, scale_from_range


def to_onnx(model: Model) -> onnx.ModelProto:
    """The imported graph, unchanged, with every parameter and buffer set to the model's values."""
    proto = onnx.ModelProto()
    proto.CopyFrom(model.graph.original)
    g = proto.graph
    inits = {t.name: t for t in g.initializer}
    dfq = DFQ.of(model)
    # exported apart (edgetrain.precision.dfq.export), or training state only (the probe's price)
    gates = set(dfq.param_names) | set(dfq.buffer_names) if dfq is not None else set()
    values = {k: v for k, v in {**model.parameters(), **model.buffers()}.items() if k not in gates}
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
    try:
        as_inference_batchnorms(proto)  # a deployed model must use its running statistics, not the batch's
    except ValueError as exc:
        raise ModelError(f"cannot export: {exc}") from None
    onnx.checker.check_model(proto)
    return proto


def export_onnx(model: Model, path: str | os.PathLike) -> None:
    """Save the trained model as a float ONNX file that onnxruntime can serve; OutputError if it cannot be written."""
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise OutputError(f"export path must be a file name, got {path!r}")
    blob = to_onnx(model).SerializeToString()
    try:
        write_atomic(path, blob)
    except OSError as exc:
        raise OutputError(f"{os.fspath(path)}: cannot write ({exc.strerror or exc})") from None


# -- int8 (QDQ) export ----------------------------------------------------------------------------
QDQ_MIN_OPSET = 13  # per-axis DequantizeLinear, for the per-output-channel weight scales
INT8_BITS = 8  # the export's integer formats; layers trained wider are re-quantised to 8 bits
ACT_SUFFIXES = (".input_scale", ".input_zero_point", ".input_quantized", ".input_dequantized")
WEIGHT_SUFFIXES = ("_quantized", "_scale", "_zero_point", "_dequantized")


@dataclass(frozen=True)
class _LayerPlan:
    """How one quantised MAC layer is written: its activation format and weight channel axis."""

    name: str
    act_range: float
    act_bits: int
    act_unsigned: bool
    weight_bits: int
    weight_axis: int  # the axis of output channels in the stored weight


def _plan(model: Model, gated_bits: str | None = None) -> list[_LayerPlan]:
    from edgetrain.quant.mac import QuantMAC

    plans = []
    dfq = DFQ.of(model)
    gated = dfq.gated_layers if dfq is not None else set()
    for node in mac_nodes(model.graph):
        op = model.executor.ops[node.name]
        if node.inputs[1] not in model.parameters():
            continue  # a MatMul between two activations has no weight to store as int8: it stays float here
        if node.name in gated:
            # A gated layer is written at one static candidate, with the range that candidate trained.
            prec, key, unsigned = dfq.static_form(node.name, gated_bits or dfq.most_precise())
        elif not isinstance(op, QuantMAC):
            continue
        else:
            prec, key, unsigned = model.precision[node.name], node.name, op.unsigned_input
        running = model.runtime.act_ranges.get(key)
        if running is None or not running.value:
            where = f" at {key.split('@')[1]}" if "@" in key else ""  # a DFQ candidate's own range
            raise ModelError(f"layer '{node.name}' has no running activation range{where}: "
                             "train at least one step in this precision before an int8 export")
        # Gemm with transB and Conv store (out, ...); Gemm without transB and MatMul store (in, out).
        stores_rows = node.op_type == "Conv" or (node.op_type == "Gemm" and node.attrs.get("transB", 0))
        plans.append(_LayerPlan(node.name, float(running.value), min(prec.act_bits, INT8_BITS), unsigned,
                                min(prec.weight_bits, INT8_BITS), 0 if stores_rows else 1))
    return plans


def _quantised_weight(w: np.ndarray, bits: int, axis: int, pow2: bool) -> tuple[np.ndarray, np.ndarray]:
    """int8 weights and float32 per-output-channel scales, as the engine quantises them (nearest)."""
    rows = w if axis == 0 else w.T
    q = quantize(np.ascontiguousarray(rows), bits, signed=True, axis=0, pow2=pow2)
    values = q.q.astype(np.int8)
    return (values if axis == 0 else np.ascontiguousarray(values.T)), np.asarray(q.scale, np.float32).reshape(-1)


def to_onnx_int8(model: Model, gated_bits: str | None = None, calibration: np.ndarray | None = None,
                 fold: bool = True) -> onnx.ModelProto:
    """A QDQ model onnxruntime runs on its integer kernels (edgetrain.int8_graph.quantise_graph).

    BatchNorm is folded into the preceding Conv/Gemm; each integer layer's input is quantised with the
    scale the engine's eval uses (the running range over the format's max: uint8 where the graph proves
    it non-negative, else int8, zero point 0), its weights int8 per output channel, its bias int32.
    Layer outputs that no integer layer reads are quantised with ranges measured on `calibration`
    inputs (without them those layers stay float convolutions). The classifier (fp32 in training) stays
    float, and so does a convolution reading fewer than 4 channels (a stem on pixels; its weights on the
    engine's int8 grid), which onnxruntime runs faster in float (edgetrain.int8_graph.MIN_INT8_CONV_CHANNELS).
    DFQ-gated layers are written at one static candidate, `gated_bits` (default: the most precise).
    """
    plans = _plan(model, gated_bits)
    if not plans:
        raise ModelError("int8 export needs integer layers, but every layer of this model is fp32 "
                         "(train with --schedule static)")
    if model.graph.opset < QDQ_MIN_OPSET:
        raise ModelError(f"int8 export needs opset {QDQ_MIN_OPSET} or newer (per-channel DequantizeLinear); "
                         f"the model has opset {model.graph.opset}")
    graph_nodes = {n.name: n for n in model.graph.nodes}
    layers = []
    for plan in plans:
        scale = scale_from_range(plan.act_range, plan.act_bits, signed=not plan.act_unsigned, pow2=False)
        layers.append(IntLayer(graph_nodes[plan.name].outputs[0], ActFormat(float(scale), plan.act_unsigned),
                               plan.weight_bits))
    return quantise_graph(to_onnx(model), layers, calibration, fold=fold)


def _drop_unused_initializers(g: onnx.GraphProto, names: set[str]) -> None:
    """Remove the float copies of weights that are now read only as int8."""
    read = {i for n in g.node for i in n.input}
    unused = names - read
    for field in (g.initializer, g.input):  # old exporters list initializers as inputs too
        for i in reversed(range(len(field))):
            if field[i].name in unused:
                del field[i]


def export_int8(model: Model, path: str | os.PathLike, gated_bits: str | None = None,
                calibration: np.ndarray | None = None) -> None:
    """Save the QDQ int8 model (to_onnx_int8) for onnxruntime."""
    write_atomic(path, to_onnx_int8(model, gated_bits, calibration).SerializeToString())


# -- checking an export ---------------------------------------------------------------------------
# x86-64 CPUs without VNNI (AVX2, AVX-512F) run onnxruntime's u8 x s8 products through an instruction that
# saturates pairs of products at 16 bits: on an AMD EPYC (AVX2) the shipped LeNet-5's int8 export agreed
# with the engine on 95.6% of the test digits, with a max relative error of 0.32. This option makes
# onnxruntime use its exact u8 x u8 path on those CPUs only (elsewhere it changes nothing); the model
# file stays as it is. Anyone serving an int8 export on such a CPU needs it too (README, "Serving").
EXACT_INT8_OPTION = ("session.x64quantprecision", "1")


def onnxruntime_session(path_or_proto: str | os.PathLike | onnx.ModelProto):
    """An onnxruntime CPU session for an export, with int8 products exact on every x86-64 CPU."""
    import onnxruntime as ort

    data = path_or_proto.SerializeToString() if isinstance(path_or_proto, onnx.ModelProto) else os.fspath(path_or_proto)
    options = ort.SessionOptions()
    options.add_session_config_entry(*EXACT_INT8_OPTION)
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def optimized_op_counts(path_or_proto: str | os.PathLike | onnx.ModelProto, out: str | os.PathLike) -> dict[str, int]:
    """Node types of the graph onnxruntime runs after its optimiser (written to `out`), for checking that
    an int8 export runs on integer kernels."""
    import onnxruntime as ort

    data = path_or_proto.SerializeToString() if isinstance(path_or_proto, onnx.ModelProto) else os.fspath(path_or_proto)
    options = ort.SessionOptions()
    options.add_session_config_entry(*EXACT_INT8_OPTION)
    options.optimized_model_filepath = os.fspath(out)
    ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    counts: dict[str, int] = {}
    for n in onnx.load(os.fspath(out)).graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts


def onnxruntime_outputs(path_or_proto: str | os.PathLike | onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """First output of a model run by onnxruntime on the CPU."""
    sess = onnxruntime_session(path_or_proto)
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def compare_with_engine(model: Model, path: str | os.PathLike, x: np.ndarray, *, int8: bool,
                        batch_size: int = 256, onnx_input: np.ndarray | None = None) -> dict[str, float]:
    """Run an export in onnxruntime against the engine's eval forward of the same model.

    A float export is compared with the engine in fp32 (the master weights), an int8 export with the
    engine at the precision the model trained in. Returns max relative error and top-1 agreement.
    onnx_input: what onnxruntime is fed instead of x (the raw x, for an export with its preprocessing).
    """
    saved = model.precision_config
    try:
        if not int8:
            model.set_precision("fp32", pow2_scales=model.runtime.pow2_scales)
        ours = np.concatenate([model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])
    finally:
        model.set_precision(saved, pow2_scales=model.runtime.pow2_scales)
    theirs = onnxruntime_outputs(path, x if onnx_input is None else onnx_input)
    return {"max_relative_error": float(np.abs(ours - theirs).max() / max(np.abs(ours).max(), 1e-30)),
            "top1_agreement": float((ours.argmax(axis=1) == theirs.argmax(axis=1)).mean())}
