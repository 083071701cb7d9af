"""BatchNorms an exporter left in a state users should know about: ONNX training mode, or folded away.

torch's `TrainingMode.TRAINING` export writes BatchNormalization with `training_mode=1` (batch statistics
at inference, extra running-statistics outputs); torch's dynamo exporter folds eval-mode BatchNorms into
the preceding convolutions, leaving nothing to train but the Conv weights and biases.
"""
from __future__ import annotations

import warnings

import onnx

from edgetrain.graph import Graph

FOLDED_MIN_OPSET = 18  # torch's dynamo exporter writes opset 18 or newer; the TorchScript one defaults lower
NORMALIZATION_OPS = frozenset({"BatchNormalization", "LayerNormalization", "GroupNormalization",
                               "InstanceNormalization"})
NAMES_SHOWN = 5  # names listed in a one-line message before "and N more"


class ModelWarning(UserWarning):
    """Something about an imported model the user should know before training or serving it."""


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:NAMES_SHOWN])
    return shown + (f" and {len(names) - NAMES_SHOWN} more" if len(names) > NAMES_SHOWN else "")


def training_mode_batchnorms(graph: Graph) -> list[str]:
    """Names of the BatchNormalization nodes that ask for ONNX training mode (training_mode=1)."""
    return [n.name for n in graph.nodes if n.op_type == "BatchNormalization" and int(n.attrs.get("training_mode", 0))]


def training_mode_message(graph: Graph) -> str | None:
    """The one line reporting training-mode BatchNorms, or None."""
    names = training_mode_batchnorms(graph)
    if not names:
        return None
    one = len(names) == 1
    return (f"{len(names)} BatchNormalization node{'' if one else 's'} carr{'ies' if one else 'y'} training_mode=1 "
            f"(a torch TrainingMode.TRAINING export): {_names(names)}; {'its' if one else 'their'} eval forward "
            f"uses batch statistics, and `edgetrain export` writes {'it' if one else 'them'} as inference "
            f"BatchNorm{'' if one else 's'}")


def folded_batchnorm_message(graph: Graph) -> str | None:
    """A warning when the exporter seems to have folded BatchNorms into convolutions (a heuristic), else None.

    The heuristic: no BatchNormalization (nor another normalisation: a LayerNorm model such as a ViT or
    ConvNeXt never had BatchNorms), Conv nodes with a bias, producer "pytorch", opset >= 18 (torch's dynamo
    exporter, whose default folds eval-mode BatchNorms). A BatchNorm-free CNN exported by dynamo matches too.
    """
    if any(n.op_type in NORMALIZATION_OPS for n in graph.nodes):
        return None
    if not graph.producer.lower().startswith("pytorch") or graph.opset < FOLDED_MIN_OPSET:
        return None
    convs = [n.name for n in graph.nodes if n.op_type == "Conv" and len(n.inputs) > 2 and n.inputs[2]]
    if not convs:
        return None
    return (f"this looks like a torch dynamo export with BatchNorms folded into the convolutions (a heuristic: "
            f"producer pytorch, opset {graph.opset}, no BatchNormalization, {len(convs)} Conv with bias): "
            f"BatchNorm scale, shift and running statistics can no longer be trained, only the folded Conv "
            f"weights and biases ({_names(convs)}); re-export with edgetrain.from_torch, or torch.onnx.export(..., "
            "optimize=False), to keep them")


def warn_at_import(graph: Graph) -> None:
    """Emit a ModelWarning for training-mode BatchNorms (called by the importer on every load)."""
    message = training_mode_message(graph)
    if message is not None:
        warnings.warn(f"{graph.source}: {message}", ModelWarning, stacklevel=3)


def as_inference_batchnorms(proto: onnx.ModelProto) -> list[str]:
    """Rewrite training-mode BatchNorms in place as inference ones (attribute removed, extra outputs
    dropped); returns their names. An extra output another node reads cannot be dropped: ValueError."""
    g = proto.graph
    read = {i for n in g.node for i in n.input}
    changed = []
    for node in g.node:
        if node.op_type != "BatchNormalization":
            continue
        modes = [a for a in node.attribute if a.name == "training_mode"]
        if not modes or not onnx.helper.get_attribute_value(modes[0]):
            continue
        extra = [o for o in node.output[1:] if o]
        if used := [o for o in extra if o in read]:
            raise ValueError(f"BatchNormalization '{node.name}': its training outputs {used} are read by other "
                             "nodes, so it cannot be written as an inference BatchNorm")
        node.attribute.remove(modes[0])
        del node.output[1:]
        for field in (g.output, g.value_info):
            for i in reversed(range(len(field))):
                if field[i].name in extra:
                    del field[i]
        changed.append(node.name)
    return changed
