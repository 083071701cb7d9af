"""PFQ eps/alpha ablation: does FracTrain's turning-point rule care which eps and alpha it is given?

    python -m tools.ablate_pfq [--model shipped|NAME|FILE.onnx] [--data digits] [--steps 600] [--period 25]
                               [--eps 0.02,0.05,0.1,0.15,0.3] [--alpha 0.1,0.3,0.5,1.0] [--seed 0]
                               [--out pfq-ablation] [--json] [--small]

Every grid cell trains the same model on the same data, seed, batches and step budget with PFQ in its
automatic (turning-point) mode; two static runs are the references: the final stage's precision (8/8 by
default, what PFQ's savings are measured against) and the first stage's (3/6: if it trains as well as
8/8, no choice of eps or alpha can cost accuracy on this task). Each run has its own sub-folder of
--out (log.jsonl, config.json, a checkpoint); OUT/ablate_pfq.json holds every figure and
OUT/ablate_pfq.png draws two heatmaps: accuracy minus the static run's, and the BitOPs saved against it.

The default task is the demo's: the shipped LeNet-5 (trained on upright digits) fine-tuned on the
digits rotated a quarter turn, since on the upright digits it already knows there is nothing to learn.
A builder name (lenet5, resnet8, ...) trains that model from a seeded initialisation instead.
Switch steps are reported as --pfq-switch-steps takes them (the first step of each new stage), so a
cell's schedule can be replayed in manual mode.

alpha scales eps after each of the first alpha_switches switches (2, FracTrain's reference: its first
and second turning points), so it acts on the second and later switches; with --alpha-switches 0 it
acts on none, and the tool says so.
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
from tqdm import tqdm

import models
from edgetrain.cli.argtypes import NON_NEGATIVE_INT, POSITIVE_INT, bounded
from edgetrain.cli.plot import pyplot
from edgetrain.errors import EXIT_INTERRUPTED, EdgetrainError
from edgetrain.fileio import write_atomic
from edgetrain.precision.pfq import DEFAULT_ALPHA_SWITCHES, DEFAULT_NORMALISER_PERIODS, DEFAULT_STAGES, DEFAULT_WINDOW
from edgetrain.precision.spec import parse_precision
from edgetrain.train.config import TrainConfig
from edgetrain.train.trainer import clear_run_dir

PROG = "ablate_pfq"

SHIPPED = "shipped"  # --model value for the demo's model and task
DEFAULT_DATA = "digits"
DEFAULT_OUT = "pfq-ablation"
JSON_NAME, PNG_NAME = "ablate_pfq.json", "ablate_pfq.png"
# The demo's fine-tuning recipe, with a cosine decay so every cell ends on the same small step size.
LEARNING_RATE = 0.02
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4
LR_SCHEDULE = "cosine"
FIGURE_DPI = 120
MIN_DELTA_SCALE = 2.0  # points: the colour scale never spans less, so one seed's noise is not painted as a signal


@dataclasses.dataclass(frozen=True)
class Profile:
    """The sizes one invocation uses when flags leave them out."""

    steps: int
    batch_size: int
    period: int
    eps: tuple[float, ...]
    alpha: tuple[float, ...]


FULL = Profile(steps=600, batch_size=64, period=25, eps=(0.02, 0.05, 0.1, 0.15, 0.3), alpha=(0.1, 0.3, 0.5, 1.0))
# CI size: the window of 5 periods fills after 10 steps, so 40 steps leave room for every switch (measured:
# one run switches once, one three times and reaches the last stage); half the old 80 steps' CPU time.
SMALL = Profile(steps=40, batch_size=32, period=2, eps=(0.05, 0.3), alpha=(0.3, 1.0))


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # argparse prints usage; we keep to one line
        raise EdgetrainError(message)


def value_list(parse_one: Callable[[str], float], what: str) -> Callable[[str], tuple[float, ...]]:
    """An argparse type: comma-separated values, each checked by parse_one, none repeated."""
    def parse(text: str) -> tuple[float, ...]:
        values = tuple(parse_one(part.strip()) for part in text.split(",") if part.strip())
        if not values:
            raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {text!r}")
        if len(set(values)) != len(values):
            raise argparse.ArgumentTypeError(f"repeated value in {text!r}: each grid value once")
        return values
    return parse


EPS_VALUE = bounded(float, "eps values > 0 (finite)", low=0.0, low_open=True, high=math.inf, high_open=True)
ALPHA_VALUE = bounded(float, "alpha values in (0, 1]", low=0.0, low_open=True, high=1.0)


def _stage_list(text: str) -> tuple[str, ...]:
    stages = tuple(part.strip() for part in text.split(",") if part.strip())
    if not stages:
        raise argparse.ArgumentTypeError(f"expected comma-separated FW/BW stages, got {text!r}")
    return stages


def build_parser() -> argparse.ArgumentParser:
    """The command line of this tool."""
    p = _Parser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--model", default=SHIPPED, metavar="shipped|NAME|FILE.onnx",
                   help=f"'shipped' (default: the demo's LeNet-5 on rotated digits), a builder "
                        f"({', '.join(models.BUILDERS)}) trained from scratch, or an ONNX file")
    p.add_argument("--data", default=DEFAULT_DATA, metavar="SPEC", help="data source, as edgetrain train takes it")
    p.add_argument("--rotate", action=argparse.BooleanOptionalAction, default=None,
                   help="turn every image a quarter (the demo's shifted domain); default: on for the shipped model")
    p.add_argument("--steps", type=POSITIVE_INT, metavar="N", help=f"steps per run ({FULL.steps}; small {SMALL.steps})")
    p.add_argument("--batch-size", type=POSITIVE_INT, metavar="N",
                   help=f"({FULL.batch_size}; small {SMALL.batch_size})")
    p.add_argument("--period", type=POSITIVE_INT, metavar="N",
                   help=f"steps per PFQ loss period ({FULL.period}; small {SMALL.period})")
    p.add_argument("--eps", type=value_list(EPS_VALUE, "eps values > 0"), metavar="E1,E2,...",
                   help=f"eps grid ({','.join(map(str, FULL.eps))})")
    p.add_argument("--alpha", type=value_list(ALPHA_VALUE, "alpha values in (0, 1]"), metavar="A1,A2,...",
                   help=f"alpha grid ({','.join(map(str, FULL.alpha))})")
    p.add_argument("--stages", type=_stage_list, default=DEFAULT_STAGES, metavar="FW/BW,...",
                   help=f"PFQ stages ({','.join(DEFAULT_STAGES)}); the static reference runs at the last")
    p.add_argument("--lr", type=bounded(float, "a positive learning rate", low=0.0, low_open=True,
                                        high=math.inf, high_open=True),
                   default=LEARNING_RATE, metavar="LR", help=f"peak learning rate, cosine decay ({LEARNING_RATE})")
    p.add_argument("--alpha-switches", type=NON_NEGATIVE_INT, default=DEFAULT_ALPHA_SWITCHES, metavar="N",
                   help=f"eps shrinks by alpha after each of the first N switches ({DEFAULT_ALPHA_SWITCHES}, "
                        "FracTrain's reference)")
    p.add_argument("--seed", type=NON_NEGATIVE_INT, default=0, metavar="S", help="one seed for every run (0)")
    p.add_argument("--out", default=DEFAULT_OUT, metavar="DIR", help=f"results folder ({DEFAULT_OUT})")
    p.add_argument("--json", action="store_true", help="print the JSON result instead of the table")
    p.add_argument("--small", action="store_true", help="CI size: 2x2 grid, few steps, well under a minute")
    return p


@dataclasses.dataclass
class Setup:
    """Everything every run of one ablation shares."""

    model: str  # 'shipped', a builder name, or an absolute ONNX path
    model_path: str | None  # the ONNX file runs are recorded with (None for a builder)
    data: str
    rotate: bool
    steps: int
    batch_size: int
    period: int
    eps: tuple[float, ...]
    alpha: tuple[float, ...]
    stages: tuple[str, ...]
    lr: float
    alpha_switches: int
    seed: int
    out: Path


def make_setup(args: argparse.Namespace) -> Setup:
    """Resolve flags against the chosen profile and check what argparse cannot."""
    profile = SMALL if args.small else FULL
    stages = tuple(str(parse_precision(s)) for s in args.stages)
    if any(parse_precision(s).is_float for s in stages):
        raise EdgetrainError(f"--stages {','.join(args.stages)}: every stage needs FW/BW bits, not fp32")
    if len(stages) < 2:
        raise EdgetrainError(f"--stages {','.join(args.stages)}: PFQ needs at least two stages to switch between")
    model, model_path = args.model, None
    if model == SHIPPED:
        from edgetrain.cli.demo import demo_model_path

        model_path = demo_model_path()
    elif model not in models.BUILDERS or os.path.exists(model):
        if not os.path.isfile(model):
            if os.sep not in model and not model.endswith(".onnx"):
                raise EdgetrainError(f"--model {model!r}: not a file, nor '{SHIPPED}' or a builder "
                                     f"({', '.join(models.BUILDERS)})")
            raise EdgetrainError(f"{model}: no such file")
        model = model_path = os.path.abspath(model)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise EdgetrainError(f"{out}: exists and is not a folder")
    return Setup(model=model, model_path=model_path, data=args.data,
                 rotate=args.model == SHIPPED if args.rotate is None else args.rotate,
                 steps=args.steps or profile.steps, batch_size=args.batch_size or profile.batch_size,
                 period=args.period or profile.period, eps=args.eps or profile.eps, alpha=args.alpha or profile.alpha,
                 stages=stages, lr=args.lr, alpha_switches=args.alpha_switches, seed=args.seed, out=out)


def load_split(setup: Setup):
    """The data split every run trains and tests on (rotated if asked)."""
    from edgetrain.cli.demo import rotated_split
    from edgetrain.data import load_data

    split = load_data(setup.data, seed=setup.seed)
    if not setup.rotate:
        return split
    if split.train.x.ndim != 4:
        raise EdgetrainError(f"--rotate: {setup.data} holds vectors of shape {split.train.x.shape[1:]}, not images")
    return rotated_split(split)


def fresh_model(setup: Setup, split):
    """A new copy of the model (identical for every run: same file or same seeded initialisation)."""
    import edgetrain
    from edgetrain.train.runstate import build_model

    if setup.model_path is not None:
        model, _ = build_model(setup.model_path, setup.seed, None)  # what `edgetrain train` loads with
        return model
    kwargs: dict[str, Any] = {"num_classes": split.train.num_classes, "seed": setup.seed}
    if split.train.x.ndim == 4:
        _, channels, height, width = split.train.x.shape
        if height != width:
            raise EdgetrainError(f"--model {setup.model}: builders take square images, "
                                 f"{setup.data} has {height}x{width}")
        kwargs.update(in_channels=channels, input_size=height)
    try:
        proto = models.build_model(setup.model, **kwargs)
    except ValueError as exc:
        raise EdgetrainError(f"--model {setup.model}: {exc}") from None
    return edgetrain.load(proto, seed=setup.seed)


def check_model_fits(model, split) -> None:
    """Refuse data the model cannot take before any run starts (one line, not a shape error mid-grid)."""
    from edgetrain.data import check_fits
    from edgetrain.train.runstate import output_classes

    check_fits(split.train, model.input_shape, output_classes(model))
    check_fits(split.test, model.input_shape, output_classes(model))


def warm_up(model, split, precisions: Sequence[str], batch_size: int) -> float:
    """One step at every precision, so Numba's compile (or cache load) is not billed to the first run."""
    start = time.perf_counter()
    # A full batch: kernels may take another (parallel) path for large inputs than for a couple of samples.
    x, y = split.train.x[:batch_size], split.train.y[:batch_size]
    for spec in precisions:
        model.set_precision(spec)
        model.loss_and_grad(x, y)
        model(x)
    return time.perf_counter() - start


def _num(value: float) -> str:
    return f"{value:g}"


def run_name(schedule: str, *, bits: str | None = None, eps: float | None = None, alpha: float | None = None) -> str:
    """The sub-folder of --out one run writes to."""
    if schedule == "static":
        return "static-" + str(bits).replace("/", "-").replace(":", "-")
    return f"pfq-eps{_num(eps)}-alpha{_num(alpha)}"


def train_one(setup: Setup, split, name: str, *, progress: bool, bits: str | None = None,
              eps: float | None = None, alpha: float | None = None) -> dict[str, Any]:
    """One run (static at `bits`, or PFQ with eps/alpha); returns its row of figures."""
    from edgetrain.train.trainer import Trainer

    run_dir = setup.out / name
    clear_run_dir(run_dir)
    pfq = eps is not None
    pfq_fields = {"pfq_eps": eps, "pfq_alpha": alpha, "pfq_alpha_switches": setup.alpha_switches} if pfq else {}
    config = TrainConfig(
        model=setup.model_path, data=None if setup.rotate else setup.data,  # rotated digits have no data spec
        schedule="pfq" if pfq else "static", bits=None if pfq else bits, steps=setup.steps,
        batch_size=setup.batch_size, seed=setup.seed, lr=setup.lr, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY,
        lr_schedule=LR_SCHEDULE, eval_every=setup.steps, out=str(run_dir), keep=1,
        pfq_stages=list(setup.stages), pfq_period=setup.period, **pfq_fields)
    trainer = Trainer(fresh_model(setup, split), split, config, progress=progress, desc=name, export_model=False,
                      resume_hint=f"rerun {PROG} (every run starts afresh)")
    row: dict[str, Any] = {"run": name, "run_dir": str(run_dir)}
    row.update({"eps": eps, "alpha": alpha} if pfq else {"bits": bits})
    try:
        result = trainer.fit()
    except EdgetrainError as exc:
        if not pfq:
            raise  # without the reference there is nothing to compare the grid with
        # A diverged cell is a finding about that eps/alpha, not a reason to lose the rest of the grid.
        return {**row, "error": str(exc), "test_accuracy": None, "bitops": None, "percent_of_fp32": None,
                "switch_steps": [s.step + 1 for s in trainer.controller.switches], "seconds": trainer.elapsed}
    row.update(test_accuracy=result.test_accuracy, test_loss=result.test_loss, final_train_loss=result.final_loss,
               bitops=result.bitops, fp32_bitops=result.fp32_bitops, percent_of_fp32=result.percent_of_fp32,
               seconds=result.seconds, precision=result.precision)
    if pfq:
        ctrl = trainer.controller
        row.update(switch_steps=[s.step + 1 for s in ctrl.switches],
                   switches=[{"step": s.step + 1, "precision": s.precision, "eps": s.eps} for s in ctrl.switches],
                   final_stage=ctrl.stage, final_precision=ctrl.precision, reached_final_stage=ctrl.finished)
    return row


def switches_alpha_scales(stages: int, alpha_switches: int) -> list[int]:
    """The switches (1-based) whose eps alpha has scaled, as PFQController applies it."""
    # Switch k's eps has been multiplied once for every earlier switch j with j <= alpha_switches.
    return [k for k in range(1, stages) if min(k - 1, alpha_switches) > 0]


def compare(row: dict[str, Any], static: dict[str, Any]) -> None:
    """Add the figures relative to the static run: accuracy delta in points, BitOPs saved in percent."""
    if row.get("test_accuracy") is None:
        row.update(accuracy_delta_points=None, bitops_saving_percent=None)
        return
    row["accuracy_delta_points"] = 100.0 * (row["test_accuracy"] - static["test_accuracy"])
    row["bitops_saving_percent"] = 100.0 * (1.0 - row["bitops"] / static["bitops"])


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Spread of accuracy and savings over the grid: the figures the insensitivity claim is about."""
    done = [r for r in rows if r.get("test_accuracy") is not None]
    if not done:
        return {"finished_runs": 0}
    acc = [r["accuracy_delta_points"] for r in done]
    save = [r["bitops_saving_percent"] for r in done]
    return {"finished_runs": len(done), "diverged_runs": len(rows) - len(done),
            "accuracy_delta_points": {"min": min(acc), "max": max(acc), "spread": max(acc) - min(acc)},
            "bitops_saving_percent": {"min": min(save), "max": max(save), "spread": max(save) - min(save)},
            "reached_final_stage": sum(bool(r.get("reached_final_stage")) for r in done),
            "switch_counts": sorted({len(r["switch_steps"]) for r in done})}


def _grid(result: dict[str, Any], key: str) -> np.ndarray:
    cells = {(r["alpha"], r["eps"]): r.get(key) for r in result["rows"]}
    return np.array([[np.nan if cells[(a, e)] is None else cells[(a, e)] for e in result["eps"]]
                     for a in result["alpha"]], dtype=float)


def plot_heatmaps(result: dict[str, Any], path: Path) -> None:
    """Two panels over (eps, alpha): accuracy minus static in points, and BitOPs saved against static (%)."""
    plt = pyplot()
    from matplotlib.colors import TwoSlopeNorm

    delta, saving = _grid(result, "accuracy_delta_points"), _grid(result, "bitops_saving_percent")
    fig, axes = plt.subplots(1, 2, figsize=(4 + 1.4 * len(result["eps"]), 1.2 + 0.8 * len(result["alpha"])))
    scale = max(MIN_DELTA_SCALE, float(np.nanmax(np.abs(delta))) if np.isfinite(delta).any() else 0.0)
    static = result["static"]
    panels = ((axes[0], delta, "RdBu", TwoSlopeNorm(0.0, -scale, scale), "{:+.1f}",
               f"test accuracy minus static {static['bits']} ({100 * static['test_accuracy']:.1f}%), points"),
              (axes[1], saving, "viridis", None, "{:.1f}", f"BitOPs saved vs static {static['bits']}, %"))
    for ax, values, cmap, norm, fmt, title in panels:
        im = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, norm=norm, aspect="auto")
        for (i, j), v in np.ndenumerate(values):
            text = "diverged" if not np.isfinite(v) else fmt.format(v)
            r, g, b, _ = im.cmap(im.norm(v)) if np.isfinite(v) else (1, 1, 1, 1)
            dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5  # white text where the cell is dark
            ax.text(j, i, text, ha="center", va="center", fontsize=8, color="white" if dark else "black")
        ax.set_xticks(range(len(result["eps"])), [_num(e) for e in result["eps"]])
        ax.set_yticks(range(len(result["alpha"])), [_num(a) for a in result["alpha"]])
        ax.set_xlabel("eps")
        ax.set_ylabel("alpha")
        ax.set_title(title, fontsize=9)
        fig.colorbar(im, ax=ax)
    fig.suptitle(f"PFQ {','.join(result['stages'])}: {result['steps']} steps, period {result['period']}, "
                 f"alpha switches {result['alpha_switches']}, seed {result['seed']}", fontsize=10)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=FIGURE_DPI)
    plt.close(fig)
    write_atomic(path, buffer.getvalue())


def run_ablation(setup: Setup, *, progress: bool = True) -> dict[str, Any]:
    """Train the references and every grid cell; write the JSON and the heatmap; return the result."""
    pyplot()  # a missing matplotlib should stop us before minutes of training, not after
    try:
        setup.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EdgetrainError(f"{setup.out}: cannot create the results folder ({exc.strerror or exc})") from None
    split = load_split(setup)
    probe = fresh_model(setup, split)
    check_model_fits(probe, split)
    alpha_switches = switches_alpha_scales(len(setup.stages), setup.alpha_switches)
    if not alpha_switches and len(setup.alpha) > 1:
        print(f"{PROG}: warning: with {len(setup.stages)} stages and --alpha-switches {setup.alpha_switches}, alpha "
              "scales the eps of no switch: every alpha row will be the same", file=sys.stderr)
    if setup.steps < DEFAULT_WINDOW * setup.period:
        print(f"{PROG}: warning: {setup.steps} steps hold fewer than the {DEFAULT_WINDOW} periods of "
              f"{setup.period} steps the turning-point window needs; no run can switch", file=sys.stderr)
    warmup_seconds = warm_up(probe, split, setup.stages, setup.batch_size)
    final, first = setup.stages[-1], setup.stages[0]
    jobs: list[tuple[str, dict[str, Any]]] = [(run_name("static", bits=final), {"bits": final}),
                                              (run_name("static", bits=first), {"bits": first})]
    jobs += [(run_name("pfq", eps=e, alpha=a), {"eps": e, "alpha": a}) for a in setup.alpha for e in setup.eps]
    # tqdm's disable=None: a bar on a terminal, nothing in a log file or a captured pipe
    bar = tqdm(jobs, desc="ablation", unit="run", disable=None if progress else True, dynamic_ncols=True)
    inner = progress and not bar.disable
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    for name, kwargs in bar:
        bar.set_postfix_str(name, refresh=True)
        rows.append(train_one(setup, split, name, progress=inner, **kwargs))
    bar.close()
    static, floor = rows[0], rows[1]
    compare(floor, static)
    grid = rows[2:]
    for row in grid:
        compare(row, static)
    result = {
        "tool": PROG, "model": setup.model, "model_file": setup.model_path, "data": setup.data, "rotated": setup.rotate,
        "steps": setup.steps, "batch_size": setup.batch_size, "period": setup.period, "seed": setup.seed,
        "lr": setup.lr, "lr_schedule": LR_SCHEDULE, "momentum": MOMENTUM, "weight_decay": WEIGHT_DECAY,
        "stages": list(setup.stages), "window": DEFAULT_WINDOW, "normaliser_periods": DEFAULT_NORMALISER_PERIODS,
        "alpha_switches": setup.alpha_switches, "alpha_scales_switches": alpha_switches,
        "eps": list(setup.eps), "alpha": list(setup.alpha),
        "static": static, "static_first_stage": floor, "rows": grid, "summary": summarize(grid),
        "kernel_warmup_seconds": warmup_seconds, "total_seconds": time.perf_counter() - started,
        "json": str(setup.out / JSON_NAME), "png": str(setup.out / PNG_NAME),
    }
    plot_heatmaps(result, setup.out / PNG_NAME)
    write_atomic(setup.out / JSON_NAME, (json.dumps(result, indent=2) + "\n").encode())
    return result


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for i, row in enumerate(rows):
        lines.append("  ".join(c.rjust(w) for c, w in zip(row, widths)))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return lines


def format_result(r: dict[str, Any]) -> str:
    """The ablation's table for people."""
    static = r["static"]
    head = ("eps", "alpha", "test acc", "vs static", "% fp32 BitOPs", "saved vs static", "switch steps",
            "final", "time")
    rows = [head]
    for ref in (static, r["static_first_stage"]):
        delta = ref.get("accuracy_delta_points")
        rows.append((f"static {ref['bits']}", "", f"{ref['test_accuracy']:.1%}",
                     "" if delta is None else f"{delta:+.1f} pt", f"{ref['percent_of_fp32']:.2f}%",
                     "" if ref is static else f"{ref['bitops_saving_percent']:.1f}%", "", ref["bits"],
                     f"{ref['seconds']:.1f} s"))
    for row in r["rows"]:
        switches = ",".join(map(str, row["switch_steps"])) or "none"
        if row.get("test_accuracy") is None:
            rows.append((_num(row["eps"]), _num(row["alpha"]), "diverged", "", "", "", switches, "",
                         f"{row['seconds']:.1f} s"))
            continue
        rows.append((_num(row["eps"]), _num(row["alpha"]), f"{row['test_accuracy']:.1%}",
                     f"{row['accuracy_delta_points']:+.1f} pt", f"{row['percent_of_fp32']:.2f}%",
                     f"{row['bitops_saving_percent']:.1f}%", switches,
                     f"{row['final_precision']} ({row['final_stage']}/{len(r['stages']) - 1})",
                     f"{row['seconds']:.1f} s"))
    task = "shipped LeNet-5" if r["model"] == SHIPPED else r["model"]
    title = (f"PFQ eps/alpha ablation: {task} on {r['data']}{' rotated 90 degrees' if r['rotated'] else ''}, "
             f"{r['steps']} steps, batch {r['batch_size']}, period {r['period']}, "
             f"alpha switches {r['alpha_switches']}, "
             f"seed {r['seed']}, stages {','.join(r['stages'])}")
    lines = [title, "", *_table(rows), ""]
    s = r["summary"]
    if s.get("finished_runs"):
        lines.append(f"over the {s['finished_runs']} finished cells: accuracy vs static "
                     f"{s['accuracy_delta_points']['min']:+.1f} to {s['accuracy_delta_points']['max']:+.1f} pt "
                     f"(spread {s['accuracy_delta_points']['spread']:.1f}), BitOPs saved "
                     f"{s['bitops_saving_percent']['min']:.1f} to {s['bitops_saving_percent']['max']:.1f}% "
                     f"(spread {s['bitops_saving_percent']['spread']:.1f}); "
                     f"{s['reached_final_stage']} reached the final stage")
    if s.get("diverged_runs"):
        lines.append(f"{s['diverged_runs']} cells diverged (see 'error' in the JSON)")
    scaled = r["alpha_scales_switches"]
    lines.append(f"alpha scales the eps of switch {', '.join(map(str, scaled))}" if scaled else
                 f"alpha scales the eps of no switch (alpha switches {r['alpha_switches']}): "
                 "the alpha rows cannot differ")
    lines.append("switch steps: first step of each new stage (replayable with --pfq-switch-steps); "
                 "one seed, so differences under about a point may be noise")
    lines.append(f"wrote {r['json']} and {r['png']} ({r['total_seconds']:.0f} s)")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: one-line errors and exit 2 for bad input."""
    try:
        args = build_parser().parse_args(argv)
        setup = make_setup(args)
        result = run_ablation(setup, progress=True)
    except EdgetrainError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(json.dumps(result, indent=2) if args.json else format_result(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
