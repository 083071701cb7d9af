"""onnxruntime latency of the float and int8 exports: LeNet-5, ResNet-8 and MobileNetV2-0.35 on the digits.

Each model is trained a few steps at 8/8 (the int8 export needs running activation ranges), exported both
ways, checked against the test split, and timed at batch 1 and 64 in this one process. Sessions use
onnxruntime's default options, as a user serving the model would (all cores, ORT_ENABLE_ALL); the int8 export
also gets the x64 precision entry the README tells users of x86-64 CPUs without VNNI to set
(edgetrain.export.onnxruntime_session). The sessions of one batch size are timed in turns, several rounds,
so that load from other processes on a shared machine falls on all of them alike; each figure is a median.

Two more int8 columns, same run: `no-entry` is our export under plain default options (onnxruntime's faster
u8 x s8 kernels, whose 16-bit pair sums may saturate on such CPUs), and `ort ref` is onnxruntime's own
quantize_static of the same float export (QDQ, u8 activations, s8 per-channel weights with reduce_range:
its documented form for x86-64 without VNNI), calibrated on the same 256 training inputs.

    PYTHONPATH=. python -m tools.bench_export [--steps 30] [--seconds 2] [--threads 0]

Figures and what they show: README, "int8 export latency" (one run, `--threads 1` on a loaded shared host).
"""
from __future__ import annotations

import argparse
import os
import tempfile
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
CALIBRATION_INPUTS = 256
ROUNDS = 10


def _sources() -> dict[str, Callable[[], onnx.ModelProto]]:
    return {
        "lenet5": lambda: onnx.load(str(demo_model_path())),
        "resnet8": lambda: models.build_model("resnet8", in_channels=1, input_size=28, num_classes=10),
        "mobilenetv2-0.35": lambda: models.build_model("mobilenetv2", in_channels=1, input_size=28, num_classes=10,
                                                      width_mult=0.35),
    }


def session(proto: onnx.ModelProto, threads: int = 0, exact_int8: bool = False, optimized: str | None = None):
    """An onnxruntime CPU session with default options, but for the thread count (0: onnxruntime's default)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if exact_int8:
        options.add_session_config_entry(*EXACT_INT8_OPTION)
    options.intra_op_num_threads = threads
    if optimized:
        options.optimized_model_filepath = optimized
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


def ort_reference(proto: onnx.ModelProto, calibration: np.ndarray) -> onnx.ModelProto:
    """onnxruntime's own static quantisation of a float export (QDQ, U8S8, per channel, reduce_range)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    name = proto.graph.input[0].name

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{name: calibration[i:i + 32]} for i in range(0, len(calibration), 32)])

        def get_next(self):
            return next(self.batches, None)

    with tempfile.TemporaryDirectory() as tmp:
        src, pre, out = (os.path.join(tmp, f) for f in ("float.onnx", "pre.onnx", "int8.onnx"))
        onnx.save(proto, src)
        quant_pre_process(src, pre)
        quantize_static(pre, out, Reader(), quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, per_channel=True, reduce_range=True)
        return onnx.load(out)


def median_ms(sessions: dict, x: np.ndarray, seconds: float) -> dict[str, float]:
    """Median wall time of one run of each session on x, in milliseconds: the sessions take turns, ROUNDS times."""
    times: dict[str, list[float]] = {k: [] for k in sessions}
    feeds = {k: {s.get_inputs()[0].name: x} for k, s in sessions.items()}
    for k, s in sessions.items():
        for _ in range(5):
            s.run(None, feeds[k])
    for _ in range(ROUNDS):
        for k, s in sessions.items():
            end = time.perf_counter() + seconds / ROUNDS
            while time.perf_counter() < end:
                t = time.perf_counter()
                s.run(None, feeds[k])
                times[k].append(time.perf_counter() - t)
    return {k: 1e3 * float(np.median(v)) for k, v in times.items()}


def top1(sess, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy of a session on (x, y)."""
    name = sess.get_inputs()[0].name
    out = np.concatenate([sess.run(None, {name: x[i:i + 250]})[0] for i in range(0, len(x), 250)])
    return float((out.argmax(1) == y).mean())


def main(argv: list[str] | None = None) -> None:
    """Train, export and time each model; print one table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="8/8 training steps per model")
    parser.add_argument("--seconds", type=float, default=2.0, help="timing per (model, variant, batch)")
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: its default)")
    parser.add_argument("--models", nargs="*", default=list(_sources()))
    args = parser.parse_args(argv)
    data = load_data("digits")
    calibration = data.train.x[:CALIBRATION_INPUTS]
    rows = []
    for name in args.models:
        model = load(_sources()[name]())
        model.set_precision("8/8")
        fit(model, data.train.x, data.train.y, steps=args.steps, batch_size=32,
            optimizer=SGD(model.parameters(), lr=0.02, momentum=0.9))
        float_proto = to_onnx(model)
        int8_proto = to_onnx_int8(model, calibration=calibration)
        optimized = os.path.join(tempfile.gettempdir(), f"bench_export_{name}_int8.optimized.onnx")
        sessions = {"float": session(float_proto, args.threads),
                    "int8": session(int8_proto, args.threads, exact_int8=True, optimized=optimized),
                    "no-entry": session(int8_proto, args.threads),
                    "ort ref": session(ort_reference(float_proto, calibration), args.threads)}
        ops = {n.op_type for n in onnx.load(optimized).graph.node}
        acc = {k: top1(s, data.test.x, data.test.y) for k, s in sessions.items()}
        for batch in (1, 64):
            ms = median_ms(sessions, data.test.x[:batch], args.seconds)
            rows.append((name, batch, ms, acc, ",".join(sorted(o for o in ops if o in INTEGER_OPS))))
    print(f"onnxruntime default session options, intra-op threads: {args.threads or 'default'}; "
          "ratios are int8 / float in this run")
    print(f"{'model':<18}{'batch':>6}{'float ms':>10}{'int8 ms':>10}{'ratio':>7}{'no-entry':>9}{'ort ref':>8}"
          f"{'top1 f32':>10}{'i8':>7}{'no-e':>7}{'ref':>7}  integer ops")
    for name, batch, ms, acc, ops in rows:
        print(f"{name:<18}{batch:>6}{ms['float']:>10.3f}{ms['int8']:>10.3f}{ms['int8'] / ms['float']:>7.2f}"
              f"{ms['no-entry'] / ms['float']:>9.2f}{ms['ort ref'] / ms['float']:>8.2f}"
              f"{acc['float']:>10.3f}{acc['int8']:>7.3f}{acc['no-entry']:>7.3f}{acc['ort ref']:>7.3f}  {ops}")


if __name__ == "__main__":
    main()
