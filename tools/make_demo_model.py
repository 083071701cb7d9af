"""Regenerate the shipped demo model: LeNet-5 trained in fp32 on the shipped (upright) digits.

    python -m tools.make_demo_model [--out edgetrain/assets/lenet5_digits.onnx] [--epochs 6] [--seed 0]

The demo then fine-tunes it on a shifted domain (rotated digits), so it has to start from a model that
already knows the upright ones.
"""
from __future__ import annotations

import argparse
import os
import sys

import edgetrain
from edgetrain.data import load_digits
from edgetrain.export import export_onnx
from edgetrain.train.loop import accuracy, fit
from edgetrain.train.optim import SGD
from models import build_model

DEFAULT_OUT = os.path.join("edgetrain", "assets", "lenet5_digits.onnx")
BATCH_SIZE = 64
LEARNING_RATE = 0.05
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=DEFAULT_OUT)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    x, y = load_digits("train")
    xt, yt = load_digits("test")
    model = edgetrain.load(build_model("lenet5", seed=args.seed))
    steps = args.epochs * (len(x) // BATCH_SIZE)
    opt = SGD(model.parameters(), LEARNING_RATE, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    losses = fit(model, x, y, steps=steps, batch_size=BATCH_SIZE, optimizer=opt, seed=args.seed, progress=True)
    acc = accuracy(model, xt, yt)
    export_onnx(model, args.out)
    print(f"{args.out}: LeNet-5, {steps} steps, final loss {sum(losses[-50:]) / 50:.4f}, test accuracy {acc:.2%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
