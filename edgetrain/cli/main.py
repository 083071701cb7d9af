"""The `edgetrain` command line: one subcommand per job, user mistakes as one line and exit 2."""
from __future__ import annotations

import argparse
import json
import sys

from edgetrain.cli.argtypes import NON_NEGATIVE_FLOAT, NON_NEGATIVE_INT, POSITIVE_INT
from edgetrain.errors import EdgetrainError

EXIT_USER_ERROR = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse prints usage; we keep to one line
        raise EdgetrainError(message)


def _cmd_info(args) -> int:
    from edgetrain.cli.commands import is_checkpoint, warn
    from edgetrain.info import format_table, summarize
    from edgetrain.model import load

    if is_checkpoint(args.model):
        from edgetrain.train.runstate import open_checkpoint, restore_run

        run = restore_run(open_checkpoint(args.model, warn))
        summary = summarize(run.model)
        summary["checkpoint"] = {"path": str(run.checkpoint.path), "step": run.checkpoint.step,
                                 "schedule": run.config.schedule}
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

    return run_export(args.checkpoint, out=args.out, int8=args.int8, as_json=args.json, gated_bits=args.gated_bits)




def _int_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated step numbers, got {text!r}") from None


def _float_list(text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _str_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _add_train(sub) -> None:
    t = sub.add_parser("train", help="fine-tune an ONNX model on a data set, in fp32 or fixed point",
                       description="Fine-tune MODEL.onnx. Flags override the --config file; a run folder "
                                   "(--out) gets log.jsonl, config.json, checkpoints and model.onnx.",
                       argument_default=argparse.SUPPRESS)
    t.add_argument("model", nargs="?", metavar="MODEL.onnx", help="the ONNX model to train (or 'model' in the config file)")
    t.add_argument("--data", metavar="SPEC", help="data source: digits, mnist:DIR, cifar10:DIR, cifar100:DIR, npz:FILE")
    t.add_argument("--schedule", metavar="{fp32,static,pfq,dfq,fractrain}",
                   help="precision schedule: fp32 (default), static (fixed FW/BW bits), pfq (bits rising in stages), "
                        "dfq (per-sample gates choose each block's bits or skip it) or fractrain (pfq driving dfq)")
    t.add_argument("--bits", metavar="FW/BW", help="FW/BW bits of the static schedule, e.g. 8/8 (default) or 4/8:w6")
    length = t.add_mutually_exclusive_group()
    length.add_argument("--steps", type=POSITIVE_INT, metavar="N", help="training steps")
    length.add_argument("--epochs", type=POSITIVE_INT, metavar="N", help="training epochs (default 1)")
    t.add_argument("--batch-size", type=POSITIVE_INT, metavar="N", help="default 64")
    t.add_argument("--seed", type=NON_NEGATIVE_INT, metavar="S", help="seeds data order, augmentation, rounding (default 0)")
    t.add_argument("--optimizer", metavar="{sgd,adam,adamw}", help="sgd (default), adam or adamw")
    t.add_argument("--lr", type=NON_NEGATIVE_FLOAT, metavar="LR", help="learning rate (default 0.01)")
    t.add_argument("--momentum", type=NON_NEGATIVE_FLOAT, metavar="M", help="SGD momentum (default 0.9)")
    t.add_argument("--weight-decay", type=NON_NEGATIVE_FLOAT, metavar="WD", help="L2 (sgd, adam) or decoupled (adamw) weight decay")
    t.add_argument("--lr-schedule", metavar="{constant,step,cosine}", help="constant (default), step or cosine")
    p = t.add_argument_group("pfq", "progressive fractional quantisation (--schedule pfq); defaults are FracTrain's")
    p.add_argument("--pfq-stages", type=_str_list, metavar="FW/BW,...", help="stages, default 3/6,4/6,6/8,8/8")
    p.add_argument("--pfq-switch-steps", type=_int_list, metavar="S1,S2,...", help="switch at these steps (manual mode)")
    p.add_argument("--pfq-period", type=POSITIVE_INT, metavar="N", help="steps per loss period of the turning-point rule (400)")
    p.add_argument("--pfq-eps", type=NON_NEGATIVE_FLOAT, metavar="EPS", help="flatness threshold (0.05)")
    p.add_argument("--pfq-alpha", type=NON_NEGATIVE_FLOAT, metavar="A", help="eps shrinks by this factor per switch (0.3)")
    p.add_argument("--pfq-window", type=POSITIVE_INT, metavar="N", help="periods compared (5)")
    p.add_argument("--pfq-normaliser-periods", type=POSITIVE_INT, metavar="N", help="periods the normaliser averages (10)")
    p.add_argument("--pfq-alpha-switches", type=NON_NEGATIVE_INT, metavar="N", help="eps shrinks by alpha after each of the first N switches (2)")
    d = t.add_argument_group("dfq", "dynamic fractional quantisation (--schedule dfq, fractrain); defaults are FracTrain's")
    d.add_argument("--dfq-candidates", type=_str_list, metavar="FW/BW,...",
                   help="the gates' choices, 0 = skip the block (default 0,3/6,4/6,4/8,6/8,6/12)")
    d.add_argument("--dfq-weight-bits", type=POSITIVE_INT, metavar="W", help="weight bits of gated layers (4)")
    d.add_argument("--dfq-target", type=NON_NEGATIVE_FLOAT, metavar="PCT",
                   help="cost target of --schedule dfq: percent of the gated layers' fp32 training cost (3.0)")
    d.add_argument("--dfq-beta", type=NON_NEGATIVE_FLOAT, metavar="B", help="weight of the cost regulariser (0.001)")
    d.add_argument("--dfq-ungated", metavar="FW/BW", help="bits of the layers no gate controls: stem, shortcuts (8/8)")
    d.add_argument("--dfq-cost-table", metavar="FILE.json",
                   help="measured per-layer latencies (edgetrain profile --latency-table) as the cost instead of BitOPs")
    d.add_argument("--fractrain-targets", type=_float_list, metavar="PCT,...",
                   help="the targets the pfq indicator steps through (default 1.5,2.0,2.5,3.0)")
    t.add_argument("--lr-milestones", type=_int_list, metavar="S1,S2", help="steps where --lr-schedule step decays, e.g. 300,450")
    t.add_argument("--warmup-steps", type=NON_NEGATIVE_INT, metavar="N", help="linear learning-rate warm-up steps (default 0)")
    t.add_argument("--eval-every", type=POSITIVE_INT, metavar="N", help="evaluate on the test split every N steps "
                                                           "(default: every epoch, and at the end)")
    t.add_argument("--out", metavar="DIR", help="run folder (default edgetrain-run)")
    t.add_argument("--checkpoint-every", type=POSITIVE_INT, metavar="N", help="checkpoint every N steps (always at the end)")
    t.add_argument("--keep", type=POSITIVE_INT, metavar="N", help="checkpoints kept (default 3)")
    t.add_argument("--resume", action="store_true", default=False,
                   help="continue the run in --out from its newest good checkpoint")
    t.add_argument("--freeze", action="append", metavar="PATTERN",
                   help="do not train parameters matching this name or glob (repeatable)")
    t.add_argument("--train-last", type=POSITIVE_INT, metavar="K", help="train only the last K MAC layers")
    t.add_argument("--bias-only", action="store_true", help="train only biases")
    t.add_argument("--freeze-bn", action="store_true",
                   help="freeze BatchNorm: scale and shift fixed, running statistics not updated")
    t.add_argument("--num-classes", type=POSITIVE_INT, metavar="K",
                   help="replace the classifier (last Gemm) with a fresh one of K outputs")
    t.add_argument("--config", default=None, metavar="FILE.toml", help="a TOML file setting any of these options")
    t.add_argument("--json", action="store_true", default=False, help="print one JSON object at the end")
    t.set_defaults(func=_cmd_train)


def _add_eval_export(sub) -> None:
    e = sub.add_parser("eval", help="test accuracy of an ONNX model, a checkpoint or a run folder")
    e.add_argument("target", metavar="MODEL_OR_CKPT", help="an ONNX file, a checkpoint file, or a run folder")
    e.add_argument("--data", metavar="SPEC", help="data source (default: the run's own, for a checkpoint)")
    e.add_argument("--bits", metavar="FW/BW", help="evaluate at these FW/BW bits (default: as trained; fp32 for an ONNX file)")
    e.add_argument("--batch-size", type=POSITIVE_INT, default=256, metavar="N", help="default 256")
    e.add_argument("--json", action="store_true", help="machine-readable output")
    e.set_defaults(func=_cmd_eval)
    x = sub.add_parser("export", help="write a trained checkpoint as ONNX (float, or int8 QDQ)")
    x.add_argument("checkpoint", metavar="CKPT", help="a checkpoint file, or a run folder (its newest checkpoint)")
    x.add_argument("--out", required=True, metavar="FILE", help="the ONNX file to write")
    x.add_argument("--int8", action="store_true", help="QuantizeLinear/DequantizeLinear around the integer "
                                                       "layers, int8 weights (onnxruntime integer inference)")
    x.add_argument("--gated-bits", metavar="FW/BW", help="dfq/fractrain runs: the candidate the int8 backbone's gated "
                                                         "layers are written at (default: the most precise)")
    x.add_argument("--json", action="store_true", help="machine-readable output")
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
    demo.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out", default="edgetrain-demo", help="folder for the fine-tuned model (default edgetrain-demo)")
    demo.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    demo.set_defaults(func=_cmd_demo)
    _add_train(sub)
    _add_eval_export(sub)
    plot = sub.add_parser("plot", help="PNG figures of a training run: loss, accuracy, bit-widths, per-layer precision")
    plot.add_argument("run", metavar="RUN_DIR", help="a folder written by edgetrain train")
    plot.add_argument("--out", default=None, help="folder for the PNG files (default: the run folder)")
    plot.set_defaults(func=_cmd_plot)
    from firmware_bridge.profile.cli import add_profile_command

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
