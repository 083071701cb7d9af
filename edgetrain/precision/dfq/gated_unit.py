"""The executor's op for one gated unit: its gate, the branch run per sample group at each group's precision,
the shortcut, and backward."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from edgetrain.errors import EdgetrainError
from edgetrain.graph import Node
from edgetrain.ops.base import Op, Run
from edgetrain.ops.norm import BatchNormalization, fuse_relu
from edgetrain.precision.dfq.config import CANDIDATE_STREAM_STRIDE
from edgetrain.precision.dfq.gates import (
    EMBED_WIDTH,
    gate_backward,
    gate_forward,
    pooled_grad_to_input,
    straight_through,
)
from edgetrain.precision.dfq.kernels import (
    pooled_grad_scatter_add,
    sample_dots,
    scatter_add,
)
from edgetrain.precision.dfq.units import Unit
from edgetrain.quant.mac import Group, MACContext, QuantMAC, integer_form

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
            elif n.name not in self.float_ops:  # a Relu folded into its BatchNorm above keeps its stand-in
                self.float_ops[n.name] = model.float_op(n.name)

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
        h, c = dfq.state if dfq.state is not None else (np.zeros((n, EMBED_WIDTH), x.dtype),
                                                        np.zeros((n, EMBED_WIDTH), x.dtype))
        logits, gctx = self._timed("gate", "forward", gate_forward, x, params, shared, h, c,
                                   dfq.logit_masks[self.unit.index])
        dfq.state = (gctx.h, gctx.c)
        if dfq.force is not None and self.unit.index in dfq.force:
            choice = np.broadcast_to(np.asarray(dfq.force[self.unit.index], np.int64), (n,)).copy()
        else:
            choice = logits.argmax(axis=1)
        return choice, gctx

    def forward(self, inputs, run: Run):
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
                    mac = self.candidate_ops[groups[0][0]][node.name]  # every candidate runs this node
                    layer = [Group(sl, self.candidate_ops[k][node.name]) for k, sl in groups]
                    (out,), ctx = self._timed(node.name, "forward", mac.forward_groups, args, run, layer,
                                              dfq.merge_groups)
                    self._count(ctx.calls)
                    env[node.outputs[0]] = out
                    tape.append((node, mac, ctx))
                    continue
                op = self.float_ops[node.name]
                outs, ctx = self._timed(node.name, "forward", op.forward, args, run)
                for name, value in zip(node.outputs, outs):
                    if name:
                        env[name] = value
                if run.training:
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
        return [y], UnitContext(gctx, choice, order, n_exec, tape, r, updates, x.shape, x.dtype, gate_params, shared)

    def buffer_updates(self, ctx: UnitContext):
        return ctx.updates

    # -- backward ----------------------------------------------------------------------------------
    def backward(self, ctx: UnitContext, grads, needed):
        dfq, u = self.dfq, self.unit
        order, n_exec, x_shape, dtype = ctx.order, ctx.n_exec, ctx.x_shape, ctx.dtype
        dout = grads[0]
        out: list[np.ndarray | None] = [None] * len(self.node.inputs)
        branch_dx = None
        k_count = len(dfq.candidates)
        d_onehot = np.zeros((x_shape[0], k_count), dtype)
        if n_exec:
            dr = dout[order]
            inner: dict[str, np.ndarray] = {u.branch_output: dr}
            # STE: the chosen candidate's contribution stands in for every computing candidate's (module doc).
            contribution = sample_dots(dr, ctx.branch_out)
            d_onehot[order] = contribution[:, None] * ~dfq.skips[None, :]
            wanted = dict(zip(self.node.inputs, needed))
            for node, op, nctx in reversed(ctx.tape):
                g_out = [inner.pop(o, None) if o else None for o in node.outputs]
                if g_out[0] is None:
                    continue
                # Values inside the branch always carry a gradient; the unit's other inputs as the executor says.
                inner_needed = [bool(i) and (i in self.produced or i == u.fork or wanted.get(i, True))
                                for i in node.inputs]
                gins = self._timed(node.name, "backward", op.backward, nctx, g_out, inner_needed)
                if isinstance(nctx, MACContext):
                    self._count(len(nctx.groups))  # one weight-gradient call per group
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
        dlogits = straight_through(ctx.gate.probs, d_onehot)  # 0 on masked candidates: their probability is 0
        n = x_shape[0]
        dh, dc = dfq.dstate if dfq.dstate is not None else (np.zeros((n, EMBED_WIDTH), dtype),
                                                            np.zeros((n, EMBED_WIDTH), dtype))
        dpooled, dunit, dshared, dh_prev, dc_prev = self._timed("gate", "backward", gate_backward, ctx.gate, dlogits,
                                                                dh, dc, ctx.gate_params, ctx.shared)
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
