"""DFQ, dynamic fractional quantisation: each sample picks its own precision for each gated unit.

A unit is a residual block (edgetrain.blocks: the branch between a fork and the Add that joins it) or,
in a model without blocks, one MAC layer. A gate (edgetrain.gates) looks at the unit's input and picks
one of K candidates per sample: an FW/BW pair at a fixed weight precision, or 0 bits (skip: the
block's output is its shortcut). The unit then runs for real, per sample group:

- samples are sorted by the candidate they chose; each MAC layer quantises every group with that
  group's own ranges at that group's bit-widths, forward and backward; the groups' integer codes
  then share kernel calls (edgetrain.grouped_mac: exact, one call instead of one per group);
- the ops between MAC layers (BatchNorm, ReLU, ...) run once on all samples that execute the unit;
- samples that skip do no work in the branch and cost nothing there.

The reference implementation computes every candidate for every sample and only counts the chosen
one; here only the chosen work is done, so its savings show up in measured time.

Gates are trained with the straight-through estimator. dL/d(choice k) of a sample is the dot product
of dL/d(unit output) with what candidate k added to it; the unit ran only the chosen candidate, and
every executing candidate computes the same function of the same weights at another precision, so
the chosen candidate's output stands in for all of them (the skip candidate adds nothing: its
derivative is 0). The candidates among executing ones are told apart by the cost regulariser:

    loss = task loss + r * beta * C,  C = sum over the batch of each sample's cost of the gated
    layers, in percent of the same sample's fp32 training cost of those layers; r = +1 while the
    batch's mean cost is at or above the target, -1 below it (bang-bang), as in FracTrain.

C is summed over samples, not averaged, so the pull on each sample's gate does not shrink with the
batch size (with a batch mean and beta = 1e-3 the gates would hardly move in a fine-tuning run).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .blocks import Block, find_blocks, layer_units
from .cost import FP32_STEP_FACTOR, LayerCost, layer_step_cost
from .errors import EdgetrainError
from .gate_kernels import pooled_grad_scatter_add, sample_dots, scatter_add
from .gates import (
    EMBED_WIDTH,
    SHARED_NAMES,
    gate_backward,
    gate_forward,
    init_gate_params,
    logit_mask,
    pooled_grad_to_input,
    straight_through,
    unit_param_names,
)
from .graph import Graph, Node
from .grouped_mac import GroupedContext, can_group, grouped_backward, grouped_forward
from .layers import non_negative_values
from .ops.base import Op
from .ops.norm import BatchNormalization, fuse_relu
from .precision import FP32, LayerPrecision, parse_precision
from .qops import QuantMAC, integer_form

if TYPE_CHECKING:
    from .model import Model

# FracTrain's CIFAR candidates (FW/BW), plus skipping; weights at a fixed 4 bits.
DEFAULT_CANDIDATES = ("0", "3/6", "4/6", "4/8", "6/8", "6/12")
DEFAULT_WEIGHT_BITS = 4
DEFAULT_TARGET = 3.0  # percent of the gated layers' fp32 training cost (FracTrain, CIFAR)
DEFAULT_BETA = 1e-3
DEFAULT_UNGATED = "8/8"  # stem and shortcut convs: outside every gate, at the static baseline's bits
INITIAL_LOGIT = 2.0  # head bias lead of the candidate training starts from
CANDIDATE_STREAM_STRIDE = 1 << 20  # keeps each candidate's stochastic-rounding streams apart
SKIP_WORDS = ("0", "0/0", "skip")


@dataclass(frozen=True)
class GatedPrecision(LayerPrecision):
    """What a gated layer reports as its precision: chosen per sample, weights at a fixed width."""

    def __str__(self) -> str:
        return f"dfq:w{self.weight_bits}"


@dataclass(frozen=True)
class Candidate:
    """One choice a gate can make: an FW/BW pair (weights at the DFQ width), or skip."""

    text: str
    precision: LayerPrecision | None  # None: skip the unit

    @property
    def skip(self) -> bool:
        return self.precision is None


def parse_candidates(specs, weight_bits: int) -> tuple[Candidate, ...]:
    """Read candidates like ("0", "3/6", "4/8"); "0" (or "skip") means skip the block."""
    out = []
    for spec in specs:
        text = str(spec).strip().lower()
        if text in SKIP_WORDS:
            out.append(Candidate("skip", None))
            continue
        p = parse_precision(text)
        if p.is_float:
            raise EdgetrainError(f"dfq candidate '{spec}': candidates are FW/BW bits (or 0 to skip), not fp32")
        out.append(Candidate(f"{p.act_bits}/{p.grad_bits}", LayerPrecision(p.act_bits, weight_bits, p.grad_bits)))
    if len({c.text for c in out}) != len(out):
        raise EdgetrainError(f"dfq candidates {list(specs)}: each candidate may appear once")
    if not any(not c.skip for c in out):
        raise EdgetrainError(f"dfq candidates {list(specs)}: at least one must compute (FW/BW bits)")
    return tuple(out)


@dataclass
class DFQConfig:
    """Every knob of DFQ, with FracTrain's CIFAR values as defaults."""

    candidates: tuple[str, ...] = DEFAULT_CANDIDATES
    weight_bits: int = DEFAULT_WEIGHT_BITS
    target: float = DEFAULT_TARGET
    beta: float = DEFAULT_BETA
    initial_logit: float = INITIAL_LOGIT
    initial_choice: str | None = None  # default: the computing candidate whose cost is nearest the target
    cost_table: dict[str, dict[str, float]] | None = None  # layer -> precision -> seconds (edgetrain.latency)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready settings, for the run's record."""
        return {"candidates": list(self.candidates), "weight_bits": self.weight_bits, "target": self.target,
                "beta": self.beta, "initial_logit": self.initial_logit, "initial_choice": self.initial_choice}


@dataclass
class Unit:
    """One gated unit, as built from a Block or a single layer."""

    index: int
    name: str
    fork: str
    shortcut: str | None  # None: no shortcut, so no skip candidate (a gated layer)
    branch: tuple[Node, ...]
    output: str  # the value the unit writes (the join's output, or the layer's)
    branch_output: str  # the branch's last value (the join's residual input, or the layer's output)
    macs: dict[str, int] = field(default_factory=dict)  # per-sample MACs of each gated layer


@dataclass
class StepRecord:
    """What the last forward chose: per unit, the candidate index of every sample."""

    choices: dict[int, np.ndarray] = field(default_factory=dict)
    batch: int = 0


class DFQ:
    """DFQ attached to one Model: its units, gates, candidates, cost regulariser and per-step record."""

    def __init__(self, model: "Model", config: DFQConfig):
        self.model = model
        self.config = config
        self.candidates = parse_candidates(config.candidates, config.weight_bits)
        graph = model.graph
        blocks = find_blocks(graph)
        self.units = [self._unit_from_block(b) for b in blocks] if blocks else [
            Unit(u.index, u.node.name, u.node.inputs[0], None, (u.node,), u.node.outputs[0], u.node.outputs[0])
            for u in layer_units(graph)]
        if not self.units:
            raise EdgetrainError(f"{graph.source}: DFQ found no residual block and no MAC layer to gate "
                                 "(the stem and the classifier are never gated)")
        # Units without a shortcut cannot skip: their gates choose among the computing candidates only.
        self.unit_candidates = {u.index: tuple(i for i, c in enumerate(self.candidates) if u.shortcut or not c.skip)
                                for u in self.units}
        if any(not self.unit_candidates[u.index] for u in self.units):
            raise EdgetrainError("dfq: a gated layer without a shortcut needs a computing candidate")
        macs = {n.name for n in model._mac_nodes}
        self.gated_layers = {n.name for u in self.units for n in u.branch if n.name in macs}
        self.skips = np.array([c.skip for c in self.candidates])
        # Added to a unit's logits: -inf on the candidates it may not take (a layer without a shortcut cannot skip).
        self.logit_masks = {u.index: logit_mask(self.unit_candidates[u.index], len(self.candidates))
                            for u in self.units}
        self._measure(model)
        self.unit_cost, self.unit_fp32 = self._costs()
        total_fp32 = sum(self.unit_fp32.values())
        # Each candidate's cost over all units, percent of their fp32 cost: what a target is compared to.
        self.total_percent = [100 * sum(self.unit_cost[u.index][k] for u in self.units) / total_fp32
                              for k in range(len(self.candidates))]
        self.computing = [k for k, c in enumerate(self.candidates) if not c.skip]
        self.target = float(config.target)
        self.param_names: list[str] = []
        self.state: tuple[np.ndarray, np.ndarray] | None = None  # the LSTM's (h, c) during a forward
        self.dstate: tuple[np.ndarray, np.ndarray] | None = None  # dL/d(h, c) during a backward
        self.record = StepRecord()
        self.sign = 0.0  # r of the last step's regulariser (0 before any training step)
        self.last_percent = 0.0  # the last batch's mean gated cost, percent of fp32
        self.force: dict[int, np.ndarray] | None = None  # tests: fixed choices per unit instead of the gates
        self.kernel_calls = 0  # MAC-layer passes inside units (tests count skipped work with it)
        # Groups of a gated layer share kernel calls (edgetrain.grouped_mac); False: one op call per group.
        self.merge_groups = True
        self._init_params(model)
        self._build_ops(model)

    # -- construction ------------------------------------------------------------------------------
    def _unit_from_block(self, b: Block) -> Unit:
        shortcut = b.shortcut_input
        return Unit(b.index, f"block{b.index}", b.fork, shortcut, b.branch, b.output, b.residual_input)

    def _measure(self, model: "Model") -> None:
        """Per-sample MACs of every gated layer and the input channels of every unit, from one float forward."""
        from .engine import Executor

        shape = tuple(1 if d is None else d for d in model.input_shape)
        feeds = {model.input_name: np.zeros(shape, model.dtype)}
        env, _ = Executor(model.graph, model._float_ops).forward(feeds, model._state(), False)
        self.channels, self.spatial_dims = [], []
        for u in self.units:
            self.channels.append(int(env[u.fork].shape[1]))
            self.spatial_dims.append(tuple(int(d) for d in env[u.fork].shape[2:]))
            for node in u.branch:
                if node.name in self.gated_layers:
                    ins = [env[i].shape if i else () for i in node.inputs]
                    outs = [env[o].shape for o in node.outputs if o]
                    u.macs[node.name] = int(model._float_ops[node.name].macs(ins, outs))

    def _costs(self) -> tuple[dict[int, np.ndarray], dict[int, float]]:
        """Per unit: each candidate's per-sample training cost, and the fp32 one (BitOPs, or measured seconds)."""
        table = self.config.cost_table
        costs, fp32 = {}, {}
        for u in self.units:
            work = sum(u.macs.values())
            fp32[u.index] = float(work * FP32_STEP_FACTOR) if table is None else self._table_cost(u, "fp32")
            row = []
            for c in self.candidates:
                if c.skip:
                    row.append(0.0)
                elif table is not None:
                    row.append(self._table_cost(u, str(c.precision)))
                else:
                    a, w, g = c.precision.bitops_bits()
                    row.append(float(work * (a * w + g * w + a * g)))
            costs[u.index] = np.array(row)
        return costs, fp32

    def _table_cost(self, u: Unit, precision: str) -> float:
        """A unit's measured cost at one precision: the sum over its gated layers (edgetrain.latency)."""
        total = 0.0
        for layer in u.macs:
            entry = self.config.cost_table.get(layer, {})
            if precision not in entry:
                raise EdgetrainError(f"dfq cost table: no timing for layer '{layer}' at '{precision}' "
                                     f"(profile the model at that precision with --latency-table)")
            total += entry[precision]
        return total

    def candidate_percent(self) -> dict[str, dict[str, float]]:
        """Each unit's candidates' cost in percent of the unit's fp32 training cost."""
        return {u.name: {self.candidates[k].text: 100 * self.unit_cost[u.index][k] / self.unit_fp32[u.index]
                         for k in self.unit_candidates[u.index]} for u in self.units}

    def _nearest(self, target: float) -> int:
        """The computing candidate whose cost over all units is nearest `target` (percent of fp32)."""
        return min(self.computing, key=lambda k: abs(self.total_percent[k] - target))

    def _below(self, target: float) -> int:
        """The costliest computing candidate at or below `target`, else the cheapest computing one."""
        percent = self.total_percent
        under = [k for k in self.computing if percent[k] <= target]
        return max(under, key=percent.__getitem__) if under else min(self.computing, key=percent.__getitem__)

    def aim(self, target: float) -> None:
        """Move to a new cost target and point the gates at it: the head's bias starts again from its
        initial lead, on the costliest computing candidate at or below the target (its other entries
        at their mean), so the regulariser first pulls the cost up to the target.

        Why: after a long stretch at one target the bang-bang regulariser has pushed the head's bias
        until the softmax saturates; a saturated softmax passes the straight-through estimator almost
        no gradient, so without this the gates would stay where the old target left them (FracTrain
        on ResNet-8 kept every sample at the cheapest candidate for its last three targets). Starting
        below rather than above: a pull down late in training, when the task loss is near 0 and says
        little about what a block is worth, drives samples to skip, and one such run fell from 97% to
        40% test accuracy in its last 120 steps."""
        self.target = float(target)
        bias = self.model.parameters()[SHARED_NAMES[-1]]
        lead = bias.dtype.type(self.config.initial_logit)
        bias[...] = bias.mean(dtype=np.float64)
        bias[self._below(target)] += lead

    def _initial_choice(self) -> int:
        if self.config.initial_choice is not None:
            texts = [c.text for c in self.candidates]
            want = parse_candidates([self.config.initial_choice], self.config.weight_bits)[0].text
            if want not in texts:
                raise EdgetrainError(f"dfq initial choice '{self.config.initial_choice}' is not a candidate")
            return texts.index(want)
        return self._nearest(self.target)

    def _init_params(self, model: "Model") -> None:
        existing = [n for n in model.parameters() if n.startswith("dfq.")]
        if existing:
            raise EdgetrainError(f"the model already has DFQ gate parameters ({existing[0]}, ...)")
        params = init_gate_params(self.channels, len(self.candidates), model.seed, self._initial_choice(),
                                  self.config.initial_logit, model.dtype)
        model.parameters().update(params)
        self.param_names = list(params)

    def _build_ops(self, model: "Model") -> None:
        """One GatedUnit op per unit in a new executor; the graph's other nodes keep their ops."""
        from .engine import Executor

        graph = model.graph
        inside = {n.name for u in self.units for n in u.branch}
        joins = {}
        for u in self.units:
            last = next(n for n in graph.nodes if u.output in n.outputs)
            joins[last.name] = u
        nodes: list[Node] = []
        ops = dict(model.executor.ops)
        facts = (non_negative_values(graph), {n.name: i for i, n in enumerate(model._mac_nodes)})
        for node in graph.nodes:
            if node.name in inside and node.name not in joins:
                continue
            if node.name in joins:
                u = joins[node.name]
                unit_node, op = self._unit_node(model, u, facts)
                nodes.append(unit_node)
                ops[unit_node.name] = op
                continue
            nodes.append(node)
        params = {**graph.params, **{n: model.parameters()[n] for n in self.param_names}}
        self.graph = Graph(nodes, graph.inputs, graph.outputs, params, graph.buffers, graph.constants, graph.opset,
                           graph.source, graph.producer, graph.original)
        model.executor = Executor(self.graph, ops)

    def _unit_node(self, model: "Model", u: Unit, facts: tuple) -> tuple[Node, "GatedUnit"]:
        produced = {o for n in u.branch for o in n.outputs if o}
        externals: list[str] = []
        for n in u.branch:
            for i in n.inputs:
                if i and i not in produced and i != u.fork and i not in externals:
                    externals.append(i)
        w1, b1, w2, b2 = unit_param_names(u.index)
        inputs = [u.fork, u.shortcut or ""] + externals + [w1, b1, w2, b2, *SHARED_NAMES]
        node = Node(f"dfq.{u.name}", "DFQUnit", inputs, [u.output], {})
        return node, GatedUnit(node, model.graph.opset, self, u, len(externals), model, *facts)

    # -- per step ------------------------------------------------------------------------------------
    def begin_forward(self) -> None:
        """Reset the gates' LSTM state and the step record (FracTrain: state reset per forward)."""
        self.state = None
        self.dstate = None
        self.record = StepRecord()

    def mark_precision(self, precision: dict[str, LayerPrecision]) -> None:
        """Gated layers report their per-sample precision (set_precision leaves them to their gates)."""
        for name in self.gated_layers:
            precision[name] = GatedPrecision(0, self.config.weight_bits, 0)

    def sample_percent(self) -> np.ndarray:
        """Each sample's cost of the gated layers in the last forward, in percent of its fp32 cost."""
        total = np.zeros(self.record.batch)
        for u in self.units:
            total += self.unit_cost[u.index][self.record.choices[u.index]]
        return 100.0 * total / sum(self.unit_fp32.values())

    def regularise(self) -> float:
        """After a training forward: set r and return the loss term r * beta * C (module doc)."""
        per_sample = self.sample_percent()
        self.last_percent = float(per_sample.mean())
        self.sign = 1.0 if self.last_percent >= self.target else -1.0
        return self.sign * self.config.beta * float(per_sample.sum())

    def cost_gradient(self, unit: Unit) -> np.ndarray:
        """dL/d(one-hot choice) of one unit's gate from the regulariser: the same for every sample."""
        return self.sign * self.config.beta * 100.0 * self.unit_cost[unit.index] / sum(self.unit_fp32.values())

    def step_costs(self) -> tuple[dict[str, LayerCost], dict[str, LayerCost]]:
        """BitOPs of the gated layers in the last forward: as chosen, and as fp32 for every sample."""
        costs, fp32 = {}, {}
        n = self.record.batch
        for u in self.units:
            counts = np.bincount(self.record.choices[u.index], minlength=len(self.candidates))
            for name, macs in u.macs.items():
                costs[name] = sum((layer_step_cost(int(counts[k]) * macs, c.precision, 0)
                                   for k, c in enumerate(self.candidates) if not c.skip and counts[k]),
                                  LayerCost(0, 0, 0, 0, 0))
                fp32[name] = layer_step_cost(n * macs, FP32, 0)
        return costs, fp32

    def static_form(self, layer: str, candidate: str) -> tuple[LayerPrecision, str, bool]:
        """A gated layer run at one candidate for every sample: its precision, range key, unsigned input."""
        texts = [c.text for c in self.candidates]
        want = parse_candidates([candidate], self.config.weight_bits)[0]
        if want.skip or want.text not in texts:
            raise EdgetrainError(f"'{candidate}' is not a computing DFQ candidate; choose from "
                                 f"{', '.join(t for t, c in zip(texts, self.candidates) if not c.skip)}")
        unit = next(op for op in self.model.executor.ops.values()
                    if isinstance(op, GatedUnit) and layer in op.unit.macs)
        op = unit.candidate_ops[texts.index(want.text)][layer]
        return want.precision, op.range_key, op.unsigned_input

    def most_precise(self) -> str:
        """The costliest computing candidate that every gated layer has trained at (so it has activation
        ranges): what a static int8 export defaults to."""
        def cost(c: Candidate) -> int:
            a, w, g = c.precision.bitops_bits()
            return a * w + g * w + a * g

        ranges = self.model.runtime.act_ranges
        trained = [c for c in self.candidates if not c.skip and all(
            (r := ranges.get(f"{layer}@{c.text}")) is not None and r.value for layer in self.gated_layers)]
        return max(trained or [c for c in self.candidates if not c.skip], key=cost).text

    def choice_summary(self) -> dict[str, dict[str, float]]:
        """Fraction of the last batch's samples that chose each candidate, per unit."""
        out = {}
        for u in self.units:
            counts = np.bincount(self.record.choices[u.index], minlength=len(self.candidates))
            out[u.name] = {c.text: float(counts[k]) / max(self.record.batch, 1) for k, c in enumerate(self.candidates)}
        return out

    def describe(self) -> dict[str, Any]:
        """JSON-ready summary: settings, units and their gated layers, candidate costs."""
        return {"settings": self.config.as_dict(), "units": [
            {"name": u.name, "fork": u.fork, "output": u.output, "can_skip": u.shortcut is not None,
             "layers": list(u.macs), "macs_per_sample": sum(u.macs.values())} for u in self.units],
            "candidate_percent": self.candidate_percent(), "gate_parameters": len(self.param_names)}


def gating_plan(graph: Graph) -> dict[str, Any]:
    """What DFQ would gate in this graph, without building anything: residual blocks, else layers."""
    blocks = find_blocks(graph)
    if blocks:
        return {"kind": "blocks", "units": [
            {"name": f"block{b.index}", "fork": b.fork, "output": b.output, "can_skip": True,
             "layers": [n.name for n in b.mac_nodes], "shortcut": [n.name for n in b.shortcut]} for b in blocks]}
    return {"kind": "layers", "units": [{"name": u.node.name, "fork": u.node.inputs[0], "output": u.node.outputs[0],
                                         "can_skip": False, "layers": [u.node.name]} for u in layer_units(graph)]}


class GatedUnit(Op):
    """The executor's op for one unit: gate, per-group execution of the branch, shortcut, backward."""

    def __init__(self, node: Node, opset: int, dfq: DFQ, unit: Unit, n_externals: int, model: "Model",
                 unsigned: set[str], mac_index: dict[str, int]):
        """unsigned: values the graph proves non-negative; mac_index: each MAC layer's position (stream keys)."""
        super().__init__(node, opset)
        self.dfq = dfq
        self.unit = unit
        self.n_externals = n_externals
        self.produced = {o for n in unit.branch for o in n.outputs if o}
        self.float_ops: dict[str, Op] = {}
        self.candidate_ops: dict[int, dict[str, QuantMAC]] = {}
        after_mac = set()
        readers, outputs = model.graph.consumers_of(), {o.name for o in model.graph.outputs}
        for n in unit.branch:
            if n.name in dfq.gated_layers:
                after_mac.update(o for o in n.outputs if o)
                form = integer_form(n, model.parameters())
                if form is None:
                    raise EdgetrainError(f"dfq: layer '{n.name}' ({n.op_type}) cannot run on the integer kernels, "
                                         "so it cannot be gated")
                for k, c in enumerate(dfq.candidates):
                    if c.skip:
                        continue
                    stream = mac_index[n.name] + (k + 1) * CANDIDATE_STREAM_STRIDE
                    op = form(model._float_ops[n.name], c.precision, stream, n.inputs[0] in unsigned, model.runtime)
                    op.range_key = f"{n.name}@{c.text}"
                    self.candidate_ops.setdefault(k, {})[n.name] = op
            elif n.op_type == "BatchNormalization" and n.inputs[0] in after_mac:
                bn = BatchNormalization(n, opset)
                bn.parallel = True
                self.float_ops[n.name] = bn
                fused = fuse_relu(n, bn, readers, outputs, opset)
                if fused is not None:
                    self.float_ops[fused[0].name] = fused[1]
            elif n.name not in self.float_ops:  # a Relu folded into its BatchNorm above keeps its stand-in
                self.float_ops[n.name] = model._float_ops[n.name]

    def _timed(self, inner: str, direction: str, call, *args):
        """call(*args), its seconds added to the executor's timings under ("<unit node>/<inner>", direction)
        while a profiler has them switched on: the breakdown of this unit's own entry."""
        timings = self.dfq.model.executor.timings
        if timings is None:
            return call(*args)
        start = time.perf_counter()
        out = call(*args)
        key = (f"{self.node.name}/{inner}", direction)
        timings[key] = timings.get(key, 0.0) + time.perf_counter() - start
        return out

    # -- forward -----------------------------------------------------------------------------------
    def _choose(self, x: np.ndarray, params: tuple, shared: tuple):
        dfq = self.dfq
        n = x.shape[0]
        h, c = dfq.state if dfq.state is not None else (np.zeros((n, EMBED_WIDTH), x.dtype), np.zeros((n, EMBED_WIDTH), x.dtype))
        logits, gctx = self._timed("gate", "forward", gate_forward, x, params, shared, h, c, dfq.logit_masks[self.unit.index])
        dfq.state = (gctx.h, gctx.c)
        if dfq.force is not None and self.unit.index in dfq.force:
            choice = np.broadcast_to(np.asarray(dfq.force[self.unit.index], np.int64), (n,)).copy()
        else:
            choice = logits.argmax(axis=1)
        return choice, gctx

    def forward(self, inputs, training):
        dfq, u = self.dfq, self.unit
        x, shortcut = inputs[0], inputs[1]
        externals = dict(zip(self.node.inputs[2:2 + self.n_externals], inputs[2:2 + self.n_externals]))
        gate_params = tuple(inputs[2 + self.n_externals:6 + self.n_externals])
        shared = tuple(inputs[6 + self.n_externals:])
        choice, gctx = self._choose(x, gate_params, shared)
        dfq.record.choices[u.index] = choice
        dfq.record.batch = x.shape[0]
        skip = dfq.skips[choice]
        order = np.argsort(choice, kind="stable")
        order = order[~skip[order]]  # executing samples, grouped by candidate
        # Every sample running, already in order (one candidate for all, say): plain slices, no copies.
        whole = len(order) == len(choice) and bool((order == np.arange(len(order))).all())
        if whole:
            order = slice(None)
        n_exec = x.shape[0] if whole else len(order)
        groups = []
        start = 0
        for k, count in enumerate(np.bincount(choice[order], minlength=len(dfq.candidates))):
            if count:
                groups.append((k, slice(start, start + int(count))))
                start += int(count)
        tape: list = []
        updates: dict[int, np.ndarray] = {}
        r = None
        if n_exec:
            env = {u.fork: x[order], **externals}
            for node in u.branch:
                args = [env[i] if i else None for i in node.inputs]
                if node.name in dfq.gated_layers:
                    ops = [self.candidate_ops[k][node.name] for k, _ in groups]
                    if len(groups) > 1 and dfq.merge_groups and can_group(ops, args[0]):
                        out, gctx_mac = self._timed(node.name, "forward", grouped_forward, ops,
                                                    [sl for _, sl in groups], args, training, self._count)
                        env[node.outputs[0]] = out
                        tape.append((node, None, gctx_mac))
                        continue
                    out, ctxs = None, []
                    for (k, sl), op in zip(groups, ops):
                        (y,), ctx = self._timed(node.name, "forward", op.forward, [args[0][sl]] + args[1:], training)
                        self._count(1)
                        if len(groups) == 1:
                            out = y  # one group is every executing sample: no copy
                        else:
                            if out is None:
                                out = np.empty((n_exec,) + y.shape[1:], y.dtype)
                            out[sl] = y
                        ctxs.append((k, sl, op, ctx))
                    env[node.outputs[0]] = out
                    tape.append((node, None, ctxs))
                    continue
                op = self.float_ops[node.name]
                outs, ctx = self._timed(node.name, "forward", op.forward, args, training)
                for name, value in zip(node.outputs, outs):
                    if name:
                        env[name] = value
                if training:
                    for pos, value in op.buffer_updates(ctx).items():
                        updates[self.node.inputs.index(node.inputs[pos])] = value
                tape.append((node, op, ctx))
            r = env[u.branch_output]
        if u.shortcut is not None:
            if whole:
                y = shortcut + r
            elif r is not None:
                y = scatter_add(shortcut, r, order)
            else:
                y = np.array(shortcut, copy=True)
        elif whole:
            y = r
        else:
            y = np.empty((x.shape[0],) + r.shape[1:], r.dtype)
            y[order] = r
        return [y], (gctx, choice, order, n_exec, tape, r, updates, x.shape, x.dtype, gate_params, shared)

    def buffer_updates(self, ctx):
        return ctx[6]

    # -- backward ----------------------------------------------------------------------------------
    def backward(self, ctx, grads):
        dfq, u = self.dfq, self.unit
        gctx, choice, order, n_exec, tape, r, _, x_shape, dtype, gate_params, shared = ctx
        dout = grads[0]
        out: list[np.ndarray | None] = [None] * len(self.node.inputs)
        branch_dx = None
        k_count = len(dfq.candidates)
        d_onehot = np.zeros((x_shape[0], k_count), dtype)
        if n_exec:
            dr = dout[order]
            inner: dict[str, np.ndarray] = {u.branch_output: dr}
            # STE: the chosen candidate's contribution stands in for every computing candidate's (module doc).
            contribution = sample_dots(dr, r)
            d_onehot[order] = contribution[:, None] * ~dfq.skips[None, :]
            for node, op, nctx in reversed(tape):
                g_out = [inner.pop(o, None) if o else None for o in node.outputs]
                if g_out[0] is None:
                    continue
                if op is None:
                    gins = self._mac_backward(node, nctx, g_out[0], n_exec)
                else:
                    gins = self._timed(node.name, "backward", op.backward, nctx, g_out)
                for name, g in zip(node.inputs, gins):
                    if g is None or not name:
                        continue
                    if name in self.produced or name == u.fork:
                        inner[name] = inner[name] + g if name in inner else g
                    else:
                        pos = self.node.inputs.index(name)
                        out[pos] = g if out[pos] is None else out[pos] + g
            if u.fork in inner:
                branch_dx = inner[u.fork]
        d_onehot += dfq.cost_gradient(u).astype(dtype)[None, :]
        dlogits = straight_through(gctx.probs, d_onehot)  # 0 on masked candidates: their probability is 0
        n = x_shape[0]
        dh, dc = dfq.dstate if dfq.dstate is not None else (np.zeros((n, EMBED_WIDTH), dtype), np.zeros((n, EMBED_WIDTH), dtype))
        dpooled, dunit, dshared, dh_prev, dc_prev = self._timed("gate", "backward", gate_backward, gctx, dlogits, dh, dc,
                                                                gate_params, shared)
        dfq.dstate = (dh_prev, dc_prev)
        if branch_dx is None:
            dx = np.array(pooled_grad_to_input(dpooled, x_shape), dtype)
        else:
            dx = pooled_grad_scatter_add(dpooled, x_shape, branch_dx, None if isinstance(order, slice) else order)
        out[0] = dx
        if u.shortcut is not None:
            out[1] = dout
        base = 2 + self.n_externals
        for i, g in enumerate(tuple(dunit) + tuple(dshared)):
            out[base + i] = g.astype(dtype, copy=False)
        return out

    def _count(self, calls: int) -> None:
        """Count MAC-layer passes inside the unit (DFQ.kernel_calls)."""
        self.dfq.kernel_calls += calls

    def _mac_backward(self, node: Node, ctxs, g: np.ndarray, n_exec: int) -> list:
        """Each group's backward at its own precision: dx rows filled per group, weight grads summed."""
        if isinstance(ctxs, GroupedContext):
            return self._timed(node.name, "backward", grouped_backward, ctxs, g, self._count)
        dx, rest = None, None
        for k, sl, op, ctx in ctxs:
            gins = self._timed(node.name, "backward", op.backward, ctx, [g[sl]])
            self._count(1)
            if gins[0] is not None:
                if len(ctxs) == 1:
                    dx = gins[0]  # one group is every executing sample: no copy
                else:
                    if dx is None:
                        dx = np.empty((n_exec,) + gins[0].shape[1:], gins[0].dtype)
                    dx[sl] = gins[0]
            tail = list(gins[1:])
            rest = tail if rest is None else [b if a is None else (a if b is None else a + b) for a, b in zip(rest, tail)]
        return [dx] + rest

