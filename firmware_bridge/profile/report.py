"""The profile report: one JSON document, rendered as Markdown, a per-layer plot and a latency table.

Latency table format (`--latency-table FILE`), for DFQ/FracTrain cost models::

    {"<layer name>": {"<precision>": {"forward_s": 0.00012, "backward_s": 0.00034}}}

Seconds are means per training step of `batch_size` samples on the profiled board; `backward_s`
is null for a layer that computes no gradient. Writing into an existing table adds or replaces
only the entries of this profile's precision, so profiling one model at several precisions
builds one table.
"""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path
from typing import Any

from edgetrain.fileio import write_atomic
from firmware_bridge.profile.errors import ProfileError
from firmware_bridge.profile.records import BoardRun, Prepared, ProfileRequest
from firmware_bridge.profile.spread import assess_timing
from firmware_bridge.profile.workload import TrainingRun, engine_info

__all__ = [
    "REPORT_SCHEMA",
    "SIMULATED_NOTICE",
    "build_report",
    "format_markdown",
    "latency_table",
    "plot_layers",
    "write_latency_table",
    "write_report",
]

REPORT_SCHEMA = "edgetrain-profile/1"
VERDICT_AGREE = "digests agree"
VERDICT_DIFFER = "DIGESTS DIFFER"
REPORT_JSON = "profile.json"
REPORT_MARKDOWN = "profile.md"
REPORT_PLOT = "profile.png"
MS = 1000.0
MIB = 1 << 20
PLOT_DPI = 120
PLOT_ROW_INCHES = 0.28
PLOT_MIN_INCHES = 3.0
SHORT_HASH = 12
SIMULATED_NOTICE = (
    "SIMULATED BOARD: the agent ran as a local process on the host (--simulate), not on a board; "
    "timings, memory, energy and temperatures are the host's"
)
NO_POWER_TEXT = "no board power sensor"


def report_warnings(telemetry: dict[str, Any], spread: dict[str, Any]) -> list[str]:
    """Return the warnings a reader must see first: throttling or under-voltage, and a busy board."""
    warnings = []
    throttle = telemetry.get("throttle") or {}
    if throttle.get("warning"):
        warnings.append(throttle["warning"])
    if spread.get("warning"):
        warnings.append(spread["warning"])
    return warnings


def build_report(
    request: ProfileRequest, prepared: Prepared, board: BoardRun, local: TrainingRun, local_seconds: float
) -> dict[str, Any]:
    """Merge the board's RESULT, the host's check and the model summary into the report document."""
    metrics = board.result["metrics"]
    timed = {name: (forward, backward) for name, forward, backward in metrics["layers"]}
    layers = []
    for info in prepared.summary["layers"]:
        forward, backward = timed.get(info["name"], (None, None))
        layers.append(
            {
                "name": info["name"],
                "op_type": info["op_type"],
                "macs_per_sample": info["macs"],
                "params": info["params"],
                "forward_s": forward,
                "backward_s": backward,
            }
        )
    board_digest, host_digest = metrics["digest"], local.digest
    workload = prepared.workload
    telemetry = dict(metrics.get("telemetry", {}))
    telemetry["status_messages"] = len(board.telemetry)
    spread = assess_timing(metrics.get("step_times_s"), metrics["step_s"])
    # The agent says so itself when SimulatedBoard started it; the CLI adds how the line was simulated.
    simulated = bool(telemetry.get("simulated"))
    return {
        "schema": REPORT_SCHEMA,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "simulated": simulated,
        "warnings": report_warnings(telemetry, spread),
        "model": {
            "path": request.model,
            "sha256": prepared.model_sha,
            "size_bytes": len(prepared.model_blob),
            "parameters": prepared.summary["parameters"],
            "macs_per_sample": prepared.summary["macs_per_sample"],
        },
        "board": {
            "port": request.port, "capabilities": board.capabilities, "engine": metrics.get("engine"),
            "simulated": {"agent": "a local process on the host"} if simulated else None,
        },
        "host": {"engine": engine_info()},
        "workload": {
            "id": prepared.workload_id,
            **workload.to_params(),
            "data": "synthetic" if request.data is None else request.data,
        },
        "uploaded": board.uploaded,
        "data_uploaded": board.data_uploaded,
        "upload_bytes": board.upload_bytes,
        "reconnects": board.restarts,
        "timing": {
            "timed_steps": metrics["timed_steps"],
            "warmup_steps": metrics["warmup_steps"],
            "step_s": metrics["step_s"],
            "step_times_s": metrics.get("step_times_s"),
            "spread": spread,
            "clock": "time.perf_counter, a monotonic clock",
        },
        "layers": layers,
        "loss": {"board_first": metrics.get("loss_first"), "board_last": metrics.get("loss_last"),
                 "host_last": local.losses[-1] if local.losses else None},
        "memory": metrics.get("memory"),
        "telemetry": telemetry,
        "energy_j": board.result.get("energy_j"),
        "digest": {
            "board": board_digest,
            "host": host_digest,
            "agree": board_digest == host_digest,
            "verdict": VERDICT_AGREE if board_digest == host_digest else VERDICT_DIFFER,
            # what the float work ran as: deterministic digests are comparable across CPUs, fast ones are not
            "float_mode": {"board": metrics.get("float_mode"), "host": local.float_mode},
        },
        "link": {"host": board.link, "board": metrics.get("agent_link")},
        "elapsed_s": {"board": board.seconds, "host_check": local_seconds},
    }


# ------------------------------------------------------------------------------------------ Markdown


def _float_mode(digest: dict[str, Any]) -> str:
    modes = digest.get("float_mode") or {}
    board, host = modes.get("board"), modes.get("host")
    return str(host) if board == host else f"board {board}, host {host}"


def _ms(seconds: float | None, digits: int = 3) -> str:
    return "-" if seconds is None else f"{seconds * MS:.{digits}f}"


def _loss(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _mib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / MIB:.1f} MiB"


def _table(header: list[str], rows: list[list[str]], right: set[int]) -> list[str]:
    rule = ["---:" if i in right else "---" for i in range(len(header))]
    return ["| " + " | ".join(row) + " |" for row in (header, rule, *rows)]


def _names(names: list[str]) -> str:
    return ", ".join(name.replace("_", " ") for name in names)


def _throttle_lines(throttle: dict[str, Any] | None) -> list[str]:
    if throttle is None:
        return []
    if not throttle.get("sources"):
        return ["* throttling and under-voltage: unknown (no get_throttled, no sysfs indicator)"]
    state = "; ".join(
        f"{label} {_names(throttle[key])}"
        for key, label in (("now", "now:"), ("during", "during this workload:"),
                           ("before_workload", "occurred earlier since boot:"))
        if throttle.get(key)
    ) or "none now or during this workload"
    raw = throttle.get("raw") or {}
    lines = [
        f"* throttling and under-voltage (before and after the timed steps, from {', '.join(throttle['sources'])}): "
        + ("**" + state + "**" if throttle.get("warning") else state)
        + (f" (get_throttled {raw.get('before')} -> {raw.get('after')})" if raw.get("before") or raw.get("after")
           else "")
    ]
    if throttle.get("details"):
        lines.append("  * " + "; ".join(throttle["details"]))
    if throttle.get("unknown"):
        lines.append(f"  * not checkable on this board: {_names(throttle['unknown'])}")
    return lines


def format_markdown(report: dict[str, Any]) -> str:
    """Render the report as Markdown: summary, per-layer table, memory, telemetry, link, digest."""
    model, workload, timing = report["model"], report["workload"], report["timing"]
    caps = report["board"]["capabilities"]
    step = timing["step_s"] or {}
    digest = report["digest"]
    board_name = (
        f"{caps.get('board', 'board')} ({caps.get('machine', '?')}, {caps.get('cpus', '?')} CPUs) "
        f"on {report['board']['port']}"
    )
    simulated = report["board"].get("simulated")
    if simulated:
        board_name += ", SIMULATED: agent a local process on a pty"
        if "corrupt_rate" in simulated:
            board_name += (
                f", relay corrupting {simulated['corrupt_rate']:g} and dropping {simulated['drop_rate']:g} of bytes"
                + (f" at {simulated['baud']} baud" if simulated.get("baud") else "")
            )
    data = "synthetic N(0,1) inputs, seeded labels" if workload["data"] == "synthetic" else workload["data"]
    upload = (
        f"uploaded ({report['upload_bytes']:,} bytes)" if report["uploaded"] else "already cached on the board"
    )
    spread = timing.get("spread") or {}
    ratio = spread.get("median_over_min")
    busy = {True: "BUSY", False: "steady", None: "spread unknown"}[spread.get("busy")]
    banners = [f"> **{SIMULATED_NOTICE}.**"] if report.get("simulated") or simulated else []
    banners += [f"> **Warning:** {warning}" for warning in report.get("warnings") or []]
    lines = [
        f"# edgetrain profile: {Path(model['path']).name}",
        "",
        *[line for banner in banners for line in (banner, "")],
        *_table(
            ["", ""],
            [
                ["model", f"{model['path']} (sha256 {model['sha256'][:SHORT_HASH]}, {model['size_bytes']:,} bytes, "
                          f"{model['parameters']:,} parameters, {model['macs_per_sample']:,} MACs/sample)"],
                ["board", board_name],
                ["workload", f"batch {workload['batch_size']}, {timing['timed_steps']} timed steps after "
                             f"{timing['warmup_steps']} warm-up, precision {workload['precision']}, "
                             f"seed {workload['seed']}, SGD lr {workload['optimizer']['lr']:g} "
                             f"momentum {workload['optimizer']['momentum']:g}"],
                ["data", data],
                ["upload", upload + (f", {report['reconnects']} reconnection(s)" if report["reconnects"] else "")],
                ["step time", f"mean {_ms(step.get('mean'))} ms, median {_ms(step.get('median'))} ms, "
                              f"min {_ms(step.get('min'))} ms, max {_ms(step.get('max'))} ms; {busy}"
                              + (f" (median/min {ratio:.2f})" if ratio is not None else "")],
                ["loss", f"{_loss(report['loss']['board_first'])} -> {_loss(report['loss']['board_last'])} "
                         "(first and last step on the board)"],
                ["weights digest", f"board {digest['board'][:SHORT_HASH]}, host {digest['host'][:SHORT_HASH]}: "
                                   f"**{digest['verdict']}** (float: {_float_mode(digest)})"],
            ],
            set(),
        ),
        "",
        "## Layers",
        "",
    ]
    rows = []
    forward_total = sum(layer["forward_s"] or 0.0 for layer in report["layers"])
    backward_total = sum(layer["backward_s"] or 0.0 for layer in report["layers"])
    total = forward_total + backward_total
    for layer in report["layers"]:
        own = (layer["forward_s"] or 0.0) + (layer["backward_s"] or 0.0)
        rows.append([
            layer["name"], layer["op_type"], f"{layer['macs_per_sample']:,}" if layer["macs_per_sample"] else "",
            _ms(layer["forward_s"]), _ms(layer["backward_s"]), f"{100 * own / total:.1f}%" if total else "-",
        ])
    rows.append(["**total**", "", "", _ms(forward_total), _ms(backward_total), "100%" if total else "-"])
    lines += _table(["layer", "op", "MACs/sample", "forward ms", "backward ms", "share"], rows, {2, 3, 4, 5})
    lines += [
        "",
        f"Per-layer times are means per step over the timed steps, measured with {timing['clock']}; "
        "`-` means the layer computes no gradient.",
    ]
    memory = report.get("memory") or {}
    lines += [
        "",
        "## Memory",
        "",
        f"* peak RSS of the agent process: {_mib(memory.get('peak_rss_bytes'))} "
        "(getrusage ru_maxrss, over the agent's whole life)",
        f"* peak RSS sampled during the timed steps: {_mib(memory.get('sampled_peak_rss_bytes'))} "
        f"(from {_mib(memory.get('rss_before_bytes'))} before; /proc/self/statm)",
        "* tracemalloc: not used",
    ]
    telemetry = report.get("telemetry") or {}
    found = telemetry.get("found") or {}
    energy = telemetry.get("energy_j")
    lines += [
        "",
        "## Telemetry",
        "",
        "* sensors found: " + (", ".join(f"{name} ({text})" for name, text in found.items()) or "none"),
        "* sensors missing: " + (", ".join(telemetry.get("missing") or []) or "none"),
    ]
    power = telemetry.get("power") or {}
    if power.get("source"):
        lines.append(f"* power source: {power['source']} ({power.get('detail')}); sampled by {power.get('method')}")
    if energy is None:
        lines.append(f"* energy: not measured: {power.get('note') or NO_POWER_TEXT}")
    else:
        lines.append(
            f"* energy: {energy:.4f} J over the timed steps, {telemetry['energy_per_step_j'] * 1000:.3f} mJ per step, "
            f"mean {telemetry['mean_power_mw']:.0f} mW "
            f"({telemetry['power_source']}, {telemetry['power_samples']} samples)"
        )
    lines += _throttle_lines(telemetry.get("throttle"))
    volts = telemetry.get("core_volts")
    if volts:
        lines.append(
            "* core voltage (vcgencmd measure_volts core; a voltage, not power): "
            + ", ".join(f"{when} {v:.4f} V" for when, v in volts.items() if v is not None)
        )
    for label, key in (("before", "thermal_c_before"), ("after", "thermal_c_after")):
        zones = telemetry.get(key)
        if zones:
            lines.append(
                f"* temperatures {label}: " + ", ".join(f"{zone} {temp:.1f} C" for zone, temp in zones.items())
            )
    link = report.get("link") or {}
    host_link, board_link = link.get("host") or {}, link.get("board") or {}
    host_stats, board_decoder = host_link.get("link", {}), board_link.get("decoder", {})
    lines += [
        "",
        "## Link",
        "",
        f"* host ({host_link.get('links', 1)} link{'s' if host_link.get('links', 1) != 1 else ''}, counted together): "
        f"{host_stats.get('frames_sent', 0):,} frames sent, {host_stats.get('retransmits', 0)} retransmitted, "
        f"{host_link.get('decoder', {}).get('crc_errors', 0)} CRC errors received",
        f"* board (since the agent started): {board_decoder.get('crc_errors', 0)} CRC errors, "
        f"{board_decoder.get('truncated', 0)} truncated, {board_decoder.get('malformed', 0)} malformed, "
        f"{board_decoder.get('oversize', 0)} oversize frames dropped; "
        f"{board_link.get('link', {}).get('duplicates', 0)} duplicates ignored",
        "",
        f"Weights digest (SHA-256 over parameters in name order): board `{digest['board']}`, "
        f"host `{digest['host']}`: **{digest['verdict']}**.",
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- plot


def plot_layers(report: dict[str, Any], path: str | os.PathLike[str]) -> str | None:
    """Draw per-layer forward/backward bars to `path`; return None, or a note if matplotlib is missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return "plot skipped: matplotlib is not installed (pip install 'edgetrain[plot]')"
    layers = report["layers"]
    names = [layer["name"] for layer in layers]
    forward = [(layer["forward_s"] or 0.0) * MS for layer in layers]
    backward = [(layer["backward_s"] or 0.0) * MS for layer in layers]
    # Figure and canvas directly: no pyplot, so no global backend switch in the caller's process.
    figure = Figure(figsize=(8, max(PLOT_MIN_INCHES, PLOT_ROW_INCHES * len(names) + 1.5)))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    rows = range(len(names))
    height = 0.4
    axes.barh([r - height / 2 for r in rows], forward, height, label="forward")
    axes.barh([r + height / 2 for r in rows], backward, height, label="backward")
    axes.set_yticks(list(rows), names)
    axes.invert_yaxis()  # first layer on top, as in the table
    axes.set_xlabel("ms per step")
    caps = report["board"]["capabilities"]
    axes.set_title(
        f"{Path(report['model']['path']).name} on {caps.get('board', 'board')}: "
        f"batch {report['workload']['batch_size']}, {report['workload']['precision']}"
    )
    axes.legend()
    figure.tight_layout()
    figure.savefig(os.fspath(path), dpi=PLOT_DPI)
    return None


# ----------------------------------------------------------------------------------- latency table


def latency_table(report: dict[str, Any]) -> dict[str, dict[str, dict[str, float | None]]]:
    """Return {layer: {precision: {"forward_s", "backward_s"}}} for this profile."""
    precision = report["workload"]["precision"]
    return {
        layer["name"]: {precision: {"forward_s": layer["forward_s"], "backward_s": layer["backward_s"]}}
        for layer in report["layers"]
    }


def write_latency_table(path: str | os.PathLike[str], report: dict[str, Any]) -> dict[str, Any]:
    """Write (or update) the latency table at `path` with this profile's precision; return the table."""
    table: dict[str, Any] = {}
    if os.path.exists(path):
        try:
            with open(path, encoding="utf-8") as handle:
                table = json.load(handle)
        except (OSError, ValueError) as exc:
            raise ProfileError(f"{path}: cannot update the latency table ({exc})") from None
        if not isinstance(table, dict) or not all(isinstance(v, dict) for v in table.values()):
            raise ProfileError(f"{path}: not a latency table ({{layer: {{precision: ...}}}})")
    for layer, entries in latency_table(report).items():
        table.setdefault(layer, {}).update(entries)
    try:
        write_atomic(path, (json.dumps(table, indent=2, sort_keys=True) + "\n").encode("utf-8"))
    except OSError as exc:
        raise ProfileError(f"{path}: cannot write the latency table ({exc.strerror or exc})") from None
    return table


# -------------------------------------------------------------------------------------------- output


def write_report(report: dict[str, Any], out_dir: str | os.PathLike[str]) -> dict[str, str]:
    """Write profile.json, profile.md and profile.png into `out_dir`; return what was written (and notes)."""
    folder = Path(out_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        written = {"json": str(folder / REPORT_JSON), "markdown": str(folder / REPORT_MARKDOWN)}
        note = plot_layers(report, folder / REPORT_PLOT)
        if note is None:
            written["plot"] = str(folder / REPORT_PLOT)
        else:
            written["note"] = note
            report["plot_note"] = note
        write_atomic(written["json"], (json.dumps(report, indent=2) + "\n").encode("utf-8"))
        write_atomic(written["markdown"], format_markdown(report).encode("utf-8"))
    except OSError as exc:
        raise ProfileError(f"{out_dir}: cannot write the report ({exc.strerror or exc})") from None
    return written
