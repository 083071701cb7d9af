"""Frame sizing: the goodput optimum against brute force, and the loss estimator against known rates."""

from __future__ import annotations

import math
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from firmware_bridge.wire.sizing import DEFAULT_FRAME_PAYLOAD, FRAME_COST, FrameSizer, optimal_payload


def goodput(payload: int, p: float, overhead: int = FRAME_COST) -> float:
    return payload / (payload + overhead) * (1 - p) ** (payload + overhead)


@settings(max_examples=60, deadline=None)
@given(st.floats(min_value=1e-6, max_value=2e-2))
def test_the_optimum_is_the_brute_force_argmax(p: float) -> None:
    best = max(range(64, 1 << 16), key=lambda n: goodput(n, p))
    chosen = optimal_payload(p)
    assert abs(chosen - best) <= 1 or math.isclose(goodput(chosen, p), goodput(best, p), rel_tol=1e-6)


def test_a_clean_line_gets_the_largest_frames_and_a_hopeless_one_the_smallest() -> None:
    assert optimal_payload(0.0, high=4096) == 4096
    assert optimal_payload(0.5) == 64


def test_a_new_sizer_starts_at_the_old_fixed_size() -> None:
    assert abs(FrameSizer(1 << 16).payload_size() - DEFAULT_FRAME_PAYLOAD) <= 2


def test_the_estimate_follows_the_line_whatever_size_the_frames_were() -> None:
    rng = random.Random(0)
    for p in (1e-3, 1e-4):
        sizer = FrameSizer(1 << 16)
        for _ in range(3000):
            wire = sizer.payload_size() + FRAME_COST
            while rng.random() > (1 - p) ** wire:  # each lost copy is recorded, then the next one tried
                sizer.record(wire, lost=True)
            sizer.record(wire, lost=False)
        assert 0.6 * p < sizer.byte_error_rate < 1.6 * p, (p, sizer.byte_error_rate)
        assert abs(sizer.payload_size() - optimal_payload(p)) < 0.35 * optimal_payload(p)
    # And it comes back up once the line is clean again.
    for _ in range(1000):
        sizer.record(sizer.payload_size() + FRAME_COST, lost=False)
    assert sizer.payload_size() > 4 * optimal_payload(1e-4)
