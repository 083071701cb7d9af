"""The `edgetrain` command line: one subcommand per job, user mistakes as one line and exit 2."""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from typing import Any

from edgetrain import limits
from edgetrain.cli.argtypes import (
    FINITE_FLOAT,
    NON_NEGATIVE_FLOAT,
    NON_NEGATIVE_INT,
    POSITIVE_INT,
    comma_list,
    memory_size,
    path_text,
)
from edgetrain.errors import EXIT_INTERRUPTED, EdgetrainError, EdgetrainWarning, Interrupted
from edgetrain.signals import interrupt_on_stop_signals
from edgetrain.train.config import FIELDS, FILE_ONLY, POSITIONAL, REPEATED, help_text


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse prints usage; we keep to one line
        raise EdgetrainError(message)


def _cmd_info(args) -> int:
    from edgetrain.cli.commands import is_checkpoint, warn
    from edgetrain.info import format_table, summarize
    from edgetrain.model import load
    from edgetrain.train.config import changed_settings

    if is_checkpoint(args.model):
        from edgetrain.train.runstate import open_checkpoint, restore_run

        run = restore_run(open_checkpoint(args.model, warn))
        summary = summarize(run.model)
        summary["checkpoint"] = {"path": str(run.checkpoint.path), "step": run.checkpoint.step,
                                 "schedule": run.config.schedule, "settings": changed_settings(run.config)}
        if summary["preprocess"] is None and run.checkpoint.meta.get("preprocess"):
            # what `edgetrain export` will put in front of the graph
            summary["preprocess"] = {**run.checkpoint.meta["preprocess"], "applied": "by the run's data pipeline"}
    else:
        summary = summarize(load(args.model))
    print(json.dumps(summary, indent=2) if args.json else format_table(summary))
    return 0


def _cmd_demo(args) -> int:
    from edgetrain.cli.demo import run_demo

    result = run_demo(steps=args.steps, seed=args.seed, out_dir=args.out, progress=not args.json)
    if args.json:
        print(json.dumps(result, indent=2))
    return 0 if result["export_ok"] else 1


def _cmd_train(args) -> int:
    from edgetrain.cli.commands import run_train, train_flags

    return run_train(train_flags(args), config_file=args.config, resume=args.resume, as_json=args.json)


def _cmd_eval(args) -> int:
    from edgetrain.cli.commands import run_eval

    return run_eval(args.target, data=args.data, bits=args.bits, batch_size=args.batch_size, as_json=args.json)


def _cmd_export(args) -> int:
    from edgetrain.cli.commands import run_export

    return run_export(args.checkpoint, out=args.out, int8=args.int8, as_json=args.json, gated_bits=args.gated_bits,
                      preprocess=args.preprocess, fmt=args.format, force=args.force)


_LIST_TYPES = {"str_list": comma_list(str, "values"), "int_list": comma_list(int, "step numbers"),
               "float_list": comma_list(FINITE_FLOAT, "numbers")}
FOLDER, FILE = path_text("a folder"), path_text("a file name")
_GROUPS = {"pfq": "progressive fractional quantisation (--schedule pfq); defaults are FracTrain's",
           "dfq": "dynamic fractional quantisation (--schedule dfq, fractrain); defaults are FracTrain's"}


def _flag_type(meta) -> Any:
    """The argparse type of a setting: its kind, refused below its `low` (ints: 1 or 0, floats: 0)."""
    kind, low = meta["kind"], meta["low"]
    if kind in _LIST_TYPES:
        return _LIST_TYPES[kind]
    if kind == "int":
        return int if low is None else POSITIVE_INT if low >= 1 else NON_NEGATIVE_INT
    if kind == "float":
        return FINITE_FLOAT if low is None else NON_NEGATIVE_FLOAT
    return None


def _add_setting(parser, f) -> None:
    """One TrainConfig field as an argument, as its metadata says (edgetrain.train.config.setting)."""
    meta, text = f.metadata, help_text(f.name).replace("%", "%%")  # argparse formats help with %
    if meta["cli"] == POSITIONAL:
        parser.add_argument(f.name, nargs="?", metavar=meta["metavar"], help=text)
    elif meta["kind"] == "bool":
        parser.add_argument("--" + f.name.replace("_", "-"), action="store_true", help=text)
    elif meta["cli"] == REPEATED:
        parser.add_argument("--" + f.name.replace("_", "-"), action="append", metavar=meta["metavar"], help=text)
    else:
        parser.add_argument("--" + f.name.replace("_", "-"), type=_flag_type(meta), metavar=meta["metavar"],
                            help=text)


def _add_backend(parser) -> None:
    """The integer route flag shared by every command that computes (`edgetrain.kernels.routes`)."""
    from edgetrain.kernels.routes import CHOICES, ENV_VAR

    parser.add_argument("--backend", choices=CHOICES, default=None,
                        help=f"integer kernel route (default ${ENV_VAR}, else auto: the fastest that passes its "
                             "probe here); every route gives the same bits")


def _add_train(sub) -> None:
    file_only = [name for name, f in FIELDS.items() if f.metadata["cli"] == FILE_ONLY]
    t = sub.add_parser("train", help="fine-tune an ONNX model on a data set, in fp32 or fixed point",
                       description="Fine-tune MODEL.onnx. Flags override the --config file; a run folder "
                                   "(--out) gets log.jsonl, config.json, checkpoints and model.onnx.",
                       epilog="A --config file may also set: " + "; ".join(
                           f"{name}: {help_text(name)}" for name in file_only) + ".",
                       argument_default=argparse.SUPPRESS)
    groups: dict[str, Any] = {}
    for f in FIELDS.values():
        meta = f.metadata
        if meta["cli"] == FILE_ONLY:
            continue
        if meta["exclusive"]:
            key = ("exclusive", meta["exclusive"])
            if key not in groups:
                groups[key] = t.add_mutually_exclusive_group()
            parser = groups[key]
        elif meta["group"]:
            if meta["group"] not in groups:
                groups[meta["group"]] = t.add_argument_group(meta["group"], _GROUPS[meta["group"]])
            parser = groups[meta["group"]]
        else:
            parser = t
        _add_setting(parser, f)
    t.add_argument("--resume", action="store_true", default=False,
                   help="continue the run in --out from its newest good checkpoint (from step 0, with its "
                        "config.json, if it stopped before its first)")
    t.add_argument("--config", default=None, metavar="FILE.toml", help="a TOML file setting any of these options")
    t.add_argument("--json", action="store_true", default=False, help="print one JSON object at the end")
    _add_backend(t)
    t.set_defaults(func=_cmd_train)


def _add_eval_export(sub) -> None:
    e = sub.add_parser("eval", help="test accuracy of an ONNX model, a checkpoint or a run folder")
    e.add_argument("target", metavar="MODEL_OR_CKPT", help="an ONNX file, a checkpoint file, or a run folder")
    e.add_argument("--data", metavar="SPEC", help="data source (default: the run's own, for a checkpoint)")
    e.add_argument("--bits", metavar="FW/BW",
                   help="evaluate at these FW/BW bits (default: as trained; fp32 for an ONNX file)")
    e.add_argument("--batch-size", type=POSITIVE_INT, default=256, metavar="N", help="default 256")
    e.add_argument("--json", action="store_true", help="machine-readable output")
    _add_backend(e)
    e.set_defaults(func=_cmd_eval)
    x = sub.add_parser("export", help="write a trained checkpoint as ONNX (float, or int8 QDQ)")
    x.add_argument("checkpoint", metavar="CKPT", help="a checkpoint file, or a run folder (its newest checkpoint)")
    x.add_argument("--out", type=FILE, required=True, metavar="FILE", help="the ONNX file to write")
    x.add_argument("--int8", action="store_true", help="QuantizeLinear/DequantizeLinear around the integer "
                                                       "layers, int8 weights (onnxruntime integer inference)")
    x.add_argument("--gated-bits", metavar="FW/BW", help="dfq/fractrain runs: the candidate the int8 backbone's gated "
                                                         "layers are written at (default: the most precise)")
    x.add_argument("--format", choices=("float", "int8", "both"),
                   help="float, int8 (as --int8) or both (the int8 file as OUT with .int8 before its suffix); "
                        "prints the onnxruntime check of each: agreement with the engine, latency at batch 1 and 64")
    x.add_argument("--preprocess", choices=("graph", "metadata", "none"), default="graph",
                   help="the run's input normalisation: as leading graph nodes, so the model takes raw input "
                        "(default); as metadata_props for the serving stack; or not at all")
    x.add_argument("--force", action="store_true",
                   help="replace files that exist at --out (never the run's own files or the files it reads)")
    x.add_argument("--json", action="store_true", help="machine-readable output")
    _add_backend(x)
    x.set_defaults(func=_cmd_export)


def _cmd_plot(args) -> int:
    from edgetrain.cli.plot import plot_run

    for path in plot_run(args.run, args.out):
        print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    p = _Parser(prog="edgetrain", description="Fine-tune ONNX models on small devices.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    info = sub.add_parser("info", help="layers, shapes, parameters, MACs, the quantisation plan and DFQ's units "
                                       "of a model (or of a trained checkpoint, with its gates)")
    info.add_argument("model", help="an ONNX file, a checkpoint file or a run folder")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.set_defaults(func=_cmd_info)
    demo = sub.add_parser("demo", help="fine-tune the shipped model on the shipped digits")
    demo.add_argument("--steps", type=POSITIVE_INT, default=300, help="training steps (default 300)")
    demo.add_argument("--seed", type=NON_NEGATIVE_INT, default=0)
    demo.add_argument("--out", type=FOLDER, default="edgetrain-demo",
                      help="folder for the fine-tuned model (default edgetrain-demo)")
    demo.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    _add_backend(demo)
    demo.set_defaults(func=_cmd_demo)
    _add_train(sub)
    _add_eval_export(sub)
    from edgetrain.cli.federate import add_federate_command

    add_federate_command(sub, _add_setting)
    plot = sub.add_parser("plot", help="PNG figures of a training run: loss, accuracy, bit-widths, per-layer precision")
    plot.add_argument("run", metavar="RUN_DIR", help="a folder written by edgetrain train")
    plot.add_argument("--out", type=FOLDER, default=None, help="folder for the PNG files (default: the run folder)")
    plot.set_defaults(func=_cmd_plot)
    from firmware_bridge.profile.cli import add_profile_command

    _add_backend(add_profile_command(sub))
    for command in sub.choices.values():  # every command reads files, so every command takes the budget
        command.add_argument(limits.FLAG, metavar="SIZE", type=memory_size, default=None,
                             help="memory budget for what one input file may make edgetrain allocate, e.g. 512M or "
                                  f"2G (default: ${limits.ENV_VAR}, else half of the memory this process may use)")
    return p


def _one_line_model_warnings() -> None:
    """Show edgetrain's ModelWarnings and EdgetrainWarnings as one `edgetrain: warning:` line, like the CLI's own."""
    from edgetrain.bn_audit import ModelWarning

    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, (ModelWarning, EdgetrainWarning)):
            print(f"edgetrain: warning: {message}", file=sys.stderr)
        else:
            shown(message, category, filename, lineno, file, line)

    warnings.showwarning = show


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    _one_line_model_warnings()
    try:
        with interrupt_on_stop_signals():  # SIGTERM and SIGHUP stop a command as Ctrl-C does
            args = build_parser().parse_args(argv)
            if args.max_memory is not None:
                limits.set_max_memory(args.max_memory)
            if "backend" in vars(args):
                from edgetrain.kernels import use_backend

                use_backend(args.backend)
            return args.func(args)
    except EdgetrainError as exc:
        print(f"edgetrain: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except Interrupted as exc:  # a run that saved a checkpoint says where, and how to resume
        print(f"edgetrain: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt as exc:
        print(f"edgetrain: interrupted{f' ({exc})' if str(exc) else ''}", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
