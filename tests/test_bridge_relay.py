"""The noisy-line relay: deterministic fault injection and baud-rate pacing."""

from __future__ import annotations

import os
import random
import time

import pytest

from firmware_bridge.wire import ByteMangler, Relay, open_pty
from firmware_bridge.wire.transport import BITS_PER_BYTE


def _payload(size: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(size)


def test_mangler_without_faults_is_the_identity() -> None:
    data = _payload(10_000)
    assert ByteMangler().process(data) == data


ALL_FAULTS = {"drop_rate": 1e-3, "corrupt_rate": 1e-2, "duplicate_rate": 1e-3, "burst_rate": 1e-4}


def test_mangler_faults_do_not_depend_on_how_the_stream_is_chunked() -> None:
    data = _payload(200_000)
    whole = ByteMangler(**ALL_FAULTS, seed=42).process(data)
    chunked_mangler = ByteMangler(**ALL_FAULTS, seed=42)
    rng, pos, parts = random.Random(0), 0, []
    while pos < len(data):
        size = rng.randrange(1, 5000)
        parts.append(chunked_mangler.process(data[pos : pos + size]))
        pos += size
    assert b"".join(parts) == whole


def test_mangler_hits_the_requested_rates() -> None:
    size = 200_000
    mangler = ByteMangler(drop_rate=1e-3, corrupt_rate=1e-2, seed=7)
    out = mangler.process(bytes(size))
    assert len(out) == size - mangler.dropped
    assert 150 <= mangler.dropped <= 250  # 200 expected; +-5 sigma
    assert 1750 <= mangler.corrupted <= 2250  # 2000 expected
    corrupt_only = ByteMangler(corrupt_rate=1e-2, seed=7)
    out = corrupt_only.process(bytes(size))
    assert size - out.count(0) == corrupt_only.corrupted  # every corrupted byte really changed


def test_duplicates_and_bursts_add_bytes_at_their_rates_and_leave_the_other_faults_where_they_were() -> None:
    size = 200_000
    data = _payload(size)
    mangler = ByteMangler(duplicate_rate=1e-3, burst_rate=1e-4, max_burst=16, seed=5)
    out = mangler.process(data)
    assert 150 <= mangler.duplicated <= 250  # 200 expected
    assert 5 <= mangler.burst_bytes / 8.5 <= 40  # ~20 bursts of 8.5 bytes on average
    assert len(out) == size + mangler.duplicated + mangler.burst_bytes
    # Adding duplicates and bursts does not move where drops and corruptions strike.
    plain = ByteMangler(drop_rate=1e-3, corrupt_rate=1e-2, seed=5)
    noisy = ByteMangler(drop_rate=1e-3, corrupt_rate=1e-2, duplicate_rate=1e-3, burst_rate=1e-4, seed=5)
    plain.process(data), noisy.process(data)
    assert (plain.dropped, plain.corrupted) == (noisy.dropped, noisy.corrupted)


def test_different_seeds_damage_different_bytes() -> None:
    data = bytes(50_000)
    assert ByteMangler(corrupt_rate=1e-2, seed=1).process(data) != ByteMangler(corrupt_rate=1e-2, seed=2).process(data)


@pytest.mark.parametrize("rate", [-0.1, 1.0])
def test_mangler_rejects_impossible_rates(rate: float) -> None:
    with pytest.raises(ValueError, match="drop_rate"):
        ByteMangler(drop_rate=rate)


def _pass_through(relay_options: dict, data: bytes, timeout: float = 5.0) -> tuple[bytes, float]:
    with open_pty() as a, open_pty() as b, Relay(a.master_fd, b.master_fd, **relay_options):
        start = time.monotonic()
        os.write(a.slave_fd, data)
        received = bytearray()
        while len(received) < len(data) and time.monotonic() - start < timeout:
            received += os.read(b.slave_fd, 65536)
        return bytes(received), time.monotonic() - start


def test_relay_copies_both_ways_unchanged_without_faults() -> None:
    with open_pty() as a, open_pty() as b, Relay(a.master_fd, b.master_fd) as relay:
        os.write(a.slave_fd, b"to b")
        os.write(b.slave_fd, b"to a")
        assert os.read(b.slave_fd, 100) == b"to b"
        assert os.read(a.slave_fd, 100) == b"to a"
    assert relay.stats["a->b"].bytes_out == 4 and relay.stats["b->a"].bytes_out == 4


def test_relay_paces_bytes_to_the_baud_rate() -> None:
    baud = 115200
    data = _payload(2304)  # 0.2 s of line time at 10 bits per byte
    received, elapsed = _pass_through({"baud": baud}, data)
    expected = len(data) * BITS_PER_BYTE / baud
    assert received == data
    assert expected * 0.9 <= elapsed <= expected + 0.15


def test_relay_applies_its_faults() -> None:
    data = _payload(20_000)
    options = {"corrupt_rate": 1e-2, "seed": 3}
    received, _ = _pass_through(options, data, timeout=1.0)
    assert received == ByteMangler(corrupt_rate=1e-2, seed="3/a->b").process(data)
