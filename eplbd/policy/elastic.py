"""Elastic expert parallelism: the placement of a resized EP group (pure functions, no I/O).

Ranks leave or join the group. An operator (or the engine's controller) gives a rank mapping:
``mapping[old_rank]`` is the rank's number in the new group, or ``-1`` when it leaves; new ranks
that no old rank maps to are *joining* ranks, which hold nothing yet. Every rank keeps its
``num_local`` slots, so the new group has ``new_ep_size * num_local`` physical slots per layer
(``num_redundant`` changes with the group, as in vLLM's elastic EP).

``elastic_placement`` plans the new world from the placement in force:

1. ``base``: the old placement in new-rank coordinates. A surviving rank keeps every slot's expert
   at the same local position; a joining rank's slots are ``EMPTY`` (-1).
2. *Orphans*: logical experts none of whose replicas is on a surviving rank (their only copies were
   on removed ranks). They cannot be sent by a peer; the engine must reload them (from its
   checkpoint). Each gets one slot: an empty slot of a joining rank if there is one, else the slot
   of a redundant replica (an expert with two or more replicas in ``base``) that carries the least
   load per replica.
3. The joining ranks' remaining empty slots take replicas of the experts with the highest load per
   replica (the replication step of DeepSeek's EPLB), each preferring an expert the rank lacks.

Every logical expert ends with at least one replica, every rank with ``num_local`` slots; slots not
touched by 2. and 3. keep their expert, so a shrink moves nothing but the reloads and a grow moves
only what the joining ranks receive. Balancing the new world is the scheduler's next plan.

``transition_rows`` says what each rank's slots hold once the orphans are reloaded (``mid``):
from there to the new placement is an ordinary transfer schedule (``eplbd.client.schedule``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from eplbd.errors import InvalidArgumentError, PlacementError
from eplbd.policy.placement import moved_slots, validate_placement

EMPTY = -1  # a slot that holds no expert (a joining rank before it is filled)
REMOVED = -1  # mapping value of a rank that leaves the group


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


@dataclass(frozen=True)
class RankMapping:
    """A validated old-rank -> new-rank map (see ``parse_mapping``).

    Attributes:
        old_ep_size: ranks before the resize.
        new_ep_size: ranks after it.
        new_rank: per old rank, its new rank or ``REMOVED``.
    """

    old_ep_size: int
    new_ep_size: int
    new_rank: tuple[int, ...]

    @property
    def survivors(self) -> dict[int, int]:
        """old rank -> new rank of the ranks that stay."""
        return {old: new for old, new in enumerate(self.new_rank) if new != REMOVED}

    @property
    def removed(self) -> list[int]:
        """Old ranks that leave."""
        return [old for old, new in enumerate(self.new_rank) if new == REMOVED]

    @property
    def joining(self) -> list[int]:
        """New ranks no old rank maps to: they join empty."""
        taken = set(self.survivors.values())
        return [r for r in range(self.new_ep_size) if r not in taken]

    @property
    def old_rank(self) -> list[int]:
        """Per new rank, the old rank it was, or -1 for a joining rank."""
        out = [-1] * self.new_ep_size
        for old, new in self.survivors.items():
            out[new] = old
        return out

    def describe(self) -> str:
        """One line for logs and replies, e.g. ``4 -> 3 ranks (removed [3])``."""
        parts = [f"removed {self.removed}"] if self.removed else []
        parts += [f"joining {self.joining}"] if self.joining else []
        moved = {o: n for o, n in self.survivors.items() if o != n}
        parts += [f"renumbered {moved}"] if moved else []
        return f"{self.old_ep_size} -> {self.new_ep_size} ranks ({', '.join(parts) or 'no change'})"


def parse_mapping(mapping: Sequence[int], old_ep_size: int, new_ep_size: int | None = None) -> RankMapping:
    """Validate a rank mapping.

    Args:
        mapping: one entry per old rank: its new rank, or -1 when it leaves.
        old_ep_size: ranks of the group now.
        new_ep_size: ranks of the new group; None (or 0): the number of surviving ranks, which must
            then be numbered ``0..n-1`` (give it explicitly to add joining ranks).

    Returns:
        The ``RankMapping``.

    Raises:
        InvalidArgumentError: naming the bad entry or size; also for a mapping that changes nothing
            or removes every rank (that is a restart, not a resize).
    """
    entries = list(mapping)
    if len(entries) != old_ep_size:
        raise InvalidArgumentError(
            f"mapping has {len(entries)} entries but the group has ep_size={old_ep_size}: give one per old rank "
            "(its new rank, or -1 when it leaves)")
    for old, new in enumerate(entries):
        if not _is_int(new) or new < REMOVED:
            raise InvalidArgumentError(f"mapping[{old}] = {new!r} is neither a new rank (>= 0) nor -1 (removed)")
    kept = [int(n) for n in entries if n != REMOVED]
    if not kept:
        raise InvalidArgumentError("mapping removes every rank: nothing survives to resize (restart the engine; "
                                   "the daemon follows the new workers' registrations)")
    seen: dict[int, int] = {}
    for old, new in enumerate(entries):
        if new != REMOVED and new in seen:
            raise InvalidArgumentError(f"mapping[{seen[new]}] and mapping[{old}] both name new rank {new}")
        seen[new] = old
    if new_ep_size is None or new_ep_size == 0:
        if sorted(kept) != list(range(len(kept))):
            raise InvalidArgumentError(
                f"mapping sends the surviving ranks to {sorted(kept)}, not onto 0..{len(kept) - 1}; "
                "give the new ep_size to add joining ranks")
        new_ep_size = len(kept)
    if not _is_int(new_ep_size) or new_ep_size < 1:
        raise InvalidArgumentError(f"new ep_size must be a positive integer, got {new_ep_size!r}")
    for old, new in enumerate(entries):
        if new >= new_ep_size:
            raise InvalidArgumentError(f"mapping[{old}] = {new} is outside the new group's ranks 0..{new_ep_size - 1}")
    if new_ep_size == old_ep_size and entries == list(range(old_ep_size)):
        raise InvalidArgumentError(f"mapping {entries} with ep_size={new_ep_size} changes nothing")
    return RankMapping(int(old_ep_size), int(new_ep_size), tuple(int(n) for n in entries))


@dataclass
class ElasticPlacement:
    """The plan for a resized group.

    Attributes:
        mapping: the validated rank mapping.
        num_local: slots per rank (unchanged by a resize).
        base: ``[layers, new_ep_size * num_local]`` int64, the old placement in new-rank coordinates;
            ``EMPTY`` on joining ranks.
        phy2log: ``[layers, new_ep_size * num_local]`` int64, the new placement.
        orphans: per layer, the logical experts whose only copies were on removed ranks, ascending.
    """

    mapping: RankMapping
    num_local: int
    base: torch.Tensor
    phy2log: torch.Tensor
    orphans: list[list[int]]

    @property
    def num_reloads(self) -> int:
        """Expert copies the engine must reload (one per orphan per layer)."""
        return sum(len(o) for o in self.orphans)

    def moved_slots(self) -> int:
        """Slots whose expert must come from another rank (reloads not counted)."""
        mid = transition_rows(self.base, self.phy2log, self.orphans)
        return int(moved_slots(mid, self.phy2log, self.mapping.new_ep_size).sum())


def base_rows(old_phy2log: torch.Tensor, mapping: RankMapping, num_local: int) -> torch.Tensor:
    """The old placement ``[layers, old_ep * num_local]`` in new-rank coordinates ``[layers, new_ep *
    num_local]``: each surviving rank's slots move with it, joining ranks' slots are ``EMPTY``."""
    layers = old_phy2log.shape[0]
    old = old_phy2log.reshape(layers, mapping.old_ep_size, num_local)
    base = torch.full((layers, mapping.new_ep_size, num_local), EMPTY, dtype=torch.int64)
    for o, n in mapping.survivors.items():
        base[:, n] = old[:, o]
    return base.reshape(layers, -1)


def elastic_placement(old_phy2log: torch.Tensor, mapping: RankMapping, num_local: int, num_logical: int,
                      weight: torch.Tensor | np.ndarray | None = None) -> ElasticPlacement:
    """Plan the resized group (see the module docstring).

    Args:
        old_phy2log: ``[layers, old_ep_size * num_local]`` integer, the placement in force.
        mapping: from ``parse_mapping``.
        num_local: slots per rank.
        num_logical: logical experts per layer.
        weight: ``[layers, num_logical]`` load per logical expert (the window); None: uniform.

    Returns:
        The ``ElasticPlacement``.

    Raises:
        PlacementError: ``old_phy2log`` is not a valid placement of ``mapping.old_ep_size`` ranks, or
            the new group has fewer slots per layer than logical experts.
    """
    validate_placement(old_phy2log, num_logical, mapping.old_ep_size)
    layers, old_slots = old_phy2log.shape
    if old_slots != mapping.old_ep_size * num_local:
        raise PlacementError(f"phy2log has {old_slots} slots per layer, expected ep_size {mapping.old_ep_size} "
                             f"x num_local {num_local}")
    new_slots = mapping.new_ep_size * num_local
    if new_slots < num_logical:
        raise PlacementError(f"{mapping.new_ep_size} ranks x {num_local} slots = {new_slots} slots per layer "
                             f"cannot hold {num_logical} logical experts")
    w = np.ones((layers, num_logical)) if weight is None else np.asarray(weight, dtype=np.float64)
    if w.shape != (layers, num_logical):
        raise InvalidArgumentError(f"weight has shape {list(w.shape)}, expected [{layers}, {num_logical}]")
    base = base_rows(torch.as_tensor(old_phy2log, dtype=torch.int64), mapping, num_local)
    rows, orphans = [], []
    for layer in range(layers):
        row, lost = _plan_row(base[layer].numpy(), w[layer], num_local, num_logical)
        rows.append(row)
        orphans.append(lost)
    phy2log = torch.from_numpy(np.stack(rows)) if rows else torch.zeros((0, new_slots), dtype=torch.int64)
    validate_placement(phy2log, num_logical, mapping.new_ep_size, layers)
    return ElasticPlacement(mapping, num_local, base, phy2log, orphans)


def _plan_row(base: np.ndarray, weight: np.ndarray, num_local: int, num_logical: int) -> tuple[np.ndarray, list[int]]:
    """One layer: ``base [new_slots]`` (``EMPTY`` on joining ranks) -> (new row, orphans)."""
    row = base.copy()
    count = np.bincount(row[row != EMPTY], minlength=num_logical)
    orphans = [int(e) for e in np.flatnonzero(count == 0)]
    for e in sorted(orphans, key=lambda e: (-weight[e], e)):  # heaviest first
        slot = _free_slot(row)
        if slot < 0:
            slot = _cheapest_redundant_slot(row, count, weight)
            count[row[slot]] -= 1
        row[slot] = e
        count[e] += 1
    while (slot := _free_slot(row)) >= 0:
        on_rank = set(row[slot - slot % num_local:][:num_local].tolist())
        per_replica = weight / np.maximum(count, 1)
        candidates = [e for e in range(num_logical) if e not in on_rank] or list(range(num_logical))
        e = max(candidates, key=lambda e: (per_replica[e], -count[e], -e))
        row[slot] = e
        count[e] += 1
    return row, orphans


def _free_slot(row: np.ndarray) -> int:
    empty = np.flatnonzero(row == EMPTY)
    return int(empty[0]) if empty.size else -1


def _cheapest_redundant_slot(row: np.ndarray, count: np.ndarray, weight: np.ndarray) -> int:
    """The slot of a replica whose expert keeps another one, with the least load per replica (ties: the
    expert with more replicas, then the last such slot)."""
    slots = [s for s in range(row.size) if row[s] != EMPTY and count[row[s]] > 1]
    # Always non-empty: a row of P >= E slots holding fewer than E distinct experts repeats one.
    return min(slots, key=lambda s: (weight[row[s]] / count[row[s]], -count[row[s]], -s))


def transition_rows(base: torch.Tensor, phy2log: torch.Tensor, orphans: Sequence[Sequence[int]]) -> torch.Tensor:
    """What the slots hold once the orphans are reloaded: ``base`` with each orphan written into the
    first slot of ``phy2log`` that holds it. ``[layers, slots]`` int64.

    Every rank computes the same rows, so the reloading rank of each orphan is agreed without a
    message, and the schedule from these rows to ``phy2log`` sends every other expert from a peer.
    """
    mid = base.clone()
    for layer, lost in enumerate(orphans):
        for e in lost:
            slot = int(torch.nonzero(phy2log[layer] == e)[0, 0])
            mid[layer, slot] = e
    return mid


def reload_slots(base: torch.Tensor, phy2log: torch.Tensor, orphans: Sequence[Sequence[int]], rank: int,
                 num_local: int) -> list[tuple[int, int, int]]:
    """``(layer, local slot, logical expert)`` that ``rank`` must reload (see ``transition_rows``)."""
    mid = transition_rows(base, phy2log, orphans)
    lo, hi = rank * num_local, (rank + 1) * num_local
    changed = (mid[:, lo:hi] != base[:, lo:hi]).nonzero().tolist()
    return [(layer, j, int(mid[layer, lo + j])) for layer, j in changed]
