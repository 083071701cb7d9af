"""Small files that describe huge things: the bombs and lies the memory budget must refuse (edgetrain.limits).

Shared by the bad-input harness (tools/bad_inputs.py) and the budget's tests (tests/test_input_limits.py), so
both try the same bytes. Every builder returns a few hundred bytes at most; none allocates what it claims.
"""

from __future__ import annotations

import io
import struct
import zipfile

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["BIG", "bomb_model", "fold_bomb", "forged_npz", "huge_input_model", "idx", "npy_header"]

BIG = 1 << 20  # a side of the bombs: BIG x BIG float32 is 4 TiB


def bomb_model(nodes: list, inits: dict) -> onnx.ModelProto:
    """A model adding a constant `c`, computed by `nodes` from `inits`, to its input."""
    graph = helper.make_graph(
        nodes + [helper.make_node("Add", ["x", "c"], ["y"], name="add")], "bomb",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "M"])],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def fold_bomb() -> onnx.ModelProto:
    """The issue's ~150-byte model: ConstantOfShape of [2^20, 2^20] folds to 2^40 float32 (4 TiB)."""
    return bomb_model([helper.make_node("ConstantOfShape", ["s"], ["c"], name="bomb")],
                      {"s": np.array([BIG, BIG], np.int64)})


def huge_input_model() -> onnx.ModelProto:
    """A well-formed model whose declared input is [1, 3, 1e5, 1e5] (112 GiB for one sample)."""
    side = 100_000
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
         helper.make_node("GlobalAveragePool", ["c"], ["g"], name="gap"),
         helper.make_node("Flatten", ["g"], ["y"], name="flat")], "huge",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, side, side])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def npy_header(descr: str, shape: tuple[int, ...]) -> bytes:
    """A .npy version 1.0 header for an array of `descr` and `shape` (no data)."""
    text = "{'descr': '" + descr + "', 'fortran_order': False, 'shape': " + repr(shape) + ", }"
    text += " " * (63 - (10 + len(text)) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text.encode()


def forged_npz(n: int = 10**12) -> bytes:
    """~500 bytes: x.npy and y.npy whose headers, and the zip directory, claim n elements; 16 bytes follow."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, descr in (("x.npy", "<f4"), ("y.npy", "<i8")):
            head = npy_header(descr, (n,))
            zf.writestr(name, head + b"\0" * 16)
            zf.filelist[-1].file_size = len(head) + n * np.dtype(descr).itemsize
    return buffer.getvalue()


def idx(shape: tuple[int, ...], payload: bytes) -> bytes:
    """An MNIST IDX file of unsigned bytes: magic, the dimensions (big-endian u32), then `payload`."""
    magic = (0x08 << 8) | len(shape)
    return magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in shape) + payload
