"""DFQ's probe estimator and executed-share floor: their rules against plain NumPy references, the gates'
gradient wired as documented, bit-identical on any thread count, and a toy where one candidate is clearly
better (docs/GATE_ESTIMATOR.md)."""
import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import edgetrain
import models
from edgetrain.errors import EdgetrainError
from edgetrain.precision.dfq.config import DFQConfig
from edgetrain.precision.dfq.controller import DFQ
from edgetrain.precision.dfq.gates import SHARED_NAMES
from edgetrain.precision.dfq.guard import apply_floor
from edgetrain.precision.dfq.probe import PRICE_RATE, distill_grad, priced_targets, probe_plan, probe_targets
from edgetrain.train.optim import SGD

HEAD_BIAS = SHARED_NAMES[-1]


def _tiny(config: DFQConfig | None = None, seed: int = 0):
    m = edgetrain.load(models.build_model("resnet8", num_classes=10, in_channels=1, input_size=12, width=8,
                                          seed=seed), seed=seed)
    m.set_precision("8/8")
    return m, (DFQ.attach(m, config) if config is not None else None)


def _batch(n=16, seed=5):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 1, 12, 12)).astype(np.float32), rng.integers(0, 10, n)


# -- the rules, against plain references ------------------------------------------------------------------
def test_probe_targets_match_a_loop_reference():
    rng = np.random.default_rng(0)
    cost = np.array([0.0, 2.0, 3.0, 3.0, 5.0])
    for _ in range(200):
        scores = rng.normal(0, 1e-2, (7, 5))
        scores[rng.random((7, 5)) < 0.4] = np.nan
        scores[:, 0] = rng.normal(0, 1e-2, 7)  # skip is always measured
        margin = float(rng.choice([0.0, 5e-3, 2e-2]))
        want = []
        for row in scores:
            best = min(v for v in row if not np.isnan(v))
            ok = [k for k, v in enumerate(row) if not np.isnan(v) and v <= best + margin]
            want.append(min(ok, key=lambda k: (cost[k], k)))
        assert probe_targets(scores, cost, margin).tolist() == want


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 1e3), st.sampled_from([(0, 1), (1, 2), (0, 2), (2, 3), (1, 3)])),
                min_size=1, max_size=9), st.sampled_from([0.5, 1.0, 2.0, 3.0, 4.5]),
       st.sampled_from([0.0, 1e-3, 1.0, 50.0]))
def test_priced_targets_follow_the_allowance_and_the_price(items, allowance, price):
    """The budget rule against a loop reference: a pair within the allowance goes dear, one above it cheap, one
    across it dear when sensitivity per unit of extra cost beats the price (a price of 0 starts at the median
    ratio); the price then moves by at most PRICE_RATE, up when the pairs across spent more than the allowance."""
    cost = np.array([1.0, 2.5, 4.0, 4.0])
    sens = np.array([i[0] for i in items])
    cheap = np.array([i[1][0] for i in items])
    dear = np.array([i[1][1] for i in items])
    targets, after = priced_targets(sens, cheap, dear, cost, allowance, price)
    across = [s for s in range(len(items)) if cost[cheap[s]] < allowance < cost[dear[s]]]
    ratios = sorted(sens[s] / (cost[dear[s]] - cost[cheap[s]]) for s in across)
    start = ratios[(len(ratios) - 1) // 2] if price == 0.0 and ratios else price
    spent = wanted = whole = 0.0
    for s in range(len(items)):
        lo, hi = cost[cheap[s]], cost[dear[s]]
        if s in across:
            up = sens[s] / (hi - lo) > start
            spent, wanted, whole = spent + (hi - lo) * up, wanted + allowance - lo, whole + hi - lo
        else:
            up = hi <= allowance
        assert targets[s] == (dear[s] if up else cheap[s])
    want = start * (1 + PRICE_RATE * (spent - wanted) / whole) if across and start > 0 else start
    assert after == pytest.approx(want, rel=1e-12)
    assert after >= 0 and (not across or start == 0 or abs(after / start - 1) <= PRICE_RATE + 1e-12)


def test_the_price_settles_where_the_allowed_share_of_samples_goes_up():
    """Dual ascent on a stationary stream: four probed samples a step, each across an allowance 30% of the way
    from its cheaper to its dearer candidate, sensitivities log-normal. The price settles near the 70th
    percentile of the ratios (NumPy's quantile of the same distribution), and about 30% of samples go up."""
    rng = np.random.default_rng(3)
    cost = np.array([1.0, 2.0])
    price, ups = 0.0, []
    for _ in range(4000):
        sens = rng.lognormal(0.0, 2.0, 4)
        targets, price = priced_targets(sens, np.zeros(4, np.int64), np.ones(4, np.int64), cost, 1.3, price)
        ups.append(targets.mean())
    reference = np.quantile(rng.lognormal(0.0, 2.0, 1_000_000), 0.7)
    assert abs(np.mean(ups[1000:]) - 0.3) < 0.03
    assert abs(np.log(price / reference)) < 0.5


def test_distill_grad_matches_finite_differences():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(6, 4))
    rows, targets, weight = np.array([1, 4]), np.array([3, 0]), 0.7

    def loss(z):
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        return weight * -np.mean(np.log(p[rows, targets]))

    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    got = distill_grad(p, rows, targets, weight)
    num = np.zeros_like(logits)
    for idx in np.ndindex(*logits.shape):
        e = np.zeros_like(logits)
        e[idx] = 1e-6
        num[idx] = (loss(logits + e) - loss(logits - e)) / 2e-6
    np.testing.assert_allclose(got, num, atol=1e-8)
    assert not got[[0, 2, 3, 5]].any()  # unprobed samples: nothing from the probe
    # Among candidates 1..3 only (0 is skip): the cross-entropy of their renormalised softmax.
    among = np.array([False, True, True, True])

    def among_loss(z):
        q = np.exp(z[:, 1:] - z[:, 1:].max(1, keepdims=True))
        q /= q.sum(1, keepdims=True)
        return weight * -np.mean(np.log(q[rows, targets - 1]))

    got = distill_grad(p, rows, targets := np.array([3, 1]), weight, among)
    num = np.zeros_like(logits)
    for idx in np.ndindex(*logits.shape):
        e = np.zeros_like(logits)
        e[idx] = 1e-6
        num[idx] = (among_loss(logits + e) - among_loss(logits - e)) / 2e-6
    np.testing.assert_allclose(got, num, atol=1e-8)
    assert not got[:, 0].any()


def test_probe_plan_is_seeded_and_draws_another_allowed_computing_candidate():
    skips = np.array([True, False, False, False])
    choice = np.array([0, 1, 2, 3, 1, 1, 2, 0] * 4)
    rows, alt = probe_plan(choice, (0, 1, 2, 3), skips, 0.25, (7, 11), 2)
    assert len(rows) == 8 and (np.diff(rows) > 0).all()
    assert all(a in (1, 2, 3) and a != choice[r] for r, a in zip(rows, alt))
    again = probe_plan(choice, (0, 1, 2, 3), skips, 0.25, (7, 11), 2)
    assert all((a == b).all() for a, b in zip((rows, alt), again))
    assert not (probe_plan(choice, (0, 1, 2, 3), skips, 0.25, (7, 12), 2)[0] == rows).all()  # another step
    # One computing candidate only: nothing else to run (skip is measured for free).
    _, alt = probe_plan(np.array([1, 0, 1, 1]), (0, 1), np.array([True, False]), 1.0, (0, 0), 0)
    assert (alt[np.array([1, 0, 1, 1]) == 1] == -1).all()


def test_floor_matches_a_reference_and_leaves_enough_samples_executing():
    rng = np.random.default_rng(2)
    skips = np.array([True, False, False])
    for _ in range(100):
        logits = rng.normal(size=(10, 3))
        logits[:, 0] += 1.5  # most samples prefer skipping
        floor = float(rng.choice([0.0, 0.3, 0.5, 1.0]))
        choice = logits.argmax(1)
        got = apply_floor(logits, choice, skips, floor)
        want = choice.copy()
        need = int(np.ceil(round(floor * 10, 9))) - int((choice != 0).sum())
        skippers = sorted((logits[s, 0] - logits[s, 1:].max(), s) for s in range(10) if choice[s] == 0)
        for _, s in skippers[:max(need, 0)]:
            want[s] = 1 + int(logits[s, 1:].argmax())
        assert got.tolist() == want.tolist()
        assert (got != 0).mean() >= floor - 1e-12


def test_config_refuses_bad_estimator_settings():
    for bad in ({"estimator": "reinforce"}, {"probe_share": 0.0}, {"probe_share": 1.5}, {"probe_weight": -1.0},
                {"min_exec_share": 2.0}, {"probe_margin": float("nan")}, {"probe_rule": "cheapest"}):
        with pytest.raises(EdgetrainError, match="dfq "):
            DFQConfig(**bad)


# -- in a model ---------------------------------------------------------------------------------------------
def _step(config: DFQConfig, n: int = 16):
    x, y = _batch(n)
    m, d = _tiny(config)
    m.step = 4
    loss, g = m.loss_and_grad(x, y)
    return loss, g, d


def test_probe_targets_follow_from_measured_scores():
    """Each probed sample that computes runs its chosen and a second computing candidate (skip stays with
    straight-through); the target is the rule's pick from those scores; the probe runs as in eval, so the
    forward and the loss do not change."""
    kw = dict(candidates=("0", "4/6", "6/8", "8/8"), initial_choice="6/8", beta=1e-3, target=2.0, probe_share=0.5)
    loss, _, d = _step(DFQConfig(**kw, estimator="probe", probe_margin=0.02))
    assert loss == _step(DFQConfig(**kw))[0]
    for unit, rec in d.record.probes.items():
        choice = d.record.choices[unit]
        assert 0 < len(rec["rows"]) <= 8 and (choice[rec["rows"]] != 0).all()
        measured = ~np.isnan(rec["scores"])
        assert not measured[:, 0].any() and (measured.sum(1) == 2).all()  # the chosen and one other
        assert measured[np.arange(len(rec["rows"])), choice[rec["rows"]]].all()
        assert rec["targets"].tolist() == probe_targets(rec["scores"], d.unit_cost[unit], 0.02 / 16).tolist()


def test_probe_gradient_on_the_gates_is_the_documented_distillation():
    """Without a skip candidate and with beta 0, straight-through gives the gates nothing (every candidate the
    same task gradient), so the head bias's gradient is the probe's alone: the sum over units of
    weight * mean over probed rows of (p - one-hot target)."""
    kw = dict(candidates=("4/6", "6/8", "8/8"), initial_choice="6/8", beta=0.0, probe_share=0.5)
    _, g_s, _ = _step(DFQConfig(**kw))
    _, g_p, d = _step(DFQConfig(**kw, estimator="probe", probe_weight=0.3, probe_margin=0.0))
    assert np.abs(g_s[HEAD_BIAS]).max() < 1e-7
    want = np.zeros(3)
    for rec in d.record.probes.values():
        want += 0.3 * (rec["probs"] - np.eye(3)[rec["targets"]]).sum(0) / len(rec["rows"])
    np.testing.assert_allclose(g_p[HEAD_BIAS], want, rtol=1e-5, atol=1e-7)
    assert np.abs(want).max() > 1e-3


def test_budget_rule_targets_follow_from_sensitivity_the_cost_target_and_the_price():
    """With the budget rule each probed sample's pair is priced by (dL/dy . (r_cheap - r_dear))^2, the difference
    of its two measured task scores squared, against the cost target's share of the unit's fp32 cost and the
    unit's running price (a model buffer: checkpointed, not exported); the head bias's gradient is the
    distillation towards those targets (no skip candidate, beta 0)."""
    from edgetrain.export import to_onnx
    from edgetrain.precision.dfq.controller import PRICE_BUFFER

    kw = dict(candidates=("3/6", "4/6", "6/8"), initial_choice="4/6", beta=0.0, probe_share=0.5, target=2.0)
    x, y = _batch(16)
    m, d = _tiny(DFQConfig(**kw, estimator="probe", probe_rule="budget", probe_weight=0.3))
    assert m.buffers()[PRICE_BUFFER] is d.probe_price and not d.probe_price.any()
    for step in (4, 5):  # the first probe sets each price, the second is set at it
        m.step = step
        before = d.probe_price.copy()
        _, g_p = m.loss_and_grad(x, y)
    want_bias = np.zeros(3)
    split = 0
    for unit, rec in d.record.probes.items():
        cost, scores = d.unit_cost[unit], rec["scores"]
        allowance = 0.02 * d.unit_fp32[unit]
        assert cost[0] < allowance < cost[1]  # between 3/6 and 4/6
        cheap, dear = [], []
        for row in scores:
            pair = sorted(np.flatnonzero(~np.isnan(row)), key=lambda k: (cost[k], k))
            cheap.append(pair[0])
            dear.append(pair[1])
        cheap, dear = np.array(cheap), np.array(dear)
        at = np.arange(len(scores))
        sens = (scores[at, cheap].astype(np.float64) - scores[at, dear]) ** 2
        assert rec["price"] == before[unit] > 0
        targets, after = priced_targets(sens, cheap, dear, cost, allowance, before[unit])
        np.testing.assert_array_equal(rec["targets"], targets)
        assert d.probe_price[unit] == after != before[unit]
        split += len(set(targets.tolist()))
        want_bias += 0.3 * (rec["probs"] - np.eye(3)[rec["targets"]]).sum(0) / len(rec["rows"])
    assert split > len(d.record.probes)  # in some unit, samples were sent to different candidates
    np.testing.assert_allclose(g_p[HEAD_BIAS], want_bias, rtol=1e-5, atol=1e-7)
    assert PRICE_BUFFER in m.state_dict()
    assert PRICE_BUFFER not in {t.name for t in to_onnx(m).graph.initializer}


def test_probe_runs_count_in_the_steps_bitops_as_forward_work():
    """Probe work is not free: each probe run adds its forward BitOPs (MACs * a * w) to the gated layers."""
    kw = dict(candidates=("0", "4/6", "6/8"), initial_choice="6/8", probe_share=0.5)
    _, _, ste = _step(DFQConfig(**kw))
    _, _, probe = _step(DFQConfig(**kw, estimator="probe"))
    plain, _ = ste.step_costs()
    with_probe, _ = probe.step_costs()
    bits = {1: 4 * 4, 2: 6 * 4}  # act * weight bits of 4/6 and 6/8 (weights at 4)
    for u in probe.units:
        runs = probe.record.probe_runs[u.index]
        assert runs.sum() >= 8  # 8 probed samples: the chosen (6/8) and a second candidate each
        for name, macs in u.macs.items():
            extra = with_probe[name].forward - plain[name].forward
            assert extra == sum(int(runs[k]) * macs * b for k, b in bits.items())
            assert with_probe[name].backward_data == plain[name].backward_data


def _probe_step_bits(rule: str):
    x, y = _batch(24)
    m, d = _tiny(DFQConfig(candidates=("0", "4/6", "6/8"), estimator="probe", probe_share=0.25,
                           min_exec_share=0.5, probe_rule=rule))
    m.step = 3
    loss, g = m.loss_and_grad(x, y)
    return [np.float64(loss).tobytes()] + [g[k].tobytes() for k in sorted(g)] + [
        d.record.probes[u]["targets"].tobytes() for u in sorted(d.record.probes)]


@pytest.mark.parametrize("rule", ["margin", "budget"])
def test_probe_and_floor_bit_identical_on_one_and_two_threads(rule):
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = _probe_step_bits(rule)
        numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
        two = _probe_step_bits(rule)
    finally:
        numba.set_num_threads(before)
    assert one == two


def test_floor_keeps_blocks_executing_when_gates_prefer_to_skip():
    x, y = _batch(20)
    m, d = _tiny(DFQConfig(candidates=("0", "4/6", "6/8"), initial_choice="4/6", min_exec_share=0.6))
    bias = m.parameters()[HEAD_BIAS]
    bias[0] += 10.0  # every gate now prefers skipping
    m.step = 0
    m.loss_and_grad(x, y)
    for unit, choice in d.record.choices.items():
        assert (choice != 0).sum() == 12, unit  # ceil(0.6 * 20): the floor, no more
    assert d.last_percent > 0  # the moved samples are priced at their candidate


def _fit_at_8_8(x: np.ndarray, y: np.ndarray) -> dict:
    """A tiny ResNet fit to one batch at static 8/8: its state (weights, BatchNorm statistics)."""
    m, _ = _tiny()
    opt = SGD(m.parameters(), 0.05, momentum=0.9)
    for step in range(40):
        m.step = step
        opt.step(m.loss_and_grad(x, y)[1])
    return {k: v.copy() for k, v in m.state_dict().items()}


def _toy_shares(estimator: str, fitted: dict, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The fitted ResNet gated between 2/8 (clearly worse) and 8/8, starting at 2/8, no cost pressure: the
    share of samples at 8/8 at each of 60 steps."""
    m, _ = _tiny()
    m.load_state_dict(fitted)
    d = DFQ.attach(m, DFQConfig(candidates=("2/8", "8/8"), initial_choice="2/8", beta=0.0, estimator=estimator,
                                probe_share=0.5, probe_margin=0.0))
    opt = SGD(m.parameters(), 0.05, momentum=0.9)
    shares = []
    for step in range(40, 100):
        m.step = step
        opt.step(m.loss_and_grad(x, y)[1])
        shares.append(np.mean([np.mean(c == 1) for c in d.record.choices.values()]))
    return np.array(shares)


def test_the_probe_moves_gates_to_the_clearly_better_candidate_where_straight_through_cannot():
    """Straight-through hands both computing candidates the same task gradient: with no cost term nothing
    moves. The probe's measured gap moves the gates to 8/8 within a few steps; on this one repeated batch
    they then swing between the candidates a batch at a time (each probe sees the gap from where the gates
    stand), so what is asserted is that they get there and spend a large share of the run there."""
    x, y = _batch(32)
    fitted = _fit_at_8_8(x, y)
    assert not _toy_shares("ste", fitted, x, y).any()
    probe = _toy_shares("probe", fitted, x, y)
    assert probe[:15].max() == 1.0 and probe.mean() > 0.3


def test_fractrain_floors_step_with_its_targets_and_hold_in_the_gates():
    """With floors, FracTrain's spec carries the stage's floor beside its target; apply_precision puts it
    in force (DFQ.floor), and gates that all prefer skipping then keep exactly that share executing."""
    from edgetrain.precision.fractrain import FracTrainController
    from edgetrain.train.config import TrainConfig
    from edgetrain.train.runstate import apply_precision

    with pytest.raises(EdgetrainError, match="one per target"):
        FracTrainController(targets=(1.0, 2.0), floors=(0.5,))
    ctl = FracTrainController(targets=(1.0, 2.0), floors=(1.0, 0.25), switch_steps=(3,), period_steps=1)
    assert ctl.precision == {"default": "8/8", "dfq_target": 1.0, "dfq_floor": 1.0}
    moved = [ctl.on_step(step, 1.0) for step in range(4)]
    assert moved[:2] == [None, None] and moved[2] == {"default": "8/8", "dfq_target": 2.0, "dfq_floor": 0.25}
    assert ctl.switches[0]["dfq_floor"] == 0.25 and ctl.settings()["floors"] == [1.0, 0.25]

    x, y = _batch(20)
    m, d = _tiny(DFQConfig(candidates=("0", "8/8"), initial_choice="8/8"))
    assert d.floor == 0.0
    m.parameters()[HEAD_BIAS][0] += 10.0  # every gate now prefers skipping
    for spec in (ctl.precision, moved[2]):
        apply_precision(m, spec, TrainConfig(schedule="fractrain"))
        assert d.floor == spec["dfq_floor"]
        m.step = 0
        m.loss_and_grad(x, y)
        for unit, choice in d.record.choices.items():
            assert (choice != 0).sum() == int(np.ceil(20 * spec["dfq_floor"])), unit


def _grads(m, x, y) -> dict:
    m.step = 0
    return {k: v.copy() for k, v in m.loss_and_grad(x, y)[1].items()}


def test_stage_gradient_bits_run_every_candidate_backward_as_that_candidate_would():
    """set_grad_bits(8) on a 4/6 gate gives the gradients, bit for bit, of a gate whose candidate is 4/8 (the same
    stochastic streams and forward); its costs are then 4/8's; None brings back 4/6's gradients and costs."""
    x, y = _batch(16)
    m6, d6 = _tiny(DFQConfig(candidates=("0", "4/6"), initial_choice="4/6"))
    m8, d8 = _tiny(DFQConfig(candidates=("0", "4/8"), initial_choice="4/8"))
    at6 = _grads(m6, x, y)
    at8 = _grads(m8, x, y)
    assert any(not np.array_equal(at6[k], at8[k]) for k in at6)  # the bits matter to this check
    d6.set_grad_bits(8)
    assert [str(c.precision) for c in d6.candidates] == ["None", "4/8"] and d6.candidates[1].text == "4/6"
    assert d6.total_percent == d8.total_percent
    raised = _grads(m6, x, y)
    assert all(np.array_equal(raised[k], at8[k]) for k in at8)
    d6.set_grad_bits(None)
    assert d6.total_percent != d8.total_percent
    assert all(np.array_equal(v, at6[k]) for k, v in _grads(m6, x, y).items())
    with pytest.raises(EdgetrainError, match="gradient bits must be an integer in"):
        d6.set_grad_bits(1)


def test_fractrain_gradient_bits_step_with_its_targets():
    """With grad_bits, FracTrain's spec carries the stage's gradient bits (0: the candidates' own); apply_precision
    puts them in force in the gates, and a run's config refuses a list of the wrong length or bits out of range."""
    from edgetrain.precision.fractrain import FracTrainController
    from edgetrain.train.config import TrainConfig, validate
    from edgetrain.train.runstate import apply_precision

    with pytest.raises(EdgetrainError, match="one per target"):
        FracTrainController(targets=(1.0, 2.0), grad_bits=(8,))
    ctl = FracTrainController(targets=(1.0, 2.0), grad_bits=(0, 8), switch_steps=(3,), period_steps=1)
    first = ctl.precision
    assert first == {"default": "8/8", "dfq_target": 1.0, "dfq_grad_bits": 0}
    moved = [ctl.on_step(step, 1.0) for step in range(4)]
    assert moved[2] == {"default": "8/8", "dfq_target": 2.0, "dfq_grad_bits": 8}
    assert ctl.switches[0]["dfq_grad_bits"] == 8 and ctl.settings()["grad_bits"] == [0, 8]

    m, d = _tiny(DFQConfig(candidates=("0", "3/6", "4/6")))
    config = TrainConfig(schedule="fractrain")
    apply_precision(m, first, config)
    assert d.grad_bits is None and [str(c.precision) for c in d.candidates[1:]] == ["3/6:w4", "4/6"]
    apply_precision(m, moved[2], config)
    assert d.grad_bits == 8 and [str(c.precision) for c in d.candidates[1:]] == ["3/8:w4", "4/8"]
    for layers in (op.candidate_ops for op in m.executor.ops.values() if hasattr(op, "candidate_ops")):
        assert {mac.precision.grad_bits for ops in layers.values() for mac in ops.values()} == {8}

    for bits, message in (([0, 8], "2 gradient widths for 4 targets"), ([0, 0, 1, 8], "each must be 0")):
        with pytest.raises(EdgetrainError, match=message):
            validate(TrainConfig(schedule="fractrain", fractrain_grad_bits=bits))
    with pytest.raises(EdgetrainError, match="only --schedule fractrain steps through gradient bits"):
        validate(TrainConfig(schedule="dfq", fractrain_grad_bits=[0, 0, 0, 8]))
