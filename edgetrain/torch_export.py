"""PyTorch modules to ONNX files edgetrain trains: `edgetrain.from_torch(module, example, path)`.

PyTorch is an optional extra (`pip install 'edgetrain[torch]'`): it is imported when `from_torch` runs, never
by `import edgetrain`.
"""

from __future__ import annotations

import io
import os
import warnings
from typing import TYPE_CHECKING

from edgetrain.fileio import write_atomic

if TYPE_CHECKING:
    import torch

OPSET = 17
BATCH_DIM = "N"
INPUT_NAME = "input"
OUTPUT_NAME = "logits"


def from_torch(
    module: torch.nn.Module,
    example: torch.Tensor,
    path: str | os.PathLike[str],
    *,
    opset: int = OPSET,
    dynamic_batch: bool = True,
) -> None:
    """Export module (in eval mode) to an ONNX file at path with input "input", output "logits".

    Constant folding stays off: with it, torch fuses each BatchNorm into the conv before it, and the
    exported model could no longer train BatchNorm or keep torch's parameter names (`state_dict()` keys).
    The module's training flag is restored afterwards.
    """
    try:
        import torch
    except ImportError:
        raise ImportError("edgetrain.from_torch needs PyTorch: pip install 'edgetrain[torch]'") from None
    was_training = module.training
    module.eval()
    buffer = io.BytesIO()
    dynamic_axes = {INPUT_NAME: {0: BATCH_DIM}, OUTPUT_NAME: {0: BATCH_DIM}} if dynamic_batch else None
    try:
        with warnings.catch_warnings(), torch.no_grad():
            # The TorchScript exporter is deprecated but is the one that needs no onnxscript.
            warnings.simplefilter("ignore", DeprecationWarning)
            # torch warns that an LSTM/GRU exported at batch > 1 may fail at another batch; its initial
            # state is built from the input's shape, so it does not (tests/test_rnn.py runs batch 7)
            warnings.filterwarnings("ignore", message="Exporting a model to ONNX with a batch_size other than 1")
            torch.onnx.export(
                module,
                (example,),
                buffer,
                dynamo=False,
                opset_version=opset,
                do_constant_folding=False,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes=dynamic_axes,
            )
    finally:
        module.train(was_training)
    write_atomic(path, buffer.getvalue())
