"""Compatibility module: the shipped digits now live in edgetrain.data.digits (see edgetrain.data)."""

from edgetrain.data.digits import DIGITS_MEAN, DIGITS_PATH, DIGITS_STD, load_digits

__all__ = ["DIGITS_MEAN", "DIGITS_PATH", "DIGITS_STD", "load_digits"]
