"""Batch freedom: a model exported with a fixed batch size trains at any batch size when that is sound.

PyTorch's exporters fix the batch unless told otherwise (`dynamic_axes`, `dynamic_shapes`), so a user's
first export is often pinned to batch 1. Freeing it is sound when the batch only flows through ops that
treat samples independently: the graph's inputs get a symbolic batch dimension, ONNX shape inference
carries it through every node, and a node whose input carries it while its outputs lose it (a Reshape to a
literal shape, a reduction over the batch) pins the batch to the exported size. Reshape targets that spell
the exported batch size as their first entry are the common case (`x.view(1, -1)`, static-shape exports of
attention) and are rewritten to copy the batch dimension instead (a 0 entry), which is exact at the
exported size and the same reshape at any other.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import onnx
from onnx import numpy_helper

BATCH = "N"
# Ops whose output is data about the input's shape, not a tensor laid out along the batch.
SHAPE_READERS = frozenset({"Shape", "Size"})


class BatchInfo(NamedTuple):
    """What the importer found about the batch dimension of a model's inputs."""

    exported: int | None = None  # the batch size fixed in the file; None: the file leaves it free
    pinned_by: str = ""  # why a fixed batch could not be freed ("" when it was, or was free already)

    @property
    def free(self) -> bool:
        """Whether the model runs at any batch size."""
        return self.exported is None or not self.pinned_by

    def describe(self) -> str:
        """One line for `info` and for errors."""
        if self.exported is None:
            return "any batch size (dynamic in the file)"
        if not self.pinned_by:
            return f"any batch size (exported with a fixed batch of {self.exported}, which nothing depends on)"
        return f"batch fixed at {self.exported}: {self.pinned_by}"


def free_batch(model: onnx.ModelProto) -> tuple[onnx.ModelProto, BatchInfo]:
    """Return the model with its fixed batch dimension made symbolic where sound, and what was found.

    The model given is not modified; when the batch cannot be freed it is returned as it is.
    """
    g = model.graph
    inits = {t.name for t in g.initializer}
    inputs = [vi for vi in g.input if vi.name not in inits]
    if not inputs:
        return model, BatchInfo()
    firsts = []
    for vi in inputs:
        dims = vi.type.tensor_type.shape.dim if vi.type.HasField("tensor_type") else []
        if not dims:
            return model, BatchInfo()  # a scalar input: no batch axis at all
        firsts.append(dims[0])
    if any(not d.HasField("dim_value") for d in firsts):
        return model, BatchInfo()
    sizes = {d.dim_value for d in firsts}
    exported = firsts[0].dim_value
    if len(sizes) > 1:
        return model, BatchInfo(exported, f"the inputs disagree on dimension 0 ({sorted(sizes)}), so it is no batch")
    for vi in g.output:
        dims = vi.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value") and dims[0].dim_value != exported:
            reason = f"output '{vi.name}' has dimension 0 = {dims[0].dim_value}, not the batch"
            return model, BatchInfo(exported, reason)

    trial = onnx.ModelProto()
    trial.CopyFrom(model)
    for vi in list(trial.graph.input) + list(trial.graph.output):
        if vi.name in inits or not vi.type.HasField("tensor_type"):
            continue
        dims = vi.type.tensor_type.shape.dim
        if dims:
            dims[0].Clear()
            dims[0].dim_param = BATCH
    del trial.graph.value_info[:]  # inferred for the fixed batch: stale
    try:
        shapes = _infer(trial)
        if _rewrite_reshapes(trial, shapes, exported):
            shapes = _infer(trial)
    except Exception as exc:  # inference of the freed model failing is a reason to keep the batch fixed
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return model, BatchInfo(exported, f"shape inference with a free batch fails ({reason})")
    pin = _first_pin(trial, shapes)
    if pin:
        return model, BatchInfo(exported, pin)
    return trial, BatchInfo(exported)


def _infer(model: onnx.ModelProto) -> dict[str, list]:
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    shapes: dict[str, list] = {}
    g = inferred.graph
    for vi in list(g.value_info) + list(g.input) + list(g.output):
        t = vi.type
        if t.HasField("tensor_type") and t.tensor_type.HasField("shape"):
            shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                               for d in t.tensor_type.shape.dim]
    for t in g.initializer:
        shapes[t.name] = list(t.dims)
    return shapes


def _constant_values(model: onnx.ModelProto) -> dict[str, tuple[np.ndarray, onnx.NodeProto | None]]:
    """Initializers and Constant-node values by name, with the Constant node that makes each (if any)."""
    out: dict[str, tuple[np.ndarray, onnx.NodeProto | None]] = {
        t.name: (numpy_helper.to_array(t), None) for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant" and n.domain in ("", "ai.onnx"):
            for a in n.attribute:
                if a.name == "value":
                    out[n.output[0]] = (numpy_helper.to_array(a.t), n)
    return out


def _rewrite_reshapes(model: onnx.ModelProto, shapes: dict[str, list], exported: int) -> bool:
    """Make Reshape targets that spell the exported batch copy the batch instead; return whether any did."""
    values = _constant_values(model)
    changed = False
    for n in model.graph.node:
        if n.op_type != "Reshape" or len(n.input) < 2 or n.input[1] not in values:
            continue
        if any(a.name == "allowzero" and a.i == 1 for a in n.attribute):
            continue  # a 0 entry would mean a zero-size dimension there
        data_shape = shapes.get(n.input[0])
        target = np.asarray(values[n.input[1]][0])
        if not data_shape or data_shape[0] != BATCH or target.ndim != 1 or target.size == 0 or target[0] != exported:
            continue
        new = target.astype(np.int64).copy()
        new[0] = 0
        name = f"{n.name or n.output[0]}__batch_free_shape"
        model.graph.initializer.append(numpy_helper.from_array(new, name))
        n.input[1] = name
        changed = True
    return changed


def _first_pin(model: onnx.ModelProto, shapes: dict[str, list]) -> str:
    """The first node whose input carries the batch while none of its outputs can; "" if there is none."""

    def may_carry(name: str) -> bool:
        s = shapes.get(name)
        return s is None or any(not isinstance(d, int) for d in s)  # the symbol, or a size inference lost

    # A value carries the batch when its shape shows the symbol, or when it is computed from a value that
    # does and inference could not tell its shape (benefit of the doubt, kept for its readers to settle).
    carrying = {name for name, s in shapes.items() if BATCH in s}
    for n in model.graph.node:
        if n.op_type in SHAPE_READERS or not any(i in carrying for i in n.input if i):
            continue
        outs = [o for o in n.output if o]
        carried = [o for o in outs if may_carry(o)]
        if not carried:
            return (f"node '{n.name or n.output[0]}' ({n.op_type}) gives {list(shapes.get(outs[0], []))} "
                    f"whatever the batch")
        carrying.update(carried)
    for vi in model.graph.output:
        s = shapes.get(vi.name)
        if s and isinstance(s[0], int):
            return f"output '{vi.name}' has dimension 0 fixed at {s[0]} whatever the batch"
    return ""
