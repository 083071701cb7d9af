"""`edgetrain demo`: the main job on the embedded default.

The shipped LeNet-5 knows upright digits; the new task is the same digits rotated a quarter turn (a
shifted domain). It is fine-tuned on the device, exported to ONNX, and the export is checked in
onnxruntime against the engine's own forward.
"""
from __future__ import annotations

import os
import time
from importlib import resources

import numpy as np
import onnxruntime as ort

from . import load
from .datasets import load_digits
from .export import export_onnx
from .optim import SGD
from .training import accuracy, fit, predict

DEMO_MODEL = "lenet5_digits.onnx"
BATCH_SIZE = 64
LEARNING_RATE = 0.02
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4
QUARTER_TURNS = 1  # the domain shift: every image rotated by 90 degrees
EXPORT_TOLERANCE = 1e-4


def demo_model_path() -> str:
    """Path of the shipped pretrained model."""
    return str(resources.files("edgetrain") / "assets" / DEMO_MODEL)


def rotated(x: np.ndarray) -> np.ndarray:
    """The shifted domain: NCHW images turned by QUARTER_TURNS * 90 degrees."""
    return np.ascontiguousarray(np.rot90(x, QUARTER_TURNS, axes=(2, 3)))


def run_demo(steps: int = 300, seed: int = 0, out_dir: str = "edgetrain-demo", progress: bool = True) -> dict:
    """Fine-tune, export, verify; print a table and return the figures."""
    x, y = load_digits("train")
    xt, yt = load_digits("test")
    xr, xrt = rotated(x), rotated(xt)
    model = load(demo_model_path(), seed=seed)
    before = {"rotated": accuracy(model, xrt, yt), "upright": accuracy(model, xt, yt)}
    opt = SGD(model.parameters(), LEARNING_RATE, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    start = time.perf_counter()
    losses = fit(model, xr, y, steps=steps, batch_size=BATCH_SIZE, optimizer=opt, seed=seed,
                 progress=progress, desc="fp32 fine-tune")
    seconds = time.perf_counter() - start
    after = {"rotated": accuracy(model, xrt, yt), "upright": accuracy(model, xt, yt)}

    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "lenet5_rotated.onnx")
    export_onnx(model, path)
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    ours = predict(model, xrt)
    theirs = sess.run(None, {sess.get_inputs()[0].name: xrt})[0]
    max_err = float(np.abs(ours - theirs).max() / np.abs(theirs).max())
    agree = float((ours.argmax(1) == theirs.argmax(1)).mean())

    result = {
        "task": "shipped digits rotated 90 degrees (shifted domain)",
        "model": demo_model_path(),
        "schedule": "fp32",
        "steps": steps,
        "batch_size": BATCH_SIZE,
        "seed": seed,
        "accuracy_before": before,
        "accuracy_after": after,
        "final_loss": float(np.mean(losses[-20:])),
        "train_seconds": seconds,
        "export": path,
        "onnxruntime_max_relative_error": max_err,
        "onnxruntime_top1_agreement": agree,
        "export_ok": bool(max_err < EXPORT_TOLERANCE and agree == 1.0),
    }
    if progress:
        print(format_result(result))
    return result


def format_result(r: dict) -> str:
    """The demo's table for people."""
    rows = [
        ("schedule", "steps", "rotated acc before", "rotated acc after", "upright acc after", "train time"),
        (r["schedule"], str(r["steps"]), f"{r['accuracy_before']['rotated']:.1%}", f"{r['accuracy_after']['rotated']:.1%}",
         f"{r['accuracy_after']['upright']:.1%}", f"{r['train_seconds']:.1f} s"),
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [f"edgetrain demo: fine-tune the shipped LeNet-5 on {r['task']}", ""]
    for i, row in enumerate(rows):
        lines.append("  ".join(c.rjust(w) for c, w in zip(row, widths)))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    status = "OK" if r["export_ok"] else "MISMATCH"
    lines += ["", f"exported {r['export']}; onnxruntime agrees: {status} "
                  f"(max relative error {r['onnxruntime_max_relative_error']:.1e}, "
                  f"top-1 agreement {r['onnxruntime_top1_agreement']:.1%})"]
    return "\n".join(lines)
