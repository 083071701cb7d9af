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
# Elementwise kernels (rescaling, quantising: a few operations per element) take a plain serial loop
# inside the same compiled kernel below this many elements, and launch no parallel region at all.
# Not `threads_for`: switching the pool to one thread and back costs more than such a call's work
# (measured: rescaling 4,096 values took 2.4 us on the serial branch, 5 us as a 2-thread launch and
# 17 us through threads_for), and a parallel launch while another process holds the cores can stall
# for milliseconds, which at batch 8, with dozens of such calls per step, happened every step.
SMALL_ELEMENTS = 1 << 16


@contextmanager
def threads_for(work: int, threshold: int | None = None) -> Iterator[None]:
    """Run the enclosed Numba kernels single-threaded when `work` is below the threshold."""
    if work >= (SMALL_WORK if threshold is None else threshold):
        yield
        return
    previous = numba.get_num_threads()
    if previous == 1:  # already single-threaded (e.g. a 1-thread run): nothing to switch
        yield
        return
    numba.set_num_threads(1)
    try:
        yield
    finally:
        numba.set_num_threads(previous)
