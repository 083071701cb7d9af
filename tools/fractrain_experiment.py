"""FracTrain's experiment on one model and data set: fp32, static 8/8 (SBM), PFQ, DFQ and FracTrain.

    python -m tools.fractrain_experiment [--model resnet8] [--steps 600] [--out fractrain-experiment]
    python -m tools.fractrain_experiment --small        # the CI form: a few steps, the same table

Every row trains the same model from the same seed on the same batches for the same number of
steps, each in its own process (so peak memory is that row's), then evaluates on the test split.
The table gives test accuracy, BitOPs as % of fp32 and as a saving against static 8/8, measured
training wall time (and its ratio to static 8/8), and peak resident memory. It is printed, saved as
JSON and drawn as a PNG.

The full form adds "dfq-time": DFQ whose cost is this host's measured time instead of BitOPs. The
model is first profiled through a simulated board (`edgetrain profile --simulate`, the agent running
here) at fp32, 8/8 and every candidate; the latency table goes to `--dfq-cost-table`, and the target
is `--time-fraction` of the gated layers' static 8/8 time. On a CPU whose integer unit is 8 bits wide
every candidate up to 8 bits costs about what 8/8 costs, so this is the row where the gates learn to
skip. "fractrain-time" is FracTrain on the same measured cost: its target steps keep their ratios to
the final target (CIFAR's 1.5, 2, 2.5, 3 of 3), so early training skips blocks and saves real time.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from edgetrain.cli.argtypes import NON_NEGATIVE_INT, POSITIVE_INT, bounded
from edgetrain.errors import EdgetrainError
from edgetrain.fileio import write_atomic
from edgetrain.precision.dfq.config import (
    DEFAULT_BETA,
    DEFAULT_CANDIDATES,
    DEFAULT_PROBE_MARGIN,
    DEFAULT_PROBE_SHARE,
    DEFAULT_PROBE_WEIGHT,
    DEFAULT_WEIGHT_BITS,
    PROBE_RULES,
    SELECTIONS,
)
from edgetrain.precision.dfq.controller import DFQ
from edgetrain.precision.dfq.recalibrate import recalibrate
from edgetrain.precision.fractrain import DEFAULT_TARGETS
from edgetrain.precision.spec import GRAD_RANGES, MAX_BITS, MIN_BITS
from edgetrain.quant.mac import RUNTIME_SETTINGS

ROWS = ("fp32", "static", "pfq", "dfq", "fractrain", "dfq-time", "fractrain-time", "dfq-probe", "fractrain-probe")
LABELS = {"fp32": "fp32", "static": "static 8/8 (SBM)", "pfq": "PFQ", "dfq": "DFQ", "fractrain": "FracTrain",
          "dfq-time": "DFQ, measured-time cost", "fractrain-time": "FracTrain, measured-time cost",
          "dfq-probe": "DFQ, probe estimator", "fractrain-probe": "FracTrain, probe estimator"}
TIMED_ROWS = ("dfq-time", "fractrain-time")  # rows whose cost is the host's measured latency table
PROBE_ROWS = ("dfq-probe", "fractrain-probe")  # rows whose gates also learn from probed candidates
SMALL_ROWS = ROWS[:5] + ("fractrain-probe",)
EVAL_BATCH = 250  # test samples per forward when recording the gates' per-sample choices
PROFILE_STEPS = 5  # timed steps per precision when measuring the host's latency table
PROFILE_HELLO_S = 120  # the simulated board's agent imports numba first: slow on a busy host
SHIPPED = "shipped"  # the demo's task: the shipped LeNet-5 (upright digits) fine-tuned on rotated digits
MODELS = ("resnet8", "resnet14", "resnet20", "resnet38", "lenet5", SHIPPED)
# The CI form: few steps, 64 test samples, no warm-up (its times mean nothing, so nothing to keep compiling out of).
SMALL = {"steps": 4, "period": 2, "batch_size": 8, "test_samples": 64, "warmup": 0}
WARMUP_STEPS = 3
POSITIVE_FLOAT = bounded(float, "a positive number", low=0.0, low_open=True)
NON_NEGATIVE_FLOAT = bounded(float, "a number >= 0", low=0.0)


def _schedule(row: str) -> str:
    """The training schedule a row runs (its name without the -time and -probe variants)."""
    return row.removesuffix("-time").removesuffix("-probe")


def _row_config(row: str, args: argparse.Namespace, out: str):
    """The TrainConfig of one row: everything but the schedule is shared."""
    from edgetrain.train.config import TrainConfig, validate

    extra: dict = {}
    if row == "static":
        extra["bits"] = args.static_bits or "8/8"
    schedule = _schedule(row)
    if schedule in ("pfq", "fractrain"):
        extra.update(pfq_period=args.period, pfq_eps=args.eps, pfq_alpha=args.alpha)
        if args.switch_at:  # manual mode: stages (targets) change at fixed shares of the budget
            extra["pfq_switch_steps"] = [max(1, round(f * args.steps)) for f in args.switch_at]
    if schedule in ("dfq", "fractrain"):
        # The row re-estimates the exported network's statistics itself, after measuring the gated one.
        extra.update(dfq_target=args.target, dfq_beta=args.beta, dfq_recalibration_batches=0)
        if args.candidates:
            extra["dfq_candidates"] = list(args.candidates)
    if row in TIMED_ROWS:
        # The host's measured per-layer latencies as the cost, so the target is a share of time.
        extra.update(dfq_target=args.time_target, dfq_cost_table=args.cost_table, dfq_min_exec_share=args.floor)
        if schedule == "fractrain" and args.floors:
            extra["fractrain_floors"] = list(args.floors)
    if schedule in ("dfq", "fractrain") and args.weight_bits != DEFAULT_WEIGHT_BITS:
        extra["dfq_weight_bits"] = args.weight_bits
    if schedule in ("dfq", "fractrain") and args.backward_share < 1:
        extra["dfq_backward_share"] = args.backward_share
    if schedule in ("dfq", "fractrain") and args.selection != "argmax":
        extra["dfq_selection"] = args.selection
    if row in PROBE_ROWS:
        extra.update(dfq_estimator="probe", dfq_probe_share=args.probe_share, dfq_probe_weight=args.probe_weight,
                     dfq_probe_margin=args.probe_margin, dfq_probe_rule=args.probe_rule)
    if schedule == "fractrain":
        # FracTrain's target steps keep their ratios to the final target (CIFAR: 1.5..3 of 3).
        final = extra["dfq_target"]
        steps = args.targets if args.targets and row not in TIMED_ROWS else DEFAULT_TARGETS
        extra["fractrain_targets"] = [final * t / steps[-1] for t in steps]
        if args.stage_grad_bits:
            extra["fractrain_grad_bits"] = list(args.stage_grad_bits)
    extra.update({name: getattr(args, name) for name in RUNTIME_SETTINGS})  # every row: options of the same names
    config = TrainConfig(schedule=schedule, steps=args.steps, batch_size=args.batch_size, seed=args.seed, lr=args.lr,
                         lr_schedule="cosine", weight_decay=5e-4, eval_every=args.steps, out=out, data="digits",
                         checkpoint_every=args.steps, keep=1, **extra)
    validate(config)
    return config


def _split(args: argparse.Namespace):
    """The digits every row trains and tests on: rotated a quarter turn for the shipped model's task."""
    from edgetrain.cli.demo import rotated_split
    from edgetrain.data import load_data

    split = load_data("digits", seed=args.seed, val_fraction=0.1)
    split = rotated_split(split) if args.model == SHIPPED else split
    if args.test_samples:
        split = dataclasses.replace(split, test=dataclasses.replace(split.test, x=split.test.x[:args.test_samples],
                                                                    y=split.test.y[:args.test_samples]))
    return padded_split(split, args.input_size) if args.input_size else split


def padded_split(split, size: int):
    """Every image centred on a size x size canvas of the background value (the digits' minimum): the
    CIFAR-shaped 32x32 input of the deeper ResNets."""
    import numpy as np

    h, w = split.train.x.shape[2:]
    if size < max(h, w):
        raise EdgetrainError(f"--input-size {size}: the images are {h}x{w}; it can only pad them")
    top, left = (size - h) // 2, (size - w) // 2
    pads = ((0, 0), (0, 0), (top, size - h - top), (left, size - w - left))
    background = float(split.train.x.min())

    def pad(d):
        return dataclasses.replace(d, x=np.pad(d.x, pads, constant_values=background))

    return dataclasses.replace(split, train=pad(split.train), test=pad(split.test))


def _build(args: argparse.Namespace, sample_shape: tuple):
    """The row's model as an ONNX ModelProto, sized for the digits' samples."""
    import models

    if args.model == SHIPPED:
        import onnx

        from edgetrain.cli.demo import demo_model_path
        return onnx.load(str(demo_model_path()))
    kwargs = {"num_classes": 10, "seed": args.seed}
    if args.model.startswith("resnet"):
        kwargs.update(in_channels=sample_shape[0], input_size=sample_shape[1])
    return models.build_model(args.model, **kwargs)


def run_row(row: str, args: argparse.Namespace) -> dict:
    """Train one row in this process; return its results."""

    from edgetrain.model import Model
    from edgetrain.onnx_import import Importer
    from edgetrain.train.trainer import Trainer

    split = _split(args)
    proto = _build(args, split.train.x.shape[1:])
    with tempfile.TemporaryDirectory() as tmp:
        # A few throwaway steps first, so compiling (or loading) the kernels is not counted as training time.
        if args.warmup:
            warm = argparse.Namespace(**{**vars(args), "steps": args.warmup, "switch_at": None})
            Trainer(Model(Importer(proto, args.model).run(), seed=args.seed), split,
                    _row_config(row, warm, os.path.join(tmp, "warmup")), export_model=False).fit()
        model = Model(Importer(proto, args.model).run(), seed=args.seed)
        trainer = Trainer(model, split, _row_config(row, args, os.path.join(tmp, "run")), export_model=False)
        started = time.perf_counter()
        result = trainer.fit()
        wall = time.perf_counter() - started
    label = f"static {args.static_bits}" if row == "static" and args.static_bits else LABELS[row]
    if row in PROBE_ROWS and args.probe_rule != "margin":
        label += f" ({args.probe_rule} rule)"
    if _schedule(row) in ("dfq", "fractrain") and args.selection != "argmax":
        label += f", {args.selection} selection"
    if args.grad_ranges != "tensor" and row != "fp32":
        label += f", {args.grad_ranges} gradient ranges"
    if args.clip_act_bits and row != "fp32":
        label += f", activations clipped at <= {args.clip_act_bits} bits"
    if args.clip_weight_bits and row != "fp32":
        label += f", weights clipped at <= {args.clip_weight_bits} bits"
    if args.stage_grad_bits and _schedule(row) == "fractrain":
        label += f", gradient bits by target {','.join(map(str, args.stage_grad_bits))}"
    out = {"row": row, "label": label, "test_accuracy": result.test_accuracy, "bitops": result.bitops,
           "fp32_bitops": result.fp32_bitops, "percent_of_fp32": result.percent_of_fp32,
           "train_seconds": result.seconds, "wall_seconds": wall,
           # In one process for every row, the process's peak is the largest row's so far: not this row's.
           "peak_rss_mb": None if args.in_process else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}
    controller = trainer.controller
    if hasattr(controller, "switches"):
        sw = controller.switches
        out["switches"] = [s if isinstance(s, dict) else s.as_dict() for s in sw]
    dfq = DFQ.of(model)
    if dfq is not None:
        out.update(gate_behaviour(model, dfq, split.test.x, split.test.y))
        if dfq.config.selection == "quota":
            out["quota_threshold"] = {u.name: dfq.quota_threshold(u) for u in dfq.units}
        # What `edgetrain train` exports: the same network with its statistics re-estimated at full depth.
        started = time.perf_counter()
        recalibrate(model, split.train.x, batch_size=args.batch_size, seed=args.seed)
        out["recalibration_seconds"] = time.perf_counter() - started
        out["full_depth_recalibrated_accuracy"] = full_depth_accuracy(model, dfq, split.test.x, split.test.y)
    return out


def full_depth_accuracy(model, dfq: DFQ, x, y) -> float:
    """Test accuracy of the network a static export serves: every block computing, at the exported candidate."""
    import numpy as np

    with dfq.forced(dfq.most_precise()):
        right = [np.asarray(model(x[i:i + EVAL_BATCH])).argmax(axis=1) == y[i:i + EVAL_BATCH]
                 for i in range(0, len(x), EVAL_BATCH)]
    return float(np.mean(np.concatenate(right)))


def gate_behaviour(model, dfq: DFQ, x, y) -> dict:
    """What the gates chose on the test split at the end, per sample: the share per candidate and away from
    the modal candidate in each block, each block's executed share, and accuracy by the share of blocks a
    sample executed (the per-sample plot)."""
    import numpy as np

    choices: dict[str, list] = {u.name: [] for u in dfq.units}
    percent, correct = [], []
    for start in range(0, len(x), EVAL_BATCH):
        logits = model(x[start:start + EVAL_BATCH])
        correct.append(np.asarray(logits).argmax(axis=1) == y[start:start + EVAL_BATCH])
        percent.append(dfq.sample_percent())
        for u in dfq.units:
            choices[u.name].append(dfq.record.choices[u.index])
    texts = [c.text for c in dfq.candidates]
    picked = {name: np.concatenate(parts) for name, parts in choices.items()}
    correct_all = np.concatenate(correct)
    summary, off, executed = {}, {}, {}
    for name, c in picked.items():
        counts = np.bincount(c, minlength=len(texts))
        summary[name] = {t: float(counts[k]) / len(c) for k, t in enumerate(texts)}
        off[name] = 1.0 - float(counts.max()) / len(c)
        executed[name] = float(np.mean(~dfq.skips[c]))
    per_sample = np.mean([~dfq.skips[c] for c in picked.values()], axis=0)  # share of blocks each sample ran
    # Share of blocks in which a sample ran a costlier candidate than its block's modal one: which samples the
    # gates give more bits, and whether those are the ones the network gets wrong.
    raised = []
    for u in dfq.units:
        c, cost = picked[u.name], dfq.unit_cost[u.index]
        raised.append(cost[c] > cost[np.bincount(c, minlength=len(texts)).argmax()])
    return {"test_choices": summary, "off_modal_share": off, "mean_off_modal_share": float(np.mean(list(off.values()))),
            "executed_share": executed, "accuracy_by_executed_share": _accuracy_by(per_sample, correct_all),
            "accuracy_by_raised_share": _accuracy_by(np.mean(raised, axis=0), correct_all),
            "gated_percent_of_fp32_test": float(np.mean(np.concatenate(percent))),
            # The network a static export serves, with the statistics the gated training left it.
            "full_depth_candidate": dfq.most_precise(), "full_depth_accuracy": full_depth_accuracy(model, dfq, x, y)}


def _accuracy_by(per_sample, correct) -> dict:
    """Samples and test accuracy per distinct value of a per-sample share (keys to 4 decimals)."""
    import numpy as np

    out = {}
    for share in np.unique(per_sample):
        mask = per_sample == share
        out[f"{share:.4f}"] = {"samples": int(mask.sum()), "accuracy": float(correct[mask].mean())}
    return out


# What a row's child process is told, as options of this script (lists go as comma lists; None is left out).
CHILD_OPTIONS = ("model", "steps", "batch_size", "seed", "lr", "period", "eps", "alpha", "target", "time_target",
                 "beta", "switch_at", "cost_table", "candidates", "static_bits", "targets", "input_size", "floor",
                 "floors", "probe_share", "probe_weight", "probe_margin", "probe_rule", "selection", "backward_share",
                 "weight_bits", "grad_ranges", "clip_act_bits", "clip_weight_bits", "stage_grad_bits", "test_samples",
                 "warmup")


def _child(row: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, "-m", "tools.fractrain_experiment", "--row", row]
    for name in CHILD_OPTIONS:
        value = getattr(args, name)
        if value is not None:
            cmd += ["--" + name.replace("_", "-"),
                    ",".join(str(v) for v in value) if isinstance(value, list) else str(value)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise EdgetrainError(f"row {row} failed: {tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure_latency(args: argparse.Namespace, folder: Path) -> tuple[str, float]:
    """Profile the model on this host (edgetrain profile --simulate: the board agent runs here) at fp32,
    8/8 and every DFQ candidate; returns the latency table's path and the gated layers' 8/8 time as a
    percentage of their fp32 time."""
    import models
    from edgetrain.onnx_import import load_graph
    from edgetrain.precision.dfq.config import DEFAULT_CANDIDATES, parse_candidates
    from edgetrain.precision.dfq.units import gating_plan
    from edgetrain.precision.latency import read_cost_table

    proto = _build(args, _split(args).train.x.shape[1:])
    model = folder / f"{args.model}.onnx"
    models.save_model(proto, model)
    table = folder / "latency.json"
    table.unlink(missing_ok=True)
    specs = ["fp32", "8/8"] + [str(c.precision) for c in parse_candidates(args.candidates or DEFAULT_CANDIDATES,
                                                                          args.weight_bits) if not c.skip]
    for spec in specs:  # the model is built at the experiment's input size, so the profile runs at it
        cmd = [sys.executable, "-m", "edgetrain.cli", "profile", str(model), "--simulate", "--precision", spec,
               "--batch-size", str(args.batch_size), "--steps", str(PROFILE_STEPS), "--warmup", "2",
               "--timeout", str(PROFILE_HELLO_S),
               "--latency-table", str(table), "--out", str(folder / "profile"), "--json"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise EdgetrainError(f"profiling at {spec} failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    costs = read_cost_table(table)
    gated = [name for unit in gating_plan(load_graph(proto))["units"] for name in unit["layers"]]
    share = 100.0 * sum(costs[n]["8/8"] for n in gated) / sum(costs[n]["fp32"] for n in gated)
    return str(table), share


def summarise(runs: list[dict]) -> list[dict]:
    """One row per schedule: the mean over seeds of every figure (with the accuracies of each seed), and
    the savings against static 8/8 and the time ratio, each taken within a seed and then averaged."""
    static = {r["seed"]: r for r in runs if r["row"] == "static"}
    for r in runs:
        base = static.get(r["seed"])
        if base:
            r["bitops_saving_vs_static"] = 100.0 * (1 - r["bitops"] / base["bitops"])
            r["accuracy_delta_vs_static"] = 100.0 * (r["test_accuracy"] - base["test_accuracy"])
            # A gated row's time includes re-estimating its export's statistics (part of what it costs).
            spent = r["train_seconds"] + r.get("recalibration_seconds", 0.0)
            r["time_ratio_vs_static"] = spent / base["train_seconds"]
            if r.get("full_depth_recalibrated_accuracy") is not None:
                r["exported_delta_vs_static"] = 100.0 * (r["full_depth_recalibrated_accuracy"] - base["test_accuracy"])
    rows = []
    for name, label in dict.fromkeys((r["row"], r["label"]) for r in runs):  # the label tells probe rules apart
        mine = [r for r in runs if r["row"] == name and r["label"] == label]
        row = {"row": name, "label": mine[0]["label"], "seeds": [r["seed"] for r in mine],
               "accuracy_per_seed": [r["test_accuracy"] for r in mine], "runs": mine}
        for key in ("test_accuracy", "bitops", "fp32_bitops", "percent_of_fp32", "train_seconds", "peak_rss_mb",
                    "bitops_saving_vs_static", "accuracy_delta_vs_static", "time_ratio_vs_static",
                    "mean_off_modal_share", "full_depth_recalibrated_accuracy", "exported_delta_vs_static"):
            if all(r.get(key) is not None for r in mine):
                row[key] = sum(r[key] for r in mine) / len(mine)
        rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    """The experiment as a Markdown table."""
    head = ("| run | test acc. (per seed) | Δ acc. vs 8/8 | exported (full depth) | BitOPs % of fp32 "
            "| BitOPs saving vs 8/8 | train time | time vs 8/8 | off modal | peak RSS |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        each = "/".join(f"{100 * a:.1f}" for a in r["accuracy_per_seed"]) if len(r["accuracy_per_seed"]) > 1 else ""
        lines.append(f"| {r['label']} | {100 * r['test_accuracy']:.2f}%{f' ({each})' if each else ''} "
                     f"| {r.get('accuracy_delta_vs_static', 0):+.2f} pt | {_exported(r)} "
                     f"| {r['percent_of_fp32']:.2f}% | {r.get('bitops_saving_vs_static', 0):.1f}% "
                     f"| {r['train_seconds']:.1f} s | {r.get('time_ratio_vs_static', 0):.2f}x "
                     f"| {_share(r.get('mean_off_modal_share'))} "
                     f"| {_rss(r.get('peak_rss_mb'))} |")
    return "\n".join(lines)


def _exported(r: dict) -> str:
    """A gated row's exported network after re-estimating its statistics, and its delta to static."""
    acc = r.get("full_depth_recalibrated_accuracy")
    if acc is None:
        return ""
    delta = r.get("exported_delta_vs_static")
    return f"{100 * acc:.2f}%" + ("" if delta is None else f" ({delta:+.2f} pt)")


def _share(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.1f}%"


def _rss(mb: float | None) -> str:
    # --in-process: one process's peak covers every row so far, so no row has a peak of its own.
    return "n/a (in one process)" if mb is None else f"{mb:.0f} MB"


def plot(rows: list[dict], path: Path) -> None:
    """Accuracy against BitOPs and against training time: per row the mean, and each seed faintly."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(20, 5.5))
    for ax, key, label in ((axes[0], "percent_of_fp32", "training BitOPs, % of fp32"),
                           (axes[1], "train_seconds", "training wall time, s")):
        for i, r in enumerate(rows):
            color = f"C{i}"
            # Each seed faint, the mean over seeds solid: how far apart the seeds are is part of the result.
            runs = r.get("runs") or []
            if len(runs) > 1:
                ax.scatter([x[key] for x in runs], [100 * x["test_accuracy"] for x in runs], s=14, color=color,
                           alpha=0.35)
            ax.scatter(r[key], 100 * r["test_accuracy"], s=50, color=color, label=r["label"])
            if r.get("full_depth_recalibrated_accuracy") is not None:  # what the gated run exports
                ax.scatter(r[key], 100 * r["full_depth_recalibrated_accuracy"], s=50, color=color, marker="x",
                           label=f"{r['label']}: exported, full depth")
        ax.set_xlabel(label)
        ax.set_ylabel("test accuracy, %")
        ax.grid(alpha=0.3)
    axes[0].set_xscale("log")
    # Below the panels, not over the first one's points.
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize="small", loc="lower center", ncol=3)
    _plot_per_sample(axes[2], rows, "accuracy_by_executed_share", "share of blocks a test sample executed")
    _plot_per_sample(axes[3], rows, "accuracy_by_raised_share",
                     "share of blocks run above the modal candidate")
    fig.suptitle("FracTrain experiment: same model, seed and steps for every run")
    fig.tight_layout(rect=(0, 0.04 + 0.035 * ((len(labels) + 2) // 3), 1, 1))
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def _plot_per_sample(ax, rows: list[dict], key: str, xlabel: str) -> None:
    """Per gated row, test accuracy of the samples grouped by a per-sample share (`key`: of blocks executed, or
    run above the modal candidate; all seeds pooled; marker area ~ samples): whether the gates give the hard
    samples more of the network."""
    for i, r in enumerate(rows):
        pooled: dict[float, list[int]] = {}
        for run in r.get("runs") or []:
            for share, cell in (run.get(key) or {}).items():
                got = pooled.setdefault(float(share), [0, 0])
                got[0] += cell["samples"]
                got[1] += round(cell["accuracy"] * cell["samples"])
        if not pooled:
            continue
        shares = sorted(pooled)
        total = sum(n for n, _ in pooled.values())
        ax.plot(shares, [100 * pooled[s][1] / pooled[s][0] for s in shares], color=f"C{i}", alpha=0.6)
        ax.scatter(shares, [100 * pooled[s][1] / pooled[s][0] for s in shares], color=f"C{i}", label=r["label"],
                   s=[max(4.0, 400.0 * pooled[s][0] / total) for s in shares])
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy of those samples, %")
    ax.grid(alpha=0.3)


def merge(paths: list[str], out: Path, as_json: bool) -> int:
    """Merge earlier results.json files: every run of every row, summarised again; the settings of each file."""
    runs, settings = [], []
    for path in paths:
        try:
            data = json.loads(Path(path).read_text())
            runs += [run for row in data["rows"] for run in row["runs"]]
            settings.append({"file": str(path), **data["settings"]})
        except (ValueError, KeyError, TypeError) as exc:
            raise EdgetrainError(f"--merge {path}: not a results.json of this tool ({exc})") from None
    order = {name: i for i, name in enumerate(ROWS)}
    runs.sort(key=lambda r: (order.get(r["row"], len(ROWS)), r["seed"]))
    results = summarise(runs)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "results.json", (json.dumps({"settings": {"merged": settings}, "rows": results}, indent=2)
                                        + "\n").encode())
    plot(results, out / "results.png")
    print(json.dumps({"settings": {"merged": settings}, "rows": results}) if as_json else format_table(results))
    return 0


def _number_list(cast, ok, what: str, order: str = "any"):
    """An argparse type: a non-empty comma list of numbers, each passing ok(); order "rising" (repeats
    allowed), "strictly rising" or "any"."""
    def parse(text: str) -> list:
        try:
            values = [cast(v) for v in text.split(",") if v.strip()]
        except ValueError:
            values = []
        wanted = {"any": values, "rising": sorted(values), "strictly rising": sorted(set(values))}[order]
        if not values or not all(ok(v) for v in values) or values != wanted:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return values
    return parse


_fraction_list = _number_list(float, lambda v: 0 < v < 1, "rising comma-separated shares between 0 and 1",
                              "strictly rising")
_target_list = _number_list(float, lambda v: 0 < v <= 100, "rising comma-separated percentages", "rising")
_floor_list = _number_list(float, lambda v: 0 <= v <= 1, "comma-separated shares in [0, 1]")
_seed_list = _number_list(int, lambda v: v >= 0, "comma-separated seeds >= 0")
_bits_list = _number_list(int, lambda v: v == 0 or MIN_BITS <= v <= MAX_BITS,
                          f"comma-separated bits, each 0 or in [{MIN_BITS}, {MAX_BITS}]")


def _checked_by(parse):
    """An argparse type: what parse(text) returns, its EdgetrainError (edgetrain's own check) as argparse's."""
    def check(text: str):
        try:
            return parse(text)
        except EdgetrainError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return check


def _candidates(text: str) -> list[str]:
    """The comma list of DFQ candidates, as written, once edgetrain accepts it."""
    from edgetrain.precision.dfq.config import parse_candidates

    values = [v.strip() for v in text.split(",") if v.strip()]
    parse_candidates(values, DEFAULT_WEIGHT_BITS)
    return values


def _precision(text: str) -> str:
    """A precision as written, once edgetrain accepts it."""
    from edgetrain.precision.spec import parse_precision

    parse_precision(text)
    return text


def main(argv: list[str] | None = None) -> int:
    """Parse, run every row (each in its own process, or all in this one), print and save the table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=MODELS, default="resnet8")
    p.add_argument("--steps", type=POSITIVE_INT, default=600)
    p.add_argument("--batch-size", type=POSITIVE_INT, default=64)
    p.add_argument("--seed", type=NON_NEGATIVE_INT, default=0)
    p.add_argument("--seeds", type=_seed_list, help="comma list of seeds: every row runs once per seed, the table "
                                                  "gives means")
    p.add_argument("--lr", type=POSITIVE_FLOAT, default=0.05)
    p.add_argument("--period", type=POSITIVE_INT, default=20, help="steps per PFQ/FracTrain loss period")
    p.add_argument("--eps", type=POSITIVE_FLOAT, default=0.05)
    p.add_argument("--alpha", type=POSITIVE_FLOAT, default=0.3)
    p.add_argument("--target", type=POSITIVE_FLOAT, default=3.0, help="DFQ's cost target, percent")
    p.add_argument("--switch-at", type=_fraction_list, default=None,
                   help="PFQ and FracTrain switch at these shares of --steps (e.g. 0.25,0.5,0.75) instead of at "
                        "the turning points")
    p.add_argument("--candidates", type=_checked_by(_candidates), default=None,
                   help="DFQ and FracTrain candidates, comma list (default FracTrain's CIFAR set "
                        f"{','.join(DEFAULT_CANDIDATES)})")
    p.add_argument("--targets", type=_target_list, default=None,
                   help="FracTrain's cost targets, rising, comma list; the last is scaled to --target "
                        f"(default {','.join(str(t) for t in DEFAULT_TARGETS)})")
    p.add_argument("--static-bits", type=_checked_by(_precision), default=None,
                   help="the static row's bits instead of 8/8, e.g. 4/8:w4 (the savings and deltas are then "
                        "against that row)")
    p.add_argument("--beta", type=NON_NEGATIVE_FLOAT, default=DEFAULT_BETA, help="weight of DFQ's cost regulariser")
    p.add_argument("--time-fraction", type=POSITIVE_FLOAT, default=0.6,
                   help="dfq-time row: target time of the gated layers as a fraction of their static 8/8 time")
    p.add_argument("--time-target", type=POSITIVE_FLOAT, default=50.0, help=argparse.SUPPRESS)
    p.add_argument("--cost-table", help=argparse.SUPPRESS)
    p.add_argument("--input-size", type=POSITIVE_INT, default=None,
                   help="pad the digits to this square size (32: the CIFAR shape of the deeper ResNets)")
    p.add_argument("--floor", type=bounded(float, "a share in [0, 1]", low=0.0, high=1.0), default=0.0,
                   help="timed rows: floor on each block's executed share of a batch (guards against collapse)")
    p.add_argument("--floors", type=_floor_list, default=None,
                   help="fractrain-time row: one floor per FracTrain target, in place of --floor (e.g. "
                        "1,0.75,0.5,0.5: every block at first, half the batch later)")
    p.add_argument("--probe-share", type=bounded(float, "a share in (0, 1]", low=0.0, low_open=True, high=1.0),
                   default=DEFAULT_PROBE_SHARE, help="probe rows: share of each batch probed at a second candidate")
    p.add_argument("--probe-weight", type=NON_NEGATIVE_FLOAT, default=DEFAULT_PROBE_WEIGHT,
                   help="probe rows: weight of the probe's loss on the gates")
    p.add_argument("--probe-margin", type=NON_NEGATIVE_FLOAT, default=DEFAULT_PROBE_MARGIN,
                   help="probe rows: per-sample loss a cheaper candidate may trail the best by")
    p.add_argument("--probe-rule", choices=PROBE_RULES, default="margin",
                   help="probe rows: margin (cheapest within the margin of the best) or budget (what the cost "
                        "target allows, to the samples most sensitive to precision; docs/GATE_ESTIMATOR.md)")
    p.add_argument("--selection", choices=SELECTIONS, default="argmax",
                   help="dfq and fractrain rows: argmax (each sample its gate's top candidate) or quota (each "
                        "block's computing samples spend what the target allows, the gates' ranking deciding who "
                        "goes up; docs/GATE_ESTIMATOR.md)")
    p.add_argument("--weight-bits", type=bounded(int, f"bits in {MIN_BITS}..{MAX_BITS}", low=MIN_BITS, high=MAX_BITS),
                   default=DEFAULT_WEIGHT_BITS, help="dfq and fractrain rows: the gated layers' weight bits (default "
                                                     f"{DEFAULT_WEIGHT_BITS}, FracTrain's)")
    p.add_argument("--backward-share", type=bounded(float, "a share in (0, 1]", low=0.0, low_open=True, high=1.0),
                   default=1.0, help="dfq and fractrain rows: share of each block's computing samples whose error "
                                     "runs back through it (the largest; the rest take 0-bit gradients there)")
    p.add_argument("--grad-ranges", choices=GRAD_RANGES, default="tensor",
                   help="every row: the integer layers' output-gradient ranges (tensor: one per gradient, FracTrain's; "
                        "split: per output channel for the weight gradient, per sample for the error)")
    p.add_argument("--clip-act-bits", type=NON_NEGATIVE_INT, default=0, metavar="BITS",
                   help="every row: activations of this many bits or fewer take the range of least squared error on a "
                        "sample of the batch in training (edgetrain.quant.clip; default 0: the batch's largest value)")
    p.add_argument("--clip-weight-bits", type=NON_NEGATIVE_INT, default=0, metavar="BITS",
                   help="every row: weights of this many bits or fewer take, per output channel, the range of least "
                        "squared error on its weights (edgetrain.quant.clip; default 0: their largest value)")
    p.add_argument("--stage-grad-bits", type=_bits_list, default=None, metavar="B,...",
                   help="FracTrain rows: every computing candidate's gradient bits per target (0: its own), e.g. "
                        "0,0,0,8 for 8-bit gradients at the last target")
    p.add_argument("--test-samples", type=POSITIVE_INT, default=None, help="test on the first N test samples only")
    p.add_argument("--warmup", type=NON_NEGATIVE_INT, default=WARMUP_STEPS,
                   help="untimed steps per row first, so compiling kernels is not counted as training time")
    p.add_argument("--in-process", action="store_true",
                   help="train every row in this process (no per-row peak memory; what --small does)")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma list of {','.join(ROWS)}")
    p.add_argument("--small", action="store_true", help="the CI form: few steps")
    p.add_argument("--out", default="fractrain-experiment", help="folder for results.json and results.png")
    p.add_argument("--json", action="store_true", help="print the JSON instead of the table")
    p.add_argument("--merge", nargs="+", metavar="RESULTS.json",
                   help="instead of training: merge the runs of earlier results.json files (rows or seeds run "
                        "separately) into one table, results.json and plot under --out")
    p.add_argument("--row", choices=ROWS, help=argparse.SUPPRESS)  # internal: train one row, print JSON
    args = p.parse_args(argv)
    try:
        if args.row:
            print(json.dumps(run_row(args.row, args)))
            return 0
        if args.merge:
            return merge(args.merge, Path(args.out), args.json)
        if args.small:
            for name, value in SMALL.items():
                setattr(args, name, value)
            args.in_process = True  # one import of numba and onnx instead of one per row
            if args.rows == ",".join(ROWS):
                args.rows = ",".join(SMALL_ROWS)
        rows = [r.strip() for r in args.rows.split(",") if r.strip()]
        bad = [r for r in rows if r not in ROWS]
        if bad or not rows:
            raise EdgetrainError(f"--rows: unknown {', '.join(bad) or '(none given)'}; valid: {', '.join(ROWS)}")
        from tqdm import tqdm

        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        if any(r in TIMED_ROWS for r in rows):
            args.cost_table, share = measure_latency(args, out)
            args.time_target = args.time_fraction * share
        seeds = args.seeds or [args.seed]
        runs = []
        jobs = [(row, seed) for seed in seeds for row in rows]
        for row, seed in tqdm(jobs, desc="runs", disable=args.json or not sys.stderr.isatty()):
            row_args = argparse.Namespace(**{**vars(args), "seed": seed})
            result = run_row(row, row_args) if args.in_process else _child(row, row_args)
            runs.append({**result, "seed": seed})
        results = summarise(runs)
        settings = {k: getattr(args, k) for k in CHILD_OPTIONS if k != "seed"}
        settings["seeds"] = seeds
        settings["in_process"] = args.in_process
        write_atomic(out / "results.json",
                     (json.dumps({"settings": settings, "rows": results}, indent=2) + "\n").encode())
        plot(results, out / "results.png")
        print(json.dumps({"settings": settings, "rows": results}) if args.json else format_table(results))
        return 0
    except (EdgetrainError, OSError) as exc:
        print(f"fractrain_experiment: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
