"""The op interface: forward saves what backward needs; backward returns one gradient per input."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, NamedTuple

import numpy as np

from edgetrain.errors import ModelError
from edgetrain.graph import Node
from edgetrain.kernels import detfloat

OPS: dict[str, type[Op]] = {}


class Run(NamedTuple):
    """What a forward pass tells each op: whether it trains, and the key its random draws derive from.

    Ops are shared (every Model built from one Graph holds the same float op objects), so nothing of a
    run is ever stored on an op: it arrives here, and what backward needs of it goes into the context.
    """

    training: bool
    key: tuple[int, int] = (0, 0)  # (seed, step) of the run: stochastic rounding and dropout masks
    position: int = 0  # the node's index in its graph: its own stream of the run (a Dropout's mask)


def register(*op_types: str):
    """Class decorator: make an Op the implementation of these ONNX op types."""

    def wrap(cls: type[Op]) -> type[Op]:
        for t in op_types:
            OPS[t] = cls
        return cls

    return wrap


class Op:
    """Base class of every op: attribute parsing at import, forward and backward at run time."""

    op_type: ClassVar[str] = ""
    # False: outputs after the first are side outputs (indices, masks, statistics) that take no gradient,
    # and backward runs only when the first output has one. True (LSTM's Y, Y_h, Y_c): any may have one.
    all_outputs_differentiable: ClassVar[bool] = False
    # True: backward takes `owned`, one flag per output gradient, set where the executor hands that array
    # over for good (no other gradient, seed or view shares its memory): the op may write its result into it
    # instead of a new array, which saves the write-allocate read of a fresh one (a pass of memory traffic).
    reuses_grads: ClassVar[bool] = False

    def __init__(self, node: Node, opset: int):
        self.node = node
        self.opset = opset
        self.attrs = node.attrs

    def attr(self, name: str, default: Any = None) -> Any:
        """An attribute of the node, or the default the ONNX spec gives."""
        return self.attrs.get(name, default)

    def fail(self, what: str) -> ModelError:
        """An error that names this node."""
        return ModelError(f"node '{self.node.name}' ({self.node.op_type}): {what}")

    def forward(self, inputs: list[np.ndarray | None], run: Run) -> tuple[list[np.ndarray], Any]:
        """Compute the outputs; return them with the context backward will need."""
        raise NotImplementedError

    def backward(self, ctx: Any, grads: list[np.ndarray | None], needed: Sequence[bool]) -> list[np.ndarray | None]:
        """Given dL/d(outputs), return dL/d(inputs) (None where an input takes no gradient).

        needed[i] tells whether anyone wants input i's gradient: an op may skip that work (a MAC layer
        reading the data skips its error back-propagation) and return None there. An input's gradient may come
        back as `kernels.strided.Dilated` (a subsampling conv's: zero off the pixels it read); a caller that
        does not sum it in place takes `kernels.strided.dense` of it.
        """
        raise ModelError(f"node '{self.node.name}': {self.node.op_type} has no gradient")

    def buffer_updates(self, ctx: Any) -> dict[int, np.ndarray]:
        """New values for stateful inputs after a training forward (input position -> array)."""
        return {}

    def macs(self, in_shapes: list[tuple], out_shapes: list[tuple]) -> int:
        """Multiply-accumulates per forward pass (0 for ops without MAC work)."""
        return 0


class FusedAway(Op):
    """Stands in for a node whose work another op took over (a Relu folded into the BatchNorm before it
    or the MaxPool after it): passes its first input through, both ways."""

    def forward(self, inputs, run):
        return [inputs[0]], None

    def backward(self, ctx, grads, needed):
        return [grads[0]]


def unbroadcast(grad: np.ndarray, shape: tuple) -> np.ndarray:
    """Sum a gradient over the axes numpy broadcasting added or stretched, back to `shape`."""
    shape = tuple(shape)
    if grad.shape == shape:
        return grad
    extra = grad.ndim - len(shape)
    if extra > 0:
        grad = detfloat.op_sum(grad, tuple(range(extra)))
    axes = tuple(i for i, (g, s) in enumerate(zip(grad.shape, shape)) if s == 1 and g != 1)
    if axes:
        grad = detfloat.op_sum(grad, axes, keepdims=True)
    return grad.reshape(shape)
