"""LSTM and GRU (ONNX semantics, as torch.onnx.export emits them) with backward through time.

Per direction, the input product X W^T runs as one GEMM over every time step; the recurrent product
H R^T runs once per step. Both go through a `Products` object, so the integer engine
(`edgetrain/quant/rnn.py`) swaps in quantised GEMMs while the gate arithmetic, the cell state and the
time loop stay here, in the input's float dtype. Everything is a fixed sequence of numpy operations:
results do not depend on the thread count.

sequence_lens masks: a sample of length L runs steps 0..L-1 (the reverse direction L-1..0), its state
is carried unchanged through the rest, and its Y rows there are zero; a sample of length 0 ends with
Y_h (and Y_c) zero (onnxruntime's conventions).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from edgetrain.kernels import detfloat
from edgetrain.ops.base import Op, Run, register

DIRECTIONS = {"forward": 1, "reverse": 1, "bidirectional": 2}


def _relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0)


# name -> (function, derivative expressed through the function's output)
ACTIVATIONS = {
    "sigmoid": (detfloat.op_sigmoid, lambda y: y * (1 - y)),
    "tanh": (detfloat.op_tanh, lambda y: 1 - y * y),
    "relu": (_relu, lambda y: (y > 0).astype(y.dtype)),
}


def _opt(inputs: list, i: int) -> np.ndarray | None:
    """Optional input i, or None where it is absent or given as ''."""
    return inputs[i] if len(inputs) > i else None


def _keep(k: np.ndarray | None, v: np.ndarray) -> np.ndarray:
    """A gradient through a clip: zero where the clip bound was hit (k False)."""
    return v if k is None else v * k


class Products:
    """The float GEMMs of one direction: X W^T over all steps, and each recurrent product H R^T.

    `recurrent(slot, h, r)` is called once per step in forward; `recurrent_back(slot, dg)` once per step
    in backward, in the reverse order, and accumulates that slot's weight gradient (dg^T h) as it goes.
    """

    def __init__(self):
        self.saved: dict[str, list] = {}
        self.grads: dict[str, np.ndarray] = {}

    def input(self, x2: np.ndarray, w: np.ndarray) -> np.ndarray:
        """x2 (rows, I) times w (G, I)^T."""
        self.x2, self.w = x2, w
        return x2 @ w.T

    def input_back(self, dg2: np.ndarray, need_x: bool) -> tuple[np.ndarray | None, np.ndarray]:
        """dX (rows, I) and dW (G, I) from the gate gradient over all steps dg2 (rows, G)."""
        return (dg2 @ self.w if need_x else None), dg2.T @ self.x2

    def recurrent(self, slot: str, h: np.ndarray, r: np.ndarray) -> np.ndarray:
        """h (N, H) times r (rows, H)^T for one step."""
        self.saved.setdefault(slot, []).append((h, r))
        return h @ r.T

    def recurrent_back(self, slot: str, dg: np.ndarray) -> np.ndarray:
        """dh for the latest step not yet taken back; accumulates the slot's dR."""
        h, r = self.saved[slot].pop()
        dr = dg.T @ h
        self.grads[slot] = dr if slot not in self.grads else self.grads[slot] + dr
        return dg @ r


@dataclass
class RNNContext:
    dirs: list = field(default_factory=list)  # per direction: (products, steps, order)
    shapes: tuple = ()
    dtype: np.dtype = np.dtype(np.float32)
    has: tuple = ()  # which optional inputs were given


class _Recurrent(Op):
    """What LSTM and GRU share: attributes, layout, masks, the direction loop."""

    all_outputs_differentiable = True
    gates = 0
    default_acts: tuple[str, ...] = ()
    has_cell = False

    def __init__(self, node, opset):
        super().__init__(node, opset)
        direction = self.attr("direction", "forward")
        if direction not in DIRECTIONS:
            raise self.fail(f"direction '{direction}' is not forward, reverse or bidirectional")
        self.direction = direction
        self.num_dirs = DIRECTIONS[direction]
        self.layout = int(self.attr("layout", 0))
        if self.layout not in (0, 1):
            raise self.fail(f"layout {self.layout} is not 0 or 1")
        acts = [a.lower() for a in self.attr("activations", [])] or list(self.default_acts) * self.num_dirs
        if len(acts) != len(self.default_acts) * self.num_dirs:
            raise self.fail(f"{len(acts)} activations given; {node.op_type} {direction} takes "
                            f"{len(self.default_acts) * self.num_dirs}")
        bad = sorted({a for a in self.attr("activations", []) if a.lower() not in ACTIVATIONS})
        if bad:
            raise self.fail(f"activation(s) {', '.join(bad)} not supported (supported: Sigmoid, Tanh, Relu)")
        if self.attr("activation_alpha") or self.attr("activation_beta"):
            raise self.fail("activation_alpha/activation_beta are not supported (no supported activation takes them)")
        k = len(self.default_acts)
        self.acts = [[ACTIVATIONS[a] for a in acts[d * k:(d + 1) * k]] for d in range(self.num_dirs)]
        clip = self.attr("clip")
        self.clip = None if clip is None else float(clip)
        if self.clip is not None and not self.clip > 0:
            raise self.fail(f"clip {clip} must be positive")

    def products(self, direction: int, run: Run, shared: dict) -> Products:
        """The GEMMs of one direction (the integer engine overrides this); `shared` lives for one forward
        and is seen by every direction's products (both directions read the same X)."""
        return Products()

    def _clip(self, a: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        if self.clip is None:
            return a, None
        c = a.dtype.type(self.clip)
        keep = (a >= -c) & (a <= c)
        return np.clip(a, -c, c), keep

    # -- I/O shapes -------------------------------------------------------------------------
    def _unpack(self, inputs):
        x = inputs[0]
        w, r, b, lens, h0 = (_opt(inputs, i) for i in range(1, 6))
        if w is None or r is None:
            raise self.fail("inputs X, W and R are required")
        if x.ndim != 3:
            raise self.fail(f"X must be 3-D, got shape {x.shape}")
        xs = x if self.layout == 0 else np.swapaxes(x, 0, 1)  # (T, N, I)
        t_len, n, _ = xs.shape
        hidden = int(self.attr("hidden_size", r.shape[-1]))
        g = self.gates * hidden
        if w.shape[0] != self.num_dirs or w.shape[1] != g or r.shape != (self.num_dirs, g, hidden):
            raise self.fail(f"W {w.shape} / R {r.shape} do not fit {self.num_dirs} direction(s) x {self.gates} gates "
                            f"x hidden_size {hidden}")
        if b is None:
            b = np.zeros((self.num_dirs, 2 * g), x.dtype)
        if lens is not None:
            lens = np.asarray(lens).astype(np.int64)
            if lens.shape != (n,) or (lens < 0).any() or (lens > t_len).any():
                raise self.fail(f"sequence_lens {lens.tolist()} must be {n} lengths in 0..{t_len}")
            if (lens == t_len).all():
                lens = None
        state = [None if s is None else (s if self.layout == 0 else np.swapaxes(s, 0, 1))
                 for s in (h0, _opt(inputs, 6))]
        return xs, w, r, b, lens, state, hidden

    def _pack_outputs(self, ys, hs, cs, dtype):
        y = np.stack(ys, axis=1)  # (T, D, N, H)
        yh = np.stack(hs)
        outs = [y if self.layout == 0 else np.transpose(y, (2, 0, 1, 3)),
                yh if self.layout == 0 else np.swapaxes(yh, 0, 1)]
        if self.has_cell:
            yc = np.stack(cs)
            outs.append(yc if self.layout == 0 else np.swapaxes(yc, 0, 1))
        return [np.ascontiguousarray(o, dtype=dtype) for o in outs[:len(self.node.outputs)]]

    def forward(self, inputs, run):
        xs, w, r, b, lens, (h0, c0), hidden = self._unpack(inputs)
        t_len, n, _ = xs.shape
        dtype = xs.dtype
        ys, hs, cs, dirs, shared = [], [], [], [], {}
        # onnxruntime's convention: an empty sequence's final state is zero, not its initial state
        alive = None if lens is None or (lens > 0).all() else (lens > 0)[:, None]
        for d in range(self.num_dirs):
            reverse = self.direction == "reverse" or d == 1
            order = list(range(t_len - 1, -1, -1) if reverse else range(t_len))
            masks = None if lens is None else {t: (t < lens)[:, None] for t in order}
            h = np.zeros((n, hidden), dtype) if h0 is None else h0[d].astype(dtype, copy=False)
            c = None
            if self.has_cell:
                c = np.zeros((n, hidden), dtype) if c0 is None else c0[d].astype(dtype, copy=False)
            prod = self.products(d, run, shared)
            y, h, c, steps = self._direction(d, xs, w[d], r[d], b[d], inputs, h, c, order, masks, prod, hidden)
            if alive is not None:
                h = np.where(alive, h, 0)
                c = None if c is None else np.where(alive, c, 0)
            ys.append(y)
            hs.append(h)
            cs.append(c)
            dirs.append((prod, steps, order, masks, alive))
        outs = self._pack_outputs(ys, hs, cs, dtype)
        has = tuple(len(inputs) > i and inputs[i] is not None for i in range(len(inputs)))
        return outs, RNNContext(dirs, (xs.shape, w.shape, r.shape, b.shape, hidden, n), dtype, has)

    def backward(self, ctx, grads, needed):
        (xs_shape, w_shape, r_shape, b_shape, hidden, n) = ctx.shapes
        dtype = ctx.dtype
        t_len = xs_shape[0]
        gy, gyh = grads[0], grads[1] if len(grads) > 1 else None
        gyc = grads[2] if self.has_cell and len(grads) > 2 else None
        if gy is not None and self.layout == 1:
            gy = np.transpose(gy, (1, 2, 0, 3))  # (N, T, D, H) -> (T, D, N, H)
        if gyh is not None and self.layout == 1:
            gyh = np.swapaxes(gyh, 0, 1)
        if gyc is not None and self.layout == 1:
            gyc = np.swapaxes(gyc, 0, 1)
        dx = np.zeros(xs_shape, dtype) if needed[0] else None
        dw, dr, db = np.zeros(w_shape, dtype), np.zeros(r_shape, dtype), np.zeros(b_shape, dtype)
        dh0 = np.zeros((self.num_dirs, n, hidden), dtype)
        dc0 = np.zeros((self.num_dirs, n, hidden), dtype)
        dp = np.zeros((self.num_dirs, 3 * hidden), dtype) if self.has_cell else None
        for d, (prod, steps, order, masks, alive) in enumerate(ctx.dirs):
            dh = np.zeros((n, hidden), dtype) if gyh is None else gyh[d].astype(dtype, copy=True)
            dc = None
            if self.has_cell:
                dc = np.zeros((n, hidden), dtype) if gyc is None else gyc[d].astype(dtype, copy=True)
            if alive is not None:
                dh = np.where(alive, dh, 0)
                dc = None if dc is None else np.where(alive, dc, 0)
            dgy = None if gy is None else gy[:, d]
            dxw, dh, dc = self._direction_back(d, prod, steps, order, masks, dgy, dh, dc, dr, db, dp, hidden)
            dxw2 = dxw.reshape(t_len * n, -1)
            dx_d, dw[d] = prod.input_back(dxw2, needed[0])
            if dx is not None:
                dx += dx_d.reshape(xs_shape)
            db[d, :dxw2.shape[1]] += dxw2.sum(axis=0)
            dh0[d], dc0[d] = dh, (dc if dc is not None else 0)
        if dx is not None and self.layout == 1:
            dx = np.ascontiguousarray(np.swapaxes(dx, 0, 1))
        out = [dx, dw, dr, db, None, self._state_layout(dh0), self._state_layout(dc0) if self.has_cell else None, dp]
        return [g if i < len(ctx.has) and ctx.has[i] else None for i, g in enumerate(out[:len(ctx.has)])]

    def _state_layout(self, s: np.ndarray) -> np.ndarray:
        return s if self.layout == 0 else np.ascontiguousarray(np.swapaxes(s, 0, 1))

    def macs(self, in_shapes, out_shapes):
        """Per unit of the first output's leading dimension (the Model multiplies by it): X W^T and H R^T
        for every step, sample and direction."""
        x = in_shapes[0]
        t_len, n = (x[0], x[1]) if self.layout == 0 else (x[1], x[0])
        w, r = in_shapes[1], in_shapes[2]
        total = int(t_len) * int(n) * int(w[0]) * int(w[1]) * (int(w[2]) + int(r[2]))
        return total // max(int(out_shapes[0][0]), 1)


@register("LSTM")
class LSTM(_Recurrent):
    """ONNX LSTM: gates i, o, f, c (in W, R, B order), optional peepholes P = [Pi, Po, Pf]."""

    gates = 4
    default_acts = ("sigmoid", "tanh", "tanh")
    has_cell = True

    def __init__(self, node, opset):
        super().__init__(node, opset)
        if int(self.attr("input_forget", 0)):
            raise self.fail("input_forget=1 (coupled input and forget gates) is not supported")

    def _direction(self, d, xs, w, r, b, inputs, h, c, order, masks, prod, hidden):
        t_len, n, i_size = xs.shape
        dtype = xs.dtype
        p = inputs[7] if len(inputs) > 7 and inputs[7] is not None else None
        p = None if p is None else p[d].astype(dtype, copy=False)
        (f, _), (g, _), (hf, _) = self.acts[d]
        hh = hidden
        xw = prod.input(xs.reshape(t_len * n, i_size), w).reshape(t_len, n, 4 * hh)
        xw = xw + (b[:4 * hh] + b[4 * hh:])
        y = np.zeros((t_len, n, hh), dtype)
        steps = []
        for t in order:
            a = xw[t] + prod.recurrent("r", h, r)
            ai, ao, af, ac = a[:, :hh], a[:, hh:2 * hh], a[:, 2 * hh:3 * hh], a[:, 3 * hh:]
            if p is not None:
                ai = ai + p[:hh] * c
                af = af + p[2 * hh:] * c
            ai, ki = self._clip(ai)
            af, kf = self._clip(af)
            ac, kc = self._clip(ac)
            ig, fg, cc = f(ai), f(af), g(ac)
            c_new = fg * c + ig * cc
            if p is not None:
                ao = ao + p[hh:2 * hh] * c_new
            ao, ko = self._clip(ao)
            og = f(ao)
            hc = hf(c_new)
            h_new = og * hc
            m = None if masks is None else masks[t]
            steps.append((c, ig, fg, cc, og, hc, c_new, (ki, ko, kf, kc), m))
            if m is not None:
                h_new = np.where(m, h_new, h)
                c_new = np.where(m, c_new, c)
                y[t] = np.where(m, h_new, 0)
            else:
                y[t] = h_new
            h, c = h_new, c_new
        return y, h, c, (steps, p)

    def _direction_back(self, d, prod, steps, order, masks, dgy, dh, dc, dr, db, dp, hidden):
        steps, p = steps
        (_, df), (_, dg), (_, dhf) = self.acts[d]
        hh = hidden
        t_len = len(order)
        n = dh.shape[0]
        dtype = dh.dtype
        dxw = np.zeros((t_len, n, 4 * hh), dtype)
        for t, (c, ig, fg, cc, og, hc, c_new, (ki, ko, kf, kc), m) in zip(order[::-1], steps[::-1]):
            dh_t = dh if dgy is None else (dh + (dgy[t] if m is None else np.where(m, dgy[t], 0)))
            dao = _keep(ko, dh_t * hc * df(og))
            dct = dc + dh_t * og * dhf(hc)
            if p is not None:
                dct = dct + dao * p[hh:2 * hh]
            dai = _keep(ki, dct * cc * df(ig))
            daf = _keep(kf, dct * c * df(fg))
            dac = _keep(kc, dct * ig * dg(cc))
            dc_prev = dct * fg
            if p is not None:
                dc_prev = dc_prev + dai * p[:hh] + daf * p[2 * hh:]
            da = np.concatenate([dai, dao, daf, dac], axis=1)
            if m is not None:
                da = np.where(m, da, 0)
            if p is not None:
                dp[d, :hh] += (dai * c * (1 if m is None else m)).sum(axis=0)
                dp[d, hh:2 * hh] += (dao * c_new * (1 if m is None else m)).sum(axis=0)
                dp[d, 2 * hh:] += (daf * c * (1 if m is None else m)).sum(axis=0)
            dh_prev = prod.recurrent_back("r", da)
            if m is not None:
                dh_prev = np.where(m, dh_prev, dh_t)
                dc_prev = np.where(m, dc_prev, dc)
            dxw[t] = da
            dh, dc = dh_prev, dc_prev
        dr[d] = prod.grads["r"]
        db[d, 4 * hh:] += dxw.reshape(-1, 4 * hh).sum(axis=0)
        return dxw, dh, dc


@register("GRU")
class GRU(_Recurrent):
    """ONNX GRU: gates z, r, h (in W, R, B order); linear_before_reset=1 is what torch emits."""

    gates = 3
    default_acts = ("sigmoid", "tanh")

    def __init__(self, node, opset):
        super().__init__(node, opset)
        self.lbr = bool(int(self.attr("linear_before_reset", 0)))

    def _direction(self, d, xs, w, r, b, inputs, h, c, order, masks, prod, hidden):
        t_len, n, i_size = xs.shape
        dtype = xs.dtype
        (f, _), (g, _) = self.acts[d]
        hh = hidden
        xw = prod.input(xs.reshape(t_len * n, i_size), w).reshape(t_len, n, 3 * hh)
        wb, rb = b[:3 * hh], b[3 * hh:]
        # z and r take both biases outside any product; so does h unless the reset multiplies R's part
        xw = xw + (wb + (np.concatenate([rb[:2 * hh], np.zeros(hh, dtype)]) if self.lbr else rb))
        y = np.zeros((t_len, n, hh), dtype)
        steps = []
        for t in order:
            if self.lbr:
                hr = prod.recurrent("r", h, r)
                azr = xw[t, :, :2 * hh] + hr[:, :2 * hh]
                q = hr[:, 2 * hh:] + rb[2 * hh:]
            else:
                azr = xw[t, :, :2 * hh] + prod.recurrent("zr", h, r[:2 * hh])
            az, kz = self._clip(azr[:, :hh])
            ar, kr = self._clip(azr[:, hh:])
            z, rg = f(az), f(ar)
            if self.lbr:
                ah = xw[t, :, 2 * hh:] + rg * q
            else:
                q = None
                ah = xw[t, :, 2 * hh:] + prod.recurrent("h", rg * h, r[2 * hh:])
            ah, kh = self._clip(ah)
            hg = g(ah)
            h_new = (1 - z) * hg + z * h
            m = None if masks is None else masks[t]
            steps.append((h, z, rg, hg, q, (kz, kr, kh), m))
            if m is not None:
                h_new = np.where(m, h_new, h)
                y[t] = np.where(m, h_new, 0)
            else:
                y[t] = h_new
            h = h_new
        return y, h, None, steps

    def _direction_back(self, d, prod, steps, order, masks, dgy, dh, dc, dr, db, dp, hidden):
        (_, df), (_, dg) = self.acts[d]
        hh = hidden
        t_len = len(order)
        n = dh.shape[0]
        dtype = dh.dtype
        dxw = np.zeros((t_len, n, 3 * hh), dtype)
        drb_h = np.zeros(hh, dtype)
        for t, (h, z, rg, hg, q, (kz, kr, kh), m) in zip(order[::-1], steps[::-1]):
            dh_t = dh if dgy is None else (dh + (dgy[t] if m is None else np.where(m, dgy[t], 0)))
            daz = _keep(kz, dh_t * (h - hg) * df(z))
            dah = _keep(kh, dh_t * (1 - z) * dg(hg))
            dh_prev = dh_t * z
            if m is not None:
                dah = np.where(m, dah, 0)
                daz = np.where(m, daz, 0)
            if self.lbr:
                dq = dah * rg
                dar = _keep(kr, dah * q * df(rg))
                if m is not None:
                    dar = np.where(m, dar, 0)
                dh_prev = dh_prev + prod.recurrent_back("r", np.concatenate([daz, dar, dq], axis=1))
                drb_h += dq.sum(axis=0)
            else:
                drh = prod.recurrent_back("h", dah)
                dar = _keep(kr, drh * h * df(rg))
                if m is not None:
                    dar = np.where(m, dar, 0)
                dh_prev = dh_prev + drh * rg + prod.recurrent_back("zr", np.concatenate([daz, dar], axis=1))
            if m is not None:
                dh_prev = np.where(m, dh_prev, dh_t)
            dxw[t] = np.concatenate([daz, dar, dah], axis=1)
            dh = dh_prev
        flat = dxw.reshape(-1, 3 * hh).sum(axis=0)
        if self.lbr:
            dr[d] = prod.grads["r"]
            db[d, 3 * hh:5 * hh] += flat[:2 * hh]
            db[d, 5 * hh:] += drb_h
        else:
            dr[d, :2 * hh] = prod.grads["zr"]
            dr[d, 2 * hh:] = prod.grads["h"]
            db[d, 3 * hh:] += flat
        return dxw, dh, None
