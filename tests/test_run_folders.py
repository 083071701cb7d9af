"""Issue 17, items 1-9 and 13: run folders that hold one run and never overwrite an input, stop signals,
failed writes, divergence and NaN, unclear flags. Each test is the issue's reproducer with its expected
outcome: one line on stderr, the documented exit code, nothing lost."""
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from edgetrain.cli.demo import demo_model_path
from edgetrain.cli.main import main
from edgetrain.errors import EXIT_BAD_INPUT, EXIT_INTERRUPTED
from edgetrain.signals import StopFlag
from edgetrain.train.checkpoint import load_checkpoint
from edgetrain.train.runfolder import LOCK_NAME, RunFolder
from edgetrain.train.runlog import read_log

MODEL = demo_model_path()
REPO = Path(__file__).resolve().parent.parent
SMALL = ["--data", "digits", "--batch-size", "16", "--seed", "1"]
SIGNAL_STEPS = 20  # long enough that the run is still going when its first step is logged
TIMEOUT = 120


def train(out, *extra, model=MODEL):
    return main(["train", str(model), *SMALL, "--steps", "2", "--out", str(out), *extra])


def one_error(capsys, code, *needles):
    """The command failed with `code` and said so in one line holding every needle."""
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgetrain: error: "), err
    assert all(n in lines[0] for n in needles), lines[0]
    return code


def tensors(path) -> dict:
    c = load_checkpoint(path)
    return {**c.params, **{f"b/{k}": v for k, v in c.buffers.items()},
            **{f"o/{k}": np.asarray(v) for k, v in c.optimizer_state.items()}}


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    assert not [k for k in a if not np.array_equal(a[k], b[k])]


def without_time(entries):
    return [{k: v for k, v in e.items() if k != "time"} for e in entries]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished two-step run."""
    folder = tmp_path_factory.mktemp("runs") / "run"
    assert train(folder) == 0
    return folder


# -- 1: --out in the model's own folder ----------------------------------------------------------
def test_1_out_in_the_models_folder_never_overwrites_the_model(tmp_path, monkeypatch, capsys):
    (tmp_path / "model.onnx").write_bytes(Path(MODEL).read_bytes())
    monkeypatch.chdir(tmp_path)
    code = main(["train", "model.onnx", *SMALL, "--steps", "5", "--out", "."])
    assert one_error(capsys, code, "model.onnx", "would overwrite", "--out") == EXIT_BAD_INPUT
    assert (tmp_path / "model.onnx").read_bytes() == Path(MODEL).read_bytes()
    assert sorted(os.listdir(tmp_path)) == ["model.onnx"]  # nothing written beside it


def test_1_a_config_file_named_like_the_runs_config_is_not_overwritten(tmp_path, capsys):
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    (run_dir / "config.json").write_text("x")  # not TOML, but the path check comes first
    code = main(["train", MODEL, *SMALL, "--out", str(run_dir), "--config", str(run_dir / "config.json")])
    assert code == EXIT_BAD_INPUT
    assert (run_dir / "config.json").read_text() == "x"
    capsys.readouterr()


# -- 2: export --out ------------------------------------------------------------------------------
def test_2_export_never_overwrites_the_runs_files_or_inputs(run, capsys):
    for target, needles in ((run / "log.jsonl", ["log.jsonl", "a file of the run"]),
                            (run / "config.json", ["config.json", "a file of the run"]),
                            (run / "ckpt-000002.npz", ["ckpt-000002.npz", "a file of the run"]),
                            (run / "model.onnx", ["model.onnx", "a file of the run"]),
                            (Path(MODEL), [Path(MODEL).name, "a file this job reads"])):
        before = target.read_bytes()
        code = main(["export", str(run), "--out", str(target), "--force"])  # --force never covers these
        assert one_error(capsys, code, *needles) == EXIT_BAD_INPUT
        assert target.read_bytes() == before


def test_2_export_replaces_an_existing_file_only_with_force(run, tmp_path, capsys):
    out = tmp_path / "mine.onnx"
    out.write_bytes(b"precious")
    code = main(["export", str(run), "--out", str(out)])
    assert one_error(capsys, code, "mine.onnx", "exists", "--force") == EXIT_BAD_INPUT
    assert out.read_bytes() == b"precious"
    assert main(["export", str(run), "--out", str(out), "--force"]) == 0
    assert onnx.load(str(out)).graph.node
    capsys.readouterr()


# -- 3: SIGTERM and SIGHUP ------------------------------------------------------------------------
def start(*args, cwd):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "edgetrain.cli", *map(str, args)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_a_step(log: Path, proc) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not (log.exists() and '"type": "step"' in log.read_text()):
        assert proc.poll() is None, f"run ended early: {proc.communicate()[1]}"
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_3_a_stopped_demo_does_not_offer_a_resume_it_cannot_do(tmp_path):
    proc = start("demo", "--steps", SIGNAL_STEPS, "--out", "demo", cwd=tmp_path)
    wait_for_a_step(tmp_path / "demo" / "runs" / "fp32" / "log.jsonl", proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == EXIT_INTERRUPTED, err
    lines = [line for line in err.splitlines() if line.startswith("edgetrain")]  # the rest is the progress bar
    assert len(lines) == 1 and "the demo does not resume" in lines[0] and "--resume" not in lines[0], err


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_3_a_stop_signal_saves_a_checkpoint_exits_130_and_resumes_bit_for_bit(signum, tmp_path, capsys):
    if signal.getsignal(signum) == signal.SIG_IGN:
        pytest.skip(f"{signum.name} is ignored here (nohup?), and so in the child")
    args = ["train", MODEL, *SMALL, "--steps", SIGNAL_STEPS]  # no --checkpoint-every: the stop must save
    proc = start(*args, "--out", "stopped", cwd=tmp_path)
    wait_for_a_step(tmp_path / "stopped" / "log.jsonl", proc)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == EXIT_INTERRUPTED, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and f"({signum.name})" in lines[0] and "resume with: edgetrain train --out stopped" \
        " --resume" in lines[0], err
    saved = sorted((tmp_path / "stopped").glob("ckpt-*.npz"))
    assert len(saved) == 1 and int(saved[0].stem[5:]) < SIGNAL_STEPS
    if signum != signal.SIGTERM:
        return  # one bit-for-bit resume is enough: the handler is the same
    assert main(["train", "--out", str(tmp_path / "stopped"), "--resume"]) == 0
    assert main([*map(str, args), "--out", str(tmp_path / "straight")]) == 0
    name = f"ckpt-{SIGNAL_STEPS:06d}.npz"
    assert_same(tensors(tmp_path / "stopped" / name), tensors(tmp_path / "straight" / name))
    assert without_time(read_log(tmp_path / "stopped" / "log.jsonl")) == \
        without_time(read_log(tmp_path / "straight" / "log.jsonl"))
    capsys.readouterr()


def test_3_sigterm_stops_any_other_command_with_one_line_and_130(monkeypatch, capsys):
    def eval_then_stopped(*args, **kwargs):
        signal.raise_signal(signal.SIGTERM)  # as systemd stopping a long evaluation
        raise AssertionError("SIGTERM did not stop the command")

    monkeypatch.setattr("edgetrain.cli.commands.run_eval", eval_then_stopped)
    before = signal.getsignal(signal.SIGTERM)
    assert main(["eval", MODEL, "--data", "digits"]) == EXIT_INTERRUPTED
    assert capsys.readouterr().err == "edgetrain: interrupted (SIGTERM)\n"
    assert signal.getsignal(signal.SIGTERM) == before  # main put back what it found


def test_3_an_inherited_ignored_sighup_stays_ignored():
    before = signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as under nohup
    term = signal.getsignal(signal.SIGTERM)
    try:
        with StopFlag():
            assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) != term
        assert signal.getsignal(signal.SIGTERM) == term
    finally:
        signal.signal(signal.SIGHUP, before)


# -- 4: stopped before its first checkpoint --------------------------------------------------------
def unfinished(run, tmp_path) -> Path:
    """A copy of a run as a kill before its first checkpoint leaves it: config and log only."""
    folder = tmp_path / "unfinished"
    folder.mkdir()
    for name in ("config.json", "log.jsonl"):
        (folder / name).write_bytes((run / name).read_bytes())
    config = json.loads((folder / "config.json").read_text())
    config["out"] = str(folder)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_4_resume_of_a_run_without_checkpoint_starts_it_from_step_0(run, tmp_path, capsys):
    folder = unfinished(run, tmp_path)
    assert main(["train", "--out", str(folder), "--resume", "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["resumed_from"] is None and "starting afresh" in err
    assert_same(tensors(folder / "ckpt-000002.npz"), tensors(run / "ckpt-000002.npz"))


def test_4_a_new_run_may_take_a_folder_without_checkpoint(run, tmp_path, capsys):
    folder = unfinished(run, tmp_path)
    assert train(folder) == 0
    assert "stopped before its first checkpoint; starting afresh" in capsys.readouterr().err
    assert_same(tensors(folder / "ckpt-000002.npz"), tensors(run / "ckpt-000002.npz"))
    assert train(folder) == EXIT_BAD_INPUT  # now it holds a run
    assert "already holds a run" in capsys.readouterr().err


def test_4_a_folder_whose_log_no_run_wrote_is_refused_not_replaced(tmp_path, capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    (folder / "log.jsonl").write_text("my own log\n")
    assert one_error(capsys, train(folder), "log.jsonl", "not a file of an edgetrain run") == EXIT_BAD_INPUT
    assert (folder / "log.jsonl").read_text() == "my own log\n" and sorted(p.name for p in folder.iterdir()) == [
        "log.jsonl", "notes.txt"]


def test_4_a_resume_refused_for_its_log_leaves_the_runs_config_as_it_was(run, tmp_path, capsys):
    folder = tmp_path / "damaged"
    folder.mkdir()
    for path in run.iterdir():
        if path.is_file() and path.name != LOCK_NAME:
            (folder / path.name).write_bytes(path.read_bytes())
    (folder / "log.jsonl").write_text('{"type": "step", "step": "abc", "loss": 1.0}\n')
    before = (folder / "config.json").read_bytes()
    code = main(["train", "--out", str(folder), "--resume", "--steps", "4"])
    assert one_error(capsys, code, "log.jsonl", "'step'") == EXIT_BAD_INPUT
    assert (folder / "config.json").read_bytes() == before


# -- 5: non-finite settings ------------------------------------------------------------------------
@pytest.mark.parametrize("argv, needles", [
    (["--schedule", "pfq", "--pfq-eps", "inf"], ["--pfq-eps", "'inf'"]),
    (["--lr", "nan"], ["--lr", "'nan'"]),
    (["--schedule", "fractrain", "--fractrain-targets", "1.5,inf"], ["--fractrain-targets", "'1.5,inf'"]),
])
def test_5_non_finite_flags_are_refused_before_anything_is_written(argv, needles, tmp_path, capsys):
    code = train(tmp_path / "r", *argv)
    assert one_error(capsys, code, *needles) == EXIT_BAD_INPUT
    assert not (tmp_path / "r").exists()


def test_5_non_finite_config_file_values_are_refused(tmp_path, capsys):
    toml = tmp_path / "c.toml"
    for text, key in (("pfq_eps = inf\nschedule = 'pfq'\n", "pfq_eps"), ("val_fraction = nan\n", "val_fraction"),
                      ("pfq_stages = []\nschedule = 'pfq'\n", "pfq_stages")):
        toml.write_text(text)
        code = train(tmp_path / "r", "--config", str(toml))
        assert one_error(capsys, code, f"'{key}'") == EXIT_BAD_INPUT
    assert not (tmp_path / "r").exists()


# -- 6: one run per folder -------------------------------------------------------------------------
def test_6_a_second_run_or_resume_on_a_held_folder_fails_at_once(run, tmp_path, capsys):
    folder = tmp_path / "held"
    with RunFolder(folder):  # what a running `edgetrain train --out held` holds
        code = train(folder)
        assert one_error(capsys, code, str(folder), "in use by another run", f"pid {os.getpid()}") == 2
        for name in ("config.json", "log.jsonl"):
            (folder / name).write_bytes((run / name).read_bytes())
        code = main(["train", "--out", str(folder), "--resume"])
        assert one_error(capsys, code, "in use by another run") == EXIT_BAD_INPUT
        assert sorted(os.listdir(folder)) == sorted([LOCK_NAME, "config.json", "log.jsonl"])
    assert (folder / "log.jsonl").read_bytes() == (run / "log.jsonl").read_bytes()


def test_6_two_runs_started_together_on_one_folder_never_mix(tmp_path):
    procs = [start("train", MODEL, "--data", "digits", "--batch-size", "16", "--steps", 10, "--seed", seed,
                   "--out", "both", cwd=tmp_path) for seed in (1, 2)]  # different seeds: a mix would show
    errs = [p.communicate(timeout=TIMEOUT)[1] for p in procs]
    results = [(p.returncode, e) for p, e in zip(procs, errs)]
    assert sorted(code for code, _ in results) == [0, EXIT_BAD_INPUT], results
    err = next(e for code, e in results if code)
    assert err.count("\n") == 1 and ("in use by another run" in err or "already holds a run" in err), err
    winner = json.loads((tmp_path / "both" / "config.json").read_text())["seed"]
    assert load_checkpoint(tmp_path / "both" / "ckpt-000010.npz").meta["seed"] == winner
    assert {e["step"] for e in read_log(tmp_path / "both" / "log.jsonl") if e["type"] == "step"} == set(range(1, 11))


def test_6_the_lock_is_dropped_when_its_holder_dies(tmp_path):
    folder = tmp_path / "f"
    holder = subprocess.run([sys.executable, "-c", "import os, sys; from edgetrain.train.runfolder import "
                             f"RunFolder; RunFolder({str(folder)!r}).acquire(); os._exit(0)"],
                            env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=TIMEOUT)
    assert holder.returncode == 0 and (folder / LOCK_NAME).exists()
    with RunFolder(folder):
        pass


# -- 7 and 13: divergence, RuntimeWarnings ---------------------------------------------------------
def test_7_divergence_on_the_last_step_fails_without_writing_weights(tmp_path):
    r = subprocess.run([sys.executable, "-m", "edgetrain.cli", "train", MODEL, *SMALL, "--steps", "1", "--lr", "1e37",
                        "--out", "r"], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)},
                       capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == EXIT_BAD_INPUT
    assert r.stderr.strip().count("\n") == 0 and "training diverged" in r.stderr, r.stderr  # no numpy warnings
    assert not list((tmp_path / "r").glob("ckpt-*")) and not (tmp_path / "r" / "model.onnx").exists()


# -- 8: failed writes ------------------------------------------------------------------------------
def test_8_export_into_a_folder_is_one_line(run, tmp_path, capsys):
    code = main(["export", str(run), "--out", str(tmp_path)])
    assert one_error(capsys, code, str(tmp_path), "is a folder") == EXIT_BAD_INPUT


def test_8_a_write_that_fails_is_one_line_naming_the_file(run, tmp_path, monkeypatch, capsys):
    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    code = main(["export", str(run), "--out", str(tmp_path / "x.onnx")])
    assert one_error(capsys, code, "x.onnx", "no space left") == EXIT_BAD_INPUT
    assert os.listdir(tmp_path) == []  # no temporary file left
    code = train(tmp_path / "r")
    assert one_error(capsys, code, "no space left") == EXIT_BAD_INPUT


@contextlib.contextmanager
def tiny_filesystem(path: Path, options: str):
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    if r.returncode != 0:
        pytest.skip("mounting a tmpfs is not permitted here")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=False)


@pytest.mark.skipif(sys.platform != "linux" or os.geteuid() != 0, reason="needs root to mount a tmpfs")
def test_8_a_full_disk_and_a_read_only_folder_are_one_line(run, tmp_path, capsys):
    with tiny_filesystem(tmp_path / "full", "size=64k") as full:
        code = train(full / "r")
        assert one_error(capsys, code, str(full / "r"), "no space left") == EXIT_BAD_INPUT
        code = main(["export", str(run), "--out", str(full / "x.onnx")])
        assert one_error(capsys, code, "x.onnx", "no space left") == EXIT_BAD_INPUT
    with tiny_filesystem(tmp_path / "ro", "ro,size=64k") as ro:
        code = train(ro / "r")
        assert one_error(capsys, code, str(ro / "r"), "read-only") == EXIT_BAD_INPUT
        code = main(["export", str(run), "--out", str(ro / "x.onnx")])
        assert one_error(capsys, code, "x.onnx", "read-only") == EXIT_BAD_INPUT


# -- 9 and 13: NaN weights and non-finite activations ----------------------------------------------
@pytest.fixture(scope="module")
def nan_model(tmp_path_factory):
    proto = onnx.load(MODEL)
    init = next(t for t in proto.graph.initializer if t.name == "conv1.weight")
    w = numpy_helper.to_array(init).copy()
    w.flat[3] = np.nan
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    path = tmp_path_factory.mktemp("nan") / "model.onnx"
    onnx.save(proto, str(path))
    return path


@pytest.mark.parametrize("argv", [["eval", "{m}", "--data", "digits", "--bits", "8/8"],
                                  ["train", "{m}", *SMALL, "--steps", "1", "--out", "{t}/r"]], ids=["eval", "train"])
def test_9_13_nan_weights_are_named_not_called_divergence(argv, nan_model, tmp_path, capsys):
    code = main([a.format(m=nan_model, t=tmp_path) for a in argv])
    assert one_error(capsys, code, "model.onnx", "initializer 'conv1.weight' holds NaN") == EXIT_BAD_INPUT
    assert not (tmp_path / "r").exists()


def test_9_a_mid_run_evaluation_that_cannot_quantise_is_divergence(tmp_path, monkeypatch, capsys):
    def not_finite(*args, **kwargs):
        raise ValueError("cannot quantise: the tensor holds 3 NaN or infinite values")

    monkeypatch.setattr("edgetrain.train.trainer.evaluate", not_finite)
    code = train(tmp_path / "r", "--schedule", "static", "--bits", "8/8")
    assert one_error(capsys, code, "step 1", "not finite", "training diverged") == EXIT_BAD_INPUT


# -- 13: unclear flags -----------------------------------------------------------------------------
@pytest.mark.parametrize("argv, needles", [
    (["train", MODEL, "--data", "digits", "--schedule", "pfq", "--pfq-stages", ","], ["--pfq-stages", "','"]),
    (["train", MODEL, "--data", "digits", "--schedule", "dfq", "--dfq-candidates", ","], ["--dfq-candidates"]),
    (["train", MODEL, "--data", "digits", "--schedule", "pfq", "--pfq-stages", "3/6,,8/8"], ["--pfq-stages"]),
    (["train", MODEL, "--data", "digits", "--out", ""], ["'out'", "must name a folder"]),
    (["demo", "--steps", "0"], ["--steps", "a positive integer"]),
    (["demo", "--out", ""], ["--out", "expected a folder"]),
    (["export", "somewhere", "--out", ""], ["--out", "expected a file name"]),
    (["plot", "somewhere", "--out", ""], ["--out", "expected a folder"]),
], ids=["pfq-stages ,", "dfq-candidates ,", "pfq-stages empty item", "train out ''", "demo steps 0",
        "demo out ''", "export out ''", "plot out ''"])
def test_13_unclear_flags_are_refused(argv, needles, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = main(argv)
    assert one_error(capsys, code, *needles) == EXIT_BAD_INPUT
    assert os.listdir(tmp_path) == []
