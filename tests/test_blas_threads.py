"""NumPy's BLAS beside Numba's pool (`kernels.threads.quiet_blas`): one thread once the engine's kernels run,
or what $EDGETRAIN_BLAS_THREADS says; each case in a fresh interpreter, as the setting is made once per process."""
import json
import os
import subprocess
import sys

import pytest

_CHILD = """
import json
import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits
threadpool_limits(2, user_api="blas")
before = [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]
from edgetrain import kernels
a = np.ones((16, 16), np.int8)
assert (kernels.gemm(a, a) == 16).all()  # a small product: the pool comes up (threads.threads_for)
after = [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]
print(json.dumps({"before": before, "after": after}))
"""


def _blas_threads(value: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "EDGETRAIN_BLAS_THREADS"}
    if value is not None:
        env["EDGETRAIN_BLAS_THREADS"] = value
    done = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert ("is not a thread count" in done.stderr) == (value is not None and not value.isdigit())
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("value, want", [(None, 1), ("3", 3), ("0", 2), ("two", 1)])
def test_blas_runs_on_the_threads_asked_once_the_kernels_run(value, want):
    """Default one thread; a count from the environment; 0 leaves BLAS at what it was (2 here); a value that is
    not a count warns and takes the default."""
    seen = _blas_threads(value)
    if not seen["before"]:
        pytest.skip("threadpoolctl sees no BLAS library in this NumPy")
    assert set(seen["before"]) == {2}
    assert set(seen["after"]) == {want}
