"""Wire protocol: msgspec messages and the tensor-frame codec (import name ``eplbd.proto``).

Imported inside engine worker processes: it needs only msgspec, pyzmq, numpy
and torch, never uvloop, pydantic or ``eplbd.policy``.
"""

from .codec import DEFAULT_MAX_FRAME_BYTES, WIRE_DTYPES, Decoder, Encoder, Frame
from .messages import *  # noqa: F403 - messages.__all__ is the public list
from .messages import __all__ as _message_names
from .sockets import DEFAULT_HWM, DEFAULT_LINGER_MS, CurveKeys, CurveServerKeys, bound_endpoint, make_socket

__all__ = [
    "DEFAULT_HWM",
    "DEFAULT_LINGER_MS",
    "DEFAULT_MAX_FRAME_BYTES",
    "CurveKeys",
    "CurveServerKeys",
    "WIRE_DTYPES",
    "Decoder",
    "Encoder",
    "Frame",
    "bound_endpoint",
    "make_socket",
    *_message_names,
]
