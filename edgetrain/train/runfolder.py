"""A run folder holds one run and nothing of anyone else's: locked for the run's life, never written over
an input, never mixed with an earlier run.

- `RunFolder` creates the folder and takes an exclusive lock (fcntl.flock on LOCK_NAME, held until the run
  ends; the kernel drops it when the process dies, even by kill -9). A second run or a second --resume on
  the same folder fails at once with one line naming the pid that holds it.
- `check_inputs` refuses a folder where a file the run writes (config, log, checkpoints, model) is a file
  the run reads (the model, the data, a config or cost table): that file would be overwritten.
- `check_run_dir` refuses to start a new run over an earlier one (its checkpoints would mix with ours); a
  folder an earlier run left before its first checkpoint holds nothing to lose, and is started afresh.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from edgetrain.errors import EdgetrainError
from edgetrain.fileio import check_file_target, make_folder, write_error
from edgetrain.train.checkpoint import CKPT_NAME, list_checkpoints
from edgetrain.train.config import CONFIG_JSON, read_config_json
from edgetrain.train.runlog import LOG_NAME, parse_log

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory locks, the folder checks still apply
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".edgetrain.lock"
EXPORT_NAME = "model.onnx"
GATES_NAME = "model.gates.onnx"  # edgetrain.precision.dfq.export.gates_path(EXPORT_NAME)
RUN_FILES = (CONFIG_JSON, LOG_NAME, EXPORT_NAME, GATES_NAME, LOCK_NAME)  # besides the checkpoints


class RunFolderBusy(EdgetrainError):
    """Another process holds the run folder's lock."""


def is_run_file(path: str | os.PathLike) -> bool:
    """Whether path names a file a run writes in its folder (by name: config, log, checkpoint, lock)."""
    name = os.path.basename(os.fspath(path))
    return name in (CONFIG_JSON, LOG_NAME, LOCK_NAME) or CKPT_NAME.match(name) is not None


def run_outputs(run_dir: str | os.PathLike) -> list[Path]:
    """Every path a run in run_dir writes or may rewrite: its fixed files and the checkpoints there now."""
    run_dir = Path(run_dir)
    out = [run_dir / name for name in RUN_FILES]
    if run_dir.is_dir():
        out += [p for _, p in list_checkpoints(run_dir)]
    return out


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name one file (through symlinks and hard links); False when either is missing."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def data_input(spec: str | None) -> str | None:
    """The file or folder a --data SPEC reads ('npz:FILE' -> FILE), None for the shipped digits."""
    if not spec:
        return None
    _, sep, rest = spec.strip().partition(":")
    return os.path.expanduser(rest) if sep and rest else None


def run_inputs(config: Any, extra: Iterable[str | None] = ()) -> list[str]:
    """The files a run reads, which none it writes may be: model, data, cost table, and extra (a config file)."""
    return [os.fspath(p) for p in (config.model, data_input(config.data), config.dfq_cost_table, *extra) if p]


def check_inputs(outputs: Iterable[str | os.PathLike], inputs: Iterable[str | os.PathLike | None],
                 where: str = "--out") -> None:
    """Refuse when an output path is one of the inputs: writing it would destroy what the run reads."""
    existing = [os.fspath(i) for i in inputs if i and os.path.isfile(i)]
    for out in outputs:
        for source in existing:
            if same_file(out, source):
                raise EdgetrainError(f"{source}: a file this job reads; writing {os.fspath(out)} would overwrite "
                                     f"it; choose another {where}")


def check_export_targets(targets: Iterable[str], run_dir: str | os.PathLike, inputs: Iterable[str | None],
                         force: bool = False) -> None:
    """Refuse export paths that would overwrite a run's files or inputs (always), or any existing file
    (unless force): an export adds a file, it never replaces one by surprise."""
    protected = [p for p in run_outputs(run_dir) if p.exists()]
    for target in targets:
        check_file_target(target)
        if is_run_file(target) or any(same_file(target, p) for p in protected):
            raise EdgetrainError(f"{target}: a file of the run in {run_dir}; export writes a file of its own: "
                                 "choose another --out")
    check_inputs(targets, inputs)
    for target in targets:
        if os.path.exists(target) and not force:
            raise EdgetrainError(f"{target}: exists; give --force to replace it, or choose another --out")


def _check_left_by_a_run(path: Path) -> None:
    """Refuse a folder whose config.json or log.jsonl an edgetrain run did not write: starting afresh replaces them."""
    # A run writes its log before its config.json (trainer), so a stopped one may have either or both.
    config, log = path / CONFIG_JSON, path / LOG_NAME
    for target, read in ((config, lambda: read_config_json(path)), (log, lambda: parse_log(log))):
        if not target.exists():
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a half-written last line is what a killed run leaves: ours
                read()
        except EdgetrainError as exc:
            reason = str(exc).removeprefix(f"{target}: ")
            raise EdgetrainError(f"{target}: not a file of an edgetrain run ({reason}); a new run would replace "
                                 "it: move it, or choose another --out") from None


def check_run_dir(run_dir: str | os.PathLike, resume: bool) -> str | None:
    """Refuse to start a new run over an old one; returns a notice when an unfinished one is started afresh."""
    path = Path(run_dir)
    if not os.fspath(run_dir):
        raise EdgetrainError("--out '': give the run folder a name")
    if path.exists() and not path.is_dir():
        raise EdgetrainError(f"{path}: exists and is not a folder")
    if resume or not path.is_dir():
        return None
    if list_checkpoints(path):
        raise EdgetrainError(f"{path}: already holds a run; continue it with --resume, or choose another --out")
    for name in (EXPORT_NAME, GATES_NAME):
        if (path / name).exists():  # a run ends by writing its model here: never over a file that is not ours
            raise EdgetrainError(f"{path / name}: a run would overwrite this file with its trained model; "
                                 "move it, or choose another --out")
    if (path / LOG_NAME).exists() or (path / CONFIG_JSON).exists():
        _check_left_by_a_run(path)
        return f"{path}: an earlier run stopped before its first checkpoint; starting afresh"
    return None


def _holder(lock_path: Path) -> str:
    with contextlib.suppress(OSError, ValueError):
        pid = int(lock_path.read_text().strip())
        return f"pid {pid}"
    return "another process"


class RunFolder:
    """A run folder held for one run: created, then locked until release() (or the process's end)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.lock_path = self.path / LOCK_NAME
        self._fd: int | None = None

    @staticmethod
    def check_free(path: str | os.PathLike) -> None:
        """Fail at once if a run holds path's lock (creates nothing: for checks before the data loads)."""
        lock_path = Path(path) / LOCK_NAME
        if fcntl is None or not lock_path.is_file():
            return
        try:
            fd = os.open(lock_path, os.O_RDONLY)
        except OSError:
            return  # unreadable: acquire() will say why
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunFolderBusy(f"{path}: in use by another run ({_holder(lock_path)}); wait for it to finish, "
                                "or choose another --out") from None
        except OSError:
            pass
        finally:
            os.close(fd)

    def acquire(self) -> RunFolder:
        """Create the folder and take its lock, or fail at once naming who holds it."""
        make_folder(self.path)
        try:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise write_error(self.lock_path, exc) from None
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise RunFolderBusy(f"{self.path}: in use by another run ({_holder(self.lock_path)}); wait for "
                                    "it to finish, or choose another --out") from None
            except OSError:
                pass  # a file system without locks (some network mounts): the folder checks still apply
        with contextlib.suppress(OSError):  # who holds it, for the message a second run prints
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Drop the lock (the file stays: removing it would let two runs lock different files)."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None

    def __enter__(self) -> RunFolder:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
