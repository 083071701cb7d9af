"""Comparisons and boolean logic: bool outputs, no gradient (a mask is a constant of the loss)."""
from __future__ import annotations

import numpy as np

from edgetrain.ops.base import Op, register


class Logic(Op):
    """y = fn(inputs...) with numpy broadcasting, as bool; backward sends nothing."""

    fn = staticmethod(np.equal)

    def forward(self, inputs, run):
        return [np.asarray(self.fn(*inputs), dtype=bool)], len(inputs)

    def backward(self, ctx, grads, needed):
        return [None] * ctx


def _logic(op_type: str, fn) -> type[Logic]:
    cls = type(op_type, (Logic,), {"fn": staticmethod(fn), "__doc__": f"ONNX {op_type}: numpy's {fn.__name__}."})
    return register(op_type)(cls)


Equal = _logic("Equal", np.equal)
Less = _logic("Less", np.less)
Greater = _logic("Greater", np.greater)
LessOrEqual = _logic("LessOrEqual", np.less_equal)
GreaterOrEqual = _logic("GreaterOrEqual", np.greater_equal)
Not = _logic("Not", np.logical_not)
And = _logic("And", np.logical_and)
Or = _logic("Or", np.logical_or)
Xor = _logic("Xor", np.logical_xor)
IsNaN = _logic("IsNaN", np.isnan)
