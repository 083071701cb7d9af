"""Training configuration: defaults, a TOML file, command-line flags (flags win), checked in one place.

Each setting is written once, as a TrainConfig field made by `setting`: its default, help, value kind, bounds
and command-line form. The `edgetrain train` parser, the config file's keys and checks, validation's bounds
and what `edgetrain info` shows of a run are all generated from those fields.

A config file holds the same names as the `edgetrain train` flags, with underscores or dashes
(`batch_size = 64` or `batch-size = 64`), plus the keys only a file sets (e.g. `precision_overrides`,
a table of layer patterns):

    model = "model.onnx"
    data = "digits"
    schedule = "static"
    bits = "8/8"
    steps = 600
    lr = 0.02
    freeze = ["conv1.*"]
    [precision_overrides]
    "fc1" = "fp32"

The resolved config is written to `run_dir/config.json` and stored in every checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgetrain.data.holdout import DEFAULT_VAL_FRACTION
from edgetrain.errors import EdgetrainError
from edgetrain.fileio import write_atomic
from edgetrain.precision import fractrain, pfq
from edgetrain.precision.dfq import config as dfq
from edgetrain.precision.spec import GRAD_RANGES, MAX_BITS, MIN_BITS, parse_precision

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10 with tomli installed
    try:
        import tomli as tomllib  # type: ignore[no-redef]
    except ModuleNotFoundError:
        tomllib = None  # type: ignore[assignment]

CONFIG_JSON = "config.json"
SCHEDULES = ("fp32", "static", "pfq", "dfq", "fractrain")
DYNAMIC_SCHEDULES = ("dfq", "fractrain")  # gates choose each sample's precision per block
OPTIMIZERS = ("sgd", "adam", "adamw")
LR_SCHEDULES = ("constant", "step", "cosine")
DEFAULT_STATIC_BITS = "8/8"
DEFAULT_OUT = "edgetrain-run"
DEFAULT_EPOCHS = 1
SGD_DEFAULT_MOMENTUM = 0.9
# Step decay without explicit milestones drops the lr at these fractions of the run (a common recipe).
DEFAULT_MILESTONE_FRACTIONS = (0.5, 0.75)

# Keys a resumed run may change: they decide how long and how often, not what a step computes.
RESUMABLE_KEYS = frozenset({"steps", "epochs", "eval_every", "checkpoint_every", "keep", "out"})

# How a setting is written on the command line (config files and stored configs take every setting).
FLAG, POSITIONAL, REPEATED, FILE_ONLY = "flag", "positional", "repeated", "file"
# Value kinds: how a file's value is checked (check_value) and how a flag's text is read (the CLI).
KINDS = ("str", "int", "float", "bool", "str_list", "int_list", "float_list", "str_table")


def setting(default: Any, help: str, kind: str, *, cli: str = FLAG, metavar: str | None = None,
            low: float | None = None, choices: tuple[str, ...] | None = None, group: str | None = None,
            exclusive: str | None = None, shown: Any = None) -> Any:
    """A TrainConfig field that carries everything else said about it: its help, value kind and command-line form.

    choices: the valid values (and the flag's metavar).
    low: the smallest valid value (files and flags alike; a flag's type refuses below max(low, 1) or 0).
    group: the --help section (pfq, dfq); exclusive: flags of one name exclude each other (steps, epochs).
    shown: the default --help names when the field's own is None, meaning "the module's default" (e.g. the
    DFQ candidates: None keeps a stored config free of a copy of today's list).
    """
    assert kind in KINDS and cli in (FLAG, POSITIONAL, REPEATED, FILE_ONLY)
    if choices and metavar is None:
        metavar = "{" + ",".join(choices) + "}"
    meta = {"help": help, "kind": kind, "cli": cli, "metavar": metavar, "low": low, "choices": choices,
            "group": group, "exclusive": exclusive, "shown": shown}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """Everything `edgetrain train` needs; field names are the flag and config-file names, each field's
    metadata its help, kind and command-line form (see `setting`)."""

    model: str | None = setting(None, "the ONNX model to train (or 'model' in the config file)", "str",
                                cli=POSITIONAL, metavar="MODEL.onnx")
    data: str | None = setting(None, "data source: digits, mnist:DIR, cifar10:DIR, cifar100:DIR, npz:FILE", "str",
                               metavar="SPEC")
    schedule: str = setting("fp32", "precision schedule: fp32, static (fixed FW/BW bits), pfq (bits rising in "
                            "stages), dfq (per-sample gates choose each block's bits or skip it) or fractrain "
                            "(pfq driving dfq)", "str", choices=SCHEDULES)
    bits: str | None = setting(None, "FW/BW bits of the static schedule, e.g. 8/8 or 4/8:w6", "str", metavar="FW/BW",
                               shown=DEFAULT_STATIC_BITS)
    steps: int | None = setting(None, "training steps", "int", metavar="N", low=1, exclusive="length")
    epochs: int | None = setting(None, "training epochs", "int", metavar="N", low=1, exclusive="length",
                                 shown=DEFAULT_EPOCHS)
    batch_size: int = setting(64, "samples per step", "int", metavar="N", low=1)
    seed: int = setting(0, "seeds data order, augmentation, rounding", "int", metavar="S", low=0)
    optimizer: str = setting("sgd", " or ".join(OPTIMIZERS), "str", choices=OPTIMIZERS)
    lr: float = setting(0.01, "learning rate", "float", metavar="LR", low=0.0)
    momentum: float | None = setting(None, "SGD momentum", "float", metavar="M", low=0.0, shown=SGD_DEFAULT_MOMENTUM)
    weight_decay: float | None = setting(None, "L2 (sgd, adam) or decoupled (adamw) weight decay", "float",
                                         metavar="WD", low=0.0)
    lr_schedule: str = setting("constant", " or ".join(LR_SCHEDULES), "str", choices=LR_SCHEDULES)
    lr_milestones: list[int] | None = setting(None, "steps where --lr-schedule step decays, e.g. 300,450", "int_list",
                                              metavar="S1,S2", shown="at 50% and 75% of the run")
    lr_gamma: float = setting(0.1, "factor of each step decay", "float", cli=FILE_ONLY, low=0.0)
    min_lr: float = setting(0.0, "the cosine schedule's final learning rate", "float", cli=FILE_ONLY, low=0.0)
    warmup_steps: int = setting(0, "linear learning-rate warm-up steps", "int", metavar="N", low=0)
    eval_every: int | None = setting(None, "evaluate on the test split every N steps", "int", metavar="N", low=1,
                                     shown="every epoch, and at the end")
    out: str = setting(DEFAULT_OUT, "run folder", "str", metavar="DIR")
    checkpoint_every: int | None = setting(None, "checkpoint every N steps (always at the end)", "int", metavar="N",
                                           low=1)
    keep: int = setting(3, "checkpoints kept", "int", metavar="N", low=1)
    freeze: list[str] = setting([], "do not train parameters matching this name or glob (repeatable)", "str_list",
                                cli=REPEATED, metavar="PATTERN")
    train_last: int | None = setting(None, "train only the last K MAC layers", "int", metavar="K", low=1)
    bias_only: bool = setting(False, "train only biases", "bool")
    freeze_bn: bool = setting(False, "freeze BatchNorm: scale and shift fixed, running statistics not updated", "bool")
    num_classes: int | None = setting(None, "replace the classifier (last Gemm) with a fresh one of K outputs", "int",
                                      metavar="K", low=2)
    label_smoothing: float = setting(0.0, "label smoothing of the cross-entropy, below 1", "float", cli=FILE_ONLY,
                                     low=0.0)
    val_fraction: float = setting(DEFAULT_VAL_FRACTION, "share of the training arrays held out for testing when a "
                                  "source has no test split", "float", cli=FILE_ONLY)
    augment: bool | None = setting(None, "augmentation on (crop/flip where the source has none) or off", "bool",
                                   cli=FILE_ONLY, shown="the data source's own")
    deterministic: bool = setting(False, "fp32: portable fixed-order float kernels (no BLAS, no platform exp/log), "
                                  "the same bits on x86_64 and arm64, slower; integer schedules always have them "
                                  "(edgetrain profile turns it on)", "bool")
    quantize_classifier: bool = setting(False, "quantise the classifier too (FracTrain keeps it fp32)", "bool",
                                        cli=FILE_ONLY)
    pow2_scales: bool = setting(False, "power-of-two quantisation scales", "bool", cli=FILE_ONLY)
    grad_ranges: str = setting("tensor", "output-gradient ranges of the integer layers: tensor (one per gradient, "
                               "FracTrain's) or split (per output channel for the weight gradient, per sample for "
                               "the error: two quantisations)", "str", choices=GRAD_RANGES)
    clip_act_bits: int = setting(0, "integer convs, linear layers and MatMuls whose activations have this many bits "
                                 "or fewer quantise them, in training, to the range of least squared error on a "
                                 "sample of the batch instead of its largest value (0: never)", "int",
                                 metavar="BITS", low=0)
    clip_weight_bits: int = setting(0, "integer layers whose weights have this many bits or fewer quantise each "
                                    "output channel to the range of least squared error on its weights instead of "
                                    "their largest value (0: never)", "int", metavar="BITS", low=0)
    precision_overrides: dict[str, str] = setting({}, "a table of layer pattern = \"bits\"", "str_table",
                                                  cli=FILE_ONLY)
    # PFQ (--schedule pfq): defaults are FracTrain's, see edgetrain/precision/pfq.py
    pfq_stages: list[str] | None = setting(None, "stages", "str_list", metavar="FW/BW,...", group="pfq",
                                           shown=pfq.DEFAULT_STAGES)
    pfq_period: int = setting(pfq.DEFAULT_PERIOD, "steps per loss period of the turning-point rule", "int",
                              metavar="N", low=1, group="pfq")
    pfq_switch_steps: list[int] | None = setting(None, "switch at these steps (manual mode)", "int_list",
                                                 metavar="S1,S2,...", group="pfq")
    pfq_eps: float = setting(pfq.DEFAULT_EPS, "flatness threshold", "float", metavar="EPS", low=0.0, group="pfq")
    pfq_alpha: float = setting(pfq.DEFAULT_ALPHA, "eps shrinks by this factor per switch", "float", metavar="A",
                               low=0.0, group="pfq")
    pfq_window: int = setting(pfq.DEFAULT_WINDOW, "periods compared", "int", metavar="N", low=1, group="pfq")
    pfq_normaliser_periods: int = setting(pfq.DEFAULT_NORMALISER_PERIODS, "periods the normaliser averages", "int",
                                          metavar="N", low=1, group="pfq")
    pfq_alpha_switches: int = setting(pfq.DEFAULT_ALPHA_SWITCHES, "eps shrinks by alpha after each of the first N "
                                      "switches", "int", metavar="N", low=0, group="pfq")
    # DFQ (--schedule dfq, fractrain): defaults are FracTrain's CIFAR ones, see edgetrain/precision/dfq/config.py
    dfq_candidates: list[str] | None = setting(None, "the gates' choices, 0 = skip the block", "str_list",
                                               metavar="FW/BW,...", group="dfq", shown=dfq.DEFAULT_CANDIDATES)
    dfq_weight_bits: int = setting(dfq.DEFAULT_WEIGHT_BITS, "weight bits of gated layers", "int", metavar="W", low=1,
                                   group="dfq")
    dfq_target: float = setting(dfq.DEFAULT_TARGET, "cost target of --schedule dfq: percent of the gated layers' "
                                "fp32 training cost", "float", metavar="PCT", low=0.0, group="dfq")
    dfq_beta: float = setting(dfq.DEFAULT_BETA, "weight of the cost regulariser", "float", metavar="B", low=0.0,
                              group="dfq")
    dfq_ungated: str = setting(dfq.DEFAULT_UNGATED, "bits of the layers no gate controls: stem, shortcuts", "str",
                               metavar="FW/BW", group="dfq")
    dfq_cost_table: str | None = setting(None, "measured per-layer latencies (edgetrain profile --latency-table) as "
                                         "the cost instead of BitOPs", "str", metavar="FILE.json", group="dfq")
    dfq_estimator: str = setting("ste", "how the gates learn: ste (straight-through) or probe (a seeded share of "
                                 "each batch also runs a second candidate; docs/GATE_ESTIMATOR.md)", "str",
                                 metavar="NAME", group="dfq", choices=dfq.ESTIMATORS)
    dfq_probe_share: float = setting(dfq.DEFAULT_PROBE_SHARE, "probe estimator: share of each batch probed", "float",
                                     metavar="S", low=0.0, group="dfq")
    dfq_probe_weight: float = setting(dfq.DEFAULT_PROBE_WEIGHT, "probe estimator: weight of its loss on the gates",
                                      "float", metavar="W", low=0.0, group="dfq")
    dfq_probe_margin: float = setting(dfq.DEFAULT_PROBE_MARGIN, "probe estimator: per-sample loss a cheaper "
                                      "candidate may trail the best by and still be the target", "float",
                                      metavar="M", low=0.0, group="dfq")
    dfq_probe_rule: str = setting("margin", "probe estimator: how measured candidates become the gates' targets: "
                                  "margin (cheapest within the margin of the best) or budget (what the cost target "
                                  "allows, to the samples most sensitive to precision)", "str", metavar="RULE",
                                  group="dfq", choices=dfq.PROBE_RULES)
    dfq_selection: str = setting("argmax", "how a gate's logits pick a sample's candidate: argmax, or quota (each "
                                 "block's computing samples spend what the cost target allows: the share it buys "
                                 "of the two candidates around it goes to the samples the gate ranks highest)",
                                 "str", metavar="RULE", group="dfq", choices=dfq.SELECTIONS)
    dfq_min_exec_share: float = setting(0.0, "floor on each block's executed share of a batch (guards against "
                                        "collapse, e.g. with a measured-time cost)", "float", metavar="S", low=0.0,
                                        group="dfq")
    dfq_backward_share: float = setting(1.0, "share of each block's computing samples whose error runs back through "
                                        "its layers (those with the largest output gradient; the rest take 0-bit "
                                        "gradients there)", "float", metavar="S", low=0.0, group="dfq")
    dfq_recalibration_batches: int = setting(dfq.DEFAULT_RECALIBRATION_BATCHES, "training batches that re-estimate "
                                             "BatchNorm statistics and activation ranges at full depth before the "
                                             "export (0: off)", "int", metavar="N", low=0, group="dfq")
    # FracTrain (--schedule fractrain): the PFQ indicator (pfq_period, pfq_eps, ...) steps these DFQ targets
    fractrain_targets: list[float] | None = setting(None, "the targets the pfq indicator steps through", "float_list",
                                                    metavar="PCT,...", group="dfq",
                                                    shown=fractrain.DEFAULT_TARGETS)
    fractrain_floors: list[float] | None = setting(None, "a floor on each block's executed share per target (in "
                                                   "place of --dfq-min-exec-share), e.g. 1,0.75,0.5,0.5",
                                                   "float_list", metavar="S,...", group="dfq")
    fractrain_grad_bits: list[int] | None = setting(None, "the gradient bits of every computing candidate per target "
                                                    "(0: each candidate's own), e.g. 0,0,0,8: 8-bit gradients at the "
                                                    "last target", "int_list", metavar="B,...", group="dfq")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready copy."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @property
    def precision_spec(self) -> str:
        """The default precision of the run's MAC layers ("fp32" or FW/BW bits)."""
        if self.schedule == "pfq":
            return (self.pfq_stages or pfq.DEFAULT_STAGES)[0]
        if self.schedule in DYNAMIC_SCHEDULES:
            return self.dfq_ungated
        return "fp32" if self.schedule == "fp32" else (self.bits or DEFAULT_STATIC_BITS)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _shown(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(_shown(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def help_text(name: str) -> str:
    """A setting's help with the default it stands at (--help, `edgetrain info`)."""
    f = FIELDS[name]
    meta = f.metadata
    default = meta["shown"] if meta["shown"] is not None else f.default
    if default is None or default is dataclasses.MISSING or (meta["kind"] == "bool" and meta["shown"] is None):
        return meta["help"]
    return f"{meta['help']} (default {_shown(default)})"


def changed_settings(c: TrainConfig) -> dict[str, Any]:
    """The settings a run chose (those not at their default), by name, in field order."""
    out = {}
    for name, f in FIELDS.items():
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        value = getattr(c, name)
        if value != default:
            out[name] = value
    return out


def _fail(where: str, key: str, what: str) -> EdgetrainError:
    # "option 'lr' ..." for a checked value (from a flag or a file), "FILE: 'lr' ..." for a file's own key.
    return EdgetrainError(f"option '{key}' {what}" if where == "option" else f"{where}: '{key}' {what}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_value(where: str, key: str, value: Any) -> Any:
    """Type-check one key's value (None allowed for optional keys); returns it normalised."""
    kind = FIELDS[key].metadata["kind"]
    if value is None:
        return None
    if kind == "str" and isinstance(value, str):
        return value
    if kind == "int" and _is_int(value):
        return value
    if kind == "float" and (_is_int(value) or isinstance(value, float)):
        return float(value)
    if kind == "bool" and isinstance(value, bool):
        return value
    if kind == "str_list" and isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    if kind == "int_list" and isinstance(value, list) and all(_is_int(v) for v in value):
        return list(value)
    if kind == "float_list" and isinstance(value, list) and all(
            _is_int(v) or isinstance(v, float) for v in value):
        return [float(v) for v in value]
    if kind == "str_table" and isinstance(value, Mapping) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        return dict(value)
    want = {"str": "a string", "int": "an integer", "float": "a number", "bool": "true or false",
            "str_list": "a list of strings", "int_list": "a list of integers", "float_list": "a list of numbers",
            "str_table": "a table of pattern = \"bits\" strings"}[kind]
    raise _fail(where, key, f"must be {want}, got {value!r}")


def normalise_keys(where: str, raw: Mapping[str, Any]) -> dict[str, Any]:
    """Map dashed keys to field names and refuse unknown ones, listing the valid keys."""
    out: dict[str, Any] = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name not in FIELDS:
            raise EdgetrainError(f"{where}: unknown key '{key}'; valid keys: {', '.join(FIELDS)}")
        out[name] = check_value(where, name, value)
    return out


def read_toml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a TOML config file into checked field values."""
    where = os.fspath(path)
    if tomllib is None:  # pragma: no cover
        raise EdgetrainError(f"{where}: reading TOML needs Python 3.11+ or the 'tomli' package")
    try:
        with open(where, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise EdgetrainError(f"{where}: no such config file") from None
    except IsADirectoryError:
        raise EdgetrainError(f"{where}: is a directory, not a config file") from None
    except OSError as exc:
        raise EdgetrainError(f"{where}: cannot read ({exc.strerror or exc})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise EdgetrainError(f"{where}: not valid TOML ({str(exc).splitlines()[0]})") from None
    return normalise_keys(where, raw)


def _merge(base: dict[str, Any], layer: Mapping[str, Any]) -> dict[str, Any]:
    """base updated by layer; steps and epochs are one choice, so a layer naming either replaces both."""
    out = dict(base)
    if "steps" in layer or "epochs" in layer:
        out.pop("steps", None)
        out.pop("epochs", None)
    out.update(layer)
    return out


def resolve(flags: Mapping[str, Any], file_values: Mapping[str, Any] | None = None,
            base: Mapping[str, Any] | None = None) -> TrainConfig:
    """Defaults, then `base` (a checkpoint's config), then the config file, then flags; validated."""
    values: dict[str, Any] = {}
    for layer in (base or {}, file_values or {}, flags):
        values = _merge(values, {k: v for k, v in layer.items() if v is not None})
    config = TrainConfig(**values)
    validate(config)
    return config


def _check_bounds(c: TrainConfig) -> None:
    """Each setting's `choices` and `low` (see `setting`), for values from files as well as flags."""
    for name, f in FIELDS.items():
        value, meta = getattr(c, name), f.metadata
        if value is None:
            continue
        if meta["choices"] and value not in meta["choices"]:
            raise _fail("option", name, f"'{value}' is unknown; valid: {', '.join(meta['choices'])}")
        if meta["kind"].endswith("_list") and f.default is None and not value:
            # None stands for the module's default list; an empty one would quietly mean the same
            raise _fail("option", name, "must list at least one value")
        if meta["kind"] == "float" and not math.isfinite(value) or meta["kind"] == "float_list" and not all(
                math.isfinite(v) for v in value):
            # a run's config is stored as strict JSON: inf and NaN would fail its first checkpoint
            raise _fail("option", name, f"must be finite, got {value}")
        low = meta["low"]
        if low is None:
            continue
        if meta["kind"] == "float" and (not math.isfinite(value) or value < low):
            raise _fail("option", name, f"must be a finite number >= {low:g}, got {value}")
        if meta["kind"] == "int" and value < low:
            raise _fail("option", name, f"must be at least {low}, got {value}" if low else
                        f"must be >= 0, got {value}")


def validate(c: TrainConfig) -> None:
    """Refuse values no run can use, each with one line naming the key."""
    if c.schedule not in SCHEDULES:
        raise EdgetrainError(f"unknown schedule '{c.schedule}'; valid: {', '.join(SCHEDULES)}")
    if c.schedule == "pfq" and c.bits is not None:
        raise EdgetrainError(f"bits '{c.bits}': pfq's stages set the bits (--pfq-stages, e.g. 3/6,4/6,6/8,8/8)")
    if c.fractrain_floors is not None and c.schedule != "fractrain":
        raise _fail("option", "fractrain_floors", f"only --schedule fractrain steps through floors, not {c.schedule}")
    if c.fractrain_grad_bits is not None and c.schedule != "fractrain":
        raise _fail("option", "fractrain_grad_bits", f"only --schedule fractrain steps through gradient bits, not "
                    f"{c.schedule}")
    if c.schedule in DYNAMIC_SCHEDULES:
        _validate_dfq(c)
    if c.bits is not None and c.schedule == "fp32":
        raise EdgetrainError(f"bits '{c.bits}' need --schedule static (fp32 trains every layer in float)")
    if c.bits is not None and parse_precision(c.bits).is_float:
        raise EdgetrainError(f"bits '{c.bits}': --schedule static needs FW/BW bits such as 8/8; "
                             "use --schedule fp32 for float")
    for spec in c.precision_overrides.values():
        parse_precision(spec)
    if c.momentum is not None and c.optimizer != "sgd" and c.optimizer in OPTIMIZERS:
        raise _fail("option", "momentum", f"applies to sgd only, not {c.optimizer} (Adam keeps its betas)")
    if c.steps is not None and c.epochs is not None:
        raise EdgetrainError("give --steps or --epochs, not both")
    if not c.out.strip():  # '' would quietly mean the current folder
        raise _fail("option", "out", "must name a folder, got ''")
    _check_bounds(c)
    if c.lr <= 0:
        raise _fail("option", "lr", f"must be positive, got {c.lr}")
    if c.label_smoothing >= 1:
        raise _fail("option", "label_smoothing", f"must be below 1, got {c.label_smoothing}")


def dfq_settings(c: TrainConfig, cost_table: dict[str, dict[str, float]] | None = None) -> dfq.DFQConfig:
    """The DFQConfig a TrainConfig's dfq_* keys describe (cost_table: the dfq_cost_table file, read)."""
    target = c.dfq_target
    if c.schedule == "fractrain":  # the gates start nearest the first target FracTrain puts in force
        target = (c.fractrain_targets or fractrain.DEFAULT_TARGETS)[0]
    return dfq.DFQConfig(candidates=tuple(c.dfq_candidates or dfq.DEFAULT_CANDIDATES),
                         weight_bits=c.dfq_weight_bits, target=target, beta=c.dfq_beta, cost_table=cost_table,
                         estimator=c.dfq_estimator, probe_share=c.dfq_probe_share, probe_weight=c.dfq_probe_weight,
                         probe_margin=c.dfq_probe_margin, probe_rule=c.dfq_probe_rule,
                         min_exec_share=c.dfq_min_exec_share, selection=c.dfq_selection,
                         backward_share=c.dfq_backward_share)


def dfq_config(c: TrainConfig) -> dfq.DFQConfig:
    """The DFQConfig a run trains with: dfq_settings with the measured cost table read, if one is named."""
    table = None
    if c.dfq_cost_table:
        from edgetrain.precision.latency import read_cost_table

        table = read_cost_table(c.dfq_cost_table, c.dfq_backward_share)
    return dfq_settings(c, table)


def _validate_dfq(c: TrainConfig) -> None:
    if c.bits is not None:
        raise EdgetrainError(f"bits '{c.bits}': {c.schedule}'s gates choose the bits per sample (--dfq-candidates); "
                             "--dfq-ungated sets the stem's and shortcuts'")
    dfq_settings(c).check()
    parse_precision(c.dfq_ungated)
    targets = [c.dfq_target] + list(c.fractrain_targets or [])
    if any(not math.isfinite(t) or not 0 < t <= 100 for t in targets):
        raise EdgetrainError(f"dfq cost target {targets}: each must be a percentage in (0, 100]")
    n_targets = len(c.fractrain_targets or fractrain.DEFAULT_TARGETS)
    if c.fractrain_floors is not None:
        if len(c.fractrain_floors) != n_targets:
            raise _fail("option", "fractrain_floors", f"{len(c.fractrain_floors)} floors for {n_targets} targets; "
                        "give one per target")
        if any(not math.isfinite(f) or not 0 <= f <= 1 for f in c.fractrain_floors):
            raise _fail("option", "fractrain_floors", f"{c.fractrain_floors}: each must be a share in [0, 1]")
    if c.fractrain_grad_bits is not None:
        if len(c.fractrain_grad_bits) != n_targets:
            raise _fail("option", "fractrain_grad_bits", f"{len(c.fractrain_grad_bits)} gradient widths for "
                        f"{n_targets} targets; give one per target")
        if any(b != 0 and not MIN_BITS <= b <= MAX_BITS for b in c.fractrain_grad_bits):
            raise _fail("option", "fractrain_grad_bits", f"{c.fractrain_grad_bits}: each must be 0 (the candidate's "
                        f"own) or bits in [{MIN_BITS}, {MAX_BITS}]")
    if c.dfq_cost_table is not None and not os.path.isfile(c.dfq_cost_table):
        raise _fail("option", "dfq_cost_table", f"{c.dfq_cost_table}: no such file")


def with_absolute_paths(c: TrainConfig) -> TrainConfig:
    """The model path made absolute, so eval and export find it from any folder."""
    return dataclasses.replace(c, model=os.path.abspath(c.model)) if c.model else c


def write_config_json(c: TrainConfig, run_dir: str | os.PathLike) -> Path:
    """Write the resolved config to run_dir/config.json (atomically)."""
    path = Path(run_dir) / CONFIG_JSON
    write_atomic(path, (json.dumps(c.to_dict(), indent=2, sort_keys=True) + "\n").encode())
    return path


def read_config_json(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The checked settings of run_dir/config.json (a run that stopped before its first checkpoint), or None."""
    path = Path(run_dir) / CONFIG_JSON
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise EdgetrainError(f"{path}: unreadable ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
                             ) from None
    if not isinstance(raw, dict):
        raise EdgetrainError(f"{path}: expected a JSON object of settings")
    return normalise_keys(str(path), raw)


def from_checkpoint_dict(where: str, stored: Mapping[str, Any]) -> TrainConfig:
    """Rebuild a TrainConfig from the dict a checkpoint stored (unknown keys: a newer edgetrain wrote it)."""
    values = normalise_keys(f"{where}: stored config", stored)
    return TrainConfig(**{k: v for k, v in values.items() if v is not None or FIELDS[k].default is None})
