"""DFQ: per-sample precision (or skipping) for gated units, chosen by trained gates (controller.py says how)."""
from edgetrain.precision.dfq.config import DFQConfig
from edgetrain.precision.dfq.controller import DFQ

__all__ = ["DFQ", "DFQConfig"]
