"""The records of one profile: what was asked, what was prepared from it, and what the board returned.

`host` fills them and `report` reads them; they live below both so that neither imports the other's types.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from firmware_bridge.profile.workload import PRECISION_FP32, TrainingData, Workload
from firmware_bridge.wire.transport import DEFAULT_BAUD

__all__ = ["BoardRun", "DEFAULT_BATCH", "DEFAULT_STEPS", "DEFAULT_TIMEOUT_S", "DEFAULT_WARMUP", "Prepared",
           "ProfileRequest"]

DEFAULT_TIMEOUT_S = 10.0
DEFAULT_STEPS = 20
DEFAULT_WARMUP = 3
DEFAULT_BATCH = 8


@dataclass
class ProfileRequest:
    """Everything `edgetrain profile` was asked to do."""

    model: str
    port: str
    baud: int = DEFAULT_BAUD
    batch_size: int | None = None
    steps: int = DEFAULT_STEPS
    warmup: int = DEFAULT_WARMUP
    precision: str = PRECISION_FP32
    seed: int = 0
    data: str | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S
    backend: str | None = None  # the integer route the board should take (None: its own choice)
    deterministic: bool = True  # portable fixed-order float on both sides (see Workload.deterministic)
    progress: bool = True
    on_progress: Callable[[int, int], None] | None = None


@dataclass
class Prepared:
    """The request checked and loaded: model bytes and hash, workload, data, layer summary."""

    model_blob: bytes
    model_sha: str
    workload: Workload
    summary: dict[str, Any]
    data_blob: bytes | None = None
    data_sha: str | None = None
    data: TrainingData | None = None
    workload_id: str = field(default_factory=lambda: f"profile-{secrets.token_hex(4)}")


@dataclass
class BoardRun:
    """What the board returned, and how getting it went."""

    capabilities: dict[str, Any]
    result: dict[str, Any]
    uploaded: bool
    data_uploaded: bool | None
    upload_bytes: int
    restarts: int
    telemetry: list[dict[str, Any]]
    link: dict[str, Any]
    seconds: float
