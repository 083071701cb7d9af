"""A federation's settings: one flat dict of scalars, as Flower's run config carries them.

The same keys work in `[tool.flwr.app.config]` of a Flower App and in `edgetrain federate`, which builds them
from its flags. The client's training settings (schedule, bits, lr, freeze, ...) travel as one JSON object
under "train": edgetrain's own TrainConfig fields, checked by its own `resolve`.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from edgetrain.errors import EdgetrainError
from edgetrain.fleet.codec import parse_update_bits
from edgetrain.fleet.partitions import parse_partition
from edgetrain.train.config import FIELDS, TrainConfig, resolve

STRATEGIES = ("fedavg", "fedavgm", "fedprox", "fedadam", "fedtrimmedavg", "fedtrimmedavgm", "krum")
FAULTS = ("nan", "shape", "dtype", "garbage")
FEDERATION_KEYS = {"model", "data", "steps", "epochs", "out"}  # the federation sets these for every client
# A client policy that names a schedule replaces the run's whole precision part (a static "bits" cannot stand
# beside a dfq schedule); one that does not is laid over the run's training settings key by key.
PRECISION_KEYS = {"schedule", "bits"} | {n for n, f in FIELDS.items() if f.metadata.get("group") in ("pfq", "dfq")}
POLICY_ALIASES = {"latency_table": "dfq_cost_table"}  # `edgetrain profile --latency-table`'s file


@dataclass
class FleetSettings:
    """Everything a federation needs; field names with dashes are the run-config keys."""

    model: str = ""
    data: str = "digits"
    clients: int = 3
    rounds: int = 3
    partition: str = "iid"
    local_steps: int = 10
    seed: int = 0
    strategy: str = "fedavg"
    update_bits: str = "8"
    out: str = "edgetrain-fleet"
    min_clients: int = 0  # 0: every client, every round
    round_timeout: float = 0.0  # seconds a round waits for replies; 0: no limit
    max_reply_factor: float = 1.5  # a reply may be this many times the expected wire size
    client_eval: bool = False  # federated evaluation on each client's held-out split every round
    proximal_mu: float = 0.01  # fedprox
    trim_beta: float = 0.2  # fedtrimmedavg(m): fraction cut at each end
    krum_byzantine: int = 1  # krum: clients assumed hostile
    server_lr: float = 0.1  # fedadam: eta
    # fedavgm, fedtrimmedavgm: momentum of the server's step (its lr is 1, FedAvg's): makes up for the restart of
    # the clients' momentum every round. 0.3: chosen on the digits at clients' lr 0.15 (tools/federated_experiment.py,
    # seeds 10-11); the literature's 0.9 diverged there.
    server_momentum: float = 0.3
    stop_after: int = 0  # stop (resumably) after this round; 0: run all rounds
    resume: bool = False  # continue the federation in `out` from its newest checkpoint
    fault: str = ""  # "CLIENT:KIND[:ROUND],...": that client corrupts its replies (tests, robustness experiments)
    export: bool = True  # float and int8 ONNX of the final global model, checked in onnxruntime
    train: str = "{}"  # JSON of TrainConfig fields (not model, data, steps, out)
    # JSON {"<client id>": {TrainConfig fields, or "latency_table": PATH}}: that client's own precision policy
    client_policies: str = "{}"
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def to_run_config(self) -> dict[str, bool | int | float | str]:
        """Flat run-config dict (keys with dashes)."""
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name != "extra"}

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> FleetSettings:
        """Settings from a run config; unknown keys are an error naming them."""
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        values: dict[str, Any] = {}
        for key, value in run_config.items():
            name = str(key).replace("-", "_")
            if name not in names:
                raise EdgetrainError(f"run config: unknown key '{key}'; valid: "
                                     f"{', '.join(sorted(n.replace('_', '-') for n in names))}")
            values[name] = value
        settings = cls(**values)
        if not settings.model:  # a Flower App's default: the shipped LeNet-5
            from importlib import resources

            settings.model = str(resources.files("edgetrain") / "assets" / "lenet5_digits.onnx")
        settings.check()
        return settings

    def check(self) -> None:
        """Refuse values that cannot run, as one line naming the setting."""
        for name in ("clients", "rounds", "local_steps"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise EdgetrainError(f"--{name.replace('_', '-')} must be an integer >= 1, got {getattr(self, name)!r}")
        if self.strategy not in STRATEGIES:
            raise EdgetrainError(f"--strategy {self.strategy!r}: valid are {', '.join(STRATEGIES)}")
        if not 0 <= self.server_momentum < 1:
            raise EdgetrainError(f"--server-momentum {self.server_momentum!r}: must be in [0, 1)")
        if not 0 <= self.min_clients <= self.clients:
            raise EdgetrainError(f"--min-clients {self.min_clients}: must be 0..{self.clients}")
        if not self.model:
            raise EdgetrainError("no model: give MODEL.onnx (or --demo)")
        parse_partition(self.partition)
        parse_update_bits(self.update_bits)
        if self.fault:
            self.fault_plan()
        self.train_config()
        for client, policy in self.policies().items():
            if not 0 <= client < self.clients:
                raise EdgetrainError(f"client-policies: client {client} is not one of 0..{self.clients - 1}")
            self.train_config(policy=policy, where=f"client-policies: client {client}")

    @property
    def bits(self) -> int | None:
        """Update width (None: fp32 deltas)."""
        return parse_update_bits(self.update_bits)

    @property
    def required_clients(self) -> int:
        """Replies a round needs before it aggregates."""
        return self.min_clients or self.clients

    def fault_plan(self) -> list[tuple[int, str, int | None]]:
        """(client, kind, round or None for every round) of each comma-separated entry of the `fault` setting."""
        plan = []
        for entry in filter(None, (e.strip() for e in self.fault.split(","))):
            parts = entry.split(":")
            try:
                client, kind = int(parts[0]), parts[1]
                at = int(parts[2]) if len(parts) > 2 else None
            except (ValueError, IndexError):
                raise EdgetrainError(f"--fault {entry!r}: give CLIENT:KIND[:ROUND], KIND one of "
                                     f"{', '.join(FAULTS)}") from None
            if kind not in FAULTS or len(parts) > 3:
                raise EdgetrainError(f"--fault {entry!r}: KIND is one of {', '.join(FAULTS)}")
            plan.append((client, kind, at))
        return plan

    def fault_for(self, client: int, round: int) -> str | None:
        """The fault a client injects in a round, if any."""
        return next((kind for who, kind, at in self.fault_plan() if who == client and at in (None, round)), None)

    def train_values(self) -> dict[str, Any]:
        """The TrainConfig fields the "train" JSON sets."""
        values = _json_object(self.train, "run config 'train'", "training settings")
        clash = sorted(set(values) & FEDERATION_KEYS)
        if clash:
            raise EdgetrainError(f"run config 'train' may not set {', '.join(clash)} (the federation sets them)")
        return values

    def policies(self) -> dict[int, dict[str, Any]]:
        """Each client's own precision policy from `client_policies`, by client id."""
        raw = _json_object(self.client_policies, "run config 'client-policies'", "client id -> policy")
        out = {}
        for key, policy in raw.items():
            try:
                client = int(key)
            except ValueError:
                raise EdgetrainError(f"client-policies: '{key}' is not a client id (an integer)") from None
            out[client] = parse_policy(policy, f"client-policies: client {client}")
        return out

    def policy_for(self, client: int, node_policy: str | None = None) -> dict[str, Any]:
        """Client `client`'s policy: its SuperNode's own (node config `precision-policy`, JSON) wins over the run
        config's entry; {} means the run's training settings."""
        if node_policy:
            return parse_policy(_json_object(str(node_policy), "node config 'precision-policy'", "policy"),
                                "node config 'precision-policy'")
        return self.policies().get(int(client), {})

    def train_config(self, *, seed: int | None = None, out: str | None = None,
                     policy: Mapping[str, Any] | None = None, where: str = "") -> TrainConfig:
        """The TrainConfig of one client's local training under `policy` (validated by edgetrain's `resolve`)."""
        values = self.train_values()
        if policy:
            if "schedule" in policy:
                values = {k: v for k, v in values.items() if k not in PRECISION_KEYS}
            values = {**values, **policy}
        flags = {**values, "model": self.model, "data": self.data, "steps": self.local_steps,
                 "seed": self.seed if seed is None else seed, "out": out or self.out}
        if not where:
            return resolve(flags)
        try:
            return resolve(flags)
        except EdgetrainError as exc:
            raise EdgetrainError(f"{where}: {exc}") from None


def _json_object(text: str, what: str, shape: str) -> dict[str, Any]:
    """A JSON object from a run-config string, or a one-line error naming the setting."""
    try:
        values = json.loads(text) if text else {}
    except ValueError as exc:
        raise EdgetrainError(f"{what}: not JSON ({exc})") from None
    if not isinstance(values, dict):
        raise EdgetrainError(f"{what}: expected a JSON object ({shape})")
    return values


def parse_policy(policy: Any, where: str) -> dict[str, Any]:
    """One client's policy as TrainConfig fields ("latency_table" is dfq_cost_table); refuses what it may not set."""
    if not isinstance(policy, dict):
        raise EdgetrainError(f"{where}: a policy is a JSON object of training settings")
    values = {POLICY_ALIASES.get(k, k): v for k, v in policy.items()}
    clash = sorted(set(values) & (FEDERATION_KEYS | {"seed"}))
    unknown = sorted(set(values) - set(FIELDS))
    if clash or unknown:
        raise EdgetrainError(f"{where}: may not set {', '.join(clash + unknown)}"
                             + (" (not a training setting)" if unknown else " (the federation sets them)"))
    return values


def client_seed(seed: int, round: int, client: int) -> int:
    """The seed of one client's local training in one round (data order, rounding): distinct and reproducible."""
    return (int(seed) * 1_000_003 + int(round) * 65_537 + int(client)) % (1 << 31)
