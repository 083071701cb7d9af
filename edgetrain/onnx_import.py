"""ONNX file -> Graph: read, validate, order, check, infer shapes, fold constants, bind ops.

Every problem a user can cause (a bad file, an unsupported op, a broken graph, a shape we cannot
train) is raised as ModelError with one line naming the file and the node or field at fault; a model whose
constants, inputs or values would not fit the memory budget (edgetrain.limits) raises ResourceLimitError,
before anything that size is allocated.
"""
from __future__ import annotations

import os
from collections import defaultdict

import numpy as np
import onnx
from onnx import numpy_helper
from onnx.reference import ReferenceEvaluator

from edgetrain import limits
from edgetrain.batch_dim import free_batch
from edgetrain.bn_audit import warn_at_import
from edgetrain.errors import ModelError
from edgetrain.graph import Graph, Node, ValueInfo
from edgetrain.onnx_sizes import EXPANDING_OPS, elem_bytes, fold_output_sizes, shape_bytes, subgraph_expands
from edgetrain.ops import DATA_MOVEMENT_OPS, OPS, SUPPORTED, Run
from edgetrain.qdq_import import dequantize_weights, infer_qgemm_shapes
from edgetrain.sequences import split_sequences

MIN_OPSET = 11

# Input positions that hold trainable tensors, per op; a float initializer read anywhere else (a
# Clip bound, a Reshape target) is a constant. Scalars in elementwise ops are constants too.
PARAM_SLOTS = {"Conv": {1, 2}, "Gemm": {0, 1, 2}, "MatMul": {0, 1}, "BatchNormalization": {1, 2},
               "PRelu": {1},  # nn.PReLU's slope is a weight like a convolution's
               "ConvTranspose": {1, 2}, "LayerNormalization": {1, 2}, "GroupNormalization": {1, 2},
               "InstanceNormalization": {1, 2}, "Einsum": {0, 1},
               "Gather": {0},  # a float table gathered by index is an embedding
               "LSTM": {1, 2, 3, 7}, "GRU": {1, 2, 3}}
ELEMENTWISE_PARAM_SLOTS = {"Add": {0, 1}, "Sub": {0, 1}, "Mul": {0, 1}, "Div": {0, 1}}
BUFFER_SLOTS = {"BatchNormalization": {3, 4}}
# A float initializer that reaches a parameter slot only through data-movement ops (ops.DATA_MOVEMENT_OPS:
# nn.MultiheadAttention's in_proj_weight sliced into the query, key and value projections; torch's LSTM/GRU
# export slicing, reordering and stacking its own tensors into W, R, B) is a parameter too, under its own
# (state_dict) name, trained through their backward and written back by export unchanged.

# Ops never folded even with constant inputs: their value is not a function of their inputs.
NONDETERMINISTIC = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
                              "Multinomial", "Bernoulli", "Dropout"})

MAX_NAMES_LISTED = 10

# Ops outside the ONNX domain edgetrain runs: onnxruntime's QOperator quantiser writes Gemm as QGemm.
CONTRIB_OPS = {"com.microsoft": frozenset({"QGemm"})}


def load_graph(source: str | os.PathLike | onnx.ModelProto) -> Graph:
    """Import an ONNX model from a path or a ModelProto."""
    if isinstance(source, onnx.ModelProto):
        model, where = source, "<memory>"
    elif isinstance(source, (str, os.PathLike)):
        where = os.fspath(source)
        model = read_onnx(where)
    else:
        raise ModelError(f"expected an ONNX file path or an onnx.ModelProto, got {type(source).__name__}")
    return Importer(model, where).run()


def read_onnx(path: str) -> onnx.ModelProto:
    """Read an ONNX file, refusing a missing, empty, truncated or garbage one with one line."""
    if not os.path.exists(path):
        raise ModelError(f"{path}: no such file")
    if os.path.isdir(path):
        raise ModelError(f"{path}: is a directory, not an ONNX file")
    if os.path.getsize(path) == 0:
        raise ModelError(f"{path}: file is empty")
    try:
        return onnx.load(path)
    except Exception as exc:  # protobuf raises several types; all mean the same to a user
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelError(f"{path}: not a readable ONNX model ({reason})") from None


def _one_line(text: str) -> str:
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    return lines[0] if lines else "unknown error"


def _pretty(shape) -> str:
    dims = ["N" if d is None else str(d) for d in shape]
    return "(" + ", ".join(dims) + ("," if len(dims) == 1 else "") + ")"


def _attrs(node: onnx.NodeProto) -> dict:
    out = {}
    for a in node.attribute:
        v = onnx.helper.get_attribute_value(a)
        if isinstance(v, bytes):
            v = v.decode("utf-8")
        elif isinstance(v, list) and v and isinstance(v[0], bytes):
            v = [s.decode("utf-8") for s in v]
        out[a.name] = v
    return out


def _per_sample(shape) -> str:
    return " for one sample" if any(not isinstance(d, int) for d in shape) else ""


def _utf8(attr: onnx.AttributeProto) -> bool:
    try:
        for value in (attr.s, *attr.strings):
            value.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _shape_of(vi: onnx.ValueInfoProto) -> tuple | None:
    t = vi.type
    if not t.HasField("tensor_type") or not t.tensor_type.HasField("shape"):
        return None
    return tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.tensor_type.shape.dim)


class Importer:
    """One import: each step is a method, run in order by run()."""

    def __init__(self, model: onnx.ModelProto, where: str):
        self.original = onnx.ModelProto()
        self.original.CopyFrom(model)  # export writes the user's graph back, not our folded one
        self.model = model
        self.where = where
        self.tally = limits.Tally()  # every constant the import holds: initializers and folded values

    def fail(self, what: str) -> ModelError:
        return ModelError(f"{self.where}: {what}")

    def charge(self, size: int, what: str) -> None:
        """Count `size` bytes of constants against the budget, refusing (naming `what`) past it."""
        self.tally.charge(size, f"{self.where}: {what}")

    def run(self) -> Graph:
        if not self.model.HasField("graph"):
            raise self.fail("not an ONNX model (no graph)")
        self.opset = self._opset()
        self._name_nodes()
        self._check_references()
        self._dequantize_weights()
        self._toposort()
        self._check()
        self._check_attributes()
        self.model = split_sequences(self.model, self.opset)
        self.model, self.batch = free_batch(self.model)
        self._infer_shapes()
        inputs = self._inputs()
        self._check_value_sizes(inputs)
        self._split_aliased_initializers()
        self._classify_initializers()
        self._fold()
        self._refuse_unsupported()
        nodes = self._bind()
        outputs = [ValueInfo(o.name, o.type.tensor_type.elem_type, _shape_of(o) or ()) for o in self.model.graph.output]
        stored = {**self.params, **self.buffers, **self.constants}
        shapes = {**self.shapes, **{name: tuple(arr.shape) for name, arr in stored.items()}}
        graph = Graph(nodes=nodes, inputs=inputs, outputs=outputs, params=self.params, buffers=self.buffers,
                      constants=self.constants, opset=self.opset, source=self.where,
                      producer=f"{self.model.producer_name} {self.model.producer_version}".strip(),
                      original=self.original, shapes=shapes, batch=self.batch)
        warn_at_import(graph)
        return graph

    # -- validation --------------------------------------------------------------------------
    def _opset(self) -> int:
        versions = {o.domain: o.version for o in self.model.opset_import}
        opset = versions.get("", versions.get("ai.onnx"))
        if opset is None:
            raise self.fail("model imports no version of the default ONNX opset")
        newest = onnx.defs.onnx_opset_version()
        if opset < MIN_OPSET:
            raise self.fail(f"opset {opset} is older than {MIN_OPSET}, the oldest edgetrain imports; "
                            f"re-export with opset {MIN_OPSET} or newer")
        if opset > newest:
            raise self.fail(f"opset {opset} is newer than {newest}, the newest the installed onnx knows")
        return opset

    def _name_nodes(self) -> None:
        """Give every node a unique, readable name: users see them in errors and in `info`."""
        seen: set[str] = set()
        for i, n in enumerate(self.model.graph.node):
            base = n.name or f"{n.op_type}_{i}"
            name, k = base, 1
            while name in seen:
                k += 1
                name = f"{base}_{k}"
            seen.add(name)
            n.name = name

    def _check_references(self) -> None:
        g = self.model.graph
        if not len(g.output):
            raise self.fail("the graph has no outputs; a model needs at least one to train or evaluate")
        known = {i.name for i in g.input} | {t.name for t in g.initializer}
        known |= {o for n in g.node for o in n.output if o}
        for n in g.node:
            for name in n.input:
                if name and name not in known:
                    raise self.fail(f"node '{n.name}' ({n.op_type}) reads '{name}', which no node, graph input "
                                    f"or initializer provides")
        for o in g.output:
            if o.name not in known:
                raise self.fail(f"graph output '{o.name}' is not produced by any node")

    def _dequantize_weights(self) -> None:
        """Quantised weights (DequantizeLinear of initializers) become float ones, in the graph kept for export too."""
        self.model = dequantize_weights(self.model)
        self.original = dequantize_weights(self.original)

    def _toposort(self) -> None:
        """Order nodes so each runs after its producers, and drop nodes no output depends on."""
        g = self.model.graph
        producer = {o: i for i, n in enumerate(g.node) for o in n.output if o}
        needed: set[int] = set()
        stack = [producer[o.name] for o in g.output if o.name in producer]
        while stack:
            i = stack.pop()
            if i in needed:
                continue
            needed.add(i)
            stack.extend(producer[x] for x in g.node[i].input if x in producer)
        order: list[int] = []
        state: dict[int, int] = {}  # 1 = on the current path, 2 = done

        for root in sorted(needed):
            if state.get(root):
                continue
            path = [(root, iter([producer[x] for x in g.node[root].input if x in producer]))]
            state[root] = 1
            while path:
                i, deps = path[-1]
                nxt = next(deps, None)
                if nxt is None:
                    path.pop()
                    state[i] = 2
                    order.append(i)
                elif state.get(nxt) == 1:
                    raise self.fail(f"the graph has a cycle through node '{g.node[nxt].name}'")
                elif not state.get(nxt):
                    state[nxt] = 1
                    path.append((nxt, iter([producer[x] for x in g.node[nxt].input if x in producer])))
        nodes = [g.node[i] for i in order]
        del g.node[:]
        g.node.extend(nodes)

    def _check(self) -> None:
        try:
            onnx.checker.check_model(self.model)
        except Exception as exc:
            raise self.fail(f"invalid ONNX model: {_one_line(exc)}") from None

    def _check_attributes(self) -> None:
        """Every node's attributes readable (string ones UTF-8), so later steps can read them freely."""
        for n in self.model.graph.node:
            try:
                _attrs(n)
            except UnicodeDecodeError:
                bad = next(a.name for a in n.attribute if not _utf8(a))
                raise self.fail(f"node '{n.name}' ({n.op_type}): attribute '{bad}' is not UTF-8 text") from None

    def _infer_shapes(self) -> None:
        try:
            self.model = infer_qgemm_shapes(self.model)
            self.model = onnx.shape_inference.infer_shapes(self.model, strict_mode=True)
        except Exception as exc:
            raise self.fail(f"shape inference failed: {_one_line(exc)}") from None
        g = self.model.graph
        self.shapes: dict[str, tuple] = {}
        for vi in list(g.value_info) + list(g.input) + list(g.output):
            s = _shape_of(vi)
            if s is not None:
                self.shapes[vi.name] = tuple(d if isinstance(d, int) else None for d in s)

    def _inputs(self) -> list[ValueInfo]:
        g = self.model.graph
        inits = {t.name for t in g.initializer}
        out = []
        for vi in g.input:
            if vi.name in inits:
                continue  # old exporters list initializers as inputs too
            shape = _shape_of(vi)
            if shape is None:
                raise self.fail(f"input '{vi.name}' has no shape; edgetrain needs every dimension but the batch fixed")
            for axis, d in enumerate(shape):
                if axis > 0 and not isinstance(d, int):
                    raise self.fail(f"input '{vi.name}' dimension {axis} is '{d or '?'}', not fixed; edgetrain needs "
                                    f"every dimension but the batch (0) fixed: re-export with a fixed input size")
            if shape:
                shape = (shape[0] if isinstance(shape[0], int) else None,) + tuple(shape[1:])
            out.append(ValueInfo(vi.name, vi.type.tensor_type.elem_type, tuple(shape)))
        return out

    def _check_value_sizes(self, inputs: list[ValueInfo]) -> None:
        """Refuse a declared input or an inferred value that would not fit the budget, free dimensions (the
        batch) counted as 1: the smallest run of the model would allocate it."""
        for vi in inputs:
            size = shape_bytes(vi.shape, elem_bytes(vi.elem_type))
            limits.check(size, f"{self.where}: input '{vi.name}' of shape {_pretty(vi.shape)}{_per_sample(vi.shape)}",
                         self.tally.limit)
        g = self.model.graph
        producer = {o: n.name for n in g.node for o in n.output if o}
        for vi in list(g.value_info) + list(g.output):
            shape = _shape_of(vi)
            if shape is None:
                continue
            size = shape_bytes(shape, elem_bytes(vi.type.tensor_type.elem_type))
            node = f" (output of node '{producer[vi.name]}')" if vi.name in producer else ""
            limits.check(size, f"{self.where}: value '{vi.name}'{node} of shape {_pretty(shape)}{_per_sample(shape)}",
                         self.tally.limit)

    # -- initializers and folding -------------------------------------------------------------
    def _split_aliased_initializers(self) -> None:
        """Give each Identity(initializer) output its own tensor.

        torch's exporter deduplicates equal initializers and routes the copies through Identity, so a
        fresh BatchNorm's running variance can alias its scale (both all ones). Training must update
        them separately.
        """
        g = self.model.graph
        inits = {t.name: t for t in g.initializer}
        outputs = {o.name for o in g.output}
        kept = []
        for n in g.node:
            if n.op_type == "Identity" and n.input[0] in inits and n.output[0] not in outputs:
                copy = onnx.TensorProto()
                copy.CopyFrom(inits[n.input[0]])
                copy.name = n.output[0]
                g.initializer.append(copy)
                inits[copy.name] = copy
            else:
                kept.append(n)
        del g.node[:]
        g.node.extend(kept)

    def _classify_initializers(self) -> None:
        g = self.model.graph
        uses: dict[str, list[tuple[str, int]]] = defaultdict(list)
        for n in g.node:
            for pos, name in enumerate(n.input):
                if name:
                    uses[name].append((n.op_type, pos))
        self.params: dict[str, np.ndarray] = {}
        self.buffers: dict[str, np.ndarray] = {}
        self.constants: dict[str, np.ndarray] = {}
        # Computed values that land in a parameter slot, and the inputs of movement ops that produce them:
        # walked from the last node back, so each node's outputs are settled before its inputs.
        feeds_param: set[str] = set()
        for n in reversed(g.node):
            slots = PARAM_SLOTS.get(n.op_type, set()) | ELEMENTWISE_PARAM_SLOTS.get(n.op_type, set())
            feeds_param.update(name for pos, name in enumerate(n.input) if name and pos in slots)
            if n.op_type in DATA_MOVEMENT_OPS and any(o in feeds_param for o in n.output):
                moved = DATA_MOVEMENT_OPS[n.op_type]
                for pos, name in enumerate(n.input):
                    if name and (moved is None or pos in moved):
                        feeds_param.add(name)
                        uses[name].append(("<moved into a parameter slot>", -1))
        for t in g.initializer:
            size = shape_bytes(t.dims, elem_bytes(t.data_type))
            self.charge(size, f"initializer '{t.name}' of shape {_pretty(t.dims)}")
            try:
                arr = numpy_helper.to_array(t)
            except Exception as exc:
                raise self.fail(f"initializer '{t.name}' cannot be read: {_one_line(exc)}") from None
            arr = np.array(arr)  # own the memory: training writes into it
            use = uses.get(t.name, [])
            floating = np.issubdtype(arr.dtype, np.floating)
            if floating and any(pos in BUFFER_SLOTS.get(op, ()) for op, pos in use):
                self.buffers[t.name] = arr
            elif floating and (
                any(pos in PARAM_SLOTS.get(op, ()) for op, pos in use)
                or (arr.size > 1 and any(pos < 0 or pos in ELEMENTWISE_PARAM_SLOTS.get(op, ()) for op, pos in use))
            ):
                self.params[t.name] = arr
            else:
                self.constants[t.name] = arr

    def _fold(self) -> None:
        """Evaluate every node whose inputs are all known at import (constants, static shapes)."""
        g = self.model.graph
        kept = []
        for n in g.node:
            value = None
            static = self._static_shape(n.input[0]) if n.op_type == "Shape" else None
            if static is not None:
                shape = np.array(static, dtype=np.int64)
                a = _attrs(n)
                value = [shape[a.get("start", 0):a.get("end", None)]]
            elif n.op_type not in NONDETERMINISTIC and all(not i or i in self.constants for i in n.input):
                self._check_fold(n)
                value = self._evaluate(n)
            if value is None:
                kept.append(n)
                continue
            for name, v in zip(n.output, value):
                if name:
                    self.constants[name] = np.asarray(v)
        del g.node[:]
        g.node.extend(kept)

    def _check_fold(self, n: onnx.NodeProto) -> None:
        """Charge what node `n` will fold to against the budget before evaluating it (onnx_sizes)."""
        if subgraph_expands(n):
            raise self.fail(f"node '{n.name}' ({n.op_type}): its subgraph computes sizes from values, so what "
                            f"folding it would allocate cannot be told in advance; it is not folded")
        for name, known in zip([o for o in n.output if o], fold_output_sizes(n, self.constants, self.opset)):
            if known is None:
                if n.op_type in EXPANDING_OPS:
                    raise self.fail(f"node '{n.name}' ({n.op_type}): cannot tell the size of the constant it "
                                    f"folds to, so it is not folded")
                continue  # bounded by its inputs, which are charged already
            shape, size = known
            self.charge(size, f"node '{n.name}' ({n.op_type}) folds to a constant '{name}' of shape {_pretty(shape)}")

    def _static_shape(self, name: str) -> tuple | None:
        # A shape is static only if no dimension depends on the free batch size.
        s = self.shapes.get(name)
        if name in self.constants:
            return self.constants[name].shape
        if s is None or any(d is None for d in s):
            return None
        return s

    def _evaluate(self, n: onnx.NodeProto) -> list[np.ndarray]:
        inputs = [self.constants[i] if i else None for i in n.input]
        if n.op_type in OPS:
            node = Node(n.name, n.op_type, list(n.input), list(n.output), _attrs(n))
            outs, _ = OPS[n.op_type](node, self.opset).forward(inputs, Run(training=False))
            return outs
        try:
            feeds = {i: self.constants[i] for i in n.input if i}
            return ReferenceEvaluator(n, opsets={"": self.opset}).run(None, feeds)
        except Exception as exc:
            raise self.fail(f"node '{n.name}' ({n.op_type}): cannot fold constant: {_one_line(exc)}") from None

    def _refuse_unsupported(self) -> None:
        bad: dict[str, list[str]] = defaultdict(list)
        for n in self.model.graph.node:
            key = n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}"
            contrib = n.op_type in CONTRIB_OPS.get(n.domain, ())
            if not contrib and (n.domain not in ("", "ai.onnx") or n.op_type not in SUPPORTED):
                bad[key].append(n.name)
        if not bad:
            return
        parts = []
        for op, names in sorted(bad.items()):
            shown = ", ".join(f"'{x}'" for x in names[:MAX_NAMES_LISTED])
            more = f" and {len(names) - MAX_NAMES_LISTED} more" if len(names) > MAX_NAMES_LISTED else ""
            parts.append(f"{op} (node{'s' if len(names) > 1 else ''} {shown}{more})")
        raise self.fail(f"opset {self.opset}: unsupported op{'s' if len(bad) > 1 else ''}: {'; '.join(parts)}")

    def _bind(self) -> list[Node]:
        nodes = []
        for n in self.model.graph.node:
            node = Node(n.name, n.op_type, list(n.input), list(n.output), _attrs(n))
            node.op = OPS[n.op_type](node, self.opset)
            nodes.append(node)
        return nodes
