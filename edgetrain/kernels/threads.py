"""Thread-count policy shared by the Numba kernels of edgetrain.kernels and edgetrain.quant."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numba

# Below this much work (multiply-accumulates, or elements for elementwise kernels) a call runs on
# one thread: waking the pool costs more than it saves, and on a busy machine a parallel launch
# can stall for milliseconds (measured: a tiny conv took 15 ms with 2 threads while another
# process ran, 0.04 ms with 1).
SMALL_WORK = 1 << 22


@contextmanager
def threads_for(work: int, threshold: int | None = None) -> Iterator[None]:
    """Run the enclosed Numba kernels single-threaded when `work` is below the threshold."""
    if work >= (SMALL_WORK if threshold is None else threshold):
        yield
        return
    previous = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        yield
    finally:
        numba.set_num_threads(previous)
