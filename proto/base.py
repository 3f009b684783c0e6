"""Common ground of all wire messages: the protocol version and the message base class.

Each message is a ``msgspec.Struct`` tagged by its class name in the field
``"type"``. Schema evolution rules (msgspec's): a new field always gets a
default, a tag (class name) is never renamed, unknown fields are ignored, and
an incompatible change bumps ``PROTOCOL_VERSION``. Every message carries
``req_id``: a request's id is copied into its reply so that a client can match
them; unsolicited messages (pushes, load reports) leave it 0.
"""

from __future__ import annotations

from typing import Any

import msgspec
import torch

from eplbd.errors import InvalidArgumentError, VersionMismatchError

PROTOCOL_VERSION = 1
ROLES = ("worker", "operator")
PLAN_STATES = ("pending", "committing", "committed", "aborted")
INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def check_version(peer_version: int) -> None:
    """Raise ``VersionMismatchError`` unless ``peer_version`` is ``PROTOCOL_VERSION``."""
    if peer_version != PROTOCOL_VERSION:
        raise VersionMismatchError(
            f"peer speaks protocol version {peer_version}, this side speaks {PROTOCOL_VERSION}; "
            "upgrade eplbd on the older side"
        )


def check_tensor(where: str, t: torch.Tensor, ndim: int, dtypes: tuple[torch.dtype, ...]) -> None:
    """Raise ``InvalidArgumentError`` unless ``t`` is an ``ndim``-d tensor of one of ``dtypes``."""
    # A ValueError subclass: called from __post_init__ while decoding, msgspec
    # reports it as a validation error of the message (the codec's DecodeError).
    if not isinstance(t, torch.Tensor) or t.dim() != ndim or t.dtype not in dtypes:
        raise InvalidArgumentError(
            f"{where} must be a {ndim}-d tensor of {'/'.join(str(d)[6:] for d in dtypes)}, "
            f"got {_describe(t)}"
        )


def _describe(t: Any) -> str:
    if isinstance(t, torch.Tensor):
        return f"shape {list(t.shape)} dtype {str(t.dtype)[6:]}"
    return f"a {type(t).__name__}"


class MessageBase(msgspec.Struct, tag=True, tag_field="type", kw_only=True):
    """Base of every tagged wire message (tag = class name, keyword-only fields)."""

    req_id: int = 0
