"""The profiling workload: what the host asks a board to run, and the one training loop both sides run.

Host and agent call the same `train` with the same `Workload`, the same model bytes and the same
data, so their final weights must agree bit for bit; `weights_digest` is how they compare them
without shipping the weights back. Everything here is plain data in and out: a workload arrives
as JSON, a data set as .npz opened with allow_pickle=False, a model as ONNX bytes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import platform
import re
import struct
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numba
import numpy as np
import onnx

import edgetrain
from edgetrain.data import npzfile
from edgetrain.data.npzfile import NpzError, read_npz
from edgetrain.errors import DataError, EdgetrainError, ModelError, ResourceLimitError
from edgetrain.kernels import get_backend, use_backend
from edgetrain.kernels.routes import CHOICES
from edgetrain.model import Model
from edgetrain.train.loop import TrainStep, batches
from edgetrain.train.optim import SGD
from firmware_bridge.profile.errors import WorkloadError
from firmware_bridge.wire.messages import MAX_BLOB_SIZE

__all__ = [
    "DEFAULT_LR",
    "DEFAULT_MOMENTUM",
    "LayerTiming",
    "PRECISION_FP32",
    "TrainingData",
    "TrainingRun",
    "Workload",
    "apply_precision",
    "check_model_fits",
    "engine_info",
    "load_model",
    "num_classes",
    "parse_onnx",
    "sha256_hex",
    "synthetic_batches",
    "train",
    "weights_digest",
]

TASK_TRAIN = "train"
PRECISION_FP32 = "fp32"
# Fixed, not user-tunable: the profile measures the engine, and a fixed optimiser keeps runs comparable.
DEFAULT_LR = 0.01
DEFAULT_MOMENTUM = 0.9
MAX_STEPS = 1_000_000
MAX_BATCH = 65_536
MAX_INPUT_RANK = 8
MAX_DIM = 1 << 24
MAX_SEED = (1 << 63) - 1
# One float32 batch larger than this does not fit next to its activations on any 8 GB board.
MAX_BATCH_BYTES = 1 << 30
MAX_LR = 10.0
MAX_PRECISION_LEN = 32
# Precision specs are passed through to Model.set_precision ("fp32", "8/8", "int8:fractrain"...);
# the pattern only keeps them printable, short and free of path or shell syntax.
_PRECISION = re.compile(r"[A-Za-z0-9][A-Za-z0-9/._:+-]*")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
# Mixed into the synthetic-data seed so the data stream never coincides with another use of `seed`.
SYNTHETIC_STREAM = 0x5EED
DATA_KEYS = ("x", "y")
# Uncompressed size limit of each array in a data file: refused before anything is decompressed.
MAX_DATA_ARRAY_BYTES = MAX_BLOB_SIZE
DIGEST_DOMAIN = b"edgetrain-weights/1\n"
# What `TrainingRun.extra["float_mode"]` says a digest was computed under.
FLOAT_DETERMINISTIC = "deterministic"  # portable fixed-order float: comparable across CPUs
FLOAT_FAST = "fast"  # BLAS and the platform's libm: comparable only between identical builds and CPUs
_LENGTH = struct.Struct("<Q")
_DEFAULT_DOMAINS = ("", "ai.onnx")


def engine_info() -> dict[str, Any]:
    """Return the versions and machine of the engine that runs a workload here."""
    info = {
        "edgetrain": edgetrain.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
    info["numba"] = numba.__version__
    info["integer_route"] = get_backend().name
    return info


def sha256_hex(data: bytes) -> str:
    """Return the SHA-256 of `data` as 64 lowercase hex digits."""
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------------------------- workload


def _require(params: Mapping[str, Any], name: str) -> Any:
    if name not in params:
        raise WorkloadError(f"workload lacks '{name}'")
    return params[name]


def _int(value: Any, name: str, low: int, high: int) -> int:
    # bool is an int subclass; a flag where a count belongs is a bug, not a number.
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise WorkloadError(f"workload '{name}' must be an integer in {low}..{high}, got {value!r}")
    return value


def _float(value: Any, name: str, low: float, high: float, *, low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise WorkloadError(f"workload '{name}' must be a finite number, got {value!r}")
    if value > high or value < low or (low_open and value == low):
        bracket = "(" if low_open else "["
        raise WorkloadError(f"workload '{name}' must be in {bracket}{low:g}, {high:g}], got {value!r}")
    return float(value)


def check_precision(spec: Any) -> str:
    """Return `spec` if it is a well-formed precision string, else raise WorkloadError."""
    if not isinstance(spec, str) or len(spec) > MAX_PRECISION_LEN or not _PRECISION.fullmatch(spec):
        raise WorkloadError(
            f"precision must be up to {MAX_PRECISION_LEN} letters, digits and / . _ : + - (e.g. fp32, 8/8), "
            f"got {spec!r}"
        )
    return spec


@dataclass(frozen=True)
class Workload:
    """One profiling job: train `warmup_steps` untimed steps, then `steps` timed ones, with plain SGD."""

    input_shape: tuple[int, ...]
    steps: int
    warmup_steps: int = 0
    precision: str = PRECISION_FP32
    seed: int = 0
    lr: float = DEFAULT_LR
    momentum: float = DEFAULT_MOMENTUM
    data_sha256: str | None = None
    # The integer route to run on (edgetrain.kernels.routes); None: the runner's own choice. Every
    # route gives the same bits, so this moves only the timings.
    backend: str | None = None
    # Float work on the portable fixed-order path (edgetrain.kernels.detfloat), so board and host digests
    # can agree across CPUs; integer precisions have it regardless. False: BLAS and the platform's libm.
    deterministic: bool = True

    def __post_init__(self) -> None:
        shape = self.input_shape
        if not isinstance(shape, tuple) or not 1 <= len(shape) <= MAX_INPUT_RANK:
            raise WorkloadError(f"workload 'input_shape' must list 1..{MAX_INPUT_RANK} dimensions, got {shape!r}")
        _int(shape[0], "batch_size", 1, MAX_BATCH)
        for dim in shape[1:]:
            _int(dim, "input_shape", 1, MAX_DIM)
        if math.prod(shape) * np.dtype(np.float32).itemsize > MAX_BATCH_BYTES:
            raise WorkloadError(f"a batch of shape {shape} exceeds {MAX_BATCH_BYTES >> 20} MiB")
        _int(self.steps, "steps", 1, MAX_STEPS)
        _int(self.warmup_steps, "warmup_steps", 0, MAX_STEPS)
        _int(self.seed, "seed", 0, MAX_SEED)
        check_precision(self.precision)
        _float(self.lr, "lr", 0.0, MAX_LR, low_open=True)
        _float(self.momentum, "momentum", 0.0, 1.0)
        if self.momentum == 1.0:
            raise WorkloadError("workload 'momentum' must be below 1")
        if self.data_sha256 is not None and (
            not isinstance(self.data_sha256, str) or not _SHA256_HEX.fullmatch(self.data_sha256)
        ):
            raise WorkloadError(f"workload 'data_sha256' must be 64 lowercase hex digits, got {self.data_sha256!r}")
        if not isinstance(self.deterministic, bool):
            raise WorkloadError(f"workload 'deterministic' must be true or false, got {self.deterministic!r}")
        if self.backend is not None and self.backend not in CHOICES:
            raise WorkloadError(f"workload 'backend' must be one of {', '.join(CHOICES)}, got {self.backend!r}")

    @property
    def batch_size(self) -> int:
        """Return the batch size (the first input dimension)."""
        return self.input_shape[0]

    @property
    def total_steps(self) -> int:
        """Return warm-up plus timed steps."""
        return self.warmup_steps + self.steps

    def to_params(self) -> dict[str, Any]:
        """Return the WORKLOAD message's `params` object."""
        params: dict[str, Any] = {
            "input_shape": list(self.input_shape),
            "batch_size": self.batch_size,
            "steps": self.steps,
            "warmup_steps": self.warmup_steps,
            "precision": self.precision,
            "deterministic": self.deterministic,
            "seed": self.seed,
            "optimizer": {"name": "sgd", "lr": self.lr, "momentum": self.momentum},
        }
        if self.data_sha256 is not None:
            params["data_sha256"] = self.data_sha256
        if self.backend is not None:
            params["backend"] = self.backend
        return params

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> Workload:
        """Build a Workload from a WORKLOAD `params` object; unknown fields are ignored, bad ones refused."""
        shape = _require(params, "input_shape")
        if not isinstance(shape, list):
            raise WorkloadError(f"workload 'input_shape' must be a list of integers, got {shape!r}")
        batch = params.get("batch_size", shape[0] if shape else None)
        if shape and batch != shape[0]:
            raise WorkloadError(f"workload 'batch_size' {batch!r} disagrees with input_shape {shape}")
        optimizer = params.get("optimizer", {})
        if not isinstance(optimizer, dict) or optimizer.get("name", "sgd") != "sgd":
            raise WorkloadError(f"workload 'optimizer' must be {{'name': 'sgd', ...}}, got {optimizer!r}")
        return cls(
            input_shape=tuple(shape),
            steps=_require(params, "steps"),
            warmup_steps=params.get("warmup_steps", 0),
            precision=params.get("precision", PRECISION_FP32),
            seed=params.get("seed", 0),
            lr=optimizer.get("lr", DEFAULT_LR),
            momentum=optimizer.get("momentum", DEFAULT_MOMENTUM),
            data_sha256=params.get("data_sha256"),
            backend=params.get("backend"),
            deterministic=params.get("deterministic", True),
        )


# ------------------------------------------------------------------------------------------------ model


def _graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from _graphs(attr.g)
            for sub in attr.graphs:
                yield from _graphs(sub)


def _tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors


def parse_onnx(blob: bytes, where: str) -> onnx.ModelProto:
    """Parse ONNX bytes, refusing external data, custom-op domains and local functions."""
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(bytes(blob))
    except Exception as exc:  # protobuf's DecodeError and friends all mean "not ONNX"
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelError(f"{where}: not a readable ONNX model ({reason})") from None
    if not proto.HasField("graph"):
        raise ModelError(f"{where}: not an ONNX model (no graph)")
    if len(proto.functions):
        raise ModelError(f"{where}: model-local functions are not supported")
    for graph in _graphs(proto.graph):
        for node in graph.node:
            if node.domain not in _DEFAULT_DOMAINS:
                raise ModelError(f"{where}: node '{node.name}' uses custom-op domain '{node.domain}'")
        for tensor in _tensors(graph):
            # External data would make the importer read files named by the sender.
            if tensor.data_location == onnx.TensorProto.EXTERNAL or len(tensor.external_data):
                raise ModelError(f"{where}: tensor '{tensor.name}' refers to external data; embed the weights")
    return proto


def load_model(blob: bytes, *, seed: int = 0, where: str = "model") -> Model:
    """Import ONNX bytes with edgetrain's importer; its refusal comes back as a one-line ModelError."""
    proto = parse_onnx(blob, where)
    try:
        return edgetrain.load(proto, seed=seed)
    except (ModelError, ResourceLimitError) as exc:
        # The importer names an in-memory model "<memory>"; the caller knows a better name.
        raise type(exc)(str(exc).replace("<memory>", where, 1)) from None


def num_classes(model: Model) -> int:
    """Return the class count of a (batch, classes) classifier output, or raise WorkloadError."""
    shape = model.graph.outputs[0].shape
    if len(shape) != 2 or not isinstance(shape[-1], int) or shape[-1] < 1:
        raise WorkloadError(
            f"profiling trains with cross-entropy and needs a (batch, classes) output; "
            f"output '{model.output_name}' has shape {tuple(shape)}"
        )
    return shape[-1]


def check_model_fits(model: Model, workload: Workload) -> int:
    """Check the workload's input shape against the model; return the model's class count."""
    if len(model.graph.inputs) != 1:
        raise WorkloadError(f"profiling supports single-input models; this one has {len(model.graph.inputs)}")
    expect = tuple(model.input_shape)
    shape = workload.input_shape
    fits = len(expect) == len(shape) and all(e is None or e == s for e, s in zip(expect, shape))
    if not fits:
        pretty = "(" + ", ".join("N" if d is None else str(d) for d in expect) + ")"
        raise WorkloadError(f"workload input shape {shape} does not fit the model's input {pretty}")
    return num_classes(model)


def apply_precision(model: Model, spec: str) -> None:
    """Switch `model` to precision `spec`; fp32 is the engine's default and needs no call."""
    check_precision(spec)
    if spec == PRECISION_FP32:
        return
    try:
        model.set_precision(spec)
    except (EdgetrainError, ValueError, TypeError) as exc:
        raise WorkloadError(f"precision '{spec}': {str(exc).splitlines()[0] if str(exc) else exc!r}") from None


# ------------------------------------------------------------------------------------------------- data


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _npz_problem(exc: NpzError) -> str:
    """An upload's wording of why its .npz was refused."""
    if exc.kind == npzfile.SINGLE_NPY:
        return "a single .npy array, not an .npz archive with arrays x and y"
    if exc.kind == npzfile.MISSING:
        return f"the .npz lacks array{'s' if len(exc.missing) > 1 else ''} {', '.join(exc.missing)}"
    if exc.key is None:
        return f"not a usable .npz data file ({exc.detail})"
    if exc.kind == npzfile.TOO_LARGE:
        return f"array {exc.key} {exc.detail}"
    if exc.kind == npzfile.NOT_NPY:
        return exc.detail
    return f"array {exc.key} cannot be read ({exc.detail})"


@dataclass(frozen=True)
class TrainingData:
    """A supervised data set: inputs `x` (N, ...) as float32 and integer class labels `y` (N,)."""

    x: np.ndarray
    y: np.ndarray

    @classmethod
    def from_npz(cls, blob: bytes, where: str = "data") -> TrainingData:
        """Read arrays `x` and `y` from .npz bytes with allow_pickle=False; raise DataError otherwise."""
        try:
            arrays = read_npz(bytes(blob), DATA_KEYS, max_member_bytes=MAX_DATA_ARRAY_BYTES, where=where)
        except NpzError as exc:
            raise DataError(f"{where}: {_npz_problem(exc)}") from None
        x, y = arrays["x"], arrays["y"]
        if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
            raise DataError(f"{where}: x must hold numbers, got dtype {x.dtype}")
        if not np.issubdtype(y.dtype, np.integer) or y.ndim != 1:
            raise DataError(f"{where}: y must be a 1-D array of integer class labels, got {y.dtype} {y.shape}")
        if x.ndim < 1 or len(x) != len(y):
            raise DataError(f"{where}: x has {len(x) if x.ndim else 0} samples but y has {len(y)}")
        return cls(np.ascontiguousarray(x, dtype=np.float32), np.ascontiguousarray(y, dtype=np.int64))

    def check_fits(self, input_shape: tuple[int, ...], classes: int, where: str = "data") -> None:
        """Raise DataError unless samples have the model's input shape, labels its classes, N >= batch."""
        if self.x.shape[1:] != tuple(input_shape[1:]):
            raise DataError(f"{where}: samples of shape {self.x.shape[1:]}, the model takes {tuple(input_shape[1:])}")
        if len(self.y) < input_shape[0]:
            raise DataError(f"{where}: {len(self.y)} samples, fewer than one batch of {input_shape[0]}")
        if self.y.size and (self.y.min() < 0 or self.y.max() >= classes):
            raise DataError(f"{where}: labels must lie in 0..{classes - 1}, got {self.y.min()}..{self.y.max()}")

    def batches(self, batch_size: int, seed: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield minibatches forever, shuffled per epoch from the seed alone (edgetrain.train.loop.batches)."""
        for idx in batches(len(self.y), batch_size, seed):
            yield self.x[idx], self.y[idx]


def synthetic_batches(seed: int, input_shape: tuple[int, ...], classes: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield batch i as x ~ N(0, 1) float32 of `input_shape` and labels uniform in 0..classes-1, from (seed, i)."""
    step = 0
    while True:
        rng = np.random.default_rng([SYNTHETIC_STREAM, seed, step])
        x = rng.standard_normal(input_shape, dtype=np.float32)
        y = rng.integers(0, classes, size=input_shape[0], dtype=np.int64)
        yield x, y
        step += 1


# --------------------------------------------------------------------------------------------- training


def weights_digest(params: Mapping[str, np.ndarray]) -> str:
    """Return the SHA-256 over parameters in sorted name order: name, dtype, shape, little-endian bytes."""
    h = hashlib.sha256(DIGEST_DOMAIN)
    for name in sorted(params):
        arr = np.asarray(params[name])
        # Canonical little-endian bytes, so two machines of different byte order still compare.
        canonical = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))
        header = json.dumps(
            {"name": name, "dtype": canonical.dtype.str, "shape": list(canonical.shape)},
            sort_keys=True,
            separators=(",", ":"),
        ).encode("utf-8")
        # Length prefixes keep the encoding unambiguous: no two parameter sets hash the same bytes.
        h.update(_LENGTH.pack(len(header)))
        h.update(header)
        h.update(_LENGTH.pack(canonical.nbytes))
        h.update(canonical.tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class LayerTiming:
    """Mean seconds per timed step one node spent in forward and backward (None: it has no backward)."""

    name: str
    forward_s: float
    backward_s: float | None


@dataclass
class TrainingRun:
    """What `train` measured and produced."""

    layers: list[LayerTiming]
    step_s: list[float]
    losses: list[float]
    digest: str
    completed_steps: int
    cancelled: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    float_mode: str = FLOAT_FAST


StepCallback = Callable[[int, int, float], None]
"""on_step(completed steps, total steps, loss of the step just done)."""


def _layer_timings(model: Model, timings: Mapping[tuple[str, str], float], steps: int) -> list[LayerTiming]:
    layers = []
    for node in model.graph.nodes:
        backward = timings.get((node.name, "backward"))
        layers.append(
            LayerTiming(
                node.name,
                timings.get((node.name, "forward"), 0.0) / steps,
                None if backward is None else backward / steps,
            )
        )
    return layers


def train(
    model: Model,
    workload: Workload,
    data: TrainingData | None = None,
    *,
    on_step: StepCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
    timed_phase: Callable[[], contextlib.AbstractContextManager[Any]] | None = None,
) -> TrainingRun:
    """Run the workload on `model`; per-layer times cover only the timed steps, after the warm-up.

    `timed_phase()` is entered just before the first timed step and left after the last, so a
    caller can measure power or memory over exactly the steps that are timed.
    """
    classes = check_model_fits(model, workload)
    if data is not None:
        data.check_fits(workload.input_shape, classes)
        stream = data.batches(workload.batch_size, workload.seed)
    else:
        stream = synthetic_batches(workload.seed, workload.input_shape, classes)
    apply_precision(model, workload.precision)
    model.deterministic = workload.deterministic
    if workload.backend is not None:
        use_backend(workload.backend)
    train_step = TrainStep(model, SGD(model.parameters(), lr=workload.lr, momentum=workload.momentum))
    step_s: list[float] = []
    losses: list[float] = []
    timings: dict[tuple[str, str], float] = {}
    cancelled = False
    completed = 0
    with contextlib.ExitStack() as timed:
        try:
            for step, (x, y) in zip(range(workload.total_steps), stream):
                if should_stop is not None and should_stop():
                    cancelled = True
                    break
                if step == workload.warmup_steps:
                    # Warm-up absorbs JIT compilation and cold caches; the clock starts now.
                    model.executor.timings = timings
                    if timed_phase is not None:
                        timed.enter_context(timed_phase())
                start = time.perf_counter()
                loss = train_step(step, x, y)
                elapsed = time.perf_counter() - start
                if step >= workload.warmup_steps:
                    step_s.append(elapsed)
                losses.append(float(loss))
                completed = step + 1
                if on_step is not None:
                    on_step(completed, workload.total_steps, float(loss))
        finally:
            model.executor.timings = None
    return TrainingRun(
        layers=_layer_timings(model, timings, max(1, len(step_s))),
        step_s=step_s,
        losses=losses,
        digest=weights_digest(model.parameters()),
        completed_steps=completed,
        cancelled=cancelled,
        float_mode=FLOAT_DETERMINISTIC if model.deterministic_float else FLOAT_FAST,
    )
