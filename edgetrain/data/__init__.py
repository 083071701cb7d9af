"""Training data: sources (digits, CIFAR-10/100, MNIST, .npz), normalisation, augmentation, batching."""

from edgetrain.data.checks import check_fits
from edgetrain.data.dataset import Dataset, Split
from edgetrain.data.digits import DIGITS_MEAN, DIGITS_PATH, DIGITS_STD, load_digits
from edgetrain.data.holdout import stratified_holdout
from edgetrain.data.loader import Loader, iterate_eval
from edgetrain.data.normalize import channel_stats, normalize_split
from edgetrain.data.safe_pickle import load_safe, loads_safe
from edgetrain.data.sources import KINDS, load_data, parse_spec
from edgetrain.data.transforms import Augment

__all__ = [
    "Augment", "DIGITS_MEAN", "DIGITS_PATH", "DIGITS_STD", "Dataset", "KINDS", "Loader", "Split",
    "channel_stats", "check_fits", "iterate_eval", "load_data", "load_digits", "load_safe", "loads_safe",
    "normalize_split", "parse_spec", "stratified_holdout",
]
