"""Does the data fit the model? Checked before training so the user gets one clear line, not a shape error."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from edgetrain.data.dataset import Dataset
from edgetrain.errors import DataError


def _pretty(shape: Sequence[int | str | None]) -> str:
    """(N, 1, 28, 28) style: a free leading dimension is the batch, other free ones are '?'."""
    dims = ["N" if d is None and i == 0 else "?" if d is None else str(d) for i, d in enumerate(shape)]
    return "(" + ", ".join(dims) + ("," if len(dims) == 1 else "") + ")"


def check_fits(dataset: Dataset, input_shape: Sequence[int | str | None], num_classes: int | None) -> None:
    """Raise DataError unless samples match the model input (with or without batch dim) and labels its outputs."""
    sample = dataset.sample_shape
    # A model input usually carries a (free or fixed) batch dimension first; compare what follows it.
    model = tuple(input_shape)[1:] if len(input_shape) == len(sample) + 1 else tuple(input_shape)
    # None or a symbolic name is a free dimension and matches any size.
    if len(model) != len(sample) or any(isinstance(m, (int, np.integer)) and m != s for m, s in zip(model, sample)):
        raise DataError(f"{dataset.name}: data samples have shape {_pretty(sample)} but the model input is "
                        f"{_pretty(input_shape)}; use data of the model's size or a model built for this data")
    if num_classes is not None and dataset.num_classes > num_classes:
        raise DataError(f"{dataset.name}: data has {dataset.num_classes} classes but the model outputs {num_classes}; "
                        "use a new classifier head")
