"""The sender thread of a :class:`~eplbd.client.reporter.LoadReporter`: it takes runs of pending steps off the
ring, waits for their CUDA copies, and pushes them to the daemon as ``LoadReport`` messages, counting what
does not get out.
"""

from __future__ import annotations

import logging
import math
import time

import torch
import zmq

from eplbd.errors import InvalidArgumentError
from eplbd.proto import LoadReport

log = logging.getLogger("eplbd.client.reporter")

# How long the sender waits for the socket to become writable (not connected
# yet, or the daemon's queue full) before a send counts as failed. It waits on
# its own thread; meanwhile the FIFO absorbs new steps and drops the oldest.
_SEND_WAIT_S = 0.25
_POLL_SLICE_S = 0.02  # waits are sliced so that close() is noticed promptly
_EVENT_POLL_S = 0.0002


class ReportSender:
    """Mixed into :class:`~eplbd.client.reporter.LoadReporter`: the methods its sender thread runs (target
    ``_run``), on the ring and counters the reporter's constructor sets."""

    def _run(self) -> None:
        try:
            while True:
                batch = self._next_batch()
                if batch is None:
                    break
                self._send(*batch)
        except Exception:  # pragma: no cover - the reporter must never take the engine down
            log.exception("reporter of rank %d: sender thread failed; further steps are dropped", self.rank)
        finally:
            with self._lock:
                rest = self._qhead - self._qtail
                self._qtail = self._qhead
                self.steps_dropped += rest
                self._unreported += rest
                self._closed = True
            # Reports already queued in libzmq get until the deadline to leave.
            remaining = self._deadline - time.monotonic()
            linger = int(max(0.0, min(remaining, 60.0)) * 1000) if math.isfinite(remaining) else 0
            self._sock.close(linger=linger)

    def _run_length(self, pending: int) -> int:
        """Steps from the FIFO's front that fit one report: consecutive, one tag, at most batch_steps."""
        cap, tail = self._cap, self._qtail
        q0 = tail % cap
        step0, tag0 = self._q_step[q0], self._q_tag[q0]
        k = 1
        limit = min(pending, self.batch_steps)
        while k < limit:
            q = (tail + k) % cap
            if self._q_step[q] != step0 + k or self._q_tag[q] != tag0:
                break
            k += 1
        return k

    def _next_batch(self) -> tuple | None:
        """Wait until a batch should go out and take it off the FIFO: ``(slots, first_step, tag, events)``.

        Returns None when the sender should stop.
        """
        with self._cond:
            while True:
                now = time.monotonic()
                head, tail = self._qhead, self._qtail
                if head != self._seen_head:
                    self._seen_head, self._last_change = head, now
                pending = head - tail
                if self._closing and (now >= self._deadline or self._worker_id is None or pending == 0):
                    return None
                if pending and self._worker_id is not None:
                    k = self._run_length(pending)
                    if (k == self.batch_steps or k < pending or self._closing or tail < self._flush_upto
                            or now - self._last_change >= self.flush_interval_s):
                        cap = self._cap
                        slots = [self._q_slot[(tail + n) % cap] for n in range(k)]
                        self._qtail = tail + k
                        q0 = tail % cap
                        return slots, self._q_step[q0], self._q_tag[q0], [self._events[s] for s in slots]
                    timeout = self.flush_interval_s - (now - self._last_change)
                else:
                    timeout = self.flush_interval_s
                if self._closing:
                    timeout = min(timeout, self._deadline - now)
                self._sender_waiting = True
                self._cond.wait(max(timeout, 0.001))
                self._sender_waiting = False

    def _wait_events(self, events: list) -> bool:
        """Poll the CUDA events guarding the batch's slots; False if close's deadline passed first.

        ``query`` rather than ``synchronize``: it never blocks, so close() stays
        bounded even if the forward stream is stuck.
        """
        for ev in events:
            if ev is None:
                continue
            while not ev.query():
                if self._closing and time.monotonic() >= self._deadline:
                    return False
                time.sleep(_EVENT_POLL_S)
        return True

    def _wait_writable(self) -> bool:
        """Wait (bounded) until the PUSH socket can take a message: connected, and below its HWM."""
        sock = self._sock
        if sock.getsockopt(zmq.EVENTS) & zmq.POLLOUT:
            return True
        end = time.monotonic() + max(_SEND_WAIT_S, self.flush_interval_s)
        while True:
            now = time.monotonic()
            if self._closing:
                end = min(end, self._deadline)
            if now >= end:
                return False
            if sock.poll(max(1, int(min(end - now, _POLL_SLICE_S) * 1000)), zmq.POLLOUT):
                return True

    def _send(self, slots: list[int], first_step: int, tag: tuple[int, int], events: list) -> None:
        n = len(slots)
        ready = self._wait_events(events)
        if ready:
            # A fresh tensor per report: the frame goes out zero-copy, so libzmq
            # may read it after send returns; it must never be reused.
            load = torch.stack([self._slots[s] for s in slots]) if n > 1 else self._slots[slots[0]].clone()[None]
        with self._lock:
            self._free.extend(reversed(slots))  # LIFO: the batch's first slot is reused first
            for s in slots:
                self._events[s] = None
            if not ready:
                self.steps_dropped += n
                self._unreported += n
                return
            seq = self._seq
            self._seq += 1
            worker_id, session = self._worker_id, self._session
            dropped = self._unreported
        ok = False
        try:
            msg = LoadReport(rank=self.rank, worker_id=worker_id, epoch=tag[0], layers_applied=tag[1],
                             first_step=first_step, seq=seq, load=load, dropped_steps=dropped, session=session)
            frames = self._enc.encode(msg)
            if self._wait_writable():
                self._sock.send_multipart(frames, copy=False, flags=zmq.NOBLOCK)
                ok = True
        except zmq.Again:
            pass
        except (zmq.ZMQError, InvalidArgumentError) as exc:  # pragma: no cover - defensive
            log.warning("reporter of rank %d: report seq %d not sent: %s", self.rank, seq, exc)
        with self._lock:
            if ok:
                self.steps_sent += n
                self.reports_sent += 1
                self._unreported -= dropped
            else:
                self.reports_failed += 1
                self.steps_dropped += n
                self._unreported += n
