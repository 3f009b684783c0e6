"""Who may talk to the daemon: CURVE keys, the ZAP authenticator, roles per message.

With ``curve_secret_key_file`` set, both daemon sockets are CURVE servers: every
connection is encrypted, and its handshake is judged by a ZAP handler running on
the daemon's event loop (``ZapAuthenticator``, pyzmq's asyncio authenticator):

* ingest (PULL, ZAP domain ``eplbd.ingest``): worker keys only. Load reports
  stay zero-copy: nothing is checked per message, a refused key never connects.
* rpc (ROUTER, ZAP domain ``eplbd.rpc``): worker and operator keys. ZAP names the
  key's role in the connection's ``User-Id`` (``"worker:NAME"``, ``"operator:NAME"``,
  NAME being the key file's stem), which every received frame carries; the RPC
  loop checks each request against ``ROLE_REQUESTS`` before dispatching it and
  answers a request outside the role with ``PermissionDeniedError`` (403).

A key in neither directory gets no connection at all: no request is answered,
no report counted. Keys are read once, at start; restart to change them.

Which rank a worker key speaks for: a registration binds rank r to the connection
and the key (``User-Id``) that registered it, and every later message naming r,
load reports included, must come from that key (``eplbd.daemon.state``). With
``curve_worker_ranks`` (key name -> ranks), a key may register only its own
ranks, so a stolen node key cannot speak for another node's ranks.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import pathlib
import re
import stat
import time
from dataclasses import dataclass
from typing import Any

import zmq
import zmq.auth
from zmq.auth.asyncio import AsyncioAuthenticator
from zmq.utils import z85

from eplbd.errors import ConfigError, InvalidArgumentError, PermissionDeniedError
from eplbd.proto import OPERATOR_REQUEST_TYPES, WORKER_REQUEST_TYPES
from eplbd.proto.sockets import CurveServerKeys, load_key_file

log = logging.getLogger("eplbd.daemon.auth")

WORKER, OPERATOR = "worker", "operator"
RPC_DOMAIN, INGEST_DOMAIN = "eplbd.rpc", "eplbd.ingest"
# Requests each role may send on the RPC socket. Operators get the read-only requests
# (status, balancedness, plans, placement, config get) as well as the changing ones;
# workers get only what a rank needs, so a leaked worker key cannot move experts.
ROLE_REQUESTS: dict[str, tuple[type, ...]] = {WORKER: WORKER_REQUEST_TYPES, OPERATOR: OPERATOR_REQUEST_TYPES}
# Roles admitted at the handshake, per socket.
DOMAIN_ROLES: dict[str, tuple[str, ...]] = {RPC_DOMAIN: (WORKER, OPERATOR), INGEST_DOMAIN: (WORKER,)}
_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
_REFUSAL_LOG_INTERVAL_S = 60.0


@dataclass(frozen=True)
class Peer:
    """An authenticated key: its role and its name (the key file's stem)."""

    role: str
    name: str

    @property
    def user_id(self) -> str:
        return f"{self.role}:{self.name}"

    @classmethod
    def from_user_id(cls, user_id: str) -> "Peer":
        role, _, name = user_id.partition(":")
        return cls(role, name)


@dataclass(frozen=True)
class CurveSetup:
    """The daemon's key pair, the admitted public keys (Z85 bytes -> ``Peer``) and, with
    ``curve_worker_ranks``, the ranks each worker key (by name) may register (None: any)."""

    public_key: bytes
    secret_key: bytes
    peers: dict[bytes, Peer]
    rank_binding: dict[str, frozenset[int]] | None = None

    def server_keys(self, zap_domain: str) -> CurveServerKeys:
        return CurveServerKeys(self.public_key, self.secret_key, zap_domain)


def _load_key_dir(path: str, role: str, setting: str) -> dict[bytes, Peer]:
    d = pathlib.Path(path)
    if not d.is_dir():
        raise ConfigError(f"{setting}={path!r}: {'not a directory' if d.exists() else 'no such directory'}")
    peers: dict[bytes, Peer] = {}
    for f in sorted(d.glob("*.key")):
        try:
            public, _ = load_key_file(f, secret=False)
        except ConfigError as exc:
            raise ConfigError(f"{setting}={path!r}: {exc}") from None
        peers.setdefault(public, Peer(role, f.stem))
    if not peers:
        log.warning("%s=%r holds no *.key files: no %s can connect", setting, path, role)
    return peers


def load_curve(settings: Any) -> CurveSetup | None:
    """Read the daemon's CURVE keys named by ``settings``; None when CURVE is off.

    Raises:
        ConfigError: naming the setting and path: a missing or invalid key file, a key
            directory that is missing or holds an invalid ``*.key`` file, or one key in
            both directories (its role would be ambiguous).
    """
    if getattr(settings, "curve_secret_key_file", None) is None:
        return None
    path = settings.curve_secret_key_file
    try:
        public, secret = load_key_file(path, secret=True)
    except ConfigError as exc:
        raise ConfigError(f"curve_secret_key_file={path!r}: {exc}") from None
    assert secret is not None  # load_key_file(secret=True) guarantees it
    if os.stat(path).st_mode & stat.S_IRWXO:  # group access is a deliberate choice (k8s fsGroup, 0440)
        log.warning("curve_secret_key_file=%r is readable by every user; chmod 600 (or 640) it", path)
    workers = _load_key_dir(settings.curve_worker_keys_dir, WORKER, "curve_worker_keys_dir")
    operators = _load_key_dir(settings.curve_operator_keys_dir, OPERATOR, "curve_operator_keys_dir")
    both = workers.keys() & operators.keys()
    if both:
        key = next(iter(both))
        raise ConfigError(f"key {workers[key].name!r} is both a worker key (curve_worker_keys_dir="
                          f"{settings.curve_worker_keys_dir!r}) and an operator key ({operators[key].name!r} in "
                          f"curve_operator_keys_dir={settings.curve_operator_keys_dir!r}); give each role its own key")
    return CurveSetup(public, secret, {**workers, **operators}, _rank_binding(settings, workers))


def _rank_binding(settings: Any, workers: dict[bytes, Peer]) -> dict[str, frozenset[int]] | None:
    """``curve_worker_ranks`` as key name -> ranks; every name must be a worker key's.

    Raises:
        ConfigError: a name that no ``*.key`` in ``curve_worker_keys_dir`` has, or one rank bound to two keys.
    """
    mapping = getattr(settings, "curve_worker_ranks", None)
    if mapping is None:
        return None
    from eplbd.settings import parse_ranks

    names = {p.name for p in workers.values()}
    binding: dict[str, frozenset[int]] = {}
    owner: dict[int, str] = {}
    for name, spec in mapping.items():
        if name not in names:
            raise ConfigError(f"curve_worker_ranks names key {name!r}, but curve_worker_keys_dir="
                              f"{settings.curve_worker_keys_dir!r} has no {name}.key")
        binding[name] = parse_ranks(spec)
        for r in binding[name]:
            if owner.setdefault(r, name) != name:
                raise ConfigError(f"curve_worker_ranks binds rank {r} to both {owner[r]!r} and {name!r}; "
                                  "each rank is one key's")
    unbound = sorted(names - binding.keys())
    if unbound:
        log.warning("curve_worker_ranks does not name worker key(s) %s: they may register no rank", unbound)
    return binding


class _DomainPolicy:
    """ZAP credentials provider: admits the keys of ``roles`` in one domain, logs refusals (rate-limited)."""

    def __init__(self, auth: "ZapAuthenticator", roles: tuple[str, ...]) -> None:
        self._auth, self._roles = auth, roles

    def callback(self, domain: str, key: bytes) -> bool:
        peer = self._auth.peers.get(key)
        if peer is not None and peer.role in self._roles:
            return True
        why = "unknown key" if peer is None else f"{peer.role} key {peer.name!r} is not admitted here"
        self._auth.refused(domain, key, why)
        return False


class ZapAuthenticator(AsyncioAuthenticator):
    """The daemon's ZAP handler: admits the keys of ``setup`` per ``DOMAIN_ROLES`` and names
    each connection ``role:name`` in its ``User-Id``.

    Args:
        ctx: the daemon's context; must be started before any CURVE socket binds on it
            (a CURVE server without a ZAP handler admits every client).
        setup: from ``load_curve``.
    """

    def __init__(self, ctx: zmq.Context, setup: CurveSetup) -> None:
        super().__init__(ctx, log=logging.getLogger("eplbd.daemon.auth.zap"))
        self.peers = setup.peers
        self.refusals = 0
        self._last_logged: dict[bytes, float] = {}

    def start(self) -> None:
        super().start()
        for domain, roles in DOMAIN_ROLES.items():
            self.configure_curve_callback(domain, _DomainPolicy(self, roles))

    def curve_user_id(self, client_public_key: bytes) -> str:
        return self.peers[z85.encode(client_public_key)].user_id

    def refused(self, domain: str, key: bytes, why: str) -> None:
        self.refusals += 1
        now = time.monotonic()
        if now - self._last_logged.get(key, -_REFUSAL_LOG_INTERVAL_S) < _REFUSAL_LOG_INTERVAL_S:
            return  # a client retries every few hundred ms: one line per key per minute
        if len(self._last_logged) > 1024:
            self._last_logged.clear()
        self._last_logged[key] = now
        log.warning("refused a CURVE handshake on %s: %s (client key %s; %d refusals so far)",
                    domain, why, key.decode("ascii", "replace"), self.refusals)


def authorize(user_id: str, msg: Any) -> None:
    """Raise ``PermissionDeniedError`` unless the key named by ``user_id`` may send ``msg`` on the RPC socket.

    Args:
        user_id: the ``User-Id`` of the frame (``"worker:NAME"`` / ``"operator:NAME"``).
        msg: the decoded request.
    """
    peer = Peer.from_user_id(user_id)
    allowed = ROLE_REQUESTS.get(peer.role, ())
    if not isinstance(msg, allowed):
        names = ", ".join(t.__name__ for t in allowed) or "nothing"
        raise PermissionDeniedError(f"{peer.role} key {peer.name!r} may not send {type(msg).__name__}; "
                                    f"a {peer.role} key may send: {names}")


def is_loopback(endpoint: str) -> bool:
    """Whether ``endpoint`` is reachable only from this host (loopback TCP, ipc://, inproc://).

    A wildcard (``*``), an interface name or a host name counts as reachable from outside.
    """
    if not endpoint.startswith("tcp://"):
        return True
    host = endpoint[len("tcp://"):].rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def warn_if_exposed(endpoints: dict[str, str], curve: bool) -> list[str]:
    """Log a warning for each endpoint bound beyond loopback without CURVE.

    Args:
        endpoints: setting name -> endpoint as configured (``{"rpc": "tcp://0.0.0.0:7450"}``).
        curve: whether CURVE is on.
    Returns:
        The setting names warned about.
    """
    exposed = [] if curve else [name for name, ep in endpoints.items() if not is_loopback(ep)]
    for name in exposed:
        log.warning("%s=%s is not a loopback address and CURVE is off: anyone who can reach it can %s; "
                    "set curve_secret_key_file and the key directories (see `eplbd keygen`)", name,
                    endpoints[name], "report load" if name == "ingest" else "register ranks and change the placement")
    return exposed


def keygen(directory: str | os.PathLike, name: str) -> tuple[pathlib.Path, pathlib.Path]:
    """Write a new CURVE key pair: ``DIR/NAME.key`` (public) and ``DIR/NAME.key_secret`` (mode 600).

    Args:
        directory: created (mode 700) if missing.
        name: letters, digits, ``_``, ``.``, ``-``; becomes the key's name in logs (``worker:NAME``).
    Returns:
        ``(public_file, secret_file)``.
    Raises:
        InvalidArgumentError: a bad name, or either file exists already (never overwritten).
    """
    if not _NAME_RE.match(name):
        raise InvalidArgumentError(f"key name {name!r} must be 1-64 letters, digits, '_', '.' or '-'")
    d = pathlib.Path(directory)
    public, secret = d / f"{name}.key", d / f"{name}.key_secret"
    for f in (public, secret):
        if f.exists():
            raise InvalidArgumentError(f"{str(f)!r} exists already; remove it or pick another --name")
    try:
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        old = os.umask(0o077)  # the secret file is never readable by others, not even for a moment
        try:
            zmq.auth.create_certificates(d, name)
        finally:
            os.umask(old)
        public.chmod(0o644)
    except OSError as exc:
        raise InvalidArgumentError(f"cannot write keys to {str(d)!r}: {exc.strerror or exc}") from None
    return public, secret


__all__ = ["DOMAIN_ROLES", "INGEST_DOMAIN", "OPERATOR", "ROLE_REQUESTS", "RPC_DOMAIN", "WORKER", "CurveSetup",
           "Peer", "ZapAuthenticator", "authorize", "is_loopback", "keygen", "load_curve", "warn_if_exposed"]
