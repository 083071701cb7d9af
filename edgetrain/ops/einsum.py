"""Einsum: numpy's einsum with a fixed contraction order, and backward as einsums of the same operands.

optimize=False keeps numpy's own sum-of-products loops, which run in one fixed order (no BLAS, no
contraction-path search), so results never depend on the machine's threads.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from edgetrain.ops.base import Op, register

ELLIPSIS = "..."


class Equation(NamedTuple):
    """Each operand's and the output's subscripts as tokens: single letters and at most one '...'."""

    inputs: list[list[str]]
    output: list[str]


def _tokens(term: str) -> list[str]:
    head, dots, tail = term.partition(ELLIPSIS)
    if ELLIPSIS in tail or "." in head + tail:
        raise ValueError(f"malformed term '{term}'")
    return list(head) + ([ELLIPSIS] if dots else []) + list(tail)


def parse(equation: str, count: int) -> Equation:
    """Parse an einsum equation; the implicit form's output is the letters used once, sorted, after '...'."""
    eq = equation.replace(" ", "")
    lhs, arrow, rhs = eq.partition("->")
    terms = lhs.split(",")
    if len(terms) != count:
        raise ValueError(f"equation has {len(terms)} operands, the node {count} inputs")
    inputs = [_tokens(t) for t in terms]
    for toks in inputs:
        if any(not (t == ELLIPSIS or t.isalpha()) for t in toks):
            raise ValueError(f"subscripts must be letters, got '{''.join(toks)}'")
    if arrow:
        output = _tokens(rhs)
    else:
        letters = [t for toks in inputs for t in toks if t != ELLIPSIS]
        output = ([ELLIPSIS] if any(ELLIPSIS in toks for toks in inputs) else []) + sorted(
            t for t in set(letters) if letters.count(t) == 1)
    if len(set(output)) != len(output):
        raise ValueError("an output subscript repeats")
    known = {t for toks in inputs for t in toks}
    if not set(output) <= known:
        raise ValueError("an output subscript appears in no operand")
    return Equation(inputs, output)


def _text(tokens: list[str]) -> str:
    return "".join(tokens)


def _unique(tokens: list[str]) -> list[str]:
    seen: list[str] = []
    for t in tokens:
        if t not in seen:
            seen.append(t)
    return seen


@register("Einsum")
class Einsum(Op):
    """Any equation numpy accepts: contractions, transposes, sums, broadcasting '...', diagonals.

    The gradient of operand k is the einsum of the output gradient with every other operand into k's
    subscripts; a subscript found only in operand k (summed within it) is broadcast back, a repeated
    one (a diagonal) is written onto the diagonal, and '...' dims that broadcast are summed back.
    """

    def __init__(self, node, opset):
        super().__init__(node, opset)
        eq = self.attr("equation", "")
        eq = eq.decode() if isinstance(eq, bytes) else eq
        try:
            self.eq = parse(eq, len(node.inputs))
        except ValueError as exc:
            raise self.fail(f"equation '{eq}': {exc}") from None
        self.text = ",".join(_text(t) for t in self.eq.inputs) + "->" + _text(self.eq.output)

    def forward(self, inputs, run):
        try:
            y = np.einsum(self.text, *inputs, optimize=False)
        except ValueError as exc:
            raise self.fail(f"equation '{self.text}' does not fit inputs {[a.shape for a in inputs]}: {exc}") from None
        return [np.asarray(y)], list(inputs)

    def backward(self, ctx, grads, needed):
        operands, g = ctx, grads[0]
        return [self._grad(k, operands, g) if needed[k] else None for k in range(len(operands))]

    def _grad(self, k: int, operands: list[np.ndarray], g: np.ndarray) -> np.ndarray:
        eq = self.eq
        mine = eq.inputs[k]
        a = operands[k]
        others = [(eq.inputs[j], operands[j]) for j in range(len(operands)) if j != k] + [(eq.output, g)]
        available = {t for toks, _ in others for t in toks}
        target = _unique(mine)
        present = [t for t in target if t in available]
        text = ",".join(_text(t) for t, _ in others) + "->" + _text(present)
        r = np.einsum(text, *[v for _, v in others], optimize=False)
        # Sizes of each of k's tokens: a letter's one dim, '...''s dims as k itself has them.
        letters = [t for t in mine if t != ELLIPSIS]
        ell_nd = a.ndim - len(letters)
        sizes: dict[str, tuple[int, ...]] = {}
        pos = 0
        for t in mine:
            width = ell_nd if t == ELLIPSIS else 1
            sizes.setdefault(t, tuple(a.shape[pos:pos + width]))
            pos += width
        if ELLIPSIS in present:
            at = present.index(ELLIPSIS)
            r = _unbroadcast_at(r, at, len(present) - at - 1, sizes[ELLIPSIS])
        # Insert the missing tokens' axes (summed within operand k alone) and broadcast over them.
        shape_now: list[int] = []
        view_shape: list[int] = []
        for t in target:
            view_shape += sizes[t]
            shape_now += sizes[t] if t in present else [1] * len(sizes[t])
        r = np.broadcast_to(r.reshape(shape_now), view_shape)
        if len(target) == len(mine):
            return np.ascontiguousarray(r).astype(a.dtype, copy=False)
        # A repeated subscript: the operand's diagonal is what was read, so the gradient lands there.
        da = np.zeros(a.shape, dtype=np.result_type(a, g))
        np.einsum(_text(mine) + "->" + _text(target), da)[...] += r
        return da


def _unbroadcast_at(r: np.ndarray, start: int, after: int, shape: tuple[int, ...]) -> np.ndarray:
    """Sum r's '...' dims (axes start .. r.ndim - after) back to `shape`, the operand's own '...' dims."""
    extra = (r.ndim - after - start) - len(shape)
    if extra > 0:
        r = r.sum(axis=tuple(range(start, start + extra)))
    axes = tuple(start + i for i, s in enumerate(shape) if s == 1 and r.shape[start + i] != 1)
    if axes:
        r = r.sum(axis=axes, keepdims=True)
    return r
