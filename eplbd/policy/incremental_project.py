"""Where the ``incremental`` policy starts from when the placement in force is far from the load:
the projection of a placement onto another's replica counts per node, the full re-plan with its ranks
(or nodes) relabelled to keep the most, and the regroup of layers that split an expert group over nodes.
"""

from __future__ import annotations

import numpy as np

from eplbd.policy import jit
from eplbd.policy.incremental_layout import _copies, _Layout, _Options
from eplbd.policy.matching import apply_rank_order, assignment_batch, rank_overlap, stable_rank_order_from


def _split_groups(old: np.ndarray, num_logical: int, num_groups: int, num_nodes: int) -> np.ndarray:
    """[layers] bool: layers where an expert group has experts on more than one node."""
    layers, num_physical = old.shape
    node = np.arange(num_physical) // (num_physical // num_nodes)
    present = np.zeros((layers, num_groups, num_nodes), dtype=bool)
    present[np.arange(layers)[:, None], old // (num_logical // num_groups), node[None, :]] = True
    return (present.sum(axis=2) > 1).any(axis=1)


def _project(w: np.ndarray, old: np.ndarray, target: np.ndarray, num_gpus: int, zones: int) -> np.ndarray:
    """``old`` changed in as few slots as possible to hold, zone by zone, the replicas ``target`` puts there.

    A slot keeps its expert while its zone still wants a copy of it; the freed slots take the
    zone's missing replicas, heaviest first, each on the zone's lightest rank with a freed slot.

    Args:
        w: [layers, num_logical] load.
        old, target: [layers, num_physical] placements.
        num_gpus, zones: ranks, and zones (nodes) they are grouped in.

    Returns:
        [layers, num_physical] int64.
    """
    if jit.enabled():
        from eplbd.policy.kernels import project

        return project(np.ascontiguousarray(w, dtype=np.float64), np.ascontiguousarray(old, dtype=np.int64),
                       np.ascontiguousarray(target, dtype=np.int64), num_gpus, zones)
    layers, num_physical = old.shape
    E = w.shape[1]
    N, Gz, S = num_physical // zones, num_gpus // zones, num_physical // num_gpus
    X = layers * zones
    o, t = old.reshape(X, N), target.reshape(X, N)
    row = np.arange(X)[:, None]
    want = np.bincount((t + row * E).ravel(), minlength=X * E).reshape(X, E)
    key = (o + row * E).ravel()  # flat (row, expert) of each slot
    now = np.bincount(key, minlength=X * E)
    want_s, now_s = want.ravel().take(key), now.take(key)
    # A slot keeps its expert while its occurrence index among the row's slots of that expert is below the
    # copies wanted: all of them where the row wants as many copies as it has or more, none where it wants
    # none; the occurrence index is needed only where it wants some but fewer.
    kept = now_s <= want_s
    some = np.flatnonzero((want_s > 0) & ~kept)
    if some.size:
        k = key[some]
        by = np.argsort(k, kind="stable")  # slots in position order within each (row, expert)
        sk = k[by]
        pos = np.arange(sk.size)
        first = np.ones(sk.size, dtype=bool)
        first[1:] = sk[1:] != sk[:-1]
        occ = pos - np.maximum.accumulate(np.where(first, pos, 0))
        kept[some[by]] = occ < want_s[some[by]]
    kept = kept.reshape(X, N)
    missing = np.maximum(want.ravel() - now, 0)  # copies wanted beyond those kept
    lay_of = np.repeat(np.arange(layers), zones)
    cnt = np.bincount((target + np.arange(layers)[:, None] * E).ravel(),
                      minlength=layers * E).reshape(layers, E)
    per_replica = (w / np.maximum(cnt, 1))[lay_of]  # [X, E]
    q = per_replica.ravel()
    short = np.flatnonzero(missing)
    items = np.repeat(short, missing[short])  # flat (row, expert)
    items = items[np.lexsort((-q[items], items // E))]
    n_in = np.bincount(items // E, minlength=X)
    start = np.concatenate([[0], np.cumsum(n_in)[:-1]])
    out = o.copy()
    loads = np.where(kept, np.take_along_axis(per_replica, o, axis=1), 0.0).reshape(X, Gz, S).sum(axis=2)
    free = ~kept.reshape(X, Gz, S)
    loads[~free.any(axis=2)] = np.inf  # a rank without a freed slot takes nothing
    by_n = np.argsort(-n_in, kind="stable")
    left = np.bincount(n_in, minlength=1)[::-1].cumsum()[::-1]  # left[k]: rows with >= k items
    for k in range(1, int(n_in.max(initial=0)) + 1):
        rows = by_n[:left[k]]  # rows with a k-th item
        it = items[start[rows] + k - 1]
        rank = loads[rows].argmin(axis=1)
        slot = free[rows, rank].argmax(axis=1)
        free[rows, rank, slot] = False
        out[rows, rank * S + slot] = it % E
        loads[rows, rank] += q[it]
        full = ~free[rows, rank].any(axis=1)
        loads[rows[full], rank[full]] = np.inf
    return out.reshape(layers, num_physical)


def _node_relabelled(replan: np.ndarray, old: np.ndarray, num_logical: int, num_nodes: int) -> np.ndarray:
    """``replan`` with whole node blocks moved to the old nodes that already hold most of their slots' experts
    (an exact assignment per layer)."""
    layers = replan.shape[0]
    value = rank_overlap(replan, old, num_nodes, num_logical)  # nodes as ranks: [layers, new node, old node]
    node_of = assignment_batch(-value)  # new node a -> old node
    order = np.empty((layers, num_nodes), dtype=np.int64)
    order[np.arange(layers)[:, None], node_of] = np.arange(num_nodes)[None, :]
    return apply_rank_order(replan, order, num_nodes)


class _Relabelled:
    """The full re-plan's layers with their ranks relabelled to keep the most (exact matching on
    ``keep``), each layer matched once however often it is asked for."""

    def __init__(self, replan: np.ndarray, keep: np.ndarray, num_gpus: int, num_nodes: int, hierarchical: bool):
        self.replan, self.keep, self.args = replan, keep, (num_nodes, hierarchical)
        self.num_gpus = num_gpus
        self.out = np.empty_like(replan)
        self.done = np.zeros(len(replan), dtype=bool)

    def __call__(self, layers: np.ndarray) -> np.ndarray:
        todo = layers[~self.done[layers]]
        if todo.size:
            order = stable_rank_order_from(self.keep[todo], *self.args)
            self.out[todo] = apply_rank_order(self.replan[todo], order, self.num_gpus)
            self.done[todo] = True
        return self.out[layers]


def _regroup(lay: _Layout, opts: _Options, relabelled: _Relabelled, num_groups: int, num_nodes: int,
             num_layers: int) -> None:
    """Hierarchical case: layers (rows ``[0, num_layers)`` of ``lay``) whose placement splits an expert
    group over nodes (e.g. the engine's initial layout) first take, node by node, the replicas of the
    full re-plan (its nodes relabelled to keep the most), changing only the slots whose expert that node
    no longer wants. Swaps then balance the ranks within each node."""
    bad = np.flatnonzero(_split_groups(lay.old[:num_layers], lay.E, num_groups, num_nodes))
    if bad.size == 0:
        return
    lay.phy[bad] = _project(lay.w[bad], lay.old[bad], relabelled(bad), lay.G, num_nodes)
    lay.holds[bad] = _copies(lay.phy[bad], lay.G, lay.E)
    lay.refresh()
    rows, slots = np.nonzero(lay.phy[bad] != lay.old[bad])
    rows = bad[rows]
    opts.add(rows, slots, lay.phy[rows, slots], lay.spent(), lay.balancedness())
