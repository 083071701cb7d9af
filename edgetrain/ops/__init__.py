"""Every op the engine runs, registered by ONNX op type in OPS."""
from edgetrain.ops import conv, elementwise, linear, norm, pool, rnn, shape  # noqa: F401  (registration side effects)
from edgetrain.ops.base import OPS, Op, Run, register, unbroadcast

# Ops the importer evaluates away and never runs: their values are fixed at load time.
FOLDED_AT_IMPORT = frozenset({"Constant"})

# The MAC-bearing ops: the ones the integer engine quantises and cost accounting counts.
MAC_OPS = frozenset({"Conv", "Gemm", "MatMul", "LSTM", "GRU"})

SUPPORTED = frozenset(OPS) | FOLDED_AT_IMPORT

__all__ = ["OPS", "Op", "Run", "register", "unbroadcast", "SUPPORTED", "MAC_OPS", "FOLDED_AT_IMPORT"]
