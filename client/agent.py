"""PlacementAgent: what runs inside every engine rank to apply the daemon's plans.

The engine calls one method per step, ``after_step(step)``, on its own thread, after the
forward pass. Everything slow happens elsewhere:

- a background thread (``eplbd-agent-r<rank>``) owns the connection to the daemon: it
  registers (and re-registers after a daemon restart), heartbeats, receives plans,
  computes each layer's transfer schedule (``eplbd.client.schedule``), stages incoming
  experts into a bounded pool of staging layers through a communicator
  (``eplbd.client.comm``), and tells the daemon which layers are staged; on CUDA this
  staging runs on a side stream ordered against the forward stream by events
  (``eplbd.client.streams``), so it overlaps the forward pass;
- ``after_step`` hands the step's load to the ``LoadReporter`` (non-blocking) and, every
  ``commit_interval_steps`` steps, runs the in-band commit: one tiny all-reduce (MIN)
  over the EP group of ``(plan id, layers staged here and permitted by the daemon)``.
  Every rank gets the same answer, so all ranks apply the same prefix of the plan's
  layers at the same step boundary, or none do. Applying copies the staged slots into
  the live expert tensors and rewrites the placement tensors in place (no reallocation,
  so CUDA graphs captured over them stay valid); the acks go back on the agent thread.

No step ever waits for the daemon: with the daemon gone the engine keeps serving on its
last placement (load reports are dropped and counted, the agent keeps reconnecting).
A daemon that comes back without this rank (it restarted) cannot finish the plan in
flight, so the ranks settle it among themselves at a commit boundary: every rank marks
it orphaned, and once all have (and no granted staging is pending) they all apply the
layers staged and permitted everywhere and end the plan there, in the same step, then
register with the placement they run (the daemon adopts it). Plan ids only grow (a rank
registers with the highest it has seen), so a duplicated, replayed or stale plan is
recognised by its id and ignored.
A plan whose base epoch is not this rank's epoch is refused; a failed transfer is
reported to the daemon, which aborts the plan on every rank (layers it had already
permitted are still applied: see ``proto.Abort.keep_layers``).

``use_async=False`` is the blocking baseline (vLLM's synchronous EPLB): the whole
rearrangement (transfers, permission round trips, copies) runs inside one step boundary
on the engine thread.

This module holds the engine-thread side; the agent thread's methods are in ``agent_thread`` (mixed into
``PlacementAgent``), the plan state both threads share, the counters and the fault injection in ``agent_state``.
"""

from __future__ import annotations

import collections
import datetime
import logging
import threading
import time
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from eplbd.client.agent_state import AgentStats, Chaos, ThrottledReporter, _Active
from eplbd.client.agent_thread import AgentThread
from eplbd.client.comm.base import Communicator
from eplbd.client.reporter import LoadReporter
from eplbd.client.streams import StagingStream
from eplbd.client.worker import WorkerLink
from eplbd.errors import InvalidArgumentError, UnavailableError
from eplbd.proto import CurveKeys

__all__ = ["COMMUNICATORS", "AgentStats", "Chaos", "PlacementAgent", "make_communicator", "placement_check"]

log = logging.getLogger("eplbd.agent")

COMMUNICATORS = ("auto", "torch_gloo", "nixl", "torch_nccl")


def make_communicator(name: str, rank: int, world_size: int, group: Any, *, timeout_s: float = 60.0) -> Communicator:
    """``auto``: nixl if it is importable and can make an agent here, else torch_gloo. ``timeout_s`` bounds
    one transfer batch (gloo, nixl): a dead peer fails the batch instead of hanging it."""
    if name not in COMMUNICATORS:
        raise InvalidArgumentError(f"communicator {name!r} is not one of {', '.join(COMMUNICATORS)}")
    if name == "auto":
        from eplbd.client.comm.nixl import nixl_available
        name = "nixl" if nixl_available() is None else "torch_gloo"
    if name == "nixl":
        from eplbd.client.comm.nixl import NixlCommunicator
        return NixlCommunicator(rank, world_size, group, timeout_s=timeout_s)
    if name == "torch_nccl":
        from eplbd.client.comm.nccl import NcclCommunicator
        return NcclCommunicator(rank, world_size, group)
    from eplbd.client.comm.gloo import GlooCommunicator
    return GlooCommunicator(rank, world_size, group, timeout_s=timeout_s)


class PlacementAgent(AgentThread):
    """Applies the daemon's plans to one rank's model. See the module docstring.

    Args:
        model: the engine's model, with the ``MixtureOfExperts`` surface (``expert_weights``,
            ``num_moe_layers``, ``num_logical_experts``, ``num_physical_experts``,
            ``num_local_physical_experts``, ``num_redundant_experts``, ``num_expert_groups``,
            ``set_eplb_state``). The agent owns the placement tensors and the load view and
            hands them to the model with ``set_eplb_state``.
        rank, ep_size: this rank and the EP group size.
        rpc, ingest: the daemon's endpoints.
        phy2log: ``[layers, num_physical]`` placement the model's weights are in now (epoch ``epoch``).
        commit_interval_steps: the commit cadence; must be the same on every rank.
        communicator: ``auto``, ``torch_gloo``, ``nixl`` or ``torch_nccl``.
        use_async: stage on the background thread (default) or block inside one step boundary.
        staging_budget_bytes: memory for staging layers (at least one layer is always allocated);
            None: two layers.
        staging_buffers: layer buffers the engine already owns (each shaped like
            ``expert_weights[0]``), used first: the budget counts them, so only the rest is allocated.
            vLLM's adapter hands over vLLM's own EPLB buffer, which vLLM counted before sizing its KV cache.
        chaos: fault injection for tests.
        collective_timeout_s: bound on the agent's collectives (the in-band commit all-reduce, one
            transfer batch): a dead peer makes them fail within it instead of hanging the rank.
        report_max_pending_steps: the reporter's bound on steps waiting to be sent (``LoadReporter``).
        curve: a worker key pair and the daemon's public key, for a daemon with CURVE on
            (``CurveKeys.from_files(...)``); used by the link and the reporter. None: the key files
            named by ``$EPLBD_CURVE_CLIENT_KEY`` / ``$EPLBD_CURVE_SERVER_KEY`` if set, else no CURVE.

    Must be constructed on every rank of the EP group in the same order (it creates two
    gloo process groups: one for transfers, one for the commit all-reduce).
    """

    def __init__(self, model: Any, *, rank: int, ep_size: int, rpc: str, ingest: str, phy2log: torch.Tensor,
                 epoch: int = 0, commit_interval_steps: int = 16, communicator: str = "auto",
                 use_async: bool = True, staging_budget_bytes: int | None = None, node: int = 0,
                 num_nodes: int = 1, heartbeat_s: float = 1.0, timeout: float = 5.0,
                 report_batch_steps: int = 8, chaos: Chaos | None = None, curve: CurveKeys | None = None,
                 collective_timeout_s: float = 60.0, report_max_pending_steps: int = 1024,
                 staging_buffers: Sequence[Sequence[torch.Tensor]] = ()) -> None:
        if commit_interval_steps <= 0:
            raise InvalidArgumentError(f"commit_interval_steps must be positive, got {commit_interval_steps}")
        if use_async and communicator == "torch_nccl":
            raise InvalidArgumentError("communicator 'torch_nccl' cannot be used with use_async=True "
                                       "(as in vLLM: NCCL calls from a second thread can deadlock)")
        self.model, self.rank, self.ep_size = model, rank, ep_size
        self.use_async, self.commit_interval = use_async, commit_interval_steps
        self.chaos = chaos or Chaos()
        self.heartbeat_s = heartbeat_s
        L, P = model.num_moe_layers, model.num_physical_experts
        E, R = model.num_logical_experts, model.num_redundant_experts
        if tuple(phy2log.shape) != (L, P):
            raise InvalidArgumentError(f"phy2log shape {tuple(phy2log.shape)} is not [{L}, {P}]")
        self.num_local = model.num_local_physical_experts
        device = model.expert_weights[0][0].device
        self.phy2log = phy2log.to(device=device, dtype=torch.int64).clone()
        self.log2phy = torch.full((L, E, R + 1), -1, dtype=torch.int64, device=device)
        self.logcnt = torch.zeros((L, E), dtype=torch.int64, device=device)
        for layer in range(L):
            self._derive(layer)
        self.load_view = torch.zeros((L, P), dtype=torch.int64, device=device)
        model.set_eplb_state(self.load_view, self.log2phy, self.logcnt)
        self.epoch = epoch
        self.tag = (epoch, -1)
        self.stats = AgentStats()

        live = model.expert_weights
        layer_bytes = sum(t.nbytes for t in live[0])
        nbuf = 2 if staging_budget_bytes is None else max(1, staging_budget_bytes // max(layer_bytes, 1))
        nbuf = min(nbuf, L)
        owned = [list(b) for b in staging_buffers if _same_layout(b, live[0])][:nbuf]
        self.staging = owned + [[torch.empty_like(t) for t in live[0]] for _ in range(nbuf - len(owned))]
        self.staging_allocated_bytes = (nbuf - len(owned)) * layer_bytes
        self._free = list(range(nbuf))
        self._streams = StagingStream(device)
        group_timeout = datetime.timedelta(seconds=collective_timeout_s)
        self._xfer_group = dist.new_group(backend="gloo", timeout=group_timeout)
        self._ctl_group = dist.new_group(backend="gloo", timeout=group_timeout)
        self.comm = make_communicator(communicator, rank, ep_size, self._xfer_group, timeout_s=collective_timeout_s)
        self.comm.setup(live, self.staging)
        self.communicator = self.comm.name

        curve = curve if curve is not None else CurveKeys.from_env()
        self.link = WorkerLink(rpc, ingest, rank, timeout=timeout, curve=curve)
        reporter_args = dict(num_layers=L, num_physical=P, batch_steps=report_batch_steps,
                             max_pending_steps=report_max_pending_steps, curve=curve)
        self.reporter = ThrottledReporter(ingest, rank, delay_s=self.chaos.report_delay_s, **reporter_args) \
            if self.chaos.report_delay_s > 0 else LoadReporter(ingest, rank, **reporter_args)
        self._reg_args = dict(ep_size=ep_size, num_layers=L, num_logical=E, num_physical=P,
                              num_groups=model.num_expert_groups, num_nodes=num_nodes, node=node,
                              expert_bytes=layer_bytes // self.num_local, communicator=self.comm.name)
        self._lock = threading.Lock()
        self._active: _Active | None = None
        self._outbox: collections.deque[Callable[[], None]] = collections.deque()
        self._registered = False
        self._max_plan_id = 0  # the highest plan id seen: a plan not above it is stale or a duplicate
        self._step = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"eplbd-agent-r{rank}", daemon=True)

    # -- engine thread ----------------------------------------------------------------------
    def start(self) -> "PlacementAgent":
        self._thread.start()
        return self

    @property
    def plan_in_flight(self) -> int | None:
        """The id of the plan this rank is staging or applying (None: none)."""
        a = self._active
        return None if a is None else a.plan.plan_id

    def after_step(self, step: int) -> None:
        """Call after every forward pass, on every rank, with the same step numbers."""
        self._step = step
        self.reporter.record(step, self.load_view, self.tag)
        if (step + 1) % self.commit_interval:
            return
        if self.use_async:
            self._cadence(step)
        else:
            self._blocking_rearrange(step)

    def _cadence(self, step: int) -> tuple[int, int]:
        """The in-band agreement, at a commit boundary, on every rank.

        One all-reduce (MIN) over the EP group of ``(-plan, plan, ready, can_start, -flag, close)``:
        ``ready`` = layers staged here and permitted by the daemon, ``can_start`` = layers this
        rank has staging memory for, ``flag`` = a transfer failed, the daemon aborted, or the plan
        is orphaned, ``close`` = the plan is orphaned and idle here. Every rank gets the same
        result, so every rank applies the same layers and starts staging the same next layers
        (no rank ever waits for a peer that will not come), and ends an orphaned plan at the
        same boundary. Runs under the agent's lock, so an abort arriving meanwhile sees the grant.

        Returns:
            (layers applied, layers granted).

        Raises:
            UnavailableError: the all-reduce failed or timed out (a peer died): nothing was applied.
        """
        with self._lock:
            a = self._active
            if a is None:
                vec = [1, -1, 0, 0, 0, 1]
            else:
                # Granted layers whose staging has not taken its buffer yet will take one.
                free = len(self._free) - (a.granted - a.claimed)
                can = 0 if a.flagged else max(0, min(free, len(a.layers) - a.granted))
                vec = [-a.plan.plan_id, a.plan.plan_id, a.ready(), can, -int(a.flagged), int(a.closable)]
            t = torch.tensor(vec, dtype=torch.int64)
            try:
                dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self._ctl_group)
            except RuntimeError as exc:  # a peer died or the group timed out: nothing is applied here
                raise self._group_broken(a, exc) from None
            neg_max, low, n, grant, neg_flag, close = (int(x) for x in t)
            if a is None:
                return 0, 0
            if low != -neg_max or low != a.plan.plan_id:
                # Not every rank holds this plan, so none can apply any of it any more.
                if a.closable:
                    self._close(a)
                return 0, 0
            done: list[int] = []
            if n > a.applied:
                t0 = time.perf_counter()
                done = self._apply(a, n)
                self.stats.apply_s.append(time.perf_counter() - t0)
                self._outbox.append(lambda: self.link.ack(a.plan.plan_id, a.plan.epoch, done, step + 1))
                if a.applied == len(a.layers):
                    self._finish(a)
                else:
                    self.tag = (a.plan.epoch, a.applied)
            if close and self._active is a:
                self._close(a)
            if neg_flag == 0 and grant > 0:
                a.granted += grant
            else:
                grant = 0
        return len(done), grant

    def _group_broken(self, a: _Active | None, exc: Exception) -> UnavailableError:
        """The commit all-reduce failed: flag the plan (the daemon hears of it) and say so to the engine."""
        reason = f"rank {self.rank}: the in-band commit agreement failed (a peer died or timed out): {exc}"
        if a is not None and not a.flagged:
            a.failed = reason
            self._outbox.append(lambda: self.link.abort(a.plan.plan_id, a.plan.epoch, reason))
        log.error("%s", reason)
        return UnavailableError(reason)

    def _close(self, a: _Active) -> None:
        """Under the lock, on every rank at the same boundary: end an orphaned plan where it stands.
        With layers applied it ends as a plan of those layers (epoch advances, like a truncating
        abort); with none it is dropped and the rank stays on its placement."""
        self.stats.plans_orphaned += 1
        log.warning("rank %d: plan %d orphaned (%s); ending it with %d of its layers applied",
                    self.rank, a.plan.plan_id, a.orphaned, a.applied)
        if a.applied:
            a.layers = a.layers[:a.applied]
            self._release_unneeded(a)
            self._finish(a)
        else:
            a.aborted = True
            self._release_unneeded(a)

    def _apply(self, a: _Active, n: int) -> list[int]:
        """Copy staged layers ``a.applied..n-1`` into the live slots and the placement tensors."""
        live = self.model.expert_weights
        done = []
        for i in range(a.applied, n):
            layer, buf, sched = a.layers[i], a.buffers.pop(i), a.schedules[i]
            self._streams.before_apply(a.events.pop(i, None))
            for j in sched.changed[self.rank]:
                for t, s in zip(live[layer], self.staging[buf]):
                    t[j].copy_(s[j])
            self.phy2log[layer].copy_(a.rows[layer])
            self._derive(layer)
            model_p2l = getattr(self.model, "phy2log", None)  # an engine that keeps its own copy
            if isinstance(model_p2l, torch.Tensor) and model_p2l.shape == self.phy2log.shape:
                model_p2l[layer].copy_(self.phy2log[layer])
            self._free.append(buf)
            self.stats.slots_changed += len(sched.changed[self.rank])
            self.stats.applied.append([a.plan.plan_id, layer])
            done.append(layer)
        self._streams.after_apply()
        a.applied = n
        self.stats.layers_applied += len(done)
        return done

    def _derive(self, layer: int) -> None:
        """log2phy / logcnt of ``layer`` from phy2log, in place."""
        row = self.phy2log[layer]
        E, width = self.logcnt.shape[1], self.log2phy.shape[2]
        order = torch.argsort(row, stable=True)
        counts = torch.bincount(row, minlength=E)
        starts = torch.cumsum(counts, 0) - counts
        rank_in = torch.arange(row.numel(), device=row.device) - starts[row[order]]
        table = torch.full((E, width), -1, dtype=torch.int64, device=row.device)
        table[row[order], rank_in] = order
        self.log2phy[layer].copy_(table)
        self.logcnt[layer].copy_(counts)

    def _finish(self, a: _Active) -> None:
        self.epoch = a.plan.epoch
        self.tag = (self.epoch, -1)
        self._active = None
        self.stats.plans_committed += 1
        self.stats.applied_plans.append(a.plan.plan_id)
        self.reporter.flush()
        log.info("rank %d: plan %d applied, epoch %d", self.rank, a.plan.plan_id, self.epoch)

    def _blocking_rearrange(self, step: int) -> None:
        """Blocking mode: stage, get permission and apply inside this step boundary, in rounds of
        as many layers as the staging pool holds; every round ends with the in-band agreement, so
        all ranks run the same number of rounds."""
        with self._lock:
            timeout = self._active.plan.timeout_s if self._active is not None else 0.0
        deadline = time.monotonic() + (timeout or 60.0)
        applied, granted = self._cadence(step)
        while applied or granted:
            with self._lock:
                a = self._active
            if a is None:
                return
            self._stage_granted(a)
            while True:  # the daemon's permission arrives on the agent thread
                with self._lock:
                    if (a.flagged or a.ready() > a.applied or a.staged <= a.applied
                            or time.monotonic() > deadline):
                        break
                time.sleep(0.0005)
            applied, granted = self._cadence(step)

    # -- lifecycle ---------------------------------------------------------------------------
    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)
        self.reporter.close()
        if self._registered:
            self.link.release()  # a restarted rank may then register at once
        self.link.close()
        self.comm.close()


def _same_layout(buffer: Sequence[torch.Tensor], layer: Sequence[torch.Tensor]) -> bool:
    """Whether ``buffer`` can stage ``layer``: the same tensors' shapes, dtypes and device, in order."""
    return len(buffer) == len(layer) and all(
        (b.shape, b.dtype, b.device) == (t.shape, t.dtype, t.device) for b, t in zip(buffer, layer))


def placement_check(weights: Sequence[Sequence[torch.Tensor]], originals: Sequence[Sequence[torch.Tensor]],
                    phy2log: torch.Tensor, rank: int, num_local: int) -> list[str]:
    """Slots whose tensors are not the originals of the logical expert phy2log names (empty: all right).

    ``originals[layer][t]`` is ``[num_logical, ...]``; ``weights[layer][t]`` is this rank's ``[num_local, ...]``.
    """
    bad = []
    for layer, (live, orig) in enumerate(zip(weights, originals)):
        for j in range(num_local):
            e = int(phy2log[layer, rank * num_local + j])
            for k, (w, o) in enumerate(zip(live, orig)):
                if not torch.equal(w[j], o[e]):
                    bad.append(f"layer {layer} slot {rank * num_local + j} tensor {k}: not expert {e}")
    return bad
