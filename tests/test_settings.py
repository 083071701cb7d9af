"""Each training setting is written once (a TrainConfig field); the CLI, the config file and `info` follow it."""
import argparse
import dataclasses
import io

import numpy as np
import pytest

from edgetrain.cli.main import build_parser
from edgetrain.data.npzfile import MISSING, OBJECT, SINGLE_NPY, SIZE, TOO_LARGE, UNREADABLE, NpzError, read_npz
from edgetrain.errors import EdgetrainError
from edgetrain.precision import fractrain, pfq
from edgetrain.precision.dfq import config as dfq
from edgetrain.train.config import (
    FIELDS,
    FILE_ONLY,
    POSITIONAL,
    TrainConfig,
    changed_settings,
    dfq_config,
    help_text,
    read_toml,
    resolve,
)
from edgetrain.train.loop import TrainStep


def _train_parser() -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["train"]


def test_every_setting_has_help_and_a_kind():
    for name, f in FIELDS.items():
        assert f.metadata["help"] and f.metadata["kind"], name


def test_the_train_parser_has_every_flag_setting_with_its_help():
    train = _train_parser()
    help_of = {a.dest: a.help for a in train._actions}
    for name, f in FIELDS.items():
        if f.metadata["cli"] == FILE_ONLY:
            assert name not in help_of and name in train.epilog
        else:
            assert help_of[name].replace("%%", "%") == help_text(name)
    flags = {s for a in train._actions for s in a.option_strings}
    assert {"--batch-size", "--pfq-normaliser-periods", "--dfq-cost-table", "--fractrain-targets", "--freeze",
            "--resume", "--config", "--json"} <= flags
    for name, f in FIELDS.items():  # a flag keeps its field's name, dashed
        assert f.metadata["cli"] in (FILE_ONLY, POSITIONAL) or "--" + name.replace("_", "-") in flags, name


def test_flags_parse_to_field_values():
    args = _train_parser().parse_args(["m.onnx", "--steps", "5", "--freeze", "a", "--freeze", "b", "--bias-only",
                                       "--pfq-stages", "3/6,8/8", "--fractrain-targets", "1,2.5", "--lr", "0.5"])
    given = {k: v for k, v in vars(args).items() if k in FIELDS}
    assert given == {"model": "m.onnx", "steps": 5, "freeze": ["a", "b"], "bias_only": True,
                     "pfq_stages": ["3/6", "8/8"], "fractrain_targets": [1.0, 2.5], "lr": 0.5}
    with pytest.raises(EdgetrainError, match="not allowed with"):
        _train_parser().parse_args(["--steps", "5", "--epochs", "1"])


def test_defaults_are_the_modules_own():
    c = TrainConfig()
    assert (c.pfq_period, c.pfq_eps, c.pfq_window) == (pfq.DEFAULT_PERIOD, pfq.DEFAULT_EPS, pfq.DEFAULT_WINDOW)
    assert (c.dfq_weight_bits, c.dfq_target, c.dfq_beta, c.dfq_ungated) == (
        dfq.DEFAULT_WEIGHT_BITS, dfq.DEFAULT_TARGET, dfq.DEFAULT_BETA, dfq.DEFAULT_UNGATED)
    assert help_text("dfq_candidates").endswith(f"(default {','.join(dfq.DEFAULT_CANDIDATES)})")
    made = dfq_config(TrainConfig(schedule="fractrain"))
    assert made.candidates == dfq.DEFAULT_CANDIDATES and made.target == fractrain.DEFAULT_TARGETS[0]
    assert TrainConfig(schedule="pfq").precision_spec == pfq.DEFAULT_STAGES[0]


@pytest.mark.parametrize("text, message", [
    ("pfq_window = 0", "option 'pfq_window' must be at least 1, got 0"),
    ("dfq_beta = -1.0", "option 'dfq_beta' must be a finite number >= 0, got -1.0"),
    ("optimizer = 'rmsprop'", "option 'optimizer' 'rmsprop' is unknown; valid: sgd, adam, adamw"),
    ("seed = -2", "option 'seed' must be >= 0, got -2"),
    ("num_classes = 1", "option 'num_classes' must be at least 2, got 1"),
])
def test_file_values_meet_the_same_bounds_as_flags(tmp_path, text, message):
    path = tmp_path / "c.toml"
    path.write_text(text + "\n")
    with pytest.raises(EdgetrainError) as info:
        resolve({}, read_toml(path))
    assert str(info.value) == message


def test_dfq_weight_bits_are_checked_by_dfq():
    with pytest.raises(EdgetrainError, match="'dfq_weight_bits' must be in 2..16, got 1"):
        dfq.DFQConfig(weight_bits=1).check()
    assert [c.text for c in dfq.DFQConfig().check()] == ["skip", "3/6", "4/6", "4/8", "6/8", "6/12"]


def test_changed_settings_are_what_a_run_chose():
    assert changed_settings(TrainConfig()) == {}
    assert changed_settings(TrainConfig(lr=0.5, freeze=["a"], schedule="dfq")) == {
        "schedule": "dfq", "lr": 0.5, "freeze": ["a"]}
    assert all(dataclasses.asdict(TrainConfig())[k] is not None or FIELDS[k].default is None for k in FIELDS)


# -- the one training step ------------------------------------------------------------------------------------
class _Model:
    def __init__(self):
        self.step, self.calls = 0, []

    def loss_and_grad(self, x, y, label_smoothing=0.0, update_buffers=True):
        self.calls.append(("loss_and_grad", self.step, label_smoothing, update_buffers))
        return float(x.sum()), {"w": np.ones(1)}


class _Optimizer:
    def __init__(self, log):
        self.lr, self.log = 0.0, log

    def step(self, grads):
        self.log.append(("step", self.lr))


def test_train_step_numbers_sets_lr_checks_then_steps():
    model = _Model()
    checked = []
    train_step = TrainStep(model, _Optimizer(model.calls), lambda s: 0.1 * s, label_smoothing=0.2,
                           update_buffers=False, check=lambda s, loss, g: checked.append((s, loss)))
    assert train_step(7, np.ones(3), np.zeros(3)) == 3.0
    assert model.step == 7 and checked == [(7, 3.0)]
    assert model.calls == [("loss_and_grad", 7, 0.2, False), ("step", pytest.approx(0.7))]


def test_a_failed_check_stops_before_the_update():
    model = _Model()

    def refuse(step, loss, grads):
        raise EdgetrainError("no")

    with pytest.raises(EdgetrainError):
        TrainStep(model, _Optimizer(model.calls), check=refuse)(0, np.ones(1), np.zeros(1))
    assert [c[0] for c in model.calls] == ["loss_and_grad"]


# -- the one npz reader ---------------------------------------------------------------------------------------
def _blob(**arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def test_read_npz_reads_required_and_present_optional(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, x=np.arange(4), y=np.ones(2), extra=np.zeros(1))
    got = read_npz(path, ("x",), ("y", "z"))
    assert list(got) == ["x", "y"] and np.array_equal(got["x"], np.arange(4))
    assert sorted(read_npz(path)) == ["extra", "x", "y"]
    assert list(read_npz(_blob(x=np.arange(3)), ("x",))) == ["x"]


def _kind(source, *args, **kwargs) -> NpzError:
    with pytest.raises(NpzError) as info:
        read_npz(source, *args, **kwargs)
    return info.value


def test_read_npz_refusals():
    assert _kind(_blob(x=np.zeros(2)), ("x", "y")).kind == MISSING
    assert _kind(_blob(x=np.array([{"a": 1}], dtype=object)), ("x",)).kind == OBJECT
    assert _kind(_blob(x=np.zeros(100)), ("x",), max_member_bytes=64).kind == TOO_LARGE
    assert _kind(b"not an archive", ("x",)).kind == UNREADABLE
    npy = io.BytesIO()
    np.save(npy, np.zeros(3))
    assert _kind(npy.getvalue()).kind == SINGLE_NPY


def test_read_npz_refuses_a_member_shorter_than_its_header(tmp_path):
    import zipfile

    path = tmp_path / "short.npz"
    whole = io.BytesIO()
    np.save(whole, np.zeros(100))
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("x.npy", whole.getvalue()[:-8])
    error = _kind(path, ("x",))
    assert error.kind == SIZE and error.member == "x.npy"


@pytest.mark.parametrize("text, message", [
    ("schedule = 'dfq'\nfractrain_floors = [0.5, 0.5, 0.5, 0.5]",
     "option 'fractrain_floors' only --schedule fractrain steps through floors, not dfq"),
    ("schedule = 'fractrain'\nfractrain_floors = [0.5, 1.0]", "option 'fractrain_floors' 2 floors for 4 targets"),
    ("schedule = 'fractrain'\nfractrain_targets = [1.0, 2.0]\nfractrain_floors = [0.5, 1.5]",
     "option 'fractrain_floors' [0.5, 1.5]: each must be a share in [0, 1]"),
])
def test_fractrain_floors_are_one_share_per_target(tmp_path, text, message):
    path = tmp_path / "c.toml"
    path.write_text(text + "\n")
    with pytest.raises(EdgetrainError, match=message.replace("[", r"\[").replace("]", r"\]")):
        resolve({}, read_toml(path))
    ok = tmp_path / "ok.toml"
    ok.write_text("schedule = 'fractrain'\nfractrain_targets = [1.0, 2.0]\nfractrain_floors = [0.75, 0.5]\n")
    assert resolve({}, read_toml(ok)).fractrain_floors == [0.75, 0.5]
