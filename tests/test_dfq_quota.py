"""DFQ's quota selection (edgetrain.precision.dfq.quota): the bracket, the logit mask and the threshold against
plain references, the tracked threshold sending the share the allowance buys of the highest-ranked samples up,
and the wiring in a model (choices, the threshold learned per training forward, none while choices are forced or
in evaluation, the exported gates)."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import edgetrain
import models
from edgetrain.errors import EdgetrainError
from edgetrain.precision.dfq.config import DFQConfig
from edgetrain.precision.dfq.controller import DFQ, QUOTA_BUFFER
from edgetrain.precision.dfq.gates import logit_mask
from edgetrain.precision.dfq.quota import QUOTA_RATE, bracket, next_threshold, quota_mask, split

COST = np.array([0.0, 54.0, 64.0, 104.0])  # skip, 3/6, 4/6, 6/8 with 4-bit weights (BitOPs per MAC)
COMPUTING = np.array([False, True, True, True])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 200), min_size=1, max_size=6), st.floats(0.0, 250.0), st.data())
def test_bracket_is_the_pair_of_computing_costs_around_the_allowance(costs, allowance, data):
    cost = np.array(costs, float)
    computing = np.array(data.draw(st.lists(st.booleans(), min_size=len(cost), max_size=len(cost))))
    if not computing.any():
        computing[0] = True
    cheap, dear, share = bracket(cost, computing, allowance)
    ranked = sorted((cost[k], k) for k in range(len(cost)) if computing[k])
    below = [k for c, k in ranked if c <= allowance]
    above = [k for c, k in ranked if c > allowance]
    if below and above:
        assert (cheap, dear) == (below[-1], above[0])
        assert share == pytest.approx((allowance - cost[cheap]) / (cost[dear] - cost[cheap]))
        assert 0 <= share < 1
    else:
        assert cheap == dear == (above[0] if above else below[-1]) and share == 0


def test_bracket_on_fractrains_candidates():
    assert bracket(COST, COMPUTING, 60.0) == (1, 2, pytest.approx(0.6))  # 3/6 .. 4/6
    assert bracket(COST, COMPUTING, 64.0) == (2, 3, 0.0)  # at 4/6 exactly: 4/6 for all
    assert bracket(COST, COMPUTING, 50.0) == (1, 1, 0.0)  # below the cheapest: 3/6 for all
    assert bracket(COST, COMPUTING, 200.0) == (3, 3, 0.0)  # above the dearest: 6/8 for all


def test_mask_keeps_skip_and_the_bracket_and_lowers_the_dearer_by_the_threshold():
    np.testing.assert_array_equal(quota_mask(~COMPUTING, 1, 2, 0.75), [0, 0, -0.75, -np.inf])
    np.testing.assert_array_equal(quota_mask(~COMPUTING, 1, 2, None), [0, 0, 0, -np.inf])
    np.testing.assert_array_equal(quota_mask(~COMPUTING, 3, 3, 0.75), [0, -np.inf, -np.inf, 0])
    no_skip = logit_mask((1, 2, 3), 4)  # a unit without a shortcut cannot skip: the gates' own mask says so
    np.testing.assert_array_equal(no_skip + quota_mask(~COMPUTING, 1, 2, 0.75), [-np.inf, 0, -0.75, -np.inf])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(-20.0, 20.0), min_size=0, max_size=40), st.one_of(st.none(), st.floats(-5.0, 5.0)),
       st.floats(0.0, 0.99))
def test_threshold_moves_towards_the_batch_quantile(scores, threshold, share):
    """QUOTA_RATE of the way to the (1 - share) quantile of the scores (a sorted-list interpolation here), set
    outright when there is none yet; a batch without computing samples leaves it."""
    got = next_threshold(threshold, np.array(scores), share)
    if not scores:
        assert got == threshold
        return
    ordered = sorted(scores)
    position = (1 - share) * (len(ordered) - 1)
    low = int(np.floor(position))
    high = min(low + 1, len(ordered) - 1)
    quantile = ordered[low] + (ordered[high] - ordered[low]) * (position - low)
    want = quantile if threshold is None else threshold + QUOTA_RATE * (quantile - threshold)
    assert got == pytest.approx(want, rel=1e-9, abs=1e-9)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(-3, 3), min_size=0, max_size=40), st.floats(0.0, 0.99), st.floats(0.0, 0.999))
def test_split_sends_the_highest_scores_up_and_carries_the_rest(scores, share, carry):
    up, after = split(np.array(scores, float), share, carry)
    count = min(int(np.floor(share * len(scores) + carry)), len(scores))
    assert up.sum() == count and after == pytest.approx(share * len(scores) + carry - count)
    ranked = sorted(range(len(scores)), key=lambda i: (-scores[i], i))  # ties: the lower index first
    assert sorted(np.flatnonzero(up).tolist()) == sorted(ranked[:count])


def test_the_carry_keeps_the_long_run_share_exact():
    carry, sent = 0.0, 0
    for _ in range(1000):
        up, carry = split(np.arange(7.0), 0.05, carry)  # 0.35 of a sample a batch
        sent += int(up.sum())
    assert sent == 350 and 0 <= carry < 1


def test_the_tracked_threshold_sends_the_highest_ranked_share_up():
    """Fixed gates that prefer 3/6 for every sample, by a sample's own margin: argmax sends none to 4/6; the quota
    sends the share the allowance buys (60% here), and always those whose margin is smallest."""
    rng = np.random.default_rng(0)
    cheap, dear, share = bracket(COST, COMPUTING, 60.0)
    threshold, ups = None, []
    for step in range(400):
        logits = np.zeros((32, 4))
        logits[:, 0] = -10.0
        logits[:, 1] = 2.0
        logits[:, 2] = 2.0 - rng.gamma(2.0, 0.5, 32)  # 4/6 always trails 3/6
        logits[:, 3] = 1.9  # 6/8 is the argmax's runner-up: the quota never takes it
        choice = (logits + quota_mask(~COMPUTING, cheap, dear, threshold)).argmax(axis=1)
        assert not (logits.argmax(axis=1) == dear).any() and set(choice.tolist()) <= {cheap, dear}
        if step >= 100:
            up = choice == dear
            ups.append(up.mean())
            gap = logits[:, 1] - logits[:, 2]
            assert not up.any() or not (~up).any() or gap[up].max() < gap[~up].min()
        threshold = next_threshold(threshold, logits[:, dear] - logits[:, cheap], share)
    assert np.mean(ups) == pytest.approx(share, abs=0.03)


def _tiny(selection="quota", seed=0):
    m = edgetrain.load(models.build_model("resnet8", num_classes=10, in_channels=1, input_size=12, width=8,
                                          seed=seed), seed=seed)
    m.set_precision("8/8")
    return m, DFQ.attach(m, DFQConfig(candidates=("0", "3/6", "4/6", "6/8"), target=2.0, selection=selection))


def test_a_model_chooses_within_the_bracket_and_learns_the_threshold_in_training_only():
    rng = np.random.default_rng(5)
    x, y = rng.standard_normal((16, 1, 12, 12)).astype(np.float32), rng.integers(0, 10, 16)
    m, d = _tiny()
    assert m.buffers()[QUOTA_BUFFER] is d.quota_state and QUOTA_BUFFER in m.state_dict()
    brackets = {u.index: d.quota_bracket(u) for u in d.units}
    assert all(b[:2] == (1, 2) for b in brackets.values())  # target 2%: between 3/6 and 4/6 in every unit
    m(x)  # evaluation: no threshold learned
    assert not d.quota_state.any()
    for choice in d.record.choices.values():
        assert set(choice.tolist()) <= {0, 1, 2}
    m.step = 4
    m.loss_and_grad(x, y)  # the first training forward splits exactly and sets each threshold to its quantile
    assert d.quota_state[:, 1].all()
    for u in d.units:
        choice = d.record.choices[u.index]
        ran = int((choice > 0).sum())
        share = brackets[u.index][2]
        assert share == pytest.approx((2.0 - 100 * 54 / 3072) / (100 * 10 / 3072))  # 2%: 3/4 of 3/6 .. 4/6
        assert (choice == 2).sum() == int(np.floor(share * ran))
        assert d.quota_state[u.index, 2] == pytest.approx(share * ran - int(np.floor(share * ran)))
    for threshold, want in ((-1e6, 2), (1e6, 1)):  # far below: every computing sample at 4/6; far above: 3/6
        d.quota_state[:, 0] = threshold
        m(x)
        for choice in d.record.choices.values():
            assert set(choice.tolist()) <= {0, want}
    before = d.quota_state.copy()
    with d.forced("4/6"):  # choices not the gates': nothing to learn from
        m.loss_and_grad(x, y)
    np.testing.assert_array_equal(d.quota_state, before)
    d.aim(2.5)  # a new target: the thresholds start again
    assert not d.quota_state.any()


def test_argmax_selection_keeps_no_price():
    m, d = _tiny("argmax")
    assert QUOTA_BUFFER not in m.buffers() and d.selection_offsets(d.units[0]) is None


def test_an_unknown_selection_is_refused():
    with pytest.raises(EdgetrainError, match="dfq selection must be one of argmax, quota"):
        DFQConfig(selection="top-k")
