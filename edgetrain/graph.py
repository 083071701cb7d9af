"""The trainable graph: nodes in execution order, parameters, buffers and constants by name."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgetrain.batch_dim import BatchInfo


@dataclass
class Node:
    """One operation: its ONNX identity plus the op object that computes it."""

    name: str
    op_type: str
    inputs: list[str]  # "" marks an omitted optional input, as in ONNX
    outputs: list[str]
    attrs: dict[str, Any]
    op: Any = None  # an edgetrain.ops.Op, bound after import

    def __repr__(self) -> str:
        return f"Node({self.name!r}, {self.op_type}, {self.inputs} -> {self.outputs})"


@dataclass
class ValueInfo:
    """A graph input or output: its name, ONNX element type and shape (None for the free batch dim)."""

    name: str
    elem_type: int
    shape: tuple[int | None, ...]


@dataclass
class Graph:
    """An imported model, ready to execute: everything the engine needs and nothing from protobuf."""

    nodes: list[Node]
    inputs: list[ValueInfo]
    outputs: list[ValueInfo]
    params: dict[str, np.ndarray]  # trainable float initializers
    buffers: dict[str, np.ndarray]  # state updated by training but not by the optimizer (BN stats)
    constants: dict[str, np.ndarray]  # folded values and non-trainable initializers
    opset: int
    source: str = "<memory>"
    producer: str = ""
    original: Any = None  # the ModelProto as the user gave it, for export
    # Each value's shape as the importer inferred it (None: the free batch dimension, or a size ONNX shape
    # inference could not tell); initializers and folded constants included.
    shapes: dict[str, tuple[int | None, ...]] = field(default_factory=dict)
    batch: BatchInfo = field(default_factory=BatchInfo)  # whether the batch is free, and what pins it if not

    def producer_of(self) -> dict[str, Node]:
        """Map each computed value name to the node that writes it."""
        return {o: n for n in self.nodes for o in n.outputs if o}

    def consumers_of(self) -> dict[str, list[Node]]:
        """Map each value name to the nodes that read it, in graph order."""
        out: dict[str, list[Node]] = {}
        for n in self.nodes:
            for i in dict.fromkeys(i for i in n.inputs if i):
                out.setdefault(i, []).append(n)
        return out
