"""User-facing errors: one line that names the file, node or field and what is wrong.

Each error class carries the exit status the CLI returns for it, so every command and tool exits
with the same documented codes (README, "Exit codes").
"""

EXIT_OK = 0
EXIT_CHECK_FAILED = 1  # the job ran, but a check it makes failed (digests differ, outputs disagree)
EXIT_BAD_INPUT = 2  # a mistake in what the user gave us
EXIT_LINK_LOST = 3  # the board or the link to it was lost
EXIT_INTERRUPTED = 130  # SIGINT, SIGTERM or SIGHUP: the run saved what it had and stopped


class EdgetrainError(Exception):
    """A mistake in what the user gave us; the CLI prints it as one line and exits `exit_code`."""

    exit_code: int = EXIT_BAD_INPUT


class ModelError(EdgetrainError):
    """The ONNX file cannot be loaded or trained as it stands."""


class DataError(EdgetrainError):
    """A data file is missing, corrupt, or does not fit the model."""


class Interrupted(KeyboardInterrupt):
    """A stop signal ended a run after it saved what it had; the message says where and how to resume.

    A KeyboardInterrupt, so code that stops on Ctrl-C stops on it too; never an Exception, so a broad
    `except Exception` cannot swallow it.
    """

    exit_code: int = EXIT_INTERRUPTED
class ResourceLimitError(EdgetrainError):
    """What a file describes would take more memory than the budget (edgetrain.limits); refused before allocating."""


class EdgetrainWarning(UserWarning):
    """Something the user should know that does not stop the command; the CLI prints it as one line."""


class NonFiniteError(DataError, ValueError):
    """A tensor holds NaN or infinity where integer arithmetic needs finite values (a ValueError too, as the
    quantiser raised before it had a type of its own)."""


class OutputError(EdgetrainError):
    """A file cannot be written where the user asked (missing folder, no permission, a folder in the way)."""
