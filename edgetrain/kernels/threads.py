"""Thread-count policy shared by the Numba kernels of edgetrain.kernels and edgetrain.quant."""
from __future__ import annotations

from collections.abc import Callable

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
# Elements per parallel work item of the elementwise kernels above that size (a few per thread at
# the sizes that go parallel; each item a run of consecutive values, so its loop vectorises).
ELEMENT_CHUNK = 1 << 15


class blas_one_thread:  # lower case: it reads as a function, `with blas_one_thread():`
    """Run the enclosed NumPy BLAS calls on one thread, and put back each library's count after.

    For products whose result does not depend on BLAS's threads (`quant.small_linear`'s exact float32
    products). A BLAS pool of its own spins for a while after each call, and beside Numba's spinning
    workers that oversubscribed a small board's cores: LeNet-5's 8/8 step at batch 64 took 24.1 ms with
    OpenBLAS on 2 threads, 6.4 ms on 1 (2-core Zen 3; batch 8 2.40 -> 2.28 ms, the MLP at 128 4.11 -> 3.71
    ms). Only around those calls, not process-wide: a float product's bits depend on BLAS's thread count,
    and a run resumed in another process must see the count it had (tests/test_run_folders.py). The
    switch is three C calls (about 2.5 us) through threadpoolctl's controllers, found once."""

    __slots__ = ("_saved",)
    _libs: list | None = None

    def __enter__(self) -> None:
        libs = blas_one_thread._libs
        if libs is None:
            libs = blas_one_thread._libs = _blas_libraries()
        self._saved = [(lib, lib.get_num_threads()) for lib in libs]
        for lib, threads in self._saved:
            if threads != 1:
                lib.set_num_threads(1)

    def __exit__(self, *exc) -> None:
        for lib, threads in self._saved:
            if threads != 1:
                lib.set_num_threads(threads)


def _blas_libraries() -> list:
    """threadpoolctl's controllers of the BLAS libraries loaded now ([] without threadpoolctl)."""
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # a declared dependency; without it BLAS keeps its threads
        return []
    return list(ThreadpoolController().select(user_api="blas").lib_controllers)


def _pool_switches() -> tuple[Callable[[], int], Callable[[int], None]]:
    """The calling thread's pool-size getter and setter, as cheap as this Numba allows.

    numba.get_num_threads/set_num_threads check that the pool is up and the count valid on every call
    (0.5 and 0.8 us); once the pool is up Numba binds the C functions behind them, which take 0.1 and
    0.2 us. A step switches the pool a few dozen times at batch 8, so it is worth the private names;
    where a Numba release renames them, the public pair is used."""
    numba.get_num_threads()  # launches the pool: the C functions are bound from then on
    from numba.np.ufunc import parallel

    get, put = getattr(parallel, "_get_num_threads", None), getattr(parallel, "_set_num_threads", None)
    if callable(get) and callable(put) and get() == numba.get_num_threads():
        return get, put
    return numba.get_num_threads, numba.set_num_threads


def _switches() -> tuple[Callable[[], int], Callable[[int], None]]:
    """`_pool_switches`, bound once (the pool must be up first, so not at import)."""
    if threads_for._switch is None:
        threads_for._switch = _pool_switches()
    return threads_for._switch


def ensure_pool() -> None:
    """Start Numba's thread pool if it is not up yet (cheap once it is).

    Call it before the first call of a cached serial kernel that calls a parallel one. Numba loads
    such a kernel from its cache without starting the pool the parallel callee needs, and the process
    dies on the call (numba issues 4807, 8578; reproduced in tests/test_numba_pool.py): this happens
    when the callee was compiled and cached by itself before the caller was compiled. Not at import:
    starting the pool takes 15 ms, and a process that forks afterwards (GNU OpenMP is not fork-safe)
    would hang in its children."""
    if threads_for._switch is None:
        _switches()


def pool_threads() -> int:
    """numba.get_num_threads() through the cheaper bound getter (`_pool_switches`): a conv asks it per call."""
    return _switches()[0]()


class threads_for:  # lower case: it reads as a function, `with threads_for(work):`
    """Run the enclosed Numba kernels single-threaded when `work` is below the threshold.

    A class rather than a generator context manager: entering and leaving one cost 1 us more, and a
    batch-8 step enters it about fifty times."""

    __slots__ = ("_work", "_threshold", "_previous")
    _switch: tuple[Callable[[], int], Callable[[int], None]] | None = None

    def __init__(self, work: int, threshold: int | None = None):
        self._work, self._threshold = work, threshold
        self._previous = 0  # 0: nothing switched, nothing to restore

    def __enter__(self) -> None:
        if self._work >= (SMALL_WORK if self._threshold is None else self._threshold):
            return
        get, put = _switches()
        previous = get()
        if previous != 1:  # already single-threaded (e.g. a 1-thread run): nothing to switch
            put(1)
            self._previous = previous

    def __exit__(self, *exc) -> None:
        if self._previous:
            threads_for._switch[1](self._previous)
            self._previous = 0
