"""`edgetrain demo`: the main job on the embedded default.

The shipped LeNet-5 knows upright digits; the new task is the same digits rotated a quarter turn (a
shifted domain). It is fine-tuned on the device twice with the same seed and steps, in fp32 and in
static 8/8 fixed point, through the Trainer; the 8/8 result is exported as float and int8 ONNX and
both files are checked in onnxruntime against the engine's own forward.
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from importlib import resources
from pathlib import Path

import numpy as np

from edgetrain.data import Split, load_data
from edgetrain.export import compare_with_engine, export_int8, export_onnx
from edgetrain.fileio import make_folder
from edgetrain.train.config import TrainConfig
from edgetrain.train.runstate import build_model
from edgetrain.train.trainer import Trainer, clear_run_dir, evaluate

DEMO_MODEL = "lenet5_digits.onnx"
BATCH_SIZE = 64
LEARNING_RATE = 0.02
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4
QUARTER_TURNS = 1  # the domain shift: every image rotated by 90 degrees
EXPORT_TOLERANCE = 1e-4  # float export vs the engine's fp32 forward, relative
INT8_MIN_AGREEMENT = 0.99  # int8 export vs the engine's 8/8 forward: share of equal top-1 predictions
RUNS = (("fp32", "fp32", None), ("static 8/8", "static", "8/8"))  # (label, schedule, bits)
EXPORTED_RUN = "static 8/8"
FLOAT_EXPORT, INT8_EXPORT = "lenet5_rotated.onnx", "lenet5_rotated_int8.onnx"


def demo_model_path() -> str:
    """Path of the shipped pretrained model."""
    return str(resources.files("edgetrain") / "assets" / DEMO_MODEL)


def rotated(x: np.ndarray) -> np.ndarray:
    """The shifted domain: NCHW images turned by QUARTER_TURNS * 90 degrees."""
    return np.ascontiguousarray(np.rot90(x, QUARTER_TURNS, axes=(2, 3)))


def rotated_split(split: Split) -> Split:
    """Both splits of the digits, rotated."""
    return dataclasses.replace(split, train=dataclasses.replace(split.train, x=rotated(split.train.x)),
                               test=dataclasses.replace(split.test, x=rotated(split.test.x)))




def _train(label: str, schedule: str, bits: str | None, split: Split, upright, steps: int, seed: int,
           out_dir: str, progress: bool):
    run_dir = Path(out_dir) / "runs" / label.replace(" ", "-").replace("/", "-")
    clear_run_dir(run_dir)
    # data stays unset: the rotated digits exist only inside the demo, no --data spec names them.
    config = TrainConfig(model=demo_model_path(), data=None, schedule=schedule, bits=bits, steps=steps,
                         batch_size=BATCH_SIZE, seed=seed, lr=LEARNING_RATE, momentum=MOMENTUM,
                         weight_decay=WEIGHT_DECAY, eval_every=steps, out=str(run_dir))
    model, _ = build_model(config.model, seed, None)
    # The rotated digits exist only inside the demo, so `train --resume` cannot pick its run up.
    hint = "the demo does not resume: `edgetrain demo` starts it over"
    result = Trainer(model, split, config, progress=progress, desc=label, export_model=False, resume_hint=hint).fit()
    summary = {"schedule": label, "steps": steps, "accuracy_after": {"rotated": result.test_accuracy,
                                                                     "upright": evaluate(model, upright)["accuracy"]},
               "final_loss": result.final_loss, "bitops": result.bitops, "percent_of_fp32": result.percent_of_fp32,
               "train_seconds": result.seconds, "run_dir": str(run_dir)}
    return model, summary


WARMUP_STEPS = 2


def warm_up_kernels(split: Split, upright, seed: int) -> float:
    """Train each of the demo's runs for WARMUP_STEPS steps at its batch size, in a throwaway folder, so Numba
    compiles (or loads from its cache) every kernel the timed runs use; returns the seconds it took, so the timed
    runs compare training, not one-off compilation. (One step at batch 2 without the optimizer, as before, left
    kernels to compile inside the timed runs: a first 8/8 run took 20.7 s of which training was 2.0.)"""
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="edgetrain-demo-warm-up-") as tmp:
        for label, schedule, bits in RUNS:
            _train(label, schedule, bits, split, upright, WARMUP_STEPS, seed, tmp, progress=False)
    return time.perf_counter() - start


def run_demo(steps: int = 300, seed: int = 0, out_dir: str = "edgetrain-demo", progress: bool = True) -> dict:
    """Fine-tune in fp32 and 8/8, export the 8/8 model as float and int8, verify; print a table, return the figures."""
    upright_split = load_data("digits", seed=seed)
    split = rotated_split(upright_split)
    model, _ = build_model(demo_model_path(), seed, None)
    before = {"rotated": evaluate(model, split.test)["accuracy"],
              "upright": evaluate(model, upright_split.test)["accuracy"]}
    make_folder(out_dir)
    compile_seconds = warm_up_kernels(split, upright_split.test, seed)
    runs, models = [], {}
    for label, schedule, bits in RUNS:
        models[label], summary = _train(label, schedule, bits, split, upright_split.test, steps, seed, out_dir,
                                        progress)
        runs.append(summary)

    chosen = models[EXPORTED_RUN]
    float_path, int8_path = os.path.join(out_dir, FLOAT_EXPORT), os.path.join(out_dir, INT8_EXPORT)
    export_onnx(chosen, float_path)
    export_int8(chosen, int8_path)
    float_check = compare_with_engine(chosen, float_path, split.test.x, int8=False)
    int8_check = compare_with_engine(chosen, int8_path, split.test.x, int8=True)
    main = next(r for r in runs if r["schedule"] == EXPORTED_RUN)
    result = {
        "task": "shipped digits rotated 90 degrees (shifted domain)",
        "model": demo_model_path(),
        "schedule": EXPORTED_RUN,
        "steps": steps,
        "batch_size": BATCH_SIZE,
        "seed": seed,
        "accuracy_before": before,
        "accuracy_after": main["accuracy_after"],
        "final_loss": main["final_loss"],
        "train_seconds": main["train_seconds"],
        "kernel_warmup_seconds": compile_seconds,
        "runs": runs,
        "export": float_path,
        "export_int8": int8_path,
        "onnxruntime_max_relative_error": float_check["max_relative_error"],
        "onnxruntime_top1_agreement": float_check["top1_agreement"],
        "int8_top1_agreement": int8_check["top1_agreement"],
        "int8_max_relative_error": int8_check["max_relative_error"],
        "export_ok": bool(float_check["max_relative_error"] < EXPORT_TOLERANCE
                          and float_check["top1_agreement"] == 1.0
                          and int8_check["top1_agreement"] >= INT8_MIN_AGREEMENT),
    }
    if progress:
        print(format_result(result))
    return result


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for i, row in enumerate(rows):
        lines.append("  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths))))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return lines


def format_result(r: dict) -> str:
    """The demo's table for people."""
    rows = [("schedule", "steps", "rotated acc", "upright acc", "BitOPs", "% of fp32 BitOPs", "train time")]
    rows.append(("before fine-tuning", "0", f"{r['accuracy_before']['rotated']:.1%}",
                 f"{r['accuracy_before']['upright']:.1%}", "", "", ""))
    for run in r["runs"]:
        rows.append((run["schedule"], str(run["steps"]), f"{run['accuracy_after']['rotated']:.1%}",
                     f"{run['accuracy_after']['upright']:.1%}", f"{run['bitops']:.2e}",
                     f"{run['percent_of_fp32']:.1f}%", f"{run['train_seconds']:.1f} s"))
    status = "OK" if r["export_ok"] else "MISMATCH"
    lines = [f"edgetrain demo: fine-tune the shipped LeNet-5 on {r['task']}", "", *_table(rows), "",
             f"kernels ready in {r['kernel_warmup_seconds']:.1f} s before timing (Numba compiles them on a "
             "machine's first run, then loads them from its cache)",
             f"exported the {r['schedule']} model; onnxruntime agrees: {status}",
             f"  float {r['export']}: max relative error {r['onnxruntime_max_relative_error']:.1e}, "
             f"top-1 agreement {r['onnxruntime_top1_agreement']:.1%} (engine fp32 forward)",
             f"  int8  {r['export_int8']}: top-1 agreement {r['int8_top1_agreement']:.1%} "
             f"(engine {r['schedule'].split()[-1]} forward)"]
    return "\n".join(lines)
