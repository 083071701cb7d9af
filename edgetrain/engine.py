"""Executes a Graph: forward (recording a tape when training) and reverse-mode backward over the tape."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgetrain.graph import Graph, Node
from edgetrain.kernels.accumulate import add_into
from edgetrain.kernels.strided import Dilated
from edgetrain.ops.base import Run


@dataclass
class Tape:
    """What a training forward leaves for backward: each node with its saved context, in order."""

    entries: list[tuple[Node, Any, Any]] = field(default_factory=list)  # (node, op, context)
    buffer_updates: dict[str, np.ndarray] = field(default_factory=dict)


class Executor:
    """Runs a graph on a dict of named arrays; knows which values can carry a gradient."""

    def __init__(self, graph: Graph, ops: dict[str, Any] | None = None):
        self.graph = graph
        # The op object of each node. A Model owns its table, so switching a layer to the integer
        # path (set_precision) touches neither the graph nor another Model built from it.
        self.ops = ops if ops is not None else {n.name: n.op for n in graph.nodes}
        self.produced = {o for n in graph.nodes for o in n.outputs if o}
        # Values downstream of a parameter or a float graph input: the only ones worth differentiating.
        live = set(graph.params) | {i.name for i in graph.inputs}
        for node in graph.nodes:
            if any(i in live for i in node.inputs if i):
                live.update(o for o in node.outputs if o)
        self.differentiable = live
        # When set, seconds spent in each node's forward and backward accumulate here:
        # {(node name, "forward" | "backward"): seconds}. Profiling tools read it.
        self.timings: dict[tuple[str, str], float] | None = None
        self._needed: tuple[frozenset[str] | None, dict[str, tuple[bool, ...]]] | None = None  # _needed_inputs

    def forward(self, feeds: dict[str, np.ndarray], state: dict[str, np.ndarray], training: bool,
                record: bool = False, key: tuple[int, int] = (0, 0)) -> tuple[dict[str, np.ndarray], Tape]:
        """Run every node; return all values by name and the tape (empty unless record).

        key (seed, step) names the run: every random draw of an op (stochastic rounding, dropout
        masks) derives from it and the node's position, so a run is reproducible on any machine.
        """
        env: dict[str, np.ndarray] = dict(state)
        env.update(feeds)
        tape = Tape()
        for index, node in enumerate(self.graph.nodes):
            op = self.ops[node.name]
            args = [env[i] if i else None for i in node.inputs]
            start = time.perf_counter() if self.timings is not None else 0.0
            outs, ctx = op.forward(args, Run(training, key, index))
            if self.timings is not None:
                entry = (node.name, "forward")
                self.timings[entry] = self.timings.get(entry, 0.0) + time.perf_counter() - start
            for name, value in zip(node.outputs, outs):
                if name:
                    env[name] = value
            if training:
                for pos, value in op.buffer_updates(ctx).items():
                    tape.buffer_updates[node.inputs[pos]] = value
            if record and any(o in self.differentiable for o in node.outputs):
                tape.entries.append((node, op, ctx))
        return env, tape

    def needs_grad(self, name: str, wrt: set[str] | None) -> bool:
        """Whether dL/d(name) is wanted: computed values always, leaves only when asked for."""
        if not name or name not in self.differentiable:
            return False
        return wrt is None or name in wrt or name in self.produced

    def _needed_inputs(self, wrt: set[str] | None) -> dict[str, tuple[bool, ...]]:
        """needs_grad of every node's inputs, by node name, for this `wrt`: kept while `wrt` stays the same,
        as it does step after step (asked per input, twice per node, it was a thousand calls a step on
        MobileNetV2)."""
        key = None if wrt is None else frozenset(wrt)
        if self._needed is None or self._needed[0] != key:
            self._needed = key, {node.name: tuple(self.needs_grad(name, wrt) for name in node.inputs)
                                 for node in self.graph.nodes}
        return self._needed[1]

    def backward(self, tape: Tape, seeds: dict[str, np.ndarray], wrt: set[str] | None = None) -> dict[str, np.ndarray]:
        """Reverse-mode pass: from dL/d(seed values) to dL/d(parameters and graph inputs).

        With `wrt`, leaves outside it get no gradient; each op is told which of its inputs' gradients
        are needed, so a MAC op whose input is such a leaf (the first layer reading the data) skips its
        error back-propagation altogether.
        """
        grads = _Pending(seeds)
        needed_by_node = self._needed_inputs(wrt)
        for node, op, ctx in reversed(tape.entries):
            gouts = [grads.pop(o) if o else None for o in node.outputs]
            if gouts[0] is None and not (op.all_outputs_differentiable and any(g is not None for g in gouts)):
                continue  # only non-differentiable side outputs (indices, masks, stats) were used
            needed = needed_by_node[node.name]
            start = time.perf_counter() if self.timings is not None else 0.0
            if op.reuses_grads:
                gins = op.backward(ctx, gouts, needed, owned=tuple(grads.owned(g) for g in gouts))
            else:
                gins = op.backward(ctx, gouts, needed)
            if self.timings is not None:
                entry = (node.name, "backward")
                self.timings[entry] = self.timings.get(entry, 0.0) + time.perf_counter() - start
            for name, g, want in zip(node.inputs, gins, needed):
                if g is not None and want:
                    grads.add(name, g)
        return grads.final()


class _Pending:
    """The gradients backward still holds, by value name, and how many of them use each array's memory.

    A fan-out's sum goes in place into the pending array where nothing else can see it: an array of its
    own, sharing no memory with the addend, and the only pending gradient on its memory (an Add hands one
    array to both inputs; a Reshape returns a view). The same sum either way (IEEE addition commutes); in
    place saves writing a new array: ResNet-20's nine residual sums at batch 128 took 3.2-3.4 ms a step
    instead of 4.2-4.4 (one process, alternating); on the thread pool (`kernels.accumulate`) a further
    1-2 ms less on a 2-core Xeon. The count keeps the test O(1): asking every pending
    gradient instead (np.may_share_memory against each) cost 6-7 ms a step on a gated ResNet-38 at batch 32,
    where the shared gate parameters' gradients are summed 18 times with a hundred gradients pending.
    """

    def __init__(self, seeds: dict[str, np.ndarray]):
        self.values: dict[str, np.ndarray] = {}
        self._users: dict[int, int] = {}  # id of an owning array -> pending gradients on its memory
        self._seeds = {id(g) for g in seeds.values()}  # the caller's arrays: never handed over (`owned`)
        for name, g in seeds.items():
            self.add(name, g)

    def owned(self, g: object) -> bool:
        """Whether g, just popped, is an array nothing else can see, so its reader may overwrite it: one that
        owns its memory, writeable and C-contiguous, no seed, and no pending gradient on its memory."""
        return (type(g) is np.ndarray and g.base is None and g.flags.writeable and g.flags.c_contiguous
                and id(g) not in self._seeds and id(g) not in self._users)

    def _count(self, a: object, step: int) -> None:
        """Add step to the count of a's owning array (the array itself when it owns its data)."""
        if not isinstance(a, np.ndarray):
            return
        while isinstance(a.base, np.ndarray):
            a = a.base
        key = id(a)
        users = self._users.get(key, 0) + step
        if users:
            self._users[key] = users
        else:
            del self._users[key]

    def pop(self, name: str) -> np.ndarray | None:
        """Take the gradient of `name` out (None if it has none); a `Dilated` one as its full array."""
        g = self.values.pop(name, None)
        if type(g) is Dilated:
            return g.dense()
        if g is not None:
            self._count(g, -1)
        return g

    def final(self) -> dict[str, np.ndarray]:
        """The gradients still held (those of leaves), every one a full array."""
        return {name: g.dense() if type(g) is Dilated else g for name, g in self.values.items()}

    def _writable(self, a: object, other: object, users: int) -> bool:
        """Whether the sum of a and other may go into a in place: a owns its memory, which exactly `users` pending
        gradients (a itself, if pending) and no seed use and other does not overlap, and has the sum's shape and
        dtype."""
        return (type(a) is np.ndarray and a.flags.owndata and a.flags.writeable and a.flags.c_contiguous
                and a.shape == other.shape and np.result_type(a, other.dtype) == a.dtype
                and self._users.get(id(a), 0) == users and id(a) not in self._seeds
                and not (isinstance(other, np.ndarray) and np.may_share_memory(a, other)))

    def add(self, name: str, g: np.ndarray | Dilated) -> None:
        """Add g to the gradient of `name`, in place where that is safe (class doc). A `Dilated` g (a
        subsampling conv's input gradient, `kernels.strided`) goes into the other gradient's pixels it covers."""
        acc = self.values.get(name)
        if acc is None:
            self.values[name] = g
            self._count(g, 1)
            return
        if type(g) is Dilated or type(acc) is Dilated:
            sparse, full = (g, acc) if type(g) is Dilated else (acc, g)
            if type(full) is Dilated:
                full = full.dense().astype(np.result_type(full.dtype, sparse.dtype), copy=False)
            elif full is acc and self._writable(acc, sparse, users=1):
                sparse.add_into(acc)  # acc stays pending, its count unchanged
                return
            elif not (full is g and self._writable(g, sparse, users=0)):  # g not pending yet: no other user
                full = np.array(full, dtype=np.result_type(full, sparse.dtype))
            sparse.add_into(full)
            self._count(acc, -1)
            self.values[name] = full
            self._count(full, 1)
        elif self._writable(acc, g, users=1):
            add_into(acc, g)
        else:
            self._count(acc, -1)
            self.values[name] = total = acc + g
            self._count(total, 1)
