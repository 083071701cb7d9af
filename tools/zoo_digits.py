"""Fine-tune a registry model on the shipped digits in fp32 and in integer arithmetic: the accuracy bar.

    python -m tools.zoo_digits MODEL [--pretrain-steps 600] [--steps 300] [--seed 0] [--bits 8/8]
                               [--out DIR] [--json]

The user's situation, as in `edgetrain demo`: a model that knows upright digits (here pretrained in fp32
from the builder's initialisation on the shipped digits) is fine-tuned on the same digits turned a quarter
turn, once in fp32 and once at static `--bits`, with the same seed, steps and optimiser; reported is the
test accuracy on the rotated digits for both, and their difference in points. MODEL is a name from
models/ (`python -m models.build`), e.g. mobilenetv3_small or vit_tiny.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from edgetrain.cli.demo import rotated_split
from edgetrain.data import load_data
from edgetrain.train.config import TrainConfig
from edgetrain.train.runstate import build_model
from edgetrain.train.trainer import Trainer, clear_run_dir, evaluate
from models import BUILDERS, save_model
from models import build_model as build_registry_model

# Per-model optimiser settings: the transformer wants Adam, the CNNs SGD with momentum as the demo uses.
RECIPES = {
    "vit_tiny": dict(optimizer="adamw", lr=2e-3, weight_decay=0.05, lr_schedule="cosine", warmup_steps=50),
}
DEFAULT_RECIPE = dict(optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=5e-4, lr_schedule="cosine")
BATCH_SIZE = 64


def _fit(model_path: str, split, schedule: str, bits: str | None, steps: int, seed: int, run_dir: Path,
         recipe: dict, desc: str):
    clear_run_dir(run_dir)
    config = TrainConfig(model=model_path, data=None, schedule=schedule, bits=bits, steps=steps, batch_size=BATCH_SIZE,
                         seed=seed, eval_every=steps, out=str(run_dir), **recipe)
    model, _ = build_model(model_path, seed, None)
    result = Trainer(model, split, config, progress=True, desc=desc).fit()
    return model, result


def run(name: str, pretrain_steps: int, steps: int, seed: int, bits: str, out: Path) -> dict:
    """Pretrain in fp32 on upright digits, fine-tune on rotated digits in fp32 and at `bits`; return the figures."""
    out.mkdir(parents=True, exist_ok=True)
    source = out / f"{name}.onnx"
    save_model(build_registry_model(name, seed=seed), source)
    recipe = RECIPES.get(name, DEFAULT_RECIPE)
    upright = load_data("digits", seed=seed)
    rotated = rotated_split(upright)
    pre_model, pre = _fit(str(source), upright, "fp32", None, pretrain_steps, seed, out / "pretrain", recipe,
                          f"{name} pretrain")
    pretrained = str(out / "pretrain" / "model.onnx")
    before = evaluate(pre_model, rotated.test)["accuracy"]
    rows = {}
    for label, schedule, b in (("fp32", "fp32", None), (bits, "static", bits)):
        _, result = _fit(pretrained, rotated, schedule, b, steps, seed, out / label.replace("/", "-"), recipe,
                         f"{name} {label}")
        rows[label] = {"rotated_accuracy": result.test_accuracy, "percent_of_fp32_bitops": result.percent_of_fp32,
                       "train_seconds": result.seconds}
    gap = 100 * (rows["fp32"]["rotated_accuracy"] - rows[bits]["rotated_accuracy"])
    return {"model": name, "seed": seed, "pretrain_steps": pretrain_steps, "steps": steps, "batch_size": BATCH_SIZE,
            "recipe": recipe, "pretrained_upright_accuracy": pre.test_accuracy, "rotated_accuracy_before": before,
            "runs": rows, "points_below_fp32": gap}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the comparison and print it (a table, or JSON with --json)."""
    parser = argparse.ArgumentParser(prog="python -m tools.zoo_digits", description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=sorted(BUILDERS))
    parser.add_argument("--pretrain-steps", type=int, default=600)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bits", default="8/8")
    parser.add_argument("--out", type=Path, default=Path("zoo-digits"))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    result = run(args.model, args.pretrain_steps, args.steps, args.seed, args.bits, args.out / args.model)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{args.model}: upright after pretraining {result['pretrained_upright_accuracy']:.1%}, "
              f"rotated before fine-tuning {result['rotated_accuracy_before']:.1%}")
        for label, row in result["runs"].items():
            print(f"  fine-tuned {label:>5}: rotated {row['rotated_accuracy']:.1%}  "
                  f"({row['percent_of_fp32_bitops']:.1f}% of fp32 BitOPs, {row['train_seconds']:.0f} s)")
        print(f"  {args.bits} is {result['points_below_fp32']:+.1f} points below fp32")
    return 0


if __name__ == "__main__":
    sys.exit(main())
