"""The input preprocessing a run applied (per-channel normalisation), recorded with the run and written into
its ONNX export, so the deployed model takes what the sensor gives.

Modes of `edgetrain export --preprocess`:
- graph: Sub and Div nodes by per-channel constants lead the graph; the graph input keeps its name and
  takes raw input. The metadata key says so, and `edgetrain train/eval` then leave the data raw.
- metadata: the graph is unchanged (normalised input); metadata_props carry mean/std for the serving stack.
- none: neither.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from edgetrain.errors import ModelError

METADATA_KEY = "edgetrain.preprocess"
MODES = ("graph", "metadata", "none")
DEFAULT_MODE = "graph"
NODE_PREFIX = "edgetrain_preprocess/"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Preprocess:
    """x_model = (x_raw - mean) / std per channel (axis 1; flat (N, D) vectors are one channel)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def of_dataset(cls, dataset: Any) -> Preprocess | None:
        """What the data pipeline applied to a Dataset (its recorded mean/std), or None if nothing."""
        mean, std = tuple(float(m) for m in dataset.mean), tuple(float(s) for s in dataset.std)
        if all(m == 0.0 for m in mean) and all(s == 1.0 for s in std):
            return None
        return cls(mean, std)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form stored in checkpoints and metadata."""
        return {"version": FORMAT_VERSION, "normalize": {"mean": list(self.mean), "std": list(self.std), "axis": 1}}

    @classmethod
    def from_dict(cls, where: str, d: Mapping[str, Any]) -> Preprocess:
        """Read to_dict's form back; a malformed one is a one-line ModelError naming where it came from."""
        try:
            norm = d["normalize"]
            mean, std = tuple(float(m) for m in norm["mean"]), tuple(float(s) for s in norm["std"])
        except (KeyError, TypeError, ValueError):
            raise ModelError(f"{where}: malformed preprocessing record {dict(d)!r}") from None
        if len(mean) != len(std) or not mean or any(s <= 0.0 for s in std):
            raise ModelError(f"{where}: preprocessing needs as many positive stds as means, got {mean} / {std}")
        return cls(mean, std)

    def apply(self, x: np.ndarray) -> np.ndarray:
        """Normalise raw x as the data pipeline does (float32 subtract, then divide)."""
        shape = (1, len(self.mean)) + (1,) * (x.ndim - 2)
        return (x - np.asarray(self.mean, np.float32).reshape(shape)) / np.asarray(self.std, np.float32).reshape(shape)


def read_metadata(proto: onnx.ModelProto) -> dict[str, Any] | None:
    """The model's edgetrain preprocessing metadata (with 'applied': 'graph' or 'metadata'), or None."""
    for prop in proto.metadata_props:
        if prop.key == METADATA_KEY:
            try:
                value = json.loads(prop.value)
            except json.JSONDecodeError:
                raise ModelError(f"model metadata {METADATA_KEY} is not JSON: {prop.value[:80]!r}") from None
            return value if isinstance(value, dict) else None
    return None


def normalizes_in_graph(proto: onnx.ModelProto) -> bool:
    """True when the model itself normalises its input (an export with --preprocess graph): feed it raw data."""
    meta = read_metadata(proto)
    return meta is not None and meta.get("applied") == "graph"


def _set_metadata(proto: onnx.ModelProto, value: dict[str, Any]) -> None:
    for i in reversed(range(len(proto.metadata_props))):
        if proto.metadata_props[i].key == METADATA_KEY:
            del proto.metadata_props[i]
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(value, sort_keys=True)


def _rename_reads(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Every read of `old` (also inside If/Loop bodies, which see outer values) now reads `new`."""
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new
        for attr in node.attribute:
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                if not any(v.name == old for v in sub.input):  # a body input of that name shadows ours
                    _rename_reads(sub, old, new)


def embed(proto: onnx.ModelProto, pre: Preprocess | None, mode: str = DEFAULT_MODE) -> onnx.ModelProto:
    """Return a copy of proto with pre written in as `mode` says (graph, metadata or none)."""
    if mode not in MODES:
        raise ModelError(f"unknown preprocessing mode {mode!r} (valid: {', '.join(MODES)})")
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    if pre is None or mode == "none":
        return out
    if normalizes_in_graph(proto):
        raise ModelError("the model already normalises its input in the graph; "
                         "its run should not have normalised the data again")
    g = out.graph
    inits = {t.name for t in g.initializer}
    inputs = [v for v in g.input if v.name not in inits]
    if len(inputs) != 1:
        raise ModelError(f"preprocessing needs a model with one data input, this one has {len(inputs)}; "
                         "export with --preprocess none")
    vi = inputs[0]
    dims = vi.type.tensor_type.shape.dim
    channels = len(pre.mean)
    if len(dims) < 2 or (dims[1].HasField("dim_value") and channels != 1 and dims[1].dim_value != channels):
        raise ModelError(f"input '{vi.name}' has no channel axis of size {channels} for the recorded normalisation")
    meta = {**pre.to_dict(), "applied": mode, "input": vi.name}
    if mode == "graph":
        dtype = onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
        shape = (1, channels) + (1,) * (len(dims) - 2)
        mean_name, std_name = NODE_PREFIX + "mean", NODE_PREFIX + "std"
        centred, normalised = NODE_PREFIX + "centred", NODE_PREFIX + vi.name
        _rename_reads(g, vi.name, normalised)
        for o in g.output:
            if o.name == vi.name:
                raise ModelError(f"input '{vi.name}' is also a graph output; export with --preprocess metadata")
        g.initializer.extend([numpy_helper.from_array(np.asarray(pre.mean, np.float32).astype(dtype).reshape(shape),
                                                      mean_name),
                              numpy_helper.from_array(np.asarray(pre.std, np.float32).astype(dtype).reshape(shape),
                                                      std_name)])
        # Sub then Div in the input's type: the same float32 operations the data pipeline applies, so the
        # exported model on raw input computes bit for bit what the run saw.
        lead = [onnx.helper.make_node("Sub", [vi.name, mean_name], [centred], name=NODE_PREFIX + "sub"),
                onnx.helper.make_node("Div", [centred, std_name], [normalised], name=NODE_PREFIX + "div")]
        nodes = lead + list(g.node)
        del g.node[:]
        g.node.extend(nodes)  # extend copies each message, as the importer's reordering relies on
    _set_metadata(out, meta)
    onnx.checker.check_model(out)
    return out


def record(pre: Preprocess | None) -> dict[str, Any] | None:
    """The checkpoint-metadata form of a run's preprocessing (None: the data was not normalised)."""
    return None if pre is None else pre.to_dict()


def from_record(where: str, value: Any) -> Preprocess | None:
    """Read record()'s form back from a checkpoint's metadata."""
    return None if value is None else Preprocess.from_dict(where, value)


def describe(pre: Preprocess | None) -> str:
    """One line for people: what the exported model applies to its raw input."""
    if pre is None:
        return "none"
    fmt = ", ".join
    return f"(x - [{fmt(f'{m:.4g}' for m in pre.mean)}]) / [{fmt(f'{s:.4g}' for s in pre.std)}] per channel"


def check_no_double(normalizes: bool, datasets: Sequence[Any]) -> str | None:
    """A warning when a model that normalises its own input is given normalised data, else None."""
    if normalizes and any(Preprocess.of_dataset(d) is not None for d in datasets):
        return ("the model normalises its input in the graph (an edgetrain export) but the data is normalised "
                "too; load the data with normalize=False")
    return None
