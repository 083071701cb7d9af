"""Throughput of the integer kernels at ResNet-20 CIFAR shapes, against NumPy float32 BLAS.

For every conv shape it times forward, backward-data and backward-weight of the integer kernels
and a NumPy float32 matmul of the same im2col GEMM (the float side gets its im2col for free, so
the comparison flatters float), and estimates one ResNet-20 training step's conv time.

    python -m tools.bench_kernels [--batch 128] [--bits 8] [--repeats 5] [--rounds 3] [--json] [--torch]

GOP/s counts 2 operations per multiply-accumulate. Each figure is the best of `--repeats` calls
in each of `--rounds` passes, because other processes on a small machine only ever make a run
slower.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass

import numpy as np

from edgetrain import kernels
from edgetrain.kernels import routes


@dataclass(frozen=True)
class ConvShape:
    """One conv layer: channels in/out, input size, 3x3 kernel, padding 1."""

    name: str
    c_in: int
    c_out: int
    size: int
    stride: int
    count: int  # how many layers of this shape one ResNet-20 has


# ResNet-20 for CIFAR (option-A shortcuts: no 1x1 convs): stem, 3 stages of 3 basic blocks.
RESNET20 = [
    ConvShape("stem 3->16 32x32", 3, 16, 32, 1, 1),
    ConvShape("16->16 32x32", 16, 16, 32, 1, 6),
    ConvShape("16->32 32x32 s2", 16, 32, 32, 2, 1),
    ConvShape("32->32 16x16", 32, 32, 16, 1, 5),
    ConvShape("32->64 16x16 s2", 32, 64, 16, 2, 1),
    ConvShape("64->64 8x8", 64, 64, 8, 1, 5),
]


def best_time(fn, repeats: int) -> float:
    """Seconds of the fastest of `repeats` calls (after one warm-up call)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def operands(shape: ConvShape, batch: int, bits: int, rng: np.random.Generator):
    """Unsigned activations (post-ReLU), signed weights and signed output gradients at `bits`."""
    qmax = 2 ** (bits - 1) - 1
    dt = np.int8 if bits <= 8 else np.int16
    x_dtype = np.uint8 if bits <= 8 else np.uint16
    x = rng.integers(0, 2 ** bits, (batch, shape.c_in, shape.size, shape.size)).astype(x_dtype)
    w = rng.integers(-qmax, qmax + 1, (shape.c_out, shape.c_in, 3, 3)).astype(dt)
    out = (shape.size + 2 - 3) // shape.stride + 1
    dy = rng.integers(-qmax, qmax + 1, (batch, shape.c_out, out, out)).astype(dt)
    return x, w, dy, out


def bench_conv(shape: ConvShape, batch: int, bits: int, repeats: int, rng: np.random.Generator) -> list[dict]:
    x, w, dy, out = operands(shape, batch, bits, rng)
    conv = dict(stride=shape.stride, pads=(1, 1, 1, 1))
    macs = batch * out * out * shape.c_out * shape.c_in * 9
    rows, k = batch * out * out, shape.c_in * 9
    a = rng.standard_normal((rows, k), dtype=np.float32)
    wf = rng.standard_normal((k, shape.c_out), dtype=np.float32)
    g = rng.standard_normal((rows, shape.c_out), dtype=np.float32)
    cases = {
        "forward": (lambda: kernels.conv2d_forward(x, w, **conv), lambda: a @ wf),
        "backward_data": (lambda: kernels.conv2d_backward_data(dy, w, x.shape, **conv), lambda: g @ wf.T),
        "backward_weight": (lambda: kernels.conv2d_backward_weight(dy, x, w.shape, **conv), lambda: g.T @ a),
    }
    records = []
    for kind, (int_fn, float_fn) in cases.items():
        t_int = best_time(int_fn, repeats)
        t_float = best_time(float_fn, repeats)
        records.append(dict(layer=shape.name, kind=kind, count=shape.count, macs=macs, int_ms=1e3 * t_int,
                            int_gops=2 * macs / t_int / 1e9, f32_ms=1e3 * t_float, f32_gops=2 * macs / t_float / 1e9))
    return records


def bench_gemm(m: int, k: int, n: int, bits: int, repeats: int, rng: np.random.Generator) -> dict:
    qmax = 2 ** (bits - 1) - 1
    dt = np.int8 if bits <= 8 else np.int16
    a = rng.integers(-qmax, qmax + 1, (m, k)).astype(dt)
    b = rng.integers(-qmax, qmax + 1, (k, n)).astype(dt)
    af, bf = a.astype(np.float32), b.astype(np.float32)
    t_int = best_time(lambda: kernels.gemm(a, b), repeats)
    t_float = best_time(lambda: af @ bf, repeats)
    macs = m * k * n
    return dict(layer=f"gemm {m}x{k}x{n}", kind="gemm", count=0, macs=macs, int_ms=1e3 * t_int,
                int_gops=2 * macs / t_int / 1e9, f32_ms=1e3 * t_float, f32_gops=2 * macs / t_float / 1e9)


def best_of(a: dict, b: dict) -> dict:
    """Merge two measurements of the same case, keeping each side's faster time."""
    out = dict(a)
    for side in ("int", "f32"):
        if b[f"{side}_ms"] < a[f"{side}_ms"]:
            out[f"{side}_ms"], out[f"{side}_gops"] = b[f"{side}_ms"], b[f"{side}_gops"]
    return out


def torch_step_ms(batch: int, repeats: int) -> float | None:
    """PyTorch fp32 forward+backward of the same conv stack (convs only), or None without torch."""
    try:
        import torch
    except ImportError:
        return None
    total = 0.0
    for s in RESNET20:
        x = torch.randn(batch, s.c_in, s.size, s.size, requires_grad=s.name[:4] != "stem")
        conv = torch.nn.Conv2d(s.c_in, s.c_out, 3, s.stride, 1, bias=False)

        def step(conv=conv, x=x):
            y = conv(x)
            y.backward(torch.ones_like(y))

        total += s.count * best_time(step, repeats)
    return 1e3 * total


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--bits", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5, help="timed calls per case and round")
    p.add_argument("--rounds", type=int, default=3,
                   help="passes over all cases; each figure is the best over rounds, so a burst of load "
                        "from another process spoils at most one round")
    p.add_argument("--json", action="store_true", help="print the records as JSON instead of a table")
    p.add_argument("--torch", action="store_true", help="also time PyTorch fp32 on the same conv stack")
    p.add_argument("--backend", choices=routes.CHOICES, default=None,
                   help=f"integer route (default ${routes.ENV_VAR}, else auto: the fastest that passes its probe)")
    p.add_argument("--threads", type=int, default=None, help="Numba (and onnxruntime) threads")
    args = p.parse_args(argv)
    kernels.use_backend(args.backend)
    if args.threads:
        import numba
        numba.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    records: list[dict] = []
    for _ in range(max(1, args.rounds)):
        this_round = []
        for shape in RESNET20:
            this_round += bench_conv(shape, args.batch, args.bits, args.repeats, rng)
        this_round.append(bench_gemm(8192, 576, 64, args.bits, args.repeats, rng))
        this_round.append(bench_gemm(1024, 1024, 1024, args.bits, args.repeats, rng))
        records = this_round if not records else [best_of(a, b) for a, b in zip(records, this_round, strict=True)]
    # The stem's input needs no gradient, so a training step skips its backward-data.
    step = {side: sum(r["count"] * r[side] for r in records
                      if r["count"] and not (r["layer"].startswith("stem") and r["kind"] == "backward_data"))
            for side in ("int_ms", "f32_ms")}
    torch_ms = min(torch_step_ms(args.batch, args.repeats) or 0.0 for _ in range(args.rounds)) if args.torch else None
    summary = dict(batch=args.batch, bits=args.bits, threads=_threads(), backend=kernels.get_backend().name,
                   routes=routes.describe(), cpu_int8=routes.cpu_int8_features(),
                   int_conv_step_ms=step["int_ms"],
                   f32_matmul_step_ms=step["f32_ms"], torch_conv_step_ms=torch_ms or None)
    if args.json:
        print(json.dumps(dict(summary=summary, records=records), indent=1))
        return 0
    print(f"{'layer':<22}{'kind':<17}{'int ms':>9}{'int GOP/s':>11}{'f32 ms':>9}{'f32 GOP/s':>11}{'int/f32':>9}")
    for r in records:
        print(f"{r['layer']:<22}{r['kind']:<17}{r['int_ms']:9.2f}{r['int_gops']:11.1f}{r['f32_ms']:9.2f}"
              f"{r['f32_gops']:11.1f}{r['int_gops'] / r['f32_gops']:9.2f}")
    print(f"ResNet-20 batch {args.batch} conv time per training step: integer {step['int_ms']:.0f} ms, "
          f"float32 im2col matmuls {step['f32_ms']:.0f} ms"
          + (f", PyTorch fp32 convs {torch_ms:.0f} ms" if torch_ms else "")
          + f" ({summary['threads']} threads, {args.bits}-bit, backend {summary['backend']})")
    print(f"route: {summary['backend']}; CPU 8-bit features: {', '.join(summary['cpu_int8']) or 'none'}; "
          + "; ".join(f"{name}: {verdict}" for name, verdict in summary["routes"].items()))
    return 0


def _threads() -> int:
    import numba
    return int(numba.get_num_threads())


if __name__ == "__main__":
    raise SystemExit(main())
