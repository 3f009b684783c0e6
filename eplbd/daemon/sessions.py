"""The ranks' side of ``DaemonState``: bounds, registration and sessions (heartbeat, release), and load
ingest with its accounting and silence watch. ``SessionOps`` is mixed into ``DaemonState``."""

from __future__ import annotations

import hmac
import logging
import secrets
from typing import Any

import torch

from eplbd.errors import (LimitExceededError, NotRegisteredError, PermissionDeniedError,
                          RegistrationMismatchError)
from eplbd.policy import validate_placement
from eplbd.proto import Heartbeat, LoadReport, RegisterWorker, Registered, Release
from eplbd.daemon.scheduler import Topology
from eplbd.daemon.state_types import GROUP_FIELDS, Outgoing, Sender, Worker
from eplbd.daemon.window import LoadWindow, ReportRejected, window_bytes

log = logging.getLogger("eplbd.daemon.state")  # one logger for all of DaemonState


_MISMATCH_TEXT = {
    "bad_session": "it does not carry the session the rank was given at registration",
    "wrong_connection": "it does not come from the connection that registered the rank",
    "wrong_key": "it does not come from the CURVE key that registered the rank",
}


def _mismatch(w: Worker, session: str, sender: Sender) -> str:
    """Why a message carrying ``session`` from ``sender`` is not ``w``'s session ("" if it is)."""
    if not session or not hmac.compare_digest(w.session, session):
        return "bad_session"
    if sender.identity is not None and sender.identity != w.identity:
        return "wrong_connection"
    if sender.user_id != w.user_id:
        return "wrong_key"
    return ""


class SessionOps:
    """Registration, sessions and load ingest of ``DaemonState`` (see the module docstring)."""

    # -- bounds -----------------------------------------------------------------------
    def check_bounds(self, shape: dict[str, int], who: str, error: type = LimitExceededError,
                     window_size: int | None = None) -> None:
        """Raise ``error`` naming the bound unless a group of ``shape`` (``GROUP_FIELDS``) fits the daemon's
        ``max_ep_size``, ``max_layers``, ``max_experts`` and ``window_memory_bytes``: checked before anything
        of that size is allocated.

        Args:
            who: what asked, for the message ("rank 3", "resize").
            window_size: the window to price (default: ``settings.window_size``).
        """
        s = self.settings
        limits = (("ep_size", "max_ep_size"), ("num_layers", "max_layers"),
                  ("num_logical_experts", "max_experts"), ("num_physical_experts", "max_experts"))
        for f, bound in limits:
            if shape[f] > getattr(s, bound, 1 << 62):
                raise error(f"{who}: {f}={shape[f]} exceeds {bound}={getattr(s, bound)} (a daemon setting)")
        w = s.window_size if window_size is None else window_size
        need = window_bytes(w, shape["num_layers"], shape["num_logical_experts"], shape["num_physical_experts"])
        budget = getattr(s, "window_memory_bytes", 1 << 62)
        if need > budget:
            raise error(f"{who}: a window of window_size={w} steps x num_layers={shape['num_layers']} x "
                        f"({shape['num_logical_experts']} logical + {shape['num_physical_experts']} physical "
                        f"experts) needs {need} bytes, more than window_memory_bytes={budget}")

    # -- registration -----------------------------------------------------------------
    def register(self, msg: RegisterWorker, sender: Sender, now: float) -> tuple[Registered, list[Outgoing]]:
        """Admit a rank; the first one defines the group, the others must match it.

        A rank whose session is alive can be registered again only by that session (same connection,
        same CURVE key, its ``session`` secret); another connection gets ``PermissionDeniedError``
        until the session timed out (``heartbeat_timeout_s``) or was released. A re-registering rank
        (a new ``worker_id``) replaces its old incarnation and aborts any plan in flight, since the new
        process holds no staged weights. Every registration gets a new session secret.
        """
        shape = {f: int(getattr(msg, f)) for f in GROUP_FIELDS}
        try:
            self.check_bounds(shape, f"rank {msg.rank}")
        except LimitExceededError:
            self.counters.refuse("RegisterWorker", "limit")
            raise
        self._check_key_binding(msg.rank, sender)
        if shape["num_physical_experts"] != shape["num_local_physical_experts"] * shape["ep_size"]:
            raise RegistrationMismatchError(
                f"rank {msg.rank}: num_physical_experts={shape['num_physical_experts']} != "
                f"num_local_physical_experts={shape['num_local_physical_experts']} x ep_size={shape['ep_size']}")
        validate_placement(msg.phy2log, msg.num_logical_experts, msg.ep_size, msg.num_layers)
        self.check_resize_registration(msg)  # elastic EP: the old group may not come back
        alive_others = [w for r, w in self.workers.items() if r != msg.rank and self.alive(w, now)]
        out: list[Outgoing] = []
        if self.topo is not None and alive_others:
            for f, v in shape.items():
                if self.group[f] != v:
                    raise RegistrationMismatchError(
                        f"rank {msg.rank} registers {f}={v} but the group has {f}={self.group[f]}")
            if msg.epoch != self.epoch or not torch.equal(msg.phy2log, self.phy2log):
                raise RegistrationMismatchError(
                    f"rank {msg.rank} is on epoch {msg.epoch} with a different placement than the group "
                    f"(epoch {self.epoch}); restart it on the group's placement")
        else:
            self._check_model(shape, msg.rank)
        self._check_rank_free(msg, sender, now)
        if not (self.topo is not None and alive_others):
            self._adopt(msg, shape)
        # Plan ids stay above any the ranks have seen, even when this daemon lost its state.
        self.next_plan_id = max(self.next_plan_id, msg.last_plan_id + 1)
        if msg.rank in self.workers and self.current_plan is not None and self.current_plan.in_flight:
            out += self.abort_plan(f"rank {msg.rank} re-registered (worker {msg.worker_id})",
                                   rank=msg.rank, cause="reregistered", reported_by=msg.rank)
        session = secrets.token_urlsafe(18)
        self.workers[msg.rank] = Worker(msg.rank, msg.worker_id, sender.identity or b"", msg.node, msg.hostname,
                                        msg.epoch, msg.expert_bytes, now, step=msg.step, user_id=sender.user_id,
                                        session=session)
        log.info("rank %d registered (worker %s%s, epoch %d, %d/%d ranks)", msg.rank, msg.worker_id,
                 f", key {sender.user_id}" if sender.user_id else "", msg.epoch, len(self.workers),
                 self.group["ep_size"])
        reply = Registered(epoch=self.epoch, daemon_id=self.daemon_id,
                           heartbeat_interval_s=self.settings.heartbeat_timeout_s / 4,
                           commit_interval_steps=self.settings.commit_interval_steps, session=session,
                           req_id=msg.req_id)
        return reply, out

    def _check_key_binding(self, rank: int, sender: Sender) -> None:
        """With ``curve_worker_ranks``, a worker key registers only the ranks bound to it."""
        if self.rank_binding is None or sender.user_id is None:
            return
        name = sender.user_id.partition(":")[2]
        allowed = self.rank_binding.get(name, frozenset())
        if rank not in allowed:
            self.counters.refuse("RegisterWorker", "key_not_bound")
            shown = ",".join(map(str, sorted(allowed)[:16])) or "none"
            raise PermissionDeniedError(f"worker key {name!r} may not register rank {rank}: curve_worker_ranks "
                                        f"binds it to ranks {shown}")

    def _check_model(self, shape: dict[str, int], rank: int) -> None:
        """The model shape (layers, logical experts) is learned from the first registration and pinned
        (in ``state.json`` too): a later group of another model is refused, not adopted."""
        if not self.group:
            return
        for f in ("num_layers", "num_logical_experts"):
            if shape[f] != self.group[f]:
                where = f" (pinned in {self.settings.state_dir}/state.json)" if getattr(
                    self.settings, "state_dir", None) else ""
                raise RegistrationMismatchError(
                    f"rank {rank} registers {f}={shape[f]} but this daemon serves a model with {f}="
                    f"{self.group[f]}{where}; a daemon serves one model: start another (or a fresh state_dir) "
                    "for this one")

    def _check_rank_free(self, msg: RegisterWorker, sender: Sender, now: float) -> None:
        """Refuse to take a rank from a live session unless that very session asks."""
        w = self.workers.get(msg.rank)
        if w is None or w.released or not self.alive(w, now):
            return
        if (w.identity == (sender.identity or b"") and w.user_id == sender.user_id
                and hmac.compare_digest(w.session, msg.session)):
            return
        self.counters.refuse("RegisterWorker", "rank_held")
        raise PermissionDeniedError(
            f"rank {msg.rank} is held by the live session of worker {w.worker_id!r} (last seen "
            f"{now - w.last_seen:.1f}s ago); another connection may register it once that session has "
            f"released it or timed out (heartbeat_timeout_s={self.settings.heartbeat_timeout_s:g})")
    def _adopt(self, msg: RegisterWorker, shape: dict[str, int]) -> None:
        """Take the group's shape and placement from a worker (workers run what they report)."""
        topo = Topology(num_layers=msg.num_layers, num_logical=msg.num_logical_experts,
                        num_physical=msg.num_physical_experts, num_gpus=msg.ep_size,
                        num_nodes=msg.num_nodes, num_groups=msg.num_groups)
        persisted = self._persisted
        if persisted is not None:
            same_shape = persisted.topology == shape
            if same_shape and persisted.epoch == msg.epoch and torch.equal(persisted.phy2log, msg.phy2log):
                log.info("workers match the persisted placement at epoch %d", msg.epoch)
            else:
                log.warning("workers report epoch %d; persisted state had epoch %d (%s): following the workers",
                            msg.epoch, persisted.epoch, "same shape" if same_shape else "other shape")
        if self.topo != topo or self.window is None:
            self.window = LoadWindow(self.settings.window_size, topo.num_layers, topo.num_logical,
                                     topo.num_physical, max_steps_ahead=self.settings.max_steps_ahead)
        self.topo, self.group = topo, shape
        self.epoch = msg.epoch
        self.phy2log = msg.phy2log.clone()
        self.placements = {self.epoch: self.phy2log}
        self.window.set_epoch(self.epoch)
        self.last_plan_step = msg.step - 1 if msg.step > 0 else -1
        self._persist()

    def alive(self, w: Worker, now: float) -> bool:
        return now - w.last_seen <= self.settings.heartbeat_timeout_s

    def all_ranks_alive(self, now: float) -> bool:
        return (self.topo is not None and len(self.workers) == self.topo.num_gpus
                and all(self.alive(w, now) for w in self.workers.values()))

    def _session(self, msg: Any, sender: Sender, now: float) -> Worker:
        """The registered rank ``msg`` speaks for, if ``sender`` is its session: same worker id, the
        session secret, the registering connection and CURVE key. Only then is the rank seen alive.

        Raises:
            NotRegisteredError: no such rank, or another incarnation (the worker registers again).
            PermissionDeniedError: the rank's registration is someone else's (counted with a reason).
        """
        kind, rank = type(msg).__name__, msg.rank
        w = self.workers.get(rank)
        # The worker id is required, not optional: an empty one matching any registration
        # would let any peer with a worker key keep a dead rank looking alive.
        if w is None or w.worker_id != msg.worker_id:
            self.counters.refuse(kind, "not_registered")
            raise NotRegisteredError(f"rank {rank} (worker {msg.worker_id!r}) is not registered")
        why = _mismatch(w, msg.session, sender)
        if why:
            self.counters.refuse(kind, why)
            raise PermissionDeniedError(f"{kind} for rank {rank} (worker {msg.worker_id!r}) refused: "
                                        f"{_MISMATCH_TEXT[why]}")
        w.last_seen = now
        return w

    def heartbeat(self, msg: Heartbeat, sender: Sender, now: float) -> None:
        w = self._session(msg, sender, now)
        w.step = max(w.step, msg.step)

    def release(self, msg: Release, sender: Sender, now: float) -> None:
        """The rank's session ends: another connection may register the rank from now on."""
        w = self._session(msg, sender, now)
        w.released = True
        log.info("rank %d: worker %s released its session", w.rank, w.worker_id)

    # -- load ingest ------------------------------------------------------------------
    def ingest(self, rep: LoadReport, now: float, user_id: str | None = None) -> bool:
        """Apply one load report; False (and a counted drop with a reason) if refused.

        Args:
            user_id: the CURVE ``User-Id`` of the report's connection (None: CURVE off).
        """
        self.counters.reports_received += 1
        w = self.workers.get(rep.rank)
        if w is None or w.worker_id != rep.worker_id:
            self.counters.drop("unknown_rank")
            log.debug("dropped report from unknown rank %d worker %s", rep.rank, rep.worker_id)
            return False
        why = _mismatch(w, rep.session, Sender(None, user_id))
        if why:
            self.counters.drop(why)
            return False
        w.last_seen = now
        if rep.seq <= w.last_seq:
            self.counters.drop("duplicate")
            return False
        if not self._add_report(rep):
            # A refused report leaves the sequence alone: a corrupt or forged seq must not make
            # the rank's next real reports look like duplicates. It is no gap either.
            w.rejected_ahead += 1
            return False
        gap = rep.seq - w.last_seq - 1 - w.rejected_ahead
        if w.last_seq >= 0 and gap > 0:
            # Reports the sender never got out (or we never got): counted, not silent.
            self.counters.drop("seq_gap", gap)
        w.last_seq, w.rejected_ahead = rep.seq, 0
        if rep.dropped_steps:
            self.counters.drop("sender_overflow_steps", rep.dropped_steps)
        w.step = max(w.step, rep.first_step + rep.load.shape[0] - 1)
        self._watch_silence(w, rep)
        return True

    def _watch_silence(self, w: Worker, rep: LoadReport) -> None:
        """Track steps with no token counted. One rank's silence is normal (an idle data-parallel rank
        runs dummy steps); every rank's, for ``silent_load_warn_steps`` steps, means the engine steps
        but its layers record nothing (vLLM's record flag reset, a router not mapping through the
        EPLB tensors): nothing to balance on, and it must not pass unnoticed."""
        steps = rep.load.shape[0]
        counted = torch.as_tensor(rep.load).reshape(steps, -1).any(1).nonzero()
        w.silent_steps = steps - 1 - int(counted[-1]) if counted.numel() else w.silent_steps + steps
        silent = self.silent_load_steps()
        limit = self.settings.silent_load_warn_steps
        if silent >= limit and not self.load_silent:
            log.warning("no rank has counted a token for %d steps while the engine steps: the load view is not "
                        "being recorded (see the engine adapter's log); balancing has nothing to go on", silent)
        elif silent < limit and self.load_silent:
            log.info("ranks count tokens again")
        self.load_silent = silent >= limit

    def silent_load_steps(self) -> int:
        """Steps (the newest ones) in which no registered rank counted a token."""
        return min((w.silent_steps for w in self.workers.values()), default=0)

    def _add_report(self, rep: LoadReport) -> bool:
        """Add ``rep``'s load to the window under its placement; False (a counted drop) if refused."""
        phy2log = self.placements.get(rep.epoch)
        key: int | tuple[int, int] = rep.epoch
        if phy2log is not None and rep.layers_applied >= 0:
            phy2log, key = self._partial_placement(rep.epoch, rep.layers_applied)
        if phy2log is None:
            self.counters.drop("unknown_epoch")
            log.info("dropped report of rank %d for unknown epoch %d (current %d)", rep.rank, rep.epoch, self.epoch)
            return False
        try:
            self.window.add(rep.first_step, rep.load, phy2log, epoch=key)
        except ReportRejected as exc:
            self.counters.drop(exc.reason)
            log.info("dropped report of rank %d: %s", rep.rank, exc)
            return False
        return True

    def _partial_placement(self, epoch: int, applied: int) -> tuple[torch.Tensor | None, tuple[int, int]]:
        """The placement ranks run while a plan of ``epoch`` is applied up to ``applied`` of its layers:
        the base placement with those rows replaced (cached per (epoch, applied))."""
        key = (epoch, applied)
        hit = self._partial.get(key)
        if hit is not None:
            return hit, key
        rec = next((r for r in self.plans.values() if r.epoch == epoch and r.state != "aborted"), None)
        base = self.placements.get(epoch - 1)
        if rec is None or base is None or applied > len(rec.layers):
            return None, key
        phy2log = base.clone()
        rows = rec.layers[:applied]
        phy2log[rows] = rec.phy2log[rows]
        self._partial = {k: v for k, v in self._partial.items() if k[0] >= epoch - 1}
        self._partial[key] = phy2log
        return phy2log, key

    def _alive_count(self, now: float) -> int:
        return sum(self.alive(w, now) for w in self.workers.values())
