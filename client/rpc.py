"""Operator clients for the daemon's RPC socket: ``EplbClient`` (sync) and ``AsyncEplbClient``.

Each operation is written once in ``_Operations``; the two clients differ only
in ``_call`` (a blocking round trip, or a coroutine), so ``client.status()``
returns a ``StatusReply`` and ``await aclient.status()`` does the same.
A request that gets no reply within ``timeout`` raises ``UnavailableError``;
an ``ErrorReply`` is raised as its typed ``EplbdError``.
"""

from __future__ import annotations

import itertools
import os
import time
import uuid
from collections.abc import Callable
from typing import Any

import zmq
import zmq.asyncio

from eplbd.errors import UnavailableError, UnexpectedMessageError
from eplbd.proto import (PROTOCOL_VERSION, REPLY_TYPE_FOR, BalancednessRequest, Decoder,
                         DumpWindowRequest, Encoder, ErrorReply, GetConfigRequest, GetPlacementRequest,
                         GetPlanRequest, Hello, LoadPlacementRequest, PauseRequest, RebalanceRequest,
                         ResumeRequest, SetConfigRequest, StatusRequest, make_socket)
from eplbd.proto import GetResizeRequest, ResizeRequest
from eplbd.proto.sockets import CurveKeys

DEFAULT_ENDPOINT = os.environ.get("EPLBD_RPC", "tcp://127.0.0.1:7450")


def sync_round_trip(sock: zmq.Socket, frames: list, timeout: float, accept: Callable[[list], Any | None],
                    unavailable: Callable[[], Exception]) -> Any:
    """Send ``frames`` on a DEALER and return the first received message ``accept`` keeps.

    ``accept(frames)`` returns the reply, or None for a message that is not it
    (a late reply, a pushed message it stashed). ``timeout`` bounds the whole
    exchange, not each wait, so stray messages cannot stretch it.
    """
    deadline = time.monotonic() + timeout

    def remaining_ms() -> int:
        return max(0, int((deadline - time.monotonic()) * 1000))

    # With IMMEDIATE a DEALER that has no connected peer blocks in send.
    if not sock.poll(remaining_ms(), zmq.POLLOUT):
        raise unavailable()
    sock.send_multipart(frames, copy=False, flags=zmq.NOBLOCK)
    while True:
        if not sock.poll(remaining_ms()):
            raise unavailable()
        reply = accept(sock.recv_multipart(copy=False))
        if reply is not None:
            return reply


class _Operations:
    """The daemon's operator API; see the module docstring."""

    def _call(self, msg: Any) -> Any:  # pragma: no cover - supplied by subclasses
        raise NotImplementedError

    def hello(self):
        return self._call(Hello(role="operator", protocol_version=PROTOCOL_VERSION, client_id=self.client_id))

    def status(self):
        return self._call(StatusRequest())

    def balancedness(self, *, per_layer: bool = False, per_rank: bool = False):
        return self._call(BalancednessRequest(per_layer=per_layer, per_rank=per_rank))

    def rebalance(self, *, dry_run: bool = False, layers: list[int] | None = None, policy: str | None = None,
                  force: bool = False):
        return self._call(RebalanceRequest(dry_run=dry_run, layers=layers, policy=policy, force=force))

    def pause(self, reason: str = ""):
        return self._call(PauseRequest(reason=reason))

    def resume(self):
        return self._call(ResumeRequest())

    def get_plan(self, *, epoch: int | None = None, plan_id: int | None = None):
        return self._call(GetPlanRequest(epoch=epoch, plan_id=plan_id))

    def get_placement(self, epoch: int | None = None):
        return self._call(GetPlacementRequest(epoch=epoch))

    def dump_window(self, path: str):
        return self._call(DumpWindowRequest(path=path))

    def load_placement(self, path: str, *, dry_run: bool = False, moe_layers: list[int] | None = None,
                       num_hidden_layers: int = 0):
        return self._call(LoadPlacementRequest(path=path, dry_run=dry_run, moe_layers=list(moe_layers or []),
                                               num_hidden_layers=num_hidden_layers))

    def get_config(self):
        return self._call(GetConfigRequest())

    def set_config(self, key: str, value: Any):
        return self._call(SetConfigRequest(key=key, value=value))

    def resize(self, mapping: list[int], *, ep_size: int = 0, dry_run: bool = False):
        """Elastic EP: ``mapping[old_rank]`` = new rank or -1 (removed); ``ep_size`` 0: the survivors."""
        return self._call(ResizeRequest(mapping=list(mapping), ep_size=ep_size, dry_run=dry_run))

    def get_resize(self, epoch: int | None = None):
        return self._call(GetResizeRequest(epoch=epoch))


class _Base(_Operations):
    def __init__(self, endpoint: str, timeout: float, ctx: zmq.Context, curve: CurveKeys | None) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        self.client_id = f"op-{uuid.uuid4().hex[:8]}"
        self._enc, self._dec = Encoder(), Decoder()
        self._ids = itertools.count(1)
        # linger 0: an operator tool that gave up must not hang on exit.
        self._sock = make_socket(ctx, zmq.DEALER, connect=endpoint, linger_ms=0, hwm=100, curve=curve)

    def _prepare(self, msg: Any) -> tuple[int, list]:
        msg.req_id = next(self._ids)
        return msg.req_id, self._enc.encode(msg)

    def _finish(self, req: Any, req_id: int, frames: list) -> Any | None:
        reply = self._dec.decode(frames)
        if getattr(reply, "req_id", None) != req_id:
            return None  # a late reply to an earlier, timed-out request
        if isinstance(reply, ErrorReply):
            raise reply.to_exc()
        want = REPLY_TYPE_FOR.get(type(req))
        if want is not None and not isinstance(reply, want):
            raise UnexpectedMessageError(f"expected {want.__name__} for {type(req).__name__}, "
                                         f"got {type(reply).__name__}")
        return reply

    def _unavailable(self) -> UnavailableError:
        return UnavailableError(f"no reply from eplbd at {self.endpoint} within {self.timeout:g}s")


class EplbClient(_Base):
    """Blocking client. Args: endpoint (the daemon's ``rpc``), timeout in seconds per request,
    curve: an operator key pair and the daemon's public key, for a daemon with CURVE on."""

    def __init__(self, endpoint: str = DEFAULT_ENDPOINT, *, timeout: float = 5.0,
                 ctx: zmq.Context | None = None, curve: CurveKeys | None = None) -> None:
        super().__init__(endpoint, timeout, ctx or zmq.Context.instance(), curve)

    def _call(self, msg: Any) -> Any:
        req_id, frames = self._prepare(msg)
        return sync_round_trip(self._sock, frames, self.timeout, lambda fr: self._finish(msg, req_id, fr),
                               self._unavailable)

    def close(self) -> None:
        self._sock.close(linger=0)

    def __enter__(self) -> "EplbClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncEplbClient(_Base):
    """Asyncio client; one request at a time per client (create several for concurrency)."""

    def __init__(self, endpoint: str = DEFAULT_ENDPOINT, *, timeout: float = 5.0,
                 ctx: zmq.asyncio.Context | None = None, curve: CurveKeys | None = None) -> None:
        super().__init__(endpoint, timeout, ctx or zmq.asyncio.Context.instance(), curve)

    async def _call(self, msg: Any) -> Any:
        req_id, frames = self._prepare(msg)
        deadline_ms = int(self.timeout * 1000)
        if not await self._sock.poll(deadline_ms, zmq.POLLOUT):
            raise self._unavailable()
        await self._sock.send_multipart(frames, copy=False)
        while True:
            if not await self._sock.poll(deadline_ms):
                raise self._unavailable()
            reply = self._finish(msg, req_id, await self._sock.recv_multipart(copy=False))
            if reply is not None:
                return reply

    def close(self) -> None:
        self._sock.close(linger=0)

    async def __aenter__(self) -> "AsyncEplbClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()
