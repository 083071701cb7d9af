"""The `edgetrain profile` subcommand: its arguments and what it runs.

edgetrain's own CLI owns the top-level parser and its error handling; `edgetrain.cli.main.build_parser` adds
this subcommand with `add_profile_command(sub)`. Nothing here imports that CLI back.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from typing import Any

from edgetrain.cli.argtypes import NON_NEGATIVE_INT, POSITIVE_INT, POSITIVE_SECONDS, PROBABILITY
from edgetrain.errors import EXIT_CHECK_FAILED, EXIT_OK
from firmware_bridge.profile.errors import BoardUnreachable, ProfileError
from firmware_bridge.profile.host import prepare, profile
from firmware_bridge.profile.records import (
    DEFAULT_BATCH,
    DEFAULT_STEPS,
    DEFAULT_TIMEOUT_S,
    DEFAULT_WARMUP,
    ProfileRequest,
)
from firmware_bridge.profile.report import format_markdown, write_latency_table, write_report
from firmware_bridge.profile.workload import PRECISION_FP32
from firmware_bridge.wire.transport import DEFAULT_BAUD

__all__ = ["add_profile_command", "run_profile_command"]

DEFAULT_OUT = "edgetrain-profile"
LOG_TAIL_LINES = 3


def add_profile_command(subparsers: Any) -> argparse.ArgumentParser:
    """Add `profile` to an argparse subparsers object; its `func(args)` returns the exit status."""
    parser = subparsers.add_parser(
        "profile",
        help="time every layer of a training step on an attached board over serial",
        description="Profile training of MODEL on a board running edgetrain-agent, and check the board's "
        "weights against this machine's.",
    )
    parser.add_argument("model", help="an ONNX file")
    parser.add_argument("--port", help="the board's serial device (/dev/ttyUSB0, COM3) or any pyserial URL")
    parser.add_argument("--baud", type=POSITIVE_INT, default=DEFAULT_BAUD, help=f"line rate (default {DEFAULT_BAUD})")
    parser.add_argument("--batch-size", type=POSITIVE_INT, help=f"samples per step (default {DEFAULT_BATCH})")
    parser.add_argument(
        "--steps", type=POSITIVE_INT, default=DEFAULT_STEPS, help=f"timed steps (default {DEFAULT_STEPS})"
    )
    parser.add_argument(
        "--warmup",
        type=NON_NEGATIVE_INT,
        default=DEFAULT_WARMUP,
        help=f"untimed steps first (default {DEFAULT_WARMUP})",
    )
    parser.add_argument("--precision", default=PRECISION_FP32, help="fp32, or an integer-engine spec such as 8/8")
    parser.add_argument("--fast-float", action="store_true",
                        help="fp32 work on BLAS and the platform's libm (faster; the digests then agree only between "
                             "identical CPUs and builds) instead of the portable fixed-order kernels")
    parser.add_argument("--seed", type=NON_NEGATIVE_INT, default=0, help="seeds weights' data stream and labels")
    parser.add_argument("--data", help="train on arrays x and y of this .npz instead of synthetic data")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"report folder (default {DEFAULT_OUT})")
    parser.add_argument("--json", action="store_true", help="print the report as JSON, no progress bars")
    parser.add_argument("--latency-table", metavar="FILE", help="also write/update a per-layer latency table (JSON)")
    parser.add_argument(
        "--timeout",
        type=POSITIVE_SECONDS,
        default=DEFAULT_TIMEOUT_S,
        help=f"seconds of silence before the board counts as gone (default {DEFAULT_TIMEOUT_S:g})",
    )
    sim = parser.add_argument_group("simulated board (no hardware)")
    sim.add_argument("--simulate", action="store_true", help="run the agent here, on a pseudo-terminal")
    sim.add_argument(
        "--sim-corrupt", type=PROBABILITY, default=0.0, metavar="RATE", help="per-byte corruption probability"
    )
    sim.add_argument("--sim-drop", type=PROBABILITY, default=0.0, metavar="RATE", help="per-byte drop probability")
    sim.add_argument("--sim-duplicate", type=PROBABILITY, default=0.0, metavar="RATE",
                     help="per-byte probability that a byte arrives twice")
    sim.add_argument("--sim-burst", type=PROBABILITY, default=0.0, metavar="RATE",
                     help="per-byte probability of a burst of 1-32 noise bytes")
    sim.add_argument("--sim-baud", type=POSITIVE_INT, metavar="N", help="pace the simulated line at N baud")
    sim.add_argument("--sim-cache", metavar="DIR", help="the simulated agent's cache (default: a temporary folder)")
    sim.add_argument(
        "--sim-python", metavar="COMMAND",
        help="run the simulated agent with this Python command, e.g. 'tools/arm64_board.sh python' for an "
        "emulated arm64 board (default: this interpreter)",
    )
    parser.set_defaults(func=run_profile_command)
    return parser


def _check_target(args: argparse.Namespace) -> None:
    sim_flags = [flag for flag, value in (("--sim-corrupt", args.sim_corrupt), ("--sim-drop", args.sim_drop),
                                          ("--sim-duplicate", args.sim_duplicate), ("--sim-burst", args.sim_burst),
                                          ("--sim-baud", args.sim_baud), ("--sim-cache", args.sim_cache),
                                          ("--sim-python", args.sim_python)) if value]
    if args.simulate and args.port:
        raise ProfileError("give either --port or --simulate, not both")
    if not args.simulate and not args.port:
        raise ProfileError("give --port PORT (a device path or pyserial URL), or --simulate")
    if sim_flags and not args.simulate:
        raise ProfileError(f"{', '.join(sim_flags)} only apply with --simulate")


def _request(args: argparse.Namespace, port: str, baud: int) -> ProfileRequest:
    return ProfileRequest(
        model=args.model,
        port=port,
        baud=baud,
        batch_size=args.batch_size,
        steps=args.steps,
        warmup=args.warmup,
        precision=args.precision,
        seed=args.seed,
        data=args.data,
        timeout_s=args.timeout,
        backend=getattr(args, "backend", None),
        deterministic=not args.fast_float,
        progress=not args.json and sys.stderr.isatty(),
    )


def _profile_simulated(args: argparse.Namespace) -> dict[str, Any]:
    from firmware_bridge.profile.sim import SimulatedBoard

    # Check the model, data and workload before spending a second on starting an agent.
    prepared = prepare(_request(args, "", args.baud))
    board = SimulatedBoard(
        args.sim_cache, corrupt_rate=args.sim_corrupt, drop_rate=args.sim_drop,
        duplicate_rate=args.sim_duplicate, burst_rate=args.sim_burst, baud=args.sim_baud,
        python=shlex.split(args.sim_python) if args.sim_python else sys.executable,
    )
    with board:
        try:
            report = profile(_request(args, board.host_port, args.sim_baud or args.baud), prepared)
        except BoardUnreachable as exc:
            if board.agent is not None and board.agent.poll() is not None:
                tail = " / ".join(board.agent_log().strip().splitlines()[-LOG_TAIL_LINES:])
                raise BoardUnreachable(
                    f"{exc}; the simulated agent exited ({board.agent.returncode}): {tail}"
                ) from None
            raise
    report["simulated"] = True
    report["board"]["simulated"] = {
        **(report["board"].get("simulated") or {}),
        "corrupt_rate": args.sim_corrupt,
        "drop_rate": args.sim_drop,
        "duplicate_rate": args.sim_duplicate,
        "burst_rate": args.sim_burst,
        "baud": args.sim_baud,
        "agent_python": args.sim_python or sys.executable,
        "relay": {direction: vars(stats) for direction, stats in board.relay_stats.items()},
    }
    return report


def run_profile_command(args: argparse.Namespace) -> int:
    """Run `edgetrain profile`; return 0, or 1 when the board's weights differ from the host's."""
    _check_target(args)
    report = _profile_simulated(args) if args.simulate else profile(_request(args, args.port, args.baud))
    written = write_report(report, args.out)
    if args.latency_table:
        write_latency_table(args.latency_table, report)
        written["latency_table"] = args.latency_table
    report["files"] = written
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_markdown(report))
        print("files: " + ", ".join(f"{kind} {path}" for kind, path in written.items() if kind != "note"))
        if "note" in written:
            print(written["note"])
    return EXIT_OK if report["digest"]["agree"] else EXIT_CHECK_FAILED
