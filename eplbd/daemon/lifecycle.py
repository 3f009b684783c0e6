"""The plan lifecycle of ``DaemonState``: the scheduler tick, the policy run as a ``PlanJob``, pushing a
plan, ``LayerReady`` -> ``Commit``, acks -> commit, aborts and the stuck watchdog. ``PlanLifecycle`` is
mixed into ``DaemonState``."""

from __future__ import annotations

import logging
import time
from functools import partial
from typing import Any

from eplbd.errors import PlanConflictError
from eplbd.daemon.plans import PlanRecord
from eplbd.proto import Abort, AbortInfo, Ack, Commit, LayerReady, Plan, RebalanceReply
from eplbd.daemon.scheduler import Proposal, SchedulerState, decide, propose
from eplbd.daemon.state_types import Outgoing, PlanJob, Sender

log = logging.getLogger("eplbd.daemon.state")  # one logger for all of DaemonState

MAX_PLANS_KEPT = 64  # plan records kept for `eplbctl plan` (each holds a full phy2log)


class PlanLifecycle:
    """The plan lifecycle of ``DaemonState`` (see the module docstring)."""

    # -- schedule -----------------------------------------------------------------------
    def scheduler_state(self, *, manual: bool = False, now: float | None = None) -> SchedulerState:
        """What ``decide`` sees; with ``now`` (wall time), the ranks silent beyond the heartbeat timeout."""
        plan = self.current_plan if self.current_plan is not None and self.current_plan.in_flight else None
        dead = () if plan is None or now is None else tuple(
            (r, now - w.last_seen) for r, w in sorted(self.workers.items()) if not self.alive(w, now))
        return SchedulerState(step=self.window.newest_step if self.window else -1,
                              last_plan_step=self.last_plan_step,
                              window_fill=self.window.fill if self.window else 0,
                              paused=self.paused, manual=manual,
                              plan_started_at=plan.timeout_from if plan else None,
                              plan_progress_at=plan.progress_mono if plan else None, dead_ranks=dead)

    def tick(self, now: float, mono: float | None = None) -> list[Outgoing]:
        """One scheduler step: maybe push a plan, maybe abort a stuck one (the policy runs inline;
        the daemon runs ``tick_decide``'s job in an executor instead)."""
        out, job = self.tick_decide(now, mono)
        if job is not None:
            reply, more = self.finish_plan(job, job.run(), now=now)
            out += more
        return out

    def tick_decide(self, now: float, mono: float | None = None) -> tuple[list[Outgoing], PlanJob | None]:
        """The cheap part of a scheduler step: aborts to send now, and the policy run to do, if a
        re-plan is due (its result goes to ``finish_plan``)."""
        mono = time.monotonic() if mono is None else mono
        if self.topo is None:
            self.last_decision_reason = "no workers registered yet"
            return [], None
        d = decide(mono, self.scheduler_state(now=now), self.settings)
        if d.action == "abort":
            self.last_decision_reason = d.reason
            return self.abort_plan(d.reason, rank=d.rank, cause=d.trigger), None
        if d.action == "wait":
            # A wait reason is shown only until the first real decision: after
            # that, status keeps saying why the last plan was pushed or skipped.
            if not self._decided:
                self.last_decision_reason = d.reason
            return [], None
        self._decided = True
        if not self.all_ranks_alive(now):
            self.last_decision_reason = (f"re-plan due but only {self._alive_count(now)}/{self.topo.num_gpus} "
                                         "ranks are registered and alive")
            return [], None
        self.last_plan_step = self.window.newest_step
        return [], self._plan_job(d.reason, scheduled=True, expert_bytes=self._moved_bytes(1))

    def _plan_job(self, what: str, scheduled: bool = False, **kw: Any) -> PlanJob:
        run = partial(propose, self.window.logical_load(), self.phy2log, self.topo, self.settings, **kw)
        return PlanJob(run, self.epoch, what, self.phy2log, scheduled)

    def finish_plan(self, job: PlanJob, prop: Proposal, *, now: float, dry_run: bool = False,
                    req_id: int = 0) -> tuple[RebalanceReply, list[Outgoing]]:
        """Apply a ``PlanJob``'s result: push the plan (unless skipped or ``dry_run``).

        Raises:
            PlanConflictError: the placement changed while the policy ran (a commit, a resize, a
                placement load), or a plan started meanwhile: the result is stale; retry.
        """
        if self.epoch != job.epoch or self.phy2log is not job.phy2log:
            raise PlanConflictError(f"{job.what}: the placement changed while the policy ran (epoch {job.epoch} -> "
                                    f"{self.epoch}); the result is stale, retry")
        if not dry_run and prop.accept:
            rec = self.current_plan
            if rec is not None and rec.in_flight:
                raise PlanConflictError(f"{job.what}: plan {rec.plan_id} started while the policy ran; retry")
        if job.scheduled:
            self.last_decision_reason = f"{job.what}: {prop.reason}"
            log.info("scheduled re-plan: %s", self.last_decision_reason)
            if not prop.accept:
                self.counters.plans["skipped"] += 1
                return self._reply(prop, req_id), []
            rec, out = self._start_plan(prop)
            return self._reply(prop, req_id, rec), out
        return self._proposal_reply(prop, dry_run, req_id, job.what)

    def _moved_bytes(self, moved: int) -> int:
        per_expert = max((w.expert_bytes for w in self.workers.values()), default=0)
        return int(moved) * per_expert

    def _start_plan(self, prop: Proposal) -> tuple[PlanRecord, list[Outgoing]]:
        moved = int(prop.moved_slots.sum())
        rec = PlanRecord(plan_id=self.next_plan_id, epoch=self.epoch + 1, base_epoch=self.epoch,
                         layers=list(prop.layers), phy2log=prop.phy2log.clone(), policy=prop.policy,
                         reason=prop.reason, predicted_before=float(prop.before.mean()),
                         predicted_after=float(prop.after.mean()), moved_slots=moved,
                         moved_bytes=self._moved_bytes(moved), created_at=time.time())
        self.next_plan_id += 1
        self.plans[rec.plan_id] = rec
        while len(self.plans) > MAX_PLANS_KEPT:  # oldest first; a daemon runs for months
            self.plans.pop(next(iter(self.plans)))
        self.current_plan = rec
        self.placements[rec.epoch] = rec.phy2log
        self._persist()
        plan = Plan(plan_id=rec.plan_id, epoch=rec.epoch, base_epoch=rec.base_epoch, layers=rec.layers,
                    phy2log=rec.phy2log[rec.layers].contiguous(), policy=rec.policy, reason=rec.reason,
                    timeout_s=self.settings.plan_timeout_s)
        log.info("plan %d pushed: epoch %d, %d layers, %d moved slots", rec.plan_id, rec.epoch,
                 len(rec.layers), moved)
        return rec, [Outgoing(plan)]

    def _plan(self, plan_id: int, epoch: int) -> PlanRecord | None:
        rec = self.plans.get(plan_id)
        if rec is None or rec.epoch != epoch or not rec.in_flight:
            return None
        return rec

    def layer_ready(self, msg: LayerReady, sender: Sender, now: float) -> list[Outgoing]:
        """A rank staged some layers; permit the layers every rank has staged."""
        self._session(msg, sender, now)
        rec = self._plan(msg.plan_id, msg.epoch)
        if rec is None:
            return []  # late or duplicate: idempotent
        if not rec.record(rec.ready, msg.rank, msg.layers, rec.layers):
            return []  # duplicate, replayed or foreign layers: nothing new
        rec.mark("first_ready")
        everywhere = rec.layers_ready_everywhere(range(self.topo.num_gpus)) - rec.permitted
        if not everywhere:
            return []
        rec.permitted |= everywhere
        rec.state = "committing"
        if rec.permitted >= set(rec.layers):
            rec.mark("staged")
        return [Outgoing(Commit(plan_id=rec.plan_id, epoch=rec.epoch, layers=sorted(everywhere)))]

    def ack(self, msg: Ack, sender: Sender, now: float) -> list[Outgoing]:
        """A rank applied some layers; when every rank applied every layer the plan is committed.
        Only the registered session of a rank can ack for it."""
        self._session(msg, sender, now)
        rec = self._plan(msg.plan_id, msg.epoch)
        if rec is None:
            return []
        if not rec.record(rec.acked, msg.rank, msg.layers, rec.permitted):
            return []  # a duplicate ack (or one for layers never permitted) changes nothing
        rec.mark("first_ack")
        if rec.layers_acked_everywhere(range(self.topo.num_gpus)) >= set(rec.layers):
            self._commit(rec)
        return []

    def _commit(self, rec: PlanRecord) -> None:
        rec.state = "committed"
        rec.mark("committed")
        self.epoch, self.phy2log = rec.epoch, rec.phy2log
        for w in self.workers.values():
            w.epoch = rec.epoch
        # Keep the previous epoch's placement so late reports recorded under it still map.
        self.placements = {e: p for e, p in self.placements.items() if e >= rec.epoch - 1}
        self.window.set_epoch(self.epoch)
        self.current_plan = rec
        self.last_commit_time = time.time()
        self.aborts_in_a_row = 0
        self.counters.plans["committed"] += 1
        self._persist()
        log.info("plan %d committed: epoch %d in %.3fs", rec.plan_id, rec.epoch, rec.timings["committed"])

    def abort_plan(self, reason: str, *, rank: int = -1, cause: str = "rank_failed",
                   reported_by: int = -1, reported_by_worker: str = "") -> list[Outgoing]:
        """Abandon the plan in flight. Layers already permitted cannot be taken back (a rank
        may have applied them): the first abort of such a plan truncates it to those layers
        and it still commits when they are acked; a second abort of the truncated plan (its
        acks did not come in time) commits it without them, since the ranks run those layers
        as soon as they can step together again (and a rank that re-registers says what it
        runs). A plan with nothing permitted ends aborted.

        Args:
            reason: why, for logs, the plan record and ``status.last_abort``.
            rank: the rank that failed (-1: none in particular).
            cause: one of ``ABORT_CAUSES`` (the metric label).
            reported_by: the rank that reported the failure (-1: the daemon noticed).
            reported_by_worker: the worker id (registered session) of ``reported_by``.
        """
        rec = self.current_plan
        if rec is None or not rec.in_flight:
            return []
        keep = [layer for layer in rec.layers if layer in rec.permitted]
        self.counters.aborts[cause] = self.counters.aborts.get(cause, 0) + 1
        self.last_abort = AbortInfo(plan_id=rec.plan_id, rank=rank, reason=reason, at=time.time(), cause=cause,
                                    reported_by=reported_by, kept_layers=keep if not rec.end_reason else [],
                                    reported_by_worker=reported_by_worker)
        if keep and not rec.end_reason:
            self._truncate(rec, keep)
            rec.end_reason = f"truncated to {len(keep)} permitted layer(s): {reason}"
            rec.truncated_mono = rec.progress_mono = time.monotonic()  # time for the ranks to apply and ack
            log.warning("plan %d %s", rec.plan_id, rec.end_reason)
            out = [Outgoing(Abort(plan_id=rec.plan_id, epoch=rec.epoch, reason=reason, rank=rank, keep_layers=keep))]
            if rec.layers_acked_everywhere(range(self.topo.num_gpus)) >= set(rec.layers):
                self._commit(rec)
            return out
        if rec.end_reason and rec.permitted:
            rec.end_reason += f"; committed without every ack after: {reason}"
            log.warning("plan %d: permitted layers %s cannot be taken back; committed without every ack (%s)",
                        rec.plan_id, rec.layers, reason)
            self._commit(rec)
            # Repeat the truncation for a rank that missed it; idempotent on the others.
            return [Outgoing(Abort(plan_id=rec.plan_id, epoch=rec.epoch, reason=reason, rank=rank,
                                   keep_layers=list(rec.layers)))]
        rec.state, rec.end_reason = "aborted", reason
        rec.mark("aborted")
        self.placements.pop(rec.epoch, None)
        self.counters.plans["aborted"] += 1
        if cause != "resize":
            self.aborts_in_a_row += 1
        self._persist()
        log.warning("plan %d aborted: %s", rec.plan_id, reason)
        return [Outgoing(Abort(plan_id=rec.plan_id, epoch=rec.epoch, reason=reason, rank=rank))]

    def _truncate(self, rec: PlanRecord, keep: list[int]) -> None:
        base = self.placements.get(rec.base_epoch, self.phy2log)
        phy2log = base.clone()
        phy2log[keep] = rec.phy2log[keep]
        rec.phy2log, rec.layers = phy2log, list(keep)
        self.placements[rec.epoch] = phy2log

    def worker_abort(self, msg: Abort, sender: Sender, now: float) -> list[Outgoing]:
        """A rank gave up on a plan (a failed transfer, a refused plan). When the failure was a
        transfer with a named peer, that peer is the rank blamed: the reporter is evidently alive.
        Only a rank's registered session can abort for it (so only those aborts count towards
        ``stuck_abort_streak``); the abort is recorded with that session's worker id."""
        w = self._session(msg, sender, now)
        if self._plan(msg.plan_id, msg.epoch) is None:
            return []  # late, duplicated or for a plan already over: idempotent
        if msg.peer >= 0:
            reason = f"rank {msg.rank} failed a transfer with rank {msg.peer}: {msg.reason} (worker {w.worker_id})"
            return self.abort_plan(reason, rank=msg.peer, reported_by=msg.rank, reported_by_worker=w.worker_id)
        return self.abort_plan(f"rank {msg.rank} failed: {msg.reason} (worker {w.worker_id})", rank=msg.rank,
                               reported_by=msg.rank, reported_by_worker=w.worker_id)

    def rebalancing_stuck(self, mono: float) -> tuple[bool, str]:
        """Whether balancing is wedged, and why: a plan in flight with no progress for longer than
        ``plan_stall_timeout_s`` (the watchdog should have aborted it: the tick loop itself is stuck),
        or ``stuck_abort_streak`` plans in a row ended aborted with no commit between them (aborting
        does not help: a rank keeps failing). A commit clears the streak.

        Args:
            mono: ``time.monotonic()`` now.
        """
        rec = self.current_plan
        if rec is not None and rec.in_flight:
            idle = mono - rec.progress_mono
            if idle > self.settings.plan_stall_timeout_s:
                return True, (f"plan {rec.plan_id} has made no progress for {idle:.0f}s "
                              f"(plan_stall_timeout_s={self.settings.plan_stall_timeout_s:g}) and is not aborted")
        streak = getattr(self.settings, "stuck_abort_streak", 3)
        if self.aborts_in_a_row >= streak:
            last = self.last_abort
            why = f"; last: plan {last.plan_id}: {last.reason}" if last is not None else ""
            return True, f"the last {self.aborts_in_a_row} plans were aborted without a commit between them{why}"
        return False, "ok"

    def _reply(self, prop: Proposal, req_id: int, rec: PlanRecord | None = None) -> RebalanceReply:
        moved = int(prop.moved_slots.sum())
        return RebalanceReply(plan_id=rec.plan_id if rec else 0, epoch=rec.epoch if rec else self.epoch,
                              pushed=rec is not None, skipped=not prop.accept, reason=prop.reason,
                              predicted_before=float(prop.before.mean()), predicted_after=float(prop.after.mean()),
                              moved_slots=moved, moved_bytes=self._moved_bytes(moved), phy2log=prop.phy2log,
                              layers=list(prop.layers), policy=prop.policy, req_id=req_id)

    def _proposal_reply(self, prop: Proposal, dry_run: bool, req_id: int,
                        what: str) -> tuple[RebalanceReply, list[Outgoing]]:
        reply = self._reply(prop, req_id)
        self.last_decision_reason = f"{what}{' (dry run)' if dry_run else ''}: {prop.reason}"
        self._decided = True
        if dry_run or not prop.accept:
            if not prop.accept:
                self.counters.plans["skipped"] += 1
            return reply, []
        rec, out = self._start_plan(prop)
        reply.plan_id, reply.epoch, reply.pushed = rec.plan_id, rec.epoch, True
        return reply, out
