"""Optimizers track torch.optim to float32 rounding, restore exactly from a state dict and honour frozen
parameters; schedules give the hand-computed values and torch.optim.lr_scheduler's."""
from __future__ import annotations

import math

import numpy as np
import pytest

from edgetrain.errors import EdgetrainError
from edgetrain.train.optim import SGD, Adam, AdamW, OptimizerError, make_optimizer
from edgetrain.train.schedules import Constant, Cosine, LinearWarmup, StepDecay, make_schedule

SHAPES = {"conv.weight": (4, 3, 3, 3), "conv.bias": (4,), "fc.weight": (10, 36), "fc.bias": (10,)}
TORCH_STEPS = 20
TORCH_RTOL = 1e-6  # float32: torch fuses multiply-adds, NumPy rounds twice; the drift stays near 1e-7
CASES = [
    (SGD, {"lr": 0.1}),
    (SGD, {"lr": 0.05, "momentum": 0.9}),
    (SGD, {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-2}),
    (SGD, {"lr": 0.05, "momentum": 0.9, "nesterov": True}),
    (SGD, {"lr": 0.05, "momentum": 0.8, "nesterov": True, "weight_decay": 5e-2}),
    (SGD, {"lr": 0.1, "weight_decay": 1e-1}),
    (Adam, {"lr": 1e-2}),
    (Adam, {"lr": 1e-2, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 1e-1}),
    (Adam, {"lr": 1e-2, "betas": (0.3, 0.9)}),  # lerp's other branch (weight >= 0.5)
    (AdamW, {"lr": 1e-2}),
    (AdamW, {"lr": 1e-2, "betas": (0.85, 0.995), "weight_decay": 0.3}),
]


def _params(seed: int, dtype=np.float32) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(dtype) for k, s in SHAPES.items()}


def _grads(seed: int, steps: int, dtype=np.float32) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng([seed, 1])
    return [{k: rng.standard_normal(s).astype(dtype) for k, s in SHAPES.items()} for _ in range(steps)]


def _lr(base: float, i: int) -> float:
    """A moving lr, so the comparison covers lr changes between steps as schedules make them."""
    return base * (1 + 0.5 * math.sin(i))


def _case_id(case) -> str:
    cls, kw = case
    return "-".join([cls.__name__, *(f"{k}={v}" for k, v in kw.items() if k != "lr")])


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_matches_torch(case):
    torch = pytest.importorskip("torch")
    cls, kw = case
    ours = _params(0)
    theirs = {k: torch.nn.Parameter(torch.from_numpy(v.copy())) for k, v in ours.items()}
    opt = cls(ours, **kw)
    topt = getattr(torch.optim, cls.__name__)(list(theirs.values()), **kw)
    for i, grads in enumerate(_grads(0, TORCH_STEPS)):
        opt.lr = _lr(kw["lr"], i)
        for group in topt.param_groups:
            group["lr"] = _lr(kw["lr"], i)
        opt.step(grads)
        for k, t in theirs.items():
            t.grad = torch.from_numpy(grads[k].copy())
        topt.step()
    for k, t in theirs.items():
        ref = t.detach().numpy()
        assert ours[k].dtype == np.float32
        err = np.abs(ours[k] - ref).max() / np.abs(ref).max()
        assert err < TORCH_RTOL, (k, err)
        np.testing.assert_allclose(ours[k], ref, rtol=TORCH_RTOL, atol=TORCH_RTOL * np.abs(ref).max())


@pytest.mark.parametrize("case", CASES[1::2], ids=[_case_id(c) for c in CASES[1::2]])
def test_state_dict_round_trip_continues_identically(case):
    cls, kw = case
    grads = _grads(1, 12)
    a = _params(1)
    opt_a = cls(a, **kw)
    for g in grads[:6]:
        opt_a.step(g)
    state = opt_a.state_dict()
    snapshot = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in state.items()}
    b = {k: v.copy() for k, v in a.items()}
    opt_b = cls(b, **{**kw, "lr": 123.0})  # lr comes back from the state
    opt_b.load_state_dict(state)
    assert opt_b.lr == opt_a.lr and opt_b.num_steps == opt_a.num_steps == 6
    for g in grads[6:]:
        opt_a.step(g)
        opt_b.step(g)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    # Both optimizers own their state: stepping them did not touch the dict that moved between them.
    assert state.keys() == snapshot.keys()
    assert all(np.array_equal(state[k], snapshot[k]) for k in state)


def test_state_dict_layout():
    params = _params(2)
    opt = Adam(params, lr=1e-3, frozen="fc.*")
    opt.step(_grads(2, 1)[0])
    state = opt.state_dict()
    assert state["step"] == 1 and isinstance(state["step"], int)
    assert state["lr"] == 1e-3
    assert set(state) == {"step", "lr", *(f"{kind}/{name}" for kind in ("exp_avg", "exp_avg_sq", "param_step")
                                          for name in ("conv.weight", "conv.bias"))}
    assert state["exp_avg/conv.weight"].dtype == np.float32
    assert state["param_step/conv.bias"] == 1
    sgd = SGD(_params(2), 0.1, momentum=0.9)
    sgd.step(_grads(2, 1)[0])
    assert {k.split("/")[0] for k in sgd.state_dict()} == {"step", "lr", "momentum_buffer"}


def test_load_state_dict_rejects_foreign_state():
    params = _params(3)
    adam = Adam(params, lr=1e-3)
    adam.step(_grads(3, 1)[0])
    sgd = SGD(_params(3), 0.1, momentum=0.9)
    with pytest.raises(EdgetrainError, match="unexpected key 'exp_avg/"):
        sgd.load_state_dict(adam.state_dict())
    bad = adam.state_dict()
    bad["exp_avg/fc.bias"] = np.zeros(3, np.float32)
    with pytest.raises(EdgetrainError, match=r"'exp_avg/fc.bias' has shape \(3,\)"):
        Adam(_params(3)).load_state_dict(bad)
    bad = adam.state_dict()
    bad["exp_avg/nope"] = bad.pop("exp_avg/fc.bias")
    with pytest.raises(EdgetrainError, match="names no parameter"):
        Adam(_params(3)).load_state_dict(bad)
    bad = adam.state_dict()
    del bad["exp_avg_sq/fc.bias"]
    with pytest.raises(EdgetrainError, match="same parameters"):
        Adam(_params(3)).load_state_dict(bad)
    with pytest.raises(EdgetrainError, match="no 'step'"):
        Adam(_params(3)).load_state_dict({})


@pytest.mark.parametrize("cls", [SGD, Adam, AdamW])
def test_frozen_parameters_stay_unchanged(cls):
    params = _params(4)
    before = {k: v.copy() for k, v in params.items()}
    opt = cls(params, lr=0.1, weight_decay=0.1, frozen={"conv.weight", "fc.*"})
    assert opt.frozen == {"conv.weight", "fc.weight", "fc.bias"}
    for g in _grads(4, 3):
        opt.step(g)
    for k in ("conv.weight", "fc.weight", "fc.bias"):
        np.testing.assert_array_equal(params[k], before[k])
    assert not np.array_equal(params["conv.bias"], before["conv.bias"])
    assert all("fc." not in k for k in opt.state_dict())  # no state for what never moves


def test_bias_only_and_filters():
    params = _params(5)
    before = {k: v.copy() for k, v in params.items()}
    opt = SGD(params, 0.1, trainable="*.bias")  # BitFit: biases only
    assert opt.trainable_names() == ["conv.bias", "fc.bias"]
    opt.step(_grads(5, 1)[0])
    assert np.array_equal(params["fc.weight"], before["fc.weight"])
    assert not np.array_equal(params["fc.bias"], before["fc.bias"])
    opt = SGD(params, 0.1, trainable=lambda name: name.startswith("fc."))
    assert opt.frozen == {"conv.weight", "conv.bias"}
    assert opt.unfreeze("conv.*") == {"conv.weight", "conv.bias"} and not opt.frozen
    assert opt.freeze("fc.weight") == {"fc.weight"}
    with pytest.raises(EdgetrainError, match="pattern 'fc.wieght' matches no parameter"):
        SGD(params, 0.1, frozen=["fc.wieght"])
    with pytest.raises(EdgetrainError, match="trainable pattern"):
        SGD(params, 0.1, trainable=["nothing.*"])


def test_unfrozen_adam_parameter_starts_its_own_bias_correction():
    """A parameter unfrozen later gets torch's first-step update, not one scaled for the global step."""
    params, fresh = _params(6), _params(6)
    grads = _grads(6, 4)
    opt = Adam(params, lr=1e-2, frozen="fc.bias")
    for g in grads[:3]:
        opt.step(g)
    opt.unfreeze("fc.bias")
    opt.step(grads[3])
    ref = Adam({"fc.bias": fresh["fc.bias"]}, lr=1e-2)
    ref.step({"fc.bias": grads[3]["fc.bias"]})
    np.testing.assert_array_equal(params["fc.bias"], fresh["fc.bias"])


@pytest.mark.parametrize("cls", [SGD, Adam, AdamW])
def test_dtype_is_kept_and_runs_are_deterministic(cls):
    runs = []
    for _ in range(2):
        params = _params(7, np.float64)
        opt = cls(params, lr=0.01, weight_decay=0.01)
        for g in _grads(7, 3, np.float64):
            opt.step(g)
        assert all(v.dtype == np.float64 for v in params.values())
        assert all(v.dtype == np.float64 for v in opt.state_dict().values() if isinstance(v, np.ndarray))
        runs.append(params)
    for k in SHAPES:
        np.testing.assert_array_equal(runs[0][k], runs[1][k])
    params = _params(7)
    opt = cls(params, lr=np.float64(0.01))  # a NumPy float64 lr must not promote the update
    opt.lr = np.float64(0.02)
    opt.step(_grads(7, 1)[0])
    assert all(v.dtype == np.float32 for v in params.values())
    assert all(v.dtype == np.float32 for v in opt.state_dict().values() if isinstance(v, np.ndarray))


def test_sgd_keeps_its_old_interface():
    params = _params(8)
    opt = SGD(params, 0.1, 0.9, True, 1e-4)  # positional, as callers used it
    g = _grads(8, 1)[0]
    opt.step(g)
    assert set(opt.velocity) == set(SHAPES)
    opt.step({"fc.bias": g["fc.bias"]})  # parameters without a gradient are left alone
    with pytest.raises(ValueError):
        SGD(params, 0.0)


def test_missing_gradient_and_shape_mismatch():
    params = _params(9)
    with pytest.raises(EdgetrainError, match="gradient of 'fc.bias' has shape"):
        SGD(params, 0.1).step({"fc.bias": np.zeros(3, np.float32)})


@pytest.mark.parametrize("make, match", [
    (lambda p: SGD(p, -1.0), "learning rate must be positive"),
    (lambda p: SGD(p, float("nan")), "lr must be finite"),
    (lambda p: SGD(p, 0.1, momentum=1.5), r"momentum must be in \[0, 1\)"),
    (lambda p: SGD(p, 0.1, nesterov=True), "nesterov needs a momentum"),
    (lambda p: SGD(p, 0.1, weight_decay=-1), "weight_decay must be >= 0"),
    (lambda p: Adam(p, betas=(0.9, 1.0)), r"betas\[1\] must be in \[0, 1\)"),
    (lambda p: Adam(p, betas=0.9), "betas must be a pair"),
    (lambda p: AdamW(p, eps=-1e-8), "eps must be >= 0"),
    (lambda p: SGD([1, 2], 0.1), "params must be a dict"),
    (lambda p: make_optimizer("adagrad", p, 0.1), "valid: adam, adamw, sgd"),
    (lambda p: make_optimizer("adam", p, 0.1, momentum=0.9), "unknown option.*momentum.*valid: betas"),
])
def test_bad_hyperparameters(make, match):
    with pytest.raises(EdgetrainError, match=match):
        make(_params(10))


def test_lr_setter():
    opt = make_optimizer("AdamW", _params(11), 1e-3, weight_decay=0.0)
    assert isinstance(opt, AdamW)
    opt.lr = 0  # schedules may reach zero
    assert opt.lr == 0.0 and type(opt.lr) is float
    with pytest.raises(OptimizerError, match="lr must be >= 0"):
        opt.lr = -0.1


# -- schedules ------------------------------------------------------------------------------------
def test_schedules_hand_values():
    assert [Constant(0.1)(s) for s in (0, 5, 10 ** 6)] == [0.1] * 3
    step = make_schedule("step", 0.1, 100, milestones=[3, 6], gamma=0.5)
    assert step == StepDecay(0.1, (3, 6), 0.5)
    assert [step(s) for s in range(8)] == pytest.approx([0.1] * 3 + [0.05] * 3 + [0.025] * 2, rel=1e-15)
    cos = make_schedule("cosine", 1.0, 4, min_lr=0.1)
    assert [cos(s) for s in (0, 1, 2, 3, 4, 5, 100)] == pytest.approx(
        [1.0, 0.1 + 0.9 * (1 + math.sqrt(0.5)) / 2, 0.55, 0.1 + 0.9 * (1 - math.sqrt(0.5)) / 2, 0.1, 0.1, 0.1],
        rel=1e-12)
    warm = make_schedule("constant", 1.0, 10, warmup_steps=4, warmup_start_factor=0.25)
    assert [warm(s) for s in range(6)] == pytest.approx([0.25, 0.4375, 0.625, 0.8125, 1.0, 1.0], rel=1e-15)
    warm_step = make_schedule("step", 0.2, 10, milestones=[2], warmup_steps=4, warmup_start_factor=0.0)
    assert isinstance(warm_step, LinearWarmup)
    assert [warm_step(s) for s in range(5)] == pytest.approx([0.0, 0.05, 0.01, 0.015, 0.02], rel=1e-12)
    with pytest.raises(ValueError):
        cos(-1)


def _torch_lrs(torch, make_scheduler, base_lr: float, steps: int) -> list[float]:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base_lr)
    sched = make_scheduler(opt)
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def test_schedules_match_torch():
    torch = pytest.importorskip("torch")
    lr_sched = torch.optim.lr_scheduler
    total = 50
    cases = [
        (make_schedule("step", 0.1, total, milestones=[10, 25, 40], gamma=0.3),
         lambda o: lr_sched.MultiStepLR(o, milestones=[10, 25, 40], gamma=0.3)),
        (make_schedule("cosine", 0.1, total, min_lr=1e-3),
         lambda o: lr_sched.CosineAnnealingLR(o, T_max=total, eta_min=1e-3)),
        (make_schedule("constant", 0.1, total, warmup_steps=8, warmup_start_factor=0.2),
         lambda o: lr_sched.LinearLR(o, start_factor=0.2, total_iters=8)),
        (make_schedule("step", 0.1, total, milestones=[5, 30], gamma=0.5, warmup_steps=10),
         lambda o: lr_sched.ChainedScheduler([lr_sched.LinearLR(o, start_factor=0.1, total_iters=10),
                                              lr_sched.MultiStepLR(o, milestones=[5, 30], gamma=0.5)])),
        (make_schedule("cosine", 0.1, total, warmup_steps=5, warmup_start_factor=0.5),
         lambda o: lr_sched.ChainedScheduler([lr_sched.LinearLR(o, start_factor=0.5, total_iters=5),
                                              lr_sched.CosineAnnealingLR(o, T_max=total)])),
    ]
    for ours, theirs in cases:
        expected = _torch_lrs(torch, theirs, 0.1, total + 1)
        assert [ours(s) for s in range(total + 1)] == pytest.approx(expected, rel=1e-9, abs=1e-15), ours


def test_schedule_is_a_pure_function_of_the_step():
    sched = make_schedule("cosine", 0.5, 100, warmup_steps=10)
    forward = [sched(s) for s in range(100)]
    assert [sched(s) for s in reversed(range(100))] == forward[::-1]
    assert make_schedule("cosine", 0.5, 100, warmup_steps=10)(37) == forward[37]
    assert isinstance(sched, LinearWarmup) and isinstance(sched.inner, Cosine)


@pytest.mark.parametrize("name, opts, match", [
    ("cosin", {}, "schedule 'cosin': unknown name; valid: constant, step, cosine"),
    ("cosine", {"eta_min": 0.0}, "unknown option.*eta_min; valid: min_lr, warmup_steps, warmup_start_factor"),
    ("step", {}, "missing option.*milestones"),
    ("step", {"milestones": [5, 5]}, "strictly increasing"),
    ("step", {"milestones": "10,20"}, "list of step numbers"),
    ("step", {"milestones": [0]}, "milestones must be >= 1"),
    ("step", {"milestones": [10], "gamma": 2}, r"gamma must be in \(0, 1\]"),
    ("cosine", {"min_lr": 1.0}, r"min_lr must be in \[0, 0.1\]"),
    ("constant", {"warmup_steps": 200}, "warmup_steps .200. must not exceed total_steps .100."),
    ("constant", {"warmup_steps": 2.5}, "warmup_steps must be an integer"),
    ("constant", {"warmup_steps": 5, "warmup_start_factor": -0.1}, "warmup_start_factor must be in"),
])
def test_schedule_errors(name, opts, match):
    with pytest.raises(EdgetrainError, match=match):
        make_schedule(name, 0.1, 100, **opts)


def test_schedule_base_values_are_checked():
    with pytest.raises(EdgetrainError, match="base_lr"):
        make_schedule("constant", 0.0, 100)
    with pytest.raises(EdgetrainError, match="total_steps must be >= 1"):
        make_schedule("constant", 0.1, 0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("weight_decay,nesterov", [(0.0, False), (5e-4, False), (1e-2, True)])
def test_fused_sgd_gives_the_numpy_expressions_bits(monkeypatch, dtype, weight_decay, nesterov):
    """The one-pass Numba SGD update against the NumPy one it replaces, bit for bit over several steps
    (a fused multiply-add or a float64 scalar would change the last bits). "big" takes the parallel
    branch: more than one work item, the last one short."""
    import edgetrain.train.optim as optim
    from edgetrain.kernels.threads import ELEMENT_CHUNK, SMALL_ELEMENTS

    rng = np.random.default_rng(3)
    start = {"w": rng.standard_normal((40, 33)).astype(dtype), "b": rng.standard_normal(7).astype(dtype),
             "big": rng.standard_normal(SMALL_ELEMENTS + 3 * ELEMENT_CHUNK + 5).astype(dtype)}
    fused = SGD({k: v.copy() for k, v in start.items()}, 0.05, momentum=0.9, nesterov=nesterov,
                weight_decay=weight_decay)
    plain = SGD({k: v.copy() for k, v in start.items()}, 0.05, momentum=0.9, nesterov=nesterov,
                weight_decay=weight_decay)
    fusable = optim._fusable
    for _ in range(4):
        grads = {k: rng.standard_normal(v.shape).astype(dtype) for k, v in start.items()}
        fused.step(grads)
        monkeypatch.setattr(optim, "_fusable", lambda p, g: False)
        plain.step(grads)
        monkeypatch.setattr(optim, "_fusable", fusable)
    for k in start:
        assert np.array_equal(fused.params[k], plain.params[k]) and not np.array_equal(fused.params[k], start[k])
        assert np.array_equal(fused.velocity[k], plain.velocity[k])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cls,opts", [
    (Adam, {}),
    (Adam, {"betas": (0.8, 0.99), "eps": 0.0, "weight_decay": 1e-1}),
    (Adam, {"betas": (0.3, 0.9)}),  # lerp's other branch (weight >= 0.5)
    (AdamW, {"betas": (0.85, 0.995), "weight_decay": 0.3}),
])
def test_fused_adam_gives_the_numpy_expressions_bits(monkeypatch, dtype, cls, opts):
    """The one-pass Numba Adam and AdamW update against the NumPy expressions it replaces, bit for bit
    over several steps, on a parameter small enough for the serial loop and one for the parallel one."""
    import edgetrain.train.optim as optim
    from edgetrain.kernels.threads import ELEMENT_CHUNK, SMALL_ELEMENTS

    rng = np.random.default_rng(5)
    start = {"w": rng.standard_normal((40, 33)).astype(dtype),
             "big": rng.standard_normal(SMALL_ELEMENTS + 2 * ELEMENT_CHUNK + 7).astype(dtype)}
    fused = cls({k: v.copy() for k, v in start.items()}, 1e-2, **opts)
    plain = cls({k: v.copy() for k, v in start.items()}, 1e-2, **opts)
    fusable = optim._fusable
    for step in range(4):
        grads = {k: rng.standard_normal(v.shape).astype(dtype) for k, v in start.items()}
        if step == 1:
            grads["w"][:3] = 0.0  # zero gradients: with eps 0 a zero second moment divides 0 by 0
        fused.step(grads)
        monkeypatch.setattr(optim, "_fusable", lambda *a: False)
        with np.errstate(divide="ignore", invalid="ignore"):
            plain.step(grads)
        monkeypatch.setattr(optim, "_fusable", fusable)
    for k in start:
        assert np.array_equal(fused.params[k], plain.params[k], equal_nan=True)
        assert not np.array_equal(fused.params[k], start[k])
        for kind in ("exp_avg", "exp_avg_sq"):
            assert np.array_equal(fused._state[kind][k], plain._state[kind][k])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cls,opts", [(SGD, {"momentum": 0.9}), (SGD, {"momentum": 0.9, "nesterov": True}),
                                      (Adam, {}), (AdamW, {"weight_decay": 0.1})])
def test_state_never_keeps_a_subnormal_and_the_paths_agree(monkeypatch, dtype, cls, opts):
    """A dead unit (its gradient zero after one step) has its momentum decay toward zero: without the flush,
    0.9 times the smallest subnormal rounds back to itself and the buffer holds subnormals forever (slow
    multiplies on x86). With it every state value is zero or at least the smallest normal, in the fused
    kernels and the NumPy expressions alike, bit for bit; gradients with subnormal and near-subnormal values
    go through both."""
    import edgetrain.train.optim as optim

    tiny = np.finfo(dtype).tiny
    rng = np.random.default_rng(11)
    start = {"w": rng.standard_normal(64).astype(dtype)}
    fused, plain = (cls({k: v.copy() for k, v in start.items()}, 0.01, **opts) for _ in range(2))
    fusable = optim._fusable
    first = (rng.standard_normal(64) * tiny * 1e3).astype(dtype)
    first[:8] = tiny * np.array([0.5, -0.25, 1.0, -1.5, 3.0, 2.0 ** -10, 0.0, -0.75])  # subnormal and barely normal
    steps = 1200 if dtype == np.float32 else 7200  # 0.9^n takes 1e3 x tiny below the subnormals' floor
    for step in range(steps):
        grads = {"w": first if step == 0 else np.zeros(64, dtype)}
        fused.step(grads)
        monkeypatch.setattr(optim, "_fusable", lambda *a: False)
        plain.step(grads)
        monkeypatch.setattr(optim, "_fusable", fusable)
    for opt in (fused, plain):
        for table in opt._state.values():
            state = table["w"]
            assert not np.any((state != 0) & (np.abs(state) < tiny)), "a subnormal was kept"
            assert np.all(state == 0), "the dead unit's state did not reach zero"
    for kind in fused._state:
        assert np.array_equal(fused._state[kind]["w"], plain._state[kind]["w"])
    assert np.array_equal(fused.params["w"], plain.params["w"])
