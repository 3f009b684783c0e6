"""Stable rank labels: give a new placement's per-rank expert sets to the old ranks that hold most of them.

A policy that plans from scratch (``default``) is free to number its ranks in any
order: balance does not depend on which physical rank gets which set. Choosing
the numbering that keeps the most experts where they already are removes every
move that only re-labels ranks. This is an assignment problem, solved exactly for
all layers at once (:func:`assignment_batch`: shortest augmenting paths with
potentials, started from the rows whose cheapest column nobody else wants, so that only
the contested rows need a search; compiled one problem at a time, or vectorised over the
batch in numpy where no JIT may run).

In the hierarchical case whole nodes are relabelled as units and ranks only
within a node, so each node keeps serving the expert groups the plan gave it.
"""

from __future__ import annotations

import numpy as np

from eplbd.policy import jit
from eplbd.policy.placement import preserve_local_slots


def assignment(cost: np.ndarray) -> np.ndarray:
    """Minimum-cost perfect matching of a square cost matrix.

    Args:
        cost: [n, n] finite costs; ``cost[i, j]`` is the cost of giving row ``i`` to column ``j``.

    Returns:
        [n] int64, the column of each row; ``sum(cost[i, col[i]])`` is minimal.
    """
    cost = np.asarray(cost, dtype=np.float64)
    return assignment_batch(cost[None])[0]


def assignment_batch(cost: np.ndarray) -> np.ndarray:
    """Minimum-cost perfect matchings of a batch of square cost matrices.

    Args:
        cost: [batch, n, n] finite costs.

    Returns:
        [batch, n] int64: ``col[b, i]`` is the column given to row ``i`` of problem ``b``.
    """
    cost = np.ascontiguousarray(cost, dtype=np.float64)
    batch, n = cost.shape[0], cost.shape[1]
    if n == 0 or batch == 0:
        return np.zeros((batch, n), dtype=np.int64)
    if jit.enabled():
        from eplbd.policy.kernels import assign

        return assign(cost)
    # 1-based rows and columns; row 0 / column 0 are the search's virtual start.
    a = np.zeros((batch, n + 1, n + 1))
    a[:, 1:, 1:] = cost
    u = np.zeros((batch, n + 1))
    v = np.zeros((batch, n + 1))
    match = np.zeros((batch, n + 1), dtype=np.int64)  # match[b, j]: row given column j (0: free)
    rows_left = _warm_start(cost, u, match)
    live = np.flatnonzero(rows_left[:, 0] > 0) if rows_left.shape[1] else np.zeros(0, dtype=np.int64)
    if live.size:
        sub_u, sub_v, sub_m = u[live], v[live], match[live]
        _augment_all(a[live], sub_u, sub_v, sub_m, rows_left[live])
        u[live], v[live], match[live] = sub_u, sub_v, sub_m
    bi = np.arange(batch)
    col = np.empty((batch, n), dtype=np.int64)
    col[bi[:, None], match[:, 1:] - 1] = np.arange(n)[None, :]
    return col


def _warm_start(cost: np.ndarray, u: np.ndarray, match: np.ndarray) -> np.ndarray:
    """Row potentials = row minima; rows in turn take a free column of zero reduced cost if they have one.

    Returns:
        [batch, k] the 1-based rows still unmatched, 0-padded.
    """
    batch, n, _ = cost.shape
    u[:, 1:] = cost.min(axis=2)
    tight = cost == u[:, 1:, None]  # zero reduced cost (v = 0)
    won = np.zeros((batch, n), dtype=bool)
    taken = np.zeros((batch, n), dtype=bool)
    for i in range(n):  # greedy: row i takes its first tight column still free
        ok = tight[:, i, :] & ~taken
        has = ok.any(axis=1)
        col = ok.argmax(axis=1)[has]
        match[has, col + 1] = i + 1
        taken[has, col] = True
        won[has, i] = True
    left = np.where(won, 0, np.arange(1, n + 1)[None, :])
    left = -np.sort(-left, axis=1)  # unmatched rows first
    width = int((~won).sum(axis=1).max(initial=0))
    return left[:, :width]


def _augment_all(a: np.ndarray, u: np.ndarray, v: np.ndarray, match: np.ndarray, rows: np.ndarray) -> None:
    """Add the unmatched ``rows`` [m, k] (1-based, 0-padded) of each problem, one shortest augmenting path
    (Dijkstra on reduced costs) at a time; a problem starts its next row as soon as its last path is in,
    so the loop runs as long as the problem with the most work, not the sum of the slowest paths."""
    m, n1 = a.shape[0], a.shape[1]
    ar = np.arange(m)
    todo = (rows > 0).sum(axis=1)
    ptr = np.zeros(m, dtype=np.int64)
    minv = np.full((m, n1), np.inf)
    used = np.zeros((m, n1), dtype=bool)
    way = np.zeros((m, n1), dtype=np.int64)
    j0 = np.zeros(m, dtype=np.int64)
    match[:, 0] = rows[:, 0]
    active = todo > 0
    inf_row = np.full(n1, np.inf)
    while active.any():
        used[ar[active], j0[active]] = True
        i0 = match[ar, j0]
        cur = a[ar, i0] - u[ar, i0][:, None] - v
        free = ~used
        better = free & (cur < minv) & active[:, None]
        minv = np.where(better, cur, minv)
        way = np.where(better, j0[:, None], way)
        cand = np.where(free, minv, np.inf)
        j1 = cand.argmin(axis=1)
        delta = np.where(active, cand[ar, j1], 0.0)
        # Among the nearest columns prefer an unmatched one: it ends the path now (ties are common).
        open_tie = (cand == delta[:, None]) & (match == 0)
        j1 = np.where(open_tie.any(axis=1), open_tie.argmax(axis=1), j1)
        step = np.where(used, delta[:, None], 0.0)
        u[ar[:, None], match] += step  # visited columns hold distinct rows; others add 0
        v -= step
        minv -= np.where(free, delta[:, None], 0.0)
        j0 = np.where(active, j1, j0)
        done = active & (match[ar, j0] == 0)
        if not done.any():
            continue
        # Walk each finished path back, shifting rows one column along it; then start the next row.
        jj, going = j0.copy(), done.copy()
        while going.any():
            prev = way[ar, jj]
            match[ar[going], jj[going]] = match[ar[going], prev[going]]
            jj = np.where(going, prev, jj)
            going &= jj != 0
        ptr += done
        active &= ~(done & (ptr >= todo))
        nxt = np.flatnonzero(done & active)
        match[nxt, 0] = rows[nxt, ptr[nxt]]
        minv[nxt] = inf_row
        used[nxt] = False
        j0[nxt] = 0


def held_by_rank(phy2log: np.ndarray, num_ranks: int, num_logical: int) -> np.ndarray:
    """[layers, num_logical, num_ranks] uint8: 1 where a rank holds the expert in ``phy2log``."""
    layers, num_physical = phy2log.shape
    held = np.zeros((layers, num_logical, num_ranks), dtype=np.uint8)
    held[np.arange(layers)[:, None], phy2log, np.arange(num_physical)[None, :] // (num_physical // num_ranks)] = 1
    return held


def rank_overlap(new: np.ndarray, old: np.ndarray, num_ranks: int, num_logical: int,
                 held: np.ndarray | None = None) -> np.ndarray:
    """How many of each new rank's slots an old rank could fill without a transfer.

    Args:
        new: [layers, num_physical] int64 placement to relabel.
        old: [layers, num_physical] int64 placement in force.
        num_ranks: EP ranks.
        num_logical: logical experts per layer.
        held: ``held_by_rank(old, ...)`` when the caller has it (the numpy path uses it).

    Returns:
        [layers, num_ranks (new), num_ranks (old)] int64: slots of new rank ``i`` whose
        expert old rank ``j`` already holds.
    """
    if jit.enabled():
        from eplbd.policy.kernels import overlap

        return overlap(np.ascontiguousarray(new, dtype=np.int64), np.ascontiguousarray(old, dtype=np.int64),
                       num_ranks, num_logical)
    layers, num_physical = new.shape
    held = held_by_rank(old, num_ranks, num_logical) if held is None else held
    local = num_physical // num_ranks
    flat = (np.arange(layers)[:, None] * held.shape[1] + new).ravel()
    per_slot = held.reshape(-1, num_ranks).take(flat, axis=0)  # [layers * num_physical, old ranks]
    per_slot = per_slot.reshape(layers, num_ranks, local, num_ranks)
    if local > 32:
        return per_slot.sum(axis=2, dtype=np.int64)
    out = per_slot[:, :, 0].astype(np.int64)  # a few in-place adds beat a strided reduction here
    for slot in range(1, local):
        out += per_slot[:, :, slot]
    return out


def keep_slots(new: np.ndarray, old: np.ndarray, num_ranks: int) -> np.ndarray:
    """:func:`eplbd.policy.placement.preserve_local_slots` for the policies: int64 arrays in, an int64 array
    out, compiled where it may run (the engine side imports the placement module, never a JIT); shapes that do
    not fit raise its ``PlacementError``."""
    if jit.enabled() and new.shape == old.shape and new.ndim == 2 and new.shape[1] % num_ranks == 0:
        from eplbd.policy.kernels import preserve_slots

        return preserve_slots(np.ascontiguousarray(new, dtype=np.int64), np.ascontiguousarray(old, dtype=np.int64),
                              new.shape[1] // num_ranks)
    return preserve_local_slots(new, old, num_ranks).numpy()


def stable_rank_order(new: np.ndarray, old: np.ndarray, num_ranks: int, num_nodes: int,
                      num_logical: int, hierarchical: bool) -> np.ndarray:
    """The relabelling of ``new``'s ranks that keeps the most slots' experts on their rank.

    Args:
        new: [layers, num_physical] int64.
        old: [layers, num_physical] int64.
        num_ranks: EP ranks.
        num_nodes: nodes; used only when ``hierarchical``.
        num_logical: logical experts per layer.
        hierarchical: relabel nodes as units and ranks only within a node.

    Returns:
        [layers, num_ranks] int64: ``order[l, j]`` is the new rank whose set goes to rank ``j``.
    """
    return stable_rank_order_from(rank_overlap(new, old, num_ranks, num_logical), num_nodes, hierarchical)


def stable_rank_order_from(keep: np.ndarray, num_nodes: int, hierarchical: bool) -> np.ndarray:
    """:func:`stable_rank_order` from a ready :func:`rank_overlap` matrix ``keep`` [layers, ranks, ranks]."""
    layers, num_ranks = keep.shape[0], keep.shape[1]
    lay = np.arange(layers)[:, None]
    if not hierarchical or num_nodes == 1:
        order = np.empty((layers, num_ranks), dtype=np.int64)
        order[lay, assignment_batch(-keep)] = np.arange(num_ranks)[None, :]
        return order
    per = num_ranks // num_nodes
    # blocks[l, a, b] = new node a's ranks x old node b's ranks.
    blocks = keep.reshape(layers, num_nodes, per, num_nodes, per).transpose(0, 1, 3, 2, 4)
    inner = assignment_batch(-blocks.reshape(-1, per, per)).reshape(layers, num_nodes, num_nodes, per)
    value = np.take_along_axis(blocks, inner[..., None], axis=4)[..., 0].sum(axis=3)  # [l, a, b]
    node_of = assignment_batch(-value)  # [l, a] -> old node b
    inner_ab = np.take_along_axis(inner, node_of[:, :, None, None], axis=2)[:, :, 0]  # [l, a, per]
    order = np.empty((layers, num_ranks), dtype=np.int64)
    dest = node_of[:, :, None] * per + inner_ab  # old rank receiving new rank a*per+i
    src = np.arange(num_nodes)[:, None] * per + np.arange(per)[None, :]
    order[lay, dest.reshape(layers, -1)] = src.reshape(1, -1)
    return order


def apply_rank_order(new: np.ndarray, order: np.ndarray, num_ranks: int) -> np.ndarray:
    """Move each new rank's slot block to the rank ``order`` gives it.

    Args:
        new: [layers, num_physical] int64.
        order: [layers, num_ranks] int64 from :func:`stable_rank_order`.
        num_ranks: EP ranks.

    Returns:
        [layers, num_physical] int64 with rank ``j``'s slots taken from new rank ``order[l, j]``.
    """
    layers, num_physical = new.shape
    blocks = new.reshape(layers, num_ranks, num_physical // num_ranks)
    return np.take_along_axis(blocks, order[:, :, None], axis=1).reshape(layers, num_physical)
