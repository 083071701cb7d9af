"""Fleet fine-tuning through Flower: edgetrain boards as Flower clients, integer training on each, compact
updates. `partitions`, `codec`, `settings`, `validate` and `local` need only numpy; `client_app`, `server`,
`simulate` and `inprocess` need Flower (`pip install 'edgetrain[fleet]'`)."""
from __future__ import annotations

from edgetrain.errors import EdgetrainError

FLWR_EXTRA = "pip install 'edgetrain[fleet]'"


def require_flwr() -> None:
    """Import Flower, or a one-line error naming the extra to install."""
    try:
        import flwr  # noqa: F401
    except ImportError:
        raise EdgetrainError(f"federated fine-tuning needs Flower: {FLWR_EXTRA}") from None
