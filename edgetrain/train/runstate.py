"""A run's model and state beyond its tensors: building the model a config names, packing what a
checkpoint needs for a bit-identical resume, and reopening a finished run for eval and export.

Besides parameters, buffers and optimizer state, a checkpoint's controller part holds, under flat keys:

    controller/<key>        the precision controller's own state (arrays and scalars)
    controller_json/<key>   ... and its lists, dicts and None, as JSON text
    trainer/precision       the precision spec in force (JSON), re-applied on resume
    trainer/elapsed         training seconds so far (the log's wall time continues from it)
    trainer/last_loss       the loss the controller saw last
    act_range/<layer>       the running activation range eval quantises with
    saturated/<layer>       clipped elements so far
    cost/<field>            the BitOPs meter (decimal strings: totals can outgrow 64 bits)
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgetrain.errors import EdgetrainError, ModelError
from edgetrain.model import Model
from edgetrain.onnx_import import Importer, read_onnx
from edgetrain.precision.control import PrecisionSpec
from edgetrain.precision.dfq.controller import DFQ
from edgetrain.quant.mac import RUNTIME_SETTINGS
from edgetrain.train.checkpoint import (
    Checkpoint,
    CheckpointError,
    CorruptCheckpointWarning,
    find_latest,
    load_checkpoint,
)
from edgetrain.train.config import DYNAMIC_SCHEDULES, TrainConfig, dfq_config, from_checkpoint_dict
from edgetrain.train.finetune import head_parameter_names, new_head

CONTROLLER, TRAINER, ACT_RANGE, SATURATED, COST = "controller/", "trainer/", "act_range/", "saturated/", "cost/"
CONTROLLER_JSON = "controller_json/"
PLAIN_TYPES = (np.ndarray, np.generic, bool, int, float, str)  # what a checkpoint stores as it is
COST_PER_LAYER = COST + "per_layer/"
PRECISION = "precision"  # trainer/precision: JSON of the spec in force
PENDING_AIM = "pending_aim"  # trainer/pending_aim: FracTrain's target the next step points the gates at
COST_FIELDS = ("steps", "bitops", "fp32_bitops")


def build_model(path: str, seed: int, num_classes: int | None) -> tuple[Model, list[str]]:
    """Load the ONNX file (with a fresh head for num_classes, if given); returns the model and the head's names."""
    proto = read_onnx(path)
    head: list[str] = []
    if num_classes is not None:
        try:
            proto = new_head(proto, num_classes, seed)
        except ModelError as exc:
            raise ModelError(f"{path}: {exc}") from None
        head = head_parameter_names(proto)
    return Model(Importer(proto, path).run(), seed=seed), head


def output_classes(model: Model) -> int | None:
    """Width of the first output's last axis (the class count of a classifier), if fixed."""
    shape = model.graph.outputs[0].shape
    return shape[-1] if shape and isinstance(shape[-1], int) else None


def prepare_model(model: Model, config: TrainConfig) -> None:
    """What a schedule adds to the imported model before training or loading its state: DFQ's gates, and the
    deterministic float mode of an fp32 run that asked for it (integer schedules have it always)."""
    model.deterministic = bool(config.deterministic)
    if config.schedule in DYNAMIC_SCHEDULES and DFQ.of(model) is None:
        dfq = DFQ.attach(model, dfq_config(config))
        # Price every stage's gradient bits now: a measured cost table without them fails before training, not at
        # the switch hours in.
        for bits in sorted(set(config.fractrain_grad_bits or ())):
            dfq.set_grad_bits(bits or None)
        dfq.set_grad_bits(None)


def apply_precision(model: Model, spec: PrecisionSpec, config: TrainConfig) -> None:
    """Put a controller's spec ("8/8", {"default", "overrides"} or {"default", "dfq_target"}) in force."""
    if isinstance(spec, dict):
        default, overrides = spec.get("default", "fp32"), spec.get("overrides") or None
    else:
        default, overrides = spec, None
    model.set_precision(default, overrides, quantize_classifier=config.quantize_classifier,
                        pow2_scales=config.pow2_scales)
    for name in RUNTIME_SETTINGS:
        setattr(model.runtime, name, getattr(config, name))
    if isinstance(spec, dict) and "dfq_target" in spec:
        dfq = DFQ.of(model)
        if dfq is None:
            raise EdgetrainError("a DFQ cost target was given but the model has no gates (schedule dfq or fractrain)")
        dfq.target = float(spec["dfq_target"])
        if "dfq_floor" in spec:
            dfq.floor = float(spec["dfq_floor"])
        if "dfq_grad_bits" in spec:
            dfq.set_grad_bits(int(spec["dfq_grad_bits"]) or None)  # 0: each candidate's own


def pack_state(model: Model, controller_state: dict[str, Any], trainer: dict[str, Any]) -> dict[str, Any]:
    """The controller part of a checkpoint (see the module doc); trainer values must be scalars."""
    out: dict[str, Any] = {}
    for key, value in controller_state.items():
        if isinstance(value, PLAIN_TYPES):
            out[CONTROLLER + key] = value
            continue
        try:
            out[CONTROLLER_JSON + key] = json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise EdgetrainError(f"precision controller state '{key}' is neither an array, a scalar nor JSON "
                                 f"({exc})") from None
    out.update({TRAINER + k: v for k, v in trainer.items()})
    rt = model.runtime
    for layer, rng in rt.act_ranges.items():
        if rng.value is not None:
            out[ACT_RANGE + layer] = float(rng.value)
    for layer, n in rt.saturated.items():
        out[SATURATED + layer] = int(n)
    for name in COST_FIELDS:
        out[COST + name] = str(getattr(model.cost, name))
    for layer, n in model.cost.per_layer.items():
        out[COST_PER_LAYER + layer] = str(n)
    return out


def unpack_state(model: Model, state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restore the runtime and cost meter into model; returns (controller state, trainer values)."""
    from edgetrain.quant import RunningRange

    rt = model.runtime
    controller: dict[str, Any] = {}
    trainer: dict[str, Any] = {}
    for key, value in state.items():
        if key.startswith(CONTROLLER):
            controller[key[len(CONTROLLER):]] = value
        elif key.startswith(CONTROLLER_JSON):
            controller[key[len(CONTROLLER_JSON):]] = json.loads(value)
        elif key.startswith(TRAINER):
            trainer[key[len(TRAINER):]] = value
        elif key.startswith(ACT_RANGE):
            rt.act_ranges[key[len(ACT_RANGE):]] = RunningRange(rt.range_momentum, float(value))
        elif key.startswith(SATURATED):
            rt.saturated[key[len(SATURATED):]] = int(value)
        elif key.startswith(COST_PER_LAYER):
            model.cost.per_layer[key[len(COST_PER_LAYER):]] = int(value)
        elif key.startswith(COST) and key[len(COST):] in COST_FIELDS:
            setattr(model.cost, key[len(COST):], int(value))
    return controller, trainer


def stored_spec(trainer: dict[str, Any]) -> PrecisionSpec | None:
    """The precision spec a checkpoint recorded as in force."""
    raw = trainer.get(PRECISION)
    return json.loads(raw) if isinstance(raw, str) else None


def latest_checkpoint(run_dir: str | os.PathLike, report=None) -> Checkpoint | None:
    """The newest checkpoint of a run folder that verifies; each corrupt one skipped is reported as one line."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CorruptCheckpointWarning)
        ckpt = find_latest(run_dir)
    for w in caught:
        if issubclass(w.category, CorruptCheckpointWarning) and report is not None:
            report(str(w.message))
    return ckpt


def open_checkpoint(path: str | os.PathLike, report=None) -> Checkpoint:
    """A checkpoint file, or the newest good checkpoint of a run folder."""
    p = Path(path)
    if p.is_dir():
        ckpt = latest_checkpoint(p, report)
        if ckpt is None:
            raise CheckpointError(f"{p}: no usable checkpoint in this run folder")
        return ckpt
    if not p.exists():
        raise CheckpointError(f"{p}: no such checkpoint file or run folder")
    return load_checkpoint(p)


@dataclass
class TrainedRun:
    """A model rebuilt from a checkpoint, in the precision it was trained at."""

    model: Model
    config: TrainConfig
    checkpoint: Checkpoint
    spec: PrecisionSpec | None


def restore_run(ckpt: Checkpoint, model_path: str | None = None) -> TrainedRun:
    """Rebuild the checkpoint's model from its config (or model_path), with trained tensors and eval ranges."""
    config = from_checkpoint_dict(str(ckpt.path), ckpt.meta.get("config") or {})
    path = model_path or config.model
    if not path:
        raise EdgetrainError(f"{ckpt.path}: the checkpoint does not name its model file; give the model path")
    if not os.path.isfile(path):
        raise EdgetrainError(f"{ckpt.path}: its model file {path} is not there (moved or deleted?)")
    ckpt.check_model(path)
    model, _ = build_model(path, config.seed, config.num_classes)
    prepare_model(model, config)
    try:
        model.load_state_dict({**ckpt.params, **ckpt.buffers})
    except ModelError as exc:
        raise CheckpointError(f"{ckpt.path}: does not fit {path}: {exc}") from None
    _, trainer = unpack_state(model, ckpt.controller_state)
    spec = stored_spec(trainer)
    if spec is not None:
        apply_precision(model, spec, config)
    model.step = ckpt.step
    return TrainedRun(model, config, ckpt, spec)
