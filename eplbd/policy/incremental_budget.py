"""How the ``incremental`` policy chooses among its options: the slots a relabelled full re-plan moves
(a greedy matching bound) and one option per layer under a move budget or a balance goal (a bisected
price per moved slot).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from eplbd.policy import jit


def _greedy_value(val: np.ndarray, rounds: int = 3) -> np.ndarray:
    """A lower bound on the best matching's total value for each [n, n] problem in ``val`` [batch, n, n]
    (values >= 0): a greedy matching, cut after ``rounds`` rounds (rows still unmatched then count 0).
    Each round every unmatched row bids for its best free column and each column takes its highest
    bidder (the lowest row among equal bids)."""
    if jit.enabled():
        from eplbd.policy.kernels import greedy_matching

        return greedy_matching(np.ascontiguousarray(val, dtype=np.float64), rounds)
    batch, n, _ = val.shape
    val = val.astype(np.float64)
    total = np.zeros(batch)
    row_free = np.ones((batch, n), dtype=bool)
    col_free = np.ones((batch, n), dtype=bool)
    bi = np.arange(batch)[:, None]
    for _ in range(rounds):
        if not row_free.any():
            break
        masked = np.where(row_free[:, :, None] & col_free[:, None, :], val, -np.inf)
        want = masked.argmax(axis=2)
        bid = np.where(row_free, np.take_along_axis(masked, want[:, :, None], axis=2)[:, :, 0], -np.inf)
        first = np.full((batch, n), n)
        best = np.full((batch, n), -np.inf)
        rb, rr = np.nonzero(row_free)
        np.maximum.at(best, (rb, want[rb, rr]), bid[rb, rr])
        top = row_free & (bid == best[bi, want])
        tb, tr = np.nonzero(top)
        np.minimum.at(first, (tb, want[tb, tr]), tr)
        wins = top & (first[bi, want] == np.arange(n)[None, :])
        total += np.where(wins, bid, 0.0).sum(axis=1)
        row_free &= ~wins
        wb, wr = np.nonzero(wins)
        col_free[wb, want[wb, wr]] = False
    return total


def _relabel_cost(keep: np.ndarray, num_physical: int, num_nodes: int, hierarchical: bool) -> np.ndarray:
    """Slots a relabelled re-plan moves at most: greedy rank matching on the overlap ``keep``
    (nodes as units, ranks within them, in the hierarchical case), all layers at once."""
    layers, ranks = keep.shape[0], keep.shape[1]
    if not hierarchical:
        return num_physical - _greedy_value(keep).astype(np.int64)
    per = ranks // num_nodes
    blocks = keep.reshape(layers, num_nodes, per, num_nodes, per).transpose(0, 1, 3, 2, 4)
    inner = _greedy_value(blocks.reshape(-1, per, per)).reshape(layers, num_nodes, num_nodes)
    return num_physical - _greedy_value(inner).astype(np.int64)


def _replan_cost(keep: np.ndarray, num_physical: int, cost: np.ndarray, bal: np.ndarray, replan_bal: np.ndarray,
                 fresh_share: float | None, num_nodes: int, hierarchical: bool) -> np.ndarray:
    """[layers] slots the relabelled re-plan moves at most, where that can matter.

    Where a layer's repair already reaches the re-plan's balancedness for fewer slots than any
    relabelling could keep (each new rank keeping at most its best overlap), and for too few for
    the ``fresh_share`` rule (None: not applied), the re-plan option is dominated whatever its exact cost: such a
    layer gets that lower bound and skips the greedy matching.
    """
    floor = num_physical - keep.max(axis=2).sum(axis=1)
    best = bal.argmax(axis=0)
    lay = np.arange(keep.shape[0])
    done, spend = bal[best, lay] >= replan_bal, cost[best, lay]
    fresh_ok = True if fresh_share is None else spend < fresh_share * floor
    need = ~(done & (spend < floor) & fresh_ok)
    out = floor.astype(np.int64)
    if need.any():
        out[need] = _relabel_cost(keep[need], num_physical, num_nodes, hierarchical)
    return out


def _pick(cost: np.ndarray, bal: np.ndarray, budget: int | None, goal: float) -> np.ndarray:
    """One option per layer: maximise ``bal - price * cost`` per layer, the price bisected.

    With ``budget``: the lowest price whose total cost fits, then layers at the margin take
    their dearer option while the budget lasts. Without: the highest price whose summed
    balancedness still reaches ``goal`` (the best there is if nothing reaches it), then
    layers at the margin drop to their cheaper option while the goal still holds.
    """
    lay = np.arange(cost.shape[1])
    # [layers, options], contiguous per layer (the bisection's argmax runs along the options).
    cost_t, bal_t = np.ascontiguousarray(cost.T), np.ascontiguousarray(bal.T)
    if jit.enabled():
        from eplbd.policy.kernels import pick_at, pick_bisect, pick_options

        idx, n_kept = pick_options(cost_t, bal_t)
        at = lambda price: pick_at(cost_t, bal_t, idx, n_kept, price)  # noqa: E731
        decided, cheap, dear = pick_bisect(cost_t, bal_t, idx, n_kept, -1 if budget is None else budget, goal,
                                           budget is not None)
    else:
        at, decided, cheap, dear = _bisect(cost_t, bal_t, budget, goal)
    if decided:  # the budget buys the best, or the goal is out of reach
        return at(0.0)
    lo, hi = at(cheap), at(dear)  # lo: fewer moves; hi: more
    extra = cost[hi, lay] - cost[lo, lay]
    more = bal[hi, lay] - bal[lo, lay]
    diff = np.flatnonzero(hi != lo)
    if budget is not None:  # upgrade the most balance per slot first while the budget lasts
        diff = diff[np.argsort(-more[diff] / np.maximum(extra[diff], 1), kind="stable")]
        room = budget - cost[lo, lay].sum()
        out = lo.copy()
        take = diff[np.cumsum(extra[diff]) <= room]
        out[take] = hi[take]
        return out
    # Goal: keep the most balance per slot, drop the rest while the goal holds.
    diff = diff[np.argsort(more[diff] / np.maximum(extra[diff], 1), kind="stable")]
    slack = bal[hi, lay].sum() - goal
    out = hi.copy()
    drop = diff[np.cumsum(more[diff]) <= slack]
    out[drop] = lo[drop]
    return out


def _bisect(cost_t: np.ndarray, bal_t: np.ndarray, budget: int | None,
            goal: float) -> tuple[Callable[[float], np.ndarray], bool, float, float]:
    """The price bisection of :func:`_pick` in numpy: ``(at, decided at price 0, cheap, dear)``, ``at(price)``
    being each layer's option with the most ``bal - price * cost`` (the first among equals)."""
    lay = np.arange(cost_t.shape[0])
    cost_f, tie, buf = cost_t.astype(np.float64), 1e-12 * cost_t, np.empty(cost_t.shape)

    def at(price: float) -> np.ndarray:  # (bal - price * cost - tie).argmax(axis=1), in place
        np.multiply(cost_f, price, out=buf)
        np.subtract(bal_t, buf, out=buf)
        np.subtract(buf, tie, out=buf)
        return buf.argmax(axis=1)

    def fits(p: np.ndarray) -> bool:
        return bool(cost_t[lay, p].sum() <= budget) if budget is not None else bool(bal_t[lay, p].sum() >= goal)

    if fits(at(0.0)) == (budget is not None):
        return at, True, 0.0, 0.0
    cheap, dear = 1.0, 0.0  # prices: at(cheap) fits the budget / misses the goal, at(dear) the opposite
    for _ in range(32):  # to 2e-10 of balancedness per slot
        mid = 0.5 * (cheap + dear)
        if fits(at(mid)) == (budget is not None):
            cheap = mid
        else:
            dear = mid
    return at, False, cheap, dear
