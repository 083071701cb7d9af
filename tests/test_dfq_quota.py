"""DFQ's quota selection (edgetrain.precision.dfq.quota): its offsets and price against plain references, the
price's dual ascent reaching the allowance with the samples the gates rank highest sent up, and the wiring in a
model (choices, the price's update per training step, none while choices are forced)."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import edgetrain
import models
from edgetrain.errors import EdgetrainError
from edgetrain.precision.dfq.config import DFQConfig
from edgetrain.precision.dfq.controller import DFQ, QUOTA_BUFFER
from edgetrain.precision.dfq.quota import QUOTA_RATE, next_price, quota_offsets

COST = np.array([0.0, 54.0, 64.0, 104.0])  # skip, 3/6, 4/6, 6/8 with 4-bit weights (BitOPs per MAC)


def _bracket_reference(cost, computing, allowance):
    """(cheapest computing cost, the step between the computing costs around the allowance, the allowance held)."""
    costs = sorted(set(cost[computing].tolist()))
    if len(costs) < 2:
        return None
    held = min(max(allowance, costs[0]), costs[-1])
    for lo, hi in zip(costs, costs[1:]):
        if lo <= held < hi:
            return costs[0], hi - lo, held
    return costs[0], costs[-1] - costs[-2], held


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 200), min_size=2, max_size=6), st.floats(-50.0, 50.0), st.floats(0.0, 250.0),
       st.data())
def test_offsets_price_each_computing_candidate_by_its_extra_cost_in_bracket_steps(costs, price, allowance, data):
    cost = np.array(costs, float)
    computing = np.array(data.draw(st.lists(st.booleans(), min_size=len(cost), max_size=len(cost))))
    got = quota_offsets(price, cost, computing, allowance)
    want = np.zeros(len(cost))
    ref = _bracket_reference(cost, computing, allowance)
    if ref is not None:
        low, step, _ = ref
        for k in range(len(cost)):
            if computing[k]:
                want[k] = -price * (cost[k] - low) / step
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([0, 1, 2, 3]), min_size=1, max_size=40), st.floats(-5.0, 5.0),
       st.floats(0.0, 150.0))
def test_price_moves_by_the_computing_samples_overspend(choice, price, allowance):
    """Up when the computing samples spend more than the allowance (held within the computing range), down when
    less, by QUOTA_RATE per bracket step of overspend and at most QUOTA_RATE; skippers count for nothing, and
    with none computing the price stays."""
    choice = np.array(choice)
    computing = np.array([False, True, True, True])
    after = next_price(price, COST, computing, choice, allowance)
    ran = choice[choice > 0]
    if not len(ran):
        assert after == price
        return
    _, step, held = _bracket_reference(COST, computing, allowance)
    want = price + QUOTA_RATE * min(max((COST[ran].mean() - held) / step, -1), 1)
    assert after == pytest.approx(want, rel=1e-12, abs=1e-12)
    assert abs(after - price) <= QUOTA_RATE + 1e-12


def test_a_price_of_one_moves_the_brackets_dearer_candidate_one_logit():
    computing = np.array([False, True, True, True])
    np.testing.assert_allclose(quota_offsets(1.0, COST, computing, 60.0), [0, 0, -1, -5])  # 3/6 .. 4/6
    np.testing.assert_allclose(quota_offsets(1.0, COST, computing, 80.0), [0, 0, -0.25, -1.25])  # 4/6 .. 6/8


def test_one_computing_candidate_has_nothing_to_price():
    computing = np.array([False, False, True, False])  # the unit computes at 4/6 only
    assert not quota_offsets(7.0, COST, computing, 60.0).any()
    assert next_price(1.5, COST, computing, np.array([2, 2]), 10.0) == 1.5


def test_dual_ascent_spends_the_allowance_on_the_samples_ranked_highest():
    """Fixed gates whose logits prefer 3/6 for every sample, with a spread in how much: the price goes negative
    until the computing samples spend what the allowance buys (a third of the way from 3/6 to 4/6 here), and the
    samples sent to 4/6 are those whose logit gap to it is smallest, as argmax would never send any."""
    rng = np.random.default_rng(0)
    computing = np.array([False, True, True, False])  # skip and 6/8 are not in play: 3/6 against 4/6
    allowance = 54.0 + 10.0 / 3.0
    price = 0.0
    spent = []
    for step in range(3000):
        logits = np.zeros((32, 4))
        logits[:, 0] = -10.0
        logits[:, 1] = 2.0
        logits[:, 2] = 2.0 - rng.gamma(2.0, 0.5, 32)  # 4/6 always trails 3/6 by a sample's own margin
        logits[:, 3] = -10.0
        choice = (logits + quota_offsets(price, COST, computing, allowance)).argmax(axis=1)
        assert not (logits.argmax(axis=1) == 2).any()
        if step >= 2000:
            spent.append(COST[choice].mean())
            up = choice == 2
            gap = logits[:, 1] - logits[:, 2]
            assert not up.any() or not (~up).any() or gap[up].max() < gap[~up].min()
        price = next_price(price, COST, computing, choice, allowance)
    assert price < 0
    assert np.mean(spent) == pytest.approx(allowance, abs=0.3)


def _tiny(selection="quota", seed=0):
    m = edgetrain.load(models.build_model("resnet8", num_classes=10, in_channels=1, input_size=12, width=8,
                                          seed=seed), seed=seed)
    m.set_precision("8/8")
    return m, DFQ.attach(m, DFQConfig(candidates=("0", "3/6", "4/6", "6/8"), target=2.0, selection=selection))


def test_a_model_chooses_through_the_price_and_moves_it_each_training_step():
    rng = np.random.default_rng(5)
    x, y = rng.standard_normal((16, 1, 12, 12)).astype(np.float32), rng.integers(0, 10, 16)
    m, d = _tiny()
    assert m.buffers()[QUOTA_BUFFER] is d.quota_price and QUOTA_BUFFER in m.state_dict()
    for price, want in ((-1e6, 3), (1e6, 1)):  # far below 0: every sample at the dearest; far above: the cheapest
        d.quota_price[:] = price
        m(x)
        for choice in d.record.choices.values():
            assert set(choice.tolist()) <= {0, want}
    d.quota_price[:] = 0.0
    m.step = 4
    m.loss_and_grad(x, y)
    for u in d.units:
        want = next_price(0.0, d.unit_cost[u.index], d.computing_mask(u), d.record.choices[u.index], d.allowance(u))
        assert d.quota_price[u.index] == want != 0.0
    before = d.quota_price.copy()
    with d.forced("4/6"):  # choices not the gates': nothing to learn the price from
        m.loss_and_grad(x, y)
    np.testing.assert_array_equal(d.quota_price, before)
    m(x)  # and evaluation leaves it alone
    np.testing.assert_array_equal(d.quota_price, before)


def test_argmax_selection_keeps_no_price():
    m, d = _tiny("argmax")
    assert QUOTA_BUFFER not in m.buffers() and d.selection_offsets(d.units[0]) is None


def test_an_unknown_selection_is_refused():
    with pytest.raises(EdgetrainError, match="dfq selection must be one of argmax, quota"):
        DFQConfig(selection="top-k")
