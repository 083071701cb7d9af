"""Host <-> board serial bridge for edgetrain.

Folders, bottom up:

* `wire/`: frames (COBS, CRC), the message catalogue (JSON or raw chunks; never pickle), the reliable
  link over anything with pyserial's read/write/timeout interface, ports and pseudo-terminals, the
  lossy relay that simulates a noisy UART, and the link benchmark. Imports nothing of edgetrain.
* `telemetry/`: power, temperature and clock readers for Jetson, Raspberry Pi and Linux.
* `profile/`: what host and board share (the workload, its training loop and weights digest) and the
  host side of `edgetrain profile`: the session and its records, the report, the simulated board, the
  subcommand.
* `board/`: the board agent (`edgetrain-agent`), its blob cache and its memory/power meter.

The wire protocol is specified in docs/PROTOCOL.md.
"""
