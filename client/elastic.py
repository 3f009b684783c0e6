"""Elastic EP on an engine rank: fill the expert slots of a resized group.

After an operator (or the engine's controller) resized the group (``eplbctl resize``, see
``eplbd.daemon.resize``), each rank of the *new* group, once the engine has rebuilt its torch.distributed
group for it:

1. fetches the transition from the daemon (``fetch_resize``): the new placement, the old one in
   new-rank coordinates (``base``), and the orphans;
2. rebuilds its model for the new group, keeping its expert tensors if it survived (every rank keeps
   its ``num_local`` slots, so a survivor's slots still hold what ``base`` says) or with empty ones
   if it joins;
3. calls ``rebuild_experts`` (collective over the new group): it reloads the orphans it was given
   through the engine's hook ``model.load_expert_weights_(layer, local_slot, logical)``, then runs,
   layer by layer, the ordinary transfer schedule (``eplbd.client.schedule``) from what the slots hold
   then (``eplbd.policy.elastic.transition_rows``) to the new placement: experts move from the ranks that
   have them, each tensor of an expert with it, staged and then copied into the live slots;
4. starts a ``PlacementAgent`` on the new placement at the resize's epoch, which registers with the
   daemon as a rank of the new group.

No step runs during the rebuild, so slots are written in place; every rank derives the same schedule
from the same reply, so no rank waits for a transfer that will not come.

::

    reply = fetch_resize(link, ep_size=new_ep, after_epoch=old_epoch)
    model = RefMoEModel(cfg, rank, group, reply.phy2log, expert_weights=old_model.expert_weights)
    rebuild_experts(model, reply, rank=rank, group=xfer_group, old_phy2log=old_phy2log)
    agent = PlacementAgent(model, rank=rank, ep_size=new_ep, ..., phy2log=reply.phy2log, epoch=reply.info.epoch)
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import torch

from eplbd.client.agent import make_communicator
from eplbd.client.schedule import layer_schedule
from eplbd.client.worker import WorkerLink
from eplbd.policy.elastic import EMPTY, reload_slots, transition_rows
from eplbd.errors import InvalidArgumentError, NotFoundError, PlacementError, UnavailableError
from eplbd.proto import GetResizeRequest, ResizeReply

log = logging.getLogger("eplbd.policy.elastic")


@dataclasses.dataclass
class RebuildStats:
    """What one rank did in ``rebuild_experts``."""

    reloaded: int = 0  # slots reloaded through the engine hook (orphans)
    received: int = 0  # experts received from peers
    local_copies: int = 0  # slots filled from another slot of this rank
    bytes_received: int = 0
    seconds: float = 0.0


def fetch_resize(link: WorkerLink, *, ep_size: int, after_epoch: int = -1, timeout: float = 30.0,
                 poll_s: float = 0.1) -> ResizeReply:
    """The daemon's latest resize, once it is one to ``ep_size`` ranks at an epoch after ``after_epoch``.

    Args:
        link: a ``WorkerLink`` to the daemon (any rank number: the request does not depend on it).
        ep_size: the size of the group this rank now belongs to.
        after_epoch: the epoch this rank ran before (-1 for a joining rank).
        timeout: seconds to keep asking (the daemon may be answering the resize itself, or restarting).

    Raises:
        UnavailableError: no such resize within ``timeout``.
    """
    deadline = time.monotonic() + timeout
    seen = "no reply"
    while True:
        try:
            reply = link.request(GetResizeRequest())
            if reply.info.ep_size == ep_size and reply.info.epoch > after_epoch:
                return reply
            seen = f"the latest resize is to {reply.info.ep_size} ranks at epoch {reply.info.epoch}"
        except (NotFoundError, UnavailableError) as exc:
            seen = str(exc)
        if time.monotonic() > deadline:
            raise UnavailableError(f"no resize to {ep_size} ranks after epoch {after_epoch} within {timeout:g}s "
                                   f"({seen})")
        time.sleep(poll_s)


def old_rank_of(reply: ResizeReply, rank: int) -> int:
    """This new rank's rank before the resize, or -1 when it joined."""
    return next((old for old, new in enumerate(reply.info.mapping) if new == rank), -1)


def check_base(reply: ResizeReply, rank: int, old_phy2log: torch.Tensor | None) -> None:
    """Refuse to rebuild from slots other than the daemon planned from: a surviving rank's old slots must
    be its ``base`` slots (a plan the daemon thinks aborted may have been applied here, say).

    Raises:
        PlacementError: naming the first layer that differs.
    """
    nl = reply.num_local_physical_experts
    mine = reply.base[:, rank * nl:(rank + 1) * nl]
    old = old_rank_of(reply, rank)
    if old < 0:
        if not bool((mine == EMPTY).all()):
            raise PlacementError(f"rank {rank} joins the group but the resize's base gives it experts")
        return
    if old_phy2log is None:
        raise InvalidArgumentError(f"rank {rank} was rank {old} before the resize: pass its old phy2log")
    held = old_phy2log[:, old * nl:(old + 1) * nl].cpu()
    bad = (held != mine).any(dim=1).nonzero()
    if bad.numel():
        layer = int(bad[0, 0])
        raise PlacementError(f"rank {rank} (rank {old} before the resize) holds {held[layer].tolist()} in layer "
                             f"{layer}, but the daemon planned the resize from {mine[layer].tolist()}")


def rebuild_experts(model: Any, reply: ResizeReply, *, rank: int, group: Any, old_phy2log: torch.Tensor | None = None,
                    communicator: str = "torch_gloo") -> RebuildStats:
    """Fill this rank's slots for the new placement (see the module docstring). Collective over ``group``.

    Args:
        model: the rebuilt model: ``expert_weights`` (per layer, tensors ``[num_local, ...]``) holding this
            rank's old slots (a survivor) or anything (a joining rank), and the engine hook
            ``load_expert_weights_(layer, local_slot, logical)``.
        reply: from ``fetch_resize``.
        rank: this rank in the new group.
        group: a process group of the new group's ranks for the transfers (used by nothing else meanwhile).
        old_phy2log: ``[layers, old_num_physical]`` the placement this rank ran (None for a joining rank).
        communicator: as for ``PlacementAgent`` (``torch_gloo``, ``nixl``, ``torch_nccl``).

    Returns:
        ``RebuildStats``.
    """
    t0 = time.perf_counter()
    check_base(reply, rank, old_phy2log)
    nl, ep = reply.num_local_physical_experts, reply.info.ep_size
    live = model.expert_weights
    stats = RebuildStats()
    for layer, slot, logical in reload_slots(reply.base, reply.phy2log, reply.info.orphans, rank, nl):
        model.load_expert_weights_(layer, slot, logical)
        stats.reloaded += 1
    held = transition_rows(reply.base, reply.phy2log, reply.info.orphans)
    staging = [[torch.empty_like(t) for t in live[0]]]
    comm = make_communicator(communicator, rank, ep, group)
    try:
        comm.setup(live, staging)
        for layer in range(len(live)):
            sched = layer_schedule(layer, held[layer], reply.phy2log[layer], ep)
            for batch in sched.for_rank(rank):
                if batch:
                    comm.run_batch(0, batch)
            sched.copy_local(rank, live[layer], staging[0])
            for j in sched.changed[rank]:
                for t, s in zip(live[layer], staging[0]):
                    t[j].copy_(s[j])
            stats.received += sum(1 for t in sched.transfers if t.dst_rank == rank)
            stats.local_copies += len(sched.local[rank])
        stats.bytes_received = comm.bytes_received
    finally:
        comm.close()
    stats.seconds = time.perf_counter() - t0
    log.info("rank %d rebuilt for %d ranks (epoch %d): %d reloaded, %d received, %d local copies in %.3fs",
             rank, ep, reply.info.epoch, stats.reloaded, stats.received, stats.local_copies, stats.seconds)
    return stats
