"""PFQ's turning-point rule on scripted loss sequences."""
import json

import pytest

from edgetrain.errors import EdgetrainError
from edgetrain.precision.pfq import PFQController


def feed(ctrl, period_means, period_steps=1, start=0):
    """Feed one loss per step; each period's steps all carry that period's mean. Returns switches."""
    out = []
    step = start
    for mean in period_means:
        for _ in range(period_steps):
            new = ctrl.on_step(step, mean)
            if new:
                out.append((step, new))
            step += 1
    return out


def test_flat_loss_switches_once_the_window_is_full():
    ctrl = PFQController(period_steps=10)
    assert ctrl.precision == "3/6"
    switches = feed(ctrl, [1.0] * 4, period_steps=10)
    assert switches == []  # the window of 5 is not full yet
    switches = feed(ctrl, [1.0], period_steps=10, start=40)
    assert switches == [(49, "4/6")]
    s = ctrl.switches[0]
    assert s.window == [1.0] * 5 and s.eps == 0.05 and s.step == 49


def test_falling_loss_does_not_switch_and_the_rule_uses_the_normaliser():
    ctrl = PFQController()
    ctrl.period_steps = 1
    # 10% drop per period relative to a normaliser near 1: d = 0.4 > eps
    assert feed(ctrl, [2.0, 1.8, 1.6, 1.4, 1.2, 1.0, 0.8]) == []
    # differences of 0.04 over a normaliser of ~1.3 are within eps=0.05
    ctrl2 = PFQController(period_steps=1)
    assert feed(ctrl2, [1.30, 1.28, 1.27, 1.26, 1.26]) == [(4, "4/6")]


def test_eps_shrinks_by_alpha_after_the_first_two_switches_only():
    """FracTrain tightens the threshold at its first and second turning points, not later ones."""
    ctrl = PFQController(stages=("3/6", "4/6", "6/8", "8/8", "8/12"), period_steps=1, eps=0.1, alpha=0.5,
                         alpha_switches=2)
    feed(ctrl, [1.0] * 5)
    assert ctrl.current_eps == pytest.approx(0.05)  # first switch: alpha applies
    feed(ctrl, [1.0] * 5, start=5)
    assert ctrl.current_eps == pytest.approx(0.025)  # second switch: again
    feed(ctrl, [1.0] * 5, start=10)
    assert ctrl.current_eps == pytest.approx(0.025)  # third: no more
    assert [s.eps for s in ctrl.switches] == pytest.approx([0.1, 0.05, 0.025])
    feed(ctrl, [1.0] * 5, start=15)
    assert ctrl.finished and ctrl.precision == "8/12"
    assert feed(ctrl, [1.0] * 10, start=20) == []  # the last stage stays


def test_alpha_switches_zero_never_shrinks_eps():
    ctrl = PFQController(period_steps=1, eps=0.1, alpha=0.5, alpha_switches=0)
    feed(ctrl, [1.0] * 5)
    assert ctrl.current_eps == 0.1


def test_tighter_eps_after_a_switch_needs_a_flatter_loss():
    ctrl = PFQController(period_steps=1, eps=0.1, alpha=0.1)
    feed(ctrl, [1.0] * 5)  # switch; eps -> 0.01
    wobbly = [1.0, 0.97, 1.0, 0.97, 1.0]  # d = 0.03: under 0.1, over 0.01
    assert feed(ctrl, wobbly, start=5) == []


def test_normaliser_freezes_after_its_periods():
    ctrl = PFQController(period_steps=1, normaliser_periods=2, window=3, eps=0.05)
    # First two periods 10 and 10 fix S = 10; later small losses are judged against it.
    feed(ctrl, [10.0, 10.0])
    switches = feed(ctrl, [1.0, 1.2, 1.4], start=2)  # d = 0.4/10 = 0.04 <= 0.05: flat for S = 10
    assert switches == [(4, "4/6")]
    assert ctrl.period_losses[:2] == [10.0, 10.0]


def test_manual_mode_switches_at_given_steps():
    ctrl = PFQController(switch_steps=(3, 5, 9))
    got = feed(ctrl, [5.0, 4.0, 3.0, 2.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    assert got == [(2, "4/6"), (4, "6/8"), (8, "8/8")]
    with pytest.raises(EdgetrainError, match="3 increasing switch steps"):
        PFQController(switch_steps=(5, 3, 9))


def test_state_round_trip_continues_identically():
    losses = [2.0, 1.5, 1.2, 1.1, 1.05, 1.04, 1.03, 1.03, 1.03, 1.02, 1.02, 1.02, 1.02, 1.02, 1.01, 1.01]
    a = PFQController(period_steps=2, eps=0.05, alpha=0.5)
    full = feed(a, losses, period_steps=2)
    b = PFQController(period_steps=2, eps=0.05, alpha=0.5)
    first = feed(b, losses[:7], period_steps=2)
    b.on_step(14, losses[7])  # stop in the middle of a period
    state = json.loads(json.dumps(b.state_dict()))
    c = PFQController(period_steps=2, eps=0.05, alpha=0.5)
    c.load_state_dict(state)
    rest = []
    if (r := c.on_step(15, losses[7])):
        rest.append((15, r))
    rest += feed(c, losses[8:], period_steps=2, start=16)
    assert first + rest == full
    assert c.state_dict() == a.state_dict()


@pytest.mark.parametrize("kwargs,msg", [
    (dict(stages=("3/6", "9x")), "precision '9x'"),
    (dict(period_steps=0), "period_steps"),
    (dict(window=1), "window"),
    (dict(eps=0), "eps"),
    (dict(alpha=1.5), "alpha"),
])
def test_bad_settings_are_refused(kwargs, msg):
    with pytest.raises(EdgetrainError, match=msg):
        PFQController(**kwargs)
