"""onnxruntime latency of the float and int8 exports: LeNet-5, ResNet-8 and MobileNetV2-0.35 on the digits.

Each model is trained a few steps at 8/8 (the int8 export needs running activation ranges), exported both
ways, checked against the test split, and timed at batch 1 and 64 in this one process (median of many runs,
one onnxruntime thread each, so the ratio is not an artefact of threading on a shared machine).

    PYTHONPATH=. python -m tools.bench_export [--steps 30] [--runs 200]

Measured 2026-12-03 (--steps 60 --runs 200, 2-core AVX2 host without VNNI, shared and loaded), int8/float:
LeNet-5 1.95 (batch 1) / 2.24 (batch 64), ResNet-8 1.36 / 1.18, MobileNetV2-0.35 1.71 / 1.39. Every conv runs
as QLinearConv (ORT's profile: the int8 kernels themselves are slower than its NCHWc float convs on this CPU).
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import onnx

import models
from edgetrain.cli.demo import demo_model_path
from edgetrain.data import load_data
from edgetrain.export import EXACT_INT8_OPTION, to_onnx, to_onnx_int8
from edgetrain.model import load
from edgetrain.train.loop import fit
from edgetrain.train.optim import SGD

INTEGER_OPS = ("QLinearConv", "QGemm", "QLinearMatMul", "ConvInteger", "MatMulInteger", "QLinearAdd")


def _sources() -> dict[str, Callable[[], onnx.ModelProto]]:
    return {
        "lenet5": lambda: onnx.load(str(demo_model_path())),
        "resnet8": lambda: models.build_model("resnet8", in_channels=1, input_size=28, num_classes=10),
        "mobilenetv2-0.35": lambda: models.build_model("mobilenetv2", in_channels=1, input_size=28, num_classes=10,
                                                      width_mult=0.35),
    }


def session(proto: onnx.ModelProto, threads: int, optimized: str | None = None):
    """An onnxruntime CPU session with the export's int8 option and a fixed thread count."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.add_session_config_entry(*EXACT_INT8_OPTION)
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    if optimized:
        options.optimized_model_filepath = optimized
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


def median_ms(sess, x: np.ndarray, runs: int) -> float:
    """Median wall time of one run, in milliseconds, after warm-up."""
    feed = {sess.get_inputs()[0].name: x}
    for _ in range(5):
        sess.run(None, feed)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - t)
    return 1e3 * float(np.median(times))


def top1(sess, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy of a session on (x, y)."""
    name = sess.get_inputs()[0].name
    out = np.concatenate([sess.run(None, {name: x[i:i + 250]})[0] for i in range(0, len(x), 250)])
    return float((out.argmax(1) == y).mean())


def main(argv: list[str] | None = None) -> None:
    """Train, export and time each model; print one table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="8/8 training steps per model")
    parser.add_argument("--runs", type=int, default=200, help="timed runs per (model, format, batch)")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    parser.add_argument("--models", nargs="*", default=list(_sources()))
    args = parser.parse_args(argv)
    data = load_data("digits")
    rows = []
    for name in args.models:
        model = load(_sources()[name]())
        model.set_precision("8/8")
        fit(model, data.train.x, data.train.y, steps=args.steps, batch_size=32,
            optimizer=SGD(model.parameters(), lr=0.02, momentum=0.9))
        protos = {"float": to_onnx(model), "int8": to_onnx_int8(model, calibration=data.train.x[:512])}
        sessions = {k: session(p, args.threads, f"/tmp/bench_export_{name}_{k}.onnx") for k, p in protos.items()}
        ops = {n.op_type for n in onnx.load(f"/tmp/bench_export_{name}_int8.onnx").graph.node}
        acc = {k: top1(s, data.test.x, data.test.y) for k, s in sessions.items()}
        for batch in (1, 64):
            x = data.test.x[:batch]
            ms = {k: median_ms(s, x, args.runs) for k, s in sessions.items()}
            rows.append((name, batch, ms["float"], ms["int8"], ms["int8"] / ms["float"], acc["float"], acc["int8"],
                         ",".join(sorted(o for o in ops if o in INTEGER_OPS))))
    print(f"{'model':<18}{'batch':>6}{'float ms':>10}{'int8 ms':>10}{'ratio':>7}{'top1 f32':>10}{'top1 i8':>9}"
          "  integer ops")
    for r in rows:
        print(f"{r[0]:<18}{r[1]:>6}{r[2]:>10.3f}{r[3]:>10.3f}{r[4]:>7.2f}{r[5]:>10.3f}{r[6]:>9.3f}  {r[7]}")


if __name__ == "__main__":
    main()
