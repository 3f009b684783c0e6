"""The daemon's three loops: ingest (PULL: load reports into the state), RPC (ROUTER: requests in, replies
and pushed plans out, heavy work to the executor) and tick (scheduler, plans, metrics refresh, balancedness log).

``Loops`` is a part of ``Daemon`` (eplbd.daemon.server), which owns the sockets, the state and the stop event.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import zmq

from eplbd.daemon.dispatch import Later
from eplbd.daemon.state import Outgoing
from eplbd.errors import EplbdError, ProtocolError, UnavailableError
from eplbd.proto import ErrorReply, LoadReport

log = logging.getLogger("eplbd.daemon.server")  # the shell's modules log as one

TICK_S = 0.05
METRICS_REFRESH_S = 1.0
MALFORMED_LOG_INTERVAL_S = 1.0
INGEST_BATCH = 32  # reports drained per wake-up (~0.4 ms each at DSV3 scale): bounds the RPC wait under load
MAX_PENDING = 8  # requests waiting on the executor (rebalance, resize, dump); more are refused as unavailable


class Loops:
    """The ``Daemon``'s loops and what they send (uses its sockets, ``state``, ``settings``, ``metrics``)."""

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
            if isinstance(result, Later) and len(self._pending) >= MAX_PENDING:
                self._send(identity, ErrorReply.from_exc(UnavailableError(
                    f"{MAX_PENDING} requests are already being computed (rebalance, resize, dump); retry"),
                    req_id=result.req_id))
            elif isinstance(result, Later):
                task = asyncio.create_task(self._answer_later(identity, result))
                self._pending.add(task)
                task.add_done_callback(self._pending.discard)
            else:
                reply, out = result
                if reply is not None:
                    self._send(identity, reply)
                self._route(out)
            await asyncio.sleep(0)  # same reason as in the ingest loop

    async def _answer_later(self, identity: bytes, later: Later) -> None:
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


