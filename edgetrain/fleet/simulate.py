"""A federation on one machine: Flower's simulation runtime (Ray) runs the ClientApps as virtual SuperNodes."""
from __future__ import annotations

import logging
import os
from typing import Any

from edgetrain.fleet import require_flwr
from edgetrain.fleet.settings import FleetSettings


def backend_config(cpus: int | None = None, actors: int | None = None) -> dict[str, Any]:
    """Ray's resources: `cpus` logical CPUs (default: this machine's) shared by `actors` client processes
    (default one per CPU), no GPU. Each actor pays Python, Numba and edgetrain start-up once."""
    cpus = cpus or os.cpu_count() or 1
    actors = max(1, min(actors or cpus, cpus))
    return {"client_resources": {"num_cpus": cpus / actors, "num_gpus": 0.0},
            "init_args": {"num_cpus": int(cpus), "num_gpus": 0, "include_dashboard": False}}


def simulate(settings: FleetSettings, *, resume: bool = False, cpus: int | None = None, actors: int | None = None,
             verbose: bool = False) -> dict[str, Any]:
    """Run the federation the settings describe with `settings.clients` simulated SuperNodes; returns its summary."""
    require_flwr()
    settings.check()
    # Ray warns about an accelerator variable we do not use; the actors inherit the environment.
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    from flwr.simulation import run_simulation

    from edgetrain.fleet.client_app import make_client_app
    from edgetrain.fleet.local import preflight
    from edgetrain.fleet.server import make_server_app

    preflight(settings)
    overrides = settings.to_run_config()
    result: dict[str, Any] = {}
    flwr_log = logging.getLogger("flwr")
    level = flwr_log.level
    if not verbose:
        flwr_log.setLevel(logging.WARNING)  # our progress line per round replaces Flower's INFO lines
    try:
        run_simulation(make_server_app(overrides, resume=resume, result=result), make_client_app(overrides),
                       num_supernodes=settings.clients, backend_config=backend_config(cpus, actors),
                       verbose_logging=verbose)
    finally:
        flwr_log.setLevel(level)
    return result
