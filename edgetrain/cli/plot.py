"""`edgetrain plot RUN_DIR`: pictures of a run from its log.jsonl, as PNG files.

training.png: loss per step (raw and smoothed) and test accuracy at each evaluation.
precision.png: FW and BW bits over the run (mean over quantised layers) and the cumulative BitOPs as a
percentage of fp32. layers.png: a heatmap of every MAC layer's FW bits over the steps (fp32 = 32).
dfq.png (dfq and fractrain runs): the gated layers' cost per step against the regulariser's target.
A federation folder (rounds.jsonl, written by edgetrain federate) gets federation.png: central accuracy and the
bytes sent each way per round.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from edgetrain.errors import EdgetrainError
from edgetrain.fileio import make_folder, write_with
from edgetrain.precision.spec import FP32_BITS, parse_precision
from edgetrain.train.runlog import LOG_NAME, read_log

ROUNDS_LOG = "rounds.jsonl"  # edgetrain.fleet.server writes it (not imported: plots need no Flower)
SMOOTHING_STEPS = 20  # window of the moving average drawn over the raw loss
FIGURE_DPI = 120


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or a one-line error naming the extra to install."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display on a board or in CI
        import matplotlib.pyplot as plt
    except ImportError:
        raise EdgetrainError("plots need matplotlib: pip install 'edgetrain[plot]'") from None
    return plt


def _gated(spec: str) -> bool:
    return spec.startswith("dfq")  # a DFQ-gated layer: its bits are chosen per sample (dfq.png shows them)


def _bits(spec: str) -> tuple[int, int]:
    if _gated(spec):
        return 0, 0
    p = parse_precision(spec)
    return (FP32_BITS, FP32_BITS) if p.is_float else (p.act_bits, p.grad_bits)


def _save(fig, path: Path) -> str:
    # fileio.write_with: temporary file and rename, a failed write as one line naming the PNG
    write_with(path, lambda f: fig.savefig(f, format="png", dpi=FIGURE_DPI, bbox_inches="tight"))
    return str(path)


def plot_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> list[str]:
    """Draw the run's figures; returns the PNG paths written."""
    run = Path(run_dir)
    log_path = run / LOG_NAME
    if not log_path.is_file() and (run / ROUNDS_LOG).is_file():
        return [plot_federation(run, out_dir)]
    if not log_path.is_file():
        raise EdgetrainError(f"{run}: no {LOG_NAME} here (is it a run folder written by edgetrain train?)")
    entries = read_log(log_path)
    steps = [e for e in entries if e.get("type") == "step"]
    if not steps:
        raise EdgetrainError(f"{log_path}: no training steps logged yet")
    evals = [e for e in entries if e.get("type") == "eval"]
    changes = [e for e in entries if e.get("type") == "layers"]
    out = Path(out_dir) if out_dir is not None else run
    make_folder(out)
    plt = pyplot()
    written = []

    x = np.array([e["step"] for e in steps])
    loss = np.array([e["loss"] for e in steps], dtype=float)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(x, loss, color="0.75", lw=0.8, label="loss")
    if len(loss) >= SMOOTHING_STEPS:
        smooth = np.convolve(loss, np.ones(SMOOTHING_STEPS) / SMOOTHING_STEPS, mode="valid")
        ax.plot(x[SMOOTHING_STEPS - 1:], smooth, color="C0", label=f"loss ({SMOOTHING_STEPS}-step mean)")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    if evals:
        ax2 = ax.twinx()
        ax2.plot([e["step"] for e in evals], [100 * e["accuracy"] for e in evals], "o-", color="C1",
                 label="test accuracy")
        ax2.set_ylabel("test accuracy (%)")
        ax2.legend(loc="upper right", bbox_to_anchor=(1.0, -0.14), frameon=False)
    ax.legend(loc="upper left", bbox_to_anchor=(0.0, -0.14), ncol=2, frameon=False)
    ax.set_title(f"{run.name}: loss and accuracy")
    written.append(_save(fig, out / "training.png"))
    plt.close(fig)

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5), sharex=True)
    if changes:
        names = list(changes[0]["layers"])
        marks = [c["step"] for c in changes] + [int(x[-1])]
        for i, change in enumerate(changes):
            quant = [_bits(s) for s in change["layers"].values()
                     if not _gated(s) and not parse_precision(s).is_float]
            fw = np.mean([b[0] for b in quant]) if quant else FP32_BITS
            bw = np.mean([b[1] for b in quant]) if quant else FP32_BITS
            span = [marks[i], marks[i + 1]]
            top.plot(span, [fw, fw], color="C0", label="FW bits" if i == 0 else None)
            top.plot(span, [bw, bw], color="C3", label="BW bits" if i == 0 else None)
        top.legend()
    top.set_ylabel("bits (quantised layers)")
    bottom.plot(x, [e["percent_of_fp32"] for e in steps], color="C2")
    bottom.set_ylabel("BitOPs, % of fp32")
    bottom.set_xlabel("step")
    top.set_title(f"{run.name}: precision and cost")
    written.append(_save(fig, out / "precision.png"))
    plt.close(fig)

    if changes:
        names = list(changes[0]["layers"])
        grid = np.zeros((len(names), len(x)))
        for change in changes:
            start = np.searchsorted(x, change["step"])
            for row, name in enumerate(names):
                grid[row, start:] = _bits(change["layers"].get(name, "fp32"))[0]
        fig, ax = plt.subplots(figsize=(7, 0.3 * len(names) + 1.5))
        cmap = plt.get_cmap("viridis").copy()
        cmap.set_bad("0.85")  # fp32 layers: grey, outside the fixed-point colour scale
        shown = np.ma.masked_where((grid >= FP32_BITS) | (grid == 0), grid)  # grey: fp32 or per-sample (dfq)
        im = ax.imshow(shown, aspect="auto", interpolation="nearest", cmap=cmap, vmin=2, vmax=16,
                       extent=(x[0] - 0.5, x[-1] + 0.5, len(names) - 0.5, -0.5))
        marks = [c["step"] for c in changes] + [int(x[-1])]
        for i, change in enumerate(changes):
            middle = (marks[i] + marks[i + 1]) / 2
            for row, name in enumerate(names):
                label = change["layers"].get(name, "fp32")
                ax.text(middle, row, label, ha="center", va="center", fontsize=6,
                        color="black" if _gated(label) or parse_precision(label).is_float else "white")
        ax.set_yticks(range(len(names)))
        ax.set_yticklabels(names, fontsize=7)
        ax.set_xlabel("step")
        fig.colorbar(im, ax=ax, label="FW bits (grey: fp32, or chosen per sample by DFQ)")
        ax.set_title(f"{run.name}: per-layer precision")
        written.append(_save(fig, out / "layers.png"))
        plt.close(fig)

    gated = [e for e in steps if "dfq_percent" in e]
    if gated:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        gx = [e["step"] for e in gated]
        ax.plot(gx, [e["dfq_percent"] for e in gated], color="0.7", lw=0.8, label="batch cost")
        if len(gated) >= SMOOTHING_STEPS:
            smooth = np.convolve([e["dfq_percent"] for e in gated], np.ones(SMOOTHING_STEPS) / SMOOTHING_STEPS, "valid")
            ax.plot(gx[SMOOTHING_STEPS - 1:], smooth, color="C0", label=f"{SMOOTHING_STEPS}-step mean")
        ax.step(gx, [e["dfq_target"] for e in gated], where="post", color="C3", label="target")
        ax.set_xlabel("step")
        ax.set_ylabel("gated layers' cost, % of fp32")
        ax.legend()
        ax.set_title(f"{run.name}: DFQ cost and its target")
        written.append(_save(fig, out / "dfq.png"))
        plt.close(fig)
    return written


def plot_federation(run: Path, out_dir: str | os.PathLike | None = None) -> str:
    """federation.png of a federation folder: central accuracy per round over uplink and downlink bytes."""
    import json

    path = run / ROUNDS_LOG
    try:
        rounds = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError) as exc:
        raise EdgetrainError(f"{path}: not readable ({exc})") from None
    if not rounds:
        raise EdgetrainError(f"{path}: no rounds logged yet")
    out = Path(out_dir) if out_dir is not None else run
    make_folder(out)
    plt = pyplot()
    r = np.array([e["round"] for e in rounds])
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5), sharex=True)
    top.plot(r, [100 * e["accuracy"] for e in rounds], "o-", color="C1")
    top.set_ylabel("central accuracy (%)")
    top.set_title(f"{run.name}: federation, {rounds[-1].get('update_bits', '?')}-bit updates")
    width = 0.38
    bottom.bar(r - width / 2, [e["uplink_bytes"] / 1e3 for e in rounds], width, color="C0", label="uplink (clients)")
    bottom.bar(r + width / 2, [e["downlink_bytes"] / 1e3 for e in rounds], width, color="0.6", label="downlink")
    bottom.set_ylabel("kB per round")
    bottom.set_xlabel("round")
    bottom.set_xticks(r)
    bottom.legend()
    written = _save(fig, out / "federation.png")
    plt.close(fig)
    return written
