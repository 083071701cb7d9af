"""Accumulate ONNX nodes and seeded initialisers with torch-style names."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
# ir_version 8 is the newest that onnxruntime 1.17 (the oldest we support) loads.
IR_VERSION = 8
BATCH_DIM = "N"
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
PRODUCER_NAME = "edgetrain.models"

BN_EPSILON = 1e-5
# ONNX momentum weights the old running stat: 0.9 here equals torch's momentum=0.1.
BN_MOMENTUM = 0.9
RELU6_MAX = 6.0
# Gain for ReLU-family nonlinearities in Kaiming init (torch.nn.init.calculate_gain).
RELU_GAIN = math.sqrt(2.0)

Dim = int | str
Shape = Sequence[Dim]
TensorSpec = tuple[str, Shape]


def require_positive_int(name: str, value: object) -> int:
    """Return value if it is a positive int, else raise a ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def image_shape(in_channels: int, input_size: int) -> list[Dim]:
    """Return the [N, C, H, W] graph-input shape for square images."""
    return [BATCH_DIM, in_channels, input_size, input_size]


def _value_info(name: str, shape: Shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))


class GraphBuilder:
    """Collects nodes and initialisers and assembles them into a checked ModelProto."""

    def __init__(self, graph_name: str, seed: int = 0) -> None:
        self.graph_name = graph_name
        self.rng = np.random.default_rng(seed)
        self._nodes: list[onnx.NodeProto] = []
        self._initializers: list[onnx.TensorProto] = []
        self._inputs: dict[str, onnx.ValueInfoProto] = {}
        self._node_names: set[str] = set()
        self._tensor_names: set[str] = set()
        # Channel count per produced tensor, so ops need not be told their input width.
        self._channels: dict[str, int] = {}
        self._relu6_bounds: tuple[str, str] | None = None
        self._gelu_constants: tuple[str, str, str] | None = None

    # ----------------------------------------------------------------- plumbing
    def input(self, name: str, shape: Shape) -> str:
        """Declare a float graph input; shape[1] is taken as its channel count."""
        self._claim_tensor(name)
        self._inputs[name] = _value_info(name, shape)
        self._channels[name] = int(shape[1])
        return name

    def channels(self, x: str) -> int:
        """Return the channel (or feature) count of tensor x."""
        return self._channels[x]

    def _claim_tensor(self, name: str) -> None:
        if name in self._tensor_names:
            raise ValueError(f"tensor name {name!r} is already used in graph {self.graph_name!r}")
        self._tensor_names.add(name)

    def _reserve(self, name: str | None, op_type: str) -> str:
        if name is None:
            # Unnamed ops get the first free "<op>_<k>" so names stay short and deterministic.
            stem = op_type.lower()
            name = next(f"{stem}_{k}" for k in itertools.count() if f"{stem}_{k}" not in self._node_names)
        elif name in self._node_names:
            raise ValueError(f"node name {name!r} is already used in graph {self.graph_name!r}")
        self._node_names.add(name)
        return name

    def _emit(
        self,
        op_type: str,
        inputs: Sequence[str],
        name: str | None,
        out_channels: int | None,
        output: str | None = None,
        **attrs: object,
    ) -> str:
        return self._append(op_type, inputs, self._reserve(name, op_type), out_channels, output, **attrs)

    def _append(
        self,
        op_type: str,
        inputs: Sequence[str],
        node_name: str,
        out_channels: int | None,
        output: str | None = None,
        **attrs: object,
    ) -> str:
        out = output or node_name
        self._claim_tensor(out)
        self._nodes.append(helper.make_node(op_type, list(inputs), [out], name=node_name, **attrs))
        if out_channels is not None:
            self._channels[out] = out_channels
        return out

    def _initializer(self, name: str, values: np.ndarray) -> str:
        self._claim_tensor(name)
        self._initializers.append(numpy_helper.from_array(values.astype(np.float32), name))
        return name

    # ---------------------------------------------------------- layers with weights
    def conv(
        self,
        x: str,
        out_ch: int,
        k: int,
        stride: int = 1,
        pad: int = 0,
        groups: int = 1,
        bias: bool = False,
        name: str | None = None,
    ) -> str:
        """Add a square Conv with Kaiming-normal (fan_out) weights and zero bias."""
        in_ch = self.channels(x)
        if in_ch % groups or out_ch % groups:
            raise ValueError(f"conv {name}: channels {in_ch}->{out_ch} not divisible by groups={groups}")
        node_name = self._reserve(name, "Conv")
        weight_shape = (out_ch, in_ch // groups, k, k)
        # torchvision: kaiming_normal_(mode="fan_out", nonlinearity="relu"); fan_out ignores groups.
        std = RELU_GAIN / math.sqrt(out_ch * k * k)
        inputs = [x, self._initializer(f"{node_name}.weight", self.rng.normal(0.0, std, weight_shape))]
        if bias:
            inputs.append(self._initializer(f"{node_name}.bias", np.zeros(out_ch)))
        return self._append(
            "Conv", inputs, node_name, out_ch,
            kernel_shape=[k, k], strides=[stride, stride], pads=[pad] * 4, group=groups,
        )

    def batchnorm(self, x: str, name: str | None = None) -> str:
        """Add inference-mode BatchNormalization with identity statistics."""
        ch = self.channels(x)
        node_name = self._reserve(name, "BatchNormalization")
        params = {
            "weight": np.ones(ch),
            "bias": np.zeros(ch),
            "running_mean": np.zeros(ch),
            "running_var": np.ones(ch),
        }
        inputs = [x] + [self._initializer(f"{node_name}.{key}", val) for key, val in params.items()]
        return self._append(
            "BatchNormalization", inputs, node_name, ch, epsilon=BN_EPSILON, momentum=BN_MOMENTUM
        )

    def gemm(self, x: str, out_features: int, name: str | None = None, output: str | None = None) -> str:
        """Add a torch-Linear-style Gemm (transB=1) with uniform(+-1/sqrt(fan_in)) init."""
        in_features = self.channels(x)
        node_name = self._reserve(name, "Gemm")
        bound = 1.0 / math.sqrt(in_features)
        weight = self.rng.uniform(-bound, bound, (out_features, in_features))
        bias = self.rng.uniform(-bound, bound, (out_features,))
        inputs = [
            x,
            self._initializer(f"{node_name}.weight", weight),
            self._initializer(f"{node_name}.bias", bias),
        ]
        return self._append("Gemm", inputs, node_name, out_features, output=output, transB=1)

    # ------------------------------------------------------- parameter-free layers
    def relu(self, x: str, name: str | None = None) -> str:
        """Add a Relu."""
        return self._emit("Relu", [x], name, self.channels(x))

    def relu6(self, x: str, name: str | None = None) -> str:
        """Add ReLU6 as Clip(x, 0, 6); the bounds are shared Constant nodes, not weights."""
        lo, hi = self._relu6_constants()
        return self._emit("Clip", [x, lo, hi], name, self.channels(x))

    def _relu6_constants(self) -> tuple[str, str]:
        # Constant nodes (as torch's exporter emits) keep initialisers == trainable state.
        if self._relu6_bounds is None:
            lo = self._emit("Constant", [], "relu6.min", None,
                            value=numpy_helper.from_array(np.array(0.0, np.float32)))
            hi = self._emit("Constant", [], "relu6.max", None,
                            value=numpy_helper.from_array(np.array(RELU6_MAX, np.float32)))
            self._relu6_bounds = (lo, hi)
        return self._relu6_bounds

    def add(self, a: str, b: str, name: str | None = None) -> str:
        """Add an elementwise Add (residual join)."""
        return self._emit("Add", [a, b], name, self.channels(a))

    def global_avg_pool(self, x: str, name: str | None = None) -> str:
        """Add GlobalAveragePool: [N, C, H, W] -> [N, C, 1, 1]."""
        return self._emit("GlobalAveragePool", [x], name, self.channels(x))

    def flatten(self, x: str, features: int | None = None, name: str | None = None) -> str:
        """Add Flatten(axis=1); pass features when the spatial size is not 1x1."""
        return self._emit("Flatten", [x], name, features or self.channels(x), axis=1)

    def maxpool(self, x: str, k: int, stride: int | None = None, pad: int = 0, name: str | None = None) -> str:
        """Add a square MaxPool (stride defaults to k, as in torch)."""
        return self._pool("MaxPool", x, k, stride, pad, name)

    def avgpool(self, x: str, k: int, stride: int | None = None, pad: int = 0, name: str | None = None) -> str:
        """Add a square AveragePool (stride defaults to k; padding counts, as in torch's default)."""
        # ONNX defaults to count_include_pad=0, torch.nn.AvgPool2d to True: follow torch.
        return self._pool("AveragePool", x, k, stride, pad, name, count_include_pad=1)

    def _pool(self, op: str, x: str, k: int, stride: int | None, pad: int, name: str | None, **attrs: object) -> str:
        s = k if stride is None else stride
        return self._emit(op, [x], name, self.channels(x), kernel_shape=[k, k], strides=[s, s], pads=[pad] * 4,
                          **attrs)

    def hardswish(self, x: str, name: str | None = None) -> str:
        """Add HardSwish (x * relu6(x + 3) / 6), torch's nn.Hardswish."""
        return self._emit("HardSwish", [x], name, self.channels(x))

    def hardsigmoid(self, x: str, name: str | None = None) -> str:
        """Add HardSigmoid with torch's nn.Hardsigmoid constants (relu6(x + 3) / 6)."""
        return self._emit("HardSigmoid", [x], name, self.channels(x), alpha=1.0 / 6.0, beta=0.5)

    def mul(self, a: str, b: str, name: str | None = None) -> str:
        """Add an elementwise Mul (a gate applied to a feature map)."""
        return self._emit("Mul", [a, b], name, self.channels(a))

    def constant(self, name: str, values: np.ndarray) -> str:
        """Add a Constant node (a fixed value, not a weight): shapes, axes, scale factors."""
        return self._emit("Constant", [], name, None, value=numpy_helper.from_array(np.asarray(values), name))

    def parameter(self, name: str, values: np.ndarray) -> str:
        """Add a float initializer that trains (an embedding, a class token)."""
        return self._initializer(name, values)

    def op(self, op_type: str, inputs: Sequence[str], channels: int | None, name: str | None = None,
           **attrs: object) -> str:
        """Add any parameter-free op; channels is the output's feature count (None when it has none)."""
        return self._emit(op_type, inputs, name, channels, **attrs)

    def linear(self, x: str, out_features: int, name: str) -> str:
        """Add nn.Linear over the last axis of an [N, ..., C] tensor: MatMul by an (in, out) weight, then Add.

        The weight is stored transposed against torch's (out, in), as torch's own exporter stores it for a
        MatMul; the names are torch's.
        """
        in_features = self.channels(x)
        bound = 1.0 / math.sqrt(in_features)
        w = self._initializer(f"{name}.weight", self.rng.uniform(-bound, bound, (in_features, out_features)))
        b = self._initializer(f"{name}.bias", self.rng.uniform(-bound, bound, (out_features,)))
        y = self._emit("MatMul", [x, w], f"{name}.matmul", out_features)
        return self._emit("Add", [y, b], f"{name}.add", out_features)

    def layernorm(self, x: str, name: str, epsilon: float = 1e-6) -> str:
        """Add LayerNormalization over the last axis with torch's init (weight 1, bias 0)."""
        ch = self.channels(x)
        inputs = [x, self._initializer(f"{name}.weight", np.ones(ch)), self._initializer(f"{name}.bias", np.zeros(ch))]
        return self._emit("LayerNormalization", inputs, name, ch, axis=-1, epsilon=epsilon)

    def gelu(self, x: str, name: str) -> str:
        """Add GELU as torch's exporter writes it at opset 17: x * (1 + erf(x / sqrt(2))) / 2."""
        ch = self.channels(x)
        if self._gelu_constants is None:
            self._gelu_constants = (self.constant("gelu.sqrt2", np.array(math.sqrt(2.0), np.float32)),
                                    self.constant("gelu.one", np.array(1.0, np.float32)),
                                    self.constant("gelu.half", np.array(0.5, np.float32)))
        sqrt2, one, half = self._gelu_constants
        e = self._emit("Erf", [self._emit("Div", [x, sqrt2], f"{name}.div", ch)], f"{name}.erf", ch)
        y = self._emit("Mul", [x, self._emit("Add", [e, one], f"{name}.add", ch)], f"{name}.mul", ch)
        return self._emit("Mul", [y, half], f"{name}.half", ch)

    # ------------------------------------------------------------------ assembly
    def finish(self, inputs: Sequence[str], outputs: Sequence[TensorSpec]) -> onnx.ModelProto:
        """Assemble, shape-infer and check the model; inputs must be declared via input()."""
        unknown = [name for name in inputs if name not in self._inputs]
        if unknown:
            raise ValueError(f"undeclared graph inputs: {unknown}")
        graph = helper.make_graph(
            self._nodes,
            self.graph_name,
            [self._inputs[name] for name in inputs],
            [_value_info(name, shape) for name, shape in outputs],
            initializer=self._initializers,
        )
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", OPSET)],
            ir_version=IR_VERSION,
            producer_name=PRODUCER_NAME,
        )
        onnx.checker.check_model(model)
        model = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
        onnx.checker.check_model(model, full_check=True)
        return model
