"""The `edgetrain` command line: one subcommand per job, user mistakes as one line and exit 2."""
from __future__ import annotations

import argparse
import json
import sys

from .errors import EdgetrainError

EXIT_USER_ERROR = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse prints usage; we keep to one line
        raise EdgetrainError(message)


def _cmd_info(args) -> int:
    from .info import format_table, summarize
    from .model import load

    summary = summarize(load(args.model))
    print(json.dumps(summary, indent=2) if args.json else format_table(summary))
    return 0


def _cmd_demo(args) -> int:
    from .demo import run_demo

    result = run_demo(steps=args.steps, seed=args.seed, out_dir=args.out, progress=not args.json)
    if args.json:
        print(json.dumps(result, indent=2))
    return 0 if result["export_ok"] else 1


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    p = _Parser(prog="edgetrain", description="Fine-tune ONNX models on small devices.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    info = sub.add_parser("info", help="layers, shapes, parameters, MACs and the quantisation plan of a model")
    info.add_argument("model", help="an ONNX file")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.set_defaults(func=_cmd_info)
    demo = sub.add_parser("demo", help="fine-tune the shipped model on the shipped digits")
    demo.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out", default="edgetrain-demo", help="folder for the fine-tuned model (default edgetrain-demo)")
    demo.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    demo.set_defaults(func=_cmd_demo)
    from firmware_bridge.cli import add_profile_command

    add_profile_command(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except EdgetrainError as exc:
        print(f"edgetrain: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("edgetrain: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
