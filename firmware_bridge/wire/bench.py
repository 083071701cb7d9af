"""Measure bulk-transfer goodput through a paced, optionally noisy relay between two ptys.

    python -m firmware_bridge.wire.bench --baud 921600 --size 1000000 [--corrupt 1e-4 --drop 1e-5] [--chunk-size N]

Without --chunk-size the link sizes its frames to the loss it observes (wire/sizing.py), as uploads do.

Goodput is blob bytes over the time from the first chunk sent to the last one
received, reported against the line's payload rate (baud / 10 for 8N1).
"""

from __future__ import annotations

import argparse
import random
import threading
import time
from dataclasses import dataclass

from edgetrain.cli.argtypes import NON_NEGATIVE_INT, POSITIVE_INT, PROBABILITY
from firmware_bridge.wire.frame import encode_frame
from firmware_bridge.wire.link import Link
from firmware_bridge.wire.messages import CHUNK_HEADER, MsgType, chunk_blob, encode_payload
from firmware_bridge.wire.relay import Relay
from firmware_bridge.wire.transport import BITS_PER_BYTE, DEFAULT_BAUD, open_port, open_pty


@dataclass(frozen=True)
class BenchResult:
    """One transfer's outcome."""

    seconds: float
    goodput_bytes_per_s: float
    line_fraction: float
    framing_ceiling: float
    retransmits: int
    intact: bool
    final_chunk_size: int


def framing_ceiling(blob: bytes, chunk_size: int) -> float:
    """Return the best goodput fraction framing allows for `blob`: its bytes over the wire bytes of its chunks."""
    wire = sum(
        len(encode_frame(MsgType.MODEL_CHUNK, 0, encode_payload(MsgType.MODEL_CHUNK, chunk)))
        for chunk in chunk_blob(blob, chunk_size)
    )
    return len(blob) / wire


def run(
    *,
    baud: int = DEFAULT_BAUD,
    size: int = 1_000_000,
    window: int = 8,
    chunk_size: int | None = None,
    corrupt_rate: float = 0.0,
    drop_rate: float = 0.0,
    duplicate_rate: float = 0.0,
    burst_rate: float = 0.0,
    seed: int = 0,
) -> BenchResult:
    """Send `size` random bytes from one link to another through a Relay paced at `baud`."""
    blob = random.Random(seed).randbytes(size)
    received: dict[str, object] = {}
    with (
        open_pty() as pty_a,
        open_pty() as pty_b,
        Relay(pty_a.master_fd, pty_b.master_fd, baud=baud, corrupt_rate=corrupt_rate, drop_rate=drop_rate,
              duplicate_rate=duplicate_rate, burst_rate=burst_rate, seed=seed),
    ):
        port_a, port_b = open_port(pty_a.slave_path, baud), open_port(pty_b.slave_path, baud)
        try:
            # A fixed chunk size means fixed frames too (the protocol before frames adapted), else both adapt.
            frame = None if chunk_size is None else chunk_size + CHUNK_HEADER.size
            sender, receiver = Link(port_a, window=window, frame_size=frame), Link(port_b, window=window)

            def receive() -> None:
                received["blob"] = receiver.recv_bulk(timeout=600)
                received["at"] = time.monotonic()

            thread = threading.Thread(target=receive, daemon=True)
            thread.start()
            sender.handshake(timeout=10)
            start = time.monotonic()
            sender.send_bulk(blob, chunk_size=chunk_size, timeout=600)
            thread.join()
        finally:
            port_a.close()
            port_b.close()
    seconds = float(received["at"]) - start  # type: ignore[arg-type]
    goodput = size / seconds
    final_chunk = chunk_size or sender.frame_payload - CHUNK_HEADER.size
    return BenchResult(
        seconds=seconds,
        goodput_bytes_per_s=goodput,
        line_fraction=goodput / (baud / BITS_PER_BYTE),
        framing_ceiling=framing_ceiling(blob, final_chunk),
        retransmits=sender.stats.retransmits,
        intact=received["blob"] == blob,
        final_chunk_size=final_chunk,
    )


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baud", type=POSITIVE_INT, default=DEFAULT_BAUD)
    parser.add_argument("--size", type=POSITIVE_INT, default=1_000_000)
    parser.add_argument("--window", type=POSITIVE_INT, default=8)
    parser.add_argument("--chunk-size", type=POSITIVE_INT, default=None,
                        help="fixed chunk size in bytes (default: adapted to the observed loss)")
    parser.add_argument("--corrupt", type=PROBABILITY, default=0.0, help="per-byte corruption probability")
    parser.add_argument("--drop", type=PROBABILITY, default=0.0, help="per-byte drop probability")
    parser.add_argument("--duplicate", type=PROBABILITY, default=0.0, help="per-byte duplication probability")
    parser.add_argument("--burst", type=PROBABILITY, default=0.0, help="per-byte probability of a noise burst")
    parser.add_argument("--seed", type=NON_NEGATIVE_INT, default=0)
    args = parser.parse_args()
    result = run(
        baud=args.baud,
        size=args.size,
        window=args.window,
        chunk_size=args.chunk_size,
        corrupt_rate=args.corrupt,
        drop_rate=args.drop,
        duplicate_rate=args.duplicate,
        burst_rate=args.burst,
        seed=args.seed,
    )
    print(
        f"{args.size} bytes in {result.seconds:.2f} s: {result.goodput_bytes_per_s / 1000:.1f} kB/s, "
        f"{100 * result.line_fraction:.1f}% of line rate (framing ceiling {100 * result.framing_ceiling:.1f}% "
        f"at {result.final_chunk_size}-byte chunks), "
        f"{result.retransmits} retransmits, {'intact' if result.intact else 'CORRUPTED'}"
    )


if __name__ == "__main__":
    main()
