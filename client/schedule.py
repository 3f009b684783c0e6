"""Transfer schedules: how a layer's experts get from the old placement to the new one.

Every rank computes the same schedule from the same inputs (old and new ``phy2log``
rows and the EP size), so no coordination is needed to agree on who sends what.

For each rank and each slot of the new placement:

- the slot already holds that expert: nothing happens;
- the rank already holds the expert in another slot: a local copy (no transfer);
- the rank receives it. Each rank receives each expert once, even if the new
  placement puts two replicas on it (the second is a local copy of the staged one).
  The source is one of the ranks holding a copy under the old placement, chosen to
  spread sends: fewest sends so far, then the nearest rank after the receiver.

Remote transfers are grouped into conflict-free batches: in a batch each rank
exchanges with at most one peer (both directions of a pair may share a batch).
Pairs with the most experts go first; each batch is a greedy maximal matching.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from eplbd.client.comm.base import Transfer
from eplbd.errors import InvalidArgumentError


@dataclass(frozen=True)
class LocalCopy:
    """``dst_local`` gets the expert from ``src_local`` on the same rank; from the
    staging buffer itself when ``from_staging`` (a second replica of a received expert)."""

    src_local: int
    dst_local: int
    from_staging: bool = False


@dataclass
class LayerSchedule:
    """Everything that moves for one layer.

    Attributes:
        layer: the MoE layer.
        changed: per rank, the local slots whose expert changes (what commit writes).
        local: per rank, local copies to do while staging (after the remote receives
            when ``from_staging``).
        batches: conflict-free batches of remote transfers, in order.
    """

    layer: int
    changed: list[list[int]]
    local: list[list[LocalCopy]]
    batches: list[list[Transfer]] = field(default_factory=list)

    def for_rank(self, rank: int) -> list[list[Transfer]]:
        """The batches with only the transfers ``rank`` takes part in (empty batches kept, so
        every rank walks the same batch sequence)."""
        return [[t for t in b if rank in (t.src_rank, t.dst_rank)] for b in self.batches]

    def copy_local(self, rank: int, live: Sequence[torch.Tensor], staging: Sequence[torch.Tensor]) -> None:
        """Do ``rank``'s local copies into its staging layer (after its remote receives): every tensor
        of the expert, from the live layer or, for a second replica, from the staging layer itself."""
        for c in self.local[rank]:
            src = staging if c.from_staging else live
            for s, d in zip(src, staging):
                d[c.dst_local].copy_(s[c.src_local])

    @property
    def transfers(self) -> list[Transfer]:
        return [t for b in self.batches for t in b]

    @property
    def num_moved(self) -> int:
        """Slots whose content changes on some rank (remote receives plus local copies)."""
        return sum(len(c) for c in self.changed)


def layer_schedule(layer: int, old: torch.Tensor, new: torch.Tensor, ep_size: int) -> LayerSchedule:
    """The schedule that turns placement row ``old`` into ``new`` for ``layer``.

    Args:
        layer: layer index (carried into the transfers).
        old, new: ``[num_physical]`` integer phy2log rows. A negative entry of ``old`` is an empty
            slot (a rank that just joined the group, see ``eplbd.policy.elastic``): it sends nothing.
        ep_size: ranks; ``num_physical`` must divide by it.
    """
    old_l, new_l = [int(x) for x in old.tolist()], [int(x) for x in new.tolist()]
    if len(old_l) != len(new_l):
        raise InvalidArgumentError(f"layer {layer}: old row has {len(old_l)} slots, new row {len(new_l)}")
    if ep_size <= 0 or len(old_l) % ep_size:
        raise InvalidArgumentError(f"layer {layer}: {len(old_l)} slots do not divide over ep_size {ep_size}")
    held = {e for e in old_l if e >= 0}
    if held != set(new_l):
        raise InvalidArgumentError(
            f"layer {layer}: the new placement holds experts {sorted(set(new_l) - held)} that no slot "
            f"holds now, or drops {sorted(held - set(new_l))}")
    n = len(old_l) // ep_size
    holders: dict[int, list[tuple[int, int]]] = {}  # logical -> [(rank, local slot)] under the old placement
    for slot, e in enumerate(old_l):
        holders.setdefault(e, []).append((slot // n, slot % n))
    sends = [0] * ep_size
    changed: list[list[int]] = [[] for _ in range(ep_size)]
    local: list[list[LocalCopy]] = [[] for _ in range(ep_size)]
    remote: list[Transfer] = []
    for r in range(ep_size):
        had = {}  # logical -> first old local slot on r
        for j in range(n):
            had.setdefault(old_l[r * n + j], j)
        received: dict[int, int] = {}  # logical -> staging slot it lands in
        late: list[LocalCopy] = []
        for j in range(n):
            e = new_l[r * n + j]
            if old_l[r * n + j] == e:
                continue
            changed[r].append(j)
            if e in had:
                local[r].append(LocalCopy(had[e], j))
            elif e in received:
                late.append(LocalCopy(received[e], j, from_staging=True))
            else:
                src_rank, src_local = min(holders[e], key=lambda h: (sends[h[0]], (h[0] - r) % ep_size, h[1]))
                sends[src_rank] += 1
                received[e] = j
                remote.append(Transfer(layer, e, src_rank, src_local, r, j))
        local[r].extend(late)
    return LayerSchedule(layer, changed, local, _batches(remote))


def _batches(transfers: list[Transfer]) -> list[list[Transfer]]:
    by_pair: dict[tuple[int, int], list[Transfer]] = {}
    for t in transfers:
        by_pair.setdefault((min(t.src_rank, t.dst_rank), max(t.src_rank, t.dst_rank)), []).append(t)
    batches = []
    while by_pair:
        busy: set[int] = set()
        batch: list[Transfer] = []
        for pair in sorted(by_pair, key=lambda p: (-len(by_pair[p]), p)):
            if pair[0] in busy or pair[1] in busy:
                continue
            busy.update(pair)
            batch.extend(by_pair.pop(pair))
        batches.append(sorted(batch))
    return batches


def plan_schedules(layers: list[int], old_phy2log: torch.Tensor, new_rows: torch.Tensor,
                   ep_size: int) -> list[LayerSchedule]:
    """Schedules for each layer of a plan: ``new_rows[i]`` is the new row of ``layers[i]``."""
    return [layer_schedule(layer, old_phy2log[layer], new_rows[i], ep_size) for i, layer in enumerate(layers)]
