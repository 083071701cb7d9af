"""Residual blocks and gateable layers of an imported graph, the units FracTrain's DFQ gates per sample.

A block is the region between a fork value and the Add that joins its two paths: the residual branch
(the path with more MAC work, which a gate may run at a chosen precision or skip) and the shortcut
(identity, or a projection). Skipping a block replaces the Add's output by the shortcut value, so a
branch is only accepted when nothing but that Add sees what it computes.

Nested or overlapping candidates are resolved by keeping the outer-most one (the larger branch; on a
tie, the earlier join) and refusing every candidate whose branch or join overlaps it: gates then form
a flat partition, and skipping a block never has to reason about a gate inside it.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field, replace
from typing import Any

from edgetrain.graph import Graph, Node
from edgetrain.layers import classifier_nodes, is_activation_product, mac_nodes


@dataclass(frozen=True)
class Block:
    """One residual block: fork -> (branch | shortcut) -> Add join."""

    index: int  # 0, 1, 2... in execution order of the join
    fork: str  # the value both paths start from (the block input)
    join: Node  # the Add node that joins the paths
    residual_input: str  # the Add input fed by the residual branch
    shortcut_input: str  # the Add input fed by the shortcut (== fork for an identity shortcut)
    branch: tuple[Node, ...]  # residual branch nodes (fork and join excluded), execution order
    shortcut: tuple[Node, ...]  # shortcut path nodes (empty for identity), execution order
    output: str  # join.outputs[0]
    # Names of branch nodes that layers.mac_nodes counts (they read a trainable parameter); find_blocks fills it.
    mac_names: frozenset[str] = field(default=frozenset(), repr=False)

    @property
    def mac_nodes(self) -> tuple[Node, ...]:
        """MAC nodes of the residual branch, in execution order."""
        return tuple(n for n in self.branch if n.name in self.mac_names)


@dataclass(frozen=True)
class LayerUnit:
    """One gated MAC layer, the DFQ unit for models without residual blocks."""

    index: int
    node: Node


def gateable_layers(graph: Graph) -> list[Node]:
    """MAC nodes a DFQ gate may control: all but the stem (first MAC node), the classifier and MatMuls
    between two activations (a gated layer reads one activation, the fork; inside a gated block they run)."""
    macs = mac_nodes(graph)
    keep_full = {n.name for n in classifier_nodes(graph)}
    return [n for n in macs[1:] if n.name not in keep_full and not is_activation_product(graph, n)]


def layer_units(graph: Graph) -> list[LayerUnit]:
    """gateable_layers(graph) numbered in execution order."""
    return [LayerUnit(i, n) for i, n in enumerate(gateable_layers(graph))]


def find_blocks(graph: Graph) -> list[Block]:
    """Residual blocks of graph, in execution order of their joining Add (see the module docstring)."""
    finder = _BlockFinder(graph)
    candidates = [b for join in graph.nodes if (b := finder.candidate(join)) is not None]
    kept: list[Block] = []
    taken: set[str] = set()
    # sorted() is stable, so among equal branch sizes the earlier join wins.
    for block in sorted(candidates, key=lambda b: -len(b.branch)):
        region = {n.name for n in block.branch} | {block.join.name}
        if region & taken:
            continue
        taken |= region
        kept.append(block)
    kept.sort(key=lambda b: finder.order[b.join.name])
    return [replace(b, index=i) for i, b in enumerate(kept)]


def describe_blocks(graph: Graph) -> list[dict[str, Any]]:
    """JSON-ready summaries of find_blocks(graph)."""
    return [
        {
            "index": b.index,
            "fork": b.fork,
            "join": b.join.name,
            "output": b.output,
            "residual_input": b.residual_input,
            "shortcut_input": b.shortcut_input,
            "branch": [n.name for n in b.branch],
            "shortcut": [n.name for n in b.shortcut],
            "macs": [n.name for n in b.mac_nodes],
        }
        for b in find_blocks(graph)
    ]


class _BlockFinder:
    """Graph facts shared by every candidate join, computed once."""

    def __init__(self, graph: Graph) -> None:
        self.graph = graph
        self.producer = graph.producer_of()
        self.order = {n.name: i for i, n in enumerate(graph.nodes)}
        # Execution position of every value that can be a fork: graph inputs first, then node outputs.
        # Initializers and folded constants are absent, so they are never forks nor join operands.
        inputs = [v.name for v in graph.inputs]
        self.position = {name: i - len(inputs) for i, name in enumerate(inputs)}
        self.position.update({o: self.order[n.name] for n in graph.nodes for o in n.outputs if o})
        self.initializers = set(graph.params) | set(graph.buffers) | set(graph.constants)
        self.consumers: dict[str, list[Node]] = defaultdict(list)
        for n in graph.nodes:
            for i in set(n.inputs) - {""}:
                self.consumers[i].append(n)
        self.graph_outputs = {o.name for o in graph.outputs}
        macs = mac_nodes(graph)
        self.macs = {n.name for n in macs}
        # FracTrain keeps the stem and the classifier at full precision: a gate must never skip them.
        self.protected = {n.name for n in macs[:1] + classifier_nodes(graph)}

    def candidate(self, join: Node) -> Block | None:
        """The block join closes, or None if join is not the Add of an acceptable residual block."""
        if join.op_type != "Add" or len(join.inputs) != 2:
            return None
        a, b = join.inputs
        # Both operands must be values (node outputs or graph inputs): an initializer operand is a bias Add.
        if a == b or a not in self.position or b not in self.position:
            return None
        ancestors_a, ancestors_b = self._ancestors(a), self._ancestors(b)
        common = ancestors_a & ancestors_b
        if not common:
            return None  # two independent values
        fork = max(common, key=self.position.__getitem__)
        below_fork = self._descendants(fork)
        path_a = self._path(ancestors_a, below_fork)
        path_b = self._path(ancestors_b, below_fork)
        # The residual path does more MAC work; on a tie the first Add input is taken (sorted is stable).
        (residual_input, branch), (shortcut_input, shortcut) = sorted(
            [(a, path_a), (b, path_b)], key=lambda p: -self._mac_count(p[1]))
        if not self._mac_count(branch):
            return None
        branch_names = {n.name for n in branch}
        if branch_names & {n.name for n in shortcut} or branch_names & self.protected:
            return None
        if not self._closed(branch, branch_names, fork, join, residual_input):
            return None
        return Block(index=-1, fork=fork, join=join, residual_input=residual_input, shortcut_input=shortcut_input,
                     branch=branch, shortcut=shortcut, output=join.outputs[0],
                     mac_names=frozenset(branch_names & self.macs))

    def _ancestors(self, value: str) -> set[str]:
        """value and every non-initializer value it is computed from."""
        seen: set[str] = set()
        stack = [value]
        while stack:
            v = stack.pop()
            if v in seen or v not in self.position:
                continue
            seen.add(v)
            node = self.producer.get(v)
            if node is not None:
                stack.extend(node.inputs)
        return seen

    def _descendants(self, value: str) -> set[str]:
        """Names of the nodes that read value, directly or through other nodes."""
        reached, names = {value}, set()
        start = self.position[value] + 1 if value in self.producer else 0  # graph inputs precede every node
        for n in self.graph.nodes[start:]:
            if reached.intersection(n.inputs):
                names.add(n.name)
                reached.update(n.outputs)
        return names

    def _path(self, ancestors: set[str], below_fork: set[str]) -> tuple[Node, ...]:
        """Nodes below the fork that produce one of ancestors, in execution order."""
        return tuple(n for n in self.graph.nodes if n.name in below_fork and ancestors.intersection(n.outputs))

    def _mac_count(self, nodes: tuple[Node, ...]) -> int:
        return sum(n.name in self.macs for n in nodes)

    def _closed(self, branch: tuple[Node, ...], names: set[str], fork: str, join: Node, residual_input: str) -> bool:
        """True if the branch reads only the fork and initializers, and only the join reads its result."""
        produced = {o for n in branch for o in n.outputs if o}
        allowed = produced | self.initializers | {fork, ""}
        if any(i not in allowed for n in branch for i in n.inputs):
            return False
        if produced & self.graph_outputs:
            return False
        for value in produced:
            for reader in self.consumers.get(value, ()):
                if reader.name not in names and not (reader is join and value == residual_input):
                    return False
        return True
