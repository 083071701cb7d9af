"""Fixed-point tensors and quantisers of the integer engine (FracTrain's FW/BW precisions).

`quantize` turns a float tensor into a `QTensor` (integer q, float32 scale, bit-width, signedness)
with nearest or stochastic rounding; see `quantizer` for the conventions and `rng` for the
counter-based generator behind stochastic rounding.
"""
from edgetrain.quant.qtensor import MAX_BITS, QTensor, QuantStats, qrange, storage_dtype
from edgetrain.quant.quantizer import ROUNDINGS, RunningRange, channel_range, compute_scale, quantize, scale_from_range
from edgetrain.quant.rng import RngKey, random_bits, stream_seed, uniform

__all__ = [
    "QTensor", "qrange", "storage_dtype", "MAX_BITS",
    "quantize", "QuantStats", "RunningRange", "channel_range", "compute_scale", "scale_from_range", "ROUNDINGS",
    "RngKey", "random_bits", "uniform", "stream_seed",
]
