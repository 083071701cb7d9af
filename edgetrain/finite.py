"""Non-finite tensors named: a model whose weights hold NaN or inf is refused as such, before any step or
evaluation turns it into a vaguer failure ("training diverged", "cannot quantise")."""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from edgetrain.errors import ModelError


def first_nonfinite(tensors: Mapping[str, np.ndarray]) -> tuple[str, str] | None:
    """(name, 'NaN' or 'infinite values') of the first float tensor that is not finite, else None."""
    for name, a in tensors.items():
        a = np.asarray(a)
        if a.dtype.kind in "fc" and not np.isfinite(a).all():
            return name, "NaN" if np.isnan(a).any() else "infinite values"
    return None


def check_finite_weights(model, source: str, what: str = "initializer") -> None:
    """Raise ModelError naming source and the first parameter or buffer of model holding NaN or inf."""
    hit = first_nonfinite({**model.parameters(), **model.buffers()})
    if hit is not None:
        name, kind = hit
        raise ModelError(f"{source}: {what} '{name}' holds {kind}; the model cannot be trained or evaluated")
