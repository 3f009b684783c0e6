"""The one place where eplbd makes ZMQ sockets and sets their options.

Every socket in the daemon, the worker client and ``eplbctl`` comes from
``make_socket`` so that high-water marks, linger and size limits are decided
once. Works with ``zmq.Context`` and ``zmq.asyncio.Context`` alike (the socket
type follows the context).

CURVE (encryption and authentication, ZeroMQ's elliptic-curve handshake) is one
more option: ``curve=CurveKeys(...)`` on a client socket, ``curve=CurveServerKeys(...)``
on a daemon socket. Keys are the 40-character Z85 text that ``eplbd keygen``
(``zmq.auth.create_certificates``) writes; ``CurveKeys.from_files`` reads them.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TypeVar

import zmq
import zmq.auth
from zmq.utils import z85

from eplbd.errors import ConfigError, InvalidArgumentError

# Environment variables naming a client's key files (eplbctl, or any client built with CurveKeys.from_env).
CLIENT_KEY_ENV = "EPLBD_CURVE_CLIENT_KEY"
SERVER_KEY_ENV = "EPLBD_CURVE_SERVER_KEY"
_MAX_KEY_FILE_BYTES = 64 * 1024  # a key file is ~400 bytes; refuse to read a device or a huge file

DEFAULT_HWM = 1000
DEFAULT_LINGER_MS = 1000

S = TypeVar("S", bound=zmq.Socket)


def _check_key(key: bytes, what: str) -> bytes:
    try:
        ok = len(key) == 40 and len(z85.decode(key)) == 32
    except (ValueError, KeyError, IndexError):
        ok = False
    if not ok:
        raise ConfigError(f"{what} is not a 40-character Z85 CURVE key")
    return key


def load_key_file(path: str | os.PathLike, *, secret: bool) -> tuple[bytes, bytes | None]:
    """Read a CURVE key file written by ``eplbd keygen`` (``zmq.auth`` certificate format).

    Args:
        path: ``NAME.key`` (public key only) or ``NAME.key_secret`` (both keys).
        secret: the secret key is required (the file must be a ``.key_secret``).
    Returns:
        ``(public_key, secret_key)`` as Z85 bytes; ``secret_key`` is None for a public file.
    Raises:
        ConfigError: naming the file: missing, not a regular file, too large, unreadable,
            without a valid public key, or without the secret key when ``secret``.
    """
    name = os.fspath(path)
    try:
        st = os.stat(name)
    except OSError as exc:
        raise ConfigError(f"CURVE key file {name!r}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"CURVE key file {name!r} is not a regular file")
    if st.st_size > _MAX_KEY_FILE_BYTES:
        raise ConfigError(f"CURVE key file {name!r} has {st.st_size} bytes; a key file has under 1 KiB")
    try:
        public, secret_key = zmq.auth.load_certificate(name)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"CURVE key file {name!r} cannot be read: {exc}") from None
    _check_key(public, f"the public key in {name!r}")
    if secret_key is not None:
        _check_key(secret_key, f"the secret key in {name!r}")
    elif secret:
        raise ConfigError(f"CURVE key file {name!r} holds no secret key; give the NAME.key_secret file "
                          "that `eplbd keygen` wrote, not the public NAME.key")
    return public, secret_key


@dataclass(frozen=True)
class CurveKeys:
    """A client socket's CURVE keys: its own pair and the daemon's public key (Z85 bytes)."""

    public_key: bytes
    secret_key: bytes
    server_key: bytes

    @classmethod
    def from_files(cls, client_key_file: str | os.PathLike, server_key_file: str | os.PathLike) -> "CurveKeys":
        """Args:
            client_key_file: this client's ``NAME.key_secret`` (from ``eplbd keygen``).
            server_key_file: the daemon's public ``NAME.key`` (its ``.key_secret`` works too,
                but should not leave the daemon's host).
        Raises:
            ConfigError: a file is missing or not a valid key file.
        """
        public, secret = load_key_file(client_key_file, secret=True)
        server, _ = load_key_file(server_key_file, secret=False)
        assert secret is not None
        return cls(public, secret, server)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "CurveKeys | None":
        """Keys from ``$EPLBD_CURVE_CLIENT_KEY`` and ``$EPLBD_CURVE_SERVER_KEY``; None if neither is set.

        Raises:
            ConfigError: only one of the two is set, or a file is invalid.
        """
        env = os.environ if env is None else env
        client, server = env.get(CLIENT_KEY_ENV) or None, env.get(SERVER_KEY_ENV) or None
        if client is None and server is None:
            return None
        if client is None or server is None:
            missing = CLIENT_KEY_ENV if client is None else SERVER_KEY_ENV
            raise ConfigError(f"CURVE needs both {CLIENT_KEY_ENV} and {SERVER_KEY_ENV}; {missing} is not set")
        return cls.from_files(client, server)


@dataclass(frozen=True)
class CurveServerKeys:
    """A daemon socket's CURVE keys (Z85 bytes) and the ZAP domain its handshakes are judged in."""

    public_key: bytes
    secret_key: bytes
    zap_domain: str = ""


def _set_curve(sock: zmq.Socket, curve: CurveKeys | CurveServerKeys) -> None:
    sock.setsockopt(zmq.CURVE_PUBLICKEY, curve.public_key)
    sock.setsockopt(zmq.CURVE_SECRETKEY, curve.secret_key)
    if isinstance(curve, CurveServerKeys):
        sock.setsockopt(zmq.CURVE_SERVER, 1)
        sock.setsockopt(zmq.ZAP_DOMAIN, curve.zap_domain.encode())
    else:
        sock.setsockopt(zmq.CURVE_SERVERKEY, curve.server_key)


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
    curve: CurveKeys | CurveServerKeys | None = None,
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
        curve: CURVE keys: ``CurveKeys`` for a client (encrypts, and proves its key
            to the server), ``CurveServerKeys`` for a server (accepts only CURVE
            peers, each judged by the ZAP handler of the context, if one runs).
            None: no encryption, no authentication.
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
        if curve is not None:
            _set_curve(sock, curve)
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


__all__ = ["CLIENT_KEY_ENV", "DEFAULT_HWM", "DEFAULT_LINGER_MS", "SERVER_KEY_ENV", "CurveKeys", "CurveServerKeys",
           "bound_endpoint", "load_key_file", "make_socket"]
