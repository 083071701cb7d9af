"""A federation in this process, without Ray: the same server loop (`Federation.run`) and the same ClientApp as
`simulate`, with Flower messages handed over in memory.

What differs from Flower's simulation runtime is only the transport: no Ray, no worker processes, no SuperLink
state; each client's reply is computed when its instruction is pushed, in the order the strategy sent them. A
seeded federation gives the same weights, bit for bit, as under `simulate` (tested), so checks that need several
federations (stop and resume) run here without paying Ray's start-up (about 20 s each on 2 cores). Users run
`simulate` (`edgetrain federate`) or `flwr run`.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable
from itertools import count
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from edgetrain.fleet.settings import FleetSettings

PARTITION_ID, NUM_PARTITIONS = "partition-id", "num-partitions"  # the node config Flower's simulation gives


class InProcessGrid(Grid):
    """A Grid whose nodes are `clients` ClientApp contexts in this process; node i serves partition i."""

    def __init__(self, client_app: ClientApp, clients: int, run_id: int = 1):
        self._app = client_app
        self._run = Run.create_empty(run_id)
        # Messages take their run id from this process-wide identity; run_simulation's Python API sets it so too.
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run_id, SUPERLINK_NODE_ID
        # Node ids as Flower's simulation keeps them: one Context per node, alive for the whole run.
        self._contexts = {node: Context(run_id=run_id, node_id=node, state=RecordDict(), run_config={},
                                        node_config={PARTITION_ID: node - 1, NUM_PARTITIONS: clients})
                          for node in range(1, clients + 1)}
        self._ids = count(1)
        self._replies: dict[str, Message] = {}

    def set_run(self, run: Run) -> None:
        """Adopt the run this grid serves."""
        self._run = run

    @property
    def run(self) -> Run:
        """The run this grid serves."""
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        """A message to one node (Flower's deprecated helper, kept for the abstract interface)."""
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        """Every node of the run."""
        return list(self._contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Run each message's ClientApp call now; its reply waits to be pulled. Returns the message ids."""
        ids = []
        for msg in messages:
            # Flower's own grids set the id this way (InMemoryGrid.push_messages); replies point back at it.
            msg.metadata.__dict__["_message_id"] = f"ins-{next(self._ids)}"
            ids.append(msg.metadata.message_id)
            self._replies[ids[-1]] = self._call(msg)
        return ids

    def _call(self, msg: Message) -> Message:
        try:
            reply = self._app(msg, self._contexts[msg.metadata.dst_node_id])
        except Exception as exc:  # as Flower's simulation does: the server gets an error reply, not the exception
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                                  reason=f"{type(exc)}:<'{exc}'>"), reply_to=msg)
        reply.metadata.__dict__["_message_id"] = f"res-{next(self._ids)}"
        return reply

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """The replies to these message ids that are ready (all of them: each ran when pushed)."""
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push the messages and return every reply (`timeout` has nothing to wait for here)."""
        return self.pull_messages(self.push_messages(messages))


def run_inprocess(settings: FleetSettings, *, resume: bool = False) -> dict[str, Any]:
    """Run the federation the settings describe in this process (see the module doc); returns its summary."""
    from edgetrain.fleet.client_app import make_client_app
    from edgetrain.fleet.local import preflight
    from edgetrain.fleet.server import Federation

    settings.check()
    preflight(settings)
    grid = InProcessGrid(make_client_app(settings.to_run_config()), settings.clients)
    flwr_log = logging.getLogger("flwr")
    level = flwr_log.level
    flwr_log.setLevel(logging.WARNING)  # as `simulate`: our progress line per round replaces Flower's INFO lines
    try:
        return Federation(settings, resume=resume or settings.resume).run(grid)
    finally:
        flwr_log.setLevel(level)
