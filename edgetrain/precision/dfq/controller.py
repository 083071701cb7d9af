"""DFQ, dynamic fractional quantisation: each sample picks its own precision for each gated unit.

A unit is a residual block (edgetrain.blocks: the branch between a fork and the Add that joins it) or,
in a model without blocks, one MAC layer. A gate (edgetrain.precision.dfq.gates) looks at the unit's input and picks
one of K candidates per sample: an FW/BW pair at a fixed weight precision, or 0 bits (skip: the
block's output is its shortcut). The unit then runs for real, per sample group:

- samples are sorted by the candidate they chose; each MAC layer quantises every group with that
  group's own ranges at that group's bit-widths, forward and backward; the groups' integer codes
  then share kernel calls (edgetrain.quant.mac: exact, one call instead of one per group);
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

With DFQConfig.estimator = "probe", a seeded share of each batch also runs a second candidate and
the gates learn from the measured difference as well (edgetrain.precision.dfq.probe,
docs/GATE_ESTIMATOR.md); DFQConfig.min_exec_share floors each skippable unit's executed share
(edgetrain.precision.dfq.guard); DFQConfig.selection = "quota" sends the share of computing samples the cost
target buys to the dearer candidate by the gates' ranking instead of their argmax (edgetrain.precision.dfq.quota).

C is summed over samples, not averaged, so the pull on each sample's gate does not shrink with the
batch size (with a batch mean and beta = 1e-3 the gates would hardly move in a fine-tuning run).
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from edgetrain.errors import EdgetrainError, ModelError
from edgetrain.graph import Node
from edgetrain.kernels import detfloat
from edgetrain.layers import non_negative_values
from edgetrain.ops.norm import BatchNormalization, FusedAway, sole_relu_reader
from edgetrain.precision.cost import LayerCost
from edgetrain.precision.dfq.config import Candidate, DFQConfig, GatedPrecision, parse_candidates
from edgetrain.precision.dfq.costs import candidate_costs, chosen_step_costs
from edgetrain.precision.dfq.gated_unit import GatedUnit
from edgetrain.precision.dfq.gates import PREFIX, SHARED_NAMES, init_gate_params, logit_mask, unit_param_names
from edgetrain.precision.dfq.quota import bracket, next_threshold, quota_mask, split
from edgetrain.precision.dfq.units import Unit, find_units, measure_units
from edgetrain.precision.spec import MAX_BITS, MIN_BITS, LayerPrecision

if TYPE_CHECKING:
    from edgetrain.model import Model
    from edgetrain.ops.base import Op


PRICE_BUFFER = PREFIX + "probe.price"  # the budget rule's running price per unit
# The quota selection's state per unit (edgetrain.precision.dfq.quota): its threshold, 1 once it is set, the carry.
QUOTA_BUFFER = PREFIX + "quota.threshold"


@dataclass
class StepRecord:
    """What the last forward chose: per unit, the candidate index of every sample."""

    choices: dict[int, np.ndarray] = field(default_factory=dict)
    batch: int = 0
    probe_runs: dict[int, np.ndarray] = field(default_factory=dict)  # per unit: probe samples run per candidate
    trained: dict[int, np.ndarray] = field(default_factory=dict)  # per unit: rows per candidate whose error ran
    # back through the branch, where a backward share below 1 kept fewer than all (GatedUnit._trained_rows)
    probes: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)  # per unit: what the probe estimator
    # saw and aimed at in the last backward (rows, scores, targets, the gate's probabilities of those rows)


class DFQ:
    """DFQ attached to one Model: its units, gates, candidates, cost regulariser and per-step record.

    An extension of the Model (edgetrain.extension.ModelExtension): attach() builds one and hooks it in."""

    @classmethod
    def attach(cls, model: Model, config: DFQConfig | None = None) -> DFQ:
        """Gate `model`'s residual blocks (or, without blocks, its inner MAC layers) per sample from now on.

        Adds the gates' parameters (named dfq.*) to model.parameters(); returns the attached DFQ."""
        if cls.of(model) is not None:
            raise ModelError("DFQ is already enabled on this model")
        dfq = cls(model, config or DFQConfig())
        model.attach(dfq)
        return dfq

    @classmethod
    def of(cls, model: Model) -> DFQ | None:
        """The DFQ attached to `model`, or None."""
        return next((ext for ext in model.extensions if isinstance(ext, cls)), None)

    def __init__(self, model: Model, config: DFQConfig):
        """Build units, gates and their ops on `model` (attach() also hooks them into its steps)."""
        self.model = model
        self.config = config
        self.candidates = parse_candidates(config.candidates, config.weight_bits)
        graph = model.graph
        self.units = find_units(graph)
        if not self.units:
            raise EdgetrainError(f"{graph.source}: DFQ found no residual block and no MAC layer to gate "
                                 "(the stem and the classifier are never gated)")
        # Units without a shortcut cannot skip: their gates choose among the computing candidates only.
        self.unit_candidates = {u.index: tuple(i for i, c in enumerate(self.candidates) if u.shortcut or not c.skip)
                                for u in self.units}
        if any(not self.unit_candidates[u.index] for u in self.units):
            raise EdgetrainError("dfq: a gated layer without a shortcut needs a computing candidate")
        macs = {n.name for n in model.mac_layers}
        self.gated_layers = {n.name for u in self.units for n in u.branch if n.name in macs}
        self.skips = np.array([c.skip for c in self.candidates])
        # Added to a unit's logits: -inf on the candidates it may not take (a layer without a shortcut cannot skip).
        self.logit_masks = {u.index: logit_mask(self.unit_candidates[u.index], len(self.candidates))
                            for u in self.units}
        measure_units(self.units, graph, self.gated_layers, model.float_op)
        self._price()
        self.grad_bits: int | None = None  # FracTrain's stage may run every candidate's backward at these bits
        self.computing = [k for k, c in enumerate(self.candidates) if not c.skip]
        self.target = float(config.target)
        self.floor = float(config.min_exec_share)  # FracTrain may raise it stage by stage (dfq_floor in its spec)
        self.backward_share = float(config.backward_share)
        self.param_names: list[str] = []
        self.state: tuple[np.ndarray, np.ndarray] | None = None  # the LSTM's (h, c) during a forward
        # channel means of unit outputs, by value name, during a forward (GatedUnit: the next gate's input)
        self.pooled: dict[str, np.ndarray] = {}
        self.dstate: tuple[np.ndarray, np.ndarray] | None = None  # dL/d(h, c) during a backward
        self.record = StepRecord()
        self.sign = 0.0  # r of the last step's regulariser (0 before any training step)
        self.last_percent = 0.0  # the last batch's mean gated cost, percent of fp32
        self.force: dict[int, np.ndarray] | None = None  # tests: fixed choices per unit instead of the gates
        self.kernel_calls = 0  # MAC-layer passes inside units (tests count skipped work with it)
        # Groups of a gated layer share kernel calls (QuantMAC.forward_groups); False: one kernel call per group.
        self.merge_groups = True
        self.fused_ops: dict[str, Op] = {}  # nodes the units took over (their closing ReLUs), by name
        self._init_params(model)
        self._build_ops(model)

    # -- construction ------------------------------------------------------------------------------
    def _price(self) -> None:
        """Each candidate's cost per unit and over all units (percent of their fp32 cost: what a target is
        compared to), at the candidates' precisions in force."""
        self.unit_cost, self.unit_fp32 = candidate_costs(self.units, self.candidates, self.config.cost_table,
                                                         self.config.backward_share)
        total_fp32 = sum(self.unit_fp32.values())
        self.total_percent = [100 * sum(self.unit_cost[u.index][k] for u in self.units) / total_fp32
                              for k in range(len(self.candidates))]

    def set_grad_bits(self, bits: int | None) -> None:
        """Run every computing candidate's backward at `bits` gradient bits (None: each at its own), and price
        them so: a FracTrain stage's `dfq_grad_bits`. A candidate keeps its name (its gate logit, activation
        ranges and record), so "4/6" names the 4-bit forward whichever gradient bits are in force."""
        if bits is not None and (isinstance(bits, bool) or not isinstance(bits, int) or
                                 not MIN_BITS <= bits <= MAX_BITS):
            raise EdgetrainError(f"dfq gradient bits must be an integer in [{MIN_BITS}, {MAX_BITS}], got {bits!r}")
        if bits == self.grad_bits:
            return
        own = parse_candidates(self.config.candidates, self.config.weight_bits)
        self.candidates = tuple(c if c.skip or bits is None else Candidate(c.text, replace(c.precision, grad_bits=bits))
                                for c in own)
        for op in self.model.executor.ops.values():
            if isinstance(op, GatedUnit):
                for k, layers in op.candidate_ops.items():
                    for mac in layers.values():
                        mac.precision = replace(mac.precision, grad_bits=self.candidates[k].precision.grad_bits)
        self.grad_bits = bits
        self._price()

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
        on ResNet-8 kept every sample at the cheapest candidate for its last three targets); the quota
        selection's thresholds start again for the same reason. Starting
        below rather than above: a pull down late in training, when the task loss is near 0 and says
        little about what a block is worth, drives samples to skip, and one such run fell from 97% to
        40% test accuracy in its last 120 steps."""
        self.target = float(target)
        bias = self.model.parameters()[SHARED_NAMES[-1]]
        lead = bias.dtype.type(self.config.initial_logit)
        bias[...] = bias.mean(dtype=np.float64)
        bias[self._below(target)] += lead
        self.quota_state[:] = 0.0  # the quota selection's thresholds were set for the old target

    def _initial_choice(self) -> int:
        if self.config.initial_choice is not None:
            texts = [c.text for c in self.candidates]
            want = parse_candidates([self.config.initial_choice], self.config.weight_bits)[0].text
            if want not in texts:
                raise EdgetrainError(f"dfq initial choice '{self.config.initial_choice}' is not a candidate")
            return texts.index(want)
        return self._nearest(self.target)

    def _init_params(self, model: Model) -> None:
        existing = [n for n in model.parameters() if n.startswith("dfq.")]
        if existing:
            raise EdgetrainError(f"the model already has DFQ gate parameters ({existing[0]}, ...)")
        channels = [u.input_shape[1] for u in self.units]
        params = init_gate_params(channels, len(self.candidates), model.seed, self._initial_choice(),
                                  self.config.initial_logit, model.dtype)
        model.parameters().update(params)
        self.param_names = list(params)
        # The budget rule's running price per unit (edgetrain.precision.dfq.probe): state a checkpoint keeps, so a
        # model buffer (0: none yet); its updates land in place.
        self.probe_price = np.zeros(len(self.units))
        self.buffer_names: list[str] = []
        if self.config.estimator == "probe" and self.config.probe_rule == "budget":
            model.buffers()[PRICE_BUFFER] = self.probe_price
            self.buffer_names.append(PRICE_BUFFER)
        self.quota_state = np.zeros((len(self.units), 3))
        self._brackets: dict[tuple[int, float], tuple[int, int, float]] = {}  # by (unit, target)
        if self.config.selection == "quota":
            model.buffers()[QUOTA_BUFFER] = self.quota_state
            self.buffer_names.append(QUOTA_BUFFER)

    def _build_ops(self, model: Model) -> None:
        """The model runs one GatedUnit op per unit from now on, in place of the unit's nodes."""
        graph = model.graph
        inside = {n.name for u in self.units for n in u.branch}
        joins = {}
        for u in self.units:
            last = next(n for n in graph.nodes if u.output in n.outputs)
            joins[last.name] = u
        nodes: list[Node] = []
        ops = {}
        facts = (non_negative_values(graph), {n.name: i for i, n in enumerate(model.mac_layers)})
        readers, outputs = graph.consumers_of(), {o.name for o in graph.outputs}
        for node in graph.nodes:
            if node.name in inside and node.name not in joins:
                continue
            if node.name in joins:
                u = joins[node.name]
                unit_node, op = self._unit_node(model, u, facts)
                nodes.append(unit_node)
                ops[unit_node.name] = op
                relu = sole_relu_reader(u.output, readers, outputs) if u.shortcut is not None else None
                if relu is not None:  # the block's closing ReLU runs inside the unit (GatedUnit.relu)
                    op.relu_output = relu.outputs[0]
                    self.fused_ops[relu.name] = FusedAway(relu, graph.opset)  # placed by owned_ops
                continue
            nodes.append(node)
        model.replace_nodes(nodes, ops)
        # A unit may write its output over its input where that input is a ReLU output whose producer's backward
        # reads its mask, not its values (another unit's, or a BatchNorm's folded ReLU, which recomputes its mask
        # from the BatchNorm's input as the forward rounded it), read by nothing but this unit (as fork and
        # identity shortcut) and kept by its branch only as codes (fork_as_rows): no one reads those values again,
        # and the producer masks the gradient of the rows the unit leaves unmasked with the same mask.
        relu_made = {op.relu_output for op in ops.values() if op.relu} | _batchnorm_relu_outputs(model, nodes)
        join_of = {u.index: name for name, u in joins.items()}
        for op in ops.values():
            x, own = op.node.inputs[0], {n.name for n in op.unit.branch} | {join_of[op.unit.index]}
            op.over_input = (op.relu and op.node.inputs[1] == x and op.fork_as_rows and x in relu_made
                             and x not in outputs and all(r.name in own for r in readers.get(x, ())))

    def _unit_node(self, model: Model, u: Unit, facts: tuple) -> tuple[Node, GatedUnit]:
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

    # -- per step: the Model's extension hooks (edgetrain.extension) ----------------------------------
    def owned_layers(self) -> dict[str, LayerPrecision]:
        """The gated layers: their gates pick the bits per sample, so each reports only its weight width."""
        return {name: GatedPrecision(0, self.config.weight_bits, 0) for name in self.gated_layers}

    def owned_ops(self) -> dict[str, Op]:
        """The ReLUs that close gated blocks: each unit runs its own (GatedUnit.relu), FusedAway stands in."""
        return dict(self.fused_ops)

    def begin_forward(self) -> None:
        """Reset the gates' LSTM state and the step record (FracTrain: state reset per forward)."""
        self.state = None
        self.dstate = None
        self.pooled = {}
        self.record = StepRecord()

    def sample_percent(self) -> np.ndarray:
        """Each sample's cost of the gated layers in the last forward, in percent of its fp32 cost."""
        total = np.zeros(self.record.batch)
        for u in self.units:
            total += self.unit_cost[u.index][self.record.choices[u.index]]
        return 100.0 * total / sum(self.unit_fp32.values())

    def loss_term(self) -> float:
        """After a training forward: set r and return the loss term r * beta * C (module doc)."""
        per_sample = self.sample_percent()
        self.last_percent = float(detfloat.mean(per_sample))  # fixed-order sums: the sign below steers the gates
        self.sign = 1.0 if self.last_percent >= self.target else -1.0
        return self.sign * self.config.beta * float(detfloat.sum64(per_sample))

    def allowance(self, unit: Unit) -> float:
        """What the cost target allows one sample in `unit`: the target's share of the unit's fp32 cost."""
        return self.target / 100.0 * self.unit_fp32[unit.index]

    def quota_bracket(self, unit: Unit) -> tuple[int, int, float]:
        """The quota selection's (cheap, dear, share) for `unit` at the current target (quota.bracket)."""
        key = (unit.index, self.target)
        if key not in self._brackets:
            # Every unit may take every computing candidate (only skipping needs a shortcut).
            self._brackets[key] = bracket(self.unit_cost[unit.index], ~self.skips, self.allowance(unit))
        return self._brackets[key]

    def quota_threshold(self, unit: Unit) -> float | None:
        """`unit`'s quota threshold (None: none yet)."""
        threshold, ready, _ = self.quota_state[unit.index]
        return float(threshold) if ready else None

    def selection_offsets(self, unit: Unit) -> np.ndarray | None:
        """What the selection adds to `unit`'s logits before their argmax (None: nothing, plain argmax)."""
        if self.config.selection != "quota":
            return None
        cheap, dear, _ = self.quota_bracket(unit)
        return quota_mask(self.skips, cheap, dear, self.quota_threshold(unit))

    def quota_split(self, unit: Unit, logits: np.ndarray, choice: np.ndarray) -> np.ndarray:
        """A training forward's choices with its computing samples split exactly between the bracket's candidates
        (quota.split), the threshold moved towards the batch's quantile (quota.next_threshold)."""
        cheap, dear, share = self.quota_bracket(unit)
        if cheap == dear:
            return choice
        ran = (choice == cheap) | (choice == dear)
        scores = logits[ran, dear].astype(np.float64) - logits[ran, cheap]
        state = self.quota_state[unit.index]
        up, carry = split(scores, share, float(state[2]))
        threshold = next_threshold(self.quota_threshold(unit), scores, share)
        if threshold is not None:
            state[:] = (threshold, 1.0, carry)
        out = choice.copy()
        out[ran] = np.where(up, dear, cheap)
        return out

    def cost_gradient(self, unit: Unit) -> np.ndarray:
        """dL/d(one-hot choice) of one unit's gate from the regulariser: the same for every sample."""
        return self.sign * self.config.beta * 100.0 * self.unit_cost[unit.index] / sum(self.unit_fp32.values())

    def step_costs(self) -> tuple[dict[str, LayerCost], dict[str, LayerCost]]:
        """BitOPs of the gated layers in the last forward: as chosen (plus the probe's forward-only runs), and as
        fp32 for every sample."""
        return chosen_step_costs(self.units, self.candidates, self.record.choices, self.record.batch,
                                 self.record.probe_runs, self.record.trained)

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

    @contextmanager
    def forced(self, candidate: str) -> Iterator[None]:
        """Every unit at one candidate, whatever its gate says, inside the block (the exported network)."""
        texts = [c.text for c in self.candidates]
        if candidate not in texts:
            raise ValueError(f"'{candidate}' is not a candidate ({', '.join(texts)})")
        previous, self.force = self.force, {u.index: texts.index(candidate) for u in self.units}
        try:
            yield
        finally:
            self.force = previous

    def choice_summary(self) -> dict[str, dict[str, float]]:
        """Fraction of the last batch's samples that chose each candidate, per unit."""
        out = {}
        for u in self.units:
            counts = np.bincount(self.record.choices[u.index], minlength=len(self.candidates))
            out[u.name] = {c.text: float(counts[k]) / max(self.record.batch, 1) for k, c in enumerate(self.candidates)}
        return out

    def off_modal_share(self) -> dict[str, float]:
        """Per unit, the share of the last batch's samples away from the unit's most common candidate: how
        much the gates tell samples apart (0: every sample takes the same candidate)."""
        out = {}
        for u in self.units:
            counts = np.bincount(self.record.choices[u.index], minlength=len(self.candidates))
            out[u.name] = 1.0 - float(counts.max()) / max(self.record.batch, 1)
        return out

    def describe(self) -> dict[str, Any]:
        """JSON-ready summary: settings, units and their gated layers, candidate costs."""
        return {"settings": self.config.as_dict(), "units": [
            {"name": u.name, "fork": u.fork, "output": u.output, "can_skip": u.shortcut is not None,
             "layers": list(u.macs), "macs_per_sample": sum(u.macs.values())} for u in self.units],
            "candidate_percent": self.candidate_percent(), "gate_parameters": len(self.param_names)}


def _batchnorm_relu_outputs(model: Model, nodes: list[Node]) -> set[str]:
    """Outputs of ReLUs folded into the BatchNorm before them (a plain Relu, no cap): in training that BatchNorm's
    backward recomputes the ReLU's mask from its own input (norm_kernels, the forward's `affine` as rounded) and
    reads nothing of this output."""
    producers = {o: n for n in nodes for o in n.outputs if o}
    ops, found = model.executor.ops, set()
    for n in nodes:
        if n.op_type != "Relu" or not isinstance(ops.get(n.name), FusedAway) or n.inputs[0] not in producers:
            continue
        bn = ops.get(producers[n.inputs[0]].name)
        if isinstance(bn, BatchNormalization) and bn.relu and bn.cap == np.inf:
            found.add(n.outputs[0])
    return found
