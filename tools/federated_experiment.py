"""Fleet fine-tuning on the digits (issue 19's experiment): federated against centralised static 8/8 training,
8-bit against fp32 updates, robust strategies under a client sending scaled garbage, FracTrain on every client.

    python -m tools.federated_experiment [--clients 10] [--rounds 5] [--local-steps 10] [--alpha 0.5] [--lr LR]
                                         [--out fleet-experiment] [--only NAME,...]

The task is the demo's: the shipped LeNet-5 (trained on upright digits) fine-tuned on the digits rotated a
quarter turn, written once as OUT/rotated_digits.npz (a digits:PATH source, so every client reads it). Each
federation splits it Dirichlet(--alpha) over --clients; the centralised run trains the same model for the same
total number of local steps (clients x rounds x local steps) and batch size. OUT/results.json holds every
figure and OUT/results.md the table.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from edgetrain.cli.demo import demo_model_path
from edgetrain.data import load_data
from edgetrain.data.digits import DIGITS_PATH
from edgetrain.errors import EdgetrainError
from edgetrain.fleet.settings import FleetSettings
from edgetrain.train.config import TrainConfig
from edgetrain.train.runstate import build_model
from edgetrain.train.trainer import Trainer, clear_run_dir

TRAIN = {"schedule": "static", "bits": "8/8", "lr": 0.02, "momentum": 0.9, "batch_size": 64}
FRACTRAIN = {**{k: v for k, v in TRAIN.items() if k != "bits"}, "schedule": "fractrain"}
GARBAGE = "0:garbage"  # client 0 sends well-formed, finite updates 50 times too large, every round


def rotated_digits(out: Path) -> str:
    """The shipped digits turned a quarter turn, as a digits.npz of their own; returns its data spec."""
    src = np.load(DIGITS_PATH)
    path = out / "rotated_digits.npz"
    np.savez(path, **{k: np.ascontiguousarray(np.rot90(src[k], 1, axes=(1, 2))) if k.startswith("x") else src[k]
                      for k in src.files})
    return f"digits:{path}"


def centralised(data: str, steps: int, out: Path, seed: int) -> dict:
    """Static 8/8 on all the data in one place: the reference accuracy."""
    run = out / "centralised"
    clear_run_dir(run)
    config = TrainConfig(model=demo_model_path(), data=data, steps=steps, seed=seed, eval_every=steps, out=str(run),
                         **{k: v for k, v in TRAIN.items()})
    model, _ = build_model(config.model, seed, None)
    started = time.perf_counter()
    result = Trainer(model, load_data(data, seed=seed), config, export_model=False).fit()
    return {"accuracy": result.test_accuracy, "bitops": result.bitops, "seconds": time.perf_counter() - started}


def federation(name: str, data: str, args: argparse.Namespace, *, strategy: str = "fedavg", bits: str = "8",
               train: dict | None = None, fault: str = "") -> dict:
    """One federation in the simulation runtime; its rounds.jsonl summarised."""
    from edgetrain.fleet.simulate import simulate

    out = Path(args.out) / name
    if out.exists():
        import shutil

        shutil.rmtree(out)
    settings = FleetSettings(model=demo_model_path(), data=data, clients=args.clients, rounds=args.rounds,
                             partition=f"dirichlet:{args.alpha}", local_steps=args.local_steps, seed=args.seed,
                             strategy=strategy, update_bits=bits, out=str(out), export=False, fault=fault,
                             train=json.dumps({**(train or TRAIN), **({"lr": args.lr} if args.lr else {})}))
    started = time.perf_counter()
    failed = None
    try:
        simulate(settings)
    except EdgetrainError as exc:  # a federation FedAvg lets garbage wreck ends when no client can train on
        failed = str(exc)
    rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    return {"accuracy": rounds[-1]["accuracy"], "failed": failed, "rounds_done": len(rounds),
            "accuracy_per_round": [r["accuracy"] for r in rounds],
            "uplink_bytes_per_round": float(np.mean([r["uplink_bytes"] for r in rounds])),
            "downlink_bytes_per_round": float(np.mean([r["downlink_bytes"] for r in rounds])),
            "client_bitops": float(sum(r["bitops"] for r in rounds)), "seconds": time.perf_counter() - started}


RUNS = {
    "fedavg-8bit": {},
    "fedavg-fp32": {"bits": "fp32"},
    "garbage-fedavg": {"fault": GARBAGE},
    "garbage-fedtrimmedavg": {"fault": GARBAGE, "strategy": "fedtrimmedavg"},
    "garbage-krum": {"fault": GARBAGE, "strategy": "krum"},
    "fractrain-8bit": {"train": FRACTRAIN},
}


def table(results: dict) -> str:
    """The results as a markdown table."""
    rows = ["| run | final accuracy | uplink kB/round | downlink kB/round | client BitOPs | time |",
            "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in results.items():
        if name == "settings":
            continue
        up = f"{r['uplink_bytes_per_round'] / 1e3:.1f}" if "uplink_bytes_per_round" in r else ""
        down = f"{r['downlink_bytes_per_round'] / 1e3:.1f}" if "downlink_bytes_per_round" in r else ""
        ops = r.get("client_bitops", r.get("bitops", 0.0))
        note = f" (stopped after round {r['rounds_done']}: {r['failed']})" if r.get("failed") else ""
        rows.append(f"| {name} | {r['accuracy']:.2%}{note} | {up} | {down} | {ops:.3e} | {r['seconds']:.0f} s |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    """Run the experiment; print and write the table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--local-steps", type=int, default=10)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--lr", type=float, default=None,
                   help=f"the clients' local learning rate (default {TRAIN['lr']}; the centralised run keeps that)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="fleet-experiment")
    p.add_argument("--only", default="", help="comma-separated run names (centralised, " + ", ".join(RUNS) + ")")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = rotated_digits(out)
    only = set(filter(None, args.only.split(",")))
    results: dict = {"settings": vars(args)}
    results_path = out / "results.json"
    if not only or "centralised" in only:
        results["centralised"] = centralised(data, args.clients * args.rounds * args.local_steps, out, args.seed)
        results_path.write_text(json.dumps(results, indent=2))
    for name, kw in RUNS.items():
        if only and name not in only:
            continue
        results[name] = federation(name, data, args, **kw)
        results_path.write_text(json.dumps(results, indent=2))  # after each run: a partial table survives a stop
        print(f"{name}: {results[name]['accuracy']:.2%}", flush=True)
    text = table(results)
    (out / "results.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
