"""Tensor-frame codec: one message <-> a list of ZMQ frames, tensors zero-copy.

Frame layout of one message (a ZMQ multipart message; a ROUTER socket adds
the peer identity in front, which is the caller's business)::

    frame 0      msgpack envelope  [version, n_tensors, message]
                   version    int  PROTOCOL_VERSION of the sender
                   n_tensors  int  number of tensor frames that follow
                   message    map  the tagged Struct, {"type": "<ClassName>", ...};
                                   every tensor in it is replaced by a reference
                                   ["tensor", dtype, shape, frame]
                                     dtype  str        "bfloat16", "int64", ...
                                     shape  list[int]  [] for a 0-d tensor
                                     frame  int        index of its frame (1..n_tensors)
    frame 1      raw bytes of the first tensor met while encoding (C order)
    ...
    frame n      raw bytes of the n-th tensor

The frame count is deterministic: exactly ``1 + number of non-None tensors``
in the message, numbered in the order msgspec encodes fields (declaration
order, depth first); nothing is inlined, even an empty or 0-d tensor gets its
own (possibly empty) frame.

Zero-copy on both ends: ``encode`` returns a memoryview of each tensor's own
CPU storage (``.contiguous()`` only for non-contiguous ones), which pyzmq can
send with ``copy=False``; ``decode`` rebuilds each tensor with
``torch.frombuffer`` over the received frame. Decoded tensors are therefore
*views of the receive buffer*: treat them as read-only (copy before mutating)
and do not assume they are aligned to their item size (zmq packs small frames
back to back in its receive buffer; torch's CPU kernels do not need alignment).

Nothing is ever pickled. Before any tensor is made, the decoder checks the
frame count against ``MAX_TENSOR_FRAMES``, the envelope version, the frame count
against ``n_tensors``, every frame against
``max_frame_bytes``, and for each tensor reference the dtype (allow-list), the
declared size (against ``max_frame_bytes``, computed, never allocated) and the
frame length. Every failure is a ``ProtocolError`` subclass from
``eplbd.errors``; no other exception type escapes ``Decoder.decode``.

``Encoder`` and ``Decoder`` keep per-call state: use one per thread (or per
event loop), not one shared between threads.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Annotated, Any, Union, get_args

import msgspec
import msgspec.inspect
import torch
import zmq

from eplbd.errors import (
    DecodeError,
    FrameCountError,
    InvalidArgumentError,
    MessageTooLargeError,
    ProtocolError,
    TensorFrameError,
    UnknownMessageError,
)

from .messages import MESSAGE_TYPES, PROTOCOL_VERSION, Message, check_version

DEFAULT_MAX_FRAME_BYTES = 256 * 1024 * 1024

# Names on the wire are torch's own (``str(dtype)`` minus "torch."), so bf16
# travels although msgpack and numpy know nothing of it.
WIRE_DTYPES: dict[str, torch.dtype] = {
    "bool": torch.bool,
    "uint8": torch.uint8,
    "int8": torch.int8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}
_DTYPE_NAMES = {dtype: name for name, dtype in WIRE_DTYPES.items()}
_MAX_NDIM = 16
# No message has more than a few tensors; a peer sending thousands of frames is refused
# before a view of any of them is made.
MAX_TENSOR_FRAMES = 64

Frame = Union[bytes, bytearray, memoryview, zmq.Frame]


class _TensorRef(msgspec.Struct, array_like=True, tag="tensor"):
    """Stand-in for a tensor in the msgpack header: ``["tensor", dtype, shape, frame]``."""

    dtype: str
    shape: Annotated[list[Annotated[int, msgspec.Meta(ge=0)]], msgspec.Meta(max_length=_MAX_NDIM)]
    frame: int


class _Envelope(msgspec.Struct, array_like=True):
    version: int
    n_tensors: int
    # Raw defers decoding the message until the frame count is checked, so a
    # bad count fails before any tensor exists.
    message: msgspec.Raw


class _TagOnly(msgspec.Struct):
    type: str = ""


def _tensor_frame(t: torch.Tensor) -> memoryview:
    """Return a memoryview of ``t``'s bytes: its own storage unless non-contiguous.

    Args:
        t: CPU tensor of a dtype in ``WIRE_DTYPES``, any shape (0-d and empty included).
    Returns:
        A ``format="B"`` memoryview of ``t.numel() * t.element_size()`` bytes; it
        keeps the storage alive until the frame is sent.
    """
    if not t.is_contiguous():
        t = t.contiguous()
    # uint8 view first: numpy has no bfloat16, and reshape(-1) lifts 0-d tensors
    # to 1-d so that view(dtype) is allowed.
    return memoryview(t.detach().resolve_neg().reshape(-1).view(torch.uint8).numpy())


def _check_encodable(t: torch.Tensor) -> str:
    if t.layout != torch.strided:
        raise InvalidArgumentError(f"cannot send a {t.layout} tensor; only dense (strided) tensors travel")
    if t.device.type != "cpu":
        raise InvalidArgumentError(
            f"cannot send a tensor on {t.device}; copy it to CPU first (the codec never syncs a device)"
        )
    name = _DTYPE_NAMES.get(t.dtype)
    if name is None:
        raise InvalidArgumentError(
            f"cannot send a tensor of dtype {t.dtype}; allowed: {', '.join(WIRE_DTYPES)}"
        )
    return name


def _may_hold_tensor(node: Any, seen: set[int]) -> bool:
    """Whether a ``msgspec.inspect`` type has a ``torch.Tensor``-typed position (not via ``Any``)."""
    if isinstance(node, msgspec.inspect.CustomType):
        return issubclass(node.cls, torch.Tensor)
    if id(node) in seen:
        return False
    seen.add(id(node))
    children: list[Any] = []
    for value in msgspec.structs.astuple(node):
        children.extend(value if isinstance(value, tuple) else (value,))
    return any(
        _may_hold_tensor(c.type if isinstance(c, msgspec.inspect.Field) else c, seen)
        for c in children
        if isinstance(c, (msgspec.inspect.Type, msgspec.inspect.Field))
    )


class Encoder:
    """Encode messages into frames; reusable, not thread-safe.

    Args:
        message_types: the Struct types this encoder accepts (default: the
            protocol's ``MESSAGE_TYPES``).
    """

    def __init__(self, message_types: tuple[type, ...] = MESSAGE_TYPES) -> None:
        self._types = message_types
        self._enc = msgspec.msgpack.Encoder(enc_hook=self._enc_hook)
        self._frames: list[bytes | memoryview] = []
        # A tensor in an ``Any`` field would be encoded but decoded as a plain
        # list, leaving its frame orphaned: catch that on the sending side.
        self._tensor_free = frozenset(
            t for t in message_types if not _may_hold_tensor(msgspec.inspect.type_info(t), set())
        )

    def _enc_hook(self, obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            name = _check_encodable(obj)
            self._frames.append(_tensor_frame(obj))
            return _TensorRef(dtype=name, shape=list(obj.shape), frame=len(self._frames) - 1)
        # msgspec calls this hook only for types it cannot encode natively;
        # refusing here is what keeps pickle (and arbitrary objects) off the wire.
        raise InvalidArgumentError(
            f"cannot encode an object of type {type(obj).__module__}.{type(obj).__qualname__}: "
            "only msgpack-native values and CPU torch.Tensor travel (never pickle)"
        )

    def encode(self, msg: Message) -> list[bytes | memoryview]:
        """Encode one message.

        Args:
            msg: an instance of one of the accepted message types.
        Returns:
            ``[header, *tensor_frames]`` ready for ``send_multipart(frames, copy=False)``;
            tensor frames are memoryviews of the tensors' storage, so do not
            mutate the tensors until the frames are sent.
        Raises:
            InvalidArgumentError: ``msg`` is not a message, or holds a CUDA /
                sparse tensor, a tensor of a dtype outside ``WIRE_DTYPES``, a
                tensor outside a tensor-typed field, or a value msgpack cannot carry.
        """
        if not isinstance(msg, self._types):
            raise InvalidArgumentError(f"cannot encode {type(msg).__qualname__}: not a protocol message")
        self._frames = [b""]
        try:
            body = self._enc.encode(msg)
            header = self._enc.encode(_Envelope(PROTOCOL_VERSION, len(self._frames) - 1, msgspec.Raw(body)))
            frames = self._frames
        except InvalidArgumentError:
            raise
        except (TypeError, ValueError, OverflowError) as exc:
            raise InvalidArgumentError(f"cannot encode {type(msg).__name__}: {exc}") from exc
        finally:
            self._frames = []
        if len(frames) > 1 and type(msg) in self._tensor_free:
            raise InvalidArgumentError(
                f"{type(msg).__name__} has no tensor field; a tensor inside an untyped value cannot travel"
            )
        frames[0] = header
        return frames


def _as_memoryview(frame: Frame, index: int) -> memoryview:
    if isinstance(frame, zmq.Frame):
        mv = frame.buffer
    elif isinstance(frame, (bytes, bytearray, memoryview)):
        mv = memoryview(frame)
    else:
        raise DecodeError(f"frame {index} is a {type(frame).__name__}, expected bytes, memoryview or zmq.Frame")
    if mv.format != "B" or mv.ndim != 1:
        if not mv.c_contiguous:
            raise DecodeError(f"frame {index} is not a contiguous buffer")
        mv = mv.cast("B")
    return mv


class Decoder:
    """Decode frames into messages; reusable, not thread-safe.

    Args:
        max_frame_bytes: largest frame, and largest declared tensor, accepted
            (``MessageTooLargeError`` beyond it).
        message_type: the tagged union (or single tagged Struct) to decode
            (default: the protocol's ``Message``).
    """

    def __init__(self, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES, message_type: Any = Message) -> None:
        if max_frame_bytes <= 0:
            raise InvalidArgumentError(f"max_frame_bytes must be positive, got {max_frame_bytes}")
        self.max_frame_bytes = max_frame_bytes
        self._env = msgspec.msgpack.Decoder(_Envelope)
        self._msg = msgspec.msgpack.Decoder(message_type, dec_hook=self._dec_hook)
        self._tags = frozenset(t.__struct_config__.tag for t in (get_args(message_type) or (message_type,)))
        self._tag = msgspec.msgpack.Decoder(_TagOnly)
        self._frames: list[memoryview] = []
        self._used: set[int] = set()

    def decode(self, frames: Sequence[Frame]) -> Message:
        """Decode one multipart message (without any ROUTER identity frame).

        Args:
            frames: ``[header, *tensor_frames]`` as bytes, memoryviews or
                ``zmq.Frame`` objects received with ``copy=False``.
        Returns:
            The message; its tensors are read-only views of ``frames`` (shapes and
            dtypes as declared by the sender), which they keep alive.
        Raises:
            DecodeError, UnknownMessageError, FrameCountError, TensorFrameError,
            VersionMismatchError, MessageTooLargeError: see ``eplbd.errors``.
        """
        if len(frames) == 0:
            raise FrameCountError("got 0 frames, expected at least the header frame")
        if len(frames) > 1 + MAX_TENSOR_FRAMES:
            raise FrameCountError(f"got {len(frames)} frames, more than 1 + {MAX_TENSOR_FRAMES} tensor frames")
        views = [_as_memoryview(f, i) for i, f in enumerate(frames)]
        for i, mv in enumerate(views):
            if mv.nbytes > self.max_frame_bytes:
                raise MessageTooLargeError(
                    f"frame {i} has {mv.nbytes} bytes, over the limit of {self.max_frame_bytes}"
                )
        try:
            env = self._env.decode(views[0])
        except (msgspec.DecodeError, RecursionError, ValueError) as exc:
            raise DecodeError(f"bad header frame: {exc}") from None
        check_version(env.version)
        if env.n_tensors != len(views) - 1:
            raise FrameCountError(
                f"header declares {env.n_tensors} tensor frame(s), got {len(views) - 1}"
            )
        self._frames, self._used = views, set()
        try:
            if env.n_tensors == 0:
                msg = self._msg.decode(env.message)
            else:
                # torch.frombuffer warns (once per process) on read-only buffers
                # such as bytes; silence exactly that warning, nothing else.
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)
                    msg = self._msg.decode(env.message)
        except msgspec.ValidationError as exc:
            raise self._validation_error(env.message, exc) from None
        except (msgspec.DecodeError, RecursionError, ValueError) as exc:
            # ValueError: msgspec lets UnicodeDecodeError through for a bad str.
            raise DecodeError(f"bad message: {exc}") from None
        finally:
            used, self._frames, self._used = self._used, [], set()
        if len(used) != env.n_tensors:
            raise FrameCountError(
                f"header declares {env.n_tensors} tensor frame(s) but the message references {len(used)}"
            )
        return msg

    def _validation_error(self, raw: msgspec.Raw, exc: Exception) -> ProtocolError:
        try:
            tag = self._tag.decode(raw).type
        except (msgspec.DecodeError, RecursionError, ValueError):
            tag = ""
        if tag and tag not in self._tags:
            return UnknownMessageError(f"unknown message type {tag!r:.80}")
        return DecodeError(f"invalid {tag or 'message'}: {exc}")

    def _dec_hook(self, typ: type, obj: Any) -> Any:
        if typ is not torch.Tensor:
            raise DecodeError(f"no decoder for type {typ!r}")
        try:
            ref = msgspec.convert(obj, _TensorRef)
        except msgspec.ValidationError as exc:
            raise DecodeError(f"bad tensor reference {obj!r:.120}: {exc}") from None
        return self._build_tensor(ref)

    def _build_tensor(self, ref: _TensorRef) -> torch.Tensor:
        dtype = WIRE_DTYPES.get(ref.dtype)
        if dtype is None:
            raise TensorFrameError(
                f"tensor in frame {ref.frame} has dtype {ref.dtype!r:.40}, not one of {', '.join(WIRE_DTYPES)}"
            )
        if any(d > self.max_frame_bytes for d in ref.shape):
            # Bounds empty tensors too (a 0 anywhere makes numel 0), whose other
            # dimensions torch would otherwise be asked to build.
            raise MessageTooLargeError(
                f"tensor {ref.dtype}{ref.shape} in frame {ref.frame} has a dimension over {self.max_frame_bytes}"
            )
        itemsize = dtype.itemsize
        numel = math.prod(ref.shape)
        declared = numel * itemsize  # Python int: a huge shape cannot overflow, and is never allocated
        if declared > self.max_frame_bytes:
            raise MessageTooLargeError(
                f"tensor {ref.dtype}{ref.shape} in frame {ref.frame} declares {declared} bytes, "
                f"over the limit of {self.max_frame_bytes}"
            )
        n_tensors = len(self._frames) - 1
        if not 1 <= ref.frame <= n_tensors:
            raise FrameCountError(
                f"tensor {ref.dtype}{ref.shape} references frame {ref.frame}, "
                f"but the message has {n_tensors} tensor frame(s)"
            )
        if ref.frame in self._used:
            raise FrameCountError(f"frame {ref.frame} is referenced by more than one tensor")
        self._used.add(ref.frame)
        buf = self._frames[ref.frame]
        if buf.nbytes != declared:
            raise TensorFrameError(
                f"tensor {ref.dtype}{ref.shape} needs {declared} bytes but frame {ref.frame} has {buf.nbytes}"
            )
        if numel == 0:
            return torch.empty(ref.shape, dtype=dtype)  # frombuffer refuses empty buffers; this allocates nothing
        raw = torch.frombuffer(buf, dtype=torch.uint8)
        if dtype is torch.bool and bool((raw > 1).any()):
            # Only 0 and 1 are valid bool bytes; anything else is undefined behaviour in torch.
            raise TensorFrameError(f"bool tensor in frame {ref.frame} holds bytes other than 0 and 1")
        return raw.view(dtype).view(ref.shape)


__all__ = ["DEFAULT_MAX_FRAME_BYTES", "MAX_TENSOR_FRAMES", "WIRE_DTYPES", "Decoder", "Encoder", "Frame"]
