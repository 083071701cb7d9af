"""The Trainer in-process: bit-identical resume, divergence, fine-tuning controls, controllers, logs, config."""
import dataclasses
import json
import signal

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import models
from edgetrain.cli.demo import demo_model_path
from edgetrain.data import Dataset, Split, load_data
from edgetrain.errors import EdgetrainError
from edgetrain.train.checkpoint import load_checkpoint
from edgetrain.train.config import TrainConfig, read_toml, resolve
from edgetrain.train.finetune import new_head
from edgetrain.train.runlog import read_log
from edgetrain.train.runstate import build_model, restore_run
from edgetrain.train.trainer import Trainer, evaluate

MODEL = demo_model_path()
STEPS = 20


@pytest.fixture(scope="module")
def digits():
    return load_data("digits")


def small(split: Split, n_train: int = 512, n_test: int = 200) -> Split:
    """A slice of the digits: enough to train a few steps and evaluate quickly."""
    cut = lambda d, n: dataclasses.replace(d, x=d.x[:n], y=d.y[:n])
    return dataclasses.replace(split, train=cut(split.train, n_train), test=cut(split.test, n_test))


def config(tmp_path, name="run", **kw) -> TrainConfig:
    values = dict(model=MODEL, data="digits", steps=STEPS, batch_size=32, out=str(tmp_path / name), seed=1)
    values.update(kw)
    return resolve(values)


def trainer(cfg: TrainConfig, split: Split, **kw) -> Trainer:
    model, head = build_model(cfg.model, cfg.seed, cfg.num_classes)
    return Trainer(model, split, cfg, head=head, export_model=False, **kw)


def test_resume_is_bit_identical_and_eval_after_resume_matches(tmp_path, digits):
    split = small(digits)
    full = trainer(config(tmp_path, "full", schedule="static", checkpoint_every=7, eval_every=10), split)
    done = full.fit()
    part = trainer(config(tmp_path, "full", schedule="static", checkpoint_every=7, eval_every=10), split)
    part.resume(load_checkpoint(tmp_path / "full" / "ckpt-000014.npz"))
    part.run_dir = tmp_path / "resumed"  # same config, its own folder
    part._manager = None
    resumed = part.fit()
    a, b = full.model.state_dict(), part.model.state_dict()
    assert all(np.array_equal(a[k], b[k]) for k in a)
    sa, sb = full.optimizer.state_dict(), part.optimizer.state_dict()
    assert sa.keys() == sb.keys() and all(np.array_equal(sa[k], sb[k]) for k in sa)
    assert {k: r.value for k, r in full.model.runtime.act_ranges.items()} == \
           {k: r.value for k, r in part.model.runtime.act_ranges.items()}
    assert resumed.test_accuracy == done.test_accuracy and resumed.test_loss == done.test_loss
    assert resumed.bitops == done.bitops and resumed.percent_of_fp32 == done.percent_of_fp32
    # A model rebuilt from the final checkpoint evaluates exactly as the live one (act ranges restored).
    run = restore_run(load_checkpoint(tmp_path / "full" / f"ckpt-{STEPS:06d}.npz"))
    assert evaluate(run.model, split.test) == evaluate(full.model, split.test)


def test_resuming_a_finished_run_logs_nothing_twice(tmp_path, digits):
    cfg = config(tmp_path, steps=6, eval_every=3)
    first = trainer(cfg, small(digits)).fit()
    before = read_log(first.log)
    again = trainer(cfg, small(digits))
    again.resume(load_checkpoint(first.checkpoint))
    result = again.fit()
    assert read_log(result.log) == before
    assert (result.test_accuracy, result.test_loss) == (first.test_accuracy, first.test_loss)


def test_log_has_one_entry_per_step_and_eval(tmp_path, digits):
    t = trainer(config(tmp_path, schedule="static", bits="6/8", eval_every=8, warmup_steps=4), small(digits))
    result = t.fit()
    log = read_log(result.log)
    steps = [e for e in log if e["type"] == "step"]
    evals = [e for e in log if e["type"] == "eval"]
    assert [e["step"] for e in steps] == list(range(1, STEPS + 1))
    assert [e["step"] for e in evals] == [8, 16, STEPS]
    assert set(steps[0]) == {"type", "step", "loss", "lr", "precision", "bitops", "percent_of_fp32", "time"}
    assert steps[0]["precision"] == "6/8 x4, fp32 x1"
    assert steps[0]["lr"] < steps[4]["lr"] == pytest.approx(0.01)  # linear warm-up, then the base lr
    assert 0 < steps[-1]["percent_of_fp32"] < 100
    assert evals[-1]["accuracy"] == result.test_accuracy
    assert json.loads((tmp_path / "run" / "config.json").read_text())["bits"] == "6/8"


@pytest.mark.parametrize("schedule", ["fp32", "static"])
def test_non_finite_loss_names_the_step(tmp_path, digits, schedule):
    split = small(digits)
    x = split.train.x.copy()
    x[:] = np.nan
    bad = dataclasses.replace(split, train=dataclasses.replace(split.train, x=x))
    with pytest.raises(EdgetrainError, match=r"^step 0: .*(not finite|loss is nan).*diverged"):
        trainer(config(tmp_path, schedule=schedule), bad).fit()


def _changed(before: dict, after: dict) -> set:
    return {k for k in before if not np.array_equal(before[k], after[k])}


@pytest.mark.parametrize("controls, expect", [
    ({"bias_only": True}, {"conv1.bias", "conv2.bias", "fc1.bias", "fc2.bias", "fc3.bias"}),
    ({"train_last": 1}, {"fc3.weight", "fc3.bias"}),
    ({"train_last": 2, "freeze": ["fc3.b*"]}, {"fc2.weight", "fc2.bias", "fc3.weight"}),
    ({"freeze": ["conv*", "fc1.weight"]}, {"fc1.bias", "fc2.weight", "fc2.bias", "fc3.weight", "fc3.bias"}),
])
def test_fine_tuning_controls_choose_what_trains(tmp_path, digits, controls, expect):
    t = trainer(config(tmp_path, steps=3, **controls), small(digits))
    before = t.model.state_dict()
    t.fit()
    assert _changed(before, t.model.state_dict()) == expect


def test_freeze_bn_keeps_running_statistics_and_affine(tmp_path):
    rng = np.random.default_rng(0)
    ds = lambda n: Dataset(rng.standard_normal((n, 1, 8, 8)).astype(np.float32), rng.integers(0, 10, n),
                           10, "synthetic", (0.0,), (1.0,))
    split = Split(ds(64), ds(32))
    path = tmp_path / "resnet8.onnx"
    path.write_bytes(models.build_model("resnet8", in_channels=1, input_size=8).SerializeToString())
    for freeze_bn in (False, True):
        cfg = config(tmp_path, f"bn{freeze_bn}", model=str(path), steps=2, batch_size=16, freeze_bn=freeze_bn)
        t = trainer(cfg, split)
        before = t.model.state_dict()
        t.fit()
        changed = _changed(before, t.model.state_dict())
        bn = {k for k in before if k.startswith("bn") or ".bn" in k}
        assert any("running" in k for k in bn) and any(k.endswith(".weight") for k in bn)
        assert changed & {k for k in bn if "running" in k} if not freeze_bn else not changed & bn
        assert any(k.endswith("conv1.weight") for k in changed)


def test_new_head_replaces_the_classifier(tmp_path, digits):
    proto = onnx.load(MODEL)
    head = new_head(proto, 4, seed=5)
    assert [n.name for n in head.graph.node] == [n.name for n in proto.graph.node]
    w = {t.name: onnx.numpy_helper.to_array(t) for t in head.graph.initializer}
    assert w["fc3.weight"].shape == (4, 84) and w["fc3.bias"].shape == (4,)
    assert np.abs(w["fc3.weight"]).max() <= 1 / np.sqrt(84)
    np.testing.assert_array_equal(w["conv1.weight"], onnx.numpy_helper.to_array(proto.graph.initializer[0]))
    assert head.graph.output[0].type.tensor_type.shape.dim[1].dim_value == 4
    assert new_head(proto, 4, seed=5) == head  # from the seed alone
    sess = ort.InferenceSession(head.SerializeToString(), providers=["CPUExecutionProvider"])
    assert sess.run(None, {"input": digits.test.x[:3]})[0].shape == (3, 4)
    # Four of the ten digit classes, a new head, the rest frozen but for the biases: it still learns the head.
    keep = lambda d: dataclasses.replace(d, x=d.x[d.y < 4], y=d.y[d.y < 4], num_classes=4)
    split = small(dataclasses.replace(digits, train=keep(digits.train), test=keep(digits.test)))
    t = trainer(config(tmp_path, num_classes=4, bias_only=True, steps=30, lr=0.05), split)
    before = t.model.state_dict()
    result = t.fit()
    assert {"fc3.weight", "fc3.bias"} <= _changed(before, t.model.state_dict())
    assert "conv1.weight" not in _changed(before, t.model.state_dict())
    assert result.test_accuracy > 0.5


class SwitchAt:
    """A precision controller as PFQ is one: fp32 first, then 8/8 once `at` steps are done; stateful."""

    def __init__(self, at: int):
        self.at, self.switched = at, 0

    @property
    def precision(self):
        return "8/8" if self.switched else "fp32"

    def on_step(self, step, loss):
        assert np.isfinite(loss)
        if step + 1 >= self.at and not self.switched:
            self.switched = step + 1
            return "8/8"
        return None

    def state_dict(self):
        return {"switched": self.switched, "history": [self.at, None]}  # a list: stored as JSON

    def load_state_dict(self, state):
        assert state["history"] == [self.at, None]
        self.switched = state["switched"]


def test_a_precision_controller_plugs_in_and_is_checkpointed(tmp_path, digits):
    split = small(digits)
    cfg = config(tmp_path, steps=10, checkpoint_every=5)
    t = trainer(cfg, split, controller=SwitchAt(6))
    result = t.fit()
    precisions = [e["precision"] for e in read_log(result.log) if e["type"] == "step"]
    assert precisions == ["fp32 x5"] * 6 + ["8/8 x4, fp32 x1"] * 4
    ckpt = load_checkpoint(result.checkpoint)
    assert ckpt.controller_state["controller/switched"] == 6
    assert json.loads(ckpt.controller_state["controller_json/history"]) == [6, None]
    assert json.loads(ckpt.controller_state["trainer/precision"]) == "8/8"
    # Resumed after the switch, the controller keeps its state and the precision stays 8/8.
    again = trainer(cfg, split, controller=SwitchAt(6))
    again.resume(load_checkpoint(tmp_path / "run" / "ckpt-000005.npz"))
    again.run_dir, again._manager = tmp_path / "again", None
    again.fit()
    a, b = t.model.state_dict(), again.model.state_dict()
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_ctrl_c_checkpoints_between_steps_and_resume_matches(tmp_path, digits, capsys):
    split = small(digits)
    # The trainer must put back whatever handler it found: Python's default in a terminal, SIG_IGN in a
    # process a shell started in the background.
    before = signal.getsignal(signal.SIGINT)

    class InterruptAt(SwitchAt):
        precision = "8/8"

        def on_step(self, step, loss):
            if step == 7:
                signal.raise_signal(signal.SIGINT)  # as a Ctrl-C while step 8 was being finished
            return None

    cfg = config(tmp_path, schedule="static", steps=12)
    t = trainer(cfg, split, controller=InterruptAt(99))
    with pytest.raises(KeyboardInterrupt) as stopped:
        t.fit()
    message = str(stopped.value)  # one line: where it stopped, the checkpoint, how to resume
    assert "stopped at step 8 of 12 (SIGINT)" in message and f"--out {cfg.out} --resume" in message
    again = trainer(cfg, split)
    again.resume(load_checkpoint(tmp_path / "run" / "ckpt-000008.npz"))
    again.fit()
    straight = trainer(dataclasses.replace(cfg, out=str(tmp_path / "straight")), split)
    straight.fit()
    a, b = straight.model.state_dict(), again.model.state_dict()
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert signal.getsignal(signal.SIGINT) is before


def test_config_file_flags_win_and_unknown_keys_are_named(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('model = "m.onnx"\ndata = "digits"\nbatch-size = 16\nepochs = 2\nfreeze = ["conv1.*"]\n'
                    '[precision_overrides]\n"fc1" = "fp32"\n')
    values = read_toml(path)
    assert values["batch_size"] == 16 and values["precision_overrides"] == {"fc1": "fp32"}
    c = resolve({"steps": 5, "batch_size": 8}, values)
    assert (c.steps, c.epochs, c.batch_size, c.freeze) == (5, None, 8, ["conv1.*"])  # a flag's steps replaces epochs
    path.write_text("batchsize = 3\n")
    with pytest.raises(EdgetrainError, match=r"unknown key 'batchsize'; valid keys: model, data, .*batch_size"):
        read_toml(path)
    path.write_text('steps = "ten"\n')
    with pytest.raises(EdgetrainError, match=r"'steps' must be an integer, got 'ten'"):
        read_toml(path)
