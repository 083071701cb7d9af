"""CLI: write registered models to ONNX files.

    python -m models.build NAME --out FILE.onnx [--num-classes K] [--in-channels C] [--input-size S] [--seed S]
    python -m models.build --all DIR
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from edgetrain.cli.argtypes import NON_NEGATIVE_INT, POSITIVE_INT
from models import BUILDERS, build_model, save_model

PROG = "python -m models.build"
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
MODEL_SUFFIX = ".onnx"


class _OneLineParser(argparse.ArgumentParser):
    """ArgumentParser whose errors are a single stderr line (no usage dump)."""

    def error(self, message: str) -> NoReturn:
        """Print one line and exit with the usage status."""
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def make_parser() -> argparse.ArgumentParser:
    """Return the argument parser for the build CLI."""
    parser = _OneLineParser(prog=PROG, description="Write edgetrain reference models as ONNX.")
    parser.add_argument("name", nargs="?", metavar="NAME", help=f"model to build: {', '.join(BUILDERS)}")
    parser.add_argument("--out", metavar="FILE", help="output .onnx path (with NAME)")
    parser.add_argument("--all", metavar="DIR", dest="all_dir", help="write every model with defaults into DIR")
    parser.add_argument("--num-classes", type=POSITIVE_INT)
    parser.add_argument("--in-channels", type=POSITIVE_INT)
    parser.add_argument("--input-size", type=POSITIVE_INT)
    parser.add_argument("--seed", type=NON_NEGATIVE_INT)
    return parser


def _validate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.all_dir is not None:
        overrides = [args.name, args.out, args.num_classes, args.in_channels, args.input_size, args.seed]
        if any(v is not None for v in overrides):
            parser.error("--all DIR takes no NAME, --out or model options")
        return
    if args.name is None:
        parser.error("give a model NAME with --out FILE, or --all DIR")
    if args.name not in BUILDERS:
        parser.error(f"unknown model {args.name!r}; choose from {', '.join(BUILDERS)}")
    if args.out is None:
        parser.error("--out FILE is required with NAME")


def _write(name: str, path: str, **kwargs: object) -> None:
    model = build_model(name, **kwargs)
    save_model(model, path)
    print(f"wrote {path} ({name}, {len(model.graph.node)} nodes)")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit status."""
    parser = make_parser()
    args = parser.parse_args(argv)
    _validate(parser, args)
    try:
        if args.all_dir is not None:
            os.makedirs(args.all_dir, exist_ok=True)
            for name in BUILDERS:
                _write(name, os.path.join(args.all_dir, name + MODEL_SUFFIX))
        else:
            # Only forward options the user gave, so each builder keeps its own defaults.
            options = {"num_classes": args.num_classes, "in_channels": args.in_channels,
                       "input_size": args.input_size, "seed": args.seed}
            _write(args.name, args.out, **{k: v for k, v in options.items() if v is not None})
    except ValueError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        target = args.all_dir if args.all_dir is not None else args.out
        print(f"{PROG}: error: cannot write {target}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
