"""Resize (opset 11..19 and later): nearest, linear and cubic, as one interpolation matrix per resized axis.

Interpolation is separable, so each resized axis is a (out, in) matrix of weights applied along that axis,
kept as each row's few nonzero taps; backward applies the transposes in reverse order, the exact adjoint
(the forward's weights, gathered by input position: a scatter-add without the scatter). The matrices are
built the way ONNX's reference builds its taps (same coordinate transforms, neighbour choice, coefficients,
antialias and exclude_outside), so every mode the spec defines is here.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from edgetrain.ops.base import Op, register
from edgetrain.ops.taps import Taps, apply_taps, taps_of

COORDINATE_MODES = ("half_pixel", "half_pixel_symmetric", "pytorch_half_pixel", "align_corners", "asymmetric",
                    "tf_half_pixel_for_nn", "tf_crop_and_resize")
NEAREST_MODES = ("round_prefer_floor", "round_prefer_ceil", "floor", "ceil")


class AxisMap(NamedTuple):
    """One axis's interpolation, forward (the weight matrix's rows) and backward (its columns), and the
    output rows tf_crop_and_resize fills with extrapolation_value (zero rows of the matrix)."""

    axis: int
    forward: Taps
    backward: Taps
    outside: np.ndarray | None


def _attr_str(op: Op, name: str, default: str) -> str:
    v = op.attr(name, default)
    return v.decode() if isinstance(v, bytes) else v


def source_coords(mode: str, out_len: int, in_len: int, scale: float, roi: tuple[float, float] | None):
    """Each output position's coordinate in the input, and (tf_crop_and_resize) whether it falls outside."""
    y = np.arange(out_len, dtype=np.float64)
    width = scale * in_len  # the real-valued output length the spec's formulas use
    outside = None
    if mode == "align_corners":
        x = np.zeros(out_len) if width == 1 else y * (in_len - 1) / (width - 1)
    elif mode == "asymmetric":
        x = y / scale
    elif mode == "tf_half_pixel_for_nn":
        x = (y + 0.5) / scale
    elif mode == "tf_crop_and_resize":
        lo, hi = roi
        if width == 1:
            x = np.full(out_len, (hi - lo) * (in_len - 1) / 2)
        else:
            x = y * (hi - lo) * (in_len - 1) / (width - 1)
        x = x + lo * (in_len - 1)
        outside = (x < 0) | (x > in_len - 1)
    elif mode == "pytorch_half_pixel":
        x = np.full(out_len, -0.5) if width == 1 else (y + 0.5) / scale - 0.5
    elif mode == "half_pixel":
        x = (y + 0.5) / scale - 0.5
    else:  # half_pixel_symmetric
        offset = in_len / 2 * (1 - out_len / width)
        x = offset + (y + 0.5) / scale - 0.5
    return x, outside


def _coeffs(mode: str, ratio: np.ndarray, scale: float, nearest_mode: str, a: float, antialias: bool) -> np.ndarray:
    """(out, taps) weights for ratios in (0, 1], the input coordinate's distance past its left tap."""
    r = ratio[:, None]
    if mode == "nearest":
        integer = ratio == 1
        if nearest_mode == "round_prefer_floor":
            right = ratio > 0.5
        elif nearest_mode == "round_prefer_ceil":
            right = ratio >= 0.5
        else:
            right = np.full(ratio.shape, nearest_mode == "ceil")
        right = right | integer
        return np.stack([~right, right], axis=1).astype(np.float64)
    if mode == "linear":
        if not antialias:
            return np.concatenate([1 - r, r], axis=1)
        s = min(scale, 1.0)
        start = int(np.floor(-1 / s) + 1)
        args = (np.arange(start, start + 2 - 2 * start)[None, :] - r) * s
        c = np.clip(1 - np.abs(args), 0, 1)
        return c / c.sum(axis=1, keepdims=True)
    if not antialias:
        rr = 1 - r
        return np.concatenate([
            ((a * (r + 1) - 5 * a) * (r + 1) + 8 * a) * (r + 1) - 4 * a,
            ((a + 2) * r - (a + 3)) * r * r + 1,
            ((a + 2) * rr - (a + 3)) * rr * rr + 1,
            ((a * (rr + 1) - 5 * a) * (rr + 1) + 8 * a) * (rr + 1) - 4 * a,
        ], axis=1)
    s = min(scale, 1.0)
    i_start = int(np.floor(-2 / s) + 1)
    t = np.abs(s * (np.arange(i_start, 2 - i_start)[None, :] - r))
    c = np.where(t <= 1, (a + 2) * t ** 3 - (a + 3) * t ** 2 + 1,
                 np.where(t < 2, a * t ** 3 - 5 * a * t ** 2 + 8 * a * t - 4 * a, 0.0))
    return c / c.sum(axis=1, keepdims=True)


def axis_weights(op: Op, mode: str, coord_mode: str, out_len: int, in_len: int, scale: float,
                 roi: tuple[float, float] | None) -> tuple[np.ndarray, np.ndarray | None]:
    """The (out, in) matrix of one axis, in float64, and its extrapolated rows (or None)."""
    x, outside = source_coords(coord_mode, out_len, in_len, scale, roi)
    left = np.floor(x)
    ratio = np.where(x == left, 1.0, x - left)
    coeffs = _coeffs(mode, ratio, scale, _attr_str(op, "nearest_mode", "round_prefer_floor"),
                     float(op.attr("cubic_coeff_a", -0.75)), bool(op.attr("antialias", 0)))
    taps = coeffs.shape[1]
    # The taps are the `taps` integers nearest x, ties to the smaller (ONNX's neighbour rule).
    pad = int(np.ceil(taps / 2))
    xp = x + pad
    p = np.floor(xp)
    frac = xp - p
    if taps % 2 == 0:
        first = p + np.where(frac == 0, -(taps // 2), -(taps // 2) + 1)
    else:
        first = p + np.where(frac <= 0.5, -((taps - 1) // 2), -((taps - 1) // 2) + 1)
    idx = first.astype(np.int64)[:, None] + np.arange(taps)[None, :] - pad
    if op.attr("exclude_outside", 0):
        coeffs = np.where((idx < 0) | (idx >= in_len), 0.0, coeffs)
        total = coeffs.sum(axis=1, keepdims=True)
        coeffs = coeffs / np.where(total == 0, 1.0, total)
    weights = np.zeros((out_len, in_len))
    # Taps beyond the edge read the edge value (ONNX pads by repeating it): fold them onto it.
    np.add.at(weights, (np.repeat(np.arange(out_len), taps), np.clip(idx, 0, in_len - 1).reshape(-1)),
              coeffs.reshape(-1))
    if outside is not None:
        weights[outside] = 0.0
    return weights, outside


@register("Resize")
class Resize(Op):
    """Inputs X, roi, scales, sizes (opset 11+: roi only for tf_crop_and_resize; scales or sizes).

    Attributes: mode (nearest, linear, cubic; linear and cubic on any rank), coordinate_transformation_mode,
    nearest_mode, cubic_coeff_a, exclude_outside, extrapolation_value, and from opset 18 antialias, axes
    and keep_aspect_ratio_policy.
    """

    def _plan(self, x: np.ndarray, inputs: list) -> tuple[list[int], list[float], list[int], np.ndarray | None]:
        """Resized axes, their scales and output sizes, and the roi (begin..., end...) over all axes."""
        rank = x.ndim
        roi_in = inputs[1] if len(inputs) > 1 else None
        scales_in = inputs[2] if len(inputs) > 2 else None
        sizes_in = inputs[3] if len(inputs) > 3 else None
        scales = None if scales_in is None or scales_in.size == 0 else [float(s) for s in scales_in.reshape(-1)]
        sizes = None if sizes_in is None or sizes_in.size == 0 else [int(s) for s in sizes_in.reshape(-1)]
        if (scales is None) == (sizes is None):
            raise self.fail("exactly one of scales and sizes must be given")
        axes = [int(a) % rank for a in self.attr("axes", range(rank))]
        given = scales if scales is not None else sizes
        if len(given) != len(axes):
            raise self.fail(f"{'scales' if scales is not None else 'sizes'} has {len(given)} entries, "
                            f"{len(axes)} expected")
        roi = None
        if roi_in is not None and roi_in.size:
            r = [float(v) for v in roi_in.reshape(-1)]
            if len(r) != 2 * len(axes):
                raise self.fail(f"roi has {len(r)} entries, {2 * len(axes)} expected")
            roi = np.array([0.0] * rank + [1.0] * rank)
            for i, a in enumerate(axes):
                roi[a], roi[rank + a] = r[i], r[len(axes) + i]
        if scales is not None:
            if min(scales) <= 0:
                raise self.fail(f"scales {scales} must be positive")
            outs = [int(math.floor(x.shape[a] * s)) for a, s in zip(axes, scales)]
            return axes, scales, outs, roi
        if min(sizes) <= 0:
            raise self.fail(f"sizes {sizes} must be positive")
        factors = [s / x.shape[a] for a, s in zip(axes, sizes)]
        policy = _attr_str(self, "keep_aspect_ratio_policy", "stretch")
        if policy == "stretch":
            return axes, factors, sizes, roi
        if policy not in ("not_larger", "not_smaller"):
            raise self.fail(f"unknown keep_aspect_ratio_policy '{policy}'")
        f = min(factors) if policy == "not_larger" else max(factors)
        return axes, [f] * len(axes), [int(f * x.shape[a] + 0.5) for a in axes], roi

    def _maps(self, x: np.ndarray, inputs: list) -> list[AxisMap]:
        mode = _attr_str(self, "mode", "nearest")
        if mode not in ("nearest", "linear", "cubic"):
            raise self.fail(f"unknown mode '{mode}'")
        coord = _attr_str(self, "coordinate_transformation_mode", "half_pixel")
        if coord not in COORDINATE_MODES:
            raise self.fail(f"unknown coordinate_transformation_mode '{coord}'")
        if mode == "nearest" and _attr_str(self, "nearest_mode", "round_prefer_floor") not in NEAREST_MODES:
            raise self.fail(f"unknown nearest_mode '{self.attr('nearest_mode')}'")
        if mode == "nearest" and self.attr("antialias", 0):
            raise self.fail("antialias applies to linear and cubic only")
        axes, scales, outs, roi = self._plan(x, inputs)
        if coord == "tf_crop_and_resize" and roi is None:
            raise self.fail("tf_crop_and_resize needs the roi input")
        maps = []
        for a, s, o in zip(axes, scales, outs):
            n = x.shape[a]
            lo_hi = None if roi is None else (float(roi[a]), float(roi[x.ndim + a]))
            crop = lo_hi is not None and coord == "tf_crop_and_resize" and lo_hi != (0.0, 1.0)
            if math.isclose(s, 1.0) and o == n and not crop:
                continue  # identity along this axis (ONNX skips it too)
            window = lo_hi if coord == "tf_crop_and_resize" else None
            weights, outside = axis_weights(self, mode, coord, o, n, s, window)
            maps.append(AxisMap(a, taps_of(weights), taps_of(weights.T),
                                outside if outside is not None and outside.any() else None))
        return maps

    def forward(self, inputs, run):
        x = inputs[0]
        if not np.issubdtype(x.dtype, np.floating):
            raise self.fail(f"input type {x.dtype} is not a float type")
        maps = self._maps(x, inputs)
        fill = np.asarray(self.attr("extrapolation_value", 0.0), dtype=x.dtype)
        y = x
        for m in maps:
            y = apply_taps(y, m.axis, m.forward)
            if m.outside is not None:
                sel = [slice(None)] * y.ndim
                sel[m.axis] = m.outside
                y[tuple(sel)] = fill
        return [np.ascontiguousarray(y)], (maps, x.shape)

    def backward(self, ctx, grads, needed):
        maps, shape = ctx
        g = grads[0]
        for m in reversed(maps):  # the extrapolated rows hold a constant: weight rows of zeros drop them
            g = apply_taps(g, m.axis, m.backward)
        return [np.ascontiguousarray(g)] + [None] * 3
