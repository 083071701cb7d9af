"""Fleet fine-tuning on the digits (issue 19's experiment): federated against centralised static 8/8 training,
8-bit against fp32 updates, robust strategies under a client sending scaled garbage, FracTrain on every client.

    python -m tools.federated_experiment [--seeds 0,1,2] [--clients 10] [--rounds 25] [--local-steps 2]
                                         [--alpha 0.5] [--lr 0.15] [--server-momentum 0.3] [--in-process]
                                         [--out fleet-experiment] [--only NAME,...]

The task is the demo's: the shipped LeNet-5 (trained on upright digits) fine-tuned on the digits rotated a
quarter turn, written once as OUT/rotated_digits.npz (a digits:PATH source, so every client reads it). Each
federation splits it Dirichlet(--alpha) over --clients; the centralised run trains the same model for the same
total number of local steps (clients x rounds x local steps) and batch size, at its own lr (0.02). FedAvgM
(fedavgm-8bit) is FedAvg with the server's step carrying --server-momentum of the previous one. Every run is
repeated for each of --seeds (partition, data order, rounding). OUT/results.json holds every figure (per seed,
and the mean and spread over seeds, and the issue's bars), OUT/results.md the table, OUT/results.png the plot.
A run already in OUT/results.json under the same settings is kept, so a stopped experiment continues.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
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
# The budget (README, "closing the gap"): many short rounds at a larger local learning rate than the centralised
# run's; 10 x 25 x 2 = 500 steps, as the centralised run's. The server momentum was chosen on seeds 10 and 11 (not
# reported) among 0.3, 0.5, 0.7 and 0.9: the larger ones overshoot early and end far lower.
DEFAULTS = {"clients": 10, "rounds": 25, "local_steps": 2, "alpha": 0.5, "lr": 0.15, "server_momentum": 0.3,
            "seeds": "0,1,2"}
POINTS = 0.02  # the "within 2 points"
UPLINK_SHARE = 0.30  # the "at most 30% of fp32 FedAvg's uplink"


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


def federation(out: Path, data: str, args: argparse.Namespace, seed: int, *, strategy: str = "fedavg",
               bits: str = "8", train: dict | None = None, fault: str = "") -> dict:
    """One federation in the simulation runtime (or in this process: the same weights, bit for bit); its
    rounds.jsonl summarised."""
    from edgetrain.fleet.inprocess import run_inprocess
    from edgetrain.fleet.simulate import simulate

    if out.exists():
        shutil.rmtree(out)
    settings = FleetSettings(model=demo_model_path(), data=data, clients=args.clients, rounds=args.rounds,
                             partition=f"dirichlet:{args.alpha}", local_steps=args.local_steps, seed=seed,
                             strategy=strategy, server_momentum=args.server_momentum, update_bits=bits,
                             out=str(out), export=False, fault=fault,
                             train=json.dumps({**(train or TRAIN), "lr": args.lr}))
    started = time.perf_counter()
    failed = None
    try:
        if args.in_process:
            run_inprocess(settings)
        else:
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
    "fedavgm-8bit": {"strategy": "fedavgm"},
    "fedavg-fp32": {"bits": "fp32"},
    "garbage-fedavg": {"fault": GARBAGE},
    "garbage-fedtrimmedavg": {"fault": GARBAGE, "strategy": "fedtrimmedavg"},
    "garbage-krum": {"fault": GARBAGE, "strategy": "krum"},
    "garbage-fedtrimmedavgm": {"fault": GARBAGE, "strategy": "fedtrimmedavgm"},
    "fractrain-8bit": {"train": FRACTRAIN},
}
LABELS = {"centralised": "centralised static 8/8", "fedavg-8bit": "FedAvg, 8-bit updates",
          "fedavg-fp32": "FedAvg, fp32 updates",
          "fedavgm-8bit": "FedAvgM (server momentum), 8-bit updates",
          "garbage-fedavg": "client 0 sends garbage, FedAvg",
          "garbage-fedtrimmedavg": "client 0 sends garbage, FedTrimmedAvg",
          "garbage-krum": "client 0 sends garbage, Krum",
          "garbage-fedtrimmedavgm": "client 0 sends garbage, FedTrimmedAvg + server momentum",
          "fractrain-8bit": "FracTrain on every client, 8-bit updates"}
KEPT = ("clients", "rounds", "local_steps", "alpha", "lr", "server_momentum")  # settings a kept run must share


def summarise(per_seed: dict[str, dict[str, dict]]) -> dict[str, dict]:
    """Per run: the mean, standard deviation (over seeds), minimum and maximum of each figure, and the seeds."""
    out: dict[str, dict] = {}
    names = [n for n in ("centralised", *RUNS) if any(n in runs for runs in per_seed.values())]
    for name in names:
        rows = {s: runs[name] for s, runs in per_seed.items() if name in runs}
        acc = np.array([r["accuracy"] for r in rows.values()])
        entry = {"seeds": [int(s) for s in rows], "accuracy_per_seed": acc.tolist(), "accuracy": float(acc.mean()),
                 "accuracy_std": float(acc.std()), "accuracy_min": float(acc.min()), "accuracy_max": float(acc.max()),
                 "failed": [r.get("failed") for r in rows.values()],
                 "seconds": float(np.mean([r["seconds"] for r in rows.values()]))}
        for key in ("uplink_bytes_per_round", "downlink_bytes_per_round", "client_bitops", "bitops"):
            if all(key in r for r in rows.values()):
                entry[key] = float(np.mean([r[key] for r in rows.values()]))
        curves = [r["accuracy_per_round"] for r in rows.values() if "accuracy_per_round" in r]
        if curves:  # each round's mean over the seeds that reached it (a wrecked federation stops early)
            entry["accuracy_per_round"] = [float(np.mean([c[i] for c in curves if len(c) > i]))
                                           for i in range(max(map(len, curves)))]
        out[name] = entry
    return out


def _common(per_seed: dict[str, dict[str, dict]], names: tuple[str, ...]) -> list[str]:
    """The seeds at which every one of these runs was measured (a comparison uses only those)."""
    return [seed for seed, runs in per_seed.items() if all(n in runs for n in names)]


def _mean(per_seed: dict[str, dict[str, dict]], seeds: list[str], name: str, key: str = "accuracy") -> float:
    return float(np.mean([per_seed[seed][name][key] for seed in seeds]))


def bars(per_seed: dict[str, dict[str, dict]]) -> dict[str, dict]:
    """The issue's four checks, each on the means over the seeds its runs share (checks lacking a run are left out)."""
    out: dict[str, dict] = {}
    for name, key in (("fedavg-8bit", "8bit_within_2_points_of_centralised"),
                      ("fedavgm-8bit", "8bit_fedavgm_within_2_points_of_centralised")):
        if seeds := _common(per_seed, ("centralised", name)):
            gaps = [per_seed[x]["centralised"]["accuracy"] - per_seed[x][name]["accuracy"] for x in seeds]
            out[key] = {"seeds": seeds, "gap_points": 100 * float(np.mean(gaps)),
                        "gap_points_per_seed": [100 * g for g in gaps], "holds": bool(np.mean(gaps) <= POINTS),
                        "holds_at_every_seed": bool(max(gaps) <= POINTS)}
    pair = ("fedavg-8bit", "fedavg-fp32")
    if seeds := _common(per_seed, pair):
        share = (_mean(per_seed, seeds, pair[0], "uplink_bytes_per_round")
                 / _mean(per_seed, seeds, pair[1], "uplink_bytes_per_round"))
        out["uplink_at_most_30_percent_of_fp32"] = {"seeds": seeds, "share": share,
                                                    "holds": bool(share <= UPLINK_SHARE)}
    # the garbage runs measured at all (FedTrimmedAvg with server momentum came later than the others)
    garbage = tuple(n for n in RUNS if n.startswith("garbage-") and any(n in runs for runs in per_seed.values()))

    def drops_below(clean: str, seeds: list[str]) -> tuple[dict[str, float], list[str]]:
        """Each garbage run's points below the clean run `clean`, and the robust ones within the bar."""
        mean = _mean(per_seed, seeds, clean)
        drops = {n: 100 * (mean - _mean(per_seed, seeds, n)) for n in garbage}
        return drops, [n for n in garbage if n != "garbage-fedavg" and drops[n] <= 100 * POINTS]

    if seeds := _common(per_seed, ("fedavg-8bit", *garbage)):
        drops, robust = drops_below("fedavg-8bit", seeds)
        out["robust_within_2_points_where_fedavg_is_not"] = {
            "seeds": seeds, "drop_points_vs_clean": drops, "within": robust,
            "holds": bool(robust) and drops["garbage-fedavg"] > 100 * POINTS}
        if momentum := _common(per_seed, ("fedavgm-8bit", *garbage)):  # against the clean run with server momentum
            drops, robust = drops_below("fedavgm-8bit", momentum)
            out["robust_within_2_points_where_fedavg_is_not"].update(
                drop_points_vs_clean_fedavgm={"seeds": momentum, **drops}, within_vs_fedavgm=robust)
    pair = ("fedavg-8bit", "fractrain-8bit")
    if seeds := _common(per_seed, pair):
        out["fractrain"] = {
            "seeds": seeds, "bitops_saved_percent": 100 * (1 - _mean(per_seed, seeds, pair[1], "client_bitops")
                                                           / _mean(per_seed, seeds, pair[0], "client_bitops")),
            "accuracy_cost_points": 100 * (_mean(per_seed, seeds, pair[0]) - _mean(per_seed, seeds, pair[1]))}
    return out


def table(summary: dict[str, dict]) -> str:
    """The means over seeds as a markdown table (accuracy: mean, standard deviation and range)."""
    rows = ["| run | seeds | final accuracy, mean ± sd (min-max) | uplink kB/round | downlink kB/round "
            "| client BitOPs | time per run |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in summary.items():
        up = f"{r['uplink_bytes_per_round'] / 1e3:.1f}" if "uplink_bytes_per_round" in r else ""
        down = f"{r['downlink_bytes_per_round'] / 1e3:.1f}" if "downlink_bytes_per_round" in r else ""
        ops = r.get("client_bitops", r.get("bitops", 0.0))
        failed = sum(1 for f in r["failed"] if f)
        note = f"; {failed} of {len(r['failed'])} stopped early (every client failed)" if failed else ""
        acc = (f"{100 * r['accuracy']:.1f}% ± {100 * r['accuracy_std']:.1f} ({100 * r['accuracy_min']:.1f}-"
               f"{100 * r['accuracy_max']:.1f}){note}")
        seeds = ",".join(map(str, r["seeds"]))
        rows.append(f"| {LABELS.get(name, name)} | {seeds} | {acc} | {up} | {down} | {ops:.3e} "
                    f"| {r['seconds']:.0f} s |")
    return "\n".join(rows)


def plot(summary: dict[str, dict], path: Path, title: str) -> None:
    """Central accuracy per round (mean over seeds) of each federation beside the centralised run; uplink per round."""
    from edgetrain.cli.plot import pyplot

    plt = pyplot()
    fig, (acc_ax, up_ax) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [3, 2]})
    feds = [n for n in summary if n != "centralised"]
    for i, name in enumerate(feds):
        curve = summary[name].get("accuracy_per_round")
        if curve:
            acc_ax.plot(range(1, len(curve) + 1), [100 * a for a in curve], color=f"C{i}", label=LABELS[name])
    if "centralised" in summary:
        acc_ax.axhline(100 * summary["centralised"]["accuracy"], color="k", ls="--", lw=1,
                       label=f"{LABELS['centralised']} (final)")
    acc_ax.set_xlabel("round")
    acc_ax.set_ylabel("central test accuracy, % (mean over seeds)")
    acc_ax.set_ylim(0, 100)
    acc_ax.grid(alpha=0.3)
    acc_ax.legend(fontsize="x-small", loc="lower right")
    up = [(name, summary[name]["uplink_bytes_per_round"] / 1e3) for name in feds
          if "uplink_bytes_per_round" in summary[name]]
    up_ax.barh([LABELS[n] for n, _ in up], [v for _, v in up], color=[f"C{feds.index(n)}" for n, _ in up])
    up_ax.invert_yaxis()
    up_ax.set_xlabel("uplink kB per round (all clients)")
    up_ax.tick_params(axis="y", labelsize="x-small")
    up_ax.grid(alpha=0.3, axis="x")
    fig.suptitle(title, fontsize="medium")
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        seeds = []
    if not seeds or min(seeds) < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give non-negative integers separated by commas, e.g. 0,1,2")
    return seeds


def main(argv: list[str] | None = None) -> int:
    """Run the experiment; print and write the table, the figures and the plot."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=DEFAULTS["clients"])
    p.add_argument("--rounds", type=int, default=DEFAULTS["rounds"])
    p.add_argument("--local-steps", type=int, default=DEFAULTS["local_steps"])
    p.add_argument("--alpha", type=float, default=DEFAULTS["alpha"])
    p.add_argument("--lr", type=float, default=DEFAULTS["lr"],
                   help=f"the clients' local learning rate (default {DEFAULTS['lr']}; the centralised run keeps "
                        f"{TRAIN['lr']})")
    p.add_argument("--server-momentum", type=float, default=DEFAULTS["server_momentum"],
                   help=f"FedAvgM's server momentum (default {DEFAULTS['server_momentum']})")
    p.add_argument("--in-process", action="store_true",
                   help="run each federation in this process instead of Flower's simulation runtime (no Ray; "
                        "the same weights, bit for bit, on one core)")
    p.add_argument("--seeds", type=_seeds, default=_seeds(DEFAULTS["seeds"]), help="comma-separated (default 0,1,2)")
    p.add_argument("--out", default="fleet-experiment")
    p.add_argument("--only", default="", help="comma-separated run names (centralised, " + ", ".join(RUNS) + ")")
    args = p.parse_args(argv)
    only = set(filter(None, args.only.split(",")))
    unknown = sorted(only - {"centralised", *RUNS})
    if unknown:
        p.error(f"--only: unknown run {', '.join(unknown)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = rotated_digits(out)
    settings = {k: getattr(args, k) for k in KEPT}
    results_path = out / "results.json"
    per_seed: dict[str, dict[str, dict]] = {}
    if results_path.is_file():  # runs of the same settings already measured are kept (a stopped run continues)
        old = json.loads(results_path.read_text())
        stored = old.get("settings", {})
        # A setting the file does not name is one added since: its runs did not depend on it.
        if {k: stored.get(k, settings[k]) for k in KEPT} == settings:
            per_seed = old.get("per_seed", {})

    def save() -> dict:
        summary = summarise(per_seed)
        results = {"settings": settings, "per_seed": per_seed, "summary": summary, "bars": bars(per_seed)}
        results_path.write_text(json.dumps(results, indent=2))  # after each run: a partial table survives a stop
        return results

    for seed in args.seeds:
        runs = per_seed.setdefault(str(seed), {})
        for name in ("centralised", *RUNS):
            if (only and name not in only) or name in runs:
                continue
            if name == "centralised":
                runs[name] = centralised(data, args.clients * args.rounds * args.local_steps, out / f"seed-{seed}",
                                         seed)
            else:
                runs[name] = federation(out / f"seed-{seed}" / name, data, args, seed, **RUNS[name])
            save()
            print(f"seed {seed}, {name}: {runs[name]['accuracy']:.2%} ({runs[name]['seconds']:.0f} s)", flush=True)
    results = save()
    text = table(results["summary"])
    (out / "results.md").write_text(text + "\n")
    seeds = ",".join(per_seed)
    plot(results["summary"], out / "results.png",
         f"{args.clients} clients, Dirichlet {args.alpha}, {args.rounds} rounds x {args.local_steps} local steps "
         f"(clients' lr {args.lr}; FedAvgM's server momentum {args.server_momentum}), seeds {seeds}")
    print(text)
    print(json.dumps(results["bars"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
