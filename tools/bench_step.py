"""Training-step throughput: edgetrain's integer path (8/8) and fp32 path against PyTorch fp32.

    python tools/bench_step.py [--steps 10] [--warmup 3] [--threads 2] [--json]

Every figure comes from this one run on this machine: images/s from the median step time, and each
edgetrain path as a ratio to PyTorch fp32 at the same model, batch and thread count. Paths run one
after the other, so on a shared machine `tools/bench.py` (interleaved rounds, peak memory) is the
fairer comparison.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

import edgetrain  # noqa: E402
from models import build_model  # noqa: E402

CASES = [  # (label, builder name, batch, input shape per sample)
    ("ResNet-20 b128", "resnet20", 128, (3, 32, 32)),
    ("ResNet-20 b32", "resnet20", 32, (3, 32, 32)),
    ("MLP b128", "mlp", 128, (784,)),
]
PATHS = ("edgetrain int 8/8", "edgetrain fp32")


def _median_step(step, steps: int, warmup: int) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def make_edgetrain_step(name: str, batch: int, shape: tuple, precision: str):
    """A closure running one edgetrain training step (forward, backward, SGD update), and its model."""
    from edgetrain.optim import SGD

    model = edgetrain.load(build_model(name, seed=0))
    if precision != "fp32":
        model.set_precision(precision)
    opt = SGD(model.parameters(), 0.01, momentum=0.9)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch,) + shape).astype(np.float32)
    y = rng.integers(0, 10, batch)

    def step():
        model.step += 1
        _, g = model.loss_and_grad(x, y)
        opt.step(g)

    return step, model


def bench_edgetrain(name: str, batch: int, shape: tuple, precision: str, steps: int, warmup: int) -> float:
    """Median seconds of one edgetrain training step (forward, backward, SGD update)."""
    step, _ = make_edgetrain_step(name, batch, shape, precision)
    return _median_step(step, steps, warmup)


def _torch_model(name: str):
    import torch
    from torch import nn

    if name == "mlp":
        return nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 10))

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.short = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                          if stride != 1 or cin != cout else nn.Identity())

        def forward(self, x):
            y = torch.relu(self.bn1(self.conv1(x)))
            return torch.relu(self.bn2(self.conv2(y)) + self.short(x))

    n = 3  # ResNet-20: 6n + 2 layers
    layers, cin = [nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()], 16
    for cout, stride in ((16, 1), (32, 2), (64, 2)):
        for i in range(n):
            layers.append(Block(cin, cout, stride if i == 0 else 1))
            cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)]
    return nn.Sequential(*layers)


def make_torch_step(name: str, batch: int, shape: tuple):
    """A closure running one PyTorch fp32 training step of the same model (ImportError without torch)."""
    import torch

    torch.manual_seed(0)
    model = _torch_model(name)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn((batch,) + shape)
    y = torch.randint(0, 10, (batch,))

    def step():
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def bench_torch(name: str, batch: int, shape: tuple, steps: int, warmup: int) -> float | None:
    """Median seconds of one PyTorch fp32 training step, or None without torch."""
    try:
        step = make_torch_step(name, batch, shape)
    except ImportError:
        return None
    return _median_step(step, steps, warmup)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    import numba

    numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    try:
        import torch

        torch.set_num_threads(args.threads)
    except ImportError:
        pass
    from threadpoolctl import threadpool_limits

    rows = []
    with threadpool_limits(args.threads):
        for label, name, batch, shape in CASES:
            ref = bench_torch(name, batch, shape, args.steps, args.warmup)
            row = {"case": label, "batch": batch, "torch_fp32_s": ref,
                   "torch_fp32_img_s": batch / ref if ref else None}
            for path in PATHS:
                s = bench_edgetrain(name, batch, shape, "8/8" if "8/8" in path else "fp32", args.steps, args.warmup)
                row[path] = {"step_s": s, "img_s": batch / s, "vs_torch": (ref / s) if ref else None}
            rows.append(row)
    if args.json:
        print(json.dumps({"threads": args.threads, "rows": rows}, indent=2))
        return 0
    print(f"training step, {args.threads} threads, median of {args.steps} steps after {args.warmup} warm-up")
    head = f"{'case':16} {'torch fp32 img/s':>17} " + " ".join(f"{p + ' img/s':>24} {'x torch':>8}" for p in PATHS)
    print(head)
    for r in rows:
        line = f"{r['case']:16} {r['torch_fp32_img_s'] or float('nan'):17.0f} "
        line += " ".join(f"{r[p]['img_s']:24.0f} {r[p]['vs_torch'] or float('nan'):8.2f}" for p in PATHS)
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
