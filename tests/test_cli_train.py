"""`edgetrain train/eval/export/demo` end to end: real subprocesses, kill -9 and Ctrl-C resumes, corrupt
checkpoints, and a table of user mistakes (one line, exit 2)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import models
from edgetrain.cli.demo import demo_model_path
from edgetrain.cli.main import main
from edgetrain.data import load_data
from edgetrain.export import compare_with_engine, onnxruntime_outputs
from edgetrain.train.checkpoint import load_checkpoint
from edgetrain.train.runlog import read_log
from edgetrain.train.runstate import restore_run

MODEL = demo_model_path()
REPO = Path(__file__).resolve().parent.parent
COMMON = ["--data", "digits", "--batch-size", "32", "--seed", "3"]
KILL_STEPS = 120  # long enough that the run is still going when its first checkpoint appears
POLL_SECONDS = 0.005
TIMEOUT = 120


def raw_test_x() -> np.ndarray:
    """The digits test images as a sensor gives them (what an export with its preprocessing takes)."""
    return load_data("digits", normalize=False).test.x


def cli(*args, cwd, check=True):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", "edgetrain.cli", *map(str, args)], capture_output=True, text=True,
                       timeout=TIMEOUT, cwd=cwd, env=env)
    if check:
        assert r.returncode == 0, r.stderr
    return r


def start(*args, cwd):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "edgetrain.cli", *map(str, args)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not path.exists():
        assert proc.poll() is None, f"run ended before writing {path.name}: {proc.communicate()[1]}"
        assert time.monotonic() < deadline, f"no {path.name} after {TIMEOUT} s"
        time.sleep(POLL_SECONDS)


def tensors(ckpt_path) -> dict:
    c = load_checkpoint(ckpt_path)
    return {**{f"p/{k}": v for k, v in c.params.items()}, **{f"b/{k}": v for k, v in c.buffers.items()},
            **{f"o/{k}": np.asarray(v) for k, v in c.optimizer_state.items()}}


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not np.array_equal(a[k], b[k])]
    assert not different, f"differ: {different[:5]}"


def without_time(log):
    return [{k: v for k, v in e.items() if k != "time"} for e in log]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def runs(work):
    """An fp32 and a static 8/8 run of 30 steps, with checkpoints at 10, 20, 30."""
    out = {}
    for name, extra in (("fp32", []), ("static", ["--schedule", "static", "--bits", "8/8"])):
        r = cli("train", MODEL, *COMMON, "--steps", 30, "--checkpoint-every", 10, "--eval-every", 15,
                "--out", name, "--json", *extra, cwd=work)
        out[name] = (work / name, json.loads(r.stdout))
    return out


@pytest.fixture(scope="module")
def straight(work):
    """The uninterrupted static run the kill -9 and Ctrl-C resumes must reproduce."""
    cli("train", MODEL, *COMMON, "--schedule", "static", "--steps", KILL_STEPS, "--checkpoint-every", 5,
        "--out", "straight", cwd=work)
    return work / "straight"


def test_train_fp32_and_static(runs):
    for name, (run_dir, result) in runs.items():
        assert result["steps"] == 30 and result["test_accuracy"] > 0.9
        assert set(result["paths"]) == {"run_dir", "model", "checkpoint", "log", "config"}
        assert all(Path(p).exists() for p in result["paths"].values())
        assert sorted(p.name for p in run_dir.glob("ckpt-*.npz")) == ["ckpt-000010.npz", "ckpt-000020.npz",
                                                                       "ckpt-000030.npz"]
        log = read_log(run_dir / "log.jsonl")
        assert [e["step"] for e in log if e["type"] == "eval"] == [15, 30]
        assert sum(e["type"] == "step" for e in log) == 30
        config = json.loads((run_dir / "config.json").read_text())
        assert config["model"] == MODEL and config["schedule"] == name
    fp32, static = runs["fp32"][1], runs["static"][1]
    assert fp32["percent_of_fp32"] == 100.0 and fp32["precision"] == "fp32 x5"
    assert static["precision"] == "8/8 x4, fp32 x1" and 5 < static["percent_of_fp32"] < 10
    assert static["bitops"] < fp32["bitops"] == static["fp32_bitops"]


def test_eval_of_a_run_a_checkpoint_and_an_onnx_file(runs, work):
    run_dir, result = runs["static"]
    by_dir = json.loads(cli("eval", run_dir, "--json", cwd=work).stdout)
    assert by_dir["accuracy"] == result["test_accuracy"] and by_dir["loss"] == result["test_loss"]
    assert by_dir["precision"] == "8/8 x4, fp32 x1" and by_dir["source"].endswith("ckpt-000030.npz")
    earlier = json.loads(cli("eval", run_dir / "ckpt-000010.npz", "--json", cwd=work).stdout)
    assert earlier["source"].endswith("ckpt-000010.npz")
    as_fp32 = json.loads(cli("eval", run_dir, "--bits", "fp32", "--json", cwd=work).stdout)
    assert as_fp32["precision"] == "fp32 x5"
    r = cli("eval", MODEL, "--data", "digits", cwd=work)
    assert "test accuracy 95.80%" in r.stdout and "1000 samples of digits" in r.stdout


def test_export_float_and_int8_run_in_onnxruntime(runs, work):
    run_dir, _ = runs["static"]
    cli("export", run_dir, "--out", "int8.onnx", "--int8", cwd=work)
    cli("export", run_dir / "ckpt-000030.npz", "--out", "float.onnx", cwd=work)
    cli("export", run_dir, "--out", "int8-normalised.onnx", "--int8", "--preprocess", "none", cwd=work)
    model = restore_run(load_checkpoint(run_dir / "ckpt-000030.npz")).model
    x = load_data("digits").test.x
    float_check = compare_with_engine(model, work / "float.onnx", x, int8=False, onnx_input=raw_test_x())
    int8_check = compare_with_engine(model, work / "int8-normalised.onnx", x, int8=True)
    assert float_check["max_relative_error"] < 1e-4 and float_check["top1_agreement"] == 1.0
    assert int8_check["top1_agreement"] >= 0.99
    # the default export carries the normalisation: on raw input it computes what the normalised one does
    np.testing.assert_allclose(onnxruntime_outputs(work / "int8.onnx", raw_test_x()),
                               onnxruntime_outputs(work / "int8-normalised.onnx", x), rtol=1e-5, atol=1e-5)


def test_new_head_run_evaluates_and_exports_with_its_new_class_count(work):
    cli("train", MODEL, *COMMON, "--schedule", "static", "--num-classes", 12, "--train-last", 2, "--steps", 10,
        "--out", "head12", cwd=work)
    result = json.loads(cli("eval", "head12", "--json", cwd=work).stdout)
    assert result["samples"] == 1000 and result["precision"] == "8/8 x4, fp32 x1"
    cli("export", "head12", "--out", "head12.onnx", "--int8", cwd=work)
    assert onnxruntime_outputs(work / "head12.onnx", raw_test_x()[:5]).shape == (5, 12)


def test_resume_extends_a_finished_run_bit_for_bit(runs, work):
    run_dir, _ = runs["static"]
    cli("train", MODEL, *COMMON, "--schedule", "static", "--bits", "8/8", "--steps", 20, "--checkpoint-every", 10,
        "--eval-every", 15, "--out", "short", cwd=work)
    r = cli("train", "--out", "short", "--resume", "--steps", 30, "--json", cwd=work)
    assert json.loads(r.stdout)["resumed_from"] == 20
    assert_same(tensors(work / "short" / "ckpt-000030.npz"), tensors(run_dir / "ckpt-000030.npz"))


def test_kill_9_then_resume_equals_an_uninterrupted_run(straight, work):
    args = ["train", MODEL, *COMMON, "--schedule", "static", "--steps", KILL_STEPS, "--checkpoint-every", 5,
            "--out", "killed"]
    proc = start(*args, cwd=work)
    wait_for(work / "killed" / "ckpt-000010.npz", proc)
    proc.kill()  # SIGKILL: no handler runs, whatever was being written stays half-written
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert not (work / "killed" / f"ckpt-{KILL_STEPS:06d}.npz").exists()
    r = cli("train", "--out", "killed", "--resume", "--json", cwd=work)
    assert json.loads(r.stdout)["resumed_from"] >= 10
    name = f"ckpt-{KILL_STEPS:06d}.npz"
    assert_same(tensors(work / "killed" / name), tensors(straight / name))
    # The log of the resumed run reads as the uninterrupted one's: steps after the checkpoint were dropped.
    assert without_time(read_log(work / "killed" / "log.jsonl")) == without_time(read_log(straight / "log.jsonl"))


def test_ctrl_c_saves_a_checkpoint_and_says_how_to_resume(straight, work):
    proc = start("train", MODEL, *COMMON, "--schedule", "static", "--steps", KILL_STEPS, "--checkpoint-every", 5,
                 "--out", "interrupted", cwd=work)
    wait_for(work / "interrupted" / "ckpt-000005.npz", proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 130, err
    assert "resume with: edgetrain train --out interrupted --resume" in err and "Traceback" not in err
    cli("train", "--out", "interrupted", "--resume", cwd=work)
    name = f"ckpt-{KILL_STEPS:06d}.npz"
    assert_same(tensors(work / "interrupted" / name), tensors(straight / name))


@pytest.mark.parametrize("damage", ["truncate", "garble"])
def test_a_corrupt_newest_checkpoint_is_skipped_never_used(runs, work, damage, tmp_path):
    source, _ = runs["static"]
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for f in source.iterdir():
        (run_dir / f.name).write_bytes(f.read_bytes())
    good = tensors(source / "ckpt-000030.npz")
    newest = run_dir / "ckpt-000030.npz"
    data = bytearray(newest.read_bytes())
    if damage == "truncate":
        newest.write_bytes(bytes(data[: len(data) // 2]))
    else:
        data[len(data) // 2: len(data) // 2 + 64] = bytes(64)
        newest.write_bytes(bytes(data))
    # The file itself: a clear one-line error.
    r = cli("eval", newest, cwd=work, check=False)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "ckpt-000030.npz" in r.stderr and ("corrupt" in r.stderr or "truncated" in r.stderr)
    # The run folder: the newest good checkpoint (step 20) is used, and the skip is reported.
    r = cli("eval", run_dir, "--json", cwd=work)
    assert json.loads(r.stdout)["source"].endswith("ckpt-000020.npz")
    assert "warning: skipping checkpoint" in r.stderr and "ckpt-000030.npz" in r.stderr
    # Resuming continues from step 20 and rewrites step 30 exactly as the undamaged run had it.
    r = cli("train", "--out", run_dir, "--resume", "--json", cwd=work)
    assert json.loads(r.stdout)["resumed_from"] == 20
    assert_same(tensors(newest), good)


def test_demo_short(work):
    r = cli("demo", "--steps", 20, "--out", "demo", cwd=work)
    lines = r.stdout.splitlines()
    assert any(line.startswith("fp32 ") for line in lines) and any(line.startswith("static 8/8 ") for line in lines)
    assert "onnxruntime agrees: OK" in r.stdout and "% of fp32 BitOPs" in r.stdout
    assert (work / "demo" / "lenet5_rotated.onnx").exists() and (work / "demo" / "lenet5_rotated_int8.onnx").exists()


# -- user mistakes: one line, exit 2 ---------------------------------------------------------------
def bad_inputs(tmp: Path, runs) -> dict:
    small_input = tmp / "lenet32.onnx"
    small_input.write_bytes(models.build_model("lenet5", input_size=32).SerializeToString())
    five = tmp / "lenet5c.onnx"
    five.write_bytes(models.build_model("lenet5", num_classes=5).SerializeToString())

    def toml(name, text):
        (tmp / name).write_text(text)
        return str(tmp / name)

    fp32_run = str(runs["fp32"][0])
    occupied = tmp / "occupied"  # an earlier run with a checkpoint: a new run must not mix with it
    occupied.mkdir(exist_ok=True)
    (occupied / "log.jsonl").write_text("")
    (occupied / "ckpt-000010.npz").write_bytes((runs["fp32"][0] / "ckpt-000010.npz").read_bytes())
    unfinished = tmp / "unfinished"  # stopped before its first checkpoint
    unfinished.mkdir(exist_ok=True)
    (unfinished / "log.jsonl").write_text("")
    train = ["train", MODEL, "--data", "digits", "--out", str(tmp / "new")]
    return {
        "missing model": (["train", str(tmp / "nope.onnx"), "--data", "digits"], ["nope.onnx", "no such file"]),
        "no model": (["train", "--data", "digits"], ["no model"]),
        "no data": (["train", MODEL], ["no data", "--data"]),
        "unknown data": ([*train[:2], "--data", "imagenet"], ["unknown data source 'imagenet'"]),
        "data missing path": ([*train[:2], "--data", "cifar10:" + str(tmp / "nowhere")], ["cifar10", "nowhere"]),
        "input does not fit": (["train", str(small_input), "--data", "digits"],
                               ["samples have shape (1, 28, 28)", "model input is (N, 1, 32, 32)"]),
        "too many classes": (["train", str(five), "--data", "digits"], ["10 classes", "outputs 5", "new classifier"]),
        "steps not a number": ([*train, "--steps", "ten"], ["--steps", "expected a positive integer", "'ten'"]),
        "steps zero": ([*train, "--steps", "0"], ["--steps", "expected a positive integer"]),
        "steps and epochs": ([*train, "--steps", "3", "--epochs", "1"], ["--epochs", "not allowed with"]),
        "dfq with bits": ([*train, "--schedule", "dfq", "--bits", "8/8"], ["choose the bits per sample"]),
        "dfq bad candidate": ([*train, "--schedule", "dfq", "--dfq-candidates", "0,3/x"], ["precision '3/x'"]),
        "dfq target": ([*train, "--schedule", "dfq", "--dfq-target", "0"], ["percentage in (0, 100]"]),
        "dfq cost table missing": ([*train, "--schedule", "dfq", "--dfq-cost-table", str(tmp / "no.json")],
                                   ["dfq_cost_table", "no such file"]),
        "pfq with bits": ([*train, "--schedule", "pfq", "--bits", "8/8"], ["pfq's stages set the bits"]),
        "pfq bad stage": ([*train, "--schedule", "pfq", "--pfq-stages", "3/6,9x"], ["precision '9x'"]),
        "pfq bad switches": ([*train, "--schedule", "pfq", "--pfq-switch-steps", "9,3,5"], ["increasing switch steps"]),
        "fractrain bad targets": ([*train, "--schedule", "fractrain", "--fractrain-targets", "1.5,x"],
                                  ["--fractrain-targets", "comma-separated numbers"]),
        "unknown schedule": ([*train, "--schedule", "fast"], ["unknown schedule 'fast'", "fp32, static"]),
        "bits with fp32": ([*train, "--bits", "8/8"], ["need --schedule static"]),
        "bits out of range": ([*train, "--schedule", "static", "--bits", "1/8"], ["FW bits must be in 2..16"]),
        "bits garbled": ([*train, "--schedule", "static", "--bits", "eight"], ["expected FW/BW"]),
        "unknown optimizer": ([*train, "--optimizer", "rmsprop"], ["'rmsprop' is unknown", "sgd, adam, adamw"]),
        "momentum with adam": ([*train, "--optimizer", "adam", "--momentum", "0.9"], ["sgd only"]),
        "lr zero": ([*train, "--lr", "0"], ["'lr' must be positive"]),
        "lr negative": ([*train, "--lr", "-1"], ["--lr", "expected a number >= 0"]),
        "unknown lr schedule": ([*train, "--lr-schedule", "linear"], ["'linear' is unknown"]),
        "warm-up too long": ([*train, "--steps", "5", "--warmup-steps", "9"], ["warmup_steps (9)", "total_steps (5)"]),
        "freeze matches nothing": ([*train, "--freeze", "encoder.*"], ["'encoder.*' matches no parameter"]),
        "train-last too many": ([*train, "--train-last", "9"], ["5 MAC layers", "1..5"]),
        "one class": ([*train, "--num-classes", "1"], ["'num_classes' must be at least 2"]),
        "config missing": ([*train, "--config", str(tmp / "none.toml")], ["none.toml", "no such config file"]),
        "config not toml": ([*train, "--config", toml("bad.toml", "steps = = 3")], ["bad.toml", "not valid TOML"]),
        "config unknown key": ([*train, "--config", toml("k.toml", "learning_rate = 0.1")],
                               ["unknown key 'learning_rate'", "valid keys: model, data", "lr"]),
        "config wrong type": ([*train, "--config", toml("t.toml", "bias_only = 1")],
                              ["'bias_only' must be true or false"]),
        "run folder taken": (["train", MODEL, "--data", "digits", "--out", str(occupied)],
                             ["already holds a run", "--resume"]),
        "resume nothing": (["train", "--out", str(tmp / "never"), "--resume"], ["no run folder to resume"]),
        "resume changes lr": (["train", "--out", fp32_run, "--resume", "--lr", "0.5"],
                              ["--lr is 0.5", "used 0.01", "may change only"]),
        "unknown flag": ([*train, "--learning-rate", "0.1"], ["unrecognized arguments: --learning-rate"]),
        "eval missing": (["eval", str(tmp / "gone.npz")], ["gone.npz", "no such checkpoint"]),
        "eval empty run folder": (["eval", str(unfinished)], ["no usable checkpoint"]),
        "eval onnx without data": (["eval", MODEL], ["no data"]),
        "export an onnx file": (["export", MODEL, "--out", str(tmp / "x.onnx")],
                                ["not a checkpoint file or run folder"]),
        "export int8 of fp32": (["export", fp32_run, "--out", str(tmp / "x.onnx"), "--int8"],
                                ["every layer of this model is fp32", "--schedule static"]),
        "export to missing folder": (["export", fp32_run, "--out", str(tmp / "no" / "x.onnx")], ["does not exist"]),
        "export without out": (["export", fp32_run], ["--out"]),
    }


def test_bad_inputs_give_one_line_and_exit_2(runs, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    failures = []
    for case, (argv, needles) in bad_inputs(tmp_path, runs).items():
        code = main(argv)
        out, err = capsys.readouterr()
        lines = err.strip().splitlines()
        ok = (code == 2 and len(lines) == 1 and lines[0].startswith("edgetrain: error: ") and out == ""
              and all(n in lines[0] for n in needles))
        if not ok:
            failures.append(f"{case}: exit {code}, stderr {err!r}")
    assert not failures, "\n".join(failures)
    assert not (tmp_path / "edgetrain-run").exists() and not (tmp_path / "new").exists()


def test_a_bad_input_from_the_real_command_line(work):
    r = cli("train", MODEL, "--data", "digits", "--schedule", "dqf", cwd=work, check=False)
    assert r.returncode == 2 and r.stdout == "" and "Traceback" not in r.stderr
    assert r.stderr.strip() == ("edgetrain: error: unknown schedule 'dqf'; valid: fp32, static, pfq, dfq, fractrain")


def test_train_pfq_switches_stages_and_resumes_bit_for_bit(tmp_path):
    """--schedule pfq: the log shows every stage in order, BitOPs fall below static 8/8, resume is exact."""
    import json

    model = tmp_path / "lenet5.onnx"
    models.save_model(models.build_model("lenet5"), model)
    pfq = ["--schedule", "pfq", "--pfq-switch-steps", "4,8,12", "--checkpoint-every", "6"]
    full = json.loads(cli("train", model, *COMMON, "--steps", "16", *pfq, "--out", tmp_path / "a", "--json",
                          cwd=tmp_path).stdout)
    steps = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    seen = []
    for s in steps:
        p = s.get("precision")
        if p and "3/6" in p and "3/6" not in seen:
            seen.append("3/6")
        for stage in ("4/6", "6/8", "8/8"):
            if p and stage in p and stage not in seen:
                seen.append(stage)
    assert seen == ["3/6", "4/6", "6/8", "8/8"]
    static = json.loads(cli("train", model, *COMMON, "--steps", "16", "--schedule", "static", "--out",
                            tmp_path / "s", "--json", cwd=tmp_path).stdout)
    key = next(k for k in full if "percent" in k)
    assert full[key] < static[key]
    # interrupted after the checkpoint at step 6, resumed to 16: the same weights
    cli("train", model, *COMMON, "--steps", "6", *pfq, "--out", tmp_path / "b", cwd=tmp_path)
    cli("train", model, *COMMON, "--steps", "16", *pfq, "--out", tmp_path / "b", "--resume", cwd=tmp_path)
    from edgetrain.train.checkpoint import find_latest

    assert_same(tensors(find_latest(tmp_path / "a").path), tensors(find_latest(tmp_path / "b").path))
