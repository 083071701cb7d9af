"""Every op the engine runs, registered by ONNX op type in OPS."""
from edgetrain.ops import (  # noqa: F401  (registration side effects)
    binary,
    conv,
    conv_transpose,
    einsum,
    elementwise,
    layernorm,
    linear,
    logic,
    movement,
    norm,
    pool,
    qdq,
    reduce,
    resize,
    rnn,
    shape,
    unary,
)
from edgetrain.ops.base import OPS, Op, Run, register, unbroadcast

# Ops the importer evaluates away and never runs: their values are fixed at load time.
FOLDED_AT_IMPORT = frozenset({"Constant"})

# The MAC-bearing ops: the ones the integer engine quantises and cost accounting counts.
MAC_OPS = frozenset({"Conv", "Gemm", "MatMul", "LSTM", "GRU"})

SUPPORTED = frozenset(OPS) | FOLDED_AT_IMPORT

# Ops that only move values (data input positions; None: every input): a weight sliced, reordered and
# stacked through them (torch's LSTM/GRU export, nn.MultiheadAttention's in_proj_weight) is still the same
# parameter, trained through their backward.
DATA_MOVEMENT_OPS = {"Slice": (0,), "Unsqueeze": (0,), "Squeeze": (0,), "Reshape": (0,), "Transpose": (0,),
                     "Identity": (0,), "Flatten": (0,), "Gather": (0,), "Split": (0,), "Cast": (0,),
                     "Expand": (0,), "Tile": (0,), "Concat": None}

__all__ = ["OPS", "Op", "Run", "register", "unbroadcast", "SUPPORTED", "MAC_OPS", "FOLDED_AT_IMPORT",
           "DATA_MOVEMENT_OPS"]
