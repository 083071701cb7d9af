"""A simulated board: the real agent as a subprocess on a pseudo-terminal, for tests and users without hardware.

    host --pyserial--> pty A slave | pty A master <-Relay-> pty B master | pty B slave <--pyserial-- agent

Both ends open a real tty device path through pyserial, exactly as they would a UART, and the
Relay between the two masters can drop, corrupt and pace bytes like a noisy line. The relay is
always there (a plain copy when no faults are asked for) so the simulated path is one shape.
We hold both slave ends open ourselves, so a killed agent leaves a silent line, not a hang-up,
and a restarted agent can open the same path again.
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import IO

from firmware_bridge.board.measure import SIMULATED_ENV
from firmware_bridge.wire.relay import Relay, RelayStats
from firmware_bridge.wire.transport import PtyPair, open_pty

__all__ = ["SimulatedBoard"]

AGENT_MODULE = "firmware_bridge.board.agent"
STOP_TIMEOUT_S = 5.0
AGENT_LOG = "agent.log"
# The package root, so the agent subprocess imports this very checkout whatever the cwd.
_PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)


class SimulatedBoard:
    """Starts an agent on a pty pair joined by a (lossy) relay; `host_port` is the device path for the host."""

    def __init__(
        self,
        cache_dir: str | os.PathLike[str] | None = None,
        *,
        corrupt_rate: float = 0.0,
        drop_rate: float = 0.0,
        duplicate_rate: float = 0.0,
        burst_rate: float = 0.0,
        baud: int | None = None,
        seed: int = 0,
        telemetry_root: str | os.PathLike[str] | None = None,
        python: str | list[str] = sys.executable,
        memory_limit: int | None = None,
    ) -> None:
        self._own_dir = tempfile.mkdtemp(prefix="edgetrain-sim-")
        self.cache_dir = Path(cache_dir) if cache_dir is not None else Path(self._own_dir) / "cache"
        self.log_path = Path(self._own_dir) / AGENT_LOG
        self.corrupt_rate = corrupt_rate
        self.drop_rate = drop_rate
        self.duplicate_rate = duplicate_rate
        self.burst_rate = burst_rate
        self.baud = baud
        self.seed = seed
        self.telemetry_root = telemetry_root
        # The command that runs the agent's Python: this interpreter, or e.g. an emulated board's
        # (`tools/arm64_board.sh python`), which must see this checkout and the ptys at the same paths.
        self.python = [python] if isinstance(python, str) else list(python)
        self.memory_limit = memory_limit  # bytes of address space (RLIMIT_AS) for the agent: a small board
        self.agent: subprocess.Popen[bytes] | None = None
        self._host_pty: PtyPair | None = None
        self._agent_pty: PtyPair | None = None
        self._relay: Relay | None = None
        self._log: IO[bytes] | None = None
        self.relay_stats: dict[str, RelayStats] = {}

    @property
    def host_port(self) -> str:
        """Return the tty path the host opens with pyserial."""
        if self._host_pty is None:
            raise RuntimeError("simulated board not started")
        return self._host_pty.slave_path

    @property
    def agent_port(self) -> str:
        """Return the tty path the agent opens."""
        if self._agent_pty is None:
            raise RuntimeError("simulated board not started")
        return self._agent_pty.slave_path

    def start(self) -> SimulatedBoard:
        """Create the ptys and the relay, and start the agent."""
        self._host_pty, self._agent_pty = open_pty(), open_pty()
        self._relay = Relay(
            self._host_pty.master_fd,
            self._agent_pty.master_fd,
            corrupt_rate=self.corrupt_rate,
            drop_rate=self.drop_rate,
            duplicate_rate=self.duplicate_rate,
            burst_rate=self.burst_rate,
            baud=self.baud,
            seed=self.seed,
        ).start()
        self.start_agent()
        return self

    def agent_command(self) -> list[str]:
        """Return the command line that starts the agent."""
        command = [*self.python, "-m", AGENT_MODULE, "--port", self.agent_port, "--cache", str(self.cache_dir), "-v"]
        if self.telemetry_root is not None:
            command += ["--telemetry-root", str(self.telemetry_root)]
        return command

    def start_agent(self) -> None:
        """Start (or restart) the agent process."""
        if self.agent is not None and self.agent.poll() is None:
            raise RuntimeError("agent already running")
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [_PACKAGE_ROOT, env.get("PYTHONPATH")]))
        # The agent reports this back in its telemetry, so every report of it says "simulated".
        env[SIMULATED_ENV] = "1"
        if self._log is None:
            self._log = open(self.log_path, "ab")
        self.agent = subprocess.Popen(
            self.agent_command(), stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log, env=env,
            preexec_fn=self._limit_memory if self.memory_limit is not None else None,
        )

    def _limit_memory(self) -> None:
        # Runs in the child between fork and exec: only the agent is limited, not this process.
        resource.setrlimit(resource.RLIMIT_AS, (self.memory_limit, self.memory_limit))

    def kill_agent(self) -> None:
        """Kill the agent abruptly (SIGKILL), as a crash or a pulled power cord would."""
        if self.agent is not None and self.agent.poll() is None:
            self.agent.send_signal(signal.SIGKILL)
            self.agent.wait()

    def stop_agent(self) -> None:
        """Stop the agent politely (SIGTERM), killing it if it does not go."""
        if self.agent is None or self.agent.poll() is not None:
            return
        self.agent.terminate()
        try:
            self.agent.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.kill_agent()

    def agent_log(self) -> str:
        """Return what the agent has logged so far."""
        if self._log is not None:
            self._log.flush()
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        """Stop the agent and the relay, close the ptys and remove the scratch folder."""
        self.stop_agent()
        if self._relay is not None:
            self.relay_stats = self._relay.stats
            with contextlib.suppress(RuntimeError):
                self._relay.stop()
            self._relay = None
        for pty in (self._host_pty, self._agent_pty):
            if pty is not None:
                pty.close()
        if self._log is not None:
            self._log.close()
            self._log = None
        shutil.rmtree(self._own_dir, ignore_errors=True)

    def __enter__(self) -> SimulatedBoard:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
