"""``DaemonSettings``: every field the daemon is configured with (the ``EplbConfig`` fields plus its
own), each field's checks, and which fields may change on a running daemon."""

from __future__ import annotations

import json
import re
from typing import Any, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from eplbd.config import MAX_TIMEOUT_S, MIN_TIMEOUT_S, EplbConfig, finite_within

_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
CURVE_FIELDS = ("curve_secret_key_file", "curve_worker_keys_dir", "curve_operator_keys_dir")
_RANKS_RE = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")
_TCP_RE = re.compile(r"^tcp://(?P<host>\*|\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.\-]+):(?P<port>\*|[0-9]{1,5})$")


def _check_endpoint(value: str) -> str:
    if value.startswith("tcp://"):
        m = _TCP_RE.match(value)
        # "*" is ZMQ's spelling of "any free port", same as 0.
        if m is None or (m["port"] != "*" and int(m["port"]) > 65535):
            raise ValueError("a tcp endpoint must be tcp://HOST:PORT with PORT in 0..65535 (or *)")
        return value
    for scheme in ("ipc://", "inproc://"):
        if value.startswith(scheme):
            if len(value) == len(scheme):
                raise ValueError(f"an {scheme} endpoint needs a name after {scheme!r}")
            return value
    raise ValueError("an endpoint must be tcp://HOST:PORT, ipc://PATH or inproc://NAME")


def parse_ranks(spec: str | int | list[int], max_rank: int = 1 << 20) -> frozenset[int]:
    """Ranks named by ``spec``: ``"0-7,12"`` (ranges inclusive), an int, or a list of ints.

    Raises:
        ValueError: naming the part that is not a rank or a range ``LO-HI`` with ``LO <= HI < max_rank``.
    """
    if isinstance(spec, bool):
        raise ValueError(f"{spec!r} is not a rank list")
    if isinstance(spec, int):
        parts: list[str] = [str(spec)]
    elif isinstance(spec, list):
        parts = [str(x) if isinstance(x, int) and not isinstance(x, bool) else "?" for x in spec]
    elif isinstance(spec, str):
        parts = spec.split(",")
    else:
        raise ValueError(f"{spec!r} is not a rank list like \"0-7,12\"")
    ranks: set[int] = set()
    for part in parts:
        m = _RANKS_RE.match(part)
        lo = int(m[1]) if m else -1
        hi = int(m[2]) if m and m[2] else lo
        if m is None or not 0 <= lo <= hi < max_rank:
            raise ValueError(f"{part.strip()!r} in {spec!r} is not a rank or a range LO-HI (0 <= LO <= HI < "
                             f"{max_rank})")
        ranks.update(range(lo, hi + 1))
    return frozenset(ranks)


class DaemonSettings(EplbConfig):
    """Everything the daemon is configured with: the EPLB fields plus its own.

    Frozen: a run-time change goes through ``apply_update``, which returns a new
    validated object, so a task holding the old one never sees half an update.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=True)

    rpc: str = Field(default="tcp://127.0.0.1:7450",
                     description="ROUTER endpoint for request/reply (registration, plans, operator commands).")
    ingest: str = Field(default="tcp://127.0.0.1:7451", description="PULL endpoint for load reports.")
    metrics_host: str = Field(default="127.0.0.1", description="Address the HTTP metrics server binds.")
    metrics_port: int = Field(default=7452, ge=-1, le=65535,
                              description="HTTP port for /metrics, /healthz, /readyz (0 = any free port, "
                                          "-1 = disabled).")
    state_dir: str | None = Field(default=None,
                                  description="Directory where the placement and plans survive a restart "
                                              "(unset = in memory only).")
    heartbeat_timeout_s: float = Field(default=10.0, gt=0,
                                       description="A rank silent for this long is considered gone.")
    max_frame_bytes: int = Field(default=64 * 1024 * 1024, ge=64 * 1024, le=1 << 40,
                                 description="Largest frame accepted from a peer, in bytes; libzmq drops a "
                                             "peer that sends more before any of it is kept.")
    ingest_hwm: int = Field(default=16, ge=1, le=100_000,
                            description="Load reports queued per rank in the daemon's ingest socket; beyond it the "
                                        "ranks' senders drop (counted as sequence gaps) instead of the daemon's "
                                        "memory growing while it is busy (a commit's window fold, a slow policy).")
    curve_secret_key_file: str | None = Field(
        default=None, description="The daemon's CURVE secret key file (NAME.key_secret from `eplbd keygen`). "
                                  "Set it to encrypt and authenticate both sockets; then both key "
                                  "directories below must be set too (unset = no CURVE).")
    curve_worker_keys_dir: str | None = Field(
        default=None, description="Directory of worker public keys (*.key): these may report load and "
                                  "register, heartbeat, mark layers ready, ack and abort plans.")
    curve_operator_keys_dir: str | None = Field(
        default=None, description="Directory of operator public keys (*.key): these may run every eplbctl "
                                  "command (status, balancedness, rebalance, pause, config, ...).")
    curve_worker_ranks: dict[str, str] | None = Field(
        default=None, description="Binds worker keys to ranks: key name (the *.key file's stem in "
                                  "curve_worker_keys_dir) -> the ranks it may register, as \"0-7,12\"; in TOML an "
                                  "inline table, in the environment or a flag JSON. When set, a worker key not "
                                  "named here may register no rank (unset = any worker key may register any rank).")
    max_ep_size: int = Field(default=1024, ge=1, le=1 << 16,
                             description="Largest EP group (ranks) a registration or a resize may ask for.")
    max_layers: int = Field(default=256, ge=1, le=1 << 16,
                            description="Most MoE layers a registering group may have.")
    max_experts: int = Field(default=4096, ge=1, le=1 << 20,
                             description="Most experts per layer, logical or physical (slots), a registering group "
                                         "or a resize may have.")
    window_memory_bytes: int = Field(default=2 << 30, ge=1 << 20, le=1 << 42,
                                     description="Memory budget of the load window in bytes (window_size x layers x "
                                                 "(logical + physical experts) x 4); a registration, resize or "
                                                 "window_size that needs more is refused.")
    max_steps_ahead: int = Field(default=100000, gt=0,
                                 description="Reject load reports whose step is this far ahead of the "
                                             "newest one seen.")
    initial_placement: Literal["linear", "round_robin"] = Field(
        default="linear", description="Placement of epoch 0 when no state or worker supplies one.")
    commit_interval_steps: int = Field(default=16, gt=0,
                                       description="Step cadence at which ranks agree in-band to commit "
                                                   "staged layers.")
    stuck_abort_streak: int = Field(default=3, gt=0,
                                    description="Rebalancing counts as stuck (/healthz fails) after this many "
                                                "plans in a row ended aborted without a commit between them.")
    silent_load_warn_steps: int = Field(default=200, gt=0,
                                        description="Warn (log, status load_silent, metric eplbd_load_silent_steps) once "
                                                    "no rank has counted a token for this many steps in a row "
                                                    "while the engine steps.")
    log_level: str = Field(default="INFO", description=f"Logging level, one of {', '.join(_LOG_LEVELS)}.")
    log_json: bool = Field(default=False, description="Write logs as one JSON object per line.")

    @field_validator("rpc", "ingest")
    @classmethod
    def _endpoint(cls, value: str) -> str:
        return _check_endpoint(value)

    @field_validator("heartbeat_timeout_s")
    @classmethod
    def _timeout_s(cls, value: float) -> float:
        return finite_within(value, MIN_TIMEOUT_S, MAX_TIMEOUT_S, "seconds")

    @field_validator("curve_worker_ranks", mode="before")
    @classmethod
    def _worker_ranks(cls, value: Any) -> Any:
        if isinstance(value, str):  # the environment and flags carry JSON
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                raise ValueError('give a JSON object of key name -> ranks, like {"node0": "0-7"}') from None
        if not isinstance(value, dict):
            return value  # None, or pydantic's own type error
        out = {}
        for name, spec in value.items():
            parse_ranks(spec)  # ValueError naming the bad part
            out[str(name)] = ",".join(map(str, spec)) if isinstance(spec, list) else str(spec)
        return out

    @field_validator("log_level")
    @classmethod
    def _level(cls, value: str) -> str:
        level = value.strip().upper()
        if level == "WARN":
            level = "WARNING"
        if level not in _LOG_LEVELS:
            raise ValueError(f"log level must be one of {', '.join(_LOG_LEVELS)}")
        return level

    @model_validator(mode="after")
    def _curve_all_or_none(self) -> "DaemonSettings":
        keys = {f: getattr(self, f) for f in CURVE_FIELDS}
        if self.curve_secret_key_file is None:
            given = [f for f, v in keys.items() if v is not None]
            if given:
                raise ValueError(f"{', '.join(f'{f}={keys[f]!r}' for f in given)} given but curve_secret_key_file "
                                 "is not set: CURVE would be off; set curve_secret_key_file to turn it on")
        else:
            missing = [f for f, v in keys.items() if v is None]
            if missing:
                raise ValueError(f"curve_secret_key_file={self.curve_secret_key_file!r} turns CURVE on, which "
                                 f"needs {' and '.join(missing)} too (an empty directory admits no one)")
        if self.curve_worker_ranks is not None and self.curve_secret_key_file is None:
            raise ValueError("curve_worker_ranks is set but curve_secret_key_file is not: ranks can be bound to "
                             "worker keys only with CURVE on")
        return self

    @property
    def curve_enabled(self) -> bool:
        """Whether both sockets use CURVE (``curve_secret_key_file`` is set)."""
        return self.curve_secret_key_file is not None

    def eplb_config(self) -> EplbConfig:
        """Returns:
            The ``EplbConfig`` part of these settings (what the scheduler and policies take).
        """
        return EplbConfig.model_validate(self.model_dump(include=set(EplbConfig.model_fields)))


FIELDS: tuple[str, ...] = tuple(DaemonSettings.model_fields)

# Keys an operator may change on a running daemon. Endpoints, the state dir and
# the metrics port are bound at start; num_redundant_experts changes the slot
# count the workers allocated; the communicator is set up by the workers.
RUNTIME_MUTABLE: frozenset[str] = frozenset({
    "step_interval", "min_gain", "log_balancedness", "log_balancedness_interval", "policy",
    "plan_timeout_s", "window_size", "heartbeat_timeout_s", "commit_interval_steps",
    "plan_stall_timeout_s", "stuck_abort_streak", "silent_load_warn_steps",
    "min_gain_per_transfer_s", "transfer_gb_per_s", "replan_below", "move_budget",
})
if not RUNTIME_MUTABLE <= set(FIELDS):  # pragma: no cover - guards the table itself
    raise RuntimeError(f"RUNTIME_MUTABLE names unknown fields: {sorted(RUNTIME_MUTABLE - set(FIELDS))}")
