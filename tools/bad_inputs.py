"""Bad inputs tried against an edgetrain source tree: does each end cleanly (issue 17's "Done when" table)?

    python -m tools.bad_inputs --checkout PATH --json OUT.json [--markdown OUT.md] [--only ID,...] [--workers 2]
    python -m tools.bad_inputs --compare BEFORE.json AFTER.json      # the before/after Markdown table

Each case prepares files in a fresh temporary folder (a copy of the shipped LeNet-5, corrupt models, lying
archives, bad TOML, a run folder, ...), runs one command of the tree under test (`python -m edgetrain.cli ARGS`
or a Python API snippet, with PYTHONPATH=PATH and the temporary folder as the working directory), and judges
the outcome against the project's standard for bad input:

- the exit code is one the case allows (2 for bad input; 0 where the input is merely odd and is handled);
- no "Traceback" anywhere in stdout or stderr;
- stderr is exactly one line for a failure (zero for a success), starting with "edgetrain: " (CLI) or naming a
  typed error (API), once two kinds of line are set aside: tqdm progress bars (they redraw with carriage
  returns and are not messages) and the project's own one-line "edgetrain: warning:" lines. A Python warning
  (numpy's RuntimeWarning and its source line) is noise and makes a case not clean;
- the error line contains the case's needles (the offending file, node, member, field or flag);
- every file present before the command is unchanged after it (hashed), except where the case says it may
  change (a resumed run's own log); nothing new appears where the case says nothing may (a refused run leaves
  no folder), and no temporary or partial file (*.tmp*, *.part*, *~) is left anywhere;
- it ends within the timeout (60 s by default); a killed case is not clean.

A case that uses a flag or module the older tree did not have is "n/a" for that tree, not a failure: argparse's
"unrecognized arguments" naming one of the case's `new_flags`, or a missing `requires` file in the checkout.

Safety: every bomb is a small file that *claims* a huge size (nothing large is written), and every command runs
under RLIMIT_AS (8 GiB) so a tree without a memory budget fails with MemoryError instead of driving a shared
machine into swap or the OOM killer. The processes run as the current user; as root, permission bits do not stop
writes, so "unwritable" is a path under /proc, where nothing can be created.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import pickle
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tools.hostile_files import bomb_model, fold_bomb, forged_npz, huge_input_model, idx

REPO = Path(__file__).resolve().parents[1]
LENET = REPO / "edgetrain" / "assets" / "lenet5_digits.onnx"  # the shipped LeNet-5 (same file in both trees)
DATA_LOSS, CRASH, UNCLEAR, API = "data loss", "traceback or crash", "unclear or silent", "API"
CATEGORIES = (DATA_LOSS, CRASH, UNCLEAR, API)
TIMEOUT = 60.0
ADDRESS_SPACE = 8 << 30  # RLIMIT_AS of each command: a tree with no budget gets MemoryError, not the OOM killer
TEMP_NAMES = re.compile(r"\.tmp|\.part|~$")  # what an interrupted atomic write would leave behind
UNWRITABLE = "/proc/edgetrain-bad-inputs"  # mkdir there fails even for root


# ------------------------------------------------------------------------------------------- files


def _save(d: Path, name: str, model: onnx.ModelProto) -> None:
    (d / name).write_bytes(model.SerializeToString())


def _lenet_proto() -> onnx.ModelProto:
    return onnx.load(str(LENET))


def lenet(name: str = "L.onnx") -> Callable[[Path], None]:
    """Setup: a copy of the shipped LeNet-5 as `name`."""
    return lambda d: shutil.copyfile(LENET, d / name)


def model_file(name: str, make: Callable[[], onnx.ModelProto]) -> Callable[[Path], None]:
    """Setup: the model `make()` builds, written as `name`."""
    return lambda d: _save(d, name, make())


def raw_file(name: str, content: bytes | Callable[[], bytes]) -> Callable[[Path], None]:
    """Setup: a file of these bytes (or of what the callable returns)."""
    return lambda d: (d / name).write_bytes(content() if callable(content) else content)


def text_file(name: str, text: str) -> Callable[[Path], None]:
    """Setup: a text file (TOML configs, logs)."""
    def make(d: Path) -> None:
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).write_text(text)
    return make


def folder(name: str) -> Callable[[Path], None]:
    """Setup: an empty folder."""
    return lambda d: (d / name).mkdir(parents=True, exist_ok=True)


def nan_model() -> onnx.ModelProto:
    """LeNet-5 with one NaN in conv1.weight (issue items 9 and 13)."""
    model = _lenet_proto()
    for init in model.graph.initializer:
        if init.name == "conv1.weight":
            w = numpy_helper.to_array(init).copy()
            w.flat[3] = np.nan
            init.CopyFrom(numpy_helper.from_array(w, init.name))
    return model


def no_output_model() -> onnx.ModelProto:
    model = _lenet_proto()
    del model.graph.output[:]
    return model


def opset_model(version: int) -> Callable[[], onnx.ModelProto]:
    def make() -> onnx.ModelProto:
        model = _lenet_proto()
        model.opset_import[0].version = version
        return model
    return make


def unknown_op_model() -> onnx.ModelProto:
    model = _lenet_proto()
    model.graph.node[0].op_type = "FrobnicateXYZ"
    return model


def lying_initializer_model() -> onnx.ModelProto:
    """conv1.weight claims 6x1x5x5 floats and carries 10 bytes."""
    model = _lenet_proto()
    for init in model.graph.initializer:
        if init.name == "conv1.weight":
            init.ClearField("float_data")
            init.raw_data = b"\0" * 10
    return model


def huge_initializer_model() -> onnx.ModelProto:
    """An initializer whose dims claim 2^40 floats (4 TiB) with 16 bytes of data."""
    model = _lenet_proto()
    big = TensorProto(name="huge", data_type=TensorProto.FLOAT, dims=[1 << 20, 1 << 20], raw_data=b"\0" * 16)
    model.graph.initializer.append(big)
    return model


def expand_bomb() -> onnx.ModelProto:
    """A bomb whose shape is itself folded (Concat), then Expand: only a check on folds can see it."""
    n, one = np.array([1 << 20], np.int64), np.ones((1, 1), np.float32)
    return bomb_model([helper.make_node("Concat", ["n", "n"], ["s"], name="shape", axis=0),
                        helper.make_node("Expand", ["one", "s"], ["c"], name="bomb")], {"n": n, "one": one})


def random_bytes(n: int, seed: int = 17) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


class _Payload:
    """A hostile pickle: unpickling it creates the file PWNED (the case checks it never appears)."""

    def __reduce__(self):
        return (open, ("PWNED", "w"))


def pickle_npz() -> bytes:
    """An npz whose members are raw pickles, not .npy; one would create PWNED if unpickled."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("x.npy", pickle.dumps(_Payload()))
        zf.writestr("y.npy", pickle.dumps([1, 2, 3]))
    return buffer.getvalue()


def npz(**arrays: np.ndarray) -> Callable[[], bytes]:
    def make() -> bytes:
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        return buffer.getvalue()
    return make


def mnist_folder(images_gz: bytes | Callable[[], bytes], name: str = "mnist") -> Callable[[Path], None]:
    """Setup: an MNIST folder whose training images are `images_gz`; the other three files are tiny and honest."""
    def make(d: Path) -> None:
        f = d / name
        f.mkdir()
        (f / "train-images-idx3-ubyte.gz").write_bytes(images_gz() if callable(images_gz) else images_gz)
        (f / "train-labels-idx1-ubyte").write_bytes(idx((4,), bytes(4)))
        (f / "t10k-images-idx3-ubyte").write_bytes(idx((4, 28, 28), bytes(4 * 784)))
        (f / "t10k-labels-idx1-ubyte").write_bytes(idx((4,), bytes(4)))
    return make


def log_lines(steps: int) -> list[str]:
    """Lines of a plausible log.jsonl (the fields plot and resume read)."""
    return [json.dumps({"type": "step", "step": i, "loss": 2.0 / i, "lr": 0.01, "precision": "fp32 x1",
                        "bitops": 1e6, "percent_of_fp32": 100.0, "time": 0.1 * i}) + "\n" for i in range(1, steps + 1)]


# ------------------------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    """One bad input: how to prepare it, what to run, and what a clean outcome is."""

    id: str
    category: str
    argv: tuple[str, ...] = ()  # arguments of `edgetrain` (empty for an API case)
    setup: tuple[Callable[[Path], None], ...] = ()
    api: str | None = None  # a Python snippet run after `import edgetrain, numpy as np`
    exit_codes: tuple[int, ...] = (2,)
    needles: tuple[str, ...] = ()  # each must be in the error line ("a|b": either)
    forbidden: tuple[str, ...] = ()  # none may appear anywhere in the output
    may_change: tuple[str, ...] = ()  # path prefixes (relative) that may be written or replaced
    nothing_new: bool = True  # on failure, no new file or folder may appear (a refused run leaves nothing)
    absent: tuple[str, ...] = ()  # must not exist afterwards, whatever the exit code
    present: tuple[str, ...] = ()  # glob patterns that must match afterwards (a checkpoint after SIGTERM)
    new_flags: tuple[str, ...] = ()  # flags the older tree may not have: "n/a" there
    requires: str | None = None  # a file of the checkout the case needs, else "n/a" (e.g. edgetrain/limits.py)
    env: tuple[tuple[str, str], ...] = ()
    run_template: bool | str = False  # train run/ from L.onnx in the folder first (a str: then damage it so)
    signal_after: tuple[str, int] | None = None  # (path to wait for, signal): stop the command once it exists
    copies: int = 1  # run the command this many times at once (races on one run folder)
    item: int | None = None  # the reproducer number
    timeout: float = TIMEOUT
    note: str = ""


def cli(id: str, category: str, *argv: str, **kw) -> Case:
    """A command-line case (`edgetrain ARGV`); setup may be one callable or a tuple."""
    setup = kw.pop("setup", ())
    return Case(id, category, tuple(argv), setup=setup if isinstance(setup, tuple) else (setup,), **kw)


def api(id: str, snippet: str, *needles: str, setup=(), **kw) -> Case:
    """An API case: the snippet must raise one of edgetrain's typed errors (the runner then exits 2)."""
    return Case(id, API, setup=setup if isinstance(setup, tuple) else (setup,), api=snippet, needles=needles, **kw)


TRAIN = ("train", "L.onnx", "--data", "digits", "--batch-size", "8", "--out", "run")
L = lenet()
BAD_TOML = {
    "toml_syntax": ("steps = = 3\n", "bad.toml"),
    "toml_unknown_key": ("stepz = 3\n", "stepz"),
    "toml_steps_text": ('steps = "abc"\n', "steps"),
    "toml_lr_nan": ("lr = nan\n", "lr"),
    "toml_schedule_bogus": ('schedule = "bogus"\n', "schedule"),
    "toml_batch_zero": ("batch_size = 0\n", "batch_size"),
    "toml_label_smoothing": ("label_smoothing = 1.5\n", "label_smoothing"),
    "toml_val_fraction_nan": ("val_fraction = nan\n", "val_fraction"),
    "toml_pfq_eps_inf": ("schedule = 'pfq'\npfq_eps = inf\n", "pfq_eps"),
}
# (flag, bad value): every numeric and list flag of train, each refused before the run starts
TRAIN_FLAG_VALUES = [
    ("--steps", "0"), ("--steps", "-1"), ("--steps", "1.5"), ("--epochs", "0"), ("--batch-size", "0"),
    ("--batch-size", ""), ("--seed", "-1"), ("--warmup-steps", "-1"), ("--eval-every", "0"),
    ("--checkpoint-every", "0"), ("--keep", "0"), ("--train-last", "0"), ("--num-classes", "1"),
    ("--lr", "nan"), ("--lr", "inf"), ("--lr", "-1"), ("--momentum", "nan"), ("--momentum", "-0.5"),
    ("--weight-decay", "inf"), ("--pfq-period", "0"), ("--pfq-eps", "nan"), ("--pfq-eps", "-1"),
    ("--pfq-alpha", "nan"), ("--pfq-window", "0"), ("--pfq-normaliser-periods", "0"),
    ("--pfq-alpha-switches", "-1"), ("--dfq-target", "nan"), ("--dfq-target", "-1"), ("--dfq-beta", "inf"),
    ("--dfq-weight-bits", "0"), ("--lr-milestones", ""), ("--lr-milestones", "10,x"),
    ("--pfq-switch-steps", ","), ("--pfq-stages", ""), ("--dfq-candidates", "8/8,,4/8"),
    ("--fractrain-targets", "nan"), ("--fractrain-targets", ","), ("--schedule", "bogus"),
    ("--optimizer", "sgdd"),
]
_NO_STEPS = ("train", "L.onnx", "--data", "digits", "--batch-size", "8", "--out", "run")
API_PRELUDE = """
import sys, numpy as np, edgetrain
from edgetrain.export import export_onnx
from edgetrain.precision.dfq import DFQConfig
"""


def _cases() -> list[Case]:
    c: list[Case] = []
    # -- the reproducers, as a user would type them --------------------------------------------------
    c += [
        cli("i01_out_is_model_folder", DATA_LOSS, "train", "model.onnx", "--data", "digits", "--steps", "5",
            "--out", ".", setup=lenet("model.onnx"), item=1, nothing_new=False,
            note="mkdir w; cp L w/model.onnx; cd w; edgetrain train model.onnx --data digits --steps 5 --out ."),
        cli("i02_export_over_source_model", DATA_LOSS, "export", "run", "--out", "L.onnx", run_template=True, item=2),
        cli("i02_export_over_checkpoint", DATA_LOSS, "export", "run", "--out", "run/ckpt-000002.npz",
            run_template=True, item=2),
        cli("i02_export_over_log", DATA_LOSS, "export", "run", "--out", "run/log.jsonl", run_template=True, item=2),
        cli("i02_export_force_over_log", DATA_LOSS, "export", "run", "--out", "run/log.jsonl", "--force",
            run_template=True, item=2, new_flags=("--force",)),
        cli("i02_export_force_over_source", DATA_LOSS, "export", "run", "--out", "L.onnx", "--force",
            run_template=True, item=2, new_flags=("--force",)),
        cli("i03_sigterm_saves", DATA_LOSS, "train", "L.onnx", "--data", "digits", "--steps", "100000",
            "--batch-size", "8", "--out", "run", setup=L, exit_codes=(130,), signal_after=("run/log.jsonl", 15),
            present=("run/ckpt-*.npz",), nothing_new=False, item=3),
        cli("i03_sighup_saves", DATA_LOSS, "train", "L.onnx", "--data", "digits", "--steps", "100000",
            "--batch-size", "8", "--out", "run", setup=L, exit_codes=(130,), signal_after=("run/log.jsonl", 1),
            present=("run/ckpt-*.npz",), nothing_new=False, item=3),
        cli("i03_sigint_saves_control", DATA_LOSS, "train", "L.onnx", "--data", "digits", "--steps", "100000",
            "--batch-size", "8", "--out", "run", setup=L, exit_codes=(130,), signal_after=("run/log.jsonl", 2),
            present=("run/ckpt-*.npz",), nothing_new=False, item=3, note="SIGINT: the issue says it was handled"),
        cli("i04_resume_before_first_checkpoint", DATA_LOSS, *TRAIN, "--steps", "2", "--resume",
            run_template="no-checkpoint", exit_codes=(0,), may_change=("run",), item=4),
        cli("i05_pfq_eps_inf", DATA_LOSS, *TRAIN, "--steps", "1", "--schedule", "pfq", "--pfq-eps", "inf",
            setup=L, needles=("--pfq-eps",), item=5),
        cli("i06_two_runs_one_out", DATA_LOSS, *TRAIN, "--steps", "15", setup=L, exit_codes=(0, 2), copies=2,
            nothing_new=False, item=6, note="exactly one of the two may exit 0"),
        cli("i06_two_resumes", DATA_LOSS, *TRAIN, "--steps", "12", "--resume", run_template=True,
            exit_codes=(0, 2), copies=2, may_change=("run",), item=6,
            note="exactly one may exit 0; every log line stays whole JSON"),
        cli("i07_diverges_on_last_step", DATA_LOSS, *TRAIN, "--steps", "1", "--lr", "1e37", setup=L,
            needles=("diverged",), absent=("run/model.onnx",), nothing_new=False, item=7),
        cli("i08_out_unwritable", CRASH, *TRAIN[:-1], UNWRITABLE + "/run", "--steps", "1", setup=L,
            needles=(UNWRITABLE,), item=8),
        cli("i08_export_out_is_folder", CRASH, "export", "run", "--out", "sub", run_template=True,
            setup=folder("sub"), needles=("sub",), item=8),
        cli("i08_export_out_unwritable", CRASH, "export", "run", "--out", UNWRITABLE + "/m.onnx", run_template=True,
            needles=(UNWRITABLE,), item=8),
        cli("i09_nan_weights_eval_8_8", CRASH, "eval", "nan.onnx", "--data", "digits", "--bits", "8/8",
            setup=model_file("nan.onnx", nan_model), needles=("conv1.weight",), item=9),
        cli("i09_nan_weights_midrun_eval", CRASH, "train", "nan.onnx", "--data", "digits", "--batch-size", "8",
            "--steps", "2", "--eval-every", "1", "--schedule", "static", "--bits", "8/8", "--out", "run",
            setup=model_file("nan.onnx", nan_model), needles=("conv1.weight",), nothing_new=False, item=9),
        cli("i10_fold_bomb_info", CRASH, "info", "bomb.onnx", setup=model_file("bomb.onnx", fold_bomb),
            needles=("bomb.onnx", "bomb"), item=10),
        cli("i10_fold_bomb_train", CRASH, "train", "bomb.onnx", "--data", "digits", "--steps", "1", "--out", "run",
            setup=model_file("bomb.onnx", fold_bomb), needles=("bomb.onnx",), item=10),
        cli("i10_huge_input_info", CRASH, "info", "huge.onnx", setup=model_file("huge.onnx", huge_input_model),
            needles=("huge.onnx",), item=10),
        cli("i10_npz_header_1e12", CRASH, "train", "L.onnx", "--data", "npz:f.npz", "--steps", "1", "--out", "run",
            setup=(L, raw_file("f.npz", forged_npz)), needles=("f.npz",), item=10),
        cli("i10_mnist_gzip_claims_3M_images", CRASH, "train", "L.onnx", "--data", "mnist:mnist", "--steps", "1",
            "--out", "run", setup=(L, mnist_folder(lambda: gzip.compress(idx((3_000_000, 28, 28), bytes(4096))))),
            needles=("train-images-idx3-ubyte.gz",), item=10),
        cli("i11_no_outputs_info", CRASH, "info", "noout.onnx", setup=model_file("noout.onnx", no_output_model),
            needles=("noout.onnx",), item=11),
        cli("i11_npz_pickle_member", CRASH, "train", "L.onnx", "--data", "npz:p.npz", "--steps", "1", "--out", "run",
            setup=(L, raw_file("p.npz", pickle_npz)), needles=("p.npz",), absent=("PWNED",), item=11),
        cli("i11_toml_normaliser_periods_0", CRASH, *TRAIN, "--steps", "1", "--config", "bad.toml",
            setup=(L, text_file("bad.toml", "schedule = 'pfq'\npfq_normaliser_periods = 0\n")),
            needles=("pfq_normaliser_periods",), item=11),
        cli("i11_plot_half_written_last_line", CRASH, "plot", "run", "--out", "figs",
            setup=text_file("run/log.jsonl", "".join(log_lines(5)) + log_lines(6)[-1][:25]), exit_codes=(0,),
            item=11, note="a run stopped mid-write: plot skips the half line (one warning) and draws the rest"),
        cli("i11_resume_log_step_abc", CRASH, *TRAIN, "--steps", "4", "--resume", run_template="step-abc",
            needles=("log.jsonl",), item=11),
        cli("i12_profile_fold_bomb", CRASH, "profile", "bomb.onnx", "--simulate", "--steps", "1", "--warmup", "0",
            setup=model_file("bomb.onnx", fold_bomb), needles=("bomb.onnx",), item=12),
        cli("i12_info_garbage", CRASH, "info", "g.onnx", setup=raw_file("g.onnx", random_bytes(4096)),
            needles=("g.onnx",), item=12),
        cli("i13_nan_weights_train", UNCLEAR, "train", "nan.onnx", "--data", "digits", "--batch-size", "8",
            "--steps", "2", "--out", "run", setup=model_file("nan.onnx", nan_model), needles=("conv1.weight",),
            forbidden=("diverged", "RuntimeWarning"), nothing_new=False, item=13),
        cli("i13_garbage_npz", UNCLEAR, "train", "L.onnx", "--data", "npz:g.npz", "--steps", "1", "--out", "run",
            setup=(L, raw_file("g.npz", random_bytes(2048))), needles=("g.npz",), forbidden=("allow_pickle",),
            item=13),
        cli("i13_pfq_stages_comma", UNCLEAR, *TRAIN, "--steps", "1", "--schedule", "pfq", "--pfq-stages", ",",
            setup=L, needles=("--pfq-stages",), item=13),
        cli("i13_dfq_candidates_comma", UNCLEAR, *TRAIN, "--steps", "1", "--schedule", "dfq", "--dfq-candidates",
            ",", setup=L, needles=("--dfq-candidates",), item=13),
        cli("i13_demo_steps_0", UNCLEAR, "demo", "--steps", "0", needles=("--steps",), item=13),
        cli("i13_out_empty", UNCLEAR, *TRAIN[:-1], "", "--steps", "1", setup=L, needles=("--out|'out'",),
            item=13),
    ]
    c += [
        api("i14_load_int32", "edgetrain.load('L.onnx', dtype=np.int32)", "float32", setup=L, item=14),
        api("i14_dfq_target_negative", "DFQConfig(target=-1)", "target", item=14),
        api("i14_load_none", "edgetrain.load(None)", item=14),
        api("i14_nan_input_8_8", "m = edgetrain.load('L.onnx'); m.set_precision('8/8')\n"
            "x = np.zeros((2, 1, 28, 28), np.float32); x[1, 0, 3, 3] = np.nan; m(x)", "NaN", setup=L, item=14),
        api("i14_export_bad_path", "m = edgetrain.load('L.onnx'); export_onnx(m, 'no/such/dir/m.onnx')", "no/such",
            setup=L, item=14),
        api("i14_load_fold_bomb", "edgetrain.load('bomb.onnx')", "bomb", setup=model_file("bomb.onnx", fold_bomb),
            item=14),
    ]
    # -- the same families, wider --------------------------------------------------------------------------
    for flag, value in TRAIN_FLAG_VALUES:
        base = _NO_STEPS if flag in ("--steps", "--epochs") else (*TRAIN, "--steps", "1")
        name = "flag_train" + flag.replace("-", "_")[1:] + "_" + (re.sub(r"\W", "_", value) or "empty")
        # the flag, or the setting it sets (errors found after parsing name the field: "option 'out' ...")
        c.append(cli(name, UNCLEAR, *base, flag, value, setup=L, needles=(f"{flag}|{flag[2:].replace('-', '_')}",)))
    c += [
        cli("flag_eval_batch_0", UNCLEAR, "eval", "L.onnx", "--data", "digits", "--batch-size", "0", setup=L,
            needles=("--batch-size",)),
        cli("flag_eval_bits_garbage", UNCLEAR, "eval", "L.onnx", "--data", "digits", "--bits", "9x/y", setup=L,
            needles=("9x/y",)),
        cli("flag_train_bits_garbage", UNCLEAR, *TRAIN, "--steps", "1", "--schedule", "static", "--bits", "99/99",
            setup=L, needles=("99/99",)),
        cli("flag_export_gated_bits", UNCLEAR, "export", "run", "--out", "x.onnx", "--gated-bits", "abc",
            run_template=True, needles=("--gated-bits",), note="a fp32 run: the flag does not apply"),
        cli("flag_export_format_bogus", UNCLEAR, "export", "run", "--out", "x.onnx", "--format", "png",
            run_template=True, needles=("--format",)),
        cli("flag_export_out_empty", UNCLEAR, "export", "run", "--out", "", run_template=True, needles=("--out",)),
        cli("flag_demo_seed_negative", UNCLEAR, "demo", "--steps", "1", "--seed", "-1", needles=("--seed",)),
        cli("flag_demo_out_empty", UNCLEAR, "demo", "--steps", "1", "--out", "", needles=("--out",)),
        cli("flag_plot_out_empty", UNCLEAR, "plot", "run", "--out", "", setup=text_file("run/log.jsonl",
            "".join(log_lines(3))), needles=("--out",)),
        cli("flag_profile_steps_0", UNCLEAR, "profile", "L.onnx", "--simulate", "--steps", "0", setup=L,
            needles=("--steps",)),
        cli("flag_profile_sim_drop_1_5", UNCLEAR, "profile", "L.onnx", "--simulate", "--sim-drop", "1.5", setup=L,
            needles=("--sim-drop",)),
        cli("flag_max_memory_garbage", UNCLEAR, "info", "L.onnx", "--max-memory", "lots", setup=L,
            needles=("--max-memory",), new_flags=("--max-memory",)),
        cli("flag_max_memory_tiny_train", CRASH, *TRAIN, "--steps", "1", "--max-memory", "1K", setup=L,
            needles=("memory budget",), new_flags=("--max-memory",)),
        cli("env_max_memory_garbage", UNCLEAR, "info", "L.onnx", setup=L, env=(("EDGETRAIN_MAX_MEMORY", "lots"),),
            needles=("EDGETRAIN_MAX_MEMORY",), requires="edgetrain/limits.py"),
    ]
    # missing files and folders where files are expected, for each file argument
    for cmd, extra in (("info", ()), ("eval", ("--data", "digits")), ("export", ("--out", "x.onnx")),
                       ("train", ("--data", "digits", "--steps", "1", "--out", "run")),
                       ("profile", ("--simulate",)), ("plot", ())):
        c.append(cli(f"file_{cmd}_missing", CRASH, cmd, "nope.onnx", *extra, needles=("nope.onnx",)))
    for cmd, extra in (("info", ()), ("eval", ("--data", "digits")), ("export", ("--out", "x.onnx")),
                       ("train", ("--data", "digits", "--steps", "1", "--out", "run"))):
        c.append(cli(f"file_{cmd}_empty_folder", CRASH, cmd, "d", *extra, setup=folder("d"), needles=("d",)))
    c += [
        cli("file_config_missing", CRASH, *TRAIN, "--steps", "1", "--config", "nope.toml", setup=L,
            needles=("nope.toml",)),
        cli("file_config_is_folder", CRASH, *TRAIN, "--steps", "1", "--config", "cfg", setup=(L, folder("cfg")),
            needles=("cfg",)),
        cli("file_dfq_cost_table_missing", CRASH, *TRAIN, "--steps", "1", "--schedule", "dfq", "--dfq-cost-table",
            "nope.json", setup=L, needles=("nope.json",)),
        cli("file_dfq_cost_table_garbage", CRASH, *TRAIN, "--steps", "1", "--schedule", "dfq", "--dfq-cost-table",
            "t.json", setup=(L, text_file("t.json", "{not json")), needles=("t.json",)),
        cli("file_plot_no_log", CRASH, "plot", "d", setup=folder("d"), needles=("d",)),
        cli("file_plot_out_is_file", CRASH, "plot", "run", "--out", "f.txt",
            setup=(text_file("run/log.jsonl", "".join(log_lines(3))), text_file("f.txt", "x")), needles=("f.txt",)),
    ]
    # malformed model files
    for name, setup, needle in (
            ("empty", raw_file("m.onnx", b""), "m.onnx"),
            ("truncated", raw_file("m.onnx", lambda: LENET.read_bytes()[:1000]), "m.onnx"),
            ("text", raw_file("m.onnx", b"hello, I am not a model\n"), "m.onnx"),
            ("opset_999", model_file("m.onnx", opset_model(999)), "m.onnx"),
            ("opset_1", model_file("m.onnx", opset_model(1)), "m.onnx"),
            ("unknown_op", model_file("m.onnx", unknown_op_model), "FrobnicateXYZ"),
            ("lying_initializer", model_file("m.onnx", lying_initializer_model), "conv1.weight"),
            ("huge_initializer", model_file("m.onnx", huge_initializer_model), "huge"),
            ("expand_bomb", model_file("m.onnx", expand_bomb), "bomb")):
        c.append(cli(f"model_{name}_info", CRASH, "info", "m.onnx", setup=setup, needles=(needle,)))
    c += [
        cli("model_no_outputs_train", CRASH, "train", "m.onnx", "--data", "digits", "--steps", "1", "--out", "run",
            setup=model_file("m.onnx", no_output_model), needles=("m.onnx",)),
        cli("model_truncated_eval", CRASH, "eval", "m.onnx", "--data", "digits",
            setup=raw_file("m.onnx", lambda: LENET.read_bytes()[:5000]), needles=("m.onnx",)),
        cli("model_expand_bomb_train", CRASH, "train", "m.onnx", "--data", "digits", "--steps", "1", "--out", "run",
            setup=model_file("m.onnx", expand_bomb), needles=("bomb",)),
    ]
    # malformed data specs and data files
    bad_npz = {
        "npz_missing_y": (npz(x=np.zeros((4, 1, 28, 28), np.float32)), "y"),
        "npz_length_mismatch": (npz(x=np.zeros((4, 1, 28, 28), np.float32), y=np.zeros(3, np.int64)), "d.npz"),
        "npz_wrong_image_shape": (npz(x=np.zeros((4, 3, 32, 32), np.float32), y=np.zeros(4, np.int64)), "d.npz"),
        "npz_label_out_of_range": (npz(x=np.zeros((4, 1, 28, 28), np.float32), y=np.full(4, 50, np.int64)),
                                   "d.npz"),
        "npz_nan_pixels": (npz(x=np.full((4, 1, 28, 28), np.nan, np.float32), y=np.zeros(4, np.int64)), "d.npz"),
        "npz_empty_archive": (npz(), "d.npz"),
    }
    for name, (make, needle) in bad_npz.items():
        c.append(cli(f"data_{name}", CRASH, "train", "L.onnx", "--data", "npz:d.npz", "--steps", "1",
                     "--batch-size", "2", "--out", "run", setup=(L, raw_file("d.npz", make)), needles=(needle,)))
    c += [
        cli("data_spec_unknown_kind", UNCLEAR, *TRAIN, "--steps", "1", "--data", "bogus:xyz", setup=L,
            needles=("bogus",)),
        cli("data_spec_npz_empty_path", UNCLEAR, *TRAIN, "--steps", "1", "--data", "npz:", setup=L,
            needles=("npz:",)),
        cli("data_mnist_missing_folder", CRASH, *TRAIN, "--steps", "1", "--data", "mnist:nope", setup=L,
            needles=("nope",)),
        cli("data_mnist_empty_folder", CRASH, *TRAIN, "--steps", "1", "--data", "mnist:mnist",
            setup=(L, folder("mnist")), needles=("mnist",)),
        cli("data_mnist_gzip_trailing", CRASH, *TRAIN, "--steps", "1", "--data", "mnist:mnist",
            setup=(L, mnist_folder(lambda: gzip.compress(idx((4, 28, 28), bytes(8 << 20)), compresslevel=9))),
            needles=("train-images-idx3-ubyte.gz",),
            note="header says 4 images, the ~8 KiB stream inflates to 8 MiB"),
        cli("data_mnist_gzip_garbage", CRASH, *TRAIN, "--steps", "1", "--data", "mnist:mnist",
            setup=(L, mnist_folder(random_bytes(1024))), needles=("train-images-idx3-ubyte.gz",)),
        cli("data_eval_npz_header_1e12", CRASH, "eval", "L.onnx", "--data", "npz:f.npz",
            setup=(L, raw_file("f.npz", forged_npz)), needles=("f.npz",)),
    ]
    for name, (text, needle) in BAD_TOML.items():
        c.append(cli(name, UNCLEAR, *_NO_STEPS[:4], "--out", "run", "--steps", "1", "--config", "bad.toml",
                     setup=(L, text_file("bad.toml", text)), needles=(needle,)))
    # run-folder misuse
    c += [
        cli("run_resume_empty_folder", DATA_LOSS, *TRAIN, "--steps", "2", "--resume", setup=(L, folder("run")),
            needles=("run",)),
        cli("run_resume_missing_folder", DATA_LOSS, *TRAIN, "--steps", "2", "--resume", setup=L, needles=("run",)),
        cli("run_fresh_over_existing_run", DATA_LOSS, *TRAIN, "--steps", "2", run_template=True, needles=("run",)),
        cli("run_out_is_a_file", DATA_LOSS, *TRAIN[:-1], "f.txt", "--steps", "1", setup=(L, text_file("f.txt", "x")),
            needles=("f.txt",)),
        cli("run_out_under_a_file", CRASH, *TRAIN[:-1], "f.txt/run", "--steps", "1",
            setup=(L, text_file("f.txt", "x")), needles=("f.txt",)),
        cli("run_out_foreign_folder", DATA_LOSS, *TRAIN[:-1], "mine", "--steps", "1",
            setup=(L, text_file("mine/notes.txt", "my notes\n"), text_file("mine/log.jsonl", "my own log\n")),
            exit_codes=(0, 2), may_change=("mine/config.json", "mine/ckpt", "mine/model.onnx", "mine/.edgetrain"),
            nothing_new=False, note="a folder with someone's log.jsonl: never overwritten"),
        cli("run_out_folder_with_notes", DATA_LOSS, *TRAIN[:-1], "mine", "--steps", "1",
            setup=(L, text_file("mine/notes.txt", "my notes\n")), exit_codes=(0, 2), nothing_new=False,
            note="a folder holding a user's file: the run may use it or refuse, never touch the file"),
        cli("run_export_over_config", DATA_LOSS, "export", "run", "--out", "run/config.json", run_template=True,
            needles=("config.json",)),
        cli("run_export_existing_file_no_force", DATA_LOSS, "export", "run", "--out", "mine.onnx",
            run_template=True, setup=text_file("mine.onnx", "precious\n"), needles=("mine.onnx",)),
        cli("run_export_empty_folder", CRASH, "export", "d", "--out", "x.onnx", setup=folder("d"), needles=("d",)),
        cli("run_export_corrupt_checkpoint", CRASH, "export", "run/ckpt-000002.npz", "--out", "x.onnx",
            run_template="corrupt-newest", needles=("ckpt-000002.npz",)),
        cli("run_eval_corrupt_checkpoint", CRASH, "eval", "run/ckpt-000002.npz", "--data", "digits",
            run_template="corrupt-newest", needles=("ckpt-000002.npz",)),
        cli("run_info_corrupt_checkpoint", CRASH, "info", "run/ckpt-000002.npz", run_template="corrupt-newest",
            needles=("ckpt-000002.npz",)),
        cli("run_demo_out_is_file", DATA_LOSS, "demo", "--steps", "1", "--out", "f.txt",
            setup=text_file("f.txt", "x"), needles=("f.txt",)),
    ]
    # plot on odd logs
    c += [
        cli("plot_corrupt_middle_line", CRASH, "plot", "run", "--out", "figs",
            setup=text_file("run/log.jsonl", "".join(log_lines(2)) + log_lines(3)[-1][:25] + "\n"
                            + "".join(log_lines(5)[3:])), needles=("log.jsonl", "line 3")),
        cli("plot_empty_log", UNCLEAR, "plot", "run", "--out", "figs", setup=text_file("run/log.jsonl", ""),
            needles=("log.jsonl",)),
        cli("plot_step_abc", CRASH, "plot", "run", "--out", "figs",
            setup=text_file("run/log.jsonl", "".join(log_lines(3)).replace('"step": 2', '"step": "abc"')),
            needles=("log.jsonl",)),
        cli("plot_binary_log", CRASH, "plot", "run", "--out", "figs",
            setup=text_file("run/log.jsonl", "\x00\x01garbage\n"),
            needles=("log.jsonl",)),
    ]
    # the Python API
    c += [
        api("api_load_int", "edgetrain.load(3)"),
        api("api_load_missing", "edgetrain.load('nope.onnx')", "nope.onnx"),
        api("api_load_folder", "edgetrain.load('.')"),
        api("api_load_garbage", "edgetrain.load('g.onnx')", "g.onnx", setup=raw_file("g.onnx", random_bytes(4096))),
        api("api_load_complex_dtype", "edgetrain.load('L.onnx', dtype=np.complex64)", setup=L),
        api("api_load_no_outputs", "edgetrain.load('m.onnx')", setup=model_file("m.onnx", no_output_model)),
        api("api_load_huge_input", "edgetrain.load('m.onnx')", setup=model_file("m.onnx", huge_input_model)),
        api("api_dfq_target_nan", "DFQConfig(target=float('nan'))", "target"),
        api("api_dfq_target_101", "DFQConfig(target=101)", "target"),
        api("api_dfq_beta_negative", "DFQConfig(beta=-1.0)", "beta"),
        api("api_dfq_candidates_str", "DFQConfig(candidates='8/8')", "candidates"),
        api("api_dfq_candidates_bad", "DFQConfig(candidates=('9x/99',))", "9x/99"),
        api("api_input_wrong_shape", "m = edgetrain.load('L.onnx'); m(np.zeros((2, 3, 32, 32), np.float32))",
            setup=L),
        api("api_set_precision_garbage", "m = edgetrain.load('L.onnx'); m.set_precision('abc')", "abc", setup=L),
        api("api_state_dict_wrong_shape",
            "m = edgetrain.load('L.onnx'); m.load_state_dict({'conv1.weight': np.zeros(3, np.float32)})",
            "conv1.weight", setup=L),
        api("api_export_to_folder", "m = edgetrain.load('L.onnx'); export_onnx(m, '.')", setup=L),
        api("api_labels_out_of_range", "m = edgetrain.load('L.onnx')\n"
            "m.loss_and_grad(np.zeros((2, 1, 28, 28), np.float32), np.array([3, 50]))", "50", setup=L),
        api("api_load_data_forged_npz", "from edgetrain.data import load_data; load_data('npz:f.npz')", "f.npz",
            setup=raw_file("f.npz", forged_npz)),
        api("api_load_data_unknown_spec", "from edgetrain.data import load_data; load_data('bogus:x')", "bogus"),
    ]
    return c


CASES: list[Case] = _cases()


# ------------------------------------------------------------------------------------------- running


@dataclass
class Proc:
    """What one process did."""

    returncode: int | None  # None: killed at the timeout
    stdout: str
    stderr: str


@dataclass
class Outcome:
    """One case's verdict, as the JSON records it."""

    id: str
    category: str
    item: int | None
    argv: list[str]
    exit_code: int | list[int] | None
    outcome: str  # "clean", "not clean" or "n/a"
    why: str
    seconds: float
    stderr: str = ""
    extra: dict = field(default_factory=dict)


class Runner:
    """Runs cases against one checkout, each in its own temporary folder."""

    def __init__(self, checkout: Path, timeout_scale: float = 1.0) -> None:
        self.checkout = checkout.resolve()
        self.timeout_scale = timeout_scale
        self._root = Path(tempfile.mkdtemp(prefix="edgetrain-bad-inputs-"))

    def close(self) -> None:
        """Remove every temporary folder."""
        shutil.rmtree(self._root, ignore_errors=True)

    def env(self, extra: Sequence[tuple[str, str]] = ()) -> dict[str, str]:
        """The environment of every command: this checkout first on the path, no inherited budget, one thread."""
        env = {k: v for k, v in os.environ.items() if k not in ("EDGETRAIN_MAX_MEMORY", "PYTHONWARNINGS")}
        env["PYTHONPATH"] = str(self.checkout)
        # one thread per command: two workers on a shared 2-core machine, not four spinning thread pools
        env.update(NUMBA_NUM_THREADS="1", OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
        env.update(dict(extra))
        return env

    def train_run(self, d: Path) -> None:
        """L.onnx and run/ in d, trained two steps from it by this checkout (a checkpoint per step).

        Trained in place rather than copied: a run records its model's absolute path, and a copy's run would
        point at another folder's L.onnx.
        """
        shutil.copyfile(LENET, d / "L.onnx")
        p = self._run([sys.executable, "-m", "edgetrain.cli", *TRAIN, "--steps", "2", "--checkpoint-every", "1"],
                      d, self.env(), 180)
        if p.returncode != 0:
            raise RuntimeError(f"could not train the run folder: {p.stderr.strip()[-300:]}")

    def _prepare(self, case: Case, d: Path) -> None:
        if case.run_template:
            self.train_run(d)
            run = d / "run"
            if case.run_template == "no-checkpoint":  # what a run stopped before its first checkpoint leaves
                for f in [*run.glob("ckpt-*"), run / "model.onnx"]:
                    f.unlink(missing_ok=True)
                (run / "log.jsonl").write_text("")
            elif case.run_template == "step-abc":
                log = run / "log.jsonl"
                log.write_text(re.sub(r'"step": 1\b', '"step": "abc"', log.read_text(), count=1))
            elif case.run_template == "corrupt-newest":
                (run / "ckpt-000002.npz").write_bytes(random_bytes(3000))
        for step in case.setup:
            step(d)

    @staticmethod
    def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float,
             signal_after: tuple[str, int] | None = None) -> Proc:
        def limit() -> None:
            resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))

        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                errors="replace", preexec_fn=limit, start_new_session=True)
        if signal_after:
            path, sig = signal_after
            deadline = time.monotonic() + timeout / 2
            while time.monotonic() < deadline and proc.poll() is None and not (cwd / path).exists():
                time.sleep(0.1)
            time.sleep(1.0)  # a step or two into the run, past the first log line
            if proc.poll() is None:
                proc.send_signal(sig)
        try:
            out, err = proc.communicate(timeout=timeout)
            return Proc(proc.returncode, out, err)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: the command and anything it started
            out, err = proc.communicate()
            return Proc(None, out, err)

    def command(self, case: Case) -> list[str]:
        """The command line of a case, as run."""
        if case.api is not None:
            return [sys.executable, "-c", _api_script(case.api)]
        return [sys.executable, "-m", "edgetrain.cli", *case.argv]

    def run(self, case: Case) -> Outcome:
        """Prepare, run and judge one case."""
        shown = ["edgetrain", *case.argv] if case.api is None else ["python", "-c", case.api]
        start = time.monotonic()

        def outcome(code, verdict: str, why: str, stderr: str = "", **extra) -> Outcome:
            return Outcome(case.id, case.category, case.item, shown, code, verdict, why,
                           round(time.monotonic() - start, 2), stderr[-600:], extra)

        if case.requires and not (self.checkout / case.requires).exists():
            return outcome(None, "n/a", f"this tree has no {case.requires}")
        d = self._root / case.id
        d.mkdir()
        try:
            self._prepare(case, d)
        except RuntimeError as exc:
            return outcome(None, "not clean", f"setup failed: {exc}")
        before = _snapshot(d)
        cmd, env, timeout = self.command(case), self.env(case.env), case.timeout * self.timeout_scale
        if case.copies == 1:
            procs = [self._run(cmd, d, env, timeout, case.signal_after)]
        else:
            with ThreadPoolExecutor(case.copies) as pool:
                procs = list(pool.map(lambda _: self._run(cmd, d, env, timeout), range(case.copies)))
        codes = [p.returncode for p in procs]
        stderr = "\n".join(p.stderr for p in procs)
        code = codes[0] if len(codes) == 1 else codes
        if case.new_flags and "unrecognized arguments" in stderr and any(f in stderr for f in case.new_flags):
            return outcome(code, "n/a", "this tree does not have " + ", ".join(case.new_flags), stderr)
        problems = [why for p in procs for why in _judge_process(case, p)]
        problems += _judge_files(case, d, before, codes)
        if case.copies > 1 and codes.count(0) != 1:
            problems.append(f"{codes.count(0)} of {case.copies} concurrent runs exited 0 (exactly one should)")
        shutil.rmtree(d, ignore_errors=True)
        return outcome(code, "not clean" if problems else "clean", "; ".join(dict.fromkeys(problems)), stderr)


def _api_script(snippet: str) -> str:
    """The API case's program: the snippet; a typed edgetrain error becomes one line and exit 2, as the CLI does."""
    return (API_PRELUDE + "try:\n" + "".join(f"    {line}\n" for line in snippet.splitlines())
            + "except BaseException as exc:\n"
            + "    typed = getattr(edgetrain, 'EdgetrainError', None)\n"
            + "    if typed is None or not isinstance(exc, typed):\n        raise\n"
            + "    print(f'{type(exc).__name__}: {exc}', file=sys.stderr)\n    sys.exit(2)\n")


def _snapshot(d: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file (folders as "dir")."""
    out = {}
    for p in sorted(d.rglob("*")):
        rel = p.relative_to(d).as_posix()
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def message_lines(stderr: str) -> list[str]:
    """The stderr lines that are messages: not tqdm progress bars, not the project's one-line warnings."""
    lines = []
    for line in stderr.splitlines():
        if "\r" in line or re.search(r"\d+%\|", line) or re.search(r"\|\s*\d+/\d+ \[", line):
            continue  # a progress bar redrawn in place
        if line.startswith("edgetrain: warning:") or not line.strip():
            continue
        lines.append(line)
    return lines


def _judge_process(case: Case, p: Proc) -> list[str]:
    if p.returncode is None:
        return [f"killed after the {case.timeout:g} s timeout"]
    problems = []
    if p.returncode not in case.exit_codes:
        problems.append(f"exit {p.returncode}, expected {'/'.join(map(str, case.exit_codes))}")
    if "Traceback" in p.stderr or "Traceback" in p.stdout:
        problems.append("traceback")
    lines = message_lines(p.stderr)
    if p.returncode == 0:
        if lines:
            problems.append(f"{len(lines)} stderr line(s) on success: {lines[0][:120]!r}")
    elif len(lines) != 1:
        problems.append(f"{len(lines)} stderr lines, not one")
    else:
        line = lines[0]
        if case.api is None and not line.startswith("edgetrain: "):
            problems.append(f"the line is not edgetrain's: {line[:120]!r}")
        missing = [n for n in case.needles if not any(alt in line for alt in n.split("|"))]
        if missing and p.returncode in case.exit_codes and p.returncode != 0:
            problems.append(f"the error line does not name {', '.join(map(repr, missing))}")
    for word in case.forbidden:
        if word in p.stderr or word in p.stdout:
            problems.append(f"output says {word!r}")
    return problems


def _judge_files(case: Case, d: Path, before: dict[str, str], codes: list[int | None]) -> list[str]:
    after = _snapshot(d) if d.exists() else {}
    problems = []

    def allowed(rel: str) -> bool:
        return any(rel == m or rel.startswith(m.rstrip("/") + "/") or rel.startswith(m) for m in case.may_change)

    changed = [r for r, h in before.items() if not allowed(r) and after.get(r) != h]
    if changed:
        problems.append("input changed or removed: " + ", ".join(changed[:4]))
    new = [r for r in after if r not in before]
    temp = [r for r in new if TEMP_NAMES.search(Path(r).name)]
    if temp:
        problems.append("temporary file left: " + ", ".join(temp[:3]))
    failed = all(c not in (0, None) for c in codes)
    if case.nothing_new and failed and [r for r in new if r not in temp]:
        problems.append("a refused command left new files: " + ", ".join([r for r in new if r not in temp][:3]))
    for rel in case.absent:
        if (d / rel).exists():
            problems.append(f"{rel} exists")
    for pattern in case.present:
        if not list(d.glob(pattern)):
            problems.append(f"nothing matches {pattern}")
    if case.id == "i06_two_resumes" and (d / "run" / "log.jsonl").exists():
        for n, line in enumerate((d / "run" / "log.jsonl").read_text().splitlines(), 1):
            try:
                json.loads(line)
            except ValueError:
                problems.append(f"log.jsonl line {n} is not whole JSON")
                break
    return problems


# ------------------------------------------------------------------------------------------- reports


def summary(results: list[dict]) -> dict[str, dict]:
    """Per category: tried, clean, not clean (ids), n/a (ids)."""
    table = {}
    for cat in CATEGORIES:
        rows = [r for r in results if r["category"] == cat]
        table[cat] = {"tried": len([r for r in rows if r["outcome"] != "n/a"]),
                      "clean": len([r for r in rows if r["outcome"] == "clean"]),
                      "not_clean": [r["id"] for r in rows if r["outcome"] == "not clean"],
                      "na": [r["id"] for r in rows if r["outcome"] == "n/a"]}
    return table


def markdown(results: list[dict], title: str = "") -> str:
    """A Markdown table by category of one run."""
    rows = [f"### {title}\n" if title else "", "| category | tried | handled cleanly | not clean | n/a |",
            "|---|---:|---:|---|---|"]
    total = [0, 0]
    for cat, s in summary(results).items():
        total[0] += s["tried"]
        total[1] += s["clean"]
        rows.append(f"| {cat} | {s['tried']} | {s['clean']} | {', '.join(s['not_clean']) or '-'} | "
                    f"{', '.join(s['na']) or '-'} |")
    rows.append(f"| **all** | **{total[0]}** | **{total[1]}** | | |")
    return "\n".join(r for r in rows if r) + "\n"


def compare(before: list[dict], after: list[dict]) -> str:
    """The before/after table: counts per category, then each case whose outcome differs."""
    sb, sa = summary(before), summary(after)
    rows = ["| category | tried (before) | clean (before) | tried (after) | clean (after) |",
            "|---|---:|---:|---:|---:|"]
    for cat in CATEGORIES:
        rows.append(f"| {cat} | {sb[cat]['tried']} | {sb[cat]['clean']} | {sa[cat]['tried']} | {sa[cat]['clean']} |")
    rows.append(f"| **all** | {sum(s['tried'] for s in sb.values())} | {sum(s['clean'] for s in sb.values())} | "
                f"{sum(s['tried'] for s in sa.values())} | {sum(s['clean'] for s in sa.values())} |")
    return "\n".join(rows) + "\n"


def run_cases(checkout: Path, cases: list[Case], workers: int = 2, progress: bool = True) -> list[dict]:
    """Run the cases (at most `workers` at once) and return their JSON records in catalogue order."""
    runner = Runner(checkout)
    try:
        def one(case: Case) -> dict:
            result = runner.run(case).__dict__
            if progress:
                print(f"{result['outcome']:>9}  {result['seconds']:5.1f} s  {case.id}"
                      + (f"  ({result['why']})" if result["why"] else ""), file=sys.stderr, flush=True)
            return result
        with ThreadPoolExecutor(max(1, min(workers, 2))) as pool:  # at most 2: the machine is shared
            return list(pool.map(one, cases))
    finally:
        runner.close()


def main(argv: list[str] | None = None) -> int:
    """Command line: run the catalogue against a checkout, or compare two result files."""
    p = argparse.ArgumentParser(prog="python -m tools.bad_inputs", description=__doc__.splitlines()[0])
    p.add_argument("--checkout", type=Path, help="the edgetrain source tree to test (its root)")
    p.add_argument("--json", type=Path, help="write the per-case results here")
    p.add_argument("--markdown", type=Path, help="write the table by category here")
    p.add_argument("--only", help="comma-separated case ids")
    p.add_argument("--workers", type=int, default=2, help="cases at once (at most 2)")
    p.add_argument("--list", action="store_true", help="list the case ids and exit")
    p.add_argument("--compare", nargs=2, type=Path, metavar=("BEFORE.json", "AFTER.json"),
                   help="print the before/after table of two result files")
    args = p.parse_args(argv)
    if args.list:
        for case in CASES:
            print(f"{case.id}\t{case.category}")
        return 0
    if args.compare:
        before, after = (json.loads(f.read_text())["cases"] for f in args.compare)
        print(compare(before, after))
        return 0
    if args.checkout is None:
        p.error("--checkout is required")
    cases = CASES
    if args.only:
        wanted = [s.strip() for s in args.only.split(",") if s.strip()]
        unknown = sorted(set(wanted) - {c.id for c in CASES})
        if unknown:
            p.error("unknown case ids: " + ", ".join(unknown))
        cases = [c for c in CASES if c.id in wanted]
    start = time.time()
    results = run_cases(args.checkout, cases, args.workers)
    doc = {"checkout": str(args.checkout.resolve()), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                              time.gmtime(start)),
           "seconds": round(time.time() - start, 1), "load_average": list(os.getloadavg()),
           "summary": summary(results), "cases": results}
    if args.json:
        args.json.write_text(json.dumps(doc, indent=1) + "\n")
    table = markdown(results, f"{args.checkout} ({len(results)} cases, {doc['seconds']:.0f} s)")
    if args.markdown:
        args.markdown.write_text(table)
    print(table)
    return 0 if all(r["outcome"] != "not clean" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
