"""Placements: deriving ``log2phy``/``logcnt``, initial layouts, validation, movement.

A placement is ``phy2log [layers, num_physical]`` int64: the logical expert held by
each slot. Rank ``r`` holds slots ``r*num_local .. (r+1)*num_local-1``.

Initial layouts (epoch 0) must match what the engine loaded, so ``linear`` copies
vLLM's initial map exactly; ``round_robin`` has no redundancy-aware counterpart in
vLLM and follows the layout documented on :func:`initial_placement`.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

from eplbd.errors import PlacementError

Strategy = Literal["linear", "round_robin"]
STRATEGIES: tuple[str, ...] = ("linear", "round_robin")


def _int_array(phy2log: torch.Tensor | np.ndarray, what: str = "phy2log") -> np.ndarray:
    """Check type, integer dtype and 2-D shape; return an int64 numpy view or copy."""
    if isinstance(phy2log, torch.Tensor):
        if phy2log.dtype in (torch.bool,) or phy2log.is_floating_point() or phy2log.is_complex():
            raise PlacementError(f"{what} must have an integer dtype, got {phy2log.dtype}")
        arr = phy2log.detach().cpu().numpy()
    elif isinstance(phy2log, np.ndarray):
        if phy2log.dtype.kind not in "iu":
            raise PlacementError(f"{what} must have an integer dtype, got {phy2log.dtype}")
        arr = phy2log
    else:
        raise PlacementError(f"{what} must be a torch.Tensor or numpy array, got {type(phy2log).__name__}")
    if arr.ndim != 2:
        raise PlacementError(f"{what} must be [layers, num_physical], got shape {tuple(arr.shape)}")
    return arr.astype(np.int64, copy=False)


def _check_ids(arr: np.ndarray, num_logical: int, what: str = "phy2log") -> None:
    bad = (arr < 0) | (arr >= num_logical)
    if bad.any():
        layer, slot = (int(i) for i in np.argwhere(bad)[0])
        raise PlacementError(
            f"{what} holds logical id {int(arr[layer, slot])} at [layer {layer}, slot {slot}],"
            f" outside 0..{num_logical - 1}"
        )


def derive_log2phy(
    phy2log: torch.Tensor | np.ndarray, num_logical: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Invert a placement.

    Args:
        phy2log: [layers, num_physical] integer, ids in ``0..num_logical-1``.
        num_logical: logical experts per layer.

    Returns:
        log2phy: [layers, num_logical, max_replicas] int64, each expert's slots in
            ascending order, -1 padded; ``max_replicas`` is the largest count (at least 1).
        logcnt: [layers, num_logical] int64, replicas per logical expert (0 for an
            expert the placement lacks).
    """
    arr = _int_array(phy2log)
    if isinstance(num_logical, bool) or not isinstance(num_logical, (int, np.integer)) or num_logical < 1:
        raise PlacementError(f"num_logical must be a positive integer, got {num_logical!r}")
    _check_ids(arr, num_logical)
    num_layers, num_physical = arr.shape
    layer_off = np.arange(num_layers, dtype=np.int64)[:, None] * num_logical
    logcnt = np.bincount((arr + layer_off).ravel(), minlength=num_layers * num_logical)
    logcnt = logcnt.reshape(num_layers, num_logical).astype(np.int64, copy=False)
    max_replicas = max(1, int(logcnt.max())) if logcnt.size else 1
    # A stable sort groups slots by expert and keeps each group in slot order.
    order = np.argsort(arr, axis=1, kind="stable")
    sorted_log = np.take_along_axis(arr, order, axis=1)
    start = np.cumsum(logcnt, axis=1) - logcnt
    rank = np.arange(num_physical, dtype=np.int64)[None, :] - np.take_along_axis(start, sorted_log, axis=1)
    log2phy = np.full((num_layers, num_logical, max_replicas), -1, dtype=np.int64)
    log2phy[np.arange(num_layers)[:, None], sorted_log, rank] = order
    return torch.from_numpy(log2phy), torch.from_numpy(logcnt)


def initial_placement(
    num_layers: int,
    num_logical: int,
    num_physical: int,
    num_ranks: int,
    strategy: Strategy = "linear",
) -> torch.Tensor:
    """The placement an engine starts with (epoch 0), the same for every layer.

    ``linear`` (vLLM's initial map): slot ``s`` holds expert ``s`` for ``s < E``; the
    ``num_physical - E`` redundant slots are the *last* slots (so the last ranks) and
    hold experts ``0, 1, 2, ...`` (wrapping modulo ``E``).

    ``round_robin``: expert ``e`` sits on rank ``e % num_ranks``; each rank lists its
    own experts first, in ascending order, then its redundant slots. Redundant copies
    of experts ``0, 1, 2, ...`` (modulo ``E``) are handed out in that order, each to
    the first rank after its original's rank (cyclically) that still has a free slot
    and does not already hold that expert, falling back to any rank with a free slot.
    A copy on the same rank as its original would add no balancing capacity.

    Args:
        num_layers: MoE layers (>= 0).
        num_logical: logical experts per layer (>= 1).
        num_physical: slots per layer, a multiple of ``num_ranks``, ``>= num_logical``.
        num_ranks: EP ranks.
        strategy: ``"linear"`` or ``"round_robin"``.

    Returns:
        phy2log: [num_layers, num_physical] int64.
    """
    for name, value, low in (
        ("num_layers", num_layers, 0),
        ("num_logical", num_logical, 1),
        ("num_physical", num_physical, 1),
        ("num_ranks", num_ranks, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise PlacementError(f"{name} must be an integer >= {low}, got {value!r}")
    if num_physical < num_logical:
        raise PlacementError(f"num_physical={num_physical} is smaller than num_logical={num_logical}")
    if num_physical % num_ranks:
        raise PlacementError(f"num_physical={num_physical} is not a multiple of num_ranks={num_ranks}")
    num_redundant = num_physical - num_logical
    if strategy == "linear":
        row = np.concatenate(
            [np.arange(num_logical, dtype=np.int64), np.arange(num_redundant, dtype=np.int64) % num_logical]
        )
    elif strategy == "round_robin":
        row = _round_robin_row(num_logical, num_physical, num_ranks)
    else:
        raise PlacementError(f"unknown placement strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}")
    return torch.from_numpy(np.tile(row, (num_layers, 1)))


def _round_robin_row(num_logical: int, num_physical: int, num_ranks: int) -> np.ndarray:
    num_local = num_physical // num_ranks
    per_rank: list[list[int]] = [list(range(r, num_logical, num_ranks)) for r in range(num_ranks)]
    # E experts round robin put at most ceil(E / ranks) <= num_local on any rank.
    for j in range(num_physical - num_logical):
        expert = j % num_logical
        home = expert % num_ranks
        candidates = [(home + t) % num_ranks for t in range(1, num_ranks + 1)]
        free = [r for r in candidates if len(per_rank[r]) < num_local]
        target = next((r for r in free if expert not in per_rank[r]), free[0])
        per_rank[target].append(expert)
    return np.asarray([e for rank in per_rank for e in rank], dtype=np.int64)


def validate_placement(
    phy2log: torch.Tensor | np.ndarray,
    num_logical: int,
    num_ranks: int,
    num_layers: int | None = None,
) -> None:
    """Raise ``PlacementError`` naming the first problem with a placement.

    Args:
        phy2log: [layers, num_physical] integer dtype.
        num_logical: logical experts per layer; every one must appear in every layer.
        num_ranks: EP ranks; ``num_physical % num_ranks == 0``.
        num_layers: the expected layer count, when known.
    """
    arr = _int_array(phy2log)
    layers, num_physical = arr.shape
    if num_layers is not None and layers != num_layers:
        raise PlacementError(f"phy2log has {layers} layers, expected {num_layers}")
    if isinstance(num_ranks, bool) or not isinstance(num_ranks, (int, np.integer)) or num_ranks < 1:
        raise PlacementError(f"num_ranks must be a positive integer, got {num_ranks!r}")
    if num_physical % num_ranks:
        raise PlacementError(f"phy2log has {num_physical} slots, not a multiple of num_ranks={num_ranks}")
    if num_physical < num_logical:
        raise PlacementError(f"phy2log has {num_physical} slots, fewer than num_logical={num_logical}")
    _, logcnt = derive_log2phy(arr, num_logical)
    missing = logcnt.numpy() == 0
    if missing.any():
        layer = int(np.argwhere(missing.any(axis=1))[0, 0])
        experts = np.flatnonzero(missing[layer]).tolist()
        shown = ", ".join(map(str, experts[:8])) + (" ..." if len(experts) > 8 else "")
        raise PlacementError(f"layer {layer} of phy2log has no slot for logical expert(s) {shown}")


def moved_slots(
    old_phy2log: torch.Tensor | np.ndarray, new_phy2log: torch.Tensor | np.ndarray, num_ranks: int
) -> torch.Tensor:
    """Slots per layer whose new expert must come from another rank.

    A slot counts when its rank held no copy of its new expert anywhere under the old
    placement; shuffles inside a rank are free.

    Args:
        old_phy2log: [layers, num_physical] integer.
        new_phy2log: [layers, num_physical] integer, same shape.
        num_ranks: EP ranks; ``num_physical % num_ranks == 0``.

    Returns:
        [layers] int64.
    """
    old = _int_array(old_phy2log, "old_phy2log")
    new = _int_array(new_phy2log, "new_phy2log")
    if old.shape != new.shape:
        raise PlacementError(f"old_phy2log shape {tuple(old.shape)} differs from new_phy2log shape {tuple(new.shape)}")
    layers, num_physical = old.shape
    if isinstance(num_ranks, bool) or not isinstance(num_ranks, (int, np.integer)) or num_ranks < 1:
        raise PlacementError(f"num_ranks must be a positive integer, got {num_ranks!r}")
    if num_physical % num_ranks:
        raise PlacementError(f"phy2log has {num_physical} slots, not a multiple of num_ranks={num_ranks}")
    local = num_physical // num_ranks
    old_r = old.reshape(layers, num_ranks, 1, local)
    new_r = new.reshape(layers, num_ranks, local, 1)
    held = (new_r == old_r).any(axis=-1)
    return torch.from_numpy((~held).sum(axis=(1, 2)).astype(np.int64))


def preserve_local_slots(
    new_phy2log: torch.Tensor | np.ndarray, old_phy2log: torch.Tensor | np.ndarray, num_ranks: int
) -> torch.Tensor:
    """Reorder each rank's slots in ``new_phy2log`` so kept experts stay where they were.

    Which experts a rank holds does not change, only their order within the rank: an
    expert the rank already held keeps its old slot (so the engine copies nothing for
    it); the rank's incoming experts fill the remaining slots in their original order.
    This mirrors vLLM's ``preserve_intragpu_slots``.

    Args:
        new_phy2log: [layers, num_physical] integer, the placement to reorder.
        old_phy2log: [layers, num_physical] integer, the placement in force.
        num_ranks: EP ranks; ``num_physical % num_ranks == 0``.

    Returns:
        [layers, num_physical] int64, a per-rank permutation of ``new_phy2log``.
    """
    new = _int_array(new_phy2log, "new_phy2log")
    old = _int_array(old_phy2log, "old_phy2log")
    if old.shape != new.shape:
        raise PlacementError(f"old_phy2log shape {tuple(old.shape)} differs from new_phy2log shape {tuple(new.shape)}")
    layers, num_physical = new.shape
    if num_physical % num_ranks:
        raise PlacementError(f"phy2log has {num_physical} slots, not a multiple of num_ranks={num_ranks}")
    local = num_physical // num_ranks
    # Rows are (layer, rank); each step keeps at most one expert per row in place.
    new_r = new.reshape(-1, local)
    old_r = old.reshape(-1, local)
    rows = np.arange(new_r.shape[0])
    out = np.empty_like(new_r)
    used = np.zeros(new_r.shape, dtype=bool)
    kept = np.zeros(new_r.shape, dtype=bool)
    for slot in range(local):
        match = (new_r == old_r[:, slot : slot + 1]) & ~used
        hit = match.any(axis=1)
        src = match.argmax(axis=1)
        out[hit, slot] = new_r[rows[hit], src[hit]]
        used[rows[hit], src[hit]] = True
        kept[hit, slot] = True
    # Unused new entries (in order) go to the slots not kept (in order); both lists
    # have the same length per row, so sorting the flags pairs them up.
    src_order = np.argsort(used, axis=1, kind="stable")
    dst_order = np.argsort(kept, axis=1, kind="stable")
    fill = np.arange(local)[None, :] < (~kept).sum(axis=1, keepdims=True)
    r_idx = np.broadcast_to(rows[:, None], fill.shape)
    out[r_idx[fill], dst_order[fill]] = new_r[r_idx[fill], src_order[fill]]
    return torch.from_numpy(out.reshape(layers, num_physical))
