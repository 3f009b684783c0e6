"""The one place where eplbd makes ZMQ sockets and sets their options.

Every socket in the daemon, the worker client and ``eplbctl`` comes from
``make_socket`` so that high-water marks, linger and size limits are decided
once. Works with ``zmq.Context`` and ``zmq.asyncio.Context`` alike (the socket
type follows the context).
"""

from __future__ import annotations

from typing import TypeVar

import zmq

from eplbd.errors import InvalidArgumentError

DEFAULT_HWM = 1000
DEFAULT_LINGER_MS = 1000

S = TypeVar("S", bound=zmq.Socket)


def make_socket(
    ctx: zmq.Context[S],
    socket_type: int,
    *,
    bind: str | None = None,
    connect: str | None = None,
    identity: bytes | None = None,
    hwm: int = DEFAULT_HWM,
    linger_ms: int = DEFAULT_LINGER_MS,
    max_msg_size: int | None = None,
    router_mandatory: bool = True,
    immediate: bool = True,
) -> S:
    """Create a socket, set its options, then bind or connect it.

    Args:
        ctx: the process's context (sync or asyncio).
        socket_type: ``zmq.PUSH``, ``zmq.PULL``, ``zmq.DEALER``, ``zmq.ROUTER``, ...
        bind: endpoint to bind (``tcp://127.0.0.1:0`` picks a free port; read it
            back with ``bound_endpoint``). Exactly one of ``bind``/``connect``.
        connect: endpoint to connect to.
        identity: routing id of a DEALER as its ROUTER peer will see it.
        hwm: send and receive high-water marks (messages), bounding memory.
        linger_ms: how long ``close`` keeps trying to deliver queued messages,
            so that a goodbye gets out without hanging shutdown.
        max_msg_size: ``MAXMSGSIZE`` in bytes (per frame); a peer sending more
            is disconnected by libzmq before any of it reaches Python.
        router_mandatory: for ROUTER sockets, make a send to an unknown or gone
            peer raise ``zmq.ZMQError(EHOSTUNREACH)`` instead of dropping silently.
        immediate: for connecting sockets, set ``IMMEDIATE`` so that nothing
            queues for a peer that is not there: a reporter's ``NOBLOCK`` send
            fails fast (``zmq.Again``, a counted drop) instead of filling memory.
            This includes the first moments after ``connect``, before the TCP
            handshake completes; a caller that must not lose its first message
            waits with ``sock.poll(timeout_ms, zmq.POLLOUT)``.
    Returns:
        The bound or connected socket (``zmq.asyncio.Socket`` for an asyncio context).
    """
    if (bind is None) == (connect is None):
        raise InvalidArgumentError(f"give exactly one of bind={bind!r} and connect={connect!r}")
    if hwm < 0:
        raise InvalidArgumentError(f"hwm must be >= 0, got {hwm}")
    sock = ctx.socket(socket_type)
    try:
        sock.setsockopt(zmq.LINGER, linger_ms)
        sock.setsockopt(zmq.SNDHWM, hwm)
        sock.setsockopt(zmq.RCVHWM, hwm)
        if max_msg_size is not None:
            sock.setsockopt(zmq.MAXMSGSIZE, max_msg_size)
        if identity is not None:
            sock.setsockopt(zmq.IDENTITY, identity)
        if socket_type == zmq.ROUTER and router_mandatory:
            sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        if bind is not None:
            sock.bind(bind)
        else:
            if immediate:
                sock.setsockopt(zmq.IMMEDIATE, 1)
            sock.connect(connect)
    except BaseException:
        sock.close(linger=0)
        raise
    return sock


def bound_endpoint(sock: zmq.Socket) -> str:
    """The endpoint ``sock`` was last bound (or connected) to, with the real port (``tcp://127.0.0.1:41234``)."""
    endpoint = sock.getsockopt(zmq.LAST_ENDPOINT)
    if isinstance(endpoint, bytes):
        endpoint = endpoint.decode()
    if not endpoint:
        raise InvalidArgumentError("socket is not bound to any endpoint")
    return endpoint


__all__ = ["DEFAULT_HWM", "DEFAULT_LINGER_MS", "bound_endpoint", "make_socket"]
