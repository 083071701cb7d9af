"""User-facing errors of `edgetrain profile`: one line each, printed by the CLI with exit status 2.

They derive from edgetrain's EdgetrainError so that `edgetrain.cli.main.main` reports them like any
other user mistake. The wire-level errors (firmware_bridge.wire.errors) stay independent of edgetrain.
"""

from __future__ import annotations

from edgetrain.errors import EXIT_LINK_LOST, EdgetrainError

__all__ = ["BoardRefused", "BoardUnreachable", "ProfileError", "WorkloadError"]


class ProfileError(EdgetrainError):
    """Profiling could not be done as asked."""


class BoardUnreachable(ProfileError):
    """The port cannot be opened, or no agent answers on it (any more)."""

    exit_code = EXIT_LINK_LOST


class BoardRefused(ProfileError):
    """The agent answered, but refused the model, the data or the workload."""


class WorkloadError(ProfileError):
    """A workload the engine cannot run: bad field, shape that does not fit, unknown precision."""
