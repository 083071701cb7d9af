"""Elementwise functions of one tensor: math (Exp, Log, Sqrt, Erf, ...) and activations (HardSwish, Gelu, ...).

Each computes in its input's dtype (float attributes such as alpha are float32 by the ONNX format and are
cast to it) and keeps (x, y) for a backward that multiplies by dy/dx. Integer inputs (Abs, Neg, Sign on
int tensors) run forward and take no gradient. Floor, Ceil, Round and Sign pass a zero gradient, as PyTorch.
"""
from __future__ import annotations

import math

import numpy as np

from edgetrain.kernels import detfloat
from edgetrain.ops.base import Op, register
from edgetrain.ops.special import erf

_SQRT_HALF = math.sqrt(0.5)
_INV_SQRT_2PI = 1 / math.sqrt(2 * math.pi)
_TWO_OVER_SQRT_PI = 2 / math.sqrt(math.pi)
_SQRT_2_OVER_PI = math.sqrt(2 / math.pi)
_GELU_CUBIC = 0.044715


def _softplus(x: np.ndarray) -> np.ndarray:
    """log(1 + exp(x)) as max(x, 0) + log1p(exp(-|x|)): no overflow."""
    return np.maximum(x, 0) + detfloat.op_log1p(detfloat.op_exp(-np.abs(x)))


class Unary(Op):
    """y = f(x) elementwise; backward is g * f'(x) computed from x and y."""

    def forward(self, inputs, run):
        x = inputs[0]
        with np.errstate(all="ignore"):
            y = np.asarray(self.f(x)).astype(x.dtype, copy=False)
        return [y], (x, y)

    def backward(self, ctx, grads, needed):
        x, y = ctx
        if not np.issubdtype(x.dtype, np.floating):
            return [None]
        with np.errstate(all="ignore"):
            dx = self.df(x, y, grads[0])
        return [np.asarray(dx).astype(x.dtype, copy=False)]

    def const(self, name: str, default: float, x: np.ndarray) -> np.ndarray:
        """A float attribute as a scalar of x's dtype."""
        return np.asarray(self.attr(name, default), dtype=np.float32).astype(x.dtype)

    def f(self, x: np.ndarray) -> np.ndarray:
        """The function."""
        raise NotImplementedError

    def df(self, x: np.ndarray, y: np.ndarray, g: np.ndarray) -> np.ndarray:
        """g * f'(x)."""
        raise NotImplementedError


@register("Neg")
class Neg(Unary):
    def f(self, x):
        return -x

    def df(self, x, y, g):
        return -g


@register("Abs")
class Abs(Unary):
    """Gradient sign(x): 0 at x = 0, as PyTorch."""

    def f(self, x):
        return np.abs(x)

    def df(self, x, y, g):
        return np.sign(x) * g


class ZeroGrad(Unary):
    """Piecewise constant: the gradient is zero wherever it exists."""

    def df(self, x, y, g):
        return np.zeros_like(g)


@register("Floor")
class Floor(ZeroGrad):
    def f(self, x):
        return np.floor(x)


@register("Ceil")
class Ceil(ZeroGrad):
    def f(self, x):
        return np.ceil(x)


@register("Round")
class Round(ZeroGrad):
    """Halves to even, as ONNX specifies (numpy's rounding)."""

    def f(self, x):
        return np.round(x)


@register("Sign")
class Sign(ZeroGrad):
    def f(self, x):
        return np.sign(x)


@register("Exp")
class Exp(Unary):
    def f(self, x):
        return detfloat.op_exp(x)

    def df(self, x, y, g):
        return g * y


@register("Log")
class Log(Unary):
    def f(self, x):
        return detfloat.op_log(x)

    def df(self, x, y, g):
        return g / x


@register("Sqrt")
class Sqrt(Unary):
    def f(self, x):
        return np.sqrt(x)

    def df(self, x, y, g):
        return g / (2 * y)


@register("Reciprocal")
class Reciprocal(Unary):
    def f(self, x):
        return 1 / x

    def df(self, x, y, g):
        return -g * y * y


@register("Tanh")
class Tanh(Unary):
    def f(self, x):
        return detfloat.op_tanh(x)

    def df(self, x, y, g):
        return g * (1 - y * y)


@register("Erf")
class Erf(Unary):
    def f(self, x):
        return erf(x) if np.issubdtype(x.dtype, np.floating) else erf(x.astype(np.float64))

    def df(self, x, y, g):
        return g * (_TWO_OVER_SQRT_PI * detfloat.op_exp(-x * x))


@register("Softplus")
class Softplus(Unary):
    """log(1 + exp(x)); gradient sigmoid(x)."""

    def f(self, x):
        return _softplus(x)

    def df(self, x, y, g):
        return g * detfloat.op_sigmoid(x)


@register("Elu")
class Elu(Unary):
    def f(self, x):
        alpha = self.const("alpha", 1.0, x)
        return np.where(x > 0, x, alpha * detfloat.op_expm1(np.minimum(x, 0)))

    def df(self, x, y, g):
        return np.where(x > 0, g, g * (y + self.const("alpha", 1.0, x)))


@register("Selu")
class Selu(Unary):
    ALPHA = 1.67326319217681884765625
    GAMMA = 1.05070102214813232421875

    def f(self, x):
        alpha, gamma = self.const("alpha", self.ALPHA, x), self.const("gamma", self.GAMMA, x)
        return gamma * np.where(x > 0, x, alpha * detfloat.op_expm1(np.minimum(x, 0)))

    def df(self, x, y, g):
        alpha, gamma = self.const("alpha", self.ALPHA, x), self.const("gamma", self.GAMMA, x)
        return g * gamma * np.where(x > 0, 1, alpha * detfloat.op_exp(np.minimum(x, 0)))


@register("HardSigmoid")
class HardSigmoid(Unary):
    """clip(alpha * x + beta, 0, 1); no gradient at the bounds themselves (PyTorch's hardsigmoid)."""

    def f(self, x):
        return np.clip(self.const("alpha", 0.2, x) * x + self.const("beta", 0.5, x), 0, 1)

    def df(self, x, y, g):
        inside = (y > 0) & (y < 1)
        return np.where(inside, g * self.const("alpha", 0.2, x), 0)


@register("HardSwish")
class HardSwish(Unary):
    """x * clip(x / 6 + 1/2, 0, 1). The gradient is PyTorch's hardswish_backward's: 0 for x <= -3,
    x / 3 + 1/2 strictly between -3 and 3, 1 for x >= 3."""

    def f(self, x):
        return x * np.clip(x * np.asarray(1 / 6, dtype=x.dtype) + np.asarray(0.5, dtype=x.dtype), 0, 1)

    def df(self, x, y, g):
        return np.where(x <= -3, 0, np.where(x < 3, g * (x / 3 + np.asarray(0.5, dtype=x.dtype)), g))


@register("Gelu")
class Gelu(Unary):
    """x * Phi(x) (approximate="none", with erf), or the tanh approximation (approximate="tanh")."""

    def __init__(self, node, opset):
        super().__init__(node, opset)
        mode = self.attr("approximate", "none")
        if mode not in ("none", "tanh"):
            raise self.fail(f"approximate must be 'none' or 'tanh', got {mode!r}")
        self.tanh = mode == "tanh"

    def f(self, x):
        if self.tanh:
            inner = _SQRT_2_OVER_PI * (x + _GELU_CUBIC * x * x * x)
            return 0.5 * x * (1 + detfloat.op_tanh(inner.astype(x.dtype, copy=False)))
        return 0.5 * x * (1 + erf(x * np.asarray(_SQRT_HALF, dtype=x.dtype)))

    def df(self, x, y, g):
        if self.tanh:
            t = detfloat.op_tanh(_SQRT_2_OVER_PI * (x + _GELU_CUBIC * x * x * x))
            dinner = _SQRT_2_OVER_PI * (1 + 3 * _GELU_CUBIC * x * x)
            return g * (0.5 * (1 + t) + 0.5 * x * (1 - t * t) * dinner)
        cdf = 0.5 * (1 + erf(x * np.asarray(_SQRT_HALF, dtype=x.dtype)))
        return g * (cdf + x * (_INV_SQRT_2PI * detfloat.op_exp(-0.5 * x * x)))


@register("Celu")
class Celu(Unary):
    """max(0, x) + min(0, alpha * (exp(x / alpha) - 1))."""

    def f(self, x):
        alpha = self.const("alpha", 1.0, x)
        return np.where(x > 0, x, alpha * detfloat.op_expm1(np.minimum(x, 0) / alpha))

    def df(self, x, y, g):
        return np.where(x > 0, g, g * detfloat.op_exp(np.minimum(x, 0) / self.const("alpha", 1.0, x)))


@register("Mish")
class Mish(Unary):
    """x * tanh(softplus(x))."""

    def f(self, x):
        return x * detfloat.op_tanh(_softplus(x))

    def df(self, x, y, g):
        t = detfloat.op_tanh(_softplus(x))
        return g * (t + x * detfloat.op_sigmoid(x) * (1 - t * t))


@register("Softsign")
class Softsign(Unary):
    def f(self, x):
        return x / (1 + np.abs(x))

    def df(self, x, y, g):
        d = 1 + np.abs(x)
        return g / (d * d)


@register("ThresholdedRelu")
class ThresholdedRelu(Unary):
    """x where x > alpha, else 0."""

    def f(self, x):
        return np.where(x > self.const("alpha", 1.0, x), x, 0)

    def df(self, x, y, g):
        return np.where(x > self.const("alpha", 1.0, x), g, 0)


@register("Sin")
class Sin(Unary):
    def f(self, x):
        return np.sin(x)

    def df(self, x, y, g):
        return g * np.cos(x)


@register("Cos")
class Cos(Unary):
    def f(self, x):
        return np.cos(x)

    def df(self, x, y, g):
        return -g * np.sin(x)
