"""The check a new user makes: torchvision-style models fine-tuned at a small batch, against PyTorch.

    python -m tools.bench_zoo [--models resnet18,mobilenet_v2,...] [--size 128] [--batch 4] [--threads 1]
                              [--rounds 5] [--steps 3] [--json] [--out FILE]

Each model is built in PyTorch (`models.export_torch`, `models.torch_zoo`: torchvision's architectures module
for module, at their default widths, 10 classes), exported with `edgetrain.from_torch`, and trained one step
at a time (forward, backward, SGD with momentum) three ways in this one process: PyTorch fp32, edgetrain's
integer path (static 8/8) and edgetrain's fp32 path. The paths take turns, `--steps` steps each per round,
after a warm-up, so a shared machine's drift falls on all three alike; reported are the median step times
and each edgetrain path's speed as a ratio to PyTorch's (images/s, so above 1 is faster) and the integer
path's to edgetrain fp32's. Issue 18 measured this check at 2.5-4.4x slower than PyTorch (batch 4, one
thread). Needs the torch extra (`pip install 'edgetrain[torch]'`).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

MODELS = ("resnet18", "mobilenet_v2", "efficientnet_b0", "squeezenet", "mobilenet_v3_small", "shufflenet_v2",
          "mnasnet")
PATHS = ("torch fp32", "edgetrain int 8/8", "edgetrain fp32")
NUM_CLASSES = 10


def torch_model(name: str):
    """The PyTorch model `name` (one of MODELS), 10 classes, default width, seeded."""
    import torch

    from models.export_torch import torch_mobilenetv2, torch_resnet18
    from models.torch_zoo import EfficientNet, MNASNet, MobileNetV3Small, ShuffleNetV2, SqueezeNet

    builders: dict[str, Callable] = {
        "resnet18": lambda: torch_resnet18(NUM_CLASSES), "mobilenet_v2": lambda: torch_mobilenetv2(NUM_CLASSES),
        "efficientnet_b0": lambda: EfficientNet(NUM_CLASSES), "squeezenet": lambda: SqueezeNet(NUM_CLASSES),
        "mobilenet_v3_small": lambda: MobileNetV3Small(NUM_CLASSES), "shufflenet_v2": lambda: ShuffleNetV2(NUM_CLASSES),
        "mnasnet": lambda: MNASNet(NUM_CLASSES)}
    torch.manual_seed(0)
    return builders[name]()


def make_steps(name: str, size: int, batch: int, workdir: str) -> dict[str, Callable[[], None]]:
    """One training-step closure per path (PATHS) for model `name` on a fixed random batch."""
    import torch

    import edgetrain
    from edgetrain.train.loop import TrainStep
    from edgetrain.train.optim import SGD

    module = torch_model(name)
    path = os.path.join(workdir, f"{name}_{size}.onnx")
    edgetrain.from_torch(module, torch.randn(1, 3, size, size), path)
    module.train()
    opt = torch.optim.SGD(module.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, NUM_CLASSES, (batch,))

    def torch_step():
        opt.zero_grad()
        torch.nn.functional.cross_entropy(module(x), y).backward()
        opt.step()

    steps = {"torch fp32": torch_step}
    xn, yn = x.numpy(), y.numpy()
    for label, precision in (("edgetrain int 8/8", "8/8"), ("edgetrain fp32", "fp32")):
        model = edgetrain.load(path)
        if precision != "fp32":
            model.set_precision(precision)
        train_step = TrainStep(model, SGD(model.parameters(), 0.01, momentum=0.9))
        steps[label] = lambda m=model, t=train_step: t(m.step + 1, xn, yn)
    return steps


def bench_model(name: str, size: int, batch: int, rounds: int, steps: int, warmup: int, workdir: str) -> dict:
    """Median step times of the three paths, taking turns round by round, and the ratios."""
    fns = make_steps(name, size, batch, workdir)
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {p: [] for p in PATHS}
    for _ in range(rounds):
        for p in PATHS:
            for _ in range(steps):
                t = time.perf_counter()
                fns[p]()
                times[p].append(time.perf_counter() - t)
    med = {p: statistics.median(v) for p, v in times.items()}
    torch_s = med["torch fp32"]
    return {"model": name, "size": size, "batch": batch, "median_step_s": med,
            "vs_torch": {p: torch_s / med[p] for p in PATHS[1:]},
            "int_vs_edgetrain_fp32": med["edgetrain fp32"] / med["edgetrain int 8/8"]}


def _header(threads: int, batch: int, size: int) -> str:
    return (f"{threads} thread(s), batch {batch}, {size} px: median step ms (speed vs torch fp32)\n"
            f"{'model':20s} {'torch fp32':>11s} {'int 8/8':>16s} {'edgetrain fp32':>16s} {'int vs fp32':>12s}")


def _row(r: dict) -> str:
    m = r["median_step_s"]
    return (f"{r['model']:20s} {1e3 * m['torch fp32']:11.1f} "
            f"{1e3 * m['edgetrain int 8/8']:8.1f} ({r['vs_torch']['edgetrain int 8/8']:4.2f}x) "
            f"{1e3 * m['edgetrain fp32']:8.1f} ({r['vs_torch']['edgetrain fp32']:4.2f}x) "
            f"{r['int_vs_edgetrain_fp32']:11.2f}x")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    p.add_argument("--size", type=_positive, default=128, help="input side in pixels (default 128)")
    p.add_argument("--batch", type=_positive, default=4, help="batch size (default 4)")
    p.add_argument("--threads", type=_positive, default=1, help="threads for every path (default 1)")
    p.add_argument("--rounds", type=_positive, default=5, help="rounds of turns (default 5)")
    p.add_argument("--steps", type=_positive, default=3, help="timed steps per path per round (default 3)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per path first (default 2)")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown or not names:
        print(f"bench_zoo: unknown model(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(MODELS)}",
              file=sys.stderr)
        return 2
    try:
        import torch
    except ImportError:
        print("bench_zoo: needs PyTorch: pip install 'edgetrain[torch]'", file=sys.stderr)
        return 2
    from tools.bench import limit_threads

    torch.set_num_threads(args.threads)
    _limits = limit_threads(args.threads)
    result = {"threads": args.threads, "batch": args.batch, "size": args.size, "rounds": args.rounds,
              "steps_per_round": args.steps, "machine": {"platform": platform.platform(),
                                                         "processor": platform.processor() or platform.machine()},
              "models": []}
    if not args.json:
        print(_header(args.threads, args.batch, args.size), flush=True)
    with tempfile.TemporaryDirectory(prefix="edgetrain-zoo-") as workdir:
        for name in names:
            result["models"].append(bench_model(name, args.size, args.batch, args.rounds, args.steps,
                                                max(args.warmup, 0), workdir))
            if not args.json:
                print(_row(result["models"][-1]), flush=True)
    text = json.dumps(result, indent=1)
    if args.out:  # whole or not at all
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            f.write(text + "\n")
        os.replace(tmp, args.out)
    if args.json:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
