"""The executor's op for one gated unit: its gate, the branch run per sample group at each group's precision,
the shortcut, and backward."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from edgetrain.errors import EdgetrainError
from edgetrain.graph import Node
from edgetrain.kernels.strided import dense
from edgetrain.ops.base import Op, Run
from edgetrain.ops.norm import BatchNormalization, fuse_relu, sole_reader
from edgetrain.precision.dfq.config import CANDIDATE_STREAM_STRIDE
from edgetrain.precision.dfq.gates import (
    EMBED_WIDTH,
    gate_backward,
    gate_forward,
    pooled_grad_to_input,
    straight_through,
)
from edgetrain.precision.dfq.guard import apply_floor, share_count
from edgetrain.precision.dfq.kernels import (
    pooled_grad_scatter_add,
    relu_grad_of_rows,
    relu_grad_part,
    relu_grad_rows,
    relu_join,
    relu_join_rows,
    relu_joined_grad,
    sample_dots,
    scatter_add,
)
from edgetrain.precision.dfq.probe import distill_grad, measured_pairs, priced_targets, probe_plan, probe_targets
from edgetrain.precision.dfq.units import Unit
from edgetrain.quant.mac import Group, MACContext, QuantMAC, integer_form, takes_codes, takes_rows
from edgetrain.quant.qtensor import SampleRows

if TYPE_CHECKING:
    from edgetrain.model import Model


class UnitContext(NamedTuple):
    """What a gated unit's backward needs of its forward."""

    gate: object  # the gate's own context (gates.gate_forward)
    choice: np.ndarray  # each sample's candidate
    order: np.ndarray | slice  # the executing samples, grouped by candidate (a slice: all, in order)
    n_exec: int
    tape: list  # the branch's (node, op, context), in forward order
    branch_out: np.ndarray | None  # the branch's output for the executing samples (None: none ran)
    updates: dict  # buffer updates, by the unit node's input position
    x_shape: tuple
    dtype: np.dtype
    gate_params: tuple
    shared: tuple
    probe: Probe | None = None  # the probe estimator's measurements (None: straight-through only)
    relu_out: np.ndarray | None = None  # the output's mask (y > 0), where the unit applies the ReLU that reads it
    mask_rows: bool = False  # relu_out holds the executing rows only, in order (GatedUnit.over_input)


class Probe(NamedTuple):
    """What the probe estimator measured in a forward (edgetrain.precision.dfq.probe)."""

    rows: np.ndarray  # the probed samples
    pair_rows: np.ndarray  # per probe run: its position in rows
    pair_candidate: np.ndarray  # per probe run: the candidate it ran at
    out: np.ndarray  # per probe run: what the branch added


def candidate_slices(counts: np.ndarray) -> list[tuple[int, slice]]:
    """(candidate, slice) for rows sorted by candidate, from the rows per candidate (empty ones left out)."""
    groups, start = [], 0
    for k, count in enumerate(counts):
        if count:
            groups.append((k, slice(start, start + int(count))))
            start += int(count)
    return groups


class GatedUnit(Op):
    """The executor's op for one unit: gate, per-group execution of the branch, shortcut, backward."""

    def __init__(self, node: Node, opset: int, dfq, unit: Unit, n_externals: int, model: Model,
                 unsigned: set[str], mac_index: dict[str, int]):
        """unsigned: values the graph proves non-negative; mac_index: each MAC layer's position (stream keys)."""
        super().__init__(node, opset)
        self.dfq = dfq
        self.unit = unit
        self.n_externals = n_externals
        self.produced = {o for n in unit.branch for o in n.outputs if o}
        # Set where the Relu that alone reads the unit's output runs here (DFQ._build_ops): its output, the
        # value the next unit reads. The join, the ReLU and, for skipped samples, the copy of the shortcut
        # are then one pass, both directions.
        self.relu_output: str | None = None
        # Set where the unit may write its output over its input (DFQ._build_ops): an identity shortcut whose value
        # another unit's ReLU wrote, which nothing else reads and the branch keeps only as codes. The rows that
        # skip are then left where they are, not copied (ResNet-20 b128, half skipping, paired in one process: the
        # step 1.3-1.8 ms less; level at b32). The forward's values (Executor.forward's env) then hold the output
        # under the input's name too: a training forward's intermediate values are not a record of the step (an
        # eval forward's are: it writes new arrays).
        # Nor are the skipping rows read at all, either way (relu_join_rows, and relu_joined_grad with y None):
        # ResNet-20 b128 half skipping, paired: another 1.2 ms off the step; ResNet-38 b32 on one thread, 0.9 ms.
        self.over_input = False
        self.float_ops: dict[str, Op] = {}
        self.candidate_ops: dict[int, dict[str, QuantMAC]] = {}
        after_mac = set()
        relu_outputs: dict[str, str] = {}  # a folded ReLU's output -> the BatchNorm node writing it
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
                    op = form(model.float_op(n.name), c.precision, stream, n.inputs[0] in unsigned, model.runtime,
                              unsigned_other=len(n.inputs) > 1 and n.inputs[1] in unsigned)
                    op.range_key = f"{n.name}@{c.text}"
                    self.candidate_ops.setdefault(k, {})[n.name] = op
            elif n.op_type == "BatchNormalization" and n.inputs[0] in after_mac:
                bn = BatchNormalization(n, opset)
                bn.parallel = True
                self.float_ops[n.name] = bn
                fused = fuse_relu(n, bn, readers, outputs, opset)
                if fused is not None:
                    self.float_ops[fused[0].name] = fused[1]
                    relu_outputs[fused[0].outputs[0]] = n.name
            elif n.name not in self.float_ops:  # a Relu folded into its BatchNorm above keeps its stand-in
                self.float_ops[n.name] = model.float_op(n.name)
        # Where only gated integer convs read the fork, as their data input, they get the executing rows
        # ungathered (SampleRows) and quantise them where they lie: the gathered copy is never written (the
        # same codes; ResNet-20 b128, half the samples executing: the gather took 2-3 ms of an 80 ms step).
        fork_readers = [n for n in unit.branch if unit.fork in n.inputs]
        self.fork_as_rows = bool(fork_readers) and bool(self.candidate_ops) and all(
            n.name in dfq.gated_layers and all(takes_rows(ops.get(n.name), n, unit.fork)
                                               for ops in self.candidate_ops.values()) for n in fork_readers)
        # A BatchNorm (ReLU folded) whose output only a gated conv reads, as its data input, hands that
        # conv its codes, as Model._hand_codes_on does outside units; which candidate's codes is decided
        # per forward (_branch): where the executing samples form one group, its op's.
        self.codes_readers: dict[str, str] = {}  # BatchNorm node -> the gated conv node reading its codes
        if model.hands_codes:
            for value, bn_name in relu_outputs.items():
                reader = sole_reader(value, readers, outputs)
                if reader is not None and self.candidate_ops and all(
                        takes_codes(ops.get(reader.name), reader, value) for ops in self.candidate_ops.values()):
                    self.codes_readers[bn_name] = reader.name

    @property
    def relu(self) -> bool:
        """Whether the unit runs the ReLU that closes its block (see relu_output)."""
        return self.relu_output is not None

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
    def _choose(self, x: np.ndarray, params: tuple, shared: tuple, training: bool):
        dfq = self.dfq
        n = x.shape[0]
        h, c = dfq.state if dfq.state is not None else (np.zeros((n, EMBED_WIDTH), x.dtype),
                                                        np.zeros((n, EMBED_WIDTH), x.dtype))
        logits, gctx = self._timed("gate", "forward", gate_forward, x, params, shared, h, c,
                                   dfq.logit_masks[self.unit.index], dfq.pooled.pop(self.node.inputs[0], None))
        dfq.state = (gctx.h, gctx.c)
        if dfq.force is not None and self.unit.index in dfq.force:
            choice = np.empty(n, np.int64)
            choice[:] = dfq.force[self.unit.index]  # one candidate for all, or one per sample
        else:
            offsets = dfq.selection_offsets(self.unit)
            scored = logits if offsets is None else logits + offsets.astype(logits.dtype)
            choice = scored.argmax(axis=1)
            floor = dfq.floor
            if floor > 0 and self.unit.shortcut is not None:
                choice = apply_floor(scored, choice, dfq.skips, floor)
            if training and offsets is not None:
                choice = dfq.quota_split(self.unit, logits, choice)
        return choice, gctx

    def forward(self, inputs, run: Run):
        dfq, u = self.dfq, self.unit
        x, shortcut = inputs[0], inputs[1]
        externals = dict(zip(self.node.inputs[2:2 + self.n_externals], inputs[2:2 + self.n_externals]))
        gate_params = tuple(inputs[2 + self.n_externals:6 + self.n_externals])
        shared = tuple(inputs[6 + self.n_externals:])
        choice, gctx = self._choose(x, gate_params, shared, run.training)
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
        groups = candidate_slices(np.bincount(choice[order], minlength=len(dfq.candidates)))
        tape: list = []
        updates: dict[int, np.ndarray] = {}
        r = None
        if n_exec:
            rows = SampleRows(x, order) if self.fork_as_rows and not whole else x[order]
            r = self._branch(rows, externals, groups, run, tape, updates)
        probe = None
        if run.training and dfq.config.estimator == "probe":
            probe = self._probe(x, externals, choice, run)
        mask, mask_rows = None, False
        over = self.over_input and run.training  # an eval forward's values stay a record of it (Model.run's outputs)
        if self.relu and over:  # (over_input: the input is an integer conv's, so it has a channel and a spatial axis)
            # Only the executing rows are touched: a skipping row is its own output, its means are those the gate
            # pooled, and its mask is its producer's (relu_joined_grad with y None says why none is kept here).
            mask_rows = True
            if r is None:
                y, means, mask = shortcut, gctx.pooled.copy(), np.zeros((0,) + x.shape[1:], np.bool_)
            else:
                y, means, mask = relu_join_rows(shortcut, r, None if whole else order, gctx.pooled)
            dfq.pooled[self.relu_output] = means
        elif self.relu:
            # The output's channel means come from the same pass: the next unit's gate reads them (DFQ.pooled)
            # instead of the whole tensor again; so does the mask the ReLU's backward reads instead of y.
            y, means, mask = relu_join(shortcut, r, None if whole else order, means=True)
            if means is not None:
                dfq.pooled[self.relu_output] = means
        elif u.shortcut is not None:
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
        return [y], UnitContext(gctx, choice, order, n_exec, tape, r, updates, x.shape, x.dtype, gate_params, shared,
                                probe, mask, mask_rows)

    def _branch(self, x_rows: np.ndarray | SampleRows, externals: dict, groups: list, run: Run, tape: list | None,
                updates: dict | None) -> np.ndarray:
        """The branch's output for rows grouped by candidate (groups: (candidate, slice)); with a tape, what
        backward needs goes onto it and, in training, the buffer updates into `updates`."""
        dfq, u = self.dfq, self.unit
        env = {u.fork: x_rows, **externals}
        for node in u.branch:
            args = [env[i] if i else None for i in node.inputs]
            if node.name in dfq.gated_layers:
                mac = self.candidate_ops[groups[0][0]][node.name]  # every candidate runs this node
                layer = [Group(sl, self.candidate_ops[k][node.name]) for k, sl in groups]
                (out,), ctx = self._timed(node.name, "forward", mac.forward_groups, args, run, layer,
                                          dfq.merge_groups)
                self._count(ctx.calls)
                env[node.outputs[0]] = out
                if tape is not None:
                    tape.append((node, mac, ctx))
                continue
            op = self.float_ops[node.name]
            if node.name in self.codes_readers:
                reader = self.codes_readers[node.name]
                op.codes_for = self.candidate_ops[groups[0][0]][reader] if len(groups) == 1 else None
            outs, ctx = self._timed(node.name, "forward", op.forward, args, run)
            for name, value in zip(node.outputs, outs):
                if name:
                    env[name] = value
            if tape is not None:
                if run.training:
                    for pos, value in op.buffer_updates(ctx).items():
                        updates[self.node.inputs.index(node.inputs[pos])] = value
                tape.append((node, op, ctx))
        return env[u.branch_output]

    def _probe(self, x: np.ndarray, externals: dict, choice: np.ndarray, run: Run) -> Probe | None:
        """Run the seeded probe share's computing samples at their chosen and at a second computing candidate,
        as in eval (running BatchNorm statistics and activation ranges, nothing updated): both measured alike."""
        dfq, u = self.dfq, self.unit
        rows, alt = probe_plan(choice, dfq.unit_candidates[u.index], dfq.skips, dfq.config.probe_share, run.key,
                               u.index)
        chosen = choice[rows]
        positions = np.arange(len(rows))
        ran = ~dfq.skips[chosen] & (alt >= 0)  # a sample that skips, or has no other candidate, runs nothing
        pair_rows = np.concatenate([positions[ran], positions[ran]])
        pair_candidate = np.concatenate([chosen[ran], alt[ran]])
        if not len(pair_rows):
            return Probe(rows, pair_rows, pair_candidate, np.zeros((0,), x.dtype))
        order = np.argsort(pair_candidate, kind="stable")
        pair_rows, pair_candidate = pair_rows[order], pair_candidate[order]
        runs = np.bincount(pair_candidate, minlength=len(dfq.candidates))
        dfq.record.probe_runs[u.index] = runs  # its forward work counts in the step's BitOPs
        groups = candidate_slices(runs)
        measured = self._timed("probe", "forward", self._branch, x[rows[pair_rows]], externals, groups,
                               Run(False, run.key, run.position), None, None)
        return Probe(rows, pair_rows, pair_candidate, measured)

    def _probe_grad(self, probe: Probe, probed_dout: np.ndarray, batch: int, probs: np.ndarray) -> np.ndarray:
        """The probe estimator's dL/d(logits): among the computing candidates, towards each probed sample's
        target (probe.py's module doc); samples with fewer than two measured candidates get nothing.
        probed_dout: the gradient of the unit's output at each probe run's sample (probe.rows[probe.pair_rows])."""
        dfq, u = self.dfq, self.unit
        k_count = len(dfq.candidates)
        scores = np.full((len(probe.rows), k_count), np.nan)
        if len(probe.pair_rows):
            scores[probe.pair_rows, probe.pair_candidate] = sample_dots(probed_dout, probe.out)
        keep = (~np.isnan(scores)).sum(axis=1) >= 2  # a choice between computing candidates was measured
        rows = probe.rows[keep]
        cost = dfq.unit_cost[u.index]
        record = {"rows": rows, "probs": probs[rows]}
        if dfq.config.probe_rule == "budget":  # scores: the task's alone (the allowance and price stand for cost)
            record["scores"] = scores = scores[keep]
            record["price"] = float(dfq.probe_price[u.index])  # what this probe's targets were set at
            targets = self._budget(scores, cost, dfq.allowance(u))
        else:  # scores: the task's plus the regulariser's price of each candidate
            record["scores"] = scores = scores[keep] + dfq.cost_gradient(u)[None, :]
            margin = dfq.config.probe_margin / batch  # per-sample loss to the batch mean's units
            targets = probe_targets(scores, cost, margin) if len(rows) else np.zeros(0, np.int64)
        record["targets"] = targets
        dfq.record.probes[u.index] = record
        return distill_grad(probs, rows, targets, dfq.config.probe_weight, ~dfq.skips).astype(probs.dtype, copy=False)

    def _budget(self, scores: np.ndarray, cost: np.ndarray, allowance: float) -> np.ndarray:
        """The budget rule's targets (probe.priced_targets) from each probed sample's two measured task scores:
        sensitivity (dL/dy . (r_cheap - r_dear))^2, against the allowance (the cost target's share of the
        unit's fp32 cost) and the unit's running price, which this probe moves."""
        if not len(scores):
            return np.zeros(0, np.int64)
        cheap, dear = measured_pairs(scores, cost)
        at = np.arange(len(scores))
        gap = scores[at, cheap].astype(np.float64) - scores[at, dear]
        prices = self.dfq.probe_price
        targets, prices[self.unit.index] = priced_targets(gap * gap, cheap, dear, cost, allowance,
                                                          float(prices[self.unit.index]))
        return targets

    def buffer_updates(self, ctx: UnitContext):
        return ctx.updates

    # -- backward ----------------------------------------------------------------------------------
    reuses_grads = True  # the final pass of a unit that closes with its ReLU writes dx over dout (Op.reuses_grads)

    def backward(self, ctx: UnitContext, grads, needed, owned: tuple[bool, ...] = ()):
        dfq, u = self.dfq, self.unit
        order, n_exec, x_shape, dtype = ctx.order, ctx.n_exec, ctx.x_shape, ctx.dtype
        dout = grads[0]
        out: list[np.ndarray | None] = [None] * len(self.node.inputs)
        k_count = len(dfq.candidates)
        d_onehot = np.zeros((x_shape[0], k_count), dtype)
        rows = None if isinstance(order, slice) else order
        # An identity shortcut reads the fork itself: its gradient joins dx in the same pass, instead of
        # the executor adding the two afterwards.
        identity = u.shortcut is not None and self.node.inputs[1] == self.node.inputs[0]
        # Under the unit's ReLU with that shortcut, the ReLU's gradient is formed only for the executing rows
        # here, and for the rest in the final pass (kernels.relu_joined_grad): never as a whole tensor.
        relu_joined = ctx.relu_out is not None and identity
        dr = contribution = None
        if relu_joined:
            if n_exec:
                dr, contribution = relu_grad_part(dout, ctx.relu_out, rows, ctx.branch_out, y_rows=ctx.mask_rows)
        elif ctx.relu_out is not None:  # through the ReLU, the executing rows gathered, their dots: one pass
            dout, dr, contribution = relu_grad_rows(dout, ctx.relu_out, rows, ctx.branch_out if n_exec else None)
        elif n_exec:
            dr = dout[order]
            contribution = sample_dots(dr, ctx.branch_out)
        if n_exec:
            # STE: the chosen candidate's contribution stands in for every computing candidate's (module doc).
            d_onehot[order] = contribution[:, None] * ~dfq.skips[None, :]
        # The gate's backward needs only the contributions, so it runs before the branch's: its pooled
        # gradient is then known when the branch's gradient joins the shortcut's.
        d_onehot += dfq.cost_gradient(u).astype(dtype)[None, :]
        dlogits = straight_through(ctx.gate.probs, d_onehot)  # 0 on masked candidates: their probability is 0
        if ctx.probe is not None:
            probed = ctx.probe.rows[ctx.probe.pair_rows]
            y_order = rows if ctx.mask_rows else None  # the probed samples ran: the mask has their rows
            probe_dout = relu_grad_of_rows(dout, ctx.relu_out, probed, y_order) if relu_joined else dout[probed]
            dlogits = dlogits + self._probe_grad(ctx.probe, probe_dout, dout.shape[0], ctx.gate.probs)
        n = x_shape[0]
        dh, dc = dfq.dstate if dfq.dstate is not None else (np.zeros((n, EMBED_WIDTH), dtype),
                                                            np.zeros((n, EMBED_WIDTH), dtype))
        dpooled, dunit, dshared, dh_prev, dc_prev = self._timed("gate", "backward", gate_backward, ctx.gate, dlogits,
                                                                dh, dc, ctx.gate_params, ctx.shared)
        dfq.dstate = (dh_prev, dc_prev)
        branch_dx = self._branch_backward(ctx, dr, needed, out) if n_exec else None
        dpooled = dpooled.astype(dtype, copy=False)
        if relu_joined:  # (a branch whose gradient does not reach the fork adds nothing to any row)
            into = dout if owned and owned[0] and dout.dtype == (dtype if branch_dx is None else branch_dx.dtype) \
                else None
            dx = relu_joined_grad(dpooled, dout, None if ctx.mask_rows else ctx.relu_out, branch_dx,
                                  None if branch_dx is None else dr, rows, out=into)
        elif branch_dx is None and not identity:
            dx = np.array(pooled_grad_to_input(dpooled, x_shape), dtype)
        else:
            dx = pooled_grad_scatter_add(dpooled, x_shape, branch_dx, rows, dout if identity else None)
        out[0] = dx
        if u.shortcut is not None and not identity:
            out[1] = dout
        base = 2 + self.n_externals
        for i, g in enumerate(tuple(dunit) + tuple(dshared)):
            out[base + i] = g.astype(dtype, copy=False)
        return out

    def _branch_backward(self, ctx: UnitContext, dr: np.ndarray, needed, out: list) -> np.ndarray | None:
        """Back through the branch's tape from dr, the gradient of its output for the executing rows: the
        gradient of the fork's rows (None: the branch does not read the fork), and of the unit's other inputs
        added into `out` by their position."""
        u = self.unit
        inner: dict[str, np.ndarray] = {u.branch_output: dr}
        wanted = dict(zip(self.node.inputs, needed))
        trained = self._trained_rows(ctx, dr)
        for node, op, nctx in reversed(ctx.tape):
            g_out = [inner.pop(o, None) if o else None for o in node.outputs]
            if g_out[0] is None:
                continue
            # Values inside the branch always carry a gradient; the unit's other inputs as the executor says.
            inner_needed = [bool(i) and (i in self.produced or i == u.fork or wanted.get(i, True))
                            for i in node.inputs]
            if trained is not None and isinstance(nctx, MACContext):
                gins = self._timed(node.name, "backward", op.backward_rows, nctx, g_out, inner_needed, trained)
            else:
                gins = self._timed(node.name, "backward", op.backward, nctx, g_out, inner_needed)
            if isinstance(nctx, MACContext):
                self._count(len(nctx.groups))  # one weight-gradient call per group
            for name, g in zip(node.inputs, gins):
                if g is None or not name:
                    continue
                g = dense(g)  # a subsampling conv's input gradient (kernels.strided) as the full array
                if name in self.produced or name == u.fork:
                    inner[name] = inner[name] + g if name in inner else g
                else:
                    pos = self.node.inputs.index(name)
                    out[pos] = g if out[pos] is None else out[pos] + g
        return inner.get(u.fork)

    def _trained_rows(self, ctx: UnitContext, dr: np.ndarray) -> np.ndarray | None:
        """The executing rows whose error runs back through the branch's MAC layers (sorted; None: every row):
        with a backward share s below 1, the ceil(s n) whose output gradient's largest magnitude is largest (ties:
        lower row first). A maximum is exact in any order, so the choice is the same on every machine; the rows it
        passes over are those a per-tensor quantiser codes with the fewest levels. They take 0-bit gradients at
        the MAC layers (DFQConfig.backward_share); the step's record counts the rows kept, per candidate."""
        share = self.dfq.backward_share
        n = ctx.n_exec
        keep = min(n, max(1, share_count(share, n)))
        if keep >= n:
            return None
        peaks = np.abs(dr.reshape(n, -1)).max(axis=1)
        rows = np.sort(np.argsort(-peaks, kind="stable")[:keep])
        choice = ctx.choice if isinstance(ctx.order, slice) else ctx.choice[ctx.order]
        self.dfq.record.trained[self.unit.index] = np.bincount(choice[rows], minlength=len(self.dfq.candidates))
        return rows

    def _count(self, calls: int) -> None:
        """Count MAC-layer passes inside the unit (DFQ.kernel_calls)."""
        self.dfq.kernel_calls += calls
