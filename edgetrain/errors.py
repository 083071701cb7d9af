"""User-facing errors: one line that names the file, node or field and what is wrong."""


class EdgetrainError(Exception):
    """A mistake in what the user gave us; the CLI prints it as one line and exits 2."""


class ModelError(EdgetrainError):
    """The ONNX file cannot be loaded or trained as it stands."""


class DataError(EdgetrainError):
    """A data file is missing, corrupt, or does not fit the model."""
