"""`kernels.threads.blas_one_thread`: NumPy's BLAS on one thread inside (the integer path's exact float32
products, `quant.small_linear`), each library's own count back after, and nothing changed outside it."""
import numpy as np
import pytest
from threadpoolctl import threadpool_info, threadpool_limits

from edgetrain.kernels.threads import blas_one_thread


def _blas_threads() -> set[int]:
    return {i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"}


@pytest.mark.parametrize("outside", [1, 2])
def test_blas_runs_on_one_thread_inside_and_as_before_outside(outside):
    if not _blas_threads():
        pytest.skip("threadpoolctl sees no BLAS library in this NumPy")
    with threadpool_limits(outside, user_api="blas"):
        assert _blas_threads() == {outside}
        a = np.arange(64 * 48, dtype=np.float32).reshape(64, 48) % 7
        with blas_one_thread():
            assert _blas_threads() == {1}
            inside = a @ a.T
        assert _blas_threads() == {outside}
        np.testing.assert_array_equal(inside, a.astype(np.int64) @ a.astype(np.int64).T)  # exact integers


def test_a_small_linear_step_leaves_blas_as_it_found_it():
    """A training step through `quant.small_linear` (LeNet-5 at 8/8) does not change the process's BLAS
    threads: a float product's bits depend on them, and a resumed run must see the count it had."""
    if not _blas_threads():
        pytest.skip("threadpoolctl sees no BLAS library in this NumPy")
    from tools.bench_step import make_edgetrain_step

    with threadpool_limits(2, user_api="blas"):
        step, model = make_edgetrain_step("lenet5", 8, (1, 28, 28), "8/8")
        step()
        assert _blas_threads() == {2}
