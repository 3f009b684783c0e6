"""The daemon's state and every operation on it, without sockets.

``DaemonState`` takes decoded messages and returns what to send: the I/O shell
(``eplbd.daemon.server``) routes ``Outgoing`` items to ranks by their registered
identity. Tests drive it directly with made-up times.
"""

from __future__ import annotations

import hmac
import logging
import pathlib
import secrets
import time
import uuid
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Sequence

import torch

from eplbd.errors import (ConfigError, InvalidArgumentError, LimitExceededError, NotFoundError, NotReadyError,
                          NotRegisteredError, PermissionDeniedError, PlacementError, PlanConflictError,
                          RegistrationMismatchError)
from eplbd.daemon.plans import PersistedState, PlanRecord, load_state, read_placement_file, save_state
from eplbd.policy import (get_policy, moved_slots, observed_balancedness, predicted_balancedness, rank_loads,
                          spread_logical_load, summarize, validate_placement)
from eplbd.proto import (Abort, AbortInfo, Ack, BalancednessReply, BalanceStats, Commit, Heartbeat, LayerReady,
                         LoadReport, Plan, RebalanceReply, RegisterWorker, Registered, Release, StatusReply,
                         WorkerInfo)
from eplbd.daemon.resize import ElasticOps
from eplbd.daemon.scheduler import Proposal, SchedulerState, Topology, check_layers, decide, propose
from eplbd.offline.trace import save_trace
from eplbd.daemon.window import LoadWindow, ReportRejected, window_bytes

log = logging.getLogger("eplbd.daemon.state")

# Fields every rank of one EP group must agree on at registration.
_GROUP_FIELDS = ("ep_size", "num_layers", "num_logical_experts", "num_physical_experts",
                 "num_local_physical_experts", "num_groups", "num_nodes")


@dataclass(frozen=True)
class Sender:
    """Who sent a message, as the transport tells it (not as the message claims).

    Attributes:
        identity: the ROUTER routing identity of the connection; None on the ingest socket,
            whose messages carry none.
        user_id: the CURVE ``User-Id`` of the connection (``"worker:NAME"``); None with CURVE off.
    """

    identity: bytes | None = None
    user_id: str | None = None


@dataclass
class Worker:
    """A registered rank: one session, bound to the connection (and CURVE key) that registered it
    and to ``session``, the secret its later messages must carry."""

    rank: int
    worker_id: str
    identity: bytes
    node: int
    hostname: str
    epoch: int
    expert_bytes: int
    last_seen: float
    last_seq: int = -1
    step: int = 0
    rejected_ahead: int = 0  # reports refused since the last applied one (their seqs are not gaps)
    silent_steps: int = 0  # newest steps in a row whose report counted no token in any layer
    user_id: str | None = None
    session: str = ""
    released: bool = False  # the rank said its session ends (Release): another connection may register it


@dataclass
class Outgoing:
    """A message for one rank (``rank``) or for every registered rank (``rank is None``); with
    ``identity``, for that one connection instead (a rank retired by an elastic resize)."""

    msg: Any
    rank: int | None = None
    identity: bytes | None = None


@dataclass
class PlanJob:
    """A policy run taken off the event loop: ``run`` is pure (it reads only its own copies and the
    placement tensor, which the state replaces but never changes in place), so it may run in an
    executor while the loop keeps serving; ``finish`` then applies the result on the loop.

    Attributes:
        run: computes the ``Proposal``.
        epoch: the epoch it planned from; ``finish`` refuses a result the group has moved past.
        what: why it runs: the scheduler's reason, or "operator rebalance".
        phy2log: the placement it planned from.
        scheduled: the scheduler's own re-plan (not an operator's request).
    """

    run: Callable[[], Proposal]
    epoch: int
    what: str
    phy2log: torch.Tensor
    scheduled: bool = False


@dataclass
class Counters:
    reports_received: int = 0
    reports_dropped: int = 0
    drop_reasons: dict[str, int] = field(default_factory=dict)
    plans: dict[str, int] = field(default_factory=lambda: {"committed": 0, "aborted": 0, "skipped": 0})
    # Abort actions by cause (ABORT_CAUSES); a truncating abort counts too, though its plan then commits.
    aborts: dict[str, int] = field(default_factory=dict)
    # RPC messages naming a rank that were refused: (message type, REFUSAL_REASONS) -> count.
    refused: dict[tuple[str, str], int] = field(default_factory=dict)

    def drop(self, reason: str, n: int = 1) -> None:
        self.reports_dropped += n
        self.drop_reasons[reason] = self.drop_reasons.get(reason, 0) + n

    def refuse(self, message: str, reason: str) -> None:
        key = (message, reason)
        self.refused[key] = self.refused.get(key, 0) + 1


# Why a worker message naming a rank was refused (label of eplbd_worker_messages_refused_total; load
# reports count the same reasons as drops): ``not_registered`` (no such rank, or another incarnation's
# worker id), ``bad_session`` (not the secret the registration was given), ``wrong_connection`` (not the
# connection that registered), ``wrong_key`` (not the CURVE key that registered), ``rank_held`` (a
# registration of a rank whose session is alive, from another connection), ``key_not_bound`` (a CURVE key
# that ``curve_worker_ranks`` does not bind to that rank), ``limit`` (a shape beyond the daemon's bounds).
REFUSAL_REASONS = ("not_registered", "bad_session", "wrong_connection", "wrong_key", "rank_held",
                   "key_not_bound", "limit")


# Why a plan was aborted: the label of eplbd_plans_aborted_total and AbortInfo.cause.
# ``resize`` (an operator's elastic resize drains the plan) is not a failure: it does not count
# towards ``stuck_abort_streak``.
ABORT_CAUSES = ("timeout", "stalled", "rank_dead", "rank_failed", "reregistered", "resize")


def operator_path(path: str, verb: str) -> pathlib.Path:
    """A path an operator named on the daemon's host, checked before any syscall sees it.

    Raises:
        InvalidArgumentError: not absolute (it would resolve against wherever the daemon was
            started), a NUL byte, or longer than the system allows.
    """
    shown = f"{path[:200]!r}{'...' if len(path) > 200 else ''}"
    if "\x00" in path or not pathlib.Path(path).is_absolute():
        raise InvalidArgumentError(f"cannot {verb} {shown}: give an absolute path on the daemon's host")
    if len(path.encode(errors="surrogateescape")) >= 4096 or any(len(part) > 255 for part in path.split("/")):
        raise InvalidArgumentError(f"cannot {verb} {shown}: the path or one of its names is too long")
    return pathlib.Path(path)


MAX_PLANS_KEPT = 64  # plan records kept for `eplbctl plan` (each holds a full phy2log)
MAX_PLACEMENT_FILE_BYTES = 64 << 20  # DeepSeek-V3's placement is ~0.1 MB of JSON


def _placement_path(path: str) -> pathlib.Path:
    """``operator_path`` for a placement file, refused unread when it is larger than any placement."""
    p = operator_path(path, "read")
    try:
        size = p.stat().st_size
    except OSError:
        return p  # missing or unreadable: read_placement_file names what is wrong
    if size > MAX_PLACEMENT_FILE_BYTES:
        raise PlacementError(f"placement file {path!r} has {size} bytes, more than the "
                             f"{MAX_PLACEMENT_FILE_BYTES} any placement needs")
    return p


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


def _stats(s) -> BalanceStats:
    return BalanceStats(min=s.min, p50=s.p50, p90=s.p90, mean=s.mean, aggregate=s.aggregate)


class DaemonState(ElasticOps):
    """Everything the daemon knows. ``settings`` is a ``DaemonSettings`` (or an ``EplbConfig``
    carrying the daemon fields used here); it may be replaced at run time by ``set_settings``."""

    def __init__(self, settings, *, daemon_id: str | None = None) -> None:
        self.settings = settings
        # Ranks each CURVE worker key may register (key name -> ranks); None: not bound.
        self.rank_binding: dict[str, frozenset[int]] | None = None
        self.daemon_id = daemon_id or f"eplbd-{uuid.uuid4().hex[:8]}"
        self.started = time.time()
        self.topo: Topology | None = None
        self.group: dict[str, int] = {}
        self.workers: dict[int, Worker] = {}
        self.epoch = 0
        self.phy2log: torch.Tensor | None = None
        self.placements: dict[int, torch.Tensor] = {}  # epoch -> phy2log, recent epochs only
        self._partial: dict[tuple[int, int], torch.Tensor] = {}  # (plan epoch, layers applied) -> phy2log
        self.window: LoadWindow | None = None
        self.plans: dict[int, PlanRecord] = {}
        self.current_plan: PlanRecord | None = None
        self.next_plan_id = 1
        self.paused = False
        self.last_plan_step = -1
        self.last_decision_reason = "no workers registered yet"
        self._decided = False
        self.last_commit_time: float | None = None
        self.last_abort: AbortInfo | None = None
        self.aborts_in_a_row = 0  # plans ended aborted since the last commit
        self.load_silent = False  # every rank's newest silent_load_warn_steps steps counted no token
        self.counters = Counters()
        self._persisted: PersistedState | None = None
        if getattr(settings, "state_dir", None):
            self._persisted = load_state(settings.state_dir)
            if self._persisted is not None:
                self._restore(self._persisted)
                log.info("restored epoch %d from %s", self.epoch, settings.state_dir)

    def _restore(self, p: PersistedState) -> None:
        """Serve the persisted placement until workers register (they then confirm or override it)."""
        self.epoch, self.next_plan_id = p.epoch, p.next_plan_id
        self.last_commit_time = p.last_commit_at
        try:
            g = {f: int(p.topology[f]) for f in _GROUP_FIELDS}
        except (KeyError, TypeError, ValueError):
            return
        self.check_bounds(g, f"the state file in {self.settings.state_dir!r}", ConfigError)
        self.group = g
        self.topo = Topology(num_layers=g["num_layers"], num_logical=g["num_logical_experts"],
                             num_physical=g["num_physical_experts"], num_gpus=g["ep_size"],
                             num_nodes=g["num_nodes"], num_groups=g["num_groups"])
        self.phy2log = p.phy2log
        self.placements = {self.epoch: self.phy2log}
        self.window = LoadWindow(self.settings.window_size, self.topo.num_layers, self.topo.num_logical,
                                 self.topo.num_physical, max_steps_ahead=self.settings.max_steps_ahead)
        self.window.set_epoch(self.epoch)

    # -- bounds -----------------------------------------------------------------------
    def check_bounds(self, shape: dict[str, int], who: str, error: type = LimitExceededError,
                     window_size: int | None = None) -> None:
        """Raise ``error`` naming the bound unless a group of ``shape`` (``_GROUP_FIELDS``) fits the daemon's
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
        shape = {f: int(getattr(msg, f)) for f in _GROUP_FIELDS}
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

    def _alive_count(self, now: float) -> int:
        return sum(self.alive(w, now) for w in self.workers.values())

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

    # -- operator operations ----------------------------------------------------------
    def _require_group(self) -> None:
        if self.topo is None or self.window is None:
            raise NotReadyError("no workers have registered yet")

    def status(self, now: float) -> StatusReply:
        workers = [WorkerInfo(rank=w.rank, worker_id=w.worker_id, alive=self.alive(w, now),
                              last_seen_s=now - w.last_seen, node=w.node, epoch=w.epoch, hostname=w.hostname)
                   for w in sorted(self.workers.values(), key=lambda w: w.rank)]
        st = self.scheduler_state()
        stuck, why = self.rebalancing_stuck(time.monotonic())
        why = why if stuck else ""
        nxt = (st.last_plan_step if st.last_plan_step >= 0 else -1) + self.settings.step_interval
        return StatusReply(epoch=self.epoch, step=st.step, paused=self.paused, workers=workers,
                           window_fill=st.window_fill, window_size=self.settings.window_size,
                           current_plan=self.current_plan.info() if self.current_plan else None,
                           last_decision_reason=self.last_decision_reason,
                           reports_received=self.counters.reports_received,
                           reports_dropped=self.counters.reports_dropped,
                           drop_reasons=dict(self.counters.drop_reasons), daemon_id=self.daemon_id,
                           ep_size=self.topo.num_gpus if self.topo else 0, policy=self.settings.policy,
                           next_rebalance_step=nxt, uptime_s=time.time() - self.started,
                           last_commit_at=self.last_commit_time or 0.0, last_abort=self.last_abort,
                           aborts_in_a_row=self.aborts_in_a_row, rebalancing_stuck=stuck, stuck_reason=why,
                           resize=self.resize_info(), silent_load_steps=self.silent_load_steps(),
                           load_silent=self.load_silent,
                           messages_refused={f"{m}:{r}": n for (m, r), n in self.counters.refused.items()})

    def balancedness(self, per_layer: bool = False, per_rank: bool = False) -> BalancednessReply:
        self._require_group()
        snap = self.window.snapshot()
        g = self.topo.num_gpus
        obs_rank = rank_loads(torch.from_numpy(snap.physical), g)
        obs = observed_balancedness(torch.from_numpy(snap.physical), g)
        pred = predicted_balancedness(torch.from_numpy(snap.logical), self.phy2log, g)
        pred_rank = rank_loads(spread_logical_load(torch.from_numpy(snap.logical), self.phy2log), g)
        return BalancednessReply(
            observed=_stats(summarize(obs, obs_rank)), predicted=_stats(summarize(pred, pred_rank)),
            per_layer_observed=obs.tolist() if per_layer else None,
            per_layer_predicted=pred.tolist() if per_layer else None,
            per_rank_load=obs_rank.to(torch.float64) if per_rank else None,
            epoch=self.epoch, window_fill=snap.steps)

    def rebalance(self, *, dry_run: bool, layers: list[int] | None, policy: str | None, force: bool,
                  now: float, req_id: int = 0) -> tuple[RebalanceReply, list[Outgoing]]:
        job = self.rebalance_job(dry_run=dry_run, layers=layers, policy=policy, force=force, now=now)
        return self.finish_plan(job, job.run(), now=now, dry_run=dry_run, req_id=req_id)

    def rebalance_job(self, *, dry_run: bool, layers: list[int] | None, policy: str | None, force: bool,
                      now: float) -> PlanJob:
        """Check an operator's rebalance and return its policy run (for ``finish_plan``)."""
        self._require_group()
        if self.window.fill == 0:
            raise NotReadyError("the load window is empty: no load reports received yet")
        if not dry_run:
            self._check_can_start(now)
        if policy is not None:
            get_policy(policy)  # PolicyError naming the bad name and the available ones
        if layers is not None:
            check_layers(layers, self.topo)  # here, not in the executor: a bad request is answered at once
        return self._plan_job("operator rebalance", policy=policy, layers=layers, force=force,
                              expert_bytes=self._moved_bytes(1))

    def _check_can_start(self, now: float) -> None:
        """An operator's plan may start only with no plan in flight and every rank alive."""
        rec = self.current_plan
        if rec is not None and rec.in_flight:
            raise PlanConflictError(f"cannot start a plan now: plan {rec.plan_id} (epoch {rec.epoch}) is {rec.state}")
        if not self.all_ranks_alive(now):
            raise NotReadyError(f"only {self._alive_count(now)}/{self.topo.num_gpus} ranks are alive")

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

    def load_placement(self, path: str, *, dry_run: bool, now: float, req_id: int = 0,
                       moe_layers: Sequence[int] = (), num_hidden_layers: int = 0):
        self._require_group()
        new = read_placement_file(_placement_path(path))
        if moe_layers:  # a row per decoder layer (SGLang's): keep the MoE layers' rows
            from eplbd.integrations.sglang import LayerAxis

            axis = LayerAxis(num_hidden_layers or max(moe_layers) + 1, tuple(moe_layers), "moe_layers")
            new = axis.moe_placement(new, where=f"placement file {path!r}")
        want = (self.topo.num_layers, self.topo.num_physical)
        if tuple(new.shape) != want:
            raise InvalidArgumentError(f"placement in {path!r} has shape {list(new.shape)}, the group needs {list(want)}")
        validate_placement(new, self.topo.num_logical, self.topo.num_gpus, self.topo.num_layers)
        if not dry_run:
            self._check_can_start(now)
        load = torch.from_numpy(self.window.logical_load())
        before = predicted_balancedness(load, self.phy2log, self.topo.num_gpus).numpy()
        after = predicted_balancedness(load, new, self.topo.num_gpus).numpy()
        changed = [l for l in range(self.topo.num_layers) if not torch.equal(new[l], self.phy2log[l])]
        prop = Proposal(new, changed, before, after, moved_slots(self.phy2log, new, self.topo.num_gpus).numpy(),
                        bool(changed), f"placement loaded from {path}" if changed else
                        f"placement in {path} equals the current one", "file")
        return self._proposal_reply(prop, dry_run, req_id, "load placement")

    def get_plan(self, epoch: int | None, plan_id: int | None) -> PlanRecord:
        if plan_id is not None:
            rec = self.plans.get(plan_id)
        elif epoch is not None:
            rec = next((p for p in reversed(self.plans.values()) if p.epoch == epoch), None)
        else:
            rec = next(reversed(self.plans.values()), None) if self.plans else None
        if rec is None:
            raise NotFoundError(f"no plan with epoch={epoch} plan_id={plan_id} (plans: {sorted(self.plans)})")
        return rec

    def get_placement(self, epoch: int | None) -> torch.Tensor:
        self._require_group()
        e = self.epoch if epoch is None else epoch
        p = self.placements.get(e)
        if p is None or (e > self.epoch):
            raise NotFoundError(f"no placement for epoch {e} (current epoch {self.epoch})")
        return p

    def dump_window(self, path: str) -> tuple[str, int]:
        """Write the window as a trace file; returns ``(path written, steps)``."""
        real, write = self.dump_window_job(path)
        return real, write()

    def dump_window_job(self, path: str) -> tuple[str, Callable[[], int]]:
        """Check ``path`` and copy the window; returns the path that will be written (``.npz`` appended
        when missing, as numpy does) and the write itself (compression: for an executor)."""
        self._require_group()
        p = operator_path(path, "write")
        if p.suffix != ".npz":
            p = p.with_name(p.name + ".npz")
        if not p.parent.is_dir():
            raise InvalidArgumentError(f"cannot write {str(p)!r}: directory {str(p.parent)!r} does not exist")
        if p.is_dir():
            raise InvalidArgumentError(f"cannot write {str(p)!r}: it is a directory")
        steps, load = self.window.steps_logical()
        meta = {"source": "eplbd dump", "daemon_id": self.daemon_id, "epoch": self.epoch,
                "ep_size": self.topo.num_gpus}

        def write() -> int:
            try:
                save_trace(p, load, steps=steps, meta=meta)
            except OSError as exc:  # permissions, a full disk: the operator's problem to fix, not a daemon bug
                raise InvalidArgumentError(f"cannot write {str(p)!r}: {exc.strerror or exc}") from None
            return int(steps.size)

        return str(p), write

    def set_settings(self, settings) -> None:
        """Take new settings; a ``window_size`` the window's memory budget cannot hold is refused
        (``LimitExceededError``) before anything changes."""
        old = self.settings
        if self.window is not None and settings.window_size != old.window_size:
            self.settings = settings
            try:
                self.check_bounds(self.group, f"window_size={settings.window_size}")
            except LimitExceededError:
                self.settings = old
                raise
            self._resize_window(settings.window_size)
        self.settings = settings

    def _resize_window(self, size: int) -> None:
        steps, load = self.window.steps_logical()
        snap_epoch = self.window.epoch
        win = LoadWindow(size, self.topo.num_layers, self.topo.num_logical, self.topo.num_physical,
                         max_steps_ahead=self.settings.max_steps_ahead)
        win.set_epoch(snap_epoch)
        for s, row in zip(steps[-size:], load[-size:]):
            win.add_logical(int(s), row)
        self.window = win

    # -- persistence ------------------------------------------------------------------
    def _persist(self) -> None:
        if not getattr(self.settings, "state_dir", None) or self.phy2log is None:
            return
        try:
            save_state(self.settings.state_dir, PersistedState(self.epoch, self.phy2log, dict(self.group),
                                                               self.next_plan_id, self.last_commit_time))
        except OSError as exc:  # a full disk must not take the daemon down
            log.error("cannot write state to %s: %s", self.settings.state_dir, exc)
