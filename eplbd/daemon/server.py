"""The daemon's I/O shell around ``DaemonState``: its lifecycle (bind, serve, one shutdown path), signals
and systemd readiness; the loops live in eplbd.daemon.loops, the request handlers in eplbd.daemon.dispatch.

Sockets (DESIGN.md section 4): a PULL bound at ``settings.ingest`` for load
reports, a ROUTER bound at ``settings.rpc`` for every request/reply and for the
plans, commits and aborts pushed to ranks. Three tasks: the ingest loop, the
RPC loop and the tick loop (scheduler, liveness, balancedness log). Heavy work
(policy runs, resize planning, window dumps) runs in the loop's executor: the
loops keep answering status, heartbeats and reports meanwhile. One
shutdown path: ``request_stop()`` (SIGTERM/SIGINT call it too) -> the loops
finish their current message -> sockets close -> ``run()`` returns.

A malformed frame is answered with a typed ``ErrorReply`` (ROUTER) or counted
as a dropped report (PULL); it never reaches the state and never ends a loop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pathlib
import signal
import socket
import time
from typing import Any, Mapping

import torch
import zmq
import zmq.asyncio

from eplbd.chaos import MessageChaos
from eplbd.daemon.auth import (INGEST_DOMAIN, OPERATOR, RPC_DOMAIN, WORKER, CurveSetup, ZapAuthenticator, load_curve,
                               warn_if_exposed)
from eplbd.daemon.dispatch import Dispatch
from eplbd.daemon.loops import MALFORMED_LOG_INTERVAL_S, Loops
from eplbd.daemon.metrics import MetricsServer
from eplbd.daemon.observe import DaemonMetrics
from eplbd.daemon.state import DaemonState
from eplbd.errors import ConfigError
from eplbd.policy.incremental import warm as warm_policies
from eplbd.proto import Decoder, Encoder, bound_endpoint, make_socket
from eplbd.settings import DaemonSettings

log = logging.getLogger("eplbd.daemon.server")


def sd_notify(state: str, env: Mapping[str, str] | None = None) -> bool:
    """Tell systemd (``Type=notify``) about a state change: ``READY=1``, ``STOPPING=1``, ``STATUS=...``.

    The protocol is one datagram to the AF_UNIX socket named by ``$NOTIFY_SOCKET`` (``@name`` is
    the abstract namespace), so no libsystemd is needed. Never raises: a unit that is not
    ``Type=notify`` has no socket, and a failed send must not take the daemon down.

    Args:
        state: newline-separated ``KEY=VALUE`` assignments.
        env: where to read ``NOTIFY_SOCKET`` (default ``os.environ``).

    Returns:
        True if the datagram was sent.
    """
    addr = (os.environ if env is None else env).get("NOTIFY_SOCKET", "")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    elif not addr.startswith("/"):
        log.warning("NOTIFY_SOCKET=%r is not a unix socket path; not notifying systemd", addr)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(addr)
            sock.sendall(state.encode())
        return True
    except OSError as exc:
        log.warning("could not notify systemd at %r: %s", addr, exc)
        return False


def _check_state_dir(state_dir: str | None) -> None:
    """Raise ``ConfigError`` unless ``state_dir`` (if set) is, or can be made, a writable directory:
    found at start, not at the first commit, whose state would then be lost."""
    if state_dir is None:
        return
    d = pathlib.Path(state_dir)
    if d.exists() and not d.is_dir():
        raise ConfigError(f"state_dir={state_dir!r} is not a directory")
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"state_dir={state_dir!r} cannot be created: {exc.strerror or exc}") from None
    if not os.access(d, os.W_OK | os.X_OK):
        raise ConfigError(f"state_dir={state_dir!r} is not writable by this user")


class Daemon(Loops, Dispatch):
    """Args:
        settings: validated ``DaemonSettings``.
        ctx: the process's asyncio ZMQ context (one per process; created if omitted).
        notify: tell systemd READY=1 once the sockets are bound and STOPPING=1 when shutdown
            begins (``sd_notify``; ``serve`` sets it, an embedded daemon does not).
        chaos: tests only: faults injected into what the daemon pushes to ranks (per rank).
    """

    def __init__(self, settings: DaemonSettings, *, ctx: zmq.asyncio.Context | None = None,
                 notify: bool = False, chaos: MessageChaos | None = None) -> None:
        self.settings = settings
        self.chaos = chaos if chaos is not None and chaos.active else None
        self._notify = notify
        self.state = DaemonState(settings)
        self._ctx = ctx or zmq.asyncio.Context()
        self._own_ctx = ctx is None
        self._enc, self._dec = Encoder(), Decoder(max_frame_bytes=settings.max_frame_bytes)
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self.metrics = DaemonMetrics()
        self._metrics_server: MetricsServer | None = None
        self.rpc_endpoint = self.ingest_endpoint = ""
        self.metrics_port = -1
        self._curve: CurveSetup | None = None  # CURVE keys (settings.curve_*), loaded at start
        self._auth: ZapAuthenticator | None = None
        self._malformed_log_at, self._malformed_unlogged = -MALFORMED_LOG_INTERVAL_S, 0
        self._last_logged_step = -1
        self._last_refresh = 0.0
        self._pending: set[asyncio.Task] = set()  # requests waiting on executor work
        self._planning: asyncio.Future | None = None  # the scheduler's policy run in the executor

    # -- lifecycle -------------------------------------------------------------------
    async def start(self) -> None:
        s = self.settings
        opened: list[zmq.Socket] = []
        try:  # a start that fails (ConfigError naming the setting) leaves nothing bound or running
            _check_state_dir(s.state_dir)
            self._start_auth()
            opened.append(self._bind(zmq.ROUTER, "rpc", RPC_DOMAIN))
            opened.append(self._bind(zmq.PULL, "ingest", INGEST_DOMAIN, hwm=s.ingest_hwm))
            if s.metrics_port >= 0:
                self._metrics_server = MetricsServer(self.metrics.registry, s.metrics_host, s.metrics_port,
                                                     health=self._health, ready=self._ready,
                                                     loop=asyncio.get_running_loop())
                try:
                    self.metrics_port = self._metrics_server.start()
                except OSError as exc:
                    self._metrics_server = None
                    raise ConfigError(f"cannot serve metrics on metrics_host={s.metrics_host!r} "
                                      f"metrics_port={s.metrics_port}: {exc.strerror or exc}") from None
        except BaseException:
            for sock in opened:
                sock.close(linger=0)
            self._stop_auth()
            if self._own_ctx:
                self._ctx.term()
            raise
        self._router, self._pull = opened
        self.rpc_endpoint, self.ingest_endpoint = bound_endpoint(self._router), bound_endpoint(self._pull)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, self.request_stop)
            except (NotImplementedError, RuntimeError, ValueError):  # not the main thread
                pass
        self._tasks = [asyncio.create_task(self._ingest_loop(), name="ingest"),
                       asyncio.create_task(self._rpc_loop(), name="rpc"),
                       asyncio.create_task(self._tick_loop(), name="tick"),
                       asyncio.create_task(self._warm_policies(), name="warm-policies")]
        log.info("eplbd %s listening: rpc=%s ingest=%s metrics=%s", self.state.daemon_id, self.rpc_endpoint,
                 self.ingest_endpoint, self.metrics_port if self.metrics_port >= 0 else "off")
        if self._notify:
            sd_notify(f"READY=1\nSTATUS=serving rpc={self.rpc_endpoint} ingest={self.ingest_endpoint}")

    async def _warm_policies(self) -> None:
        """Compile the policies' inner loops (or load them from numba's cache) on a worker thread, so the
        first plan does not pay for it; logs whether they run compiled or on numpy, and why."""
        try:
            how = await asyncio.get_running_loop().run_in_executor(None, warm_policies)
        except Exception as exc:  # noqa: BLE001 - a failed warm-up only costs the first plan its compile time
            log.warning("policy warm-up failed (plans still run): %s: %s", type(exc).__name__, exc)
        else:
            log.info("policies: %s", how)

    def _start_auth(self) -> None:
        """Load the CURVE keys and start the ZAP handler (before any socket binds: a CURVE
        server without a ZAP handler would admit every key); warn about exposed plaintext endpoints."""
        s = self.settings
        self._curve = load_curve(s)
        warn_if_exposed({"rpc": s.rpc, "ingest": s.ingest}, curve=self._curve is not None)
        if self._curve is None:
            return
        auth = ZapAuthenticator(self._ctx, self._curve)
        try:
            auth.start()
        except zmq.ZMQError as exc:  # another ZAP handler already runs in this context
            raise ConfigError(f"cannot start the CURVE authenticator: {exc}") from None
        self._auth = auth
        self.state.rank_binding = self._curve.rank_binding
        log.info("CURVE on: %d worker key(s), %d operator key(s)",
                 *(sum(p.role == r for p in self._curve.peers.values()) for r in (WORKER, OPERATOR)))

    def _stop_auth(self) -> None:
        if self._auth is not None:
            self._auth.stop()
            self._auth = None

    def _bind(self, socket_type: int, name: str, zap_domain: str, **kw: Any) -> zmq.asyncio.Socket:
        """Bind the socket of setting ``name`` (``rpc``/``ingest``); a bind failure is a ``ConfigError`` naming it."""
        s = self.settings
        endpoint = getattr(s, name)
        curve = None if self._curve is None else self._curve.server_keys(zap_domain)
        try:
            return make_socket(self._ctx, socket_type, bind=endpoint, max_msg_size=s.max_frame_bytes, curve=curve,
                               **kw)
        except zmq.ZMQError as exc:
            raise ConfigError(f"cannot bind {name}={endpoint!r}: {exc}") from None

    def request_stop(self) -> None:
        """The one way to stop: signal handlers and operators end up here."""
        self._stop.set()

    async def run(self) -> None:
        """Run until ``request_stop``; then drain and close."""
        await self._stop.wait()
        if self._notify:
            sd_notify("STOPPING=1\nSTATUS=draining")
        await self.close()

    async def close(self) -> None:
        self._stop.set()
        for t in (*self._tasks, *self._pending):
            t.cancel()
        await asyncio.gather(*self._tasks, *self._pending, return_exceptions=True)
        self._tasks = []
        if self._metrics_server is not None:
            await asyncio.to_thread(self._metrics_server.stop)
        self._router.close(linger=200)
        self._stop_auth()
        self._pull.close(linger=0)
        if self._own_ctx:
            self._ctx.term()
        log.info("eplbd stopped")

    # -- health ----------------------------------------------------------------------
    def _health(self) -> tuple[bool, str]:
        return self.metrics.health(self.state, time.monotonic())

    def _ready(self) -> tuple[bool, str]:
        st = self.state
        if st.topo is None:
            return False, "no workers registered"
        if not st.all_ranks_alive(time.time()):
            return False, f"{st._alive_count(time.time())}/{st.topo.num_gpus} ranks alive"
        return True, "ready"



async def serve(settings: DaemonSettings, *, ready_line: bool = True) -> None:
    """Run a daemon until SIGTERM/SIGINT; print one ``READY`` line with the bound endpoints."""
    # The daemon's tensor work is a few small ops per report (index_add_ of one
    # [steps, layers, slots] block). With torch's default intra-op pool, OpenMP
    # workers spin-wait between those ops and took ~80% of the daemon's CPU in
    # bench_ingest, starving libzmq's I/O thread on small hosts. One thread is
    # faster here, and the host's cores stay with the engine.
    torch.set_num_threads(1)
    daemon = Daemon(settings, notify=True)
    await daemon.start()
    if ready_line:
        print(f"READY rpc={daemon.rpc_endpoint} ingest={daemon.ingest_endpoint} metrics_port={daemon.metrics_port}",
              flush=True)
    await daemon.run()
