"""The child side of a route probe: `python -m edgetrain.kernels.route_probe ROUTE` prints one JSON line.

Run only by `routes`, in a fresh interpreter, so that whatever loading a route does (a library reached
through ctypes that crashes the process, a kernel that hangs) happens there and not in the caller.
"""
from __future__ import annotations

import json
import sys

from edgetrain.kernels.routes import ROUTES

__all__ = ["main"]


def probe_here(route: str) -> tuple[bool, str]:
    """The route's own check, in this process (the probe's child): (passed, why not)."""
    if route == "vnni":
        from edgetrain.kernels import vnni
        from edgetrain.kernels.vnni_backend import VnniBackend

        if VnniBackend().vnni_kernels_pass():
            return True, f"ok ({vnni.isa()} tiles)"
        return False, f"the fused 8-bit kernels ({vnni.isa()} tiles) failed their exactness check"
    if route == "onnxruntime":
        from edgetrain.kernels.ort_backend import OrtBackend

        return OrtBackend().library_passes()
    return True, "ok"


def main(argv: list[str] | None = None) -> int:
    """Child side of a probe: print one JSON line {"ok": bool, "why": str} for the route named."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0] not in ROUTES:
        print(json.dumps({"ok": False, "why": f"unknown route {args}"}))
        return 2
    try:
        ok, why = probe_here(args[0])
    except Exception as exc:  # any failure of the route is a 'no', reported in one line
        ok, why = False, f"{type(exc).__name__}: {exc}"
    print(json.dumps({"ok": ok, "why": why}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
