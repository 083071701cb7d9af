"""What a Model calls on the controllers attached to it (Model.attach): the hooks of one training step.

An extension is anything that runs some of the model's layers itself (a gated executor such as DFQ,
edgetrain.precision.dfq) and so must see each forward, may add a term to the loss, and reports what
its layers cost. The Model knows extensions only through this Protocol: it imports none of them.

Order within a step: begin_forward -> forward (the extension's ops run inside the executor) ->
loss_term (training only, before backward) -> backward -> step_costs.
"""
from __future__ import annotations

from typing import Protocol

from edgetrain.ops.base import Op
from edgetrain.precision.cost import LayerCost
from edgetrain.precision.spec import LayerPrecision


class ModelExtension(Protocol):
    """The hooks a Model calls on each attached extension, in the order of the module doc."""

    def owned_layers(self) -> dict[str, LayerPrecision]:
        """MAC layers whose ops the extension runs, with the precision each reports; set_precision leaves them."""
        ...

    def owned_ops(self) -> dict[str, Op]:
        """Other nodes whose work the extension's ops took over (a ReLU run inside a gated unit), with the
        op that stands in for each; set_precision keeps these too."""
        ...

    def begin_forward(self) -> None:
        """Called before every forward, eval or training: reset per-forward state."""
        ...

    def loss_term(self) -> float:
        """After a training forward and before its backward: a term added to the loss (0.0 for none)."""
        ...

    def step_costs(self) -> tuple[dict[str, LayerCost], dict[str, LayerCost]]:
        """The owned layers' cost in the last forward: as run, and in fp32."""
        ...
