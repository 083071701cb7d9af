"""PyTorch modules to ONNX files edgetrain trains: `edgetrain.from_torch(module, example, path)`.

PyTorch is an optional extra (`pip install 'edgetrain[torch]'`): it is imported when `from_torch` runs, never
by `import edgetrain`.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from typing import TYPE_CHECKING

from edgetrain.fileio import write_atomic

if TYPE_CHECKING:
    import torch

OPSET = 17
DYNAMO_OPSET = 20  # the dynamo exporter's own default; it writes Gelu (opset 20) for nn.GELU
BATCH_DIM = "N"
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
EXPORTERS = ("torchscript", "dynamo")


def from_torch(
    module: torch.nn.Module,
    example: torch.Tensor,
    path: str | os.PathLike[str],
    *,
    opset: int | None = None,
    dynamic_batch: bool = True,
    exporter: str = "torchscript",
) -> None:
    """Export module (in eval mode) to an ONNX file at path with input "input", output "logits".

    The settings are the ones training needs, with either of torch's exporters:
    - BatchNorm kept: constant folding (TorchScript) and the graph optimiser (dynamo) would fuse each
      BatchNorm into the conv before it, leaving no BatchNorm to train and no running statistics to update;
    - parameter names as in `state_dict()`, so checkpoints and exports map back to the module;
    - a dynamic batch dimension (dim 0 of the input and output) unless `dynamic_batch=False`;
    - attention's fast path off: `nn.MultiheadAttention` in eval mode under no_grad takes a fused kernel
      no exporter can write, so the export runs with autograd on (nothing is trained by it).
    `exporter="dynamo"` uses torch.export (needs onnxscript); opset defaults to 17 for TorchScript and 20 for
    dynamo. The module's training flag is restored afterwards.
    """
    try:
        import torch
    except ImportError:
        raise ImportError("edgetrain.from_torch needs PyTorch: pip install 'edgetrain[torch]'") from None
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {', '.join(EXPORTERS)}, not {exporter!r}")
    was_training = module.training
    module.eval()
    try:
        with warnings.catch_warnings(), torch.enable_grad(), _no_attention_fast_path(torch):
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)  # torch.export's own pytree deprecations
            # torch warns that an LSTM/GRU exported at batch > 1 may fail at another batch; its initial
            # state is built from the input's shape, so it does not (tests/test_rnn.py runs batch 7)
            warnings.filterwarnings("ignore", message="Exporting a model to ONNX with a batch_size other than 1")
            if exporter == "dynamo":
                data = _export_dynamo(torch, module, example, opset or DYNAMO_OPSET, dynamic_batch)
            else:
                data = _export_torchscript(torch, module, example, opset or OPSET, dynamic_batch)
    finally:
        module.train(was_training)
    write_atomic(path, data)


def _export_torchscript(torch, module, example, opset: int, dynamic_batch: bool) -> bytes:
    buffer = io.BytesIO()
    dynamic_axes = {INPUT_NAME: {0: BATCH_DIM}, OUTPUT_NAME: {0: BATCH_DIM}} if dynamic_batch else None
    torch.onnx.export(module, (example,), buffer, dynamo=False, opset_version=opset, do_constant_folding=False,
                      input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], dynamic_axes=dynamic_axes)
    return buffer.getvalue()


def _export_dynamo(torch, module, example, opset: int, dynamic_batch: bool) -> bytes:
    try:
        import onnxscript  # noqa: F401  (torch's dynamo exporter is built on it)
    except ImportError:
        raise ImportError("exporter='dynamo' needs onnxscript: pip install 'edgetrain[torch]'") from None
    shapes = ({0: torch.export.Dim(BATCH_DIM, min=1)},) if dynamic_batch else None
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # it logs each torchvision op it cannot find, and every pass it runs
    try:
        program = torch.onnx.export(module, (example,), dynamo=True, opset_version=opset, optimize=False,
                                    dynamic_shapes=shapes, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                    verbose=False)
    finally:
        quiet.setLevel(level)
    return program.model_proto.SerializeToString()


@contextlib.contextmanager
def _no_attention_fast_path(torch):
    """Turn off nn.MultiheadAttention's fused eval path (torch.backends.mha) for the export."""
    mha = getattr(torch.backends, "mha", None)
    if mha is None or not hasattr(mha, "set_fastpath_enabled"):
        yield
        return
    before = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(before)
