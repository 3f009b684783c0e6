"""The agent-thread side of a :class:`~eplbd.client.agent.PlacementAgent`: registration (and settling an
orphaned plan first), heartbeats, the daemon's plans, commits and aborts, and staging granted layers
through the communicator. The engine-thread side (``after_step``, the in-band commit, apply) is in
:mod:`eplbd.client.agent`.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Sequence

from eplbd.client.agent_state import _Active
from eplbd.client.schedule import plan_schedules
from eplbd.errors import EplbdError, NotRegisteredError, UnavailableError
from eplbd.proto import Abort, Commit, Plan

log = logging.getLogger("eplbd.agent")


class AgentThread:
    """Mixed into :class:`~eplbd.client.agent.PlacementAgent`: the methods that run on its background thread
    (``eplbd-agent-r<rank>``, target ``_run``), on the attributes the agent's constructor sets."""

    def _run(self) -> None:
        last_hb = 0.0
        while not self._stop.is_set():
            try:
                if not self._registered:
                    if self._settle_before_registering():
                        self._register()
                    continue
                self._drain_outbox()
                msg = self.link.poll_pushed(0.005)
                if msg is not None:
                    self.chaos.delay()
                    self._on_pushed(msg)
                if self.use_async:
                    self._maybe_stage()
                if time.monotonic() - last_hb > self.heartbeat_s:
                    last_hb = time.monotonic()
                    self.link.heartbeat(self._step, self.epoch)
            except NotRegisteredError:
                log.warning("rank %d: daemon does not know this rank (restarted?); registering again", self.rank)
                self._registered = False
                self._orphan("the daemon no longer knows this rank (it restarted?)")
            except EplbdError as exc:  # daemon unreachable: keep serving, retry
                log.info("rank %d: daemon unavailable: %s", self.rank, exc)
                self._stop.wait(0.2)
            except Exception:  # a bug must not kill the engine; it is logged and retried
                log.exception("rank %d: agent thread error", self.rank)
                self._stop.wait(0.2)

    def _orphan(self, reason: str) -> None:
        """The daemon lost this rank, so it cannot finish the plan in flight: flag it for the in-band end."""
        with self._lock:
            a = self._active
            if a is not None and not a.orphaned:
                a.orphaned = reason
                log.warning("rank %d: plan %d orphaned: %s", self.rank, a.plan.plan_id, reason)

    def _settle_before_registering(self) -> bool:
        """Register only without a plan in flight: the placement registered is then the one every rank
        runs. An orphaned plan ends at a commit boundary (``_cadence``), for all ranks at once; the
        engine keeps stepping meanwhile. Granted staging keeps running (peers wait on it)."""
        with self._lock:
            a = self._active
        if a is None:
            return True
        if self.use_async:
            self._maybe_stage()
        self._stop.wait(0.01)
        return False

    def _register(self) -> None:
        with self._lock:
            phy2log, epoch = self.phy2log.cpu().clone(), self.epoch
        try:
            reg = self.link.register(epoch=epoch, phy2log=phy2log, step=self._step, last_plan_id=self._max_plan_id,
                                     **self._reg_args)
        except EplbdError as exc:
            log.info("rank %d: registration failed (%s); retrying", self.rank, exc)
            self._stop.wait(0.5)
            return
        self.stats.registrations += 1
        self._registered = True
        # Whatever was queued for the daemon before belongs to plans it no longer knows.
        self._outbox.clear()
        self.reporter.set_identity(self.link.worker_id, self.link.session)
        if reg.commit_interval_steps and reg.commit_interval_steps != self.commit_interval:
            log.warning("rank %d: daemon's commit_interval_steps %d differs from this group's %d; using %d",
                        self.rank, reg.commit_interval_steps, self.commit_interval, self.commit_interval)
        if reg.plan is not None:
            self._on_pushed(reg.plan)

    def _drain_outbox(self) -> None:
        """Send what the engine thread queued, in order (``Chaos`` may duplicate or reorder). A send
        that fails because the daemon is unreachable stays queued (raised to ``_run``, retried); any
        other failure drops it, logged."""
        chaos = self.chaos.messages if self.chaos.messages.active else None
        if chaos is not None:
            self._outbox.extendleft(m for _, m in chaos.due(time.monotonic()))
        while self._outbox:
            item = self._outbox.popleft()
            sends = [item] if chaos is None else chaos.process(0, item, time.monotonic())
            for i, send in enumerate(sends):
                try:
                    send()
                except EplbdError as exc:
                    if not isinstance(exc, (UnavailableError, NotRegisteredError)):
                        log.warning("rank %d: daemon refused a message: %s", self.rank, exc)
                        continue
                    self._outbox.extendleft(reversed(sends[i:]))
                    raise
                except Exception:
                    log.exception("rank %d: dropping a message to the daemon", self.rank)

    def _on_pushed(self, msg: Any) -> None:
        if isinstance(msg, Plan):
            self._on_plan(msg)
        elif isinstance(msg, Commit):
            with self._lock:
                a = self._active
                if a is not None and a.plan.plan_id == msg.plan_id:
                    a.permitted.update(msg.layers)
        elif isinstance(msg, Abort):
            self._on_abort(msg)

    def _on_plan(self, plan: Plan) -> None:
        with self._lock:
            if plan.plan_id <= self._max_plan_id:
                self.stats.plans_stale += 1  # a duplicate, or replayed from before: never applied
                log.info("rank %d: ignoring plan %d (already seen plan %d)", self.rank, plan.plan_id,
                         self._max_plan_id)
                return
            self._max_plan_id = plan.plan_id
            self.stats.plans_received += 1
            a = self._active
            reason = ""
            if a is not None:
                reason = f"rank {self.rank} is still applying plan {a.plan.plan_id}"
            elif plan.base_epoch != self.epoch:
                reason = f"plan base epoch {plan.base_epoch} is not rank {self.rank}'s epoch {self.epoch}"
            if not reason:
                try:
                    scheds = plan_schedules(plan.layers, self.phy2log.cpu(), plan.phy2log, self.ep_size)
                except EplbdError as exc:
                    reason = f"rank {self.rank} cannot schedule plan {plan.plan_id}: {exc}"
            if not reason:
                self._active = _Active(plan, scheds)
        if reason:
            self.stats.plans_refused += 1
            log.warning("refusing plan %d: %s", plan.plan_id, reason)
            self.link.abort(plan.plan_id, plan.epoch, reason)
            return

    def _on_abort(self, msg: Abort) -> None:
        with self._lock:
            a = self._active
            if a is None or a.plan.plan_id != msg.plan_id:
                return
            if msg.keep_layers:
                # Permitted layers are staged on every rank; they are still applied.
                keep = set(msg.keep_layers)
                n = 0
                while n < len(a.layers) and a.layers[n] in keep:
                    n += 1
                a.layers = a.layers[:n]  # schedules stay whole: granted layers are still run (see below)
                a.permitted |= keep
                a.failed = a.failed or f"aborted, keeping {n} layer(s): {msg.reason}"
                self._release_unneeded(a)
                if a.applied >= n:
                    self._finish(a)
            else:
                a.aborted = True
                self._release_unneeded(a)
        log.warning("rank %d: plan %d aborted: %s", self.rank, msg.plan_id, msg.reason)

    def _release_unneeded(self, a: _Active) -> None:
        """Under the lock: once no granted staging is pending, free buffers of layers that will not be
        applied, and drop a plan the daemon aborted outright."""
        if a.started < a.granted:
            return  # the agent thread finishes the granted layers first (peers are waiting for them)
        for i in [i for i in a.buffers if i >= len(a.layers) or a.aborted]:
            self._free.append(a.buffers.pop(i))
        if a.aborted and self._active is a:
            self._active = None
            self.stats.plans_aborted += 1

    def _maybe_stage(self) -> None:
        with self._lock:
            a = self._active
            if a is None or a.started >= a.granted:
                return
        self._stage_granted(a)

    def _stage_granted(self, a: _Active) -> None:
        """Run the transfers of every granted layer. A granted layer is always run to the end, even
        after a failure here (its results are then unused): the peers are running it too."""
        while True:
            with self._lock:
                if a.started >= a.granted:
                    self._release_unneeded(a)
                    return
                i, buf = a.started, self._free.pop()
                a.claimed = i + 1
            with self._streams.staging():
                ok = self._stage_layer(a, i, buf)
                event = self._streams.staged()
            with self._lock:
                a.started = i + 1
                if ok and not a.failed and a.staged == i:
                    a.buffers[i] = buf
                    a.events[i] = event
                    a.staged = i + 1
                    layer = a.layers[i] if i < len(a.layers) else -1
                else:
                    self._free.append(buf)
                    layer = -1
            if layer >= 0:
                self._outbox.append(lambda layer=layer: self.link.layer_ready(a.plan.plan_id, a.plan.epoch, [layer]))

    def _stage_layer(self, a: _Active, i: int, buf: int) -> bool:
        """Stage layer ``i`` of the plan into ``buf``: remote batches, then local copies."""
        layer, sched = a.plan.layers[i], a.schedules[i]
        t0 = time.perf_counter()
        before = self.comm.bytes_received
        error, peer = "", -1
        for batch in sched.for_rank(self.rank):
            if not batch:
                continue
            try:
                self.chaos.before_batch()
                self.comm.run_batch(buf, batch)
            except EplbdError as exc:
                # Batches are conflict-free: this rank talked to one peer in it.
                error, peer = (error, peer) if error else (f"staging layer {layer} failed: {exc}", _peer(batch, self.rank))
                continue
            try:
                self.chaos.check_batch()
            except EplbdError as exc:
                error = error or f"staging layer {layer} failed: {exc}"
        if error:
            with self._lock:
                first = not a.failed
                a.failed = a.failed or error
            log.warning("rank %d: plan %d: %s", self.rank, a.plan.plan_id, error)
            if first:
                self._outbox.append(lambda: self.link.abort(a.plan.plan_id, a.plan.epoch, error, peer=peer))
            return False
        sched.copy_local(self.rank, self.model.expert_weights[layer], self.staging[buf])
        self.stats.stage_s.append(time.perf_counter() - t0)
        self.stats.bytes_received += self.comm.bytes_received - before
        self.stats.experts_received += sum(1 for b in sched.batches for t in b if t.dst_rank == self.rank)
        return True


def _peer(batch: Sequence[Any], rank: int) -> int:
    """The one peer ``rank`` exchanges with in a conflict-free batch (-1 if that is not one rank)."""
    peers = {t.src_rank if t.dst_rank == rank else t.dst_rank for t in batch}
    return peers.pop() if len(peers) == 1 else -1
