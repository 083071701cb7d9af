"""Client partitions of a data split: IID or Dirichlet(alpha) label skew, deterministic from a seed.

A partition is a per-class share matrix P (classes x clients, columns of nothing, rows summing to 1): client c
gets share P[k, c] of class k. The same P splits the training and the test arrays, so each client's held-out
set has the label skew of its training data. IID is P[k, c] = 1 / clients.
"""
from __future__ import annotations

import numpy as np

from edgetrain.data.dataset import Dataset, Split
from edgetrain.errors import DataError

# Third SeedSequence word: partitions draw from a stream of their own, independent of the loader's shuffles
# ([seed, epoch]) and the held-out choice ([seed, 2]).
PARTITION_STREAM = 19


def parse_partition(text: str) -> tuple[str, float | None]:
    """'iid' -> ('iid', None); 'dirichlet:0.5' -> ('dirichlet', 0.5); anything else is a DataError."""
    kind, _, rest = text.strip().lower().partition(":")
    if kind == "iid" and not rest:
        return "iid", None
    if kind == "dirichlet":
        try:
            alpha = float(rest)
        except ValueError:
            alpha = float("nan")
        if not (alpha > 0 and np.isfinite(alpha)):
            raise DataError(f"--partition {text!r}: dirichlet needs a positive alpha, e.g. dirichlet:0.5")
        return "dirichlet", alpha
    raise DataError(f"--partition {text!r}: valid are iid and dirichlet:ALPHA")


def class_shares(num_classes: int, clients: int, partition: str, seed: int) -> np.ndarray:
    """The share matrix P (num_classes x clients) of a partition spec; rows sum to 1."""
    if clients < 1:
        raise DataError(f"--clients must be at least 1, got {clients}")
    kind, alpha = parse_partition(partition)
    if kind == "iid":
        return np.full((num_classes, clients), 1.0 / clients)
    rng = np.random.default_rng([seed, PARTITION_STREAM])
    return rng.dirichlet(np.full(clients, alpha), size=num_classes)


def _counts(n: int, shares: np.ndarray, first: int = 0) -> tuple[np.ndarray, int]:
    """Integer counts summing to n in proportion to shares (largest remainder; ties go to clients in turn from
    `first`, so equal shares of many classes even out across clients)."""
    exact = n * shares
    counts = np.floor(exact).astype(np.int64)
    short = n - int(counts.sum())
    if short > 0:
        turn = (np.arange(len(shares)) - first) % len(shares)
        counts[np.lexsort((turn, -(exact - counts)))[:short]] += 1
    return counts, max(short, 0)


def partition_indices(y: np.ndarray, shares: np.ndarray, seed: int, stream: int = 0) -> list[np.ndarray]:
    """Sorted sample indices of each client: class k's samples, shuffled by the seed, cut by row k of shares."""
    clients = shares.shape[1]
    parts: list[list[np.ndarray]] = [[] for _ in range(clients)]
    rng = np.random.default_rng([seed, PARTITION_STREAM, 1 + stream])
    first = 0  # the client next in turn for a tied remainder: IID parts come out within one sample of each other
    for k in range(shares.shape[0]):
        members = rng.permutation(np.flatnonzero(y == k))
        counts, extra = _counts(len(members), shares[k], first=first)
        first = (first + extra) % clients
        bounds = np.concatenate([[0], np.cumsum(counts)])
        for c in range(clients):
            parts[c].append(members[bounds[c]:bounds[c + 1]])
    return [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]


def _subset(ds: Dataset, idx: np.ndarray, name: str) -> Dataset:
    return Dataset(np.ascontiguousarray(ds.x[idx]), np.ascontiguousarray(ds.y[idx]), ds.num_classes, name,
                   ds.mean, ds.std, ds.class_names)


def client_split(split: Split, client: int, clients: int, partition: str, seed: int) -> Split:
    """Client `client`'s share of both arrays of a split (the same class shares for train and test)."""
    if not 0 <= client < clients:
        raise DataError(f"partition id {client} is outside 0..{clients - 1}")
    shares = class_shares(split.num_classes, clients, partition, seed)
    train = partition_indices(split.train.y, shares, seed, 0)[client]
    test = partition_indices(split.test.y, shares, seed, 1)[client]
    if len(train) == 0:
        raise DataError(f"client {client} of {clients} gets no training samples under --partition {partition} "
                        f"(seed {seed}); use fewer clients or a larger alpha")
    name = f"{split.train.name}[client {client}/{clients}]"
    return Split(_subset(split.train, train, name), _subset(split.test, test, name), split.augment)
