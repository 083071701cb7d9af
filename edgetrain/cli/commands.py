"""What `edgetrain train`, `eval` and `export` do once their flags are parsed (cli.py owns the parser)."""
from __future__ import annotations

import json
import os
import shlex
import sys
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from edgetrain.errors import EdgetrainError
from edgetrain.train.checkpoint import Checkpoint, CheckpointError
from edgetrain.train.config import (
    CONFIG_JSON,
    DEFAULT_OUT,
    FIELDS,
    RESUMABLE_KEYS,
    TrainConfig,
    normalise_keys,
    read_config_json,
    read_toml,
    resolve,
    with_absolute_paths,
)

CHECKPOINT_SUFFIX = ".npz"


def warn(text: str) -> None:
    """One warning line on stderr."""
    print(f"edgetrain: warning: {text}", file=sys.stderr)


def print_err(text: str) -> None:
    """A line on stderr."""
    print(text, file=sys.stderr)


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _same(key: str, given: Any, stored: Any) -> bool:
    if key == "model" and given and stored:
        return os.path.abspath(given) == os.path.abspath(stored)
    return given == stored


def _check_resume_changes(layers: list[tuple[str, Mapping[str, Any]]], stored: Mapping[str, Any]) -> None:
    """A resumed run keeps everything that decides what a step computes; only its length and cadence may change."""
    for where, values in layers:
        for key, value in values.items():
            if key not in RESUMABLE_KEYS and not _same(key, value, stored.get(key)):
                shown = _flag(key) if where == "flags" else f"'{key}' in {where}"
                raise EdgetrainError(f"{shown} is {value!r} but the run being resumed used {stored.get(key)!r}; "
                                     f"a resumed run may change only {', '.join(sorted(RESUMABLE_KEYS))}")


def _resume_hint(config: TrainConfig) -> str:
    return f"resume with: edgetrain train --out {shlex.quote(config.out)} --resume"


def run_train(flags: dict[str, Any], *, config_file: str | None, resume: bool, as_json: bool) -> int:
    """`edgetrain train`: resolve the config, build model and data, train, report."""
    from edgetrain.bn_audit import folded_batchnorm_message
    from edgetrain.data import load_data
    from edgetrain.train.runfolder import RunFolder, check_inputs, check_run_dir, run_inputs, run_outputs
    from edgetrain.train.runstate import build_model, latest_checkpoint
    from edgetrain.train.trainer import Trainer

    file_values = read_toml(config_file) if config_file else {}
    ckpt: Checkpoint | None = None
    base: dict[str, Any] = {}
    if resume:
        out = flags.get("out") or file_values.get("out") or DEFAULT_OUT
        if not Path(out).is_dir():
            raise EdgetrainError(f"{out}: no run folder to resume (give the --out of the run)")
        ckpt = latest_checkpoint(out, warn)
        if ckpt is not None:
            base = normalise_keys(f"{ckpt.path}: stored config", ckpt.meta.get("config") or {})
        else:
            # Stopped before its first checkpoint: the run starts again from step 0 with its own settings.
            stored = read_config_json(out)
            if stored is None:
                raise EdgetrainError(f"{out}: no usable checkpoint to resume from, and no {CONFIG_JSON}; "
                                     "start the run again without --resume")
            base = stored
        _check_resume_changes([("flags", flags), (str(config_file), file_values)], base)
        flags = {**flags, "out": out}  # the folder it was found in, even if the run was moved
    config = resolve(flags, file_values, base)
    if not config.model:
        raise EdgetrainError("no model: give MODEL.onnx, or set 'model' in the config file")
    if not config.data:
        raise EdgetrainError("no data: give --data SPEC (e.g. --data digits), or set 'data' in the config file")
    config = with_absolute_paths(config)
    # Before the data loads: the same checks run again under the folder's lock when training starts.
    RunFolder.check_free(config.out)
    check_inputs(run_outputs(config.out), run_inputs(config, [config_file]))
    check_run_dir(config.out, ckpt is not None)
    split = load_data(config.data, seed=config.seed, val_fraction=config.val_fraction,
                      normalize=not model_normalizes(config.model))
    model, head = build_model(config.model, config.seed, config.num_classes)
    if folded := folded_batchnorm_message(model.graph):
        warn(folded)
    trainer = Trainer(model, split, config, head=head, progress=sys.stderr.isatty() and not as_json,
                      desc=f"train {config.precision_spec}", resume_hint=_resume_hint(config), report=print_err,
                      inputs=[config_file] if config_file else ())
    if ckpt is not None:
        trainer.resume(ckpt)
    result = trainer.fit()
    summary = {"test_accuracy": result.test_accuracy, "full_depth_accuracy": result.full_depth_accuracy,
               "test_loss": result.test_loss,
               "final_train_loss": result.final_loss, "steps": result.steps,
               "bitops": result.bitops, "fp32_bitops": result.fp32_bitops,
               "percent_of_fp32": result.percent_of_fp32, "wall_seconds": result.seconds,
               "precision": result.precision, "resumed_from": trainer.resumed_from,
               "paths": {name: os.path.abspath(path) if path else None for name, path in (
                   ("run_dir", result.run_dir), ("model", result.model), ("checkpoint", result.checkpoint),
                   ("log", result.log), ("config", result.config))}}
    if as_json:
        print(json.dumps(summary, indent=2))
    else:
        print(format_train(summary))
    return 0


def format_train(s: dict[str, Any]) -> str:
    """The end-of-training summary for people."""
    p = s["paths"]
    return "\n".join([
        f"trained {s['steps']} steps in {s['wall_seconds']:.1f} s ({s['precision']})",
        f"test accuracy {s['test_accuracy']:.2%}, test loss {s['test_loss']:.4f}",
        *([f"exported network (every block computing, statistics re-estimated): test accuracy "
           f"{s['full_depth_accuracy']:.2%}"] if s.get("full_depth_accuracy") is not None else []),
        f"BitOPs {s['bitops']:.3e} ({s['percent_of_fp32']:.1f}% of fp32)",
        f"model {p['model']}", f"checkpoint {p['checkpoint']}", f"log {p['log']}"])


def is_checkpoint(path: str) -> bool:
    """A run folder or a checkpoint file (an .npz zip), as opposed to an ONNX model."""
    p = Path(path)
    return p.is_dir() or p.suffix == CHECKPOINT_SUFFIX or (p.is_file() and zipfile.is_zipfile(p))


def run_eval(target: str, *, data: str | None, bits: str | None, batch_size: int, as_json: bool) -> int:
    """`edgetrain eval`: top-1 and loss of an ONNX model or a trained run on a data split's test set."""
    import numpy as np

    from edgetrain.data import check_fits, load_data
    from edgetrain.finite import check_finite_weights
    from edgetrain.model import load
    from edgetrain.preprocess import normalizes_in_graph
    from edgetrain.train.runlog import precision_summary
    from edgetrain.train.runstate import open_checkpoint, output_classes, restore_run
    from edgetrain.train.trainer import NONFINITE_MARKER, QUIET_NUMPY, evaluate

    seed, val_fraction, source = 0, None, target
    if is_checkpoint(target):
        run = restore_run(open_checkpoint(target, warn))
        model, config = run.model, run.config
        data = data or config.data
        seed, val_fraction = config.seed, config.val_fraction
        source = str(run.checkpoint.path)
        check_finite_weights(model, source, "tensor")
    else:
        model = load(target)
        check_finite_weights(model, target)
    if not data:
        raise EdgetrainError("no data: give --data SPEC (e.g. --data digits)")
    if bits is not None:
        model.set_precision(bits, pow2_scales=model.runtime.pow2_scales)
    # An export with its preprocessing in the graph takes raw input: normalising here would do it twice.
    split = load_data(data, seed=seed, normalize=not normalizes_in_graph(model.graph.original),
                      **({"val_fraction": val_fraction} if val_fraction else {}))
    check_fits(split.test, model.input_shape, output_classes(model))
    try:
        with np.errstate(**QUIET_NUMPY):
            result = evaluate(model, split.test, batch_size)
    except ValueError as exc:
        if NONFINITE_MARKER not in str(exc):
            raise
        raise EdgetrainError(f"{source}: its activations on {data} are not finite, so they cannot be quantised "
                             f"at {precision_summary(model.precision)}") from None
    summary = {"source": source, "data": data, "accuracy": result["accuracy"], "loss": result["loss"],
               "samples": result["samples"], "precision": precision_summary(model.precision)}
    if as_json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"{source}: test accuracy {summary['accuracy']:.2%}, loss {summary['loss']:.4f} on "
              f"{summary['samples']} samples of {data} ({summary['precision']})")
    return 0


CALIBRATION_SAMPLES = 256


def _calibration_inputs(config: Any) -> Any:
    """The first training inputs of a run's data (the int8 export measures its layers' output ranges on
    them), or None when the data is no longer readable (those layers then stay float convolutions)."""
    from edgetrain.data import load_data

    try:
        split = load_data(config.data, seed=config.seed, val_fraction=config.val_fraction)
    except (OSError, EdgetrainError) as e:
        warn(f"int8 export without calibration data ({e}): layers whose outputs feed no integer layer stay float")
        return None
    return split.train.x[:CALIBRATION_SAMPLES]


def _recalibrate_for_export(run: Any) -> None:
    """A gated run's exported network, its statistics re-estimated at full depth from the run's training
    data as the run did before writing its own model.onnx (the same batches and seed, so the same
    network); the checkpoint keeps the gated statistics. Without the data, a warning: the export then
    serves the gated statistics, which can cost a skipping run most of its accuracy."""
    from edgetrain.data import load_data
    from edgetrain.train.trainer import recalibrate_for_export

    config = run.config
    if config.dfq_recalibration_batches <= 0:
        return
    try:
        split = load_data(config.data, seed=config.seed, val_fraction=config.val_fraction,
                          normalize=not model_normalizes(config.model))
    except (OSError, EdgetrainError) as e:
        warn(f"export without re-estimating the statistics at full depth ({e}): the network keeps those of "
             "gated training (docs/GATE_ESTIMATOR.md)")
        return
    recalibrate_for_export(run.model, split.train.x, config)


def model_normalizes(path: str) -> bool:
    """Whether the ONNX file normalises its own input (an export with its preprocessing in the graph)."""
    import onnx

    from edgetrain.preprocess import normalizes_in_graph

    try:
        return normalizes_in_graph(onnx.load(path, load_external_data=False))
    except Exception:
        return False


def run_preprocess(run: Any) -> Any:
    """The preprocessing a run's data pipeline applied: its checkpoint's record, or, for a checkpoint
    written before runs recorded it, the statistics of its data source recomputed."""
    from edgetrain.data import load_data
    from edgetrain.preprocess import Preprocess, from_record, normalizes_in_graph

    meta = run.checkpoint.meta
    if "preprocess" in meta:
        return from_record(str(run.checkpoint.path), meta["preprocess"])
    if normalizes_in_graph(run.model.graph.original) or not run.config.data:
        return None
    warn(f"{run.checkpoint.path} does not record its preprocessing (an older edgetrain); "
         f"recomputing it from {run.config.data}")
    split = load_data(run.config.data, seed=run.config.seed, val_fraction=run.config.val_fraction)
    return Preprocess.of_dataset(split.train)


def _embed_preprocess(path: str, pre: Any, mode: str) -> None:
    """Rewrite an exported file with its preprocessing (the export functions stay as they are)."""
    import onnx

    from edgetrain.fileio import write_atomic
    from edgetrain.preprocess import embed

    write_atomic(path, embed(onnx.load(path), pre, mode).SerializeToString())


FORMATS = ("float", "int8", "both")
LATENCY_BATCHES = (1, 64)
LATENCY_REPEATS = 20  # timed runs per batch size (after one warm-up): a median that is quick on a board
CHECK_SAMPLES = 1000  # test samples the onnxruntime check reads


def int8_path(out: str) -> str:
    """Where `--format both` writes the int8 model: OUT with .int8 before its suffix (ft.onnx -> ft.int8.onnx)."""
    root, ext = os.path.splitext(out)
    return f"{root}.int8{ext or '.onnx'}"


def _median_ms(session: Any, name: str, x: Any) -> float:
    import statistics
    import time

    session.run(None, {name: x})
    times = []
    for _ in range(LATENCY_REPEATS):
        t = time.perf_counter()
        session.run(None, {name: x})
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def onnxruntime_check(run: Any, path: str, *, int8: bool, pre: Any, mode: str) -> dict[str, Any] | None:
    """The export in onnxruntime against the engine on the run's test split: top-1 of each, agreement,
    max relative error, and median latency at batch 1 and 64 on this machine (None: no test data here)."""
    import numpy as np

    from edgetrain.data import load_data
    from edgetrain.export import compare_with_engine, onnxruntime_session
    from edgetrain.preprocess import normalizes_in_graph

    config = run.config
    try:
        raw = load_data(config.data, seed=config.seed, val_fraction=config.val_fraction, normalize=False).test
    except EdgetrainError as exc:
        warn(f"onnxruntime check skipped: {exc}")
        return None
    x_raw, y = raw.x[:CHECK_SAMPLES], raw.y[:CHECK_SAMPLES]
    engine_x = pre.apply(x_raw) if pre is not None else x_raw  # what the run's model was trained on
    onnx_x = x_raw if mode == "graph" or normalizes_in_graph(run.model.graph.original) else engine_x
    check = compare_with_engine(run.model, path, engine_x, int8=int8, onnx_input=onnx_x)
    session = onnxruntime_session(path)
    name = session.get_inputs()[0].name
    logits = session.run(None, {name: onnx_x})[0]
    check["onnxruntime_top1"] = float((logits.argmax(axis=1) == y).mean())
    check["latency_ms"] = {str(b): _median_ms(session, name, np.ascontiguousarray(np.resize(onnx_x, (b,) +
                                                                                             onnx_x.shape[1:])))
                           for b in LATENCY_BATCHES}
    return check


def _check_line(label: str, c: dict[str, Any]) -> str:
    latency = ", ".join(f"batch {b} {ms:.2f} ms" for b, ms in c["latency_ms"].items())
    return (f"  {label}: onnxruntime top-1 {c['onnxruntime_top1']:.2%}, agrees with the engine on "
            f"{c['top1_agreement']:.2%} (max relative error {c['max_relative_error']:.2e}); latency {latency}")


def run_export(target: str, *, out: str, int8: bool = False, as_json: bool, gated_bits: str | None = None,
               preprocess: str = "graph", fmt: str | None = None, force: bool = False) -> int:
    """`edgetrain export`: a checkpoint (or a run folder's newest) as a float and/or int8 ONNX file with the
    run's input preprocessing (graph nodes or metadata), and, for a DFQ run, its gates as OUT.gates.onnx.
    With --format, each file is also checked in onnxruntime (agreement with the engine, latency)."""
    from edgetrain.export import export_int8, export_onnx
    from edgetrain.fileio import check_file_target
    from edgetrain.finite import check_finite_weights
    from edgetrain.precision.dfq.controller import DFQ
    from edgetrain.precision.dfq.export import export_gates, gates_path
    from edgetrain.preprocess import MODES, describe
    from edgetrain.train.runfolder import check_export_targets, run_inputs
    from edgetrain.train.runstate import open_checkpoint, restore_run

    if fmt is not None and fmt not in FORMATS:
        raise EdgetrainError(f"--format {fmt!r}: valid are {', '.join(FORMATS)}")
    if fmt is not None and int8 and fmt != "int8":
        raise EdgetrainError(f"--int8 contradicts --format {fmt}; give one of them")
    if preprocess not in MODES:
        raise EdgetrainError(f"--preprocess {preprocess!r}: valid are {', '.join(MODES)}")
    formats = {"float": ["float"], "int8": ["int8"], "both": ["float", "int8"]}[fmt or ("int8" if int8 else "float")]
    if not is_checkpoint(target):
        raise CheckpointError(f"{target}: not a checkpoint file or run folder "
                              "(an ONNX model needs no export: train it first)")
    run = restore_run(open_checkpoint(target, warn))
    check_file_target(out)
    check_finite_weights(run.model, str(run.checkpoint.path), "tensor")
    dfq = DFQ.of(run.model)
    if gated_bits is not None and (dfq is None or "int8" not in formats):
        raise EdgetrainError("--gated-bits applies to the int8 export of a dfq or fractrain run")
    paths = {"float": out} if formats == ["float"] else {"int8": out} if formats == ["int8"] else \
        {"float": out, "int8": int8_path(out)}
    targets = list(paths.values()) + ([gates_path(out)] if dfq is not None else [])
    check_export_targets(targets, run.checkpoint.path.parent, [*run_inputs(run.config), str(run.checkpoint.path)],
                         force)
    pre = run_preprocess(run) if preprocess != "none" else None
    if dfq is not None:
        _recalibrate_for_export(run)
    for kind, path in paths.items():
        if kind == "int8":
            export_int8(run.model, path, gated_bits, calibration=_calibration_inputs(run.config))
        else:
            export_onnx(run.model, path)
        if pre is not None:
            _embed_preprocess(path, pre, preprocess)
    summary: dict[str, Any] = {
        "checkpoint": str(run.checkpoint.path), "step": run.checkpoint.step, "out": out,
        "format": "int8-qdq" if formats == ["int8"] else fmt or "float",
        "preprocess": {"mode": preprocess if pre is not None else "none", "applies": describe(pre)}}
    if len(paths) > 1:
        summary["files"] = paths
    if dfq is not None:
        summary["gates"] = gates_path(out)
        export_gates(run.model, summary["gates"])
        if "int8" in formats:
            summary["gated_bits"] = gated_bits or dfq.most_precise()
    if fmt is not None:  # the onnxruntime check: what the user will see when serving these files
        checks = {kind: onnxruntime_check(run, path, int8=kind == "int8", pre=pre, mode=preprocess)
                  for kind, path in paths.items()}
        summary["onnxruntime"] = {k: v for k, v in checks.items() if v is not None}
    if as_json:
        print(json.dumps(summary, indent=2))
        return 0
    lines = [f"wrote {', '.join(paths.values())} ({summary['format']}) from {summary['checkpoint']} "
             f"(step {summary['step']})" + (f"; gates: {summary['gates']}" if "gates" in summary else "")]
    if pre is not None:
        lines.append(f"input preprocessing ({preprocess}): {describe(pre)}")
    if summary.get("onnxruntime"):
        lines.append("onnxruntime check on this machine:")
        lines += [_check_line(kind, c) for kind, c in summary["onnxruntime"].items()]
    print("\n".join(lines))
    return 0


def train_flags(args: Any) -> dict[str, Any]:
    """The config fields given on the command line (argparse leaves absent flags out)."""
    return {k: v for k, v in vars(args).items() if k in FIELDS}
