"""Every message of the eplbd wire protocol, as one tagged msgspec union.

Each message is a ``msgspec.Struct`` tagged by its class name in the field
``"type"``. Schema evolution rules (msgspec's): a new field always gets a
default, a tag (class name) is never renamed, unknown fields are ignored, and
an incompatible change bumps ``PROTOCOL_VERSION``. Every message carries
``req_id``: a request's id is copied into its reply so that a client can match
them; unsolicited messages (pushes, load reports) leave it 0.

Tensor fields hold CPU ``torch.Tensor``s and travel as extra frames (see
``codec``); after decoding they are read-only views of the receive buffer.

Sockets and directions (the daemon binds both):

* PULL (fire-and-forget, worker -> daemon): ``LoadReport``.
* ROUTER (worker DEALER):  ``Hello`` -> ``Welcome``; ``RegisterWorker`` ->
  ``Registered``; ``Heartbeat``, ``LayerReady``, ``Ack``, ``Abort`` -> ``OkReply``.
  Daemon pushes, unsolicited: ``Plan``, ``Commit``, ``Abort``.
* ROUTER (operator DEALER): ``Hello`` -> ``Welcome``, then the ``*Request``
  types in ``OPERATOR_REQUEST_TYPES``, each answered as in ``REPLY_TYPE_FOR``.
* Any request may instead get an ``ErrorReply`` (a typed error with a stable code).
"""

from __future__ import annotations

from typing import Any, Union

import msgspec
import torch

from eplbd.errors import (
    EplbdError,
    InternalError,
    InvalidArgumentError,
    UnexpectedMessageError,
    VersionMismatchError,
    error_from_code,
)

PROTOCOL_VERSION = 1
ROLES = ("worker", "operator")
PLAN_STATES = ("pending", "committing", "committed", "aborted")
_INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def check_version(peer_version: int) -> None:
    """Raise ``VersionMismatchError`` unless ``peer_version`` is ``PROTOCOL_VERSION``."""
    if peer_version != PROTOCOL_VERSION:
        raise VersionMismatchError(
            f"peer speaks protocol version {peer_version}, this side speaks {PROTOCOL_VERSION}; "
            "upgrade eplbd on the older side"
        )


def _check_tensor(where: str, t: torch.Tensor, ndim: int, dtypes: tuple[torch.dtype, ...]) -> None:
    # Raised as a ValueError subclass so that msgspec reports it as a
    # validation error of the received message (the codec turns it into DecodeError).
    if not isinstance(t, torch.Tensor) or t.dim() != ndim or t.dtype not in dtypes:
        raise InvalidArgumentError(
            f"{where} must be a {ndim}-d tensor of {'/'.join(str(d)[6:] for d in dtypes)}, "
            f"got {_describe(t)}"
        )


def _describe(t: Any) -> str:
    if isinstance(t, torch.Tensor):
        return f"shape {list(t.shape)} dtype {str(t.dtype)[6:]}"
    return f"a {type(t).__name__}"


class _Message(msgspec.Struct, tag=True, tag_field="type", kw_only=True):
    req_id: int = 0


# --- handshake ---------------------------------------------------------------
class Hello(_Message):
    """First request of every DEALER connection; answered by ``Welcome`` or a version error."""

    role: str  # one of ROLES
    protocol_version: int
    client_id: str

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise InvalidArgumentError(f"Hello.role must be one of {ROLES}, got {self.role!r}")


class Welcome(_Message):
    protocol_version: int
    daemon_id: str
    epoch: int


# --- worker ------------------------------------------------------------------
class RegisterWorker(_Message):
    """A rank joins (or re-joins) the EP group.

    ``phy2log``: [num_layers, num_physical_experts] int64, the placement the
    rank is running on now (epoch ``epoch``). ``worker_id`` names this
    incarnation (carries a uuid) so that a restarted rank does not collide with
    its previous life. ``expert_bytes``: bytes of all tensors of one expert in
    one layer (weights, scales, biases), used to price moves.
    """

    rank: int
    ep_size: int
    worker_id: str
    num_layers: int
    num_logical_experts: int
    num_physical_experts: int
    num_local_physical_experts: int
    epoch: int
    phy2log: torch.Tensor
    node: int = 0
    num_nodes: int = 1
    num_groups: int = 1
    expert_bytes: int = 0
    communicator: str = ""
    step: int = 0  # the engine's current step, so a re-registering rank resumes counting
    hostname: str = ""
    pid: int = 0

    def __post_init__(self) -> None:
        _check_tensor("RegisterWorker.phy2log", self.phy2log, 2, (torch.int64,))
        want = (self.num_layers, self.num_physical_experts)
        if tuple(self.phy2log.shape) != want:
            raise InvalidArgumentError(
                f"RegisterWorker.phy2log has shape {list(self.phy2log.shape)}, expected "
                f"[num_layers, num_physical_experts] = {list(want)}"
            )
        if not 0 <= self.rank < self.ep_size:
            raise InvalidArgumentError(f"RegisterWorker.rank {self.rank} is outside [0, ep_size={self.ep_size})")


class Registered(_Message):
    """Reply to ``RegisterWorker``.

    ``phy2log``: [num_layers, num_physical_experts] int64 the worker must switch
    to before reporting (None: keep yours). ``plan``: a plan in flight the
    worker should join. ``commit_interval_steps``: the step cadence at which
    ranks agree in-band on what to commit (0: the worker's default).
    """

    epoch: int
    phy2log: torch.Tensor | None = None
    plan: Plan | None = None
    daemon_id: str = ""
    heartbeat_interval_s: float = 0.0
    commit_interval_steps: int = 0

    def __post_init__(self) -> None:
        if self.phy2log is not None:
            _check_tensor("Registered.phy2log", self.phy2log, 2, (torch.int64,))


class LoadReport(_Message):
    """Load of consecutive steps on one rank, sent on the PULL socket (no reply).

    ``load``: [steps, num_layers, num_physical_experts] integer tokens routed to
    each physical expert, steps ``first_step .. first_step + steps - 1``, all
    recorded under placement ``epoch`` (a reporter splits batches at an epoch
    change). ``seq`` counts reports per incarnation from 0, so the daemon sees
    gaps; ``dropped_steps`` counts steps the reporter itself dropped (bounded
    queue) since its previous report.
    """

    rank: int
    worker_id: str
    epoch: int
    first_step: int
    seq: int
    load: torch.Tensor
    dropped_steps: int = 0

    def __post_init__(self) -> None:
        _check_tensor("LoadReport.load", self.load, 3, _INT_DTYPES)

    @property
    def num_steps(self) -> int:
        return self.load.shape[0]


class Heartbeat(_Message):
    """Liveness from a worker; ``epoch`` is the placement it runs on (-1: unknown)."""

    rank: int
    worker_id: str
    step: int
    epoch: int = -1


# --- plans -------------------------------------------------------------------
class Plan(_Message):
    """Daemon -> workers: move to a new placement for ``layers``.

    ``phy2log``: [len(layers), num_physical_experts] int64, row i is the new
    placement of layer ``layers[i]``. Applying it turns ``base_epoch`` into
    ``epoch``. ``timeout_s`` bounds staging (0: the worker's default).
    """

    plan_id: int
    epoch: int
    base_epoch: int
    layers: list[int]
    phy2log: torch.Tensor
    policy: str
    reason: str = ""
    timeout_s: float = 0.0

    def __post_init__(self) -> None:
        _check_tensor("Plan.phy2log", self.phy2log, 2, (torch.int64,))
        if self.phy2log.shape[0] != len(self.layers):
            raise InvalidArgumentError(
                f"Plan.phy2log has {self.phy2log.shape[0]} rows for {len(self.layers)} layers"
            )


class LayerReady(_Message):
    """Worker -> daemon: ``layers`` of plan ``plan_id`` are staged on ``rank``."""

    rank: int
    plan_id: int
    epoch: int
    layers: list[int]
    worker_id: str = ""


class Commit(_Message):
    """Daemon -> workers: ``layers`` of plan ``plan_id`` may be applied (at the agreed step)."""

    plan_id: int
    epoch: int
    layers: list[int]


class Ack(_Message):
    """Worker -> daemon: ``layers`` were applied on ``rank`` at the boundary before ``step``."""

    rank: int
    plan_id: int
    epoch: int
    layers: list[int]
    step: int
    worker_id: str = ""


class Abort(_Message):
    """Either way: plan ``plan_id`` is abandoned; the old placement keeps serving.

    ``rank`` is the rank that failed (-1: the daemon or an operator aborted).
    """

    plan_id: int
    epoch: int
    reason: str
    rank: int = -1


# --- operator ----------------------------------------------------------------
class WorkerInfo(msgspec.Struct, kw_only=True):
    rank: int
    worker_id: str
    alive: bool
    last_seen_s: float  # seconds since the last message from this worker
    node: int = 0
    epoch: int = -1
    hostname: str = ""


class BalanceStats(msgspec.Struct, kw_only=True):
    """Balancedness (mean rank load / max rank load) over layers; ``aggregate`` is vLLM's."""

    min: float
    p50: float
    p90: float
    mean: float
    aggregate: float


class PlanInfo(_Message):
    """A plan as stored by the daemon; reply to ``GetPlanRequest``.

    ``phy2log``: [len(layers), num_physical_experts] int64 when asked for, else None.
    ``timings``: phase name -> seconds (e.g. "decide", "stage", "commit").
    """

    plan_id: int
    epoch: int
    base_epoch: int
    state: str  # one of PLAN_STATES
    reason: str = ""
    layers: list[int] = msgspec.field(default_factory=list)
    policy: str = ""
    predicted_before: float = 0.0
    predicted_after: float = 0.0
    moved_slots: int = 0
    moved_bytes: int = 0
    created_at: float = 0.0  # unix time
    timings: dict[str, float] = msgspec.field(default_factory=dict)
    phy2log: torch.Tensor | None = None


class StatusRequest(_Message):
    pass


class StatusReply(_Message):
    epoch: int
    step: int
    paused: bool
    workers: list[WorkerInfo] = msgspec.field(default_factory=list)
    window_fill: int = 0  # steps in the window now
    window_size: int = 0
    current_plan: PlanInfo | None = None
    last_decision_reason: str = ""
    reports_received: int = 0
    reports_dropped: int = 0
    drop_reasons: dict[str, int] = msgspec.field(default_factory=dict)
    daemon_id: str = ""
    ep_size: int = 0
    policy: str = ""
    next_rebalance_step: int = -1
    uptime_s: float = 0.0


class BalancednessRequest(_Message):
    per_layer: bool = False
    per_rank: bool = False


class BalancednessReply(_Message):
    """``per_rank_load``: [num_layers, ep_size] float64 mean load per rank (if asked for)."""

    observed: BalanceStats
    predicted: BalanceStats
    per_layer_observed: list[float] | None = None
    per_layer_predicted: list[float] | None = None
    per_rank_load: torch.Tensor | None = None
    epoch: int = 0
    window_fill: int = 0

    def __post_init__(self) -> None:
        if self.per_rank_load is not None:
            _check_tensor("BalancednessReply.per_rank_load", self.per_rank_load, 2, (torch.float64, torch.float32))


class RebalanceRequest(_Message):
    """Plan now. ``force`` pushes even when the predicted gain is below the threshold."""

    dry_run: bool = False
    layers: list[int] | None = None
    policy: str | None = None
    force: bool = False


class RebalanceReply(_Message):
    """Outcome of a rebalance; ``phy2log``: [len(layers), num_physical_experts] int64 or None."""

    plan_id: int
    epoch: int
    pushed: bool
    skipped: bool
    reason: str = ""
    predicted_before: float = 0.0
    predicted_after: float = 0.0
    moved_slots: int = 0
    moved_bytes: int = 0
    phy2log: torch.Tensor | None = None
    layers: list[int] = msgspec.field(default_factory=list)
    policy: str = ""

    def __post_init__(self) -> None:
        if self.phy2log is not None:
            _check_tensor("RebalanceReply.phy2log", self.phy2log, 2, (torch.int64,))


class PauseRequest(_Message):
    reason: str = ""


class ResumeRequest(_Message):
    pass


class OkReply(_Message):
    message: str = ""


class GetPlanRequest(_Message):
    """The plan that produced ``epoch`` (None: the latest), or plan ``plan_id`` if given."""

    epoch: int | None = None
    plan_id: int | None = None
    with_placement: bool = False


class GetPlacementRequest(_Message):
    epoch: int | None = None  # None: the current placement


class PlacementReply(_Message):
    """``phy2log``: [num_layers, num_physical_experts] int64 in force at ``epoch``."""

    epoch: int
    phy2log: torch.Tensor
    ep_size: int = 0

    def __post_init__(self) -> None:
        _check_tensor("PlacementReply.phy2log", self.phy2log, 2, (torch.int64,))


class DumpWindowRequest(_Message):
    path: str  # on the daemon's filesystem


class DumpWindowReply(_Message):
    path: str
    steps: int


class LoadPlacementRequest(_Message):
    """Push the placement in a file (on the daemon's filesystem); answered by ``RebalanceReply``."""

    path: str
    dry_run: bool = False


class GetConfigRequest(_Message):
    pass


class SetConfigRequest(_Message):
    key: str
    value: Any


class ConfigReply(_Message):
    config: dict[str, Any]


class ErrorReply(_Message):
    """A request failed; ``code``/``name`` come from ``eplbd.errors``."""

    code: int
    name: str
    message: str

    @classmethod
    def from_exc(cls, exc: BaseException, req_id: int = 0) -> ErrorReply:
        """Wrap ``exc``; anything not an ``EplbdError`` is reported as ``InternalError``."""
        if isinstance(exc, EplbdError):
            return cls(code=exc.code, name=exc.name, message=exc.message, req_id=req_id)
        return cls(
            code=InternalError.code,
            name=InternalError.name,
            message=f"{type(exc).__name__}: {exc}",
            req_id=req_id,
        )

    def to_exc(self) -> EplbdError:
        """The typed error for ``code`` (unknown codes give a plain ``EplbdError``)."""
        return error_from_code(self.code, self.message)


Message = Union[
    Hello, Welcome,
    RegisterWorker, Registered, LoadReport, Heartbeat,
    Plan, LayerReady, Commit, Ack, Abort,
    StatusRequest, StatusReply, BalancednessRequest, BalancednessReply,
    RebalanceRequest, RebalanceReply, PauseRequest, ResumeRequest, OkReply,
    GetPlanRequest, PlanInfo, GetPlacementRequest, PlacementReply,
    DumpWindowRequest, DumpWindowReply, LoadPlacementRequest,
    GetConfigRequest, SetConfigRequest, ConfigReply, ErrorReply,
]  # fmt: skip
MESSAGE_TYPES: tuple[type, ...] = Message.__args__

# Request -> the reply type a successful answer has (ErrorReply is always possible).
REPLY_TYPE_FOR: dict[type, type] = {
    Hello: Welcome,
    RegisterWorker: Registered,
    Heartbeat: OkReply,
    LayerReady: OkReply,
    Ack: OkReply,
    Abort: OkReply,
    StatusRequest: StatusReply,
    BalancednessRequest: BalancednessReply,
    RebalanceRequest: RebalanceReply,
    PauseRequest: OkReply,
    ResumeRequest: OkReply,
    GetPlanRequest: PlanInfo,
    GetPlacementRequest: PlacementReply,
    DumpWindowRequest: DumpWindowReply,
    LoadPlacementRequest: RebalanceReply,
    GetConfigRequest: ConfigReply,
    SetConfigRequest: ConfigReply,
}
REQUEST_TYPES: tuple[type, ...] = tuple(REPLY_TYPE_FOR)
WORKER_REQUEST_TYPES: tuple[type, ...] = (Hello, RegisterWorker, Heartbeat, LayerReady, Ack, Abort)
OPERATOR_REQUEST_TYPES: tuple[type, ...] = tuple(t for t in REQUEST_TYPES if t not in WORKER_REQUEST_TYPES or t is Hello)
REPLY_TYPES: tuple[type, ...] = tuple(dict.fromkeys([*REPLY_TYPE_FOR.values(), ErrorReply]))
PUSH_TYPES: tuple[type, ...] = (Plan, Commit, Abort)  # daemon -> worker, unsolicited


def expect(msg: Message, allowed: tuple[type, ...], where: str) -> Message:
    """Return ``msg`` if it is one of ``allowed``, else raise ``UnexpectedMessageError``.

    Args:
        msg: a decoded message.
        allowed: the types accepted here, e.g. ``REQUEST_TYPES``.
        where: where it arrived, for the error text (e.g. "the ROUTER socket").
    """
    if not isinstance(msg, allowed):
        names = ", ".join(t.__name__ for t in allowed)
        raise UnexpectedMessageError(f"{type(msg).__name__} is not accepted on {where}; expected one of: {names}")
    return msg


__all__ = [
    "MESSAGE_TYPES", "OPERATOR_REQUEST_TYPES", "PLAN_STATES", "PROTOCOL_VERSION", "PUSH_TYPES",
    "REPLY_TYPES", "REPLY_TYPE_FOR", "REQUEST_TYPES", "ROLES", "WORKER_REQUEST_TYPES",
    "Abort", "Ack", "BalanceStats", "BalancednessReply", "BalancednessRequest", "Commit",
    "ConfigReply", "DumpWindowReply", "DumpWindowRequest", "ErrorReply", "GetConfigRequest",
    "GetPlacementRequest", "GetPlanRequest", "Heartbeat", "Hello", "LayerReady",
    "LoadPlacementRequest", "LoadReport", "Message", "OkReply", "PauseRequest", "PlacementReply",
    "Plan", "PlanInfo", "RebalanceReply", "RebalanceRequest", "Registered", "RegisterWorker",
    "ResumeRequest", "SetConfigRequest", "StatusReply", "StatusRequest", "Welcome", "WorkerInfo",
    "check_version", "expect",
]  # fmt: skip
