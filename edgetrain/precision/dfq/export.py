"""DFQ's gates as their own ONNX file: from each unit's input (a value of the backbone) to its choice.

The backbone export (edgetrain.export) is the plain model every sample runs in full; this file says
what the trained gates would pick for each sample and unit, so a server can route or account for it:

    inputs:  one per unit, named as the backbone value the unit reads (its fork), shape (N, C, ...)
    outputs: <unit>.logits (N, K) and <unit>.choice (N,) int64, an index into the candidate list,
             which is written in the model's metadata (key "dfq_candidates", JSON); the choice is the
             argmax of the logits plus a fixed per-unit offset (the mask, and the quota selection's threshold)

The graph is the gate network of edgetrain.precision.dfq.gates in standard ops (ReduceMean, Gemm, Relu, Sigmoid,
Tanh, ArgMax), with the LSTM state carried from unit to unit.
"""
from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgetrain.fileio import write_atomic
from edgetrain.precision.dfq.controller import DFQ
from edgetrain.precision.dfq.gates import EMBED_WIDTH, SHARED_NAMES, unit_param_names

if TYPE_CHECKING:
    from edgetrain.model import Model

GATES_OPSET = 18  # ReduceMean with axes as an input
NOT_ALLOWED = -1e9  # added to the logits of candidates a unit cannot take (a layer cannot skip)


def gates_to_onnx(model: Model) -> onnx.ModelProto:
    """The trained gates of a DFQ model as an ONNX graph (module doc)."""
    dfq = DFQ.of(model)
    if dfq is None:
        raise ValueError("the model has no DFQ gates")
    p = {k: np.asarray(v, np.float32) for k, v in model.parameters().items() if k in set(dfq.param_names)}
    wih, whh, b, wo, bo = SHARED_NAMES
    inits = [numpy_helper.from_array(p[wih], "lstm.W_ih"), numpy_helper.from_array(p[whh].T.copy(), "lstm.W_hh_T"),
             numpy_helper.from_array(p[b], "lstm.b"), numpy_helper.from_array(p[wo], "head.W"),
             numpy_helper.from_array(p[bo], "head.b"),
             numpy_helper.from_array(np.array([EMBED_WIDTH] * 4, np.int64), "lstm.split")]
    nodes, inputs, outputs = [], [], []
    h = c = None
    k = len(dfq.candidates)
    for u in dfq.units:
        tag = f"{u.name}."
        rank = len(u.input_shape)
        shape = ["N", *u.input_shape[1:]]
        inputs.append(helper.make_tensor_value_info(u.fork, TensorProto.FLOAT, shape))
        w1, b1, w2, b2 = unit_param_names(u.index)
        inits += [numpy_helper.from_array(p[w1], tag + "W1"), numpy_helper.from_array(p[b1], tag + "b1"),
                  numpy_helper.from_array(p[w2], tag + "W2"), numpy_helper.from_array(p[b2], tag + "b2")]
        pooled = u.fork
        if rank > 2:
            inits.append(numpy_helper.from_array(np.arange(2, rank, dtype=np.int64), tag + "axes"))
            nodes.append(helper.make_node("ReduceMean", [u.fork, tag + "axes"], [tag + "pooled"], keepdims=0))
            pooled = tag + "pooled"
        nodes += [helper.make_node("Gemm", [pooled, tag + "W1", tag + "b1"], [tag + "a1"], transB=1),
                  helper.make_node("Relu", [tag + "a1"], [tag + "z1"]),
                  helper.make_node("Gemm", [tag + "z1", tag + "W2", tag + "b2"], [tag + "e"], transB=1),
                  helper.make_node("Gemm", [tag + "e", "lstm.W_ih", "lstm.b"], [tag + "pre_x"], transB=1)]
        pre = tag + "pre_x"
        if h is not None:  # the first unit starts from a zero state: no recurrent term
            nodes += [helper.make_node("MatMul", [h, "lstm.W_hh_T"], [tag + "pre_h"]),
                      helper.make_node("Add", [tag + "pre_x", tag + "pre_h"], [tag + "pre"])]
            pre = tag + "pre"
        gi, gf, gg, go = (tag + s for s in ("i_", "f_", "g_", "o_"))
        nodes += [helper.make_node("Split", [pre, "lstm.split"], [gi, gf, gg, go], axis=1),
                  helper.make_node("Sigmoid", [gi], [tag + "i"]), helper.make_node("Sigmoid", [gf], [tag + "f"]),
                  helper.make_node("Tanh", [gg], [tag + "g"]), helper.make_node("Sigmoid", [go], [tag + "o"]),
                  helper.make_node("Mul", [tag + "i", tag + "g"], [tag + "ig"])]
        if c is None:
            nodes.append(helper.make_node("Identity", [tag + "ig"], [tag + "c"]))
        else:
            nodes += [helper.make_node("Mul", [tag + "f", c], [tag + "fc"]),
                      helper.make_node("Add", [tag + "fc", tag + "ig"], [tag + "c"])]
        nodes += [helper.make_node("Tanh", [tag + "c"], [tag + "tanh_c"]),
                  helper.make_node("Mul", [tag + "o", tag + "tanh_c"], [tag + "h"]),
                  helper.make_node("Gemm", [tag + "h", "head.W", "head.b"], [tag + "logits"], transB=1)]
        h, c = tag + "h", tag + "c"
        mask = dfq.logit_masks[u.index]
        # ONNX's ArgMax gets a finite stand-in for -inf on the candidates this unit may not take.
        mask = (np.zeros(k, np.float32) if mask is None
                else np.where(np.isinf(mask), NOT_ALLOWED, mask).astype(np.float32))
        offsets = dfq.selection_offsets(u)  # the quota selection's threshold and bracket, fixed once trained
        if offsets is not None:
            mask = np.where(np.isinf(offsets), NOT_ALLOWED, mask + offsets).astype(np.float32)
        inits.append(numpy_helper.from_array(mask, tag + "mask"))
        nodes += [helper.make_node("Add", [tag + "logits", tag + "mask"], [tag + "masked"]),
                  helper.make_node("ArgMax", [tag + "masked"], [tag + "choice"], axis=1, keepdims=0)]
        outputs += [helper.make_tensor_value_info(tag + "logits", TensorProto.FLOAT, ["N", k]),
                    helper.make_tensor_value_info(tag + "choice", TensorProto.INT64, ["N"])]
    graph = helper.make_graph(nodes, "dfq_gates", inputs, outputs, inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", GATES_OPSET)],
                              producer_name="edgetrain")
    helper.set_model_props(proto, {"dfq_candidates": json.dumps([c.text for c in dfq.candidates]),
                                   "dfq_units": json.dumps([u.name for u in dfq.units])})
    proto.ir_version = min(proto.ir_version, 10)  # readable by onnxruntime releases of the last two years
    onnx.checker.check_model(proto)
    return proto


def gates_path(backbone_path: str | os.PathLike) -> str:
    """Where the gates go next to a backbone export: model.onnx -> model.gates.onnx."""
    root, ext = os.path.splitext(os.fspath(backbone_path))
    return root + ".gates" + (ext or ".onnx")


def export_gates(model: Model, path: str | os.PathLike) -> None:
    """Write gates_to_onnx(model) atomically."""
    write_atomic(path, gates_to_onnx(model).SerializeToString())
