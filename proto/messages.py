"""Every message of the eplbd wire protocol, as one tagged msgspec union.

Tensor fields hold CPU ``torch.Tensor``s and travel as extra frames (see
``codec``); after decoding they are read-only views of the receive buffer.
Field rules and versioning: see ``base``.

Sockets and directions (the daemon binds both):

* PULL (fire-and-forget, worker -> daemon): ``LoadReport``.
* ROUTER (worker DEALER): ``Hello`` -> ``Welcome``; ``RegisterWorker`` ->
  ``Registered``; ``Heartbeat``, ``LayerReady``, ``Ack``, ``Abort``, ``Release`` -> ``OkReply``.
  Daemon pushes, unsolicited: ``Plan``, ``Commit``, ``Abort``.
* ROUTER (operator DEALER): ``Hello`` -> ``Welcome``, then the ``*Request``
  types in ``OPERATOR_REQUEST_TYPES``, each answered as in ``REPLY_TYPE_FOR``.
* Any request may instead get an ``ErrorReply`` (a typed error with a stable code).
"""

from __future__ import annotations

from typing import Union

from eplbd.errors import EplbdError, InternalError, InvalidArgumentError, UnexpectedMessageError, error_from_code

from .base import PLAN_STATES, PROTOCOL_VERSION, ROLES, MessageBase, check_version
from .operator_messages import (
    AbortInfo,
    BalancednessReply,
    BalancednessRequest,
    BalanceStats,
    ConfigReply,
    DumpWindowReply,
    DumpWindowRequest,
    GetConfigRequest,
    GetPlacementRequest,
    GetPlanRequest,
    LoadPlacementRequest,
    PauseRequest,
    PlacementReply,
    PlanInfo,
    RebalanceReply,
    RebalanceRequest,
    ResizeInfo,
    ResizeReply,
    ResizeRequest,
    GetResizeRequest,
    ResumeRequest,
    SetConfigRequest,
    StatusReply,
    StatusRequest,
    WorkerInfo,
)
from .worker_messages import (Abort, Ack, Commit, Heartbeat, LayerReady, LoadReport, Plan, Registered, RegisterWorker,
                              Release)


# --- handshake ---------------------------------------------------------------
class Hello(MessageBase):
    """First request of every DEALER connection; answered by ``Welcome`` or a version error."""

    role: str  # one of ROLES
    protocol_version: int
    client_id: str

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise InvalidArgumentError(f"Hello.role must be one of {ROLES}, got {self.role!r}")


class Welcome(MessageBase):
    protocol_version: int
    daemon_id: str
    epoch: int


# --- common replies ----------------------------------------------------------
class OkReply(MessageBase):
    message: str = ""


class ErrorReply(MessageBase):
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
    ResizeRequest, GetResizeRequest, ResizeReply, Release,
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
    Release: OkReply,
    StatusRequest: StatusReply,
    BalancednessRequest: BalancednessReply,
    RebalanceRequest: RebalanceReply,
    PauseRequest: OkReply,
    ResumeRequest: OkReply,
    GetPlanRequest: PlanInfo,
    GetPlacementRequest: PlacementReply,
    DumpWindowRequest: DumpWindowReply,
    LoadPlacementRequest: RebalanceReply,
    ResizeRequest: ResizeReply,
    GetResizeRequest: ResizeReply,
    GetConfigRequest: ConfigReply,
    SetConfigRequest: ConfigReply,
}
REQUEST_TYPES: tuple[type, ...] = tuple(REPLY_TYPE_FOR)
# GetResizeRequest (read-only) is both roles': the ranks of a resized group fetch their transition with it.
WORKER_REQUEST_TYPES: tuple[type, ...] = (Hello, RegisterWorker, Heartbeat, LayerReady, Ack, Abort, Release,
                                          GetResizeRequest)
OPERATOR_REQUEST_TYPES: tuple[type, ...] = tuple(t for t in REQUEST_TYPES
                                                 if t not in WORKER_REQUEST_TYPES or t in (Hello, GetResizeRequest))
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
    "Abort", "AbortInfo", "Ack", "BalanceStats", "BalancednessReply", "BalancednessRequest", "Commit",
    "ConfigReply", "DumpWindowReply", "DumpWindowRequest", "ErrorReply", "GetConfigRequest",
    "GetPlacementRequest", "GetPlanRequest", "Heartbeat", "Hello", "LayerReady",
    "LoadPlacementRequest", "LoadReport", "Message", "OkReply", "PauseRequest", "PlacementReply",
    "Plan", "PlanInfo", "RebalanceReply", "RebalanceRequest", "Registered", "RegisterWorker", "Release",
    "ResizeInfo", "ResizeReply", "ResizeRequest", "GetResizeRequest",
    "ResumeRequest", "SetConfigRequest", "StatusReply", "StatusRequest", "Welcome", "WorkerInfo",
    "MessageBase", "check_version", "expect",
]  # fmt: skip
