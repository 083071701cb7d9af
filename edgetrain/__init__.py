"""edgetrain: fine-tune ONNX models on small devices with integer fixed-point training."""
from edgetrain.errors import DataError, EdgetrainError, ModelError
from edgetrain.model import Model, load

__version__ = "0.1.0"
__all__ = ["load", "Model", "EdgetrainError", "ModelError", "DataError", "__version__"]
