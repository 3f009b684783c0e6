"""Stable rank labels: give a new placement's per-rank expert sets to the old ranks that hold most of them.

A policy that plans from scratch (``default``) is free to number its ranks in any
order: balance does not depend on which physical rank gets which set. Choosing
the numbering that keeps the most experts where they already are removes every
move that only re-labels ranks. This is an assignment problem, solved exactly
per layer (:func:`assignment`, a Hungarian method with a cheap exit for the
common case where every new rank has a distinct best old rank).

In the hierarchical case whole nodes are relabelled as units and ranks only
within a node, so each node keeps serving the expert groups the plan gave it.
"""

from __future__ import annotations

import numpy as np


def assignment(cost: np.ndarray) -> np.ndarray:
    """Minimum-cost perfect matching of a square cost matrix.

    Args:
        cost: [n, n] finite costs; ``cost[i, j]`` is the cost of giving row ``i`` to column ``j``.

    Returns:
        [n] int64, the column of each row; ``sum(cost[i, col[i]])`` is minimal.
    """
    cost = np.asarray(cost, dtype=np.float64)
    n = cost.shape[0]
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    best = cost.argmin(axis=1)
    if np.unique(best).size == n:  # every row gets its cheapest column: optimal as it stands
        return best.astype(np.int64)
    return _hungarian(cost)


def _hungarian(cost: np.ndarray) -> np.ndarray:
    """Shortest augmenting paths with potentials (O(n^3)); the inner scan over columns is vectorised."""
    n = cost.shape[0]
    u = np.zeros(n + 1)
    v = np.zeros(n + 1)
    match = np.zeros(n + 1, dtype=np.int64)  # match[j]: row (1-based) given column j (1-based); 0 = free
    way = np.zeros(n + 1, dtype=np.int64)
    padded = np.zeros((n + 1, n + 1))
    padded[1:, 1:] = cost
    for row in range(1, n + 1):
        match[0] = row
        col0 = 0
        minv = np.full(n + 1, np.inf)
        used = np.zeros(n + 1, dtype=bool)
        while True:
            used[col0] = True
            row0 = match[col0]
            free = ~used
            free[0] = False
            cur = padded[row0] - u[row0] - v
            better = free & (cur < minv)
            minv[better] = cur[better]
            way[better] = col0
            cand = np.where(free, minv, np.inf)
            col1 = int(cand.argmin())
            delta = cand[col1]
            u[match[used]] += delta
            v[used] -= delta
            minv[free] -= delta
            col0 = col1
            if match[col0] == 0:
                break
        while col0:
            col1 = way[col0]
            match[col0] = match[col1]
            col0 = col1
    out = np.empty(n, dtype=np.int64)
    out[match[1:] - 1] = np.arange(n, dtype=np.int64)
    return out


def rank_overlap(new: np.ndarray, old: np.ndarray, num_ranks: int, num_logical: int) -> np.ndarray:
    """How many of each new rank's slots an old rank could fill without a transfer.

    Args:
        new: [layers, num_physical] int64 placement to relabel.
        old: [layers, num_physical] int64 placement in force.
        num_ranks: EP ranks.
        num_logical: logical experts per layer.

    Returns:
        [layers, num_ranks (new), num_ranks (old)] int64: slots of new rank ``i`` whose
        expert old rank ``j`` already holds.
    """
    layers, num_physical = new.shape
    local = num_physical // num_ranks
    counts = np.zeros((layers, num_ranks, num_logical), dtype=np.float64)
    held = np.zeros((layers, num_ranks, num_logical), dtype=np.float64)
    li = np.repeat(np.arange(layers), num_physical)
    ri = np.tile(np.repeat(np.arange(num_ranks), local), layers)
    np.add.at(counts, (li, ri, new.ravel()), 1.0)
    held[li, ri, old.ravel()] = 1.0
    return np.rint(counts @ held.transpose(0, 2, 1)).astype(np.int64)


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
    layers = new.shape[0]
    keep = rank_overlap(new, old, num_ranks, num_logical)
    order = np.empty((layers, num_ranks), dtype=np.int64)
    per_node = num_ranks // num_nodes if hierarchical else num_ranks
    nodes = num_nodes if hierarchical else 1
    for layer in range(layers):
        k = keep[layer]
        if nodes == 1:
            order[layer, assignment(-k)] = np.arange(num_ranks)
            continue
        inner: dict[tuple[int, int], np.ndarray] = {}
        value = np.empty((nodes, nodes))
        for a in range(nodes):
            for b in range(nodes):
                block = k[a * per_node:(a + 1) * per_node, b * per_node:(b + 1) * per_node]
                inner[a, b] = assignment(-block)
                value[a, b] = block[np.arange(per_node), inner[a, b]].sum()
        for a, b in enumerate(assignment(-value)):
            order[layer, b * per_node + inner[a, b]] = a * per_node + np.arange(per_node)
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
