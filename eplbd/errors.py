"""One error root with typed subclasses and stable numeric codes.

The numeric ``code`` is what travels on the wire (``proto.ErrorReply.code``);
never renumber an existing entry, only add new ones. Messages quote the bad
value so that an operator can act on them without reading the source.
"""

from __future__ import annotations


class EplbdError(Exception):
    """Root of every error eplbd raises on purpose."""

    code: int = 1
    name: str = "error"

    def __init__(self, message: str = "") -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message or self.name


# --- wire / protocol (1xx) ---------------------------------------------------
class ProtocolError(EplbdError):
    """A frame or message that does not follow the wire protocol."""

    code, name = 100, "protocol_error"


class DecodeError(ProtocolError):
    """A frame that cannot be decoded (truncated, not msgpack, wrong types)."""

    code, name = 101, "decode_error"


class UnknownMessageError(ProtocolError):
    """A message whose tag names no known message type."""

    code, name = 102, "unknown_message"


class FrameCountError(ProtocolError):
    """The number of tensor frames does not match what the header declares."""

    code, name = 103, "frame_count"


class TensorFrameError(ProtocolError):
    """A tensor frame whose length does not match its declared dtype and shape."""

    code, name = 104, "tensor_frame"


class VersionMismatchError(ProtocolError):
    """The peer speaks an incompatible protocol version."""

    code, name = 105, "version_mismatch"


class MessageTooLargeError(ProtocolError):
    """A frame or declared tensor larger than the configured limit."""

    code, name = 106, "message_too_large"


class UnexpectedMessageError(ProtocolError):
    """A well-formed message sent where it is not allowed (e.g. a reply as a request)."""

    code, name = 107, "unexpected_message"


# --- arguments, config, policy, placement (2xx) ------------------------------
class InvalidArgumentError(EplbdError, ValueError):
    """An argument with a bad value; the message names it."""

    code, name = 200, "invalid_argument"


class ConfigError(InvalidArgumentError):
    """An invalid configuration field or value."""

    code, name = 201, "config_error"


class PolicyError(InvalidArgumentError):
    """Arguments a rebalancing policy cannot work with."""

    code, name = 202, "policy_error"


class PlacementError(InvalidArgumentError):
    """An invalid placement (phy2log) or placement file."""

    code, name = 203, "placement_error"


class TraceError(InvalidArgumentError):
    """A malformed load trace file."""

    code, name = 204, "trace_error"


class LimitExceededError(InvalidArgumentError):
    """A shape, size or memory need beyond a bound the daemon is configured with (``max_ep_size``,
    ``max_layers``, ``max_experts``, ``window_memory_bytes``); the message names the bound."""

    code, name = 205, "limit_exceeded"


# --- workers and plans (3xx) -------------------------------------------------
class NotRegisteredError(EplbdError):
    """A message from a rank the daemon does not know."""

    code, name = 300, "not_registered"


class RegistrationMismatchError(EplbdError):
    """A rank whose model shape or EP group disagrees with the registered ones."""

    code, name = 301, "registration_mismatch"


class StaleEpochError(EplbdError):
    """A message about an epoch that is not the current or pending one."""

    code, name = 302, "stale_epoch"


class PlanConflictError(EplbdError):
    """A plan was requested while another one is in flight."""

    code, name = 303, "plan_conflict"


class PlanAbortedError(EplbdError):
    """A plan was aborted (transfer failure, timeout, operator)."""

    code, name = 304, "plan_aborted"


class NotFoundError(EplbdError):
    """The requested plan, epoch or key does not exist."""

    code, name = 305, "not_found"


class NotReadyError(EplbdError):
    """The daemon cannot do this yet (no workers registered, empty window)."""

    code, name = 306, "not_ready"


# --- access, availability (4xx, 5xx) -----------------------------------------
class PermissionDeniedError(EplbdError):
    """The caller's key is not allowed to do this."""

    code, name = 403, "permission_denied"


class InternalError(EplbdError):
    """A bug in eplbd; the message says where."""

    code, name = 500, "internal"


class UnavailableError(EplbdError):
    """The daemon could not be reached within the timeout."""

    code, name = 503, "unavailable"


def _all_subclasses(cls: type) -> list[type]:
    out = []
    for sub in cls.__subclasses__():
        out.append(sub)
        out.extend(_all_subclasses(sub))
    return out


ERRORS_BY_CODE: dict[int, type[EplbdError]] = {EplbdError.code: EplbdError}
for _cls in _all_subclasses(EplbdError):
    if _cls.code in ERRORS_BY_CODE:  # pragma: no cover - guards the table itself
        raise RuntimeError(f"duplicate error code {_cls.code}: {_cls.__name__}")
    ERRORS_BY_CODE[_cls.code] = _cls


def error_from_code(code: int, message: str) -> EplbdError:
    """Rebuild the typed error for a wire code (unknown codes give ``EplbdError``)."""
    cls = ERRORS_BY_CODE.get(code, EplbdError)
    err = cls(message)
    if cls is EplbdError and code != EplbdError.code:
        err.code = code
    return err
