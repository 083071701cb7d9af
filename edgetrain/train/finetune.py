"""Fine-tuning controls: which parameters train, and a fresh classifier head for a new class count."""
from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable

import numpy as np
import onnx
from onnx import numpy_helper

from edgetrain.errors import EdgetrainError, ModelError
from edgetrain.layers import mac_nodes, param_sources
from edgetrain.model import Model

# Third SeedSequence word of the head's initialisation, apart from the loader's [seed, epoch] streams.
HEAD_STREAM = 3
BIAS_SLOT = 2  # Conv B, Gemm C and BatchNormalization B are input 2
BIAS_OPS = ("Conv", "Gemm", "BatchNormalization")
RECURRENT_BIAS_SLOT = 3  # LSTM/GRU B (torch's bias_ih and bias_hh, stacked)
BIAS_ELEMENTWISE = ("Add", "Sub")  # MatMul + Add: the bias is the Add's parameter
MAX_NAMES_SHOWN = 8


def classifier_gemm(proto: onnx.ModelProto) -> onnx.NodeProto:
    """The last Gemm of the graph whose weight is an initializer: the head a new class count replaces."""
    inits = {t.name for t in proto.graph.initializer}
    gemms = [n for n in proto.graph.node if n.op_type == "Gemm" and len(n.input) > 1 and n.input[1] in inits]
    if not gemms:
        raise ModelError("a new classifier head needs a Gemm layer with weights as initializers; the model has none")
    return gemms[-1]


def head_parameter_names(proto: onnx.ModelProto) -> list[str]:
    """Initializer names of the classifier head (weight, and bias if it has one)."""
    node = classifier_gemm(proto)
    inits = {t.name for t in proto.graph.initializer}
    return [name for name in node.input[1:3] if name in inits]


def _set_dims(vi: onnx.ValueInfoProto, shape: Iterable[int]) -> None:
    dims = vi.type.tensor_type.shape.dim
    del dims[:]
    for d in shape:
        dims.add().dim_value = int(d)


def new_head(proto: onnx.ModelProto, num_classes: int, seed: int) -> onnx.ModelProto:
    """A copy of proto whose last Gemm has fresh weights and bias for `num_classes` outputs.

    Initialised as torch's Linear (uniform within +-1/sqrt(fan_in)), from the seed alone; shapes
    downstream are re-inferred, so the graph output reports the new class count.
    """
    if num_classes < 1:
        raise EdgetrainError(f"num_classes must be at least 1, got {num_classes}")
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    g = out.graph
    node = classifier_gemm(out)
    inits = {t.name: t for t in g.initializer}
    for name in node.input[1:3]:
        if sum(list(n.input).count(name) for n in g.node) > 1:
            raise ModelError(f"classifier '{node.name}': '{name}' is shared with other nodes; cannot replace it")
    trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
    w = inits[node.input[1]]
    if len(w.dims) != 2:
        raise ModelError(f"classifier '{node.name}': weight '{w.name}' is not a matrix")
    fan_in = int(w.dims[1] if trans_b else w.dims[0])
    dtype = onnx.helper.tensor_dtype_to_np_dtype(w.data_type)
    rng = np.random.default_rng([seed, HEAD_STREAM])
    bound = 1.0 / math.sqrt(fan_in)
    shape = (num_classes, fan_in) if trans_b else (fan_in, num_classes)
    fresh = {w.name: rng.uniform(-bound, bound, shape)}
    if len(node.input) > 2 and node.input[2] in inits:
        fresh[node.input[2]] = rng.uniform(-bound, bound, (num_classes,))
    elif len(node.input) > 2 and node.input[2]:
        raise ModelError(f"classifier '{node.name}': bias '{node.input[2]}' is computed, not an initializer")
    graph_inputs = {vi.name: vi for vi in g.input}  # old exporters also list initializers as inputs
    for name, value in fresh.items():
        inits[name].CopyFrom(numpy_helper.from_array(value.astype(dtype), name))
        if name in graph_inputs:
            _set_dims(graph_inputs[name], value.shape)
    # Every inferred shape downstream of the head is stale; outputs keep only their batch dimension.
    del g.value_info[:]
    for vi in g.output:
        vi.type.tensor_type.ClearField("shape")
    try:
        out = onnx.shape_inference.infer_shapes(out, strict_mode=True)
    except Exception as exc:  # onnx raises several types; all mean the new head does not fit
        raise ModelError(f"new head for {num_classes} classes: shape inference failed "
                         f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    return out


def _matching(names: Iterable[str], pattern: str) -> list[str]:
    # Exact names first: ONNX names may hold '[' or '*', which fnmatch would read as syntax.
    return [n for n in names if n == pattern or fnmatch.fnmatchcase(n, pattern)]


def _shown(names: list[str]) -> str:
    more = f", ... ({len(names)} in all)" if len(names) > MAX_NAMES_SHOWN else ""
    return ", ".join(names[:MAX_NAMES_SHOWN]) + more


def bias_names(model: Model) -> set[str]:
    """Bias parameters: Conv/Gemm/BatchNorm input B, and vector operands of Add/Sub (MatMul + Add)."""
    params = model.parameters()
    out: set[str] = set()
    for node in model.graph.nodes:
        if node.op_type in BIAS_OPS and len(node.inputs) > BIAS_SLOT and node.inputs[BIAS_SLOT] in params:
            out.add(node.inputs[BIAS_SLOT])
        elif node.op_type in ("LSTM", "GRU") and len(node.inputs) > RECURRENT_BIAS_SLOT:
            out |= param_sources(model.graph, node.inputs[RECURRENT_BIAS_SLOT])
        elif node.op_type in BIAS_ELEMENTWISE:
            out |= {i for i in node.inputs if i in params and params[i].ndim == 1}
    return out


def batchnorm_names(model: Model) -> set[str]:
    """BatchNorm scale and bias parameters."""
    params = model.parameters()
    return {i for n in model.graph.nodes if n.op_type == "BatchNormalization" for i in n.inputs if i in params}


def last_layers_names(model: Model, k: int) -> set[str]:
    """Parameters of every node from the k-th last MAC layer on (its BatchNorm and the head included)."""
    macs = mac_nodes(model.graph)
    if not 1 <= k <= len(macs):
        raise EdgetrainError(f"train_last {k}: the model has {len(macs)} MAC layers "
                             f"({_shown([n.name for n in macs])}); choose 1..{len(macs)}")
    first = model.graph.nodes.index(macs[-k])
    params = model.parameters()
    # through data-movement ops too: an LSTM's W may be torch's tensors sliced and stacked earlier in the graph
    return {p for n in model.graph.nodes[first:] for i in n.inputs if i
            for p in {i} | param_sources(model.graph, i) if p in params}


def trainable_names(model: Model, *, freeze: Iterable[str] = (), train_last: int | None = None,
                    bias_only: bool = False, freeze_bn: bool = False, always: Iterable[str] = ()) -> list[str]:
    """Names of the parameters to train, in model order.

    bias_only and train_last narrow the set, freeze_bn drops BatchNorm's affine parameters, `always`
    (a new head: random weights must learn) is added back, and freeze patterns remove names last.
    """
    params = list(model.parameters())
    chosen = set(params)
    if bias_only:
        chosen &= bias_names(model)
    if train_last is not None:
        chosen &= last_layers_names(model, train_last)
    if freeze_bn:
        chosen -= batchnorm_names(model)
    chosen |= set(always)
    for pattern in freeze:
        hit = _matching(params, pattern)
        if not hit:
            raise EdgetrainError(f"freeze pattern '{pattern}' matches no parameter; parameters: {_shown(params)}")
        chosen -= set(hit)
    if not chosen:
        raise EdgetrainError("nothing left to train: the freeze options exclude every parameter")
    return [n for n in params if n in chosen]
