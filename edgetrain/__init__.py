"""edgetrain: fine-tune ONNX models on small devices with integer fixed-point training."""
from edgetrain import numba_caches

numba_caches.refresh()  # before any module Numba compiles is imported: numba_caches says why

from edgetrain.errors import DataError, EdgetrainError, ModelError, ResourceLimitError  # noqa: E402
from edgetrain.model import Model, load  # noqa: E402
from edgetrain.torch_export import from_torch  # noqa: E402

__version__ = "0.1.0"
__all__ = ["load", "from_torch", "Model", "EdgetrainError", "ModelError", "DataError", "ResourceLimitError",
           "__version__"]
