"""Training checkpoints without pickle: one .npz of namespaced arrays plus JSON metadata, written
atomically, verified by SHA-256 on load, rotated by CheckpointManager.

Layout (format version 1), every member a plain .npy array:

    param/<name>  buffer/<name>  optim/<key>  ctrl/<key>  rng/<key>   arrays; scalars as 0-d arrays
    meta                                                                uint8, UTF-8 JSON

The metadata holds the format name and version, step, epoch, seed, config, the model file's SHA-256, the
input preprocessing the data pipeline applied, the creation time, which entries were Python scalars (so they
come back as such) and `sha256`: a digest over every array (name, dtype, shape and bytes, in key order) and
the rest of the metadata.
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgetrain.data import npzfile
from edgetrain.data.npzfile import NpzError, read_npz
from edgetrain.errors import EdgetrainError
from edgetrain.fileio import make_folder, write_with

FORMAT_NAME = "edgetrain-checkpoint"
FORMAT_VERSION = 1
META_KEY = "meta"
NAMESPACES = {  # Checkpoint field -> key prefix in the file
    "params": "param",
    "buffers": "buffer",
    "optimizer_state": "optim",
    "controller_state": "ctrl",
    "rng_state": "rng",
}
KEY_SEP = "/"
META_FIELDS = ("step", "epoch", "seed", "config", "model_sha256", "preprocess")  # what save_checkpoint's meta may hold
SHA256_HEX_LEN = 64
CKPT_PREFIX, CKPT_SUFFIX, CKPT_STEP_DIGITS = "ckpt-", ".npz", 6
CKPT_NAME = re.compile(r"^ckpt-(\d+)\.npz$")
TMP_SUFFIX = ".tmp"
TMP_NAME = re.compile(r"^\.ckpt-\d+\.npz\..*\.tmp$")  # what mkstemp leaves behind when a writer dies
DEFAULT_KEEP = 3
HASH_CHUNK = 1 << 20
FILE_MODE = 0o644

Value = np.ndarray | np.generic | int | float | bool | str
SCALAR_TYPES = {"bool": bool, "int": int, "float": float, "str": str}  # checked in this order: bool is an int
INT64_RANGE = (-(1 << 63), (1 << 63) - 1)


class CheckpointError(EdgetrainError):
    """A checkpoint cannot be written, or a file is not a whole, valid checkpoint."""


class CorruptCheckpointWarning(UserWarning):
    """find_latest skipped a checkpoint file that does not load."""


@dataclass
class Checkpoint:
    """Everything a checkpoint file holds; scalars come back as the Python type they were saved as."""

    params: dict[str, np.ndarray]
    buffers: dict[str, np.ndarray]
    optimizer_state: dict[str, Value]
    controller_state: dict[str, Value]
    rng_state: dict[str, Value]
    meta: dict[str, Any]
    path: Path | None = field(default=None, compare=False)

    @property
    def step(self) -> int:
        """The training step the checkpoint was taken at."""
        return self.meta["step"]

    @property
    def epoch(self) -> int:
        """The epoch the checkpoint was taken in."""
        return self.meta["epoch"]

    def check_model(self, model_path: str | os.PathLike) -> None:
        """Raise CheckpointError unless model_path is the model file this checkpoint was trained from."""
        expected = self.meta.get("model_sha256")
        if expected is None:
            return
        actual = file_sha256(model_path)
        if actual != expected:
            raise CheckpointError(f"{self.path}: saved for a model file with SHA-256 {expected[:12]}..., "
                                  f"but {model_path} has {actual[:12]}...")


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, hex (for the `model_sha256` metadata field)."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(HASH_CHUNK):
                h.update(chunk)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    return h.hexdigest()


# -- writing --------------------------------------------------------------------------------------
def _to_array(where: str, value: Value) -> tuple[np.ndarray, str | None]:
    """The array to store and, for a Python scalar, its type name so load gives the scalar back."""
    for type_name, cls in SCALAR_TYPES.items():
        if isinstance(value, cls) and not isinstance(value, np.generic):
            if type_name == "int" and not INT64_RANGE[0] <= value <= INT64_RANGE[1]:
                raise CheckpointError(f"checkpoint {where}: integer {value} does not fit in 64 bits")
            return np.asarray(value), type_name
    if isinstance(value, np.generic):
        return np.asarray(value), "numpy"
    if not isinstance(value, np.ndarray):
        raise CheckpointError(f"checkpoint {where}: expected an array or a scalar, got {type(value).__name__}")
    if value.dtype.hasobject:
        raise CheckpointError(f"checkpoint {where}: object arrays need pickle and are not stored")
    return value, None


def _canonical(meta: Mapping[str, Any]) -> bytes:
    return json.dumps(meta, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def _digest(arrays: Mapping[str, np.ndarray], meta_without_digest: Mapping[str, Any]) -> str:
    h = hashlib.sha256()
    for key in sorted(arrays):
        a = arrays[key]
        # A length-prefixed header keeps (name, dtype, shape, bytes) boundaries unambiguous.
        header = json.dumps([key, a.dtype.str, list(a.shape), a.nbytes]).encode()
        h.update(len(header).to_bytes(8, "little"))
        h.update(header)
        h.update(np.ascontiguousarray(a).data)
    h.update(_canonical(meta_without_digest))
    return h.hexdigest()


def _checked_meta(meta: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(meta, Mapping):
        raise CheckpointError(f"checkpoint meta: expected a dict, got {type(meta).__name__}")
    unknown = sorted(set(meta) - set(META_FIELDS))
    if unknown:
        raise CheckpointError(f"checkpoint meta: unknown field(s) {', '.join(map(str, unknown))}; "
                              f"valid: {', '.join(META_FIELDS)}")
    out = {"step": meta.get("step"), "epoch": meta.get("epoch", 0), "seed": meta.get("seed"),
           "config": meta.get("config", {}), "model_sha256": meta.get("model_sha256"),
           "preprocess": meta.get("preprocess")}  # edgetrain.preprocess.record(): what the data pipeline applied
    for name in ("step", "epoch", "seed"):
        v = out[name]
        if v is None and name == "seed":
            continue
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise CheckpointError(f"checkpoint meta '{name}': expected an integer >= 0, got {v!r}")
        out[name] = int(v)
    if not isinstance(out["config"], Mapping):
        raise CheckpointError(f"checkpoint meta 'config': expected a dict, got {type(out['config']).__name__}")
    sha = out["model_sha256"]
    if sha is not None and not (isinstance(sha, str) and re.fullmatch(rf"[0-9a-f]{{{SHA256_HEX_LEN}}}", sha)):
        raise CheckpointError(f"checkpoint meta 'model_sha256': expected {SHA256_HEX_LEN} lowercase hex digits, "
                              f"got {sha!r}")
    if out["preprocess"] is not None and not isinstance(out["preprocess"], Mapping):
        raise CheckpointError(f"checkpoint meta 'preprocess': expected a dict, got {type(out['preprocess']).__name__}")
    try:
        out["preprocess"] = json.loads(json.dumps(out["preprocess"], sort_keys=True, allow_nan=False))
        # Round trip now, so what we hash is exactly what load will parse (tuples become lists, ...).
        out["config"] = json.loads(json.dumps(out["config"], sort_keys=True, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint meta 'config': not JSON-serialisable ({exc})") from None
    return out


def _write_atomic_npz(path: str, arrays: Mapping[str, np.ndarray]) -> None:
    # fileio.write_with: temporary file, fsync, rename, and an OSError as one line naming the path
    write_with(path, lambda f: np.savez(f, allow_pickle=False, **{k: arrays[k] for k in sorted(arrays)}))


def save_checkpoint(path: str | os.PathLike, *, params: Mapping[str, np.ndarray], buffers: Mapping[str, np.ndarray],
                    optimizer_state: Mapping[str, Value] | None = None,
                    controller_state: Mapping[str, Value] | None = None,
                    rng_state: Mapping[str, Value] | None = None, meta: Mapping[str, Any]) -> None:
    """Write a checkpoint atomically: readers see the previous file or the whole new one.

    meta: step (required), epoch, seed, config (JSON-serialisable dict), model_sha256 (see file_sha256).
    """
    path = os.fspath(path)
    parts = {"params": params, "buffers": buffers, "optimizer_state": optimizer_state or {},
             "controller_state": controller_state or {}, "rng_state": rng_state or {}}
    arrays: dict[str, np.ndarray] = {}
    scalars: dict[str, str] = {}
    for part, table in parts.items():
        if not isinstance(table, Mapping):
            raise CheckpointError(f"checkpoint {part}: expected a dict, got {type(table).__name__}")
        for name, value in table.items():
            if not isinstance(name, str) or not name or "\0" in name:
                raise CheckpointError(f"checkpoint {part}: bad entry name {name!r}")
            key = f"{NAMESPACES[part]}{KEY_SEP}{name}"
            arrays[key], scalar_type = _to_array(f"{part} '{name}'", value)
            if scalar_type:
                scalars[key] = scalar_type
    from edgetrain import __version__  # late: edgetrain/__init__ may import this module before defining it

    full = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **_checked_meta(meta),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "edgetrain_version": __version__, "scalars": scalars}
    full["sha256"] = _digest(arrays, full)
    arrays[META_KEY] = np.frombuffer(_canonical(full), dtype=np.uint8)
    _write_atomic_npz(path, arrays)


# -- reading --------------------------------------------------------------------------------------
def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _read_arrays(path: str) -> dict[str, np.ndarray]:
    """Every array of the file (only .npy members, each once, each as long as its header says)."""
    try:
        return read_npz(path, strict=True)
    except NpzError as exc:
        if exc.kind == npzfile.NOT_NPY:
            raise CheckpointError(f"{path}: not a checkpoint, or corrupt: {exc.detail}") from None
        if exc.kind == npzfile.DUPLICATE:
            raise CheckpointError(f"{path}: not a checkpoint: duplicate members") from None
        if exc.kind == npzfile.OBJECT:
            raise CheckpointError(f"{path}: entry '{exc.member}' is an object array, which would need pickle") from None
        if exc.kind == npzfile.SIZE:
            raise CheckpointError(f"{path}: entry '{exc.member}' {exc.detail} (truncated or corrupt)") from None
        if exc.kind == npzfile.VERSION:
            raise CheckpointError(f"{path}: entry '{exc.member}' {exc.detail}") from None
        raise CheckpointError(f"{path}: not a readable checkpoint, truncated or corrupt ({exc.detail})") from None


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read and verify a checkpoint; anything but a whole, valid file -> CheckpointError naming it."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    arrays = _read_arrays(path)

    raw = arrays.pop(META_KEY, None)
    if raw is None or raw.dtype != np.uint8 or raw.ndim != 1:
        raise CheckpointError(f"{path}: not an edgetrain checkpoint (no '{META_KEY}' entry)")
    try:
        meta = json.loads(raw.tobytes().decode())
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{path}: corrupt metadata ({_first_line(exc)})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path}: not an edgetrain checkpoint (metadata has no format '{FORMAT_NAME}')")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {meta.get('format_version')!r}; "
                              f"this edgetrain reads version {FORMAT_VERSION}")
    stored = meta.pop("sha256", None)
    if stored != _digest(arrays, meta):
        raise CheckpointError(f"{path}: SHA-256 mismatch, the file is corrupt")
    meta["sha256"] = stored

    prefixes = {prefix: part for part, prefix in NAMESPACES.items()}
    parts: dict[str, dict[str, Value]] = {part: {} for part in NAMESPACES}
    scalars = meta.pop("scalars", {})
    for key, arr in arrays.items():
        prefix, _, name = key.partition(KEY_SEP)
        if prefix not in prefixes or not name:
            raise CheckpointError(f"{path}: unexpected entry '{key}'")
        kind = scalars.get(key)
        value: Value = arr
        if kind is not None and kind != "numpy" and kind not in SCALAR_TYPES:
            raise CheckpointError(f"{path}: entry '{key}' has unknown scalar type {kind!r}")
        if kind == "numpy":
            value = arr[()]
        elif kind is not None:
            value = SCALAR_TYPES[kind](arr.item())
        parts[prefixes[prefix]][name] = value
    return Checkpoint(**parts, meta=meta, path=Path(path))


# -- a run folder ---------------------------------------------------------------------------------
def checkpoint_name(step: int) -> str:
    """File name of the checkpoint at a step: ckpt-000100.npz."""
    return f"{CKPT_PREFIX}{step:0{CKPT_STEP_DIGITS}d}{CKPT_SUFFIX}"


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint-named file in run_dir, oldest step first (not verified)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir}: no such run folder")
    found = [(int(m.group(1)), run_dir / m.group(0)) for m in map(CKPT_NAME.match, os.listdir(run_dir)) if m]
    return sorted(found)


def find_latest(run_dir: str | os.PathLike) -> Checkpoint | None:
    """The newest checkpoint in run_dir that loads and verifies; corrupt ones are skipped with a warning."""
    for _, path in reversed(list_checkpoints(run_dir)):
        try:
            return load_checkpoint(path)
        except CheckpointError as exc:
            warnings.warn(f"skipping checkpoint: {exc}", CorruptCheckpointWarning, stacklevel=2)
    return None


class CheckpointManager:
    """Checkpoints of one run: ckpt-<step>.npz every `every` steps and at the end, the last `keep` kept."""

    def __init__(self, run_dir: str | os.PathLike, keep: int = DEFAULT_KEEP, every: int | None = None,
                 verify: bool = True):
        for name, value in (("keep", keep), ("every", every)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise CheckpointError(f"checkpoint {name}: expected an integer >= 1, got {value!r}")
        self.run_dir = Path(run_dir)
        self.keep = keep
        self.every = every
        self.verify = verify
        make_folder(self.run_dir)
        for name in os.listdir(self.run_dir):
            if TMP_NAME.match(name):  # left by a writer that was killed mid-save
                with contextlib.suppress(OSError):
                    os.unlink(self.run_dir / name)

    def path_for(self, step: int) -> Path:
        """Where the checkpoint of a step goes."""
        return self.run_dir / checkpoint_name(step)

    def should_save(self, step: int, final: bool = False) -> bool:
        """True every `every` steps and at the final step."""
        return final or (self.every is not None and step > 0 and step % self.every == 0)

    def save(self, step: int, **parts: Any) -> Path:
        """Write ckpt-<step>.npz (parts as save_checkpoint takes them), then prune to the last `keep`."""
        meta = dict(parts.pop("meta", None) or {})
        if meta.setdefault("step", step) != step:
            raise CheckpointError(f"checkpoint meta 'step': {meta['step']} differs from the step saved, {step}")
        path = self.path_for(step)
        save_checkpoint(path, meta=meta, **parts)
        if self.verify:
            # Read back before pruning, so a write the storage garbled never costs the last good checkpoint.
            load_checkpoint(path)
        self._prune(step)
        return path

    def _prune(self, step: int) -> None:
        # Only older steps go: files past `step` belong to another timeline and are left to the user.
        older = [p for s, p in list_checkpoints(self.run_dir) if s <= step]
        for path in older[:-self.keep]:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
