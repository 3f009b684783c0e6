"""The ``incremental`` policy: keep most experts where they are, move only what buys balance.

A full re-plan (``default``) reaches its balance by recomputing every slot; after a
small drift in load most slots then need an expert from another rank. This policy
starts from the placement in force and improves it one move at a time, always the
move that buys the most predicted balance per slot it makes receive a remote expert:

- *replicate*: a slot on one of the lightest ranks that holds a spare replica (its
  expert has others) takes a replica of the expert that weighs most on the
  heaviest rank, splitting that expert's load over one more slot;
- *swap*: a slot on the heaviest rank and a slot on a light rank exchange experts.

Balancedness of a layer is mean rank load / max rank load and the mean is fixed, so
a move must lower the heaviest rank's load; ties between heaviest ranks are handled
by a potential (max load, then how many ranks sit at it) that strictly falls with
every move, so the search cannot cycle. All layers search at once, vectorised.

Next to the search's move sequence each layer has one more option: the ``default``
policy's full re-plan, with its ranks relabelled to keep what they hold (its cost is
bounded with a greedy relabelling; the exact one is applied if it is chosen). The
budget then decides per layer:

- ``move_budget=None`` (the default): each layer takes its cheapest option whose
  predicted balancedness is within ``tolerance`` (0.002) of the best option it has,
  so a layer is only left worse than a full re-plan by that much, and a layer
  already there moves nothing;
- ``move_budget=N``: at most ``N`` slots in the whole plan receive an expert from
  another rank; the budget goes to the layers where it buys most balance per slot
  (greedy over each layer's upper concave hull of (slots, balancedness));
- ``move_budget=0``: the placement is returned unchanged.

Node locality: with several nodes in the hierarchical case (``num_groups %
num_nodes == 0``) a search move only brings a node experts it already holds, so
transfers stay on intra-node links and each node keeps serving its expert groups
(the full re-plan option moves whole groups between nodes, at its cost). In the
global case a move that crosses nodes counts double when moves are ranked.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from eplbd.errors import PolicyError
from eplbd.policy.balance import predicted_balancedness
from eplbd.policy.default import check_args, check_weight, rebalance_experts
from eplbd.policy.matching import apply_rank_order, rank_overlap, stable_rank_order
from eplbd.policy.placement import _int_array, moved_slots, preserve_local_slots
from eplbd.policy.registry import Policy, register_policy

TOLERANCE = 0.008
LIGHT_RANKS = 4  # partners per move: slots on this many lightest ranks
CROSS_NODE_WEIGHT = 2.0  # ranking weight of a slot that receives an expert from another node
_TIE = 1e-9


@dataclass
class IncrementalPlan:
    """What :func:`plan_incremental` chose.

    Attributes:
        phy2log: [layers, num_physical] int64, the new placement.
        choice: per layer, ``"kept"`` (unchanged), ``"moves"`` (the search's moves) or
            ``"replan"`` (the full re-plan, relabelled).
        moved: [layers] int64, slots that receive an expert from another rank.
        before, after: [layers] float64 predicted balancedness of the old and new placement.
        replan: [layers] float64 predicted balancedness of the full re-plan.
    """

    phy2log: torch.Tensor
    choice: list[str]
    moved: np.ndarray
    before: np.ndarray
    after: np.ndarray
    replan: np.ndarray

    def summary(self) -> str:
        """One line for logs and reasons: layers per choice, slots moved, balance vs a full re-plan."""
        counts = {c: self.choice.count(c) for c in ("kept", "moves", "replan")}
        return (f"incremental: {counts['moves']} layer(s) by moves, {counts['replan']} re-planned, "
                f"{counts['kept']} kept; {int(self.moved.sum())} slots moved; predicted "
                f"{self.after.mean():.4f} vs full re-plan {self.replan.mean():.4f}")


class _Search:
    """The move search's state for every layer at once (numpy, float64 loads).

    Each step makes, per active layer, the best move for its heaviest rank: a swap
    with one of ``LIGHT_RANKS`` light ranks, or a replica onto one.
    """

    def __init__(self, w: np.ndarray, old: np.ndarray, num_gpus: int, num_nodes: int, hierarchical: bool):
        num_layers, num_logical = w.shape
        num_physical = old.shape[1]
        G = num_gpus
        self.G, self.S, self.E = G, num_physical // G, num_logical
        self.w, self.phy = w, old.copy()
        rank_of_slot = np.arange(num_physical) // self.S
        flat = (np.arange(num_layers)[:, None] * G + rank_of_slot[None, :]) * num_logical + old
        self.nrk = np.bincount(flat.ravel(), minlength=num_layers * G * num_logical).reshape(
            num_layers, G, num_logical)
        self.nrkT = np.ascontiguousarray(self.nrk.transpose(0, 2, 1))  # [L, E, G], kept in step with nrk
        self.cnt = self.nrk.sum(axis=1)
        held = self.nrk > 0
        node_of_rank = np.arange(G) // (G // num_nodes)
        node_held = held.reshape(num_layers, num_nodes, G // num_nodes, num_logical).any(axis=2)
        self.cost01 = (~held).astype(np.int64)  # [L, G, E] 1 where a rank would need a transfer
        self.cost_w = np.where(held, 0.0, np.where(node_held[:, node_of_rank], 1.0, CROSS_NODE_WEIGHT))
        # Hierarchical: partners only on the heavy rank's node, so a node only gets experts it holds.
        self.other_node = (node_of_rank[:, None] != node_of_rank[None, :]) if hierarchical else None
        self.light = min(LIGHT_RANKS, G - 1)
        self.q = np.divide(w, self.cnt, out=np.zeros_like(w), where=self.cnt > 0)
        self.R = np.einsum("lge,le->lg", self.nrk.astype(np.float64), self.q)
        self.mean = self.R.mean(axis=1)
        self.spent = np.zeros(num_layers, dtype=np.int64)

    def balancedness(self) -> np.ndarray:
        peak = self.R.max(axis=1)
        return np.where(peak > 0, self.mean / np.where(peak > 0, peak, 1.0), 1.0)

    def step(self, active: np.ndarray) -> np.ndarray:
        """One move for each active layer.

        Returns:
            [layers, 2, 2] int64 (slot, new expert) changes, -1 where none; a layer
            with no change has no improving move left.
        """
        num_layers = self.R.shape[0]
        out = np.full((num_layers, 2, 2), -1, dtype=np.int64)
        li = np.flatnonzero(active)
        if li.size == 0 or self.G < 2:
            return out
        R = self.R[li]
        ar = np.arange(li.size)
        order = np.argsort(-R, axis=1, kind="stable")
        rstar = order[:, 0]
        M = R[ar, rstar]
        eps = _TIE * np.maximum(M, 1e-300)
        light, light_ok = self._partners(li, R, rstar[:, None], order[:, :1], self.light)
        light, light_ok = light[:, 0], light_ok[:, 0]
        swap = self._swap(li, R, rstar[:, None], light[:, None, :], light_ok[:, None, :], M, eps,
                          second=np.where(order[:, 1:2] == light, R[ar, order[:, 2]][:, None] if self.G > 2
                                          else -np.inf, R[ar, order[:, 1]][:, None]))
        repl = self._replica(li, R, rstar, light, light_ok, M, eps)
        use_swap = swap[0][:, 0] >= repl[0]
        go = np.maximum(swap[0][:, 0], repl[0]) > 0
        changes = np.full((li.size, 2, 2), -1, dtype=np.int64)
        self._apply_swaps(li, swap, go & use_swap, changes, 0)
        self._apply_replica(li, repl, go & ~use_swap, changes)
        out[li] = changes
        return out

    def _partners(self, li, R, heavy, busy, k):
        """The ``k`` lightest ranks for each heavy rank ([A, h] -> [A, h, k]), not in ``busy``."""
        ar = np.arange(li.size)
        Rm = np.broadcast_to(R[:, None, :], (li.size, heavy.shape[1], self.G)).copy()
        Rm[ar[:, None, None], np.arange(heavy.shape[1])[None, :, None], busy[:, None, :]] = np.inf
        if self.other_node is not None:
            Rm[self.other_node[heavy]] = np.inf
        if k < self.G:
            part = np.argpartition(Rm, k - 1, axis=2)[:, :, :k]
        else:
            part = np.argsort(Rm, axis=2)
        return part, np.isfinite(np.take_along_axis(Rm, part, axis=2))

    def _swap(self, li, R, heavy, part, part_ok, top_load, eps, second):
        """Best swap of a slot on each heavy rank with a slot on one of its partners.

        ``heavy`` [A, h]; ``part`` [A, h, k]; ``top_load`` [A] (primary: the max, scores
        count the new max with ``second``, the largest other load) or [A, h] (pairs).
        Returns (score, slot on heavy, slot on partner, heavy rank, partner rank), each [A, h].
        """
        S, ar = self.S, np.arange(li.size)
        A, h, k = part.shape
        hs = heavy[:, :, None] * S + np.arange(S)  # [A, h, S]
        ps = (part[:, :, :, None] * S + np.arange(S)).reshape(A, h, k * S)  # [A, h, kS]
        pr = np.repeat(part, S, axis=2)
        lay = li[:, None, None]
        hx, px = self.phy[lay, hs], self.phy[lay, ps]
        d = self.q[lay, hx][:, :, :, None] - self.q[lay, px][:, :, None, :]  # [A, h, S, kS]
        R_h = R[ar[:, None], heavy][:, :, None, None]
        R_p = R[ar[:, None, None], pr][:, :, None, :]
        new_h, new_p = R_h - d, R_p + d
        lay4 = lay[..., None]
        nrk, cw = self.nrk, self.cost_w
        ok = (np.repeat(part_ok, S, axis=2)[:, :, None, :] & (d > eps[:, None, None, None])
              & (new_p < R_h - eps[:, None, None, None])
              & (nrk[lay4, pr[:, :, None, :], hx[..., None]] == 0)
              & (nrk[lay, heavy[:, :, None], px] == 0)[:, :, None, :])
        dcost = (cw[lay, heavy[:, :, None], px][:, :, None, :] - cw[lay, heavy[:, :, None], hx][..., None]
                 + cw[lay4, pr[:, :, None, :], hx[..., None]] - cw[lay, pr, px][:, :, None, :])
        peak = np.maximum(new_h, new_p)
        if second is not None:
            peak = np.maximum(peak, np.repeat(second, S, axis=1)[:, None, None, :])
        top = top_load.reshape(A, -1)[:, :, None, None]
        score = self._score(li, top, peak, new_h, dcost, ok)
        flat = score.reshape(A, h, -1).argmax(axis=2)
        a, b = np.divmod(flat, k * S)
        pick = lambda x: np.take_along_axis(x, b[:, :, None], axis=2)[:, :, 0]  # noqa: E731
        best = np.take_along_axis(score.reshape(A, h, -1), flat[:, :, None], axis=2)[:, :, 0]
        return (best, np.take_along_axis(hs, a[:, :, None], axis=2)[:, :, 0], pick(ps), heavy, pick(pr))

    def _replica(self, li, R, rstar, light, light_ok, M, eps):
        """Best replica of the heaviest rank's heaviest expert onto a spare slot of a light rank."""
        S, ar = self.S, np.arange(li.size)
        w, q, cnt = self.w[li], self.q[li], self.cnt[li]
        q_more = w / (cnt + 1)
        on_hot = self.nrk[li, rstar]
        relief = np.where(on_hot > 0, on_hot * (q - q_more), -1.0)
        y = relief.argmax(axis=1)
        dy = q_more[ar, y] - q[ar, y]
        base = R + self.nrkT[li, y] * dy[:, None]  # [A, G]
        ls = (light[:, :, None] * S + np.arange(S)).reshape(li.size, -1)
        lr = ls // S
        lx = self.phy[li[:, None], ls]
        cx = cnt[ar[:, None], lx]
        q_less = np.divide(w[ar[:, None], lx], cx - 1, out=np.zeros(lx.shape), where=cx > 1)
        dx = q_less - q[ar[:, None], lx]
        R_new = base[:, None, :] + self.nrkT[li[:, None], lx] * dx[:, :, None]  # [A, kS, G]
        own = (q_more[ar, y][:, None] - q_less)
        R_new[ar[:, None], np.arange(ls.shape[1])[None, :], lr] += own
        new_max = R_new.max(axis=2)
        new_h = R_new[:, :, :][ar[:, None], np.arange(ls.shape[1])[None, :], rstar[:, None]]
        at_max_before = (R >= (M - eps)[:, None]).sum(axis=1)
        at_max_after = (R_new >= (M - eps)[:, None, None]).sum(axis=2)
        ok = (np.repeat(light_ok, S, axis=1) & (cx > 1) & (self.nrk[li[:, None], lr, y[:, None]] == 0)
              & (relief[ar, y] > 0)[:, None] & (new_h < (M - eps)[:, None])
              & ((new_max < (M - eps)[:, None]) | ((new_max <= (M + eps)[:, None])
                                                   & (at_max_after < at_max_before[:, None]))))
        cw = self.cost_w
        dcost = cw[li[:, None], lr, y[:, None]] - cw[li[:, None], lr, lx]
        score = self._score(li, M[:, None], new_max, new_h, dcost, ok)
        b = score.argmax(axis=1)
        return (score[ar, b], ls[ar, b], y, lr[ar, b], lx[ar, b], R_new[ar, b])

    def _score(self, li, M, new_max, new_h, dcost, ok):
        """Balancedness bought per weighted slot (ties broken by the heavy rank's relief)."""
        shape = (-1,) + (1,) * (new_max.ndim - 1)
        mean = self.mean[li].reshape(shape)
        Mb = np.where(M > 0, M, 1.0)
        safe = np.where(new_max > 0, new_max, 1.0)
        gain = mean / safe - mean / Mb + 1e-6 * (M - new_h) / Mb
        return np.where(ok, gain / np.maximum(dcost, 0.25), -np.inf)

    def _count(self, lay, rank, expert, delta):
        self.nrk[lay, rank, expert] += delta
        self.nrkT[lay, expert, rank] += delta

    def _apply_swaps(self, li, swap, sel, changes, col):
        score, hs, ps, hr, pr = (x[:, 0] if x.ndim == 2 else x for x in swap)
        if not sel.any():
            return
        rows = np.flatnonzero(sel)
        lay = li[rows]
        hs, ps, hr, pr = hs[rows], ps[rows], hr[rows], pr[rows]
        xh, xp = self.phy[lay, hs], self.phy[lay, ps]
        self.phy[lay, hs], self.phy[lay, ps] = xp, xh
        # Loads from the current per-replica loads (a replica move this step may have changed them).
        d = self.q[lay, xh] - self.q[lay, xp]
        self.R[lay, hr] -= d
        self.R[lay, pr] += d
        for r, a, b in ((hr, xh, xp), (pr, xp, xh)):
            self._count(lay, r, a, -1)
            self._count(lay, r, b, 1)
            self.spent[lay] += self.cost01[lay, r, b] - self.cost01[lay, r, a]
        changes[rows, col] = np.stack([hs, xp], axis=1)
        changes[rows, col + 1] = np.stack([ps, xh], axis=1)

    def _apply_replica(self, li, repl, sel, changes):
        if not sel.any():
            return
        rows = np.flatnonzero(sel)
        lay = li[rows]
        _, s, y, r, x, R_row = (v[rows] for v in repl)
        self.phy[lay, s] = y
        self._count(lay, r, x, -1)
        self._count(lay, r, y, 1)
        self.R[lay] = R_row
        self.cnt[lay, x] -= 1
        self.cnt[lay, y] += 1
        for e in (x, y):
            self.q[lay, e] = self.w[lay, e] / self.cnt[lay, e]
        self.spent[lay] += self.cost01[lay, r, y] - self.cost01[lay, r, x]
        changes[rows, 0] = np.stack([s, y], axis=1)


def _greedy_overlap_cost(new: np.ndarray, old: np.ndarray, num_gpus: int, num_logical: int) -> np.ndarray:
    """An upper bound on the slots a relabelled full re-plan moves: greedy rank matching, all layers at once."""
    keep = rank_overlap(new, old, num_gpus, num_logical).astype(np.float64)
    layers = new.shape[0]
    kept = np.zeros(layers)
    for _ in range(num_gpus):
        flat = keep.reshape(layers, -1).argmax(axis=1)
        i, j = np.divmod(flat, num_gpus)
        kept += keep[np.arange(layers), i, j]
        keep[np.arange(layers), i, :] = -1.0
        keep[np.arange(layers), :, j] = -1.0
    return new.shape[1] - kept.astype(np.int64)


def _frontier(costs: list[int], bals: list[float]) -> list[tuple[int, float, int]]:
    """Pareto points (cost, balancedness, option) with cost >= 0, balancedness rising with cost."""
    pts = sorted(((max(c, 0), -b, i) for i, (c, b) in enumerate(zip(costs, bals))))
    out: list[tuple[int, float, int]] = []
    for c, nb, i in pts:
        if not out or -nb > out[-1][1] + 1e-12:
            if out and out[-1][0] == c:
                out.pop()
            out.append((c, -nb, i))
    return out


def _hull_segments(fronts: list[list[tuple[int, float, int]]]) -> list[tuple[float, int, int, tuple, int]]:
    """Segments of each frontier's upper concave hull, steepest (most balancedness per slot) first."""
    segs = []
    for layer, f in enumerate(fronts):
        hull = [f[0]]
        for p in f[1:]:
            while len(hull) >= 2 and ((hull[-1][1] - hull[-2][1]) * (p[0] - hull[-2][0])
                                      <= (p[1] - hull[-2][1]) * (hull[-1][0] - hull[-2][0])):
                hull.pop()
            hull.append(p)
        for k in range(1, len(hull)):
            dc, db = hull[k][0] - hull[k - 1][0], hull[k][1] - hull[k - 1][1]
            segs.append((-db / dc, layer, k, hull[k], hull[k - 1][0]))
    segs.sort(key=lambda s: (s[0], s[1], s[2]))
    return segs


def _allocate(fronts: list[list[tuple[int, float, int]]], budget: int | None = None,
              goal: float | None = None) -> list[int]:
    """Pick one option per layer, buying the most balancedness per slot first.

    Stops when ``budget`` slots are spent (a hull step that does not fit is replaced by
    the best frontier point of that layer that does) or when the balancedness summed
    over layers reaches ``goal``.
    """
    pick = [f[0][2] for f in fronts]
    spent = [f[0][0] for f in fronts]
    total = sum(f[0][1] for f in fronts)
    left = float("inf") if budget is None else budget - sum(spent)
    closed: set[int] = set()
    for _, layer, _, point, start in _hull_segments(fronts):
        if goal is not None and total >= goal:
            break
        if layer in closed:
            continue
        if point[0] - start <= left:
            left -= point[0] - start
            total += point[1] - next(p[1] for p in fronts[layer] if p[2] == pick[layer])
            spent[layer], pick[layer] = point[0], point[2]
            continue
        reach = [p for p in fronts[layer] if spent[layer] < p[0] <= spent[layer] + left]
        if reach:
            left -= reach[-1][0] - spent[layer]
            total += reach[-1][1] - next(p[1] for p in fronts[layer] if p[2] == pick[layer])
            spent[layer], pick[layer] = reach[-1][0], reach[-1][2]
        closed.add(layer)
    return pick


def plan_incremental(weight: torch.Tensor | np.ndarray, num_replicas: int, num_groups: int, num_nodes: int,
                     num_gpus: int, old_phy2log: torch.Tensor | np.ndarray,
                     move_budget: int | None = None, *, tolerance: float = TOLERANCE,
                     max_steps: int | None = None) -> IncrementalPlan:
    """Improve ``old_phy2log`` for ``weight`` with few moves (see the module docstring).

    Args:
        weight: [layers, num_logical] load per logical expert.
        num_replicas, num_groups, num_nodes, num_gpus: as for ``rebalance_experts``.
        old_phy2log: [layers, num_replicas] integer placement in force; must hold every expert.
        move_budget: at most this many slots (over all layers) receive an expert from
            another rank; None: per layer the cheapest option within ``tolerance``.
        tolerance: balancedness a layer may give up against its best option when
            ``move_budget`` is None.
        max_steps: cap on search moves per layer (default ``num_replicas // 4``, at least 8).

    Returns:
        An :class:`IncrementalPlan`.
    """
    w = check_weight(weight)
    num_layers, num_logical = w.shape
    check_args(num_logical, num_replicas, num_groups, num_nodes, num_gpus)
    old = _int_array(old_phy2log, "old_phy2log")
    if old.shape != (num_layers, num_replicas):
        raise PolicyError(f"old_phy2log shape {tuple(old.shape)} does not match [layers, num_replicas]"
                          f" = {(num_layers, num_replicas)}")
    if move_budget is not None and (isinstance(move_budget, bool) or not isinstance(move_budget, (int, np.integer))
                                    or move_budget < 0):
        raise PolicyError(f"move_budget must be None or an integer >= 0, got {move_budget!r}")
    if (old < 0).any() or (old >= num_logical).any() or not _holds_every_expert(old, num_logical):
        raise PolicyError("old_phy2log must hold every logical expert in every layer, ids 0..num_logical-1")
    hierarchical = num_groups % num_nodes == 0 and num_nodes > 1
    search = _Search(w, old, num_gpus, num_nodes, hierarchical)
    before = search.balancedness()
    if move_budget == 0 or num_layers == 0:
        return IncrementalPlan(torch.from_numpy(old.copy()), ["kept"] * num_layers,
                               np.zeros(num_layers, dtype=np.int64), before, before.copy(), before.copy())

    replan = rebalance_experts(w, num_replicas, num_groups, num_nodes, num_gpus)[0].numpy()
    replan_bal = _predicted(w, replan, num_gpus)
    replan_cost = _greedy_overlap_cost(replan, old, num_gpus, num_logical)

    steps = max(40, num_replicas // 4) if max_steps is None else max_steps
    cap = np.full(num_layers, np.iinfo(np.int64).max if move_budget is None else int(move_budget))
    target = replan_bal
    history = []
    costs, bals = [search.spent.copy()], [before]
    active = np.ones(num_layers, dtype=bool)
    goal = float(replan_bal.sum()) * (1.0 - tolerance)
    for _ in range(steps):
        if move_budget is None:
            active &= bals[-1] < target
        active &= search.spent < cap
        if not active.any():
            break
        changes = search.step(active)
        active &= (changes[:, :, 0] >= 0).any(axis=1)
        history.append(changes)
        costs.append(search.spent.copy())
        bals.append(search.balancedness())
    costs_a, bals_a = np.stack(costs), np.stack(bals)  # [steps + 1, L]

    n_opts = costs_a.shape[0]
    options = []
    for layer in range(num_layers):
        c = costs_a[:, layer].tolist() + [int(replan_cost[layer])]
        b = bals_a[:, layer].tolist() + [float(replan_bal[layer])]
        options.append((c, b))
    fronts = [_frontier(c, b) for c, b in options]
    if move_budget is None:
        pick = _allocate(fronts, goal=goal)
    else:
        pick = _allocate(fronts, budget=int(move_budget))

    new = old.copy()
    for k, changes in enumerate(history):
        take = np.array([k < p < n_opts for p in pick])
        for j in range(changes.shape[1]):
            sel = take & (changes[:, j, 0] >= 0)
            new[sel, changes[sel, j, 0]] = changes[sel, j, 1]
    re_layers = [layer for layer, p in enumerate(pick) if p == n_opts]
    if re_layers:
        part = replan[re_layers]
        order = stable_rank_order(part, old[re_layers], num_gpus, num_nodes, num_logical, hierarchical)
        part = apply_rank_order(part, order, num_gpus)
        new[re_layers] = preserve_local_slots(part, old[re_layers], num_gpus).numpy()
    choice = ["replan" if p == n_opts else ("moves" if p > 0 and not np.array_equal(new[i], old[i]) else "kept")
              for i, p in enumerate(pick)]
    moved = _moved(old, new, num_gpus)
    return IncrementalPlan(torch.from_numpy(new), choice, moved, before, _predicted(w, new, num_gpus), replan_bal)


def _holds_every_expert(old: np.ndarray, num_logical: int) -> bool:
    off = np.arange(old.shape[0])[:, None] * num_logical
    return bool((np.bincount((old + off).ravel(), minlength=old.shape[0] * num_logical) > 0).all())


def _predicted(w: np.ndarray, phy2log: np.ndarray, num_gpus: int) -> np.ndarray:
    return predicted_balancedness(w, phy2log, num_gpus).numpy()


def _moved(old: np.ndarray, new: np.ndarray, num_gpus: int) -> np.ndarray:
    return moved_slots(old, new, num_gpus).numpy()


class IncrementalPolicy(Policy):
    """Movement-aware re-planning from the placement in force (see the module docstring).

    Without ``old_phy2log``, or with one of another shape, it plans like ``default``.
    """

    name = "incremental"

    def rebalance(self, weight, num_replicas, num_groups, num_nodes, num_gpus, old_phy2log=None,
                  move_budget=None):  # noqa: ANN001 - documented on Policy.rebalance
        self.last_plan: IncrementalPlan | None = None
        if old_phy2log is None or tuple(old_phy2log.shape) != (len(weight), num_replicas):
            return rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_gpus)[0]
        self.last_plan = plan_incremental(weight, num_replicas, num_groups, num_nodes, num_gpus, old_phy2log,
                                          move_budget)
        return self.last_plan.phy2log

    def describe(self) -> str:
        return self.last_plan.summary() if getattr(self, "last_plan", None) is not None else ""


register_policy("incremental", IncrementalPolicy)
