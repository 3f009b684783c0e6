"""``nixl``: one-sided RDMA-style READs of expert slots through NIXL (UCX backend).

Every rank registers its live and staging tensors with its own NIXL agent once, in
``setup``; the agents' metadata and the layout of every rank's live tensors are then
exchanged over the (gloo) EP group, which is used for nothing else. A batch is run by
the destination alone: it READs the source's live slots straight into its staging
slots, so the source's CPU and GPU stay out of the data path (with cma on one host,
or RDMA reads across hosts).

Why the NIXL bindings are driven directly instead of ``nixl._api.nixl_agent``: that
wrapper hard-codes the agent's progress-thread delay to 0, which makes the UCX
progress thread poll without pause and burn most of a core per rank for the whole
life of the engine. A positive delay turns it into a blocking ``poll()`` on the UCX
worker's event fd with that timeout, and the thread is needed: endpoint wire-up (and, on hosts
where UCX falls back to TCP, the emulated one-sided reads themselves) are served by
the *passive* side's worker, which nobody else progresses while the engine runs.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from typing import Any, Sequence

import numpy as np
import torch
import torch.distributed as dist

from eplbd.client.comm.base import Communicator, Transfer
from eplbd.client.comm.nixl_support import (_InFlight, _Peer, _Region, _agent_config, _agent_ids, _bindings,
                                            _check_shapes, _device_of, _region, _text, nixl_available)
from eplbd.errors import InvalidArgumentError, UnavailableError

__all__ = ["NixlCommunicator", "nixl_available"]

# run_batch spins this long on a fresh request before it starts sleeping between polls.
_SPIN_S = 0.002
_POLL_SLEEP_S = 0.0001
# (agent, staging tensors) of communicators closed while one of their reads was still running.
_abandoned: list[tuple[Any, Any]] = []
log = logging.getLogger(__name__)


class NixlCommunicator(Communicator):
    """Destination-driven READs over NIXL; see the module docstring.

    Args:
        rank, world_size: this rank's index in the EP group and the group's size.
        group: a gloo ``ProcessGroup`` of the EP ranks, used only by ``setup`` (metadata exchange).
        backend: the NIXL transport plugin (``UCX``).
        timeout_s: deadline for one ``run_batch``'s reads.
    """

    name = "nixl"

    def __init__(self, rank: int, world_size: int, group: Any, *, backend: str = "UCX", timeout_s: float = 30.0) -> None:
        super().__init__(rank, world_size)
        if not 0 <= rank < world_size:
            raise InvalidArgumentError(f"rank {rank} is not in 0..{world_size - 1}")
        if not timeout_s > 0:
            raise InvalidArgumentError(f"timeout_s must be positive, got {timeout_s}")
        self.group, self.backend, self.timeout_s = group, backend, timeout_s
        self._nb: Any = None
        self._agent: Any = None
        self._backend_h: list[int] = []
        self._reg: list[Any] = []  # registered nixlRegDLists
        self._remotes: list[str] = []  # loaded remote agents
        self._dlists: list[int] = []  # every prepped descriptor list, to release
        self._local_dl: list[int] = []  # [buf] -> prepped staging dlist handle
        self._remote_dl: dict[int, int] = {}  # peer rank -> prepped live dlist handle
        self._offsets: dict[int, list[list[int]]] = {}  # peer rank -> [layer][tensor] -> first index in its dlist
        self._peers: list[_Peer] = []
        self._agent_name = ""
        self._inflight: list[_InFlight] = []  # reads abandoned at their deadline while still running
        self._staging: Sequence[Sequence[torch.Tensor]] = ()  # kept alive while a read may land in it
        self._staging_slots = 0
        self._slot_bytes: list[int] = []  # [tensor] -> bytes of one expert slot
        self._num_bufs = 0
        self._closed = False

    # --- setup -----------------------------------------------------------------------------------
    def setup(self, live: Sequence[Sequence[torch.Tensor]], staging: Sequence[Sequence[torch.Tensor]]) -> None:
        """Collective: register, exchange metadata, load every peer, prepare descriptor lists.

        Each phase ends with an all-gather of every rank's outcome, so a failure on any rank
        raises on all of them instead of leaving the others blocked in the next collective.
        """
        if self._agent is not None or self._closed:
            raise InvalidArgumentError(f"rank {self.rank}: setup may be called once, before close")
        if dist.get_world_size(self.group) != self.world_size or dist.get_rank(self.group) != self.rank:
            raise InvalidArgumentError(f"group has rank {dist.get_rank(self.group)} of {dist.get_world_size(self.group)},"
                                       f" communicator has rank {self.rank} of {self.world_size}")
        try:
            mine = self._phase(lambda: self._register(live, staging))
            self._peers = self._gather_ok(mine, "register memory")
            self._gather_ok(self._phase(self._connect), "load remote agents")
        except BaseException:
            self.close()
            raise

    def _phase(self, fn: Any) -> tuple[str | None, bool, Any]:
        """Run one local phase of setup; returns (error or None, error is the caller's fault, result)."""
        try:
            return None, False, fn()
        except InvalidArgumentError as exc:
            return str(exc), True, None
        except Exception as exc:  # UnavailableError or a nixl binding error (they share no base class)
            return f"{type(exc).__name__}: {exc}", False, None

    def _gather_ok(self, outcome: tuple[str | None, bool, Any], what: str) -> list[Any]:
        """All-gather every rank's phase outcome; raise on every rank if any rank failed."""
        outcomes: list[Any] = [None] * self.world_size
        dist.all_gather_object(outcomes, outcome, group=self.group)
        failed = [(r, err, invalid) for r, (err, invalid, _) in enumerate(outcomes) if err is not None]
        if failed:
            cls = InvalidArgumentError if all(invalid for *_, invalid in failed) else UnavailableError
            raise cls(f"rank {self.rank}: nixl setup failed to {what}: "
                      + "; ".join(f"rank {r}: {err}" for r, err, _ in failed))
        return [result for *_, result in outcomes]

    def _register(self, live: Sequence[Sequence[torch.Tensor]], staging: Sequence[Sequence[torch.Tensor]]) -> _Peer:
        """Create the agent, register live and staging memory, prepare the local (staging) lists."""
        _check_shapes(live, staging)
        device = _device_of([t for group in (*live, *staging) for t in group])
        nb = self._nb = _bindings()
        mem = "DRAM" if device.type == "cpu" else "VRAM"
        regions = tuple(tuple(_region(t, f"live[{i}][{k}]") for k, t in enumerate(layer)) for i, layer in enumerate(live))
        stage = [[_region(t, f"staging[{b}][{k}]") for k, t in enumerate(buf)] for b, buf in enumerate(staging)]
        self._agent_name = f"eplbd-rank{self.rank}-{os.getpid()}-{next(_agent_ids)}"
        self._agent = nb.nixlAgent(self._agent_name, _agent_config(nb, progress=True))
        self._backend_h = [self._agent.createBackend(self.backend, {})]
        for rows in (regions, stage):
            descs = np.array([(r.addr, r.slot_bytes * r.num_slots, r.dev) for row in rows for r in row], dtype=np.uint64)
            reg = nb.nixlRegDList(self._seg(mem), descs)
            self._agent.registerMem(reg, self._backend_h)
            self._reg.append(reg)
        self._num_bufs, self._staging_slots = len(staging), stage[0][0].num_slots
        self._staging = staging
        self._slot_bytes = [r.slot_bytes for r in stage[0]]
        # Local side, per buffer: one descriptor per (tensor k, slot s) at index k * staging_slots + s.
        self._local_dl = [self._prep(nb.NIXL_INIT_AGENT, mem, row) for row in stage]
        return _Peer(self._agent_name, bytes(self._agent.getLocalMD()), mem, regions)

    def _connect(self) -> None:
        """Check every peer's layout against ours, load its agent and prepare its live slots as a remote list."""
        for r, peer in enumerate(self._peers):
            if r == self.rank:
                continue
            self._check_peer(r, peer)
            loaded = self._agent.loadRemoteMD(peer.metadata)
            self._remotes.append(peer.name)
            if _text(loaded) != peer.name:
                raise UnavailableError(f"rank {r}'s metadata names agent {_text(loaded)!r}, expected {peer.name!r}")
            # Remote side: one descriptor per (layer, tensor, slot), in that order.
            self._remote_dl[r] = self._prep(peer.name, peer.mem, [reg for row in peer.live for reg in row])
            offsets = itertools.accumulate((reg.num_slots for row in peer.live for reg in row), initial=0)
            flat = list(offsets)
            width = len(self._slot_bytes)
            self._offsets[r] = [flat[i * width:(i + 1) * width] for i in range(len(peer.live))]

    def _check_peer(self, r: int, peer: _Peer) -> None:
        """A peer's experts must fit our staging slots byte for byte, layer by layer."""
        mine = self._peers[self.rank].live
        if len(peer.live) != len(mine):
            raise InvalidArgumentError(f"rank {r} has {len(peer.live)} live layers, rank {self.rank} has {len(mine)}")
        for layer, row in enumerate(peer.live):
            sizes = [reg.slot_bytes for reg in row]
            if sizes != self._slot_bytes:
                raise InvalidArgumentError(f"rank {r}'s layer {layer} has expert slots of {sizes} bytes per tensor, "
                                           f"rank {self.rank}'s staging slots have {self._slot_bytes}")

    def _seg(self, mem: str) -> Any:
        return self._nb.DRAM_SEG if mem == "DRAM" else self._nb.VRAM_SEG

    def _prep(self, agent: str, mem: str, regions: Sequence[_Region]) -> int:
        """Prepare a descriptor list with one entry per slot of each region, in order."""
        rows = [(reg.addr + s * reg.slot_bytes, reg.slot_bytes, reg.dev) for reg in regions for s in range(reg.num_slots)]
        dlist = self._nb.nixlXferDList(self._seg(mem), np.array(rows, dtype=np.uint64))
        handle = self._agent.prepXferDlist(agent, dlist, self._backend_h)
        self._dlists.append(handle)  # tracked at once, so that close() frees it even if setup fails later
        return handle

    # --- transfers -------------------------------------------------------------------------------
    def run_batch(self, buf: int, transfers: Sequence[Transfer]) -> None:
        """READ every expert this rank receives in the batch; return when all have landed.

        All reads from one peer go in one transfer request (a descriptor per expert tensor),
        every peer's request is posted before any is waited on, and all share one deadline.

        As the source of a transfer this rank does nothing (the reader pulls), and returns at
        once: that is safe because the caller never changes a layer's live weights before
        every rank has finished staging that layer (the commit is collective), so a peer
        still reading our live slots after we returned reads consistent data.

        Transfers that name neither this rank as source nor as destination are ignored.
        """
        self._check_open()
        if not 0 <= buf < self._num_bufs:
            raise InvalidArgumentError(f"rank {self.rank}: staging buffer {buf} is not in 0..{self._num_bufs - 1}")
        reads: dict[int, tuple[list[int], list[int], set[int]]] = {}  # peer -> (local idx, remote idx, layers)
        sent = received = 0
        for t in transfers:
            self._check_transfer(t)
            if t.src_rank == self.rank:
                sent += 1
            elif t.dst_rank == self.rank:
                received += 1
                local, remote, layers = reads.setdefault(t.src_rank, ([], [], set()))
                offsets = self._offsets[t.src_rank][t.layer]
                for k, offset in enumerate(offsets):
                    local.append(k * self._staging_slots + t.dst_local)
                    remote.append(offset + t.src_local)
                layers.add(t.layer)
        self._check_buffer_free(buf)
        self._read(buf, reads)
        expert_bytes = sum(self._slot_bytes)
        self.bytes_sent += sent * expert_bytes
        self.bytes_received += received * expert_bytes

    def _check_transfer(self, t: Transfer) -> None:
        """Name the bad field of a transfer before anything is posted."""
        for what, rank in (("src_rank", t.src_rank), ("dst_rank", t.dst_rank)):
            if not 0 <= rank < self.world_size:
                raise InvalidArgumentError(f"rank {self.rank}: {t} has {what} {rank}, not in 0..{self.world_size - 1}")
        if t.src_rank == t.dst_rank:
            raise InvalidArgumentError(f"rank {self.rank}: {t} is a local copy (src_rank == dst_rank), not a transfer")
        live = self._peers[t.src_rank].live
        if not 0 <= t.layer < len(live):
            raise InvalidArgumentError(f"rank {self.rank}: {t} has layer {t.layer}, not in 0..{len(live) - 1}")
        if not 0 <= t.src_local < live[t.layer][0].num_slots:
            raise InvalidArgumentError(f"rank {self.rank}: {t} has src_local {t.src_local}, rank {t.src_rank}'s layer "
                                       f"{t.layer} has {live[t.layer][0].num_slots} slots")
        if t.dst_rank == self.rank and not 0 <= t.dst_local < self._staging_slots:
            raise InvalidArgumentError(f"rank {self.rank}: {t} has dst_local {t.dst_local}, "
                                       f"staging has {self._staging_slots} slots")

    def _read(self, buf: int, reads: dict[int, tuple[list[int], list[int], set[int]]]) -> None:
        """Post one READ per peer, then poll them all until done, failed or past the deadline."""
        pending: dict[int, int] = {}  # peer -> xfer handle
        try:
            for peer, (local, remote, layers) in reads.items():
                try:
                    handle = self._agent.makeXferReq(self._nb.NIXL_READ, self._local_dl[buf], local,
                                                     self._remote_dl[peer], remote, "", self._backend_h)
                    pending[peer] = handle
                    self._post(handle)
                except Exception as exc:
                    raise self._failed(peer, layers, f"posting the read failed: {type(exc).__name__}: {exc}") from exc
            self._wait(pending, reads)
        finally:
            for peer, handle in pending.items():
                self._settle(_InFlight(handle, buf, peer))

    def _post(self, handle: int) -> None:
        """Start a request. On one host (cma) a READ completes inside this call."""
        status = self._agent.postXferReq(handle, "")
        if status not in (self._nb.NIXL_SUCCESS, self._nb.NIXL_IN_PROG):
            raise RuntimeError(f"postXferReq returned {status}")

    def _wait(self, pending: dict[int, int], reads: dict[int, tuple[list[int], list[int], set[int]]]) -> None:
        """Poll every request; spin briefly (most reads are done in microseconds), then back off."""
        start = time.monotonic()
        deadline = start + self.timeout_s
        waiting = dict(pending)
        while waiting:
            for peer, handle in list(waiting.items()):
                try:
                    status = self._agent.getXferStatus(handle)
                except Exception as exc:
                    raise self._failed(peer, reads[peer][2], f"{type(exc).__name__}: {exc}") from exc
                if status == self._nb.NIXL_SUCCESS:
                    del waiting[peer]
                elif status != self._nb.NIXL_IN_PROG:
                    raise self._failed(peer, reads[peer][2], f"transfer status {status}")
            if not waiting:
                return
            now = time.monotonic()
            if now > deadline:
                peer, others = min(waiting), sorted(set(waiting) - {min(waiting)})
                also = f" (reads from peer rank(s) {others} are late too)" if others else ""
                raise self._failed(peer, reads[peer][2], f"no completion within timeout_s={self.timeout_s}{also}")
            if now - start > _SPIN_S:
                time.sleep(_POLL_SLEEP_S)

    def _failed(self, peer: int, layers: set[int], why: str) -> UnavailableError:
        return UnavailableError(f"rank {self.rank}: nixl read from peer rank {peer} (layer(s) {sorted(layers)}) failed: {why}")

    def _settle(self, xfer: _InFlight) -> None:
        """Free a finished (or failed) request; keep one still in flight for later.

        Releasing an in-flight READ asks NIXL to cancel it, and with nixl 1.5.1 over UCX's TCP
        emulation that frees the request while the source's late reply can still arrive: the
        progress thread then writes through a dangling pointer (seen as a segfault). So a read
        abandoned at its deadline stays owned by UCX until it completes or errors.
        """
        if self._in_progress(xfer.handle):
            self._inflight.append(xfer)
            return
        try:
            self._agent.releaseXferReq(xfer.handle)
        except Exception:
            pass  # a failed request whose release fails too: nothing left to do for it

    def _in_progress(self, handle: int) -> bool:
        """Whether a request is still running (a failed status query counts as ended)."""
        try:
            return self._agent.getXferStatus(handle) == self._nb.NIXL_IN_PROG
        except Exception:
            return False

    def _reap(self) -> None:
        """Release the abandoned reads that have finished since."""
        inflight, self._inflight = self._inflight, []
        for xfer in inflight:
            self._settle(xfer)

    def _check_buffer_free(self, buf: int) -> None:
        """A late completion of an abandoned read would overwrite this batch's data: refuse instead."""
        self._reap()
        busy = sorted({x.peer for x in self._inflight if x.buf == buf})
        if busy:
            raise UnavailableError(f"rank {self.rank}: staging buffer {buf} is still the target of timed-out "
                                   f"read(s) from peer rank(s) {busy}; not reusing it until they end")

    def _check_open(self) -> None:
        if self._closed:
            raise InvalidArgumentError(f"rank {self.rank}: nixl communicator is closed")
        if self._agent is None or (not self._remote_dl and self.world_size > 1):
            raise InvalidArgumentError(f"rank {self.rank}: call setup() before run_batch()")

    # --- teardown --------------------------------------------------------------------------------
    def close(self) -> None:
        """Release descriptor lists, forget the peers, deregister memory, then drop the agent
        (which stops its progress thread). Idempotent; best effort: a failing step does not keep
        the later ones from running.

        Peers must be done reading this rank's live memory (the caller closes after a barrier
        or once no plan is in flight). Reads this rank abandoned at a deadline get up to
        ``timeout_s`` more to end; if one still runs after that, the agent and the staging
        tensors are kept alive for the life of the process rather than freed under it.
        """
        if self._closed:
            return
        self._closed = True
        agent = self._agent
        if agent is None:
            return
        self._drain(time.monotonic() + self.timeout_s)
        if self._inflight:
            peers = sorted({x.peer for x in self._inflight})
            log.warning("rank %d: nixl reads from peer rank(s) %s never ended; leaking the agent %s and its "
                        "staging memory instead of freeing them under a running transfer", self.rank, peers,
                        self._agent_name)
            _abandoned.append((agent, self._staging))
        else:
            self._teardown(agent)
        self._agent, self._staging = None, ()
        self._dlists, self._remotes, self._reg, self._inflight = [], [], [], []
        self._local_dl, self._remote_dl = [], {}

    def _drain(self, deadline: float) -> None:
        """Give abandoned reads until ``deadline`` to end."""
        self._reap()
        while self._inflight and time.monotonic() < deadline:
            time.sleep(0.01)
            self._reap()

    def _teardown(self, agent: Any) -> None:
        """Undo setup in reverse order; dropping the last reference to ``agent`` then destroys it."""
        steps = [*((agent.releasedDlistH, h) for h in self._dlists),
                 *((agent.invalidateRemoteMD, name) for name in self._remotes),
                 *((lambda reg: agent.deregisterMem(reg, self._backend_h), reg) for reg in self._reg)]
        for fn, arg in steps:
            try:
                fn(arg)
            except Exception:
                pass  # nothing more can be done for it; the agent's destructor frees what is left
