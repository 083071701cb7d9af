"""Training-step throughput: edgetrain's integer path (8/8) and fp32 path against PyTorch fp32.

    python -m tools.bench_step [--steps 10] [--warmup 3] [--threads 2] [--json]

Every figure comes from this one run on this machine: images/s from the median step time, and each
edgetrain path as a ratio to PyTorch fp32 at the same model, batch and thread count. Paths run one
after the other, so on a shared machine `tools/bench.py` (interleaved rounds, peak memory, FracTrain
mixes, cold start) is the fairer comparison; it builds its steps with the helpers here
(`make_edgetrain_step`, `make_torch_step`, `parse_mix`, `step_bitops`).
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time

import numpy as np

import edgetrain
from models import build_model

CASES = [  # (label, builder name, batch, input shape per sample)
    ("ResNet-20 b128", "resnet20", 128, (3, 32, 32)),
    ("ResNet-20 b32", "resnet20", 32, (3, 32, 32)),
    ("ResNet-8 b128", "resnet8", 128, (3, 32, 32)),
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


def parse_mix(text: str, candidates: tuple[str, ...] | None = None) -> dict[str, float]:
    """Read a FracTrain mix: "3/6" (every sample on one candidate) or "0:0.5,6/8:0.5" (shares per candidate).

    Returns {candidate text as DFQ names it ("skip", "3/6", ...): share}, shares summing to 1, in the
    order given; raises EdgetrainError (one line) on anything else.
    """
    from edgetrain.errors import EdgetrainError
    from edgetrain.precision.dfq.config import DEFAULT_CANDIDATES, DEFAULT_WEIGHT_BITS, SKIP_WORDS, parse_candidates

    candidates = tuple(candidates or DEFAULT_CANDIDATES)
    known = [c.text for c in parse_candidates(candidates, DEFAULT_WEIGHT_BITS)]
    shares: dict[str, float] = {}
    entries = [e.strip() for e in str(text).split(",")]
    if not any(entries):
        raise EdgetrainError(f"mix '{text}' is empty: give a candidate like 3/6, or shares like 0:0.5,6/8:0.5")
    for entry in entries:
        # one entry alone may omit its share; the candidates themselves never contain ':'
        spec, _, share_text = entry.rpartition(":") if ":" in entry else (entry, "", "1")
        spec, share_text = spec.strip(), share_text.strip()
        try:
            share = float(share_text)
        except ValueError:
            raise EdgetrainError(f"mix '{text}': share '{share_text}' of '{spec}' is not a number") from None
        if not share >= 0 or share == float("inf"):
            raise EdgetrainError(f"mix '{text}': share {share_text} of '{spec}' must be a finite number >= 0")
        try:
            # a skip word alone is no valid candidate list (nothing computes), so it is named here
            name = "skip" if spec.lower() in SKIP_WORDS else parse_candidates([spec], DEFAULT_WEIGHT_BITS)[0].text
        except EdgetrainError:
            name = None
        if name not in known:
            raise EdgetrainError(f"mix '{text}': '{spec}' is not a DFQ candidate; choose from {', '.join(candidates)}")
        if name in shares:
            raise EdgetrainError(f"mix '{text}': candidate '{spec}' appears twice")
        shares[name] = share
    total = sum(shares.values())
    if total <= 0:
        raise EdgetrainError(f"mix '{text}': the shares must add up to more than 0")
    return {name: share / total for name, share in shares.items()}


def mix_choices(mix: dict[str, float], candidate_texts: list[str], batch: int, seed: int = 0) -> np.ndarray:
    """Each sample's candidate index for a mix: counts by largest remainder, order shuffled with a fixed seed.

    Shuffled so the groups interleave in the batch as real gate output does (grouping then has to gather).
    """
    exact = {name: share * batch for name, share in mix.items()}
    counts = {name: int(v) for name, v in exact.items()}
    by_remainder = sorted(exact, key=lambda n: -(exact[n] - counts[n]))  # stable: ties keep the given order
    for name in by_remainder[:batch - sum(counts.values())]:
        counts[name] += 1
    order = np.repeat([candidate_texts.index(n) for n in counts], list(counts.values()))
    return np.random.default_rng(seed).permutation(order).astype(np.int64)


def enable_mix(model, mix: dict[str, float], batch: int, seed: int = 0, config=None):
    """Enable DFQ on `model` (`config`'s candidates, FracTrain's by default) with every gate forced to `mix`;
    returns the DFQ."""
    from edgetrain.errors import EdgetrainError
    from edgetrain.precision.dfq.config import DFQConfig
    from edgetrain.precision.dfq.controller import DFQ

    dfq = DFQ.attach(model, config or DFQConfig())
    texts = [c.text for c in dfq.candidates]
    choices = mix_choices(mix, texts, batch, seed)
    for u in dfq.units:
        allowed = dfq.unit_candidates[u.index]
        if not set(np.unique(choices).tolist()) <= set(allowed):
            raise EdgetrainError(f"unit '{u.name}' has no shortcut, so it cannot take every candidate of the mix "
                                 f"(it may take {', '.join(texts[k] for k in allowed)})")
    # the same assignment in every unit: reproducible, and each unit's groups are interleaved
    dfq.force = {u.index: choices for u in dfq.units}
    return dfq


def make_edgetrain_step(name: str, batch: int, shape: tuple, precision: str, mix: dict[str, float] | None = None,
                        dfq_config=None, **model_kwargs):
    """A closure running one edgetrain training step (forward, backward, SGD update), and its model.

    With a `mix` (parse_mix), the model is FracTrain's: int `precision` outside the gates, DFQ on its
    blocks (`dfq_config`, FracTrain's candidates by default), every gate forced to the mix.
    `model_kwargs` go to the model builder (tests: tiny models).
    """
    from edgetrain.train.loop import TrainStep
    from edgetrain.train.optim import SGD

    model = edgetrain.load(build_model(name, seed=0, **model_kwargs))
    if precision != "fp32":
        model.set_precision(precision)
    if mix is not None:
        enable_mix(model, mix, batch, config=dfq_config)
    train_step = TrainStep(model, SGD(model.parameters(), 0.01, momentum=0.9))  # after DFQ.attach: the gates train too
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch,) + shape).astype(np.float32)
    y = rng.integers(0, 10, batch)

    def step():
        train_step(model.step + 1, x, y)

    return step, model


def step_bitops(model) -> int:
    """BitOPs of the model's last training step: the trainer's per-step `bitops` figure (sum of LayerCost.total)."""
    return int(sum(c.total for c in model.last_cost.values()))


def bench_edgetrain(name: str, batch: int, shape: tuple, precision: str, steps: int, warmup: int) -> float:
    """Median seconds of one edgetrain training step (forward, backward, SGD update)."""
    step, _ = make_edgetrain_step(name, batch, shape, precision)
    return _median_step(step, steps, warmup)


def _torch_lenet5():
    """The twin of models.lenet.lenet5 at its defaults (1x28x28, conv1 padded to keep 28x28)."""
    from torch import nn

    from models.lenet import CONV1_PAD, CONV_KERNEL, POOL, lenet_feature_size

    side = lenet_feature_size(28)
    return nn.Sequential(nn.Conv2d(1, 6, CONV_KERNEL, padding=CONV1_PAD), nn.ReLU(), nn.MaxPool2d(POOL),
                         nn.Conv2d(6, 16, CONV_KERNEL), nn.ReLU(), nn.MaxPool2d(POOL), nn.Flatten(),
                         nn.Linear(16 * side * side, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10))


def _torch_mobilenetv2_cifar(width_mult: float = 1.0):
    """The twin of models.mobilenetv2.mobilenetv2_cifar (stride-1 stem and second stage, no dropout)."""
    from torch import nn

    from models.mobilenetv2 import CIFAR_INVERTED_RESIDUAL_SETTING, LAST_CHANNELS, STEM_CHANNELS, make_divisible

    def cbr(cin, cout, k, stride, groups=1):
        return [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout), nn.ReLU6()]

    class Inverted(nn.Module):
        def __init__(self, cin, cout, stride, expand):
            super().__init__()
            hidden = round(cin * expand)
            layers = cbr(cin, hidden, 1, 1) if expand != 1 else []
            layers += cbr(hidden, hidden, 3, stride, hidden) + [nn.Conv2d(hidden, cout, 1, bias=False),
                                                               nn.BatchNorm2d(cout)]
            self.conv = nn.Sequential(*layers)
            self.residual = stride == 1 and cin == cout

        def forward(self, x):
            return x + self.conv(x) if self.residual else self.conv(x)

    cin = make_divisible(STEM_CHANNELS * width_mult)
    layers = cbr(3, cin, 3, 1)
    for expand, channels, repeats, first_stride in CIFAR_INVERTED_RESIDUAL_SETTING:
        cout = make_divisible(channels * width_mult)
        for i in range(repeats):
            layers.append(Inverted(cin, cout, first_stride if i == 0 else 1, expand))
            cin = cout
    last = make_divisible(LAST_CHANNELS * max(1.0, width_mult))
    layers += cbr(cin, last, 1, 1) + [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(last, 10)]
    return nn.Sequential(*layers)


def _torch_model(name: str, **model_kwargs):
    """The PyTorch fp32 twin of models.build_model(name, **model_kwargs) (10 classes, default inputs): the MLP,
    LeNet-5, the CIFAR MobileNetV2 (`width_mult`), or a CIFAR ResNet-(6n+2)."""
    import torch
    from torch import nn

    if name == "mlp":
        return nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 10))
    if name == "lenet5":
        return _torch_lenet5()
    if name == "mobilenetv2":
        return _torch_mobilenetv2_cifar(**model_kwargs)

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

    depth = re.fullmatch(r"resnet(\d+)", name)
    if depth is None:
        raise ValueError(f"no PyTorch reference for model '{name}' (resnet<6n+2>, mlp, lenet5 or mobilenetv2)")
    n = (int(depth.group(1)) - 2) // 6  # like models/resnet.py: 6n + 2 layers, n blocks per stage
    layers, cin = [nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()], 16
    for cout, stride in ((16, 1), (32, 2), (64, 2)):
        for i in range(n):
            layers.append(Block(cin, cout, stride if i == 0 else 1))
            cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)]
    return nn.Sequential(*layers)


def make_torch_step(name: str, batch: int, shape: tuple, **model_kwargs):
    """A closure running one PyTorch fp32 training step of the same model (ImportError without torch)."""
    import torch

    torch.manual_seed(0)
    model = _torch_model(name, **model_kwargs)
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
