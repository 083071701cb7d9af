"""Model summary for `edgetrain info`: layers, shapes, parameters, MACs, quantisation plan."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np

from edgetrain.bn_audit import folded_batchnorm_message, training_mode_message
from edgetrain.errors import ModelError
from edgetrain.layers import classifier_nodes, mac_nodes
from edgetrain.model import Model
from edgetrain.precision.dfq.controller import DFQ
from edgetrain.precision.dfq.units import gating_plan
from edgetrain.precision.spec import PrecisionConfig
from edgetrain.preprocess import read_metadata
from edgetrain.quant.mac import float_reason, integer_form
from edgetrain.train.config import help_text


@dataclass
class LayerInfo:
    """One node of the summary."""

    name: str
    op_type: str
    output_shape: list
    params: int
    macs: int  # per sample
    precision: str  # "int" (quantised by default), "fp32 (classifier)", "fp32", or "-" for ops without MACs


# Ops that only move or reshape values: nothing to compute in float or in integers.
_LAYOUT_OPS = frozenset({"Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Concat", "Identity", "Shape",
                         "Gather", "Slice", "Cast", "CastLike", "Split", "Expand", "Tile", "ConstantOfShape", "Pad"})


def _pretty(shape) -> str:
    return "(" + ", ".join("N" if d is None else str(d) for d in shape) + ")"


def summarize(model: Model) -> dict:
    """Describe every layer of the imported graph (also inside DFQ's gated blocks), for one sample."""
    graph = model.graph

    def shape_of(name: str) -> tuple[int, ...]:
        """A value's shape as the importer inferred it, for a batch of one."""
        if name not in graph.shapes:
            raise ModelError(f"{graph.source}: the shape of '{name}' is unknown after shape inference")
        # the batch need not be axis 0 (an LSTM's Y is (T, D, N, H)), and a value computed from the batch
        # size (torch's zero initial state of an LSTM) has every dimension free
        return tuple(1 if d is None else d for d in graph.shapes[name])

    # The plan set_precision("8/8") would follow: its defaults, and only layers an integer kernel can run.
    plan = PrecisionConfig.make("8/8").resolve(graph)
    quantised = {n.name for n in mac_nodes(graph) if not plan[n.name].is_float and integer_form(n, graph.params)}
    classifier = {n.name for n in classifier_nodes(graph)}
    macs = {n.name for n in mac_nodes(graph)}
    # Why each MAC layer stays fp32 under an integer schedule; every other computing op is float anyway.
    float_layers = [{"name": n.name, "op_type": n.op_type,
                     "reason": "classifier: fp32 by FracTrain's default (setting quantize_classifier)"
                     if n.name in classifier and integer_form(n, graph.params) else float_reason(n, graph.params)}
                    for n in mac_nodes(graph) if n.name not in quantised]
    float_ops = list(dict.fromkeys(n.op_type for n in graph.nodes if n.name not in macs
                                   and n.op_type not in _LAYOUT_OPS))
    layers = []
    batch_free = {vi.name for vi in graph.inputs if vi.shape and vi.shape[0] is None}
    for node in graph.nodes:
        in_shapes = [shape_of(i) if i else () for i in node.inputs]
        out_shapes = [shape_of(o) for o in node.outputs if o]
        params = sum(int(np.prod(graph.params[i].shape)) for i in node.inputs if i in graph.params)
        precision = ("int" if node.name in quantised else "fp32 (classifier)" if node.name in classifier
                     else "fp32" if node.name in macs else "-")
        shape = list(out_shapes[0]) if out_shapes else []
        if batch_free and shape:
            first = next(o for o in node.outputs if o)
            shape = [None if d is None else s for d, s in zip(graph.shapes[first], shape)]
        # Op.macs counts per index of the first output's axis 0 (what the Model multiplies by)
        per_sample = node.op.macs(in_shapes, out_shapes) * int(np.prod(out_shapes[0][:1])) if out_shapes else 0
        layers.append(LayerInfo(node.name, node.op_type, shape, params, per_sample, precision))
    return {
        "source": graph.source,
        "producer": graph.producer,
        "opset": graph.opset,
        "inputs": [{"name": v.name, "shape": list(v.shape)} for v in graph.inputs],
        "batch": {"free": graph.batch.free, "exported": graph.batch.exported,
                  "pinned_by": graph.batch.pinned_by or None, "summary": graph.batch.describe()},
        "outputs": [{"name": v.name, "shape": list(shape_of(v.name)[1:])} for v in graph.outputs],
        "parameters": int(sum(p.size for p in graph.params.values())),
        "buffers": int(sum(b.size for b in graph.buffers.values())),
        "macs_per_sample": int(sum(layer.macs for layer in layers)),
        "quantised_layers": sorted(quantised, key=[n.name for n in graph.nodes].index),
        "float_layers": float_layers,
        "float_ops": float_ops,
        "layers": [asdict(layer) for layer in layers],
        # With gates (a dfq/fractrain checkpoint): what they are; without: what DFQ would gate.
        "dfq": {**dfq.describe(), "target": dfq.target} if (dfq := DFQ.of(model)) is not None else gating_plan(graph),
        # what the user should know before training or serving this model (edgetrain.bn_audit)
        "warnings": [m for m in (training_mode_message(graph), folded_batchnorm_message(graph)) if m],
        "preprocess": read_metadata(graph.original),
    }


def format_table(summary: dict) -> str:
    """The summary as a human-readable table."""
    rows = [("layer", "op", "output", "params", "MACs/sample", "precision")]
    for layer in summary["layers"]:
        rows.append((layer["name"], layer["op_type"], _pretty(layer["output_shape"]), f"{layer['params']:,}",
                     f"{layer['macs']:,}" if layer["macs"] else "", layer["precision"]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [f"model: {summary['source']}  (opset {summary['opset']}" +
             (f", from {summary['producer']}" if summary["producer"] else "") + ")"]
    for vi in summary["inputs"]:
        lines.append(f"input:  {vi['name']} {_pretty(vi['shape'])}")
    lines.append(f"batch:  {summary['batch']['summary']}")
    lines.append("")
    for i, r in enumerate(rows):
        lines.append("  ".join(c.ljust(w) if j < 3 or j == 5 else c.rjust(w)
                               for j, (c, w) in enumerate(zip(r, widths))).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    n_int = len(summary["quantised_layers"])
    lines += ["", f"parameters: {summary['parameters']:,}   buffers: {summary['buffers']:,}   "
                  f"MACs per sample: {summary['macs_per_sample']:,}",
              f"integer engine quantises {n_int} layer{'s' if n_int != 1 else ''}"
              + ("; these MAC layers stay fp32:" if summary["float_layers"] else "")]
    lines += [f"  {f['name']} ({f['op_type']}): {f['reason']}" for f in summary["float_layers"]]
    if summary["float_ops"]:
        lines.append("other ops compute in float32 (BatchNorm, normalisations, softmax, activations): "
                     + ", ".join(summary["float_ops"]))
    lines += _dfq_lines(summary["dfq"])
    if summary.get("preprocess"):
        p = summary["preprocess"]
        lines.append(f"input preprocessing ({p.get('applied')}): {json.dumps(p.get('normalize'))}")
    lines += [f"warning: {w}" for w in summary.get("warnings", [])]
    if "checkpoint" in summary:
        lines += _run_lines(summary["checkpoint"])
    return "\n".join(lines)


def _run_lines(checkpoint: dict) -> list[str]:
    """A trained run's checkpoint and the settings it chose, each with its help (edgetrain.train.config)."""
    settings = checkpoint["settings"]
    lines = ["", f"checkpoint {checkpoint['path']} at step {checkpoint['step']}; "
                 + ("settings not at their default:" if settings else "every setting at its default")]
    width = max((len(name) for name in settings), default=0)
    for name, value in settings.items():
        lines.append(f"  {name.ljust(width)}  {json.dumps(value)}  ({help_text(name)})")
    return lines


def _dfq_lines(dfq: dict) -> list[str]:
    units = dfq["units"]
    if "settings" not in dfq:
        what = "residual blocks" if dfq["kind"] == "blocks" else "layers (no residual blocks: no skipping)"
        return [f"DFQ would gate {len(units)} {what}: " + ", ".join(u["name"] for u in units)]
    s = dfq["settings"]
    lines = ["", f"DFQ gates ({dfq['gate_parameters']} tensors), cost target {dfq['target']:g}% of fp32, "
                 f"weights {s['weight_bits']} bits, candidates {', '.join(s['candidates'])}:"]
    for u in units:
        costs = dfq["candidate_percent"][u["name"]]
        lines.append(f"  {u['name']}: {', '.join(u['layers'])}  ({u['macs_per_sample']:,} MACs/sample; "
                     + ", ".join(f"{k} {v:.2f}%" for k, v in costs.items()) + ")")
    return lines
