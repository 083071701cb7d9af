"""Checkpoints: bit-exact round trip without pickle, atomic writes, clear errors for damaged or foreign
files, latest-good resolution and keep-K rotation."""
from __future__ import annotations

import os
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest

import edgetrain
from edgetrain.errors import EdgetrainError
from edgetrain.fileio import WriteError
from edgetrain.train import checkpoint as ckpt_mod
from edgetrain.train.checkpoint import (
    Checkpoint,
    CheckpointError,
    CheckpointManager,
    CorruptCheckpointWarning,
    file_sha256,
    find_latest,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from edgetrain.train.optim import Adam

FLIP_STRIDE = 11  # ~1,000 positions of the ~11 kB file: every header, member and the directory get hit


def _parts(seed: int = 0, step: int = 100) -> dict:
    rng = np.random.default_rng(seed)
    params = {
        "conv1.weight": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
        "onnx::Gemm_12": rng.standard_normal((5, 2)).astype(np.float32),  # names as exporters write them
        "/layer1/0/conv/bias": rng.standard_normal(4).astype(np.float32),
        "scale [ü]": np.array(1.5, np.float32),
        "f64": rng.standard_normal(3),
    }
    opt = Adam(params, lr=1e-3)
    opt.step({k: rng.standard_normal(v.shape).astype(v.dtype) for k, v in params.items()})
    return {
        "params": params,
        "buffers": {"bn.running_mean": rng.standard_normal(4).astype(np.float32),
                    "bn.num_batches": np.array(7, np.int64)},
        "optimizer_state": opt.state_dict(),
        "controller_state": {"bits": np.array([8, 6, 4], np.uint8), "phase": 2, "threshold": 0.25,
                             "enabled": True, "mode": "dfq", "np_scalar": np.float32(0.1)},
        "rng_state": {"stream": np.arange(40, dtype=np.uint8), "epoch_seed": np.array([3, 1], np.uint64)},
        "meta": {"step": step, "epoch": 3, "seed": 42, "config": {"lr": 1e-3, "milestones": [10, 20],
                                                                    "name": "run-ü", "nested": {"a": None}},
                 "model_sha256": "ab" * 32},
    }


def _assert_same_table(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for k, w in want.items():
        g = got[k]
        assert type(g) is type(w), k
        if isinstance(w, np.ndarray):
            assert g.dtype == w.dtype and g.shape == w.shape, k
            assert g.tobytes() == w.tobytes(), k  # bit for bit, NaN payloads and -0.0 included
        else:
            assert g == w, k


def test_round_trip_is_bit_exact(tmp_path):
    parts = _parts()
    parts["params"]["conv1.weight"].flat[:3] = [np.nan, -0.0, np.inf]
    path = tmp_path / "ckpt-000100.npz"
    save_checkpoint(path, **parts)
    ck = load_checkpoint(path)
    assert isinstance(ck, Checkpoint) and ck.path == path
    for part in ("params", "buffers", "optimizer_state", "controller_state", "rng_state"):
        _assert_same_table(getattr(ck, part), parts[part])
    assert type(ck.optimizer_state["step"]) is int and type(ck.optimizer_state["lr"]) is float
    for k, v in parts["meta"].items():
        assert ck.meta[k] == v
    assert ck.step == 100 and ck.epoch == 3
    assert ck.meta["format_version"] == ckpt_mod.FORMAT_VERSION
    assert ck.meta["created"].endswith("+00:00") and len(ck.meta["sha256"]) == 64
    # Plain NumPy reads it without pickle, and every member is a .npy.
    with np.load(path, allow_pickle=False) as npz:
        assert "param/onnx::Gemm_12" in npz.files and "meta" in npz.files
    with zipfile.ZipFile(path) as zf:
        assert all(n.endswith(".npy") for n in zf.namelist())


def test_resume_through_a_checkpoint_continues_identically(tmp_path):
    import models

    def fresh():
        return edgetrain.load(models.build_model("resnet8", input_size=8, seed=3))

    x = np.random.default_rng(0).standard_normal((4, 3, 8, 8)).astype(np.float32)
    y = np.arange(4) % 10

    def train(model, opt, steps):
        for _ in range(steps):
            _, grads = model.loss_and_grad(x, y)
            opt.step(grads)

    model = fresh()
    opt = Adam(model.parameters(), lr=1e-2, weight_decay=1e-4)
    train(model, opt, 2)
    save_checkpoint(tmp_path / "c.npz", params=model.parameters(), buffers=model.buffers(),
                    optimizer_state=opt.state_dict(), meta={"step": 2})
    train(model, opt, 2)

    ck = load_checkpoint(tmp_path / "c.npz")
    resumed = fresh()
    resumed.load_state_dict({**ck.params, **ck.buffers})
    opt2 = Adam(resumed.parameters(), lr=1e-2, weight_decay=1e-4)
    opt2.load_state_dict(ck.optimizer_state)
    train(resumed, opt2, 2)
    for a, b in zip(model.state_dict().values(), resumed.state_dict().values()):
        np.testing.assert_array_equal(a, b)


def _crash(src, dst):
    raise OSError("simulated power loss")


def test_crash_mid_write_leaves_previous_checkpoint_and_no_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "ckpt-000100.npz"
    save_checkpoint(path, **_parts(step=100))
    good = path.read_bytes()

    monkeypatch.setattr(os, "replace", _crash)
    with pytest.raises(WriteError, match="simulated"):  # an OSError reaches the user as one line
        save_checkpoint(path, **_parts(seed=1, step=200))
    monkeypatch.undo()
    assert path.read_bytes() == good
    assert load_checkpoint(path).step == 100
    assert sorted(os.listdir(tmp_path)) == ["ckpt-000100.npz"]


def test_manager_crash_keeps_last_good_and_cleans_stale_temp(tmp_path, monkeypatch):
    mgr = CheckpointManager(tmp_path, keep=1)
    mgr.save(100, **{k: v for k, v in _parts().items() if k != "meta"})
    monkeypatch.setattr(os, "replace", _crash)
    with pytest.raises(WriteError, match="simulated"):  # an OSError reaches the user as one line
        mgr.save(200, **{k: v for k, v in _parts().items() if k != "meta"})
    monkeypatch.undo()
    assert find_latest(tmp_path).step == 100
    stale = tmp_path / ".ckpt-000300.npz.abc123.tmp"  # what a killed writer leaves behind
    stale.write_bytes(b"partial")
    CheckpointManager(tmp_path)
    assert not stale.exists()
    assert list_checkpoints(tmp_path) == [(100, tmp_path / "ckpt-000100.npz")]


def _saved(tmp_path: Path, name: str = "ckpt-000100.npz") -> Path:
    path = tmp_path / name
    save_checkpoint(path, **_parts())
    return path


@pytest.mark.parametrize("keep", [0.0, 0.5, 0.9, 0.999])
def test_truncated_file(tmp_path, keep):
    path = _saved(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])
    with pytest.raises(CheckpointError, match=f"^{re.escape(str(path))}: .*(truncated|corrupt)"):
        load_checkpoint(path)


def test_flipped_byte_in_array_data_fails_the_check(tmp_path):
    path = _saved(tmp_path)
    data = bytearray(path.read_bytes())
    at = data.find(_parts()["params"]["conv1.weight"].tobytes())
    assert at > 0
    at += 17
    data[at] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"^{re.escape(str(path))}: .*corrupt"):
        load_checkpoint(path)


def test_sha256_catches_what_the_zip_crc_does_not(tmp_path):
    """Rewrite a member with valid zip CRCs but changed data: only our digest notices."""
    src = _saved(tmp_path)
    dst = tmp_path / "tampered.npz"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename == "param/conv1.weight.npy":
                data = data[:-1] + bytes([data[-1] ^ 0x01])
            zout.writestr(info, data)
    with pytest.raises(CheckpointError, match="SHA-256 mismatch"):
        load_checkpoint(dst)


def test_every_flipped_byte_is_caught_or_harmless(tmp_path):
    """Anywhere in the file, a flipped bit gives CheckpointError or (zip fields nobody reads) the same data."""
    path = _saved(tmp_path)
    good = path.read_bytes()
    want = load_checkpoint(path)
    for i in range(0, len(good), FLIP_STRIDE):
        bad = bytearray(good)
        bad[i] ^= 0x04
        path.write_bytes(bytes(bad))
        try:
            got = load_checkpoint(path)
        except CheckpointError as exc:
            assert str(exc).startswith(str(path)), exc
            continue
        assert got.meta == want.meta, i
        for part in ("params", "buffers", "optimizer_state", "controller_state", "rng_state"):
            _assert_same_table(getattr(got, part), getattr(want, part))


def test_wrong_format_version(tmp_path, monkeypatch):
    monkeypatch.setattr(ckpt_mod, "FORMAT_VERSION", ckpt_mod.FORMAT_VERSION + 1)
    path = _saved(tmp_path)
    monkeypatch.undo()
    expected = "checkpoint format version 2; this edgetrain reads version 1"
    with pytest.raises(CheckpointError, match=f"^{re.escape(str(path))}: {expected}"):
        load_checkpoint(path)


def test_object_array_is_refused_without_unpickling(tmp_path):
    path = tmp_path / "evil.npz"
    np.savez(path, meta=np.zeros(3, np.uint8), **{"param/w": np.array([{"x": 1}, None], dtype=object)})
    with pytest.raises(CheckpointError, match=f"^{re.escape(str(path))}: entry 'param/w.npy' is an object array"):
        load_checkpoint(path)
    with pytest.raises(EdgetrainError, match="object arrays need pickle"):
        save_checkpoint(tmp_path / "x.npz", params={"w": np.array([1, "a"], dtype=object)}, buffers={},
                        meta={"step": 0})


def test_non_npy_member_is_refused(tmp_path):
    path = _saved(tmp_path)
    with zipfile.ZipFile(path, "a") as zf:
        zf.writestr("payload.pkl", b"\x80\x04.")
    with pytest.raises(CheckpointError, match=f"^{re.escape(str(path))}: .*member 'payload.pkl' is not a .npy array"):
        load_checkpoint(path)


@pytest.mark.parametrize("content, match", [
    (None, "not an edgetrain checkpoint .no 'meta' entry"),
    (b"", "not a readable checkpoint"),
    (b"just some text, not a zip", "not a readable checkpoint"),
])
def test_foreign_files(tmp_path, content, match):
    path = tmp_path / "other.npz"
    if content is None:
        np.savez(path, weights=np.arange(3))
    else:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=f"^{re.escape(str(path))}: {match}"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        load_checkpoint(tmp_path / "missing.npz")


@pytest.mark.parametrize("meta, match", [
    ({}, "'step': expected an integer >= 0"),
    ({"step": 1, "lr": 0.1}, r"unknown field\(s\) lr; valid: step, epoch, seed, config, model_sha256, preprocess"),
    ({"step": 1, "config": {"x": object()}}, "'config': not JSON-serialisable"),
    ({"step": 1, "config": {"x": float("nan")}}, "'config': not JSON-serialisable"),
    ({"step": 1, "model_sha256": "abc"}, "'model_sha256': expected 64 lowercase hex digits"),
])
def test_bad_meta_is_refused_before_writing(tmp_path, meta, match):
    with pytest.raises(CheckpointError, match=match):
        save_checkpoint(tmp_path / "c.npz", params={}, buffers={}, meta=meta)
    assert os.listdir(tmp_path) == []


def test_model_hash_check(tmp_path):
    model = tmp_path / "m.onnx"
    model.write_bytes(b"model bytes")
    path = tmp_path / "c.npz"
    save_checkpoint(path, params={}, buffers={}, meta={"step": 1, "model_sha256": file_sha256(model)})
    ck = load_checkpoint(path)
    ck.check_model(model)
    model.write_bytes(b"another model")
    with pytest.raises(CheckpointError, match="saved for a model file with SHA-256"):
        ck.check_model(model)


def test_find_latest_skips_corrupt_newest(tmp_path):
    mgr = CheckpointManager(tmp_path, keep=5)
    parts = {k: v for k, v in _parts().items() if k != "meta"}
    for step in (100, 200, 300):
        mgr.save(step, **parts, meta={"epoch": step // 100})
    newest = tmp_path / "ckpt-000300.npz"
    newest.write_bytes(newest.read_bytes()[:-40])
    with pytest.warns(CorruptCheckpointWarning, match="ckpt-000300.npz"):
        latest = find_latest(tmp_path)
    assert latest.step == 200 and latest.epoch == 2 and latest.path == tmp_path / "ckpt-000200.npz"
    (tmp_path / "empty").mkdir()
    assert find_latest(tmp_path / "empty") is None
    with pytest.raises(CheckpointError, match="no such run folder"):
        find_latest(tmp_path / "nope")


def test_keep_k_pruning_and_names(tmp_path):
    mgr = CheckpointManager(tmp_path / "run", keep=2, every=100)
    parts = {k: v for k, v in _parts().items() if k != "meta"}
    saved = [mgr.save(step, **parts) for step in range(0, 1001) if mgr.should_save(step, final=step == 1000)]
    assert [p.name for p in saved] == [f"ckpt-{s:06d}.npz" for s in range(100, 1001, 100)]
    assert sorted(os.listdir(tmp_path / "run")) == ["ckpt-000900.npz", "ckpt-001000.npz"]
    assert find_latest(tmp_path / "run").step == 1000
    assert mgr.should_save(1234, final=True) and not mgr.should_save(150)
    with pytest.raises(CheckpointError, match="differs from the step saved"):
        mgr.save(1100, **parts, meta={"step": 5})
    with pytest.raises(CheckpointError, match="keep: expected an integer >= 1"):
        CheckpointManager(tmp_path, keep=0)
