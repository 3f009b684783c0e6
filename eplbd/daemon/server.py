"""The daemon's I/O shell: sockets, tasks, signals around ``DaemonState``.

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
from typing import Any, Callable, Mapping

import torch
import zmq
import zmq.asyncio

from eplbd.chaos import MessageChaos
from eplbd.daemon.auth import (INGEST_DOMAIN, OPERATOR, RPC_DOMAIN, WORKER, CurveSetup, ZapAuthenticator, authorize,
                        load_curve, warn_if_exposed)
from eplbd.errors import ConfigError, EplbdError, PermissionDeniedError, ProtocolError, UnavailableError
from eplbd.daemon.metrics import MetricsServer
from eplbd.daemon.observe import DaemonMetrics
from eplbd.proto import (PROTOCOL_VERSION, REQUEST_TYPES, Abort, Ack, BalancednessRequest, ConfigReply, Decoder,
                         DumpWindowReply, DumpWindowRequest, Encoder, ErrorReply, GetConfigRequest,
                         GetPlacementRequest, GetPlanRequest, Heartbeat, Hello, LayerReady, LoadPlacementRequest,
                         LoadReport, OkReply, PauseRequest, PlacementReply, RebalanceRequest, RegisterWorker,
                         Release, ResumeRequest, SetConfigRequest, StatusRequest, Welcome, bound_endpoint,
                         check_version, expect, make_socket)
from eplbd.proto import GetResizeRequest, ResizeRequest
from eplbd.settings import DaemonSettings, apply_update
from eplbd.daemon.resize import ResizeJob
from eplbd.daemon.state import DaemonState, Outgoing, Sender

log = logging.getLogger("eplbd.daemon.server")

TICK_S = 0.05
METRICS_REFRESH_S = 1.0
MALFORMED_LOG_INTERVAL_S = 1.0
INGEST_BATCH = 32  # reports drained per wake-up (~0.4 ms each at DSV3 scale): bounds the RPC wait under load
MAX_PENDING = 8  # requests waiting on the executor (rebalance, resize, dump); more are refused as unavailable


class _Later:
    """A request answered after work in the executor: ``work`` runs there, ``finish`` (on the loop)
    turns its result into ``(reply, outgoing)``; an error of either is the reply to request ``req_id``."""

    def __init__(self, work: Callable[[], Any], finish: Callable[[Any], tuple[Any, list[Outgoing]]],
                 req_id: int) -> None:
        self.work, self.finish, self.req_id = work, finish, req_id


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


class Daemon:
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
                       asyncio.create_task(self._tick_loop(), name="tick")]
        log.info("eplbd %s listening: rpc=%s ingest=%s metrics=%s", self.state.daemon_id, self.rpc_endpoint,
                 self.ingest_endpoint, self.metrics_port if self.metrics_port >= 0 else "off")
        if self._notify:
            sd_notify(f"READY=1\nSTATUS=serving rpc={self.rpc_endpoint} ingest={self.ingest_endpoint}")

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

    # -- loops ----------------------------------------------------------------------------
    async def _ingest_loop(self) -> None:
        # A sync shadow of the same socket drains what is queued without a
        # Future per message (an asyncio socket's NOBLOCK recv returns a Future).
        drain = zmq.Socket.shadow(self._pull.underlying)
        while not self._stop.is_set():
            frames = await self._pull.recv_multipart(copy=False)
            self._ingest(frames)
            for _ in range(INGEST_BATCH):
                try:
                    frames = drain.recv_multipart(flags=zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                self._ingest(frames)
            # With a backlog, pyzmq hands back already-finished futures, so the
            # await above never yields: give the RPC and tick loops their turn.
            await asyncio.sleep(0)

    def _ingest(self, frames: list) -> None:
        now = time.time()
        user_id = self._user_id(frames[0]) if frames else None
        try:
            msg = self._dec.decode(frames)
            if not isinstance(msg, LoadReport):
                raise ProtocolError(f"{type(msg).__name__} sent to the ingest socket")
        except Exception as exc:  # ProtocolError, or a bug: either way one report, not the loop
            self.state.counters.reports_received += 1
            self.state.counters.drop("malformed")
            self._log_malformed(exc)
            return
        if self.state.window is None:
            self.state.counters.reports_received += 1
            self.state.counters.drop("unknown_rank")
            return
        try:
            self.state.ingest(msg, now, user_id)
        except Exception:
            log.exception("internal error applying a report")
            self.state.counters.drop("internal_error")

    def _log_malformed(self, exc: Exception) -> None:
        """One line per ``MALFORMED_LOG_INTERVAL_S`` at most: a peer spraying garbage must not flood the
        log (the counter has every one)."""
        self._malformed_unlogged += 1
        now = time.monotonic()
        if now - self._malformed_log_at >= MALFORMED_LOG_INTERVAL_S:
            log.info("dropped malformed report: %s (%d malformed since the last such line)", exc,
                     self._malformed_unlogged)
            self._malformed_log_at, self._malformed_unlogged = now, 0

    async def _rpc_loop(self) -> None:
        while not self._stop.is_set():
            frames = await self._router.recv_multipart(copy=False)
            if len(frames) < 2:
                continue
            identity, body = frames[0].bytes, frames[1:]
            result = self._handle(identity, body, self._user_id(body[0]))
            if isinstance(result, _Later) and len(self._pending) >= MAX_PENDING:
                self._send(identity, ErrorReply.from_exc(UnavailableError(
                    f"{MAX_PENDING} requests are already being computed (rebalance, resize, dump); retry"),
                    req_id=result.req_id))
            elif isinstance(result, _Later):
                task = asyncio.create_task(self._answer_later(identity, result))
                self._pending.add(task)
                task.add_done_callback(self._pending.discard)
            else:
                reply, out = result
                if reply is not None:
                    self._send(identity, reply)
                self._route(out)
            await asyncio.sleep(0)  # same reason as in the ingest loop

    async def _answer_later(self, identity: bytes, later: _Later) -> None:
        """Run a request's heavy part in the executor, then answer it (the loops serve meanwhile)."""
        req_id = later.req_id
        try:
            result = await asyncio.get_running_loop().run_in_executor(None, later.work)
            reply, out = later.finish(result)
        except EplbdError as exc:
            reply, out = ErrorReply.from_exc(exc, req_id=req_id), []
        except Exception as exc:  # a bug must cost one request, not the daemon
            log.exception("internal error handling a request")
            reply, out = ErrorReply.from_exc(exc, req_id=req_id), []
        self._send(identity, reply)
        self._route(out)

    def _user_id(self, frame: zmq.Frame) -> str | None:
        """The ``User-Id`` ZAP gave the sender's connection (``role:name``); None with CURVE off."""
        if self._auth is None:
            return None
        try:
            return frame.get("User-Id")
        except zmq.ZMQError:  # cannot happen behind ZAP; refuse rather than trust
            return ""

    def _handle(self, identity: bytes, body: list,
                user_id: str | None = None) -> tuple[Any, list[Outgoing]] | _Later:
        """Decode, authorise (``user_id`` from ZAP; None: CURVE off, all allowed) and dispatch one request;
        a request with heavy work comes back as a ``_Later`` for the executor."""
        req_id = 0
        try:
            msg = self._dec.decode(body)
            req_id = getattr(msg, "req_id", 0)
            expect(msg, REQUEST_TYPES, "the RPC socket")
            if user_id is not None:
                authorize(user_id, msg)
            return self._dispatch(msg, Sender(identity, user_id), time.time())
        except PermissionDeniedError as exc:
            log.warning("denied: %s", exc)
            return ErrorReply.from_exc(exc, req_id=req_id), []
        except EplbdError as exc:
            return ErrorReply.from_exc(exc, req_id=req_id), []
        except Exception as exc:  # a bug must cost one request, not the daemon
            log.exception("internal error handling a request")
            return ErrorReply.from_exc(exc, req_id=req_id), []

    def _dispatch(self, msg: Any, sender: Sender, now: float) -> tuple[Any, list[Outgoing]] | _Later:
        st, rid = self.state, msg.req_id
        ok = OkReply(req_id=rid)
        match msg:
            case Hello():
                check_version(msg.protocol_version)
                return Welcome(protocol_version=PROTOCOL_VERSION, daemon_id=st.daemon_id, epoch=st.epoch,
                               req_id=rid), []
            case RegisterWorker():
                reply, out = st.register(msg, sender, now)
                return reply, out
            case Heartbeat():
                st.heartbeat(msg, sender, now)
                return ok, []
            case LayerReady():
                return ok, st.layer_ready(msg, sender, now)
            case Ack():
                return ok, st.ack(msg, sender, now)
            case Abort():
                return ok, st.worker_abort(msg, sender, now)
            case Release():
                st.release(msg, sender, now)
                return ok, []
            case StatusRequest():
                reply = st.status(now)
                reply.req_id = rid
                return reply, []
            case BalancednessRequest():
                reply = st.balancedness(msg.per_layer, msg.per_rank)
                reply.req_id = rid
                return reply, []
            case RebalanceRequest():
                job = st.rebalance_job(dry_run=msg.dry_run, layers=msg.layers, policy=msg.policy, force=msg.force,
                                       now=now)
                return _Later(job.run, lambda prop: st.finish_plan(job, prop, now=time.time(), dry_run=msg.dry_run,
                                                                   req_id=rid), rid)
            case PauseRequest():
                st.paused, st._decided = True, True
                st.last_decision_reason = f"paused by operator{': ' + msg.reason if msg.reason else ''}"
                return OkReply(message="schedule paused", req_id=rid), []
            case ResumeRequest():
                st.paused, st._decided = False, True
                st.last_decision_reason = "resumed by operator"
                return OkReply(message="schedule resumed", req_id=rid), []
            case GetPlanRequest():
                info = st.get_plan(msg.epoch, msg.plan_id).info()
                info.req_id = rid
                return info, []
            case GetPlacementRequest():
                e = st.epoch if msg.epoch is None else msg.epoch
                return PlacementReply(epoch=e, phy2log=st.get_placement(msg.epoch), ep_size=st.topo.num_gpus,
                                      req_id=rid), []
            case DumpWindowRequest():
                path, write = st.dump_window_job(msg.path)
                return _Later(write, lambda steps: (DumpWindowReply(path=path, steps=steps, req_id=rid), []), rid)
            case LoadPlacementRequest():
                return st.load_placement(msg.path, dry_run=msg.dry_run, now=now, req_id=rid, moe_layers=msg.moe_layers,
                                         num_hidden_layers=msg.num_hidden_layers)
            case ResizeRequest():
                job = st.resize_job(msg.mapping, msg.ep_size, dry_run=msg.dry_run, req_id=rid)
                if not isinstance(job, ResizeJob):
                    return job, []  # a repeat of the resize in progress
                return _Later(job.run, lambda plan: st.finish_resize(job, plan, dry_run=msg.dry_run, req_id=rid),
                              rid)
            case GetResizeRequest():
                return st.get_resize(msg.epoch, req_id=rid), []
            case GetConfigRequest():
                return ConfigReply(config=self.settings.model_dump(mode="json"), req_id=rid), []
            case SetConfigRequest():
                new = apply_update(self.settings, msg.key, msg.value)
                st.set_settings(new)  # may refuse it (a window beyond window_memory_bytes)
                self.settings = new
                log.info("config %s set to %r by operator", msg.key, getattr(self.settings, msg.key))
                return ConfigReply(config=self.settings.model_dump(mode="json"), req_id=rid), []
        raise ProtocolError(f"no handler for {type(msg).__name__}")

    def _send(self, identity: bytes, msg: Any) -> bool:
        try:
            sent = self._router.send_multipart([identity, *self._enc.encode(msg)], copy=False, flags=zmq.NOBLOCK)
            # zmq.asyncio hands a NOBLOCK send's error back on the (already finished) future.
            if isinstance(sent, asyncio.Future) and sent.done() and sent.exception() is not None:
                raise sent.exception()
            return True
        except zmq.ZMQError as exc:  # peer gone (ROUTER_MANDATORY) or its queue full
            log.warning("could not send %s to %r: %s", type(msg).__name__, identity, exc)
            return False

    def _route(self, out: list[Outgoing]) -> None:
        for item in out:
            if item.identity is not None:  # a connection that is no rank any more (eplbd.daemon.resize)
                self._send(item.identity, item.msg)
                continue
            ranks = list(self.state.workers) if item.rank is None else [item.rank]
            for r in ranks:
                if self.chaos is None:
                    self._send_rank(r, item.msg)
                    continue
                for msg in self.chaos.process(r, item.msg, time.monotonic()):
                    self._send_rank(r, msg)

    def _send_rank(self, rank: int, msg: Any) -> None:
        w = self.state.workers.get(rank)
        if w is not None:
            self._send(w.identity, msg)

    async def _tick_loop(self) -> None:
        while not self._stop.is_set():
            try:
                if self._planning is None:
                    out, job = self.state.tick_decide(time.time())
                    self._route(out)
                    if job is not None:
                        self._start_planning(job)
                if self.chaos is not None:
                    for rank, msg in self.chaos.due(time.monotonic()):
                        self._send_rank(rank, msg)
                self._log_balancedness()
                if time.monotonic() - self._last_refresh >= METRICS_REFRESH_S:
                    self._last_refresh = time.monotonic()
                    self.metrics.refresh(self.state, time.time())
            except Exception:  # keep scheduling whatever one tick did
                log.exception("scheduler tick failed")
            await asyncio.sleep(TICK_S)

    def _start_planning(self, job: Any) -> None:
        """The scheduler's policy run goes to the executor; its plan is pushed when it is done (the tick
        loop decides nothing new meanwhile)."""
        fut = asyncio.get_running_loop().run_in_executor(None, job.run)
        self._planning = fut

        def done(f: asyncio.Future) -> None:
            self._planning = None
            if f.cancelled():
                return
            try:
                _, out = self.state.finish_plan(job, f.result(), now=time.time())
            except EplbdError as exc:  # the group moved while the policy ran: the next tick decides again
                log.info("scheduled re-plan dropped: %s", exc)
                return
            except Exception:
                log.exception("scheduled re-plan failed")
                return
            self._route(out)

        fut.add_done_callback(done)

    def _log_balancedness(self) -> None:
        st = self.state
        if not self.settings.log_balancedness or st.window is None or st.window.newest_step < 0:
            return
        step = st.window.newest_step
        interval = self.settings.log_balancedness_interval
        if step // interval == self._last_logged_step // interval:
            return
        self._last_logged_step = step
        b = st.balancedness()
        log.info("balancedness step=%d epoch=%d observed min=%.4f mean=%.4f agg=%.4f predicted mean=%.4f",
                 step, st.epoch, b.observed.min, b.observed.mean, b.observed.aggregate, b.predicted.mean)


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
