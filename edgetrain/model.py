"""The user-facing Model: eval forward, training loss and gradients, parameters and buffers."""
from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx

from edgetrain.engine import Executor, Tape
from edgetrain.errors import DataError, ModelError, NonFiniteError
from edgetrain.extension import ModelExtension
from edgetrain.graph import Graph, Node
from edgetrain.kernels import detfloat
from edgetrain.layers import mac_nodes, non_negative_values
from edgetrain.losses import LOSSES, softmax_cross_entropy
from edgetrain.onnx_import import load_graph
from edgetrain.ops.base import FusedAway, Op
from edgetrain.ops.elementwise import AddRelu, Relu
from edgetrain.ops.norm import BatchNormalization, fuse_relu, sole_reader, sole_relu_reader
from edgetrain.ops.pool import fuse_relu_pool
from edgetrain.precision.cost import CostMeter, LayerCost, layer_step_cost
from edgetrain.precision.spec import FP32, LayerPrecision, PrecisionConfig
from edgetrain.quant.mac import RUNTIME_SETTINGS, QuantLinear, QuantMAC, QuantRuntime, integer_form, takes_codes

# What the float engine computes in (float16: forward passes of float16 graphs, e.g. ONNX's own test cases).
COMPUTE_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
# BatchNorms hand their integer reader its codes instead of floats (`Model._hand_codes_on`); False keeps
# every activation a float tensor (the tests compare the two, bit for bit).
FUSE_BN_CODES = True


class Model:
    """An imported ONNX model that can be run, differentiated and trained.

    Controllers that run some layers themselves (DFQ's gated units) attach as extensions (attach();
    edgetrain.extension says which hooks a step calls); the Model knows them only through that Protocol.
    """

    def __init__(self, graph: Graph, dtype: np.dtype | type = np.float32, seed: int = 0):
        self.graph = graph
        self.dtype = compute_dtype(dtype)
        self.seed = seed
        self.step = 0  # advances the dropout stream; the trainer owns it
        cast = lambda d: {k: (v.astype(self.dtype) if np.issubdtype(v.dtype, np.floating) else v) for k, v in d.items()}
        self._params = cast(graph.params)
        self._buffers = cast(graph.buffers)
        self._constants = cast(graph.constants)
        self.executor = Executor(graph, {n.name: n.op for n in graph.nodes})
        self._float_ops = dict(self.executor.ops)
        self._mac_nodes = tuple(mac_nodes(graph))
        self.precision: dict[str, LayerPrecision] = {n.name: FP32 for n in self._mac_nodes}
        self.precision_config = PrecisionConfig()
        self.cost = CostMeter()
        self.last_cost: dict[str, LayerCost] = {}
        self.runtime = QuantRuntime()
        self._extensions: list[ModelExtension] = []
        self._cost_cache: dict[tuple, tuple[dict, dict]] = {}  # step_cost of the layers no extension owns
        self.last_task_loss: float | None = None  # the loss before the extensions' terms, of the last step
        # fp32 layers' float work on the portable fixed-order path (kernels.detfloat) instead of BLAS/libm;
        # integer layers or extensions turn it on regardless (see deterministic_float)
        self.deterministic = False

    # -- introspection --------------------------------------------------------------------------
    @property
    def input_name(self) -> str:
        return self.graph.inputs[0].name

    @property
    def output_name(self) -> str:
        return self.graph.outputs[0].name

    @property
    def input_shape(self) -> tuple:
        """Shape of the first input; None stands for a free batch dimension."""
        return self.graph.inputs[0].shape

    @property
    def mac_layers(self) -> tuple[Node, ...]:
        """The graph's MAC nodes (edgetrain.layers.mac_nodes), in execution order: what set_precision sets."""
        return self._mac_nodes

    def float_op(self, name: str) -> Op:
        """The float op of the imported node `name`: what an integer form of that layer wraps."""
        return self._float_ops[name]

    def parameters(self) -> dict[str, np.ndarray]:
        """Trainable tensors by initializer name (live arrays: updating them in place trains the model)."""
        return self._params

    def buffers(self) -> dict[str, np.ndarray]:
        """Non-trainable state that training updates (BatchNorm running statistics)."""
        return self._buffers

    def state_dict(self) -> dict[str, np.ndarray]:
        """Copies of every parameter and buffer."""
        return {k: v.copy() for k, v in {**self._params, **self._buffers}.items()}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Overwrite parameters and buffers in place; names and shapes must match exactly."""
        for table in (self._params, self._buffers):
            for name, arr in table.items():
                if name not in state:
                    raise ModelError(f"state has no tensor '{name}'")
                if state[name].shape != arr.shape:
                    raise ModelError(f"tensor '{name}': shape {state[name].shape} != model's {arr.shape}")
                arr[...] = state[name]

    def astype(self, dtype) -> Model:
        """A copy of this model computing in another float type (float64 for gradient checks)."""
        m = Model(self.graph, dtype, self.seed)
        m._params = {k: v.astype(dtype) for k, v in self._params.items()}
        m._buffers = {k: v.astype(dtype) for k, v in self._buffers.items()}
        m.deterministic = self.deterministic
        m.set_precision(self.precision_config, pow2_scales=self.runtime.pow2_scales)
        for name in RUNTIME_SETTINGS:
            setattr(m.runtime, name, getattr(self.runtime, name))
        return m

    @property
    def deterministic_float(self) -> bool:
        """Whether this model's float work takes kernels.detfloat's portable path: when asked (`deterministic`),
        and always once any MAC layer is integer or an extension (DFQ's gates) is attached, because
        those runs promise the same bits on every board (their cost: the fp32 classifier and loss leave BLAS)."""
        return (self.deterministic or bool(self._extensions)
                or any(not p.is_float for p in self.precision.values()))

    # -- precision ------------------------------------------------------------------------------
    def set_precision(self, default: str | LayerPrecision | PrecisionConfig = "fp32", overrides: dict | None = None,
                      *, quantize_classifier: bool = False, pow2_scales: bool = False) -> dict[str, LayerPrecision]:
        """Choose each MAC layer's bit-widths (e.g. "8/8", {"layer1.*": "4/8"}); takes effect at the next step.

        Layers the integer kernels cannot run (a Gemm with transA, a MatMul whose weight is its first operand
        or not 2-D: quant.mac.float_reason) stay fp32.
        Returns the precision now in force, by layer.
        """
        config = default if isinstance(default, PrecisionConfig) else PrecisionConfig.make(
            default, overrides, quantize_classifier)
        resolved = config.resolve(self.graph)
        unsigned = non_negative_values(self.graph)
        self.runtime.pow2_scales = pow2_scales
        owned = self._owned_layers()
        for index, node in enumerate(self._mac_nodes):
            if node.name in owned:
                self.precision[node.name] = owned[node.name]  # its extension runs it at bits of its own
                continue
            want = resolved[node.name]
            form = integer_form(node, self._params)
            if want.is_float or form is None:
                self.executor.ops[node.name] = self._float_ops[node.name]
                self.precision[node.name] = FP32
                continue
            op = form(self._float_ops[node.name], want, index, node.inputs[0] in unsigned, self.runtime,
                      unsigned_other=len(node.inputs) > 1 and node.inputs[1] in unsigned)
            self.executor.ops[node.name] = op
            self.precision[node.name] = op.precision  # an act-act MatMul's second operand takes the act bits
        self.precision_config = config
        self._place_batchnorms()
        return dict(self.precision)

    # -- extensions (edgetrain.extension) -------------------------------------------------------
    @property
    def extensions(self) -> tuple[ModelExtension, ...]:
        """The attached extensions, in the order attach() received them."""
        return tuple(self._extensions)

    def attach(self, extension: ModelExtension) -> None:
        """Call `extension`'s hooks at every step from now on; the precision in force is applied again, so
        the layers it owns are left to it."""
        self._extensions.append(extension)
        self.set_precision(self.precision_config, pow2_scales=self.runtime.pow2_scales)

    def replace_nodes(self, nodes: list[Node], ops: dict[str, Op]) -> None:
        """Execute `nodes` instead of the graph's from now on: a rewrite of it with the same inputs, outputs and
        state, some nodes folded into new ones, which `ops` binds (the other nodes keep their ops).

        Parameters added to parameters() since import are trainable in it. self.graph stays the imported
        graph: precision, costs and export still read that one."""
        g = self.graph
        added = {name: arr for name, arr in self._params.items() if name not in g.params}
        rewritten = Graph(nodes, g.inputs, g.outputs, {**g.params, **added}, g.buffers, g.constants, g.opset,
                          g.source, g.producer, g.original, g.shapes)
        self.executor = Executor(rewritten, {**self.executor.ops, **ops})
        for op in self.executor.ops.values():  # its reader may be folded away now: decided again at placement
            if isinstance(op, BatchNormalization):
                op.codes_for = None

    def _owned_layers(self) -> dict[str, LayerPrecision]:
        return {name: p for ext in self._extensions for name, p in ext.owned_layers().items()}

    def _begin_forward(self) -> None:
        for ext in self._extensions:
            ext.begin_forward()

    def _place_batchnorms(self) -> None:
        """BatchNorms right after an integer layer get this model's own parallel instance, with the Relu
        that alone reads them folded in (one pass over the tensor instead of two, both directions)."""
        producer = self.graph.producer_of()
        readers = self.graph.consumers_of()
        outputs = {o.name for o in self.graph.outputs}
        relu_outputs: dict[str, BatchNormalization] = {}  # a folded ReLU's output -> the BatchNorm writing it
        for node in self.graph.nodes:
            if node.op_type in ("Relu", "Clip", "MaxPool"):
                self.executor.ops[node.name] = self._float_ops[node.name]  # until a BatchNorm or MaxPool takes it over
        for node in self.graph.nodes:
            if node.op_type != "BatchNormalization":
                continue
            src = producer.get(node.inputs[0])
            if src is not None and isinstance(self.executor.ops[src.name], QuantMAC):
                op = BatchNormalization(node, self.graph.opset)
                op.parallel = True
                self.executor.ops[node.name] = op
                fused = fuse_relu(node, op, readers, outputs, self.graph.opset, self._constants)
                if fused is not None:
                    self.executor.ops[fused[0].name] = fused[1]
                    relu_outputs[fused[0].outputs[0]] = op
            else:
                self.executor.ops[node.name] = self._float_ops[node.name]
        self._fuse_add_relus(readers, outputs)
        self._fuse_relu_pools(outputs)
        self._fuse_linear_relus(outputs)
        for ext in self._extensions:
            self.executor.ops.update(ext.owned_ops())
        self._hand_codes_on(relu_outputs, outputs)

    @property
    def hands_codes(self) -> bool:
        """Whether BatchNorms hand their integer reader codes instead of floats (FUSE_BN_CODES)."""
        return FUSE_BN_CODES

    def _hand_codes_on(self, relu_outputs: dict[str, BatchNormalization], outputs: set[str]) -> None:
        """A BatchNorm with a folded ReLU whose output only an integer conv reads, as its data input, writes
        that conv's input codes in training instead of its floats (`BatchNormalization.codes_for`): the same
        codes, without the float tensor's write and the quantiser's two reads of it."""
        if not self.hands_codes:
            return
        running = self.executor.graph.consumers_of()  # an extension may have folded nodes into others
        for value, bn in relu_outputs.items():
            reader = sole_reader(value, running, outputs)
            op = self.executor.ops.get(reader.name) if reader is not None else None
            if reader is not None and takes_codes(op, reader, value):
                bn.codes_for = op

    def _fuse_add_relus(self, readers: dict, outputs: set[str]) -> None:
        """With integer layers, an Add whose output only a Relu reads (a residual join) runs as one AddRelu
        op, the Relu as FusedAway: one parallel pass each way instead of two (the fp32 path keeps both ops:
        parallel loops there fight OpenBLAS's threads, see norm_kernels)."""
        integer = any(isinstance(op, QuantMAC) for op in self.executor.ops.values())
        running = {n.name for n in self.executor.graph.nodes}  # an extension may have folded some nodes away
        for node in self.graph.nodes:
            if node.op_type != "Add":
                continue
            self.executor.ops[node.name] = self._float_ops[node.name]
            relu = sole_relu_reader(node.outputs[0], readers, outputs) if integer and node.name in running else None
            if relu is not None and relu.name in running:
                self.executor.ops[node.name] = AddRelu(node, self.graph.opset)
                self.executor.ops[relu.name] = FusedAway(relu, self.graph.opset)

    def _fuse_relu_pools(self, outputs: set[str]) -> None:
        """With integer layers, a Relu whose output only a MaxPool reads (a conv net without BatchNorm,
        LeNet-5's two) runs inside that MaxPool (`pool.fuse_relu_pool`): one pass each way instead of two,
        over the pool's input, the same bits. A Relu some other op took over already stays with it."""
        if not any(isinstance(op, QuantMAC) for op in self.executor.ops.values()):
            return
        running = self.executor.graph.consumers_of()  # an extension may have folded nodes into others
        producer = self.executor.graph.producer_of()
        for node in self.executor.graph.nodes:
            src = producer.get(node.inputs[0]) if node.op_type == "MaxPool" else None
            if (src is None or src.op_type != "Relu" or type(self.executor.ops.get(src.name)) is not Relu
                    or sole_reader(src.outputs[0], running, outputs) is not node):
                continue
            fused = fuse_relu_pool(src, node, self.graph.opset)
            if fused is not None:
                self.executor.ops[node.name], self.executor.ops[src.name] = fused

    def _fuse_linear_relus(self, outputs: set[str]) -> None:
        """An integer Linear whose output only a Relu reads (an MLP's hidden layers) applies that Relu itself
        (`QuantLinear.relu`), the Relu as FusedAway: the bias and the Relu in the rescale's pass, the same bits
        (MLP b128, fc1 and fc2's forward with both Relus: 1.00 -> 0.84 ms, medians of four alternating
        processes). A Relu another op took over stays."""
        running = self.executor.graph.consumers_of()  # an extension may have folded nodes into others
        for node in self.executor.graph.nodes:
            op = self.executor.ops.get(node.name)
            if type(op) is not QuantLinear:
                continue
            op.relu = False  # every Relu went back to its float op above: the flag follows its Relu
            reader = sole_relu_reader(node.outputs[0], running, outputs)
            if reader is not None and type(self.executor.ops.get(reader.name)) is Relu:
                op.relu = True
                self.executor.ops[reader.name] = FusedAway(reader, self.graph.opset)

    # -- running ----------------------------------------------------------------------------------
    def _feeds(self, x: np.ndarray | dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        given = x if isinstance(x, dict) else {self.input_name: x}
        feeds = {}
        for vi in self.graph.inputs:
            if vi.name not in given:
                raise DataError(f"model input '{vi.name}' was not given")
            arr = np.asarray(given[vi.name])
            expect = vi.shape
            if arr.ndim != len(expect) or any(e is not None and e != a for e, a in zip(expect, arr.shape)):
                pretty = "(" + ", ".join("N" if e is None else str(e) for e in expect) + ")"
                pinned = (expect and expect[0] is not None and arr.ndim == len(expect) and arr.shape[0] != expect[0]
                          and self.graph.batch.pinned_by)
                raise DataError(f"input '{vi.name}' must have shape {pretty}, got {arr.shape}"
                                + (f"; the {self.graph.batch.describe()}; re-export the model with a dynamic batch "
                                   "dimension (edgetrain.from_torch does)" if pinned else ""))
            if np.issubdtype(arr.dtype, np.floating) or vi.elem_type == onnx.TensorProto.FLOAT:
                arr = arr.astype(self.dtype, copy=False)
                if not self._all_float() and not np.isfinite(arr).all():
                    # fp32 layers pass NaN on; integer ones cannot quantise it: say which input, not which layer
                    raise NonFiniteError(f"input '{vi.name}' holds {int((~np.isfinite(arr)).sum())} NaN or infinite "
                                         f"values, which the integer layers cannot quantise")
            feeds[vi.name] = arr
        return feeds

    def _all_float(self) -> bool:
        return all(p.is_float for p in self.precision.values())

    def _state(self) -> dict[str, np.ndarray]:
        return {**self._constants, **self._params, **self._buffers}

    def run(self, x: np.ndarray | dict[str, np.ndarray], training: bool = False) -> dict[str, np.ndarray]:
        """Forward pass; returns every graph output by name."""
        self._begin_forward()
        with detfloat.using(self.deterministic_float):
            env, _ = self.executor.forward(self._feeds(x), self._state(), training, key=(self.seed, self.step))
        return {o.name: env[o.name] for o in self.graph.outputs}

    def __call__(self, x: np.ndarray | dict[str, np.ndarray]) -> np.ndarray:
        """Eval-mode forward of a batch; returns the first output."""
        return self.run(x)[self.output_name]

    def forward_train(self, x) -> tuple[dict[str, np.ndarray], Tape]:
        """Training-mode forward that records a tape for backward (BatchNorm uses batch statistics)."""
        self._begin_forward()
        with detfloat.using(self.deterministic_float):
            env, tape = self.executor.forward(self._feeds(x), self._state(), training=True, record=True,
                                              key=(self.seed, self.step))
        return env, tape

    def backward(self, tape: Tape, seeds: dict[str, np.ndarray], wrt: set[str] | None = None) -> dict[str, np.ndarray]:
        """Gradients given dL/d(outputs): of every parameter and input, or only of the names in `wrt`."""
        with detfloat.using(self.deterministic_float):
            return self.executor.backward(tape, seeds, wrt)

    def step_cost(self, env: dict[str, np.ndarray]) -> tuple[dict[str, LayerCost], dict[str, LayerCost]]:
        """BitOPs of the training step whose forward values are in env: at the current precision, and in fp32."""
        owned = self._owned_layers()
        # Shapes follow from the inputs' shapes, so the other layers' costs repeat step after step.
        key = (tuple(env[i.name].shape for i in self.graph.inputs if i.name in env),
               tuple(self.precision[n.name] for n in self._mac_nodes if n.name not in owned))
        cached = self._cost_cache.get(key)
        if cached is None:
            cached = self._cost_cache[key] = self._static_step_cost(env, owned)
        costs, fp32 = dict(cached[0]), dict(cached[1])
        for ext in self._extensions:
            dyn, dyn_fp32 = ext.step_costs()
            costs.update(dyn)
            fp32.update(dyn_fp32)
        return costs, fp32

    def _static_step_cost(self, env: dict[str, np.ndarray], owned) -> tuple[dict[str, LayerCost], dict[str, LayerCost]]:
        costs, fp32 = {}, {}
        fixed = self._params.keys() | self._buffers.keys() | self._constants.keys()
        for node in self._mac_nodes:
            if node.name in owned:
                continue
            in_shapes = [env[i].shape if i else () for i in node.inputs]
            out_shapes = [env[o].shape for o in node.outputs if o]
            macs = self._float_ops[node.name].macs(in_shapes, out_shapes) * int(np.prod(out_shapes[0][:1]))
            first = node.inputs[0] not in self.executor.produced  # reads the data: nothing to back-propagate into
            # What backward keeps: the activation operands (both of a MatMul between two activations).
            saved = sum(int(np.prod(s)) for i, s in zip(node.inputs, in_shapes) if i and i not in fixed)
            costs[node.name] = layer_step_cost(macs, self.precision[node.name], saved, not first)
            fp32[node.name] = layer_step_cost(macs, FP32, saved, not first)
        return costs, fp32

    def loss_and_grad(self, x, labels: np.ndarray, loss: str | Callable = "cross_entropy",
                      label_smoothing: float = 0.0, update_buffers: bool = True) -> tuple[float, dict[str, np.ndarray]]:
        """Training forward and backward: returns (loss, {parameter name: gradient})."""
        with detfloat.using(self.deterministic_float):  # the loss and the extensions' terms too
            return self._loss_and_grad(x, labels, loss, label_smoothing, update_buffers)

    def _loss_and_grad(self, x, labels, loss, label_smoothing: float, update_buffers: bool):
        env, tape = self.forward_train(x)
        out = env[self.output_name]
        if loss == "cross_entropy":
            value, dout = softmax_cross_entropy(out, labels, label_smoothing)
        elif isinstance(loss, str):
            if loss not in LOSSES:
                raise DataError(f"unknown loss '{loss}' (choose from {', '.join(LOSSES)})")
            value, dout = LOSSES[loss](out, labels)
        else:
            value, dout = loss(out, labels)
        self.last_task_loss = value
        for ext in self._extensions:
            value = value + ext.loss_term()  # before backward, which may read what it set
        grads = self.backward(tape, {self.output_name: dout}, wrt=set(self._params))
        self.last_cost, fp32 = self.step_cost(env)
        self.cost.add_step(self.last_cost, fp32)
        if update_buffers:
            for name, arr in tape.buffer_updates.items():
                if name in self._buffers:
                    self._buffers[name][...] = arr
        # A parameter the loss does not reach (a frozen branch) gets an explicit zero gradient.
        return value, {name: grads[name] if name in grads else np.zeros_like(p) for name, p in self._params.items()}


def compute_dtype(dtype: Any) -> np.dtype:
    """The float type a Model computes in: float16, float32 or float64; anything else is refused (an int32 model
    would truncate every weight to zero)."""
    try:
        resolved = np.dtype(dtype)
    except TypeError:
        resolved = None
    if resolved is None or resolved not in COMPUTE_DTYPES:  # dtype == None is True: None means float64
        raise ModelError(f"dtype {dtype!r}: edgetrain computes in float16, float32 or float64")
    return resolved


def load(path: str | os.PathLike | onnx.ModelProto, dtype=np.float32, seed: int = 0) -> Model:
    """Import an ONNX model as a trainable Model (dtype: float32 or float64; float16 for forward passes)."""
    dtype = compute_dtype(dtype)  # before the import: a bad argument costs nothing
    return Model(load_graph(path), dtype=dtype, seed=seed)
