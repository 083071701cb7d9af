"""`edgetrain federate`: a federation of simulated boards on this machine (Flower's simulation runtime).

The flags build a FleetSettings (edgetrain.fleet.settings); the training flags are `edgetrain train`'s own,
minus those the federation sets (data, steps, out, seed) or has no use for (checkpoints, evaluation cadence).
"""
from __future__ import annotations

import argparse
import json
from typing import Any

from edgetrain.cli.argtypes import NON_NEGATIVE_FLOAT, NON_NEGATIVE_INT, POSITIVE_INT, path_text
from edgetrain.errors import EdgetrainError
from edgetrain.train.config import FIELDS, FILE_ONLY

# TrainConfig fields the federation sets itself or has no use for in a client's round.
NOT_TRAIN_FLAGS = {"model", "data", "steps", "epochs", "out", "seed", "eval_every", "checkpoint_every", "keep"}
DEMO = {"clients": 3, "rounds": 3, "local_steps": 20, "partition": "iid",
        "train": {"schedule": "static", "bits": "8/8", "lr": 0.02, "momentum": 0.9, "batch_size": 64}}


def add_federate_command(sub: Any, add_setting: Any) -> None:
    """The `federate` subcommand and its flags."""
    from edgetrain.fleet.settings import STRATEGIES

    f = sub.add_parser("federate", help="federated fine-tuning of simulated boards on this machine (Flower)",
                       description="Fine-tune MODEL.onnx across --clients simulated boards, each training on its "
                                   "partition of --data with edgetrain's integer trainer; the server aggregates "
                                   "their compact updates with a Flower strategy. --out gets rounds.jsonl, a "
                                   "checkpoint per round and the final global model as float and int8 ONNX.")
    f.add_argument("model", nargs="?", metavar="MODEL.onnx", help="the ONNX model (not with --demo)")
    f.add_argument("--demo", action="store_true", help="the shipped LeNet-5 on the shipped digits, 3 clients, "
                                                       "3 rounds of 20 steps, static 8/8")
    f.add_argument("--data", metavar="SPEC", default=None, help="data source, split among the clients (default "
                                                                "digits)")
    f.add_argument("--clients", type=POSITIVE_INT, default=None, metavar="N", help="simulated boards (default 3)")
    f.add_argument("--rounds", type=POSITIVE_INT, default=None, metavar="R", help="rounds (default 3)")
    f.add_argument("--partition", default=None, metavar="iid|dirichlet:A",
                   help="how the data is split: iid, or label skew Dirichlet(A) (default iid)")
    f.add_argument("--local-steps", type=POSITIVE_INT, default=None, metavar="K",
                   help="training steps per client per round (default 10)")
    f.add_argument("--strategy", choices=STRATEGIES, default="fedavg", help="Flower strategy (default fedavg)")
    f.add_argument("--server-momentum", type=NON_NEGATIVE_FLOAT, default=0.3, metavar="M",
                   help="fedavgm: momentum of the server's step over rounds, in [0, 1) (default 0.3)")
    f.add_argument("--update-bits", default="8", metavar="B|fp32",
                   help="width of the quantised weight deltas clients send, 2..16, or fp32 (default 8)")
    f.add_argument("--seed", type=NON_NEGATIVE_INT, default=0, metavar="S",
                   help="seeds partitions, data order and rounding")
    f.add_argument("--min-clients", type=NON_NEGATIVE_INT, default=0, metavar="N",
                   help="replies a round needs (default: every client)")
    f.add_argument("--round-timeout", type=NON_NEGATIVE_FLOAT, default=0.0, metavar="SECONDS",
                   help="a round aggregates what arrived by then (default: no limit)")
    f.add_argument("--client-eval", action="store_true", help="also evaluate on every client's held-out split")
    f.add_argument("--stop-after", type=NON_NEGATIVE_INT, default=0, metavar="R",
                   help="stop after round R (resume later with --resume)")
    f.add_argument("--resume", action="store_true", help="continue the federation in --out from its last round")
    f.add_argument("--fault", default="", metavar="C:KIND[:R],...",
                   help="client C corrupts its reply (nan, shape, dtype, garbage), in round R or every round: "
                        "to try the server's defences")
    f.add_argument("--client-policies", default=None, metavar="JSON|FILE",
                   help='each client\'s own precision policy, as JSON or a JSON file: {"2": {"schedule": "dfq", '
                        '"dfq_target": 3.0, "latency_table": "board2.json"}} (training settings laid over the run\'s; '
                        'one naming a schedule replaces the run\'s precision settings)')
    f.add_argument("--no-export", action="store_true", help="skip the final ONNX export")
    f.add_argument("--cpus", type=POSITIVE_INT, default=None, metavar="N",
                   help="CPUs the simulation may use (default: all)")
    f.add_argument("--out", type=path_text("a folder"), default=None, metavar="DIR",
                   help="federation folder (default edgetrain-fleet)")
    f.add_argument("--json", action="store_true", help="print one JSON object at the end")
    train = f.add_argument_group("client training", "edgetrain train's flags, applied to every client's round")
    for name, field in FIELDS.items():
        if name in NOT_TRAIN_FLAGS or field.metadata["cli"] == FILE_ONLY:
            continue
        add_setting(train, field)
    # No --backend: the clients run in Ray's worker processes, which take the route from $EDGETRAIN_BACKEND.
    f.set_defaults(func=_cmd_federate, argument_default=None)


def _train_values(args: argparse.Namespace) -> dict[str, Any]:
    """Training flags the user gave (argparse fills absent ones with None or False)."""
    out = {}
    for name, field in FIELDS.items():
        if name in NOT_TRAIN_FLAGS or name not in vars(args):
            continue
        value = getattr(args, name)
        if value is None or (field.metadata["kind"] == "bool" and value is False):
            continue
        out[name] = value
    return out


def settings_from_args(args: argparse.Namespace) -> Any:
    """FleetSettings from the parsed flags (--demo fills what they leave unset)."""
    from edgetrain.cli.demo import demo_model_path
    from edgetrain.fleet.settings import FleetSettings

    base: dict[str, Any] = dict(DEMO) if args.demo else {}
    if args.demo and args.model:
        raise EdgetrainError("--demo runs the shipped model; give MODEL.onnx or --demo, not both")
    model = demo_model_path() if args.demo else args.model
    if not model:
        raise EdgetrainError("no model: give MODEL.onnx, or --demo")
    train = {**base.get("train", {}), **_train_values(args)}
    given = {k: getattr(args, k) for k in ("data", "clients", "rounds", "partition", "local_steps", "out")
             if getattr(args, k) is not None}
    values = {**{k: v for k, v in base.items() if k != "train"}, **given}
    import os

    policies = args.client_policies or "{}"
    if os.path.isfile(policies):  # a file of policies (JSON text itself never names a file)
        with open(policies, encoding="utf-8") as f:
            policies = f.read()
    values["client_policies"] = policies
    return FleetSettings(model=os.path.abspath(model), strategy=args.strategy, update_bits=args.update_bits,
                         server_momentum=args.server_momentum,
                         seed=args.seed, min_clients=args.min_clients, round_timeout=args.round_timeout,
                         client_eval=args.client_eval, stop_after=args.stop_after, fault=args.fault,
                         export=not args.no_export, train=json.dumps(train), **values)


def _cmd_federate(args: argparse.Namespace) -> int:
    from edgetrain.fleet import require_flwr

    require_flwr()
    from edgetrain.fleet.simulate import simulate

    settings = settings_from_args(args)
    settings.check()
    summary = simulate(settings, resume=args.resume, cpus=args.cpus)
    if not summary:
        raise EdgetrainError("the federation ended without a result (see Flower's log above)")
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        acc = summary.get("final_accuracy")
        print(f"federation in {summary['out']}: rounds {summary['rounds'][0] if summary['rounds'] else '-'}.."
              f"{summary['rounds'][-1] if summary['rounds'] else '-'}"
              + (f", central accuracy {acc:.2%}" if acc is not None else "")
              + (" (stopped; --resume continues it)" if summary["stopped"] else "") + f"; log {summary['log']}")
    return 0
