"""Session set-up shared by every test module."""
import os

# Under pytest-xdist (the README's test command) the workers share the cores. Numba's OpenMP threads
# spin while they wait, so two workers of two threads each on two cores slow every parallel kernel
# down (measured: a ResNet-8 8/8 training run 1.7x slower at 2 threads than at 1 beside one busy
# process). Each worker takes its share of the cores; child processes the tests start (the CLI, the
# board agent) keep their default count but wait passively. Tests that compare thread counts still
# set them explicitly, up to numba.config.NUMBA_NUM_THREADS, which is left alone.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def pytest_sessionstart(session) -> None:
    """Probe the integer routes once, up front (cached per machine; see edgetrain.kernels.routes).

    A first probe runs a child interpreter for a few seconds; paid inside a test, it would eat that
    test's time budget (an agent that must answer a handshake within 8 s, say)."""
    from edgetrain.kernels.routes import usable_routes

    usable_routes()
    if _WORKERS > 1:
        import numba

        numba.set_num_threads(max(1, numba.config.NUMBA_NUM_THREADS // _WORKERS))
