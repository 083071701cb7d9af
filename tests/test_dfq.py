"""DFQ: gates, per-sample grouped execution done for real, skipped work, the cost regulariser, FracTrain."""
import dataclasses

import numpy as np
import pytest

import edgetrain
import models
from edgetrain import kernels
from edgetrain.errors import EdgetrainError
from edgetrain.precision.dfq import gates
from edgetrain.precision.dfq.config import DFQConfig, parse_candidates
from edgetrain.precision.dfq.controller import DFQ


def _resnet8(seed=0):
    return edgetrain.load(models.build_model("resnet8", num_classes=10, in_channels=1, input_size=12, width=8,
                                             seed=seed), seed=seed)


def _same_bits(results) -> None:
    """Two runs' (loss or outputs, {name: gradient}) are equal bit for bit."""
    (a, grads_a), (b, grads_b) = results
    assert np.array_equal(a, b) and grads_a.keys() == grads_b.keys()
    for name in grads_a:
        assert np.array_equal(grads_a[name], grads_b[name]), name


def _data(n=12, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 1, 12, 12)).astype(np.float32), rng.integers(0, 10, n)


# -- the gate network --------------------------------------------------------------------------------
def test_gate_backward_matches_finite_differences_across_two_units():
    """Two units share the LSTM and head; the state carried from the first to the second is differentiated too."""
    rng = np.random.default_rng(1)
    params = gates.init_gate_params([3, 5], 4, seed=3, initial_choice=1, initial_logit=0.5, dtype=np.float64)
    for k in params:
        params[k] = params[k] + rng.normal(0, 0.3, params[k].shape)
    x0 = rng.standard_normal((4, 3, 2, 2))
    x1 = rng.standard_normal((4, 5))
    w0 = rng.standard_normal((4, 4))
    w1 = rng.standard_normal((4, 4))
    shared_names = gates.SHARED_NAMES

    def loss(p, a0, a1):
        shared = tuple(p[n] for n in shared_names)
        h = c = np.zeros((4, 16))
        l0, c0 = gates.gate_forward(a0, tuple(p[n] for n in gates.unit_param_names(0)), shared, h, c)
        l1, c1 = gates.gate_forward(a1, tuple(p[n] for n in gates.unit_param_names(1)), shared, c0.h, c0.c)
        return float((l0 * w0).sum() + (l1 * w1).sum()), (c0, c1)

    _, (c0, c1) = loss(params, x0, x1)
    shared = tuple(params[n] for n in shared_names)
    z = np.zeros((4, 16))
    dp1, du1, ds1, dh, dc = gates.gate_backward(c1, w1, z, z, tuple(params[n] for n in gates.unit_param_names(1)),
                                                shared)
    dp0, du0, ds0, _, _ = gates.gate_backward(c0, w0, dh, dc, tuple(params[n] for n in gates.unit_param_names(0)),
                                              shared)
    dx0, dx1 = gates.pooled_grad_to_input(dp0, x0.shape), gates.pooled_grad_to_input(dp1, x1.shape)
    analytic = dict(zip(gates.unit_param_names(0), du0)) | dict(zip(gates.unit_param_names(1), du1))
    analytic |= {n: a + b for n, a, b in zip(shared_names, ds0, ds1)}
    eps = 1e-6
    for name, grad in analytic.items():
        flat = params[name].reshape(-1)
        for i in range(0, flat.size, max(1, flat.size // 7)):
            keep = flat[i]
            flat[i] = keep + eps
            up, _ = loss(params, x0, x1)
            flat[i] = keep - eps
            down, _ = loss(params, x0, x1)
            flat[i] = keep
            assert abs((up - down) / (2 * eps) - grad.reshape(-1)[i]) < 1e-6 * max(1, abs(grad.reshape(-1)[i])), name
    for x, dx, which in ((x0, dx0, 0), (x1, dx1, 1)):
        flat = x.reshape(-1)
        for i in range(0, flat.size, 5):
            keep = flat[i]
            flat[i] = keep + eps
            up, _ = loss(params, x0, x1)
            flat[i] = keep - eps
            down, _ = loss(params, x0, x1)
            flat[i] = keep
            assert abs((up - down) / (2 * eps) - np.asarray(dx).reshape(-1)[i]) < 1e-6, which


def _bits_equal(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return (a.shape == b.shape and a.dtype == b.dtype and bool((np.signbit(a) == np.signbit(b)).all())
            and bool(((a == b) | (np.isnan(a) & np.isnan(b))).all()))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,k_count,masked", [((33, 16, 6, 6), 2, False), ((7, 5), 6, True),
                                                   ((9, 64, 3, 3), 6, False), ((3, 3, 2, 2), 4, True)])
def test_compiled_gate_gives_the_array_forms_bits(dtype, shape, k_count, masked):
    """gate_forward / gate_backward (compiled) against gate_*_arrays (NumPy, deterministic float on):
    every context field and every gradient, bit for bit, with a mask and without, float32 and float64."""
    from edgetrain.kernels import detfloat

    rng = np.random.default_rng(shape[0])
    x = (3 * rng.standard_normal(shape)).astype(dtype)
    params = gates.init_gate_params([shape[1]], k_count, 0, 1, 2.0, dtype=dtype)
    params = {k: (v + rng.normal(0, 0.5, v.shape)).astype(dtype) for k, v in params.items()}
    unit = tuple(params[k] for k in gates.unit_param_names(0))
    shared = tuple(params[k] for k in gates.SHARED_NAMES)
    n = shape[0]
    h, c, dh, dc = (rng.standard_normal((n, gates.EMBED_WIDTH)).astype(dtype) for _ in range(4))
    mask = gates.logit_mask([0, 2], k_count) if masked else None
    with detfloat.using(True):
        want_logits, want = gates.gate_forward_arrays(x, unit, shared, h, c, mask)
        got_logits, got = gates.gate_forward(x, unit, shared, h, c, mask)
        assert _bits_equal(got_logits, want_logits)
        for field in ("pooled", "a1", "z1", "e", "i", "f", "g", "o", "c", "tanh_c", "h", "probs"):
            assert _bits_equal(getattr(got, field), getattr(want, field)), field
        dlogits = rng.standard_normal(want_logits.shape).astype(dtype)
        flat = lambda r: [r[0], *r[1], *r[2], r[3], r[4]]
        pairs = zip(flat(gates.gate_backward(got, dlogits, dh, dc, unit, shared)),
                    flat(gates.gate_backward_arrays(want, dlogits, dh, dc, unit, shared)))
        assert all(_bits_equal(a, b) for a, b in pairs)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gate_matmul_sums_each_output_over_k_in_order(dtype):
    """The gates' matrix product (dfq.kernels.matmul, whose order the compiled gate shares): each output the
    float64 sum over k in order, from 0, of exact products, rounded once; a plain Python loop as reference."""
    from edgetrain.precision.dfq.kernels import matmul

    rng = np.random.default_rng(3)
    a = (rng.standard_normal((5, 37)) * np.exp(rng.uniform(-20, 20, (5, 37)))).astype(dtype)
    b = (rng.standard_normal((37, 11)) * np.exp(rng.uniform(-20, 20, (37, 11)))).astype(dtype)
    want = np.empty((5, 11), dtype)
    for i in range(5):
        for j in range(11):
            total = 0.0
            for k in range(37):
                total += float(a[i, k]) * float(b[k, j])
            want[i, j] = total
    assert _bits_equal(matmul(a, b), want)
    assert _bits_equal(matmul(a.T.copy().T, b[:, ::-1].copy()[:, ::-1]), want)  # strided operands alike


def test_straight_through_is_the_softmax_jacobian():
    rng = np.random.default_rng(0)
    z = rng.standard_normal((3, 5))
    d = rng.standard_normal((3, 5))
    p = gates.softmax(z)
    jac = np.stack([np.diag(pi) - np.outer(pi, pi) for pi in p])
    np.testing.assert_allclose(gates.straight_through(p, d), np.einsum("nij,nj->ni", jac, d), atol=1e-12)


def test_straight_through_under_deterministic_float_is_detfloats_sum():
    """The written-out candidate sum gives detfloat.sum_'s bits (signed zeros included)."""
    from edgetrain.kernels import detfloat

    rng = np.random.default_rng(1)
    for dtype, k in ((np.float32, 2), (np.float32, 6), (np.float64, 4)):
        p = gates.softmax(rng.standard_normal((33, k)).astype(dtype))
        d = rng.standard_normal((33, k)).astype(dtype)
        d[:, 0] = -0.0
        with detfloat.using(True):
            got = gates.straight_through(p, d)
            want = p * (d - detfloat.op_sum(p * d, 1, keepdims=True))
        assert _bits_equal(got, want)


def test_candidates_parse_and_refuse():
    c = parse_candidates(["0", "3/6", "6/12"], 4)
    assert [x.text for x in c] == ["skip", "3/6", "6/12"] and c[0].skip and c[2].precision.weight_bits == 4
    for bad in (["0"], ["fp32"], ["4/8", "4/8"], ["9/x"]):
        with pytest.raises(EdgetrainError):
            parse_candidates(bad, 4)


# -- execution ------------------------------------------------------------------------------------
def test_units_found_and_gated_layers_reported():
    m = _resnet8()
    m.set_precision("8/8")
    d = DFQ.attach(m)
    assert [u.name for u in d.units] == ["block0", "block1", "block2"]
    assert all(str(m.precision[n]) == "dfq:w4" for n in d.gated_layers) and len(d.gated_layers) == 6
    assert str(m.precision["conv1"]) == "8/8" and str(m.precision["fc"]) == "fp32"
    assert all(n.startswith("dfq.") for n in d.param_names) and set(d.param_names) <= set(m.parameters())


def test_one_candidate_for_all_samples_equals_the_static_model():
    """Forced to one candidate, the gated forward is the static model at that precision, exactly."""
    x, y = _data()
    static = _resnet8()
    static.set_precision("8/8", {"layer*.conv*": "4/8:w4"})
    gated = _resnet8()
    gated.set_precision("8/8")
    d = DFQ.attach(gated)
    k = [c.text for c in d.candidates].index("4/8")
    d.force = {u.index: k for u in d.units}
    env_s, _ = static.forward_train(x)
    env_g, _ = gated.forward_train(x)
    np.testing.assert_array_equal(env_g[gated.output_name], env_s[static.output_name])
    np.testing.assert_array_equal(gated(x), static(x))


def test_backbone_gradients_match_the_static_model():
    """With 16-bit gradients the only difference left is the gated layers' rounding streams: tiny."""
    x, y = _data()
    static = _resnet8()
    static.set_precision("8/16", {"layer*.conv*": "8/16:w4"})
    gated = _resnet8()
    gated.set_precision("8/16")
    d = DFQ.attach(gated, DFQConfig(candidates=("0", "8/16"), beta=0.0, initial_choice="8/16", initial_logit=100.0))
    # A saturated softmax passes no gradient through the gates, so the backbone sees only its own.
    _, gs = static.loss_and_grad(x, y)
    _, gg = gated.loss_and_grad(x, y)
    assert all((c == 1).all() for c in d.record.choices.values())
    for name, g in gs.items():
        np.testing.assert_allclose(gg[name], g, rtol=2e-3, atol=2e-3 * np.abs(g).max() + 1e-7, err_msg=name)


def test_grouped_batch_equals_each_sample_alone_in_eval():
    """Samples grouped by candidate give what each sample gives on its own (eval: fixed ranges)."""
    x, y = _data(16, seed=3)
    m = _resnet8()
    m.set_precision("8/8")
    d = DFQ.attach(m)
    rng = np.random.default_rng(0)
    for step in range(4):  # every candidate sees data, so each has a running range
        m.step = step
        d.force = {u.index: rng.integers(0, len(d.candidates), len(x)) for u in d.units}
        m.loss_and_grad(x, y)
    d.force = None
    m.parameters()["dfq.head.weight"][...] = rng.normal(0, 3, m.parameters()["dfq.head.weight"].shape)
    batched = m(x)
    choices = {k: v.copy() for k, v in d.record.choices.items()}
    assert len(set(np.concatenate(list(choices.values())).tolist())) >= 3  # a real mix of candidates
    for i in range(len(x)):
        alone = m(x[i:i + 1])
        assert all(d.record.choices[u][0] == choices[u][i] for u in choices)
        # Integer layers agree exactly; the float classifier's BLAS may round a batch of 1 differently.
        np.testing.assert_allclose(alone[0], batched[i], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["resnet8", "lenet5"])
def test_groups_sharing_kernel_calls_give_the_bits_of_one_call_per_group(name):
    """Stacking the groups' codes into one kernel call (8-bit runs and a 12-bit run) changes no bit of
    the loss, the gradients or the running ranges, in training (stochastic rounding) and in eval."""
    results = []
    for merge in (True, False):
        if name == "resnet8":
            m, (x, y) = _resnet8(), _data(16, seed=5)
        else:
            m = edgetrain.load(models.build_model("lenet5", seed=0))
            rng = np.random.default_rng(5)
            x = rng.standard_normal((16,) + tuple(m.input_shape[1:])).astype(np.float32)
            y = rng.integers(0, 10, 16)
        m.set_precision("8/8")
        d = DFQ.attach(m)
        d.merge_groups = merge
        rng = np.random.default_rng(1)
        steps = []
        for step in range(2):
            m.step = step
            d.force = {u.index: rng.choice(d.unit_candidates[u.index], len(x)) for u in d.units}
            loss, g = m.loss_and_grad(x, y)
            steps.append((loss, {k: v.copy() for k, v in g.items()}))
        ranges = {k: r.value for k, r in m.runtime.act_ranges.items()}
        results.append((steps, ranges, m(x), d.kernel_calls))
    (merged, ranges_m, eval_m, calls_m), (alone, ranges_a, eval_a, calls_a) = results
    for (loss_m, g_m), (loss_a, g_a) in zip(merged, alone):
        assert loss_m == loss_a
        assert g_m.keys() == g_a.keys()
        for k in g_m:
            np.testing.assert_array_equal(g_m[k], g_a[k], err_msg=k)
    assert ranges_m == ranges_a
    np.testing.assert_array_equal(eval_m, eval_a)
    assert calls_m < calls_a  # the groups really shared calls


def test_skipping_does_no_work(monkeypatch):
    """A skipped block calls no kernel: only the stem and the two shortcut convs run, forward and backward."""
    calls = []
    for name in ("conv2d_forward", "conv2d_backward_data", "conv2d_backward_weight"):
        real = getattr(kernels, name)
        monkeypatch.setattr(kernels, name,
                            lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    x, y = _data()
    m = _resnet8()
    m.set_precision("8/8")
    d = DFQ.attach(m)
    d.force = {u.index: 0 for u in d.units}  # candidate 0 is skip
    m.loss_and_grad(x, y)
    assert calls.count("conv2d_forward") == 3 and d.kernel_calls == 0
    assert m.cost.per_layer["layer1.0.conv1"] == 0
    calls.clear()
    d.force = {0: np.array([0] * 6 + [3] * 6), 1: 0, 2: 0}  # half the samples run block 0 at 4/8
    m.loss_and_grad(x, y)
    assert calls.count("conv2d_forward") == 5 and d.kernel_calls == 4  # 2 convs x (forward, backward)
    assert m.cost.last_step["layer1.0.conv1"].forward == 6 * d.units[0].macs["layer1.0.conv1"] * 4 * 4


def test_layer_units_for_models_without_blocks():
    m = edgetrain.load(models.build_model("lenet5", seed=0))
    m.set_precision("8/8")
    d = DFQ.attach(m)
    assert [u.name for u in d.units] == ["conv2", "fc1", "fc2"]
    assert all(0 not in d.unit_candidates[u.index] for u in d.units)  # no skip without a shortcut
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8,) + tuple(m.input_shape[1:])).astype(np.float32)
    loss, g = m.loss_and_grad(x, rng.integers(0, 10, 8))
    assert np.isfinite(loss) and all(np.isfinite(v).all() for v in g.values())


def test_the_regulariser_pulls_the_cost_to_its_target():
    """A short run from a costly start: the measured cost of the gated layers comes down to the target."""
    from edgetrain.train.optim import SGD

    x, y = _data(32, seed=5)
    m = _resnet8()
    m.set_precision("8/8")
    d = DFQ.attach(m, DFQConfig(target=2.0, initial_choice="6/12", beta=1e-2))
    opt = SGD(m.parameters(), 0.05, momentum=0.9)
    seen = []
    for step in range(60):
        m.step = step
        _, g = m.loss_and_grad(x, y)
        opt.step(g)
        seen.append(d.last_percent)
    assert seen[0] > 4.0  # started at 6/12: 4.7% of fp32
    late = np.mean(seen[-20:])
    assert abs(late - 2.0) < 0.6, seen


# -- export, checkpoints, the CLI ---------------------------------------------------------------------
def test_gates_export_runs_in_onnxruntime_with_the_same_choices(tmp_path):
    x, _ = _data(16, seed=7)
    m = _resnet8()
    m.set_precision("8/8")
    d = DFQ.attach(m)
    rng = np.random.default_rng(2)
    m.parameters()["dfq.head.weight"][...] = rng.normal(0, 3, m.parameters()["dfq.head.weight"].shape)
    d.begin_forward()
    env, _ = m.executor.forward(m._feeds(x), m._state(), False)
    ours = {k: v.copy() for k, v in d.record.choices.items()}
    exported = _exported_choices(m, d, env, tmp_path / "gates.onnx")
    for u in d.units:
        np.testing.assert_array_equal(exported[u.index], ours[u.index])
    assert len(set(np.concatenate(list(ours.values())).tolist())) >= 2


def _exported_choices(m, d, env, path) -> dict:
    """Each unit's choices from the gates exported to `path`, run in onnxruntime on the unit inputs in `env`."""
    ort = pytest.importorskip("onnxruntime")
    from edgetrain.precision.dfq.export import export_gates

    export_gates(m, path)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {u.fork: env[u.fork] for u in d.units})))
    return {u.index: outs[f"{u.name}.choice"] for u in d.units}


def test_exported_gates_choose_as_the_quota_selection_does(tmp_path):
    """With the quota selection the exported gates add each unit's fixed threshold and bracket mask to its logits,
    so onnxruntime picks what the trained model picks, and the thresholds move the picks."""
    x, _ = _data(16, seed=7)
    m = _resnet8()
    m.set_precision("8/8")
    d = DFQ.attach(m, DFQConfig(candidates=("0", "3/6", "4/6", "6/8"), selection="quota"))
    rng = np.random.default_rng(2)
    m.parameters()["dfq.head.weight"][...] = rng.normal(0, 3, m.parameters()["dfq.head.weight"].shape)
    picks = {}
    for threshold in (0.0, 1.5):
        d.quota_state[:] = [[threshold, 1, 0], [-threshold, 1, 0], [threshold, 1, 0]][:len(d.units)]
        d.begin_forward()
        env, _ = m.executor.forward(m._feeds(x), m._state(), False)
        picks[threshold] = {k: v.copy() for k, v in d.record.choices.items()}
    ours = picks[1.5]
    exported = _exported_choices(m, d, env, tmp_path / "gates.onnx")
    for u in d.units:
        np.testing.assert_array_equal(exported[u.index], ours[u.index])
    assert any((picks[0.0][k] != ours[k]).any() for k in ours)


def _fractrain_config(tmp_path, steps, **kw):
    from edgetrain.train.config import TrainConfig

    return TrainConfig(schedule="fractrain", steps=steps, batch_size=16, lr=0.05, pfq_period=2, pfq_window=2,
                       pfq_eps=10.0, eval_every=steps, checkpoint_every=3, out=str(tmp_path), **kw)


def _digits_split():
    from edgetrain.data import load_data

    return load_data("digits", seed=0)


@pytest.mark.parametrize("estimator", [{}, {"dfq_estimator": "probe", "dfq_probe_rule": "budget",
                                              "dfq_probe_share": 0.5},
                                         {"dfq_estimator": "probe", "dfq_probe_rule": "budget", "dfq_probe_share": 0.5,
                                          "dfq_selection": "quota"}], ids=["ste", "probe-budget", "probe-quota"])
def test_fractrain_steps_the_target_and_resumes_bit_identically(tmp_path, estimator):
    """The indicator moves the DFQ target through its list; a resumed run ends with the same tensors (the
    budget rule's running prices too: a model buffer the checkpoint keeps)."""
    from edgetrain.train.runstate import latest_checkpoint
    from edgetrain.train.trainer import Trainer

    split = _digits_split()
    model_path = "edgetrain/assets/lenet5_digits.onnx"
    straight = edgetrain.load(model_path)
    t = Trainer(straight, split, _fractrain_config(tmp_path / "a", 9, **estimator), export_model=False)
    t.fit()
    assert [s["dfq_target"] for s in t.controller.switches][:2] == [2.0, 2.5]  # eps 10: flat at every check
    assert DFQ.of(straight).target == t.controller.precision["dfq_target"]
    first = edgetrain.load(model_path)
    Trainer(first, split, _fractrain_config(tmp_path / "b", 6, **estimator), export_model=False).fit()
    resumed = edgetrain.load(model_path)
    t2 = Trainer(resumed, split, _fractrain_config(tmp_path / "b", 9, **estimator), export_model=False)
    t2.resume(latest_checkpoint(tmp_path / "b"))
    t2.fit()
    for name, p in straight.state_dict().items():
        np.testing.assert_array_equal(resumed.state_dict()[name], p, err_msg=name)
    if estimator:
        assert DFQ.of(straight).probe_price.any()
    if estimator.get("dfq_selection") == "quota":  # the quota's thresholds were learned, and the checkpoint kept them
        assert DFQ.of(straight).quota_state.any()


def test_a_switch_on_the_last_step_leaves_the_gates_the_run_trained(tmp_path):
    """FracTrain points the gates at a new target before the next step, not when it switches: a switch on the
    last step leaves the head's bias as trained for the final evaluation and export, and a run extended past
    it points them then, bit-identical to one that ran straight through."""
    from edgetrain.train.runstate import latest_checkpoint
    from edgetrain.train.trainer import Trainer

    split = _digits_split()
    model_path = "edgetrain/assets/lenet5_digits.onnx"
    manual = {"pfq_switch_steps": [6, 8, 20]}  # switches after steps 5 and 7
    short = edgetrain.load(model_path)
    t = Trainer(short, split, _fractrain_config(tmp_path / "a", 6, **manual), export_model=False)
    t.fit()
    assert [s["step"] for s in t.controller.switches] == [5] and t.pending_aim == DFQ.of(short).target
    trained = short.parameters()[gates.SHARED_NAMES[-1]].copy()
    probe = edgetrain.load(model_path)
    Trainer(probe, split, _fractrain_config(tmp_path / "p", 6, **manual), export_model=False).fit()
    DFQ.of(probe).aim(DFQ.of(probe).target)
    assert not np.array_equal(probe.parameters()[gates.SHARED_NAMES[-1]], trained)  # aiming would have moved it
    straight = edgetrain.load(model_path)
    Trainer(straight, split, _fractrain_config(tmp_path / "b", 9, **manual), export_model=False).fit()
    resumed = edgetrain.load(model_path)
    t2 = Trainer(resumed, split, _fractrain_config(tmp_path / "a", 9, **manual), export_model=False)
    t2.resume(latest_checkpoint(tmp_path / "a"))
    assert t2.pending_aim == t.pending_aim
    t2.fit()
    for name, p in straight.state_dict().items():
        np.testing.assert_array_equal(resumed.state_dict()[name], p, err_msg=name)


def test_a_new_target_points_saturated_gates_at_its_nearest_candidate():
    """After a long push one way the head's softmax saturates and passes the straight-through estimator
    no gradient; aim() (FracTrain's switches) restarts the bias from its initial lead on the costliest
    computing candidate at or below the new target, so the gates follow the target list instead of
    staying put."""
    x, y = _data(16)
    m = _resnet8()
    m.set_precision("8/8")
    d = DFQ.attach(m, DFQConfig(target=1.5))
    texts = [c.text for c in d.candidates]
    assert texts[d._nearest(1.5)] == "3/6" and texts[d._nearest(2.6)] == "4/8"
    assert texts[d._below(1.5)] == "3/6" and texts[d._below(3.0)] == "4/8" and texts[d._below(3.4)] == "6/8"
    bias = m.parameters()[gates.SHARED_NAMES[-1]]
    bias[...] = 0.0
    bias[texts.index("3/6")] = 60.0  # saturated on the cheapest computing candidate
    m.loss_and_grad(x, y)
    assert all((c == texts.index("3/6")).all() for c in d.record.choices.values())
    d.aim(3.4)
    assert d.target == 3.4 and texts[int(bias.argmax())] == "6/8"
    assert bias.max() - np.sort(bias)[-2] == pytest.approx(d.config.initial_logit)
    _, g = m.loss_and_grad(x, y)
    share = np.mean([(c == texts.index("6/8")).mean() for c in d.record.choices.values()])
    assert share > 0.5 and np.abs(g[gates.SHARED_NAMES[-1]]).max() > 0  # unsaturated: the gates learn again


def test_cli_dfq_train_info_export(tmp_path):
    """edgetrain train --schedule dfq, then info and export of the run (backbone + gates files)."""
    import json
    import subprocess
    import sys

    run = tmp_path / "run"
    base = [sys.executable, "-m", "edgetrain.cli"]
    r = subprocess.run(base + ["train", "edgetrain/assets/lenet5_digits.onnx", "--data", "digits", "--schedule", "dfq",
                               "--steps", "4", "--batch-size", "16", "--dfq-target", "2.5", "--out", str(run),
                               "--json"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (run / "model.onnx").exists() and (run / "model.gates.onnx").exists()
    assert 0 <= json.loads(r.stdout)["full_depth_accuracy"] <= 1  # the exported network, statistics re-estimated
    plots = subprocess.run(base + ["plot", str(run)], capture_output=True, text=True)
    assert plots.returncode == 0 and (run / "dfq.png").exists() and (run / "layers.png").exists(), plots.stderr
    info = json.loads(subprocess.run(base + ["info", str(run), "--json"], capture_output=True, text=True).stdout)
    assert info["dfq"]["target"] == 2.5 and [u["name"] for u in info["dfq"]["units"]] == ["conv2", "fc1", "fc2"]
    out = tmp_path / "int8.onnx"
    r = subprocess.run(base + ["export", str(run), "--out", str(out), "--int8", "--json"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert (tmp_path / "int8.gates.onnx").exists() and summary["gated_bits"]
    bad = subprocess.run(base + ["train", "edgetrain/assets/lenet5_digits.onnx", "--data", "digits", "--schedule",
                                 "dfq", "--dfq-candidates", "0,fp32", "--out", str(tmp_path / "bad")],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and len(bad.stderr.strip().splitlines()) == 1 and "fp32" in bad.stderr


def test_fractrain_experiment_small_form(tmp_path, capsys):
    """tools.fractrain_experiment --small: every row trains (all in this process), the table, JSON and plot are
    written, with the gates' per-sample behaviour on the test samples."""
    import json

    from tools import fractrain_experiment as fx

    assert fx.main(["--small", "--out", str(tmp_path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["settings"]["in_process"] is True
    rows = {row["row"]: row for row in out["rows"]}
    assert set(rows) == {"fp32", "static", "pfq", "dfq", "fractrain", "fractrain-probe"}
    assert rows["fp32"]["percent_of_fp32"] == pytest.approx(100.0)
    assert rows["static"]["bitops_saving_vs_static"] == 0.0
    for name in ("pfq", "dfq", "fractrain", "fractrain-probe"):  # cheaper than static 8/8 from the first step on
        assert 0 < rows[name]["bitops"] < rows["static"]["bitops"], name
    # In one process no row has a peak memory of its own: none is claimed.
    assert all(0 <= row["test_accuracy"] <= 1 and row["runs"][0]["peak_rss_mb"] is None for row in rows.values())
    run = rows["fractrain-probe"]["runs"][0]
    for name in ("dfq", "fractrain", "fractrain-probe"):  # each gated row's export, re-estimated at full depth
        gated = rows[name]["runs"][0]
        assert 0 <= gated["full_depth_recalibrated_accuracy"] <= 1 and gated["recalibration_seconds"] > 0, name
    assert set(run["test_choices"]) == set(run["off_modal_share"]) == {"block0", "block1", "block2"}
    assert all(0 <= v < 1 for v in run["off_modal_share"].values())
    for key in ("accuracy_by_executed_share", "accuracy_by_raised_share"):
        cells = run[key].values()
        assert sum(c["samples"] for c in cells) == fx.SMALL["test_samples"], key
        assert all(0 <= float(share) <= 1 for share in run[key]), key
    assert (tmp_path / "results.json").exists() and (tmp_path / "results.png").stat().st_size > 0
    assert "n/a (in one process)" in fx.format_table(out["rows"])
    # --merge: rows or seeds run separately come back together as one table
    assert fx.main(["--merge", str(tmp_path / "results.json"), "--out", str(tmp_path / "merged"), "--json"]) == 0
    merged = json.loads(capsys.readouterr().out)["rows"]
    assert [r["row"] for r in merged] == [r["row"] for r in out["rows"]]
    assert [r["test_accuracy"] for r in merged] == [r["test_accuracy"] for r in out["rows"]]
    # The budget rule's row keeps a label of its own, so a merge does not average it with the margin rule's.
    assert fx.main(["--small", "--rows", "fractrain-probe", "--probe-rule", "budget", "--out", str(tmp_path / "b"),
                    "--json"]) == 0
    budget = json.loads(capsys.readouterr().out)["rows"][0]
    assert budget["label"] == "FracTrain, probe estimator (budget rule)" and budget["bitops"] > 0
    assert fx.main(["--merge", str(tmp_path / "results.json"), str(tmp_path / "b" / "results.json"), "--out",
                    str(tmp_path / "merged2"), "--json"]) == 0
    merged = json.loads(capsys.readouterr().out)["rows"]
    assert [r["label"] for r in merged if r["row"] == "fractrain-probe"] == [rows["fractrain-probe"]["label"],
                                                                             budget["label"]]
    # The quota selection in the small form: its label, and its thresholds recorded per block.
    assert fx.main(["--small", "--rows", "fractrain", "--selection", "quota", "--out", str(tmp_path / "q"),
                    "--json"]) == 0
    quota = json.loads(capsys.readouterr().out)["rows"][0]
    assert quota["label"] == "FracTrain, quota selection" and quota["bitops"] > 0
    assert set(quota["runs"][0]["quota_threshold"]) == {"block0", "block1", "block2"}
    assert fx.main(["--rows", "fp32,sgd", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "sgd" in err
    with pytest.raises(SystemExit) as exit_:
        fx.main(["--switch-at", "0.5,0.25"])
    assert exit_.value.code == 2 and "--switch-at" in capsys.readouterr().err


def test_fractrain_experiment_row_configs(tmp_path):
    """Timed rows take the time target and the latency table; FracTrain's targets keep CIFAR's ratios to the
    final one; --switch-at puts PFQ and FracTrain in manual mode at shares of the budget."""
    import argparse

    from tools import fractrain_experiment as fx

    table = tmp_path / "t.json"
    table.write_text("{}")
    args = argparse.Namespace(steps=400, batch_size=8, seed=0, lr=0.05, period=10, eps=0.1, alpha=0.3, target=3.0,
                              beta=1e-3, time_target=12.0, cost_table=str(table), switch_at=[0.25, 0.5, 0.75],
                              candidates=None, targets=None, static_bits=None, floor=0.25, floors=None,
                              probe_share=0.25, probe_weight=0.5, probe_margin=0.02, probe_rule="budget",
                              selection="argmax", backward_share=1.0, weight_bits=4, grad_ranges="tensor",
                              clip_act_bits=0, clip_weight_bits=0, stage_grad_bits=None)
    c = fx._row_config("fractrain-time", args, "out")
    assert c.schedule == "fractrain" and c.dfq_cost_table == str(table) and c.dfq_target == 12.0
    assert c.dfq_min_exec_share == 0.25 and c.dfq_estimator == "ste"  # the floor guards the timed rows only
    assert c.fractrain_floors is None
    staged = fx._row_config("fractrain-time", argparse.Namespace(**{**vars(args), "floors": [1.0, 0.5, 0.5, 0.5]}),
                            "out")
    assert staged.fractrain_floors == [1.0, 0.5, 0.5, 0.5]  # --floors: FracTrain's floor per target
    assert fx._row_config("dfq-time", argparse.Namespace(**{**vars(args), "floors": [1.0]}), "out").fractrain_floors \
        is None  # DFQ has no stages to step through
    raised = argparse.Namespace(**{**vars(args), "stage_grad_bits": [0, 0, 0, 8]})
    assert fx._row_config("fractrain", raised, "out").fractrain_grad_bits == [0, 0, 0, 8]  # every FracTrain row
    assert fx._row_config("static", raised, "out").fractrain_grad_bits is None
    c = fx._row_config("fractrain-probe", args, "out")
    assert c.schedule == "fractrain" and c.dfq_estimator == "probe" and c.dfq_min_exec_share == 0.0
    assert (c.dfq_probe_share, c.dfq_probe_weight, c.dfq_probe_margin, c.dfq_probe_rule) == (0.25, 0.5, 0.02, "budget")
    assert c.dfq_selection == "argmax"
    quota = argparse.Namespace(**{**vars(args), "selection": "quota"})
    assert fx._row_config("fractrain", quota, "out").dfq_selection == "quota"  # every gated row, probe or not
    assert fx._row_config("static", quota, "out").dfq_selection == "argmax"
    cut = argparse.Namespace(**{**vars(args), "backward_share": 0.3})
    assert fx._row_config("fractrain-time", cut, "out").dfq_backward_share == 0.3  # every gated row
    assert fx._row_config("dfq", cut, "out").dfq_backward_share == 0.3
    assert fx._row_config("static", cut, "out").dfq_backward_share == 1.0
    assert fx._row_config("fractrain", args, "out").dfq_backward_share == 1.0
    wide = argparse.Namespace(**{**vars(args), "weight_bits": 8})
    assert fx._row_config("fractrain-time", wide, "out").dfq_weight_bits == 8
    assert fx._row_config("fractrain", args, "out").dfq_weight_bits == 4
    clipped = argparse.Namespace(**{**vars(args), "clip_act_bits": 4})
    assert fx._row_config("static", clipped, "out").clip_act_bits == 4  # every row
    assert fx._row_config("fractrain", args, "out").clip_act_bits == 0
    c = fx._row_config("fractrain-time", args, "out")
    assert c.fractrain_targets == pytest.approx([6.0, 8.0, 10.0, 12.0])
    assert c.pfq_switch_steps == [100, 200, 300]
    c = fx._row_config("fractrain", argparse.Namespace(**{**vars(args), "switch_at": None}), "out")
    assert c.fractrain_targets == pytest.approx([1.5, 2.0, 2.5, 3.0]) and c.pfq_switch_steps is None
    assert c.dfq_cost_table is None
    assert fx._row_config("dfq-time", args, "out").schedule == "dfq"
    # --targets and --candidates: FracTrain's own list, its last step scaled to --target; the timed rows keep CIFAR's
    mine = argparse.Namespace(**{**vars(args), "switch_at": None, "targets": [1.0, 2.0, 4.0],
                                 "candidates": ["0", "4/6", "6/8"]})
    c = fx._row_config("fractrain", mine, "out")
    assert c.fractrain_targets == pytest.approx([0.75, 1.5, 3.0]) and c.dfq_candidates == ["0", "4/6", "6/8"]
    assert fx._row_config("fractrain-time", mine, "out").fractrain_targets == pytest.approx([6.0, 8.0, 10.0, 12.0])
    assert fx._row_config("pfq", mine, "out").dfq_candidates is None


def test_a_measured_latency_table_is_the_cost(tmp_path):
    """--dfq-cost-table: candidates cost what the profile measured; every gated layer needs its entries."""
    import json

    from edgetrain.precision.latency import read_cost_table

    m = _resnet8()
    m.set_precision("8/8")
    layers = [f"layer{s}.0.conv{i}" for s in (1, 2, 3) for i in (1, 2)]
    table = {name: {"fp32": {"forward_s": 0.003, "backward_s": 0.007},
                    "3/6:w4": {"forward_s": 0.002, "backward_s": 0.004},
                    "8/8": {"forward_s": 0.004, "backward_s": None}} for name in layers}
    path = tmp_path / "latency.json"
    path.write_text(json.dumps(table))
    d = DFQ.attach(m, DFQConfig(candidates=("0", "3/6"), cost_table=read_cost_table(path)))
    assert d.candidate_percent()["block1"] == {"skip": 0.0, "3/6": pytest.approx(60.0)}
    # Half the samples back-propagating: an integer candidate's backward seconds halve, fp32's (the reference) stay.
    halved = DFQ.attach(_resnet8(), DFQConfig(candidates=("0", "3/6"), cost_table=read_cost_table(path, 0.5)))
    assert halved.candidate_percent()["block1"] == {"skip": 0.0, "3/6": pytest.approx(40.0)}
    del table["layer2.0.conv2"]["3/6:w4"]
    path.write_text(json.dumps(table))
    with pytest.raises(EdgetrainError, match="layer2.0.conv2.*3/6:w4"):
        DFQ.attach(_resnet8(), DFQConfig(candidates=("0", "3/6"), cost_table=read_cost_table(path)))
    path.write_text('{"conv1": {"fast": {"forward_s": 1}}}')
    with pytest.raises(EdgetrainError, match="'fast' is not a precision"):
        read_cost_table(path)


def test_a_latency_table_without_a_stage_s_gradient_bits_fails_before_training(tmp_path):
    """--fractrain-grad-bits reprices the candidates at each stage's bits: a measured table that lacks them is refused
    when the run is set up, naming the layer and precision, not at the switch that would first need them."""
    import json

    from edgetrain.train.config import TrainConfig
    from edgetrain.train.runstate import prepare_model

    layers = [f"layer{s}.0.conv{i}" for s in (1, 2, 3) for i in (1, 2)]
    table = {name: {"fp32": {"forward_s": 0.003, "backward_s": 0.007},
                    "3/6:w4": {"forward_s": 0.002, "backward_s": 0.004}} for name in layers}
    path = tmp_path / "latency.json"
    path.write_text(json.dumps(table))
    config = TrainConfig(schedule="fractrain", dfq_candidates=["0", "3/6"], dfq_cost_table=str(path),
                         fractrain_grad_bits=[0, 0, 0, 8])
    with pytest.raises(EdgetrainError, match="no timing for layer 'layer1.0.conv1' at '3/8:w4'"):
        prepare_model(_resnet8(), config)
    for name in layers:
        table[name]["3/8:w4"] = {"forward_s": 0.002, "backward_s": 0.005}
    path.write_text(json.dumps(table))
    m = _resnet8()
    prepare_model(m, config)
    assert DFQ.of(m).grad_bits is None and str(DFQ.of(m).candidates[1].precision) == "3/6:w4"


def test_a_simulated_board_profile_becomes_dfq_cost(tmp_path, capsys):
    """edgetrain profile --simulate --latency-table at fp32 and at a candidate, then train dfq on that table.
    The CLI runs in this process (only the simulated board's agent is a process of its own)."""
    import json

    from edgetrain.cli.main import main as cli_main

    model = tmp_path / "r8.onnx"
    models.save_model(models.build_model("resnet8", num_classes=10, in_channels=1, input_size=28, width=8), model)
    table = tmp_path / "latency.json"
    for spec in ("fp32", "4/8:w4"):
        assert cli_main(["profile", str(model), "--simulate", "--precision", spec, "--batch-size", "4",
                         "--steps", "2", "--warmup", "1", "--timeout", "120", "--latency-table", str(table),
                         "--out", str(tmp_path / "profile"), "--json"]) == 0, capsys.readouterr().err
    assert set(json.loads(table.read_text())["layer1.0.conv1"]) == {"fp32", "4/8:w4"}
    assert cli_main(["train", str(model), "--data", "digits", "--schedule", "dfq", "--dfq-candidates", "0,4/8",
                     "--dfq-cost-table", str(table), "--dfq-target", "50", "--steps", "3", "--batch-size", "8",
                     "--out", str(tmp_path / "run"), "--json"]) == 0, capsys.readouterr().err
    capsys.readouterr()
    assert cli_main(["info", str(tmp_path / "run"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    measured = info["dfq"]["candidate_percent"]["block0"]["4/8"]
    assert 0 < measured and measured != pytest.approx(100 * 80 / 3072)  # the table's time share, not BitOPs


def test_gate_kernels_against_numpy():
    """The gated unit's full-tensor passes: means and dot products close to float64 NumPy; the merges of
    branch, shortcut and pooled gradient bit-equal to the NumPy expressions they replace."""
    from edgetrain.precision.dfq import kernels as gk

    rng = np.random.default_rng(5)
    x = rng.standard_normal((6, 3, 5, 7)).astype(np.float32)
    np.testing.assert_allclose(gk.channel_means(x), x.astype(np.float64).mean(axis=(2, 3)), rtol=1e-6, atol=1e-7)
    y = rng.standard_normal(x.shape).astype(np.float32)
    ref = (x.astype(np.float64) * y).reshape(6, -1).sum(axis=1)
    np.testing.assert_allclose(gk.sample_dots(x, y), ref, rtol=1e-6, atol=1e-6)
    d = rng.standard_normal((6, 3)).astype(np.float32)
    pooled = gates.pooled_grad_to_input(d, x.shape)
    assert np.array_equal(gk.pooled_grad_scatter_add(d, x.shape, y), y + pooled)
    order = np.array([4, 0, 3])
    part = rng.standard_normal((3, 3, 5, 7)).astype(np.float32)
    expect = np.array(x, copy=True)
    expect[order] += part
    assert np.array_equal(gk.scatter_add(x, part, order), expect)
    expect = np.array(pooled, copy=True)
    expect[order] += part
    assert np.array_equal(gk.pooled_grad_scatter_add(d, x.shape, part, order), expect)


def test_fused_relu_and_gradient_kernels_against_numpy():
    """The unit's closing ReLU and its joined shortcut gradient: bit-equal to the NumPy expressions."""
    from edgetrain.precision.dfq import kernels as gk

    rng = np.random.default_rng(6)
    x = rng.standard_normal((6, 3, 5, 7)).astype(np.float32)
    order = np.array([4, 0, 3])
    part = rng.standard_normal((3, 3, 5, 7)).astype(np.float32)
    expect = np.array(x, copy=True)
    expect[order] += part
    assert np.array_equal(gk.scatter_add(x, part, order, relu=True), np.maximum(expect, 0))
    assert np.array_equal(gk.scatter_add(x, None, relu=True), np.maximum(x, 0))
    assert np.array_equal(gk.scatter_add(x, x, None, relu=True), np.maximum(x + x, 0))
    y = np.maximum(expect, 0)
    dout = rng.standard_normal(x.shape).astype(np.float32)
    g, rows, dots = gk.relu_grad_rows(dout, y, order, part)
    assert np.array_equal(g, dout * (y > 0)) and np.array_equal(rows, g[order])
    np.testing.assert_allclose(dots, (g[order].astype(np.float64) * part).reshape(3, -1).sum(axis=1), rtol=1e-6)
    g_all, rows_all, _ = gk.relu_grad_rows(dout, y, None, x)
    assert np.array_equal(g_all, g) and rows_all is g_all
    assert gk.relu_grad_rows(dout, y, order, None)[1] is None
    d = rng.standard_normal((6, 3)).astype(np.float32)
    pooled = gates.pooled_grad_to_input(d, x.shape)
    scattered = np.array(pooled, copy=True)
    scattered[order] += part
    assert np.array_equal(gk.pooled_grad_scatter_add(d, x.shape, part, order, dout), scattered + dout)
    assert np.array_equal(gk.pooled_grad_scatter_add(d, x.shape, None, None, dout), pooled + dout)


def test_the_relu_gradient_formed_by_rows_joins_bit_equal():
    """The unit's backward under its ReLU with an identity shortcut forms the ReLU's gradient only for the rows
    that ran the branch, and the rest in the final pass: bit-equal to the whole-tensor form it replaces, NaN,
    -0.0 and zeros of y included, 4-D and 2-D inputs, some, all and no rows executing."""
    from edgetrain.precision.dfq import kernels as gk

    rng = np.random.default_rng(7)
    for shape in ((6, 3, 5, 7), (6, 9)):
        y = np.maximum(rng.standard_normal(shape).astype(np.float32), 0)
        y.flat[:5] = [np.nan, -0.0, 0.0, np.nan, 1.0]
        dout = rng.standard_normal(shape).astype(np.float32)
        dout.flat[4] = np.nan
        d = rng.standard_normal(shape[:2]).astype(np.float32)
        for order in (np.array([4, 0, 3]), None, np.zeros(0, np.int64)):
            n_rows = shape[0] if order is None else len(order)
            branch_out = rng.standard_normal((n_rows,) + shape[1:]).astype(np.float32)
            branch_dx = rng.standard_normal((n_rows,) + shape[1:]).astype(np.float32)
            g, rows, dots = gk.relu_grad_rows(dout, y, order, branch_out if n_rows else None)
            expect = gk.pooled_grad_scatter_add(d, shape, branch_dx if n_rows else None, order, g)
            if n_rows:
                part, part_dots = gk.relu_grad_part(dout, y, order, branch_out)
                assert np.array_equal(part, rows, equal_nan=True)
                assert np.array_equal(part_dots, dots, equal_nan=True)
                got = gk.relu_joined_grad(d, dout, y, branch_dx, part, order)
            else:
                got = gk.relu_joined_grad(d, dout, y, None, None, order)
            assert np.array_equal(got, expect, equal_nan=True)
            assert np.array_equal(np.signbit(got), np.signbit(expect))
            over = dout.copy()  # written over its dout (a gradient the executor handed over): the same bits
            args = (branch_dx, part) if n_rows else (None, None)
            assert gk.relu_joined_grad(d, over, y, *args, order, out=over) is over
            assert np.array_equal(over, expect, equal_nan=True) and np.array_equal(np.signbit(over), np.signbit(got))
            mask = y > 0  # what relu_join keeps of y: every backward here gives the same bits from it
            masked = gk.relu_joined_grad(d, dout, mask, *args, order)
            assert np.array_equal(masked, expect, equal_nan=True) and np.array_equal(np.signbit(masked),
                                                                                    np.signbit(expect))
            g_m, rows_m, dots_m = gk.relu_grad_rows(dout, mask, order, branch_out if n_rows else None)
            assert np.array_equal(g_m, g, equal_nan=True)
            if n_rows:
                assert np.array_equal(dots_m, dots, equal_nan=True)
                part_m, part_dots_m = gk.relu_grad_part(dout, mask, order, branch_out)
                assert np.array_equal(part_m, part, equal_nan=True)
                assert np.array_equal(part_dots_m, part_dots, equal_nan=True)
        probed = np.array([5, 1, 1])
        assert np.array_equal(gk.relu_grad_of_rows(dout, y, probed), g[probed], equal_nan=True)
        assert np.array_equal(gk.relu_grad_of_rows(dout, y > 0, probed), g[probed], equal_nan=True)


def test_a_join_over_the_executing_rows_only_leaves_the_rest_to_the_producing_relu():
    """relu_join_rows gives relu_join's output, means and (for the rows in order) mask, bit for bit, without
    reading the other rows (their means are the ones handed in); the backward kernels then take that mask by
    row, and relu_joined_grad without y leaves the other rows unmasked: masked again by the same y (the
    producing unit's ReLU), the same bits as the masked form, for some, all and no rows executing."""
    from edgetrain.precision.dfq import kernels as gk

    rng = np.random.default_rng(11)
    shape = (6, 3, 5, 7)
    x = np.maximum(rng.standard_normal(shape).astype(np.float32), 0)
    x.flat[:4] = [np.nan, 0.0, 3.0, np.nan]
    dout = rng.standard_normal(shape).astype(np.float32)
    dout.flat[7] = -0.0
    d = rng.standard_normal(shape[:2]).astype(np.float32)
    for order in (np.array([4, 0, 3]), None, np.zeros(0, np.int64)):
        rows = np.arange(6) if order is None else order
        part = rng.standard_normal((len(rows),) + shape[1:]).astype(np.float32)
        y_want, means_want, mask_want = gk.relu_join(x.copy(), part if len(rows) else None, order, means=True)
        base, handed = x.copy(), gk.channel_means(x)
        skipped = np.setdiff1d(np.arange(6), rows)
        handed[skipped] = 7.0  # not recomputed: what was handed in
        y, means, mask = gk.relu_join_rows(base, part, order, handed)
        assert y is base and np.array_equal(y, y_want, equal_nan=True)
        assert np.array_equal(means[rows], means_want[rows], equal_nan=True) and (means[skipped] == 7.0).all()
        assert mask.shape == (len(rows),) + shape[1:] and np.array_equal(mask, mask_want[rows])
        branch_dx = rng.standard_normal(part.shape).astype(np.float32)
        if len(rows):
            dr, dots = gk.relu_grad_part(dout, mask_want, order, part)
            dr_rows, dots_rows = gk.relu_grad_part(dout, mask, order, part, y_rows=True)
            assert np.array_equal(dr, dr_rows) and np.array_equal(dots, dots_rows, equal_nan=True)
            probed = rows[::-1][:2]
            assert np.array_equal(gk.relu_grad_of_rows(dout, mask, probed, order),
                                  gk.relu_grad_of_rows(dout, mask_want, probed))
            args = (branch_dx, dr)
        else:
            args = (None, None)
        masked = gk.relu_joined_grad(d, dout, mask_want, *args, order)
        over = dout.copy()
        for got in (gk.relu_joined_grad(d, dout, None, *args, order),
                    gk.relu_joined_grad(d, over, None, *args, order, out=over)):
            assert np.array_equal(got[rows], masked[rows])
            assert np.array_equal(got[skipped], gates.pooled_grad_to_input(d, shape)[skipped] + dout[skipped])
            # what the producing unit's ReLU makes of either: the same bits
            assert np.array_equal(np.where(y_want > 0, got, 0), np.where(y_want > 0, masked, 0), equal_nan=True)
            assert np.array_equal(np.signbit(np.where(y_want > 0, got, 0)), np.signbit(np.where(y_want > 0, masked, 0)))


@pytest.mark.parametrize("shape", [(6, 3, 5, 7), (6, 9)])
def test_the_relu_join_is_scatter_add_with_its_mask_new_or_over_its_input(shape):
    """relu_join gives scatter_add(relu=True)'s output and channel means bit for bit, with the mask y > 0;
    written over an input that is a ReLU's output (>= +0.0 or NaN; relu_join_rows, which has a channel axis and
    a spatial one), the same output in that array, and the mask of the rows that ran, for some, all and no rows
    executing."""
    from edgetrain.precision.dfq import kernels as gk

    rng = np.random.default_rng(9)
    x = np.maximum(rng.standard_normal(shape).astype(np.float32), 0)
    x.flat[:4] = [np.nan, 0.0, 3.0, np.nan]
    for order in (np.array([4, 0, 3]), None, np.zeros(0, np.int64)):
        rows = shape[0] if order is None else len(order)
        part = rng.standard_normal((rows,) + shape[1:]).astype(np.float32) if rows else None
        part_or_none = part if rows else None
        want = gk.scatter_add(x, part_or_none, order, relu=True, means=len(shape) > 2)
        want_y, want_means = want if len(shape) > 2 else (want, None)
        for over in (False, True) if len(shape) > 2 else (False,):
            base = x.copy()
            if over:
                empty = np.zeros((0,) + shape[1:], np.float32)
                y, means, mask = gk.relu_join_rows(base, empty if part is None else part, order, gk.channel_means(x))
            else:
                y, means, mask = gk.relu_join(base, part_or_none, order, means=True)
            assert (y is base) == over
            assert np.array_equal(y, want_y, equal_nan=True) and np.array_equal(np.signbit(y), np.signbit(want_y))
            ran = slice(None) if order is None or not over else order
            assert np.array_equal(mask, want_y[ran] > 0) and mask.dtype == np.bool_
            if want_means is None:
                assert means is None
            else:
                assert np.array_equal(means, want_means, equal_nan=True)


def test_the_closing_relu_inside_the_unit_changes_no_bit():
    """Each block's ReLU runs inside its unit (and an identity shortcut's gradient joins there): the loss and
    every gradient equal those of the same model with the ReLUs as their own ops, bit for bit."""
    from edgetrain.ops.norm import FusedAway
    from edgetrain.precision.dfq.gated_unit import GatedUnit

    x, y = _data(16, seed=4)
    results = []
    for fused in (True, False):
        m = _resnet8()
        m.set_precision("8/8")
        d = DFQ.attach(m)
        closing = [n.name for n in m.executor.graph.nodes if n.name in d.fused_ops]
        assert len(closing) == 3 and all(isinstance(m.executor.ops[n], FusedAway) for n in closing)
        if not fused:
            for op in m.executor.ops.values():
                if isinstance(op, GatedUnit):
                    op.relu_output = None
            d.fused_ops.clear()
            m.set_precision("8/8")  # puts the plain Relu ops back
            assert not any(isinstance(m.executor.ops[n], FusedAway) for n in closing)
        d.force = {u.index: np.random.default_rng(u.index).integers(0, len(d.candidates), len(x)) for u in d.units}
        results.append(m.loss_and_grad(x, y))
    _same_bits(results)


@pytest.mark.parametrize("training", [True, False])
def test_executing_rows_quantised_ungathered_change_no_bit(training, monkeypatch):
    """A unit's first conv quantises its executing samples where they lie (SampleRows) instead of from a
    gathered copy: the loss and every gradient (training) or the outputs (eval) equal the gathered form's, bit
    for bit, with samples of several computing candidates (groups), skipping samples and rows out of order."""
    from edgetrain.precision.dfq.gated_unit import GatedUnit
    from edgetrain.quant import mac

    x, y = _data(16, seed=6)
    read_in_place = []
    real = mac.quantize_rows

    def counted(*args, **kwargs):
        read_in_place.append(len(args[1]))
        return real(*args, **kwargs)

    monkeypatch.setattr(mac, "quantize_rows", counted)
    results = []
    for ungathered in (True, False):
        m = _resnet8()
        m.set_precision("8/8")
        d = DFQ.attach(m)
        units = [op for op in m.executor.ops.values() if isinstance(op, GatedUnit)]
        assert len(units) == 3 and all(u.fork_as_rows for u in units)
        for u in units:
            u.fork_as_rows = ungathered
        d.force = {u.index: np.random.default_rng(u.index + 10).integers(0, len(d.candidates), len(x))
                   for u in d.units}
        if training:
            results.append(m.loss_and_grad(x, y))
        else:
            m.loss_and_grad(x, y)  # running ranges and statistics to evaluate with
            results.append((m.run(x)[m.output_name], {}))
        assert bool(read_in_place) == ungathered
        read_in_place.clear()
    _same_bits(results)


def test_a_unit_writing_its_input_gradient_over_the_handed_one_changes_no_bit(monkeypatch):
    """Where the executor hands a unit its output gradient for good (Op.reuses_grads), the unit's final pass
    writes the input gradient over it: the loss and every gradient equal those of new arrays, bit for bit,
    and the pass did run over the handed arrays."""
    from edgetrain.precision.dfq import gated_unit
    from edgetrain.precision.dfq.gated_unit import GatedUnit

    x, y = _data(16, seed=8)
    over = []
    real = gated_unit.relu_joined_grad

    def watched(*args, out=None):
        over.append(out is not None and out is args[1])
        return real(*args, out=out)

    monkeypatch.setattr(gated_unit, "relu_joined_grad", watched)
    results = []
    for reuse in (True, False):
        m = _resnet8()
        m.set_precision("8/8")
        d = DFQ.attach(m)
        for op in m.executor.ops.values():
            if isinstance(op, GatedUnit):
                op.reuses_grads = reuse
        d.force = {u.index: np.random.default_rng(u.index + 20).integers(0, len(d.candidates), len(x))
                   for u in d.units}
        results.append(m.loss_and_grad(x, y))
        assert over and all(over) == reuse and any(over) == reuse
        over.clear()
    _same_bits(results)


@pytest.mark.parametrize("training,estimator", [(True, "straight-through"), (True, "probe"),
                                                (False, "straight-through")])
def test_a_unit_writing_its_output_over_its_input_changes_no_bit(training, estimator):
    """Where a unit's input is a ReLU output that nothing else reads and whose producer masks by its own mask
    (another unit's: every ResNet block after the first of a stage; the stem's BatchNorm with its ReLU folded:
    the first block), the unit writes its output over it (GatedUnit.over_input; skipping rows stay where they
    are, neither read nor masked, and their gradient is masked by the producer only): the loss and every
    gradient (training, the probe estimator's too) equal those of new arrays, bit for bit; units whose input a
    projection shortcut also reads never do. An eval forward writes new arrays (its values are Model.run's)."""
    from edgetrain.precision.dfq.gated_unit import GatedUnit

    x, y = _data(16, seed=10)
    results = []
    config = DFQConfig(candidates=("0", "4/6", "6/8"), estimator="probe", probe_share=0.5) \
        if estimator == "probe" else None
    for over in (True, False):
        m = edgetrain.load(models.build_model("resnet20", num_classes=10, in_channels=1, input_size=12, width=4,
                                              seed=0), seed=0)
        m.set_precision("8/8")
        d = DFQ.attach(m, config)
        units = [op for op in m.executor.ops.values() if isinstance(op, GatedUnit)]
        assert [u.over_input for u in units] == [True, True, True] + [False, True, True] * 2
        for u in units:
            u.over_input = u.over_input and over
        d.force = {u.index: np.random.default_rng(u.index + 30).integers(0, len(d.candidates), len(x))
                   for u in d.units}
        if training:
            env, tape = m.forward_train(x)
            inputs = [env[u.node.inputs[0]] for u in units]
            assert all((a is env[u.node.outputs[0]]) == u.over_input for a, u in zip(inputs, units))
            results.append(m.loss_and_grad(x, y))
        else:
            m.loss_and_grad(x, y)
            d.begin_forward()
            env, _ = m.executor.forward(m._feeds(x), m._state(), False)
            assert not any(env[u.node.inputs[0]] is env[u.node.outputs[0]] for u in units)
            results.append((m.run(x)[m.output_name], {}))
    _same_bits(results)


def test_a_units_output_means_are_the_next_gates_input_means(monkeypatch):
    """scatter_add's fused channel means equal channel_means of its output, bit for bit; the next unit's
    gate takes them (DFQ.pooled), and the step equals one where every gate pools its own input."""
    from edgetrain.precision.dfq import gated_unit
    from edgetrain.precision.dfq import kernels as gk

    rng = np.random.default_rng(7)
    x = rng.standard_normal((5, 4, 3, 9)).astype(np.float32)
    part = rng.standard_normal((2, 4, 3, 9)).astype(np.float32)
    y, means = gk.scatter_add(x, part, np.array([3, 1]), relu=True, means=True)
    assert np.array_equal(means, gk.channel_means(y))
    x_, y_ = _data(8, seed=2)
    handed = []

    def run():
        m = _resnet8()
        m.set_precision("8/8")
        d = DFQ.attach(m)
        d.force = {u.index: np.random.default_rng(u.index).integers(0, len(d.candidates), len(x_)) for u in d.units}
        return m.loss_and_grad(x_, y_)

    def own_means(x, unit, shared, h, c, mask=None, pooled=None):
        handed.append(pooled is not None)
        return gates.gate_forward(x, unit, shared, h, c, mask)

    la, ga = run()
    monkeypatch.setattr(gated_unit, "gate_forward", own_means)
    lb, gb = run()
    assert handed == [False, True, True]  # the stem's output is pooled by the first gate itself
    assert la == lb and all(np.array_equal(ga[k], gb[k]) for k in ga)


def test_recalibration_gives_the_static_models_statistics_at_full_depth():
    """recalibrate: the gated model's BatchNorm statistics and the exported candidate's activation ranges
    become exactly those a static 8/8 model with the same weights and starting statistics gets from the
    same seeded batches; the weights and the gates do not move, and the gates are back in charge after."""
    from edgetrain.precision.dfq.recalibrate import recalibrate

    x, y = _data(24, seed=5)
    gated = _resnet8()
    gated.set_precision("8/8")
    d = DFQ.attach(gated, DFQConfig(candidates=("0", "8/8"), weight_bits=8))
    rng = np.random.default_rng(1)
    for _ in range(3):  # training in which half the samples skip each block: gated statistics
        d.force = {u.index: rng.permutation(np.arange(len(x)) % 2) for u in d.units}
        _, grads = gated.loss_and_grad(x, y)
    d.force = None
    static = _resnet8()
    static.set_precision("8/8")
    static.load_state_dict({k: v for k, v in gated.state_dict().items() if not k.startswith("dfq.")})
    for key, running in gated.runtime.act_ranges.items():  # the ranges training left, the candidate's as the layer's
        if "@" not in key or key.endswith("@8/8"):
            static.runtime.act_ranges[key.split("@")[0]] = dataclasses.replace(running)
    before = gated.state_dict()
    recalibrate(gated, x, batches=4, batch_size=8, seed=7)
    draw = np.random.default_rng(7)  # the batches recalibrate documents: default_rng(seed).choice, no replacement
    for _ in range(4):
        _, tape = static.forward_train(x[draw.choice(len(x), 8, replace=False)])
        for name, value in tape.buffer_updates.items():
            static.buffers()[name][...] = value
    assert static.buffers().keys() == gated.buffers().keys()
    moved = [name for name, value in static.buffers().items() if not np.array_equal(value, before[name])]
    assert moved  # the statistics did change, and to the static model's values exactly
    for name, value in static.buffers().items():
        np.testing.assert_array_equal(gated.buffers()[name], value, err_msg=name)
    for key, running in gated.runtime.act_ranges.items():
        if "@" not in key or key.endswith("@8/8"):
            assert running.value == static.runtime.act_ranges[key.split("@")[0]].value, key
    assert all(np.array_equal(gated.parameters()[k], before[k]) for k in gated.parameters())
    assert d.force is None
    np.testing.assert_array_equal(gated(x), gated(x))  # gated eval works as before
    with d.forced("8/8"):
        np.testing.assert_array_equal(gated(x), static(x))  # and the full-depth network is the static one
    with pytest.raises(ValueError, match="not a candidate"):
        with d.forced("4/8"):
            pass


def test_export_of_a_gated_run_is_the_network_the_run_exported(tmp_path, capsys):
    """`edgetrain export RUN` re-estimates a gated run's statistics at full depth as the run did before writing
    model.onnx (same data, batches, seed): the same BatchNorm statistics, not the checkpoint's gated ones."""
    import json

    import onnx
    from onnx import numpy_helper

    from edgetrain.cli.main import main
    from edgetrain.train.runstate import latest_checkpoint

    model = tmp_path / "resnet8.onnx"
    onnx.save(models.build_model("resnet8", num_classes=10, in_channels=1, input_size=28, width=4, seed=0), model)
    run, out = tmp_path / "run", tmp_path / "exported.onnx"
    assert main(["train", str(model), "--data", "digits", "--schedule", "dfq", "--dfq-candidates", "0,8/8",
                 "--dfq-weight-bits", "8", "--steps", "3", "--batch-size", "16", "--dfq-recalibration-batches", "3",
                 "--out", str(run), "--json"]) == 0
    assert 0 <= json.loads(capsys.readouterr().out)["full_depth_accuracy"] <= 1
    assert main(["export", str(run), "--out", str(out), "--preprocess", "metadata"]) == 0

    def tensors(path):
        return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}

    own, again, gated = tensors(run / "model.onnx"), tensors(out), latest_checkpoint(run).buffers
    stats = [name for name in gated if name.endswith(("running_mean", "running_var"))]
    assert stats and all(np.array_equal(own[name], again[name]) for name in stats)
    assert any(not np.array_equal(own[name], gated[name]) for name in stats)  # re-estimated, not the checkpoint's
