"""Session set-up shared by every test module."""


def pytest_sessionstart(session) -> None:
    """Probe the integer routes once, up front (cached per machine; see edgetrain.kernels.routes).

    A first probe runs a child interpreter for a few seconds; paid inside a test, it would eat that
    test's time budget (an agent that must answer a handshake within 8 s, say)."""
    from edgetrain.kernels.routes import usable_routes

    usable_routes()
