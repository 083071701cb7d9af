"""edgetrain: fine-tune ONNX models on small devices with integer fixed-point training."""
from edgetrain.errors import DataError, EdgetrainError, ModelError, ResourceLimitError
from edgetrain.model import Model, load
from edgetrain.torch_export import from_torch

__version__ = "0.1.0"
__all__ = ["load", "from_torch", "Model", "EdgetrainError", "ModelError", "DataError", "ResourceLimitError",
           "__version__"]
