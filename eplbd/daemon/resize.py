"""Elastic EP on the daemon: the ``resize`` operation and the registrations of a resized group.

``ElasticOps`` is mixed into ``DaemonState`` (it uses the state's workers, topology, placement,
window, plan records and persistence); the placement itself is planned by ``eplbd.policy.elastic``.

1. ``resize(mapping, ep_size)`` (``ResizeRequest``, ``eplbctl resize``): validates the mapping,
   drains the plan in flight, plans the new group from the placement the surviving ranks run and
   the window's logical load, and switches to it: epoch + 1, the new topology and placement, the
   window reshaped (its logical history kept), the state persisted. Every rank of the old group is
   retired: it must register again as a rank of the new group (the drained plan's ``Abort`` still
   reaches it). The reply, and ``status`` from then on, name the orphans: experts whose only copies
   were on removed ranks, which the engine must reload.
2. The ranks of the new group fetch the transition (``GetResizeRequest``), move and reload their
   experts (``eplbd.client.elastic``) and register at the new epoch with the new placement. Until
   every new rank has, a registration from before the resize (an old agent still running, a rank
   that did not apply the transition) is refused, so the old group cannot take the daemon back.

Draining: a plan in flight with no permitted layer is aborted (no rank can have applied any of it).
A permitted layer may already run on some ranks. If every surviving rank acked every permitted
layer, the survivors run the plan's truncated placement: it commits as that and the resize starts
from it. Otherwise the resize is refused (``PlanConflictError``) until the plan commits or times out:
planning from a placement the survivors may not run would leave slots with the wrong experts.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch

from eplbd.policy.elastic import ElasticPlacement, RankMapping, elastic_placement, parse_mapping
from eplbd.errors import LimitExceededError, NotFoundError, PlanConflictError, RegistrationMismatchError
from eplbd.proto import RegisterWorker, ResizeInfo, ResizeReply

log = logging.getLogger("eplbd.daemon.resize")

MAX_RECORDS = 16  # resizes kept for GetResizeRequest


@dataclass
class ResizeRecord:
    """One resize: what was asked, what it planned, what became of the plan in flight."""

    request: tuple[tuple[int, ...], int]  # (mapping, ep_size) as asked, for idempotent repeats
    placement: ElasticPlacement
    epoch: int
    base_epoch: int
    drained_plan: int = 0
    drain: str = ""
    created_at: float = dataclasses.field(default_factory=time.time)
    complete: bool = False

    @property
    def mapping(self) -> RankMapping:
        return self.placement.mapping

    def info(self, registered: list[int]) -> ResizeInfo:
        m = self.mapping
        return ResizeInfo(epoch=self.epoch, base_epoch=self.base_epoch, old_ep_size=m.old_ep_size,
                          ep_size=m.new_ep_size, mapping=list(m.new_rank), orphans=self.placement.orphans,
                          registered=registered, complete=self.complete, moved_slots=self.placement.moved_slots(),
                          reload_slots=self.placement.num_reloads, drained_plan=self.drained_plan,
                          drain=self.drain, created_at=self.created_at)

    def reply(self, registered: list[int], *, dry_run: bool = False, req_id: int = 0) -> ResizeReply:
        return ResizeReply(info=self.info(registered), phy2log=self.placement.phy2log,
                           base=self.placement.base, num_local_physical_experts=self.placement.num_local,
                           dry_run=dry_run, req_id=req_id)


@dataclass
class ResizeJob:
    """A resize's planning, taken off the event loop: ``run`` is pure (``elastic_placement`` on copies);
    ``ElasticOps.finish_resize`` applies its result on the loop if the group did not move meanwhile."""

    run: Callable[[], ElasticPlacement]
    request: tuple[tuple[int, ...], int]
    rmap: RankMapping
    base: torch.Tensor
    epoch: int


class ElasticOps:
    """The elastic-EP operations of ``DaemonState`` (see the module docstring)."""

    resizes: tuple[ResizeRecord, ...] = ()  # oldest first (the last MAX_RECORDS)

    # -- operator ------------------------------------------------------------------------
    def resize(self, mapping: list[int], ep_size: int, *, dry_run: bool, now: float,
               req_id: int = 0) -> tuple[ResizeReply, list]:
        """Resize the EP group: ``mapping[old_rank]`` = new rank or -1; ``ep_size`` 0: the survivors.

        Returns:
            ``(ResizeReply, outgoing)``: the drained plan's ``Abort`` for the retired ranks.

        Raises:
            NotReadyError: no group yet. InvalidArgumentError / PlacementError: a bad mapping or size
            (naming it). LimitExceededError: the new group exceeds ``max_ep_size``, ``max_experts`` or
            ``window_memory_bytes``. PlanConflictError: a plan in flight has permitted layers the
            surviving ranks have not all acked yet.
        """
        job = self.resize_job(mapping, ep_size, dry_run=dry_run, req_id=req_id)
        if isinstance(job, ResizeReply):
            return job, []
        return self.finish_resize(job, job.run(), dry_run=dry_run, req_id=req_id)

    def resize_job(self, mapping: list[int], ep_size: int, *, dry_run: bool,
                   req_id: int = 0) -> "ResizeJob | ResizeReply":
        """Check a resize and return its planning (for ``finish_resize``), or the reply to a repeat.
        Every bound is checked here, before the planning allocates anything of the new size."""
        self._require_group()
        last = self._last_resize()
        if last is not None and not self._resize_complete(last) and last.request == (tuple(mapping), ep_size):
            return last.reply(self._registered_since(last), dry_run=dry_run, req_id=req_id)  # a repeat
        bound = self.settings.max_ep_size
        if max(ep_size, len(mapping)) > bound:
            raise LimitExceededError(f"resize to ep_size={ep_size} with {len(mapping)} mapping entries exceeds "
                                     f"max_ep_size={bound} (a daemon setting)")
        rmap = parse_mapping(mapping, self.topo.num_gpus, ep_size or None)
        shape = {**self.group, "ep_size": rmap.new_ep_size,
                 "num_physical_experts": rmap.new_ep_size * self.topo.num_local}
        self.check_bounds(shape, f"resize {rmap.describe()}")
        base, _ = self._drain_base(rmap)
        run = partial(elastic_placement, base, rmap, self.topo.num_local, self.topo.num_logical,
                      self.window.logical_load())
        return ResizeJob(run, (tuple(mapping), ep_size), rmap, base, self.epoch)

    def finish_resize(self, job: ResizeJob, plan: ElasticPlacement, *, dry_run: bool,
                      req_id: int = 0) -> tuple[ResizeReply, list]:
        """Apply a planned resize, unless the group moved while it was planned (``PlanConflictError``)."""
        if not dry_run:
            if self.epoch != job.epoch or self.topo.num_gpus != job.rmap.old_ep_size:
                raise PlanConflictError(f"the group moved to epoch {self.epoch} while resize "
                                        f"{job.rmap.describe()} was planned from epoch {job.epoch}; retry")
            base, keep = self._drain_base(job.rmap)
            if not torch.equal(base, job.base):
                raise PlanConflictError(f"the plan in flight changed what the ranks run while resize "
                                        f"{job.rmap.describe()} was planned; retry")
        rec = ResizeRecord(job.request, plan, job.epoch + 1, job.epoch)
        if dry_run:
            return rec.reply([], dry_run=True, req_id=req_id), []
        out = self._drain(rec, keep)
        self._switch(rec)
        return rec.reply([], req_id=req_id), out

    def get_resize(self, epoch: int | None = None, req_id: int = 0) -> ResizeReply:
        """The latest resize (or the one that produced ``epoch``); ``NotFoundError`` if none."""
        recs = [r for r in self.resizes if epoch is None or r.epoch == epoch]
        if not recs:
            known = [r.epoch for r in self.resizes]
            raise NotFoundError(f"no resize produced epoch {epoch} (resizes at epochs {known})" if epoch is not None
                                else "the group has not been resized")
        return recs[-1].reply(self._registered_since(recs[-1]), req_id=req_id)

    def resize_info(self) -> ResizeInfo | None:
        """The latest resize for ``status`` (None: never resized)."""
        last = self._last_resize()
        if last is None:
            return None
        self._resize_complete(last)
        return last.info(self._registered_since(last))

    # -- registration guard ----------------------------------------------------------------
    def check_resize_registration(self, msg: RegisterWorker) -> None:
        """Refuse, while a resize waits for its new group, a rank that runs a placement from before it
        or claims the resize's epoch with another placement."""
        last = self._last_resize()
        if last is None or self._resize_complete(last):
            return
        m = last.mapping
        how = (f"the group was resized ({m.describe()}) at epoch {last.epoch}; rebuild the rank for the new "
               f"group (eplbd.client.elastic) and register with ep_size={m.new_ep_size} at epoch {last.epoch}")
        if msg.epoch < last.epoch:
            raise RegistrationMismatchError(f"rank {msg.rank} registers with ep_size={msg.ep_size} at epoch "
                                            f"{msg.epoch}, but {how}")
        if msg.epoch == last.epoch and (msg.ep_size != m.new_ep_size or not torch.equal(msg.phy2log, self.phy2log)):
            raise RegistrationMismatchError(f"rank {msg.rank} registers at epoch {msg.epoch} with ep_size="
                                            f"{msg.ep_size} and a placement other than the resize's: {how}")

    # -- internals ------------------------------------------------------------------------
    def _last_resize(self) -> ResizeRecord | None:
        recs = self.resizes
        return recs[-1] if recs else None

    def _registered_since(self, rec: ResizeRecord) -> list[int]:
        if rec is not self._last_resize():
            return list(range(rec.mapping.new_ep_size)) if rec.complete else []
        return sorted(r for r in self.workers if r < rec.mapping.new_ep_size)

    def _resize_complete(self, rec: ResizeRecord) -> bool:
        """Latched once every rank of the new group has registered (the old ones were retired)."""
        if not rec.complete and len(self._registered_since(rec)) == rec.mapping.new_ep_size:
            rec.complete = True
            log.info("resize to epoch %d complete: all %d ranks registered", rec.epoch, rec.mapping.new_ep_size)
        return rec.complete

    def _drain_base(self, rmap: RankMapping) -> tuple[torch.Tensor, list[int] | None]:
        """The placement the surviving ranks run, and the permitted layers of the plan in flight that
        they all applied (None: no plan to drain; [] : a plan to abort)."""
        rec = self.current_plan
        if rec is None or not rec.in_flight:
            return self.phy2log, None
        keep = [layer for layer in rec.layers if layer in rec.permitted]
        if not keep:
            return self.phy2log, []
        missing = [old for old in rmap.survivors if not set(keep) <= rec.acked.get(old, set())]
        if missing:
            raise PlanConflictError(
                f"plan {rec.plan_id} (epoch {rec.epoch}) is committing: layers {keep} were permitted and surviving "
                f"rank(s) {missing} have not acked them all, so their placement is not known yet; retry once the "
                f"plan commits or is aborted (plan_timeout_s={self.settings.plan_timeout_s:g})")
        base = self.placements.get(rec.base_epoch, self.phy2log).clone()
        base[keep] = rec.phy2log[keep]
        return base, keep

    def _drain(self, rec: ResizeRecord, keep: list[int] | None) -> list:
        """End the plan in flight (see ``_drain_base``); the ``Abort`` goes to every old rank."""
        plan = self.current_plan
        if keep is None:
            return []
        why = f"drained by an elastic resize ({rec.mapping.describe()})"
        rec.drained_plan = plan.plan_id
        if not keep:
            rec.drain = "aborted (no layer was permitted)"
            aborts = self.abort_plan(why, cause="resize")
            return [dataclasses.replace(o, rank=None, identity=w.identity) for o in aborts
                    for w in self.workers.values()]
        self._truncate(plan, keep)
        plan.end_reason = f"{why}: committed with the {len(keep)} layer(s) every surviving rank applied"
        rec.drain = f"committed with layers {keep} (applied on every surviving rank)"
        self._commit(plan)
        rec.epoch, rec.base_epoch = self.epoch + 1, self.epoch
        return []

    def _switch(self, rec: ResizeRecord) -> None:
        """Make the resized group the daemon's group (the old ranks are retired)."""
        m, plan = rec.mapping, rec.placement
        num_physical = m.new_ep_size * plan.num_local
        nodes = self.topo.num_nodes if m.new_ep_size % self.topo.num_nodes == 0 else 1
        self.workers = {}
        self.topo = dataclasses.replace(self.topo, num_physical=num_physical, num_gpus=m.new_ep_size, num_nodes=nodes)
        self.group = {**self.group, "ep_size": m.new_ep_size, "num_physical_experts": num_physical,
                      "num_nodes": nodes}
        self.epoch, self.phy2log = rec.epoch, plan.phy2log
        self.placements = {rec.epoch: plan.phy2log}
        self._partial = {}
        self.window.reshape_physical(num_physical, rec.epoch)
        self.resizes = (*self.resizes[-(MAX_RECORDS - 1):], rec)
        lost = {layer: o for layer, o in enumerate(plan.orphans) if o}
        self.last_decision_reason = (f"resized {m.describe()} at epoch {rec.epoch}: {plan.num_reloads} expert "
                                     f"copies to reload, waiting for the new group's ranks to register")
        self._decided = True
        self._persist()
        log.warning("resized %s at epoch %d; orphans (layer: experts to reload) %s; plan in flight: %s",
                    m.describe(), rec.epoch, lost or "none", rec.drain or "none")
