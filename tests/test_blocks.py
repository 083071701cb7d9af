"""Residual-block discovery (edgetrain.blocks) on the shipped models, torch exports and hand-built graphs."""
from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import models
from edgetrain.blocks import (
    Block,
    describe_blocks,
    find_blocks,
    gateable_layers,
    layer_units,
)
from edgetrain.graph import Graph
from edgetrain.layers import classifier_nodes, mac_nodes
from edgetrain.onnx_import import load_graph
from models.mobilenetv2 import (
    CIFAR_INVERTED_RESIDUAL_SETTING,
    STEM_CHANNELS,
    make_divisible,
)
from models.resnet import NUM_STAGES, blocks_per_stage

# Small inputs and widths keep imports fast; block structure does not depend on them.
RESNET_KWARGS = {
    "resnet8": {"input_size": 8},
    "resnet20": {"input_size": 8},
    "resnet38": {"input_size": 8},
    "resnet74": {"input_size": 8, "width": 4},
}
RESNET_BLOCKS = {"resnet8": 3, "resnet20": 9, "resnet38": 18, "resnet74": 36}
CONVS_PER_RESNET_BLOCK = 2
# CIFAR ResNets project the shortcut in the first block of every stage but the first.
PROJECTED_JOINS = {f"layer{stage}.0.add" for stage in range(2, NUM_STAGES + 1)}
MOBILENET_WIDTHS = (0.25, 1.0)
RESNET18_BLOCKS = 8
RESNET18_PROJECTIONS = 3

C = 2  # channels of every tensor in the hand-built graphs
IMAGE = [1, C, 4, 4]


def _load(name: str, **kwargs: object) -> Graph:
    return load_graph(models.build_model(name, **kwargs))


def _check_block_invariants(graph: Graph, blocks: list[Block]) -> None:
    """Facts every accepted block must satisfy, whatever the model."""
    order = {n.name: i for i, n in enumerate(graph.nodes)}
    protected = {n.name for n in mac_nodes(graph)[:1] + classifier_nodes(graph)}
    seen: set[str] = set()
    for i, b in enumerate(blocks):
        assert b.index == i
        assert b.join.op_type == "Add" and b.output == b.join.outputs[0]
        assert set(b.join.inputs) == {b.residual_input, b.shortcut_input}
        assert b.branch[-1].outputs[0] == b.residual_input
        assert (b.shortcut_input == b.fork) == (not b.shortcut)
        assert b.mac_nodes and not {n.name for n in b.branch} & protected
        region = {n.name for n in b.branch} | {b.join.name}
        assert not region & seen
        seen |= region
    assert [order[b.join.name] for b in blocks] == sorted(order[b.join.name] for b in blocks)
    json.dumps(describe_blocks(graph))  # JSON-ready


# ------------------------------------------------------------------------------ shipped models
def test_every_shipped_builder_is_covered() -> None:
    others = {"mobilenetv2", "mobilenetv3_small", "vit_tiny", "lenet5", "mlp"}
    assert set(models.BUILDERS) == set(RESNET_KWARGS) | others


@pytest.mark.parametrize("name", sorted(RESNET_BLOCKS))
def test_cifar_resnet_blocks(name: str) -> None:
    graph = _load(name, **RESNET_KWARGS[name])
    blocks = find_blocks(graph)
    depth = int(name.removeprefix("resnet"))
    assert len(blocks) == RESNET_BLOCKS[name] == NUM_STAGES * blocks_per_stage(depth)
    _check_block_invariants(graph, blocks)
    for b in blocks:
        prefix = b.join.name.removesuffix("add")  # e.g. "layer2.0."
        assert all(n.name.startswith(prefix) for n in b.branch + b.shortcut)
        assert [n.op_type for n in b.mac_nodes] == ["Conv"] * CONVS_PER_RESNET_BLOCK
        if b.join.name in PROJECTED_JOINS:
            assert [n.op_type for n in b.shortcut] == ["Conv", "BatchNormalization"]
            assert b.shortcut_input == b.shortcut[-1].outputs[0]
        else:
            assert b.shortcut == () and b.shortcut_input == b.fork
    assert sum(bool(b.shortcut) for b in blocks) == len(PROJECTED_JOINS)
    # Blocks chain: each fork is the previous block's output after its ReLU.
    assert blocks[0].fork == "relu"
    for prev, b in itertools.pairwise(blocks):
        assert b.fork == prev.join.name.removesuffix("add") + "relu2"


def _mobilenet_residuals(width_mult: float) -> list[int]:
    """Expansion factor of every inverted residual with an identity shortcut, as the builder decides."""
    in_ch, found = make_divisible(STEM_CHANNELS * width_mult), []
    for expand, channels, repeats, first_stride in CIFAR_INVERTED_RESIDUAL_SETTING:
        out_ch = make_divisible(channels * width_mult)
        for i in range(repeats):
            if (first_stride if i == 0 else 1) == 1 and in_ch == out_ch:
                found.append(expand)
            in_ch = out_ch
    return found


@pytest.mark.parametrize("width_mult", MOBILENET_WIDTHS)
def test_mobilenetv2_blocks(width_mult: float) -> None:
    graph = _load("mobilenetv2", input_size=8, width_mult=width_mult)
    blocks = find_blocks(graph)
    expected = _mobilenet_residuals(width_mult)
    assert len(blocks) == len(expected) and len(expected) > 0
    _check_block_invariants(graph, blocks)
    for b, expand in zip(blocks, expected, strict=True):
        assert b.shortcut == () and b.shortcut_input == b.fork
        # expand 1x1 (if any), depthwise 3x3, linear 1x1 projection
        assert len(b.mac_nodes) == (2 if expand == 1 else 3)


def test_mobilenetv3_small_blocks() -> None:
    """The identity-shortcut inverted residuals of torchvision's table, as blocks with the SE inside."""
    from models.mobilenetv3 import SETTING

    width = 0.25
    graph = _load("mobilenetv3_small", width_mult=width, input_size=32)
    blocks = find_blocks(graph)
    # as torchvision decides: on the channel counts after the width multiplier
    expected = [i for i, (cin, _, _, cout, _, _, stride) in enumerate(SETTING, start=1)
                if stride == 1 and make_divisible(cin * width) == make_divisible(cout * width)]
    assert [b.join.name for b in blocks] == [f"features.{i}.add" for i in expected]
    _check_block_invariants(graph, blocks)
    for b, i in zip(blocks, expected):
        # the squeeze-excite gate, where the table has one, sits inside the branch
        assert ("HardSigmoid" in {n.op_type for n in b.branch}) == SETTING[i - 1][4]


def test_vit_blocks_are_its_residual_branches() -> None:
    """A transformer block is two DFQ blocks: attention's and the MLP's pre-norm residual branches."""
    depth = 2
    graph = _load("vit_tiny", input_size=8, patch=4, dim=16, depth=depth, heads=2)
    blocks = find_blocks(graph)
    assert [b.join.name for b in blocks] == [f"blocks.{i}.res{k}" for i in range(depth) for k in (1, 2)]
    _check_block_invariants(graph, blocks)
    attn, mlp = blocks[0], blocks[1]
    assert [n.op_type for n in attn.mac_nodes] == ["MatMul"] * 4  # qkv, Q K^T, A V, proj
    assert [n.op_type for n in mlp.mac_nodes] == ["MatMul"] * 2  # fc1, fc2


@pytest.mark.parametrize("name, gated", [("lenet5", ["conv2", "fc1", "fc2"]), ("mlp", ["fc2"])])
def test_plain_models_have_no_blocks_but_gateable_layers(name: str, gated: list[str]) -> None:
    graph = _load(name)
    assert find_blocks(graph) == [] and describe_blocks(graph) == []
    layers = gateable_layers(graph)
    assert [n.name for n in layers] == gated
    names = {n.name for n in layers}
    assert mac_nodes(graph)[0].name not in names
    assert not names & {n.name for n in classifier_nodes(graph)}
    assert [(u.index, u.node.name) for u in layer_units(graph)] == list(enumerate(gated))


def test_resnet_gateable_layers_exclude_stem_and_classifier() -> None:
    graph = _load("resnet8", input_size=8)
    names = [n.name for n in gateable_layers(graph)]
    assert "conv1" not in names and "fc" not in names
    assert len(names) == len(mac_nodes(graph)) - 2


# ------------------------------------------------------------------------------ torch exports
def _export(module: object, tmp_path: object, name: str) -> Graph:
    torch = pytest.importorskip("torch")
    from edgetrain import from_torch

    path = str(tmp_path / f"{name}.onnx")
    from_torch(module, torch.randn(1, 3, 32, 32), path)
    return load_graph(path)


def test_torch_resnet18_blocks(tmp_path) -> None:
    torch = pytest.importorskip("torch")
    from models.export_torch import torch_resnet18

    torch.manual_seed(0)
    graph = _export(torch_resnet18(num_classes=10, width=8), tmp_path, "resnet18")
    blocks = find_blocks(graph)
    assert len(blocks) == RESNET18_BLOCKS
    _check_block_invariants(graph, blocks)
    assert all(len(b.mac_nodes) == CONVS_PER_RESNET_BLOCK for b in blocks)
    projected = [b for b in blocks if b.shortcut]
    assert len(projected) == RESNET18_PROJECTIONS
    assert all(sum(n.op_type == "Conv" for n in b.shortcut) == 1 for b in projected)


def test_torch_mobilenetv2_blocks(tmp_path) -> None:
    torch = pytest.importorskip("torch")
    from models.export_torch import InvertedResidual, torch_mobilenetv2

    torch.manual_seed(0)
    module = torch_mobilenetv2(num_classes=10, width_mult=0.25)
    expected = sum(isinstance(m, InvertedResidual) and m.use_res_connect for m in module.modules())
    graph = _export(module, tmp_path, "mobilenetv2")
    blocks = find_blocks(graph)
    assert len(blocks) == expected > 0
    _check_block_invariants(graph, blocks)


# ------------------------------------------------------------------------------ hand-built graphs
class _Net:
    """A tiny ONNX graph built by hand; every activation has shape `shape`."""

    def __init__(self, inputs: tuple[str, ...] = ("x",), shape: list[int] = IMAGE) -> None:
        self.inputs, self.shape = inputs, shape
        self.nodes: list = []
        self.inits: list = []

    def op(self, op_type: str, *inputs: str, name: str) -> str:
        self.nodes.append(helper.make_node(op_type, list(inputs), [name], name=name))
        return name

    def init(self, name: str, value: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(value.astype(np.float32), name))
        return name

    def conv(self, x: str, name: str) -> str:
        """1x1 conv, C -> C."""
        return self.op("Conv", x, self.init(f"{name}.weight", np.ones((C, C, 1, 1))), name=name)

    def relu(self, x: str, name: str) -> str:
        return self.op("Relu", x, name=name)

    def load(self, *outputs: str) -> Graph:
        def info(n: str) -> object:
            return helper.make_tensor_value_info(n, TensorProto.FLOAT, self.shape)

        g = helper.make_graph(self.nodes, "t", [info(i) for i in self.inputs], [info(o) for o in outputs], self.inits)
        return load_graph(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))


def _residual(leak: bool = False) -> Graph:
    """stem -> [conv a -> relu r -> conv b] + identity -> head; with leak, r also feeds a Mul after the join."""
    net = _Net()
    s = net.relu(net.conv("x", "stem"), "s")
    b = net.conv(net.relu(net.conv(s, "a"), "r"), "b")
    j = net.op("Add", b, s, name="join")
    if leak:
        j = net.op("Mul", j, "r", name="leak")
    return net.load(net.conv(j, "head"))


def test_hand_built_residual_block() -> None:
    graph = _residual()
    [block] = find_blocks(graph)
    assert (block.fork, block.join.name, block.residual_input, block.shortcut_input) == ("s", "join", "b", "s")
    assert [n.name for n in block.branch] == ["a", "r", "b"]
    assert [n.name for n in block.mac_nodes] == ["a", "b"]
    assert describe_blocks(graph) == [{"index": 0, "fork": "s", "join": "join", "output": "join",
                                       "residual_input": "b", "shortcut_input": "s", "branch": ["a", "r", "b"],
                                       "shortcut": [], "macs": ["a", "b"]}]


def test_branch_value_consumed_outside_is_refused() -> None:
    assert find_blocks(_residual(leak=True)) == []


def test_branch_reading_a_value_from_before_the_fork_is_refused() -> None:
    net = _Net()
    s0 = net.conv("x", "stem")
    s = net.relu(s0, "s")
    b = net.conv(net.op("Mul", net.conv(s, "a"), s0, name="m"), "b")  # a second way into the branch
    assert find_blocks(net.load(net.conv(net.op("Add", b, s, name="join"), "head"))) == []


def test_add_of_two_independent_values_is_not_a_block() -> None:
    net = _Net(inputs=("x", "y"))
    j = net.op("Add", net.conv("x", "a"), net.conv("y", "b"), name="join")
    assert find_blocks(net.load(net.conv(j, "head"))) == []
    net = _Net(inputs=("x", "y"))
    assert find_blocks(net.load(net.conv(net.op("Add", "x", "y", name="join"), "head"))) == []


def test_bias_adds_are_not_blocks() -> None:
    net = _Net(shape=[1, 4])
    y = "x"
    for i in range(3):
        mm = net.op("MatMul", y, net.init(f"w{i}", np.eye(4)), name=f"mm{i}")
        y = net.relu(net.op("Add", mm, net.init(f"b{i}", np.arange(4.0)), name=f"bias{i}"), f"relu{i}")
    graph = net.load(y)
    assert find_blocks(graph) == []
    assert [n.name for n in gateable_layers(graph)] == ["mm1"]


def test_block_around_stem_or_classifier_is_refused() -> None:
    net = _Net()  # the branch holds the first MAC node
    j = net.op("Add", net.conv(net.conv("x", "a"), "b"), "x", name="join")
    assert find_blocks(net.load(net.conv(j, "head"))) == []
    net = _Net()  # the branch holds the classifier: no MAC node between it and the output
    s = net.conv("x", "stem")
    assert find_blocks(net.load(net.op("Add", net.conv(s, "a"), s, name="join"))) == []


def test_nested_blocks_keep_the_outer_most() -> None:
    net = _Net()
    s = net.relu(net.conv("x", "stem"), "s")
    a = net.conv(s, "a")
    inner = net.op("Add", net.conv(a, "ib"), a, name="inner")
    outer = net.op("Add", net.conv(inner, "c"), s, name="outer")
    graph = net.load(net.conv(outer, "head"))
    [block] = find_blocks(graph)
    assert block.join.name == "outer" and block.fork == "s"
    assert [n.name for n in block.branch] == ["a", "ib", "inner", "c"]
    assert [n.name for n in block.mac_nodes] == ["a", "ib", "c"]


def test_projection_shortcut_is_the_path_with_fewer_macs() -> None:
    net = _Net()
    s = net.relu(net.conv("x", "stem"), "s")
    j = net.op("Add", net.conv(s, "proj"), net.conv(net.conv(s, "a"), "b"), name="join")
    [block] = find_blocks(net.load(net.conv(j, "head")))
    assert (block.residual_input, block.shortcut_input) == ("b", "proj")
    assert [n.name for n in block.shortcut] == ["proj"]
