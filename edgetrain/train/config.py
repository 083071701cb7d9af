"""Training configuration: defaults, a TOML file, command-line flags (flags win), checked in one place.

A config file holds the same names as the `edgetrain train` flags, with underscores or dashes
(`batch_size = 64` or `batch-size = 64`), plus `precision_overrides`, a table of layer patterns:

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from edgetrain.errors import EdgetrainError
from edgetrain.fileio import write_atomic
from edgetrain.precision.spec import parse_precision

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


@dataclass
class TrainConfig:
    """Everything `edgetrain train` needs; field names are the flag and config-file names."""

    model: str | None = None
    data: str | None = None
    schedule: str = "fp32"
    bits: str | None = None
    steps: int | None = None
    epochs: int | None = None
    batch_size: int = 64
    seed: int = 0
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float | None = None
    weight_decay: float | None = None
    lr_schedule: str = "constant"
    lr_milestones: list[int] | None = None
    lr_gamma: float = 0.1
    min_lr: float = 0.0
    warmup_steps: int = 0
    eval_every: int | None = None
    out: str = DEFAULT_OUT
    checkpoint_every: int | None = None
    keep: int = 3
    freeze: list[str] = field(default_factory=list)
    train_last: int | None = None
    bias_only: bool = False
    freeze_bn: bool = False
    num_classes: int | None = None
    label_smoothing: float = 0.0
    val_fraction: float = 0.1
    augment: bool | None = None
    quantize_classifier: bool = False
    pow2_scales: bool = False
    precision_overrides: dict[str, str] = field(default_factory=dict)
    # PFQ (--schedule pfq): defaults are FracTrain's, see edgetrain/pfq.py
    pfq_stages: list[str] | None = None
    pfq_period: int = 400
    pfq_switch_steps: list[int] | None = None
    pfq_eps: float = 0.05
    pfq_alpha: float = 0.3
    pfq_window: int = 5
    pfq_normaliser_periods: int = 10
    pfq_alpha_switches: int = 2
    # DFQ (--schedule dfq, fractrain): defaults are FracTrain's CIFAR ones, see edgetrain/dfq.py
    dfq_candidates: list[str] | None = None
    dfq_weight_bits: int = 4
    dfq_target: float = 3.0
    dfq_beta: float = 1e-3
    dfq_ungated: str = "8/8"
    dfq_cost_table: str | None = None
    # FracTrain (--schedule fractrain): the PFQ indicator (pfq_period, pfq_eps, ...) steps these DFQ targets
    fractrain_targets: list[float] | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready copy."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @property
    def precision_spec(self) -> str:
        """The default precision of the run's MAC layers ("fp32" or FW/BW bits)."""
        if self.schedule == "pfq":
            return (self.pfq_stages or ["3/6"])[0]
        if self.schedule in DYNAMIC_SCHEDULES:
            return self.dfq_ungated
        return "fp32" if self.schedule == "fp32" else (self.bits or DEFAULT_STATIC_BITS)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
# The type each key must have in a TOML file or a stored config (flags are typed by argparse already).
_KIND: dict[str, tuple[str, ...]] = {
    "str": ("model", "data", "schedule", "bits", "optimizer", "lr_schedule", "out", "dfq_ungated", "dfq_cost_table"),
    "int": ("steps", "epochs", "batch_size", "seed", "warmup_steps", "eval_every", "checkpoint_every", "keep",
            "train_last", "num_classes", "pfq_period", "pfq_window", "pfq_normaliser_periods", "pfq_alpha_switches",
            "dfq_weight_bits"),
    "float": ("lr", "momentum", "weight_decay", "lr_gamma", "min_lr", "label_smoothing", "val_fraction",
              "pfq_eps", "pfq_alpha", "dfq_target", "dfq_beta"),
    "bool": ("bias_only", "freeze_bn", "augment", "quantize_classifier", "pow2_scales"),
    "str_list": ("freeze", "pfq_stages", "dfq_candidates"),
    "float_list": ("fractrain_targets",),
    "int_list": ("lr_milestones", "pfq_switch_steps"),
    "str_table": ("precision_overrides",),
}
KIND_OF = {key: kind for kind, keys in _KIND.items() for key in keys}
assert set(KIND_OF) == set(FIELDS), "every config field needs a kind"


def _fail(where: str, key: str, what: str) -> EdgetrainError:
    # "option 'lr' ..." for a checked value (from a flag or a file), "FILE: 'lr' ..." for a file's own key.
    return EdgetrainError(f"option '{key}' {what}" if where == "option" else f"{where}: '{key}' {what}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_value(where: str, key: str, value: Any) -> Any:
    """Type-check one key's value (None allowed for optional keys); returns it normalised."""
    kind = KIND_OF[key]
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


def _positive(key: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise _fail("option", key, f"must be at least 1, got {value}")


def validate(c: TrainConfig) -> None:
    """Refuse values no run can use, each with one line naming the key."""
    if c.schedule not in SCHEDULES:
        raise EdgetrainError(f"unknown schedule '{c.schedule}'; valid: {', '.join(SCHEDULES)}")
    if c.schedule == "pfq" and c.bits is not None:
        raise EdgetrainError(f"bits '{c.bits}': pfq's stages set the bits (--pfq-stages, e.g. 3/6,4/6,6/8,8/8)")
    if c.schedule in DYNAMIC_SCHEDULES:
        _validate_dfq(c)
    if c.bits is not None and c.schedule == "fp32":
        raise EdgetrainError(f"bits '{c.bits}' need --schedule static (fp32 trains every layer in float)")
    if c.bits is not None and parse_precision(c.bits).is_float:
        raise EdgetrainError(f"bits '{c.bits}': --schedule static needs FW/BW bits such as 8/8; "
                             "use --schedule fp32 for float")
    for spec in c.precision_overrides.values():
        parse_precision(spec)
    if c.optimizer not in OPTIMIZERS:
        raise _fail("option", "optimizer", f"'{c.optimizer}' is unknown; valid: {', '.join(OPTIMIZERS)}")
    if c.lr_schedule not in LR_SCHEDULES:
        raise _fail("option", "lr_schedule", f"'{c.lr_schedule}' is unknown; valid: {', '.join(LR_SCHEDULES)}")
    if c.momentum is not None and c.optimizer != "sgd":
        raise _fail("option", "momentum", f"applies to sgd only, not {c.optimizer} (Adam keeps its betas)")
    if c.steps is not None and c.epochs is not None:
        raise EdgetrainError("give --steps or --epochs, not both")
    for key in ("steps", "epochs", "batch_size", "eval_every", "checkpoint_every", "keep", "train_last"):
        _positive(key, getattr(c, key))
    if c.num_classes is not None and c.num_classes < 2:
        raise _fail("option", "num_classes", f"must be at least 2, got {c.num_classes}")
    if c.seed < 0:
        raise _fail("option", "seed", f"must be >= 0, got {c.seed}")
    if c.warmup_steps < 0:
        raise _fail("option", "warmup_steps", f"must be >= 0, got {c.warmup_steps}")
    for key in ("lr", "momentum", "weight_decay", "lr_gamma", "min_lr", "label_smoothing"):
        v = getattr(c, key)
        if v is not None and (not math.isfinite(v) or v < 0):
            raise _fail("option", key, f"must be a finite number >= 0, got {v}")
    if c.lr <= 0:
        raise _fail("option", "lr", f"must be positive, got {c.lr}")
    if c.label_smoothing >= 1:
        raise _fail("option", "label_smoothing", f"must be below 1, got {c.label_smoothing}")


def _validate_dfq(c: TrainConfig) -> None:
    from edgetrain.precision.dfq.config import DEFAULT_CANDIDATES, parse_candidates
    from edgetrain.precision.spec import MAX_BITS, MIN_BITS

    if c.bits is not None:
        raise EdgetrainError(f"bits '{c.bits}': {c.schedule}'s gates choose the bits per sample (--dfq-candidates); "
                             "--dfq-ungated sets the stem's and shortcuts'")
    if not MIN_BITS <= c.dfq_weight_bits <= MAX_BITS:
        raise _fail("option", "dfq_weight_bits", f"must be in {MIN_BITS}..{MAX_BITS}, got {c.dfq_weight_bits}")
    parse_candidates(c.dfq_candidates or DEFAULT_CANDIDATES, c.dfq_weight_bits)
    parse_precision(c.dfq_ungated)
    targets = [c.dfq_target] + list(c.fractrain_targets or [])
    if any(not math.isfinite(t) or not 0 < t <= 100 for t in targets):
        raise EdgetrainError(f"dfq cost target {targets}: each must be a percentage in (0, 100]")
    if not math.isfinite(c.dfq_beta) or c.dfq_beta < 0:
        raise _fail("option", "dfq_beta", f"must be a finite number >= 0, got {c.dfq_beta}")
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


def from_checkpoint_dict(where: str, stored: Mapping[str, Any]) -> TrainConfig:
    """Rebuild a TrainConfig from the dict a checkpoint stored (unknown keys: a newer edgetrain wrote it)."""
    values = normalise_keys(f"{where}: stored config", stored)
    return TrainConfig(**{k: v for k, v in values.items() if v is not None or FIELDS[k].default is None})
