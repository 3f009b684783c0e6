"""The ``incremental`` policy: keep most experts where they are, move only what buys balance.

A full re-plan (``default``) reaches its balance by recomputing every slot; after a
small drift in load most slots then need an expert from another rank. This policy
starts from the placement in force and repairs it, all layers at once (every step
is a few numpy operations over ``[layers, ...]`` arrays):

0. *regroup* (hierarchical case only): a layer whose placement splits an expert group over
   nodes (the engine's initial layout does) first takes, node by node, the replicas the full
   re-plan puts on that node (nodes relabelled to keep the most), changing only the slots whose
   expert the node no longer wants; the steps below then balance the ranks inside each node;
1. *split*: an expert whose per-replica load is too large to fit on any rank under
   the target gets one more replica, in the slot of an expert that has a spare
   replica, on the rank that ends up lightest (one slot receives a remote expert);
2. *retarget*: the heaviest rank is relieved with one slot where that suffices: a spare
   replica on a lighter rank of its zone becomes another copy of one of its experts, if
   that brings it down to the next rank's load or the target and pushes no other rank
   above the target (a swap always moves two slots);
3. *swap rounds*: the ranks above the target are paired with the lightest ranks
   (heaviest with lightest, second with second, ...) and every pair exchanges the
   two experts that bring both under the target, or as close to it as they can
   (preferring exchanges that move fewer slots, e.g. an expert back to a rank that
   held it). A round makes one swap in every pair at once; rounds repeat until no
   rank is above the target.

The target is the predicted balancedness of the ``default`` policy's full re-plan on
the same load (balancedness of a layer = mean rank load / max rank load). Every
regroup, split, retarget and swap is an *option*: a layer can stop after any of
them (swaps ranked by the heavy rank's load, so each prefix lowers the layer's peak).
A second family of options starts instead from the *projection* of the placement in
force onto the full re-plan's replica counts per node (its nodes relabelled to keep
the most; one zone when global): every slot keeps its expert while its node still
wants a copy, the freed slots take the missing replicas heaviest first, and steps 1-3
then repair that (both paths are searched together, as two rows per layer of one
layout; after a large shift in the hierarchical case, whole groups must change nodes,
which only the projection and the re-plan do). A layer's last option is the full re-plan
itself, its ranks relabelled to keep what they hold. The budget picks one option per layer, buying the most balancedness per
moved slot first (a Lagrangian price per slot, bisected):

- ``move_budget=None`` (the default): the least movement that keeps ``keep`` (99%)
  of the full re-plan's gain: predicted balancedness summed over layers at least
  ``before + keep * (re-plan - before)``, so the trade-off holds whether a re-plan
  gains 0.02 or 0.3; a layer already balanced moves nothing. A layer whose repair would
  cost at least ``fresh_share`` (half) of the full re-plan's moves takes the
  full re-plan instead, unless the repair balances it better: the placement in
  force is then far from anything the load wants (typically the engine's initial
  layout), and the re-plan's extra moves buy a layout chosen for this load. (Half,
  not less: on the GPT-OSS trace repairing such layers keeps the gain for fewer
  moves. Where every rank of the initial layout serves its own independent token
  stream, as in the benchmark's ``blocks`` derivation, only a re-plan undoes that:
  repairing keeps ~92% of the gain there, and ``fresh_share=0.25`` all of it);
- ``move_budget=N``: at most ``N`` slots in the whole plan receive an expert from
  another rank; the budget goes where it buys most balance per slot;
- ``move_budget=0``: the placement is returned unchanged.

Replica counts change only where an expert cannot fit otherwise (step 1) or where
one slot relieves the heaviest rank (step 2), not to follow each window's hottest
experts: on the benchmark traces re-assigning replicas every plan costs moves and
makes balance on the *following* steps worse.

Node locality: with several nodes in the hierarchical case (``num_groups %
num_nodes == 0``) ranks are paired within their node and a split or retarget only
adds a replica on a node that already holds the expert, so every transfer stays on
intra-node links and each node keeps serving its expert groups (the full re-plan
option, and the regroup of a layout that splits groups, move whole groups between
nodes, at their cost).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from eplbd.errors import PolicyError
from eplbd.policy.balance import predicted_balancedness
from eplbd.policy.default import as_float32, check_args, check_weight, plan_checked, rebalance_experts
from eplbd.policy.matching import apply_rank_order, assignment_batch, rank_overlap, stable_rank_order_from
from eplbd.policy.placement import _int_array, preserve_local_slots
from eplbd.policy.registry import Policy, register_policy

KEEP = 0.99  # a plan keeps >= 99% of the full re-plan's gain in predicted balancedness (summed over layers)
FRESH_SHARE = 0.5
MAX_ROUNDS = 24
MAX_RETARGETS = 24
MAX_SPLITS = 4  # split iterations (one split per layer each)
_TIE = 1e-9  # relative: loads closer than this count as equal
_COST_TIE = 1e-4  # relative to the mean rank load: one moved slot outweighs a load difference below this
_FAR = 1e300  # search keys at or above this rule a candidate out (keys of candidates allowed are loads, far below)


@dataclass
class IncrementalPlan:
    """What :func:`plan_incremental` chose.

    Attributes:
        phy2log: [layers, num_physical] int64, the new placement.
        choice: per layer, ``"kept"`` (unchanged), ``"moves"`` (the repair's moves),
            ``"project"`` (the re-plan's replica counts per node, then the repair's moves) or
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
        counts = {c: self.choice.count(c) for c in ("kept", "moves", "project", "replan")}
        return (f"incremental: {counts['moves']} layer(s) by moves, {counts['project']} projected, "
                f"{counts['replan']} re-planned, "
                f"{counts['kept']} kept; {int(self.moved.sum())} slots moved; predicted "
                f"{self.after.mean():.4f} vs full re-plan {self.replan.mean():.4f}")


@dataclass
class _Options:
    """The options of every layer, in the order the search made them.

    ``cost[k, l]`` / ``bal[k, l]``: slots moved and predicted balancedness of layer ``l``
    if it stops after option ``k`` (0 = unchanged). ``changes``: per search step, the
    (layer, slot, new expert, option) writes it made, in order.
    """

    cost: list[np.ndarray]
    bal: list[np.ndarray]
    changes: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]

    def add(self, rows: np.ndarray, slots: np.ndarray, experts: np.ndarray, cost: np.ndarray,
            bal: np.ndarray) -> None:
        """One option for every layer: the writes of one search step (all in this option), and the
        cost and balancedness of every layer after it."""
        self.changes.append((rows, slots, experts, np.full_like(rows, len(self.cost))))
        self.cost.append(cost)
        self.bal.append(bal)


class _Layout:
    """The placement under repair, all layers at once (numpy, float64 loads).

    Ranks are grouped in *zones* (nodes in the hierarchical case, else one zone):
    every move stays inside a zone.
    """

    def __init__(self, w: np.ndarray, old: np.ndarray, num_gpus: int, zones: int, holds: np.ndarray | None = None):
        self.w, self.old, self.phy = w, old, old.copy()
        # [layers, experts, ranks]: copies held now (``holds``: those of ``old`` when the caller has them)
        self.holds = _copies(old, num_gpus, w.shape[1]) if holds is None else holds
        self.held = (self.holds > 0).view(np.uint8)  # ... and whether held before (as held_by_rank)
        self.L, self.E = w.shape
        self.P = old.shape[1]
        self.G, self.S, self.Gz = num_gpus, self.P // num_gpus, num_gpus // zones
        self.lay = np.arange(self.L)
        self.slot_rank = np.arange(self.P) // self.S
        self.refresh()
        self.mean = self.R.mean(axis=1)

    def set_phy(self, phy: np.ndarray, rows: np.ndarray) -> None:
        """Start the repair from ``phy`` (moves still counted from ``old``); only the rows ``rows`` differ
        from the placement the layout holds now."""
        self.phy = phy
        self.holds[rows] = _copies(phy[rows], self.G, self.E)
        self.refresh(rows)

    def refresh(self, rows: np.ndarray | None = None) -> None:
        """Replica counts, per-replica loads and rank loads from ``phy`` (of the rows ``rows``, distinct; all
        if None)."""
        if rows is None:
            rows = self.lay
        phy, n = self.phy[rows], len(rows)
        cnt = np.bincount((phy + np.arange(n)[:, None] * self.E).ravel(), minlength=n * self.E).reshape(n, self.E)
        q = self.w[rows] / np.maximum(cnt, 1)
        R = np.take_along_axis(q, phy, axis=1).reshape(n, self.G, self.S).sum(axis=2)
        if n == self.L:
            self.cnt, self.q, self.R = cnt, q, R
        else:
            self.cnt[rows], self.q[rows], self.R[rows] = cnt, q, R

    def balancedness(self, peak: np.ndarray | None = None) -> np.ndarray:
        peak = self.R.max(axis=1) if peak is None else peak
        return np.where(peak > 0, self.mean / np.where(peak > 0, peak, 1.0), 1.0)

    def spent(self) -> np.ndarray:
        """[layers] slots holding an expert their rank did not hold in the old placement."""
        return _moved(self.held, self.phy, self.slot_rank)

    def split(self, target: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Give one more replica to each layer's largest item if it cannot fit on a rank under ``target``.

        The replica takes the slot of an expert with a spare replica whose per-replica load
        after losing it stays below the split expert's, on the rank left lightest, in a zone
        that holds the expert, on a rank that does not.

        Returns:
            (layers, slots, new experts) of the writes made.
        """
        lay, S, L = self.lay, self.S, self.L
        items = np.take_along_axis(self.q, self.phy, axis=1)
        small = np.sort(items, axis=1)[:, :S - 1].sum(axis=1)
        top = items.argmax(axis=1)
        y, qy = self.phy[lay, top], items[lay, top]
        need = qy + small > target * (1 + _TIE)
        if not need.any():
            return (np.zeros(0, dtype=np.int64),) * 3
        zone = self.slot_rank // self.Gz
        y_slots = self.phy == y[:, None]
        y_zones = np.zeros((L, self.G // self.Gz), dtype=bool)
        yl, ys = np.nonzero(y_slots)
        y_zones[yl, zone[ys]] = True
        rank_has_y = (y_slots.reshape(L, self.G, S).any(axis=2))[:, self.slot_rank]
        cx = self.cnt[lay[:, None], self.phy]
        after = np.where(cx >= 2, self.w[lay[:, None], self.phy] / np.maximum(cx - 1, 1), np.inf)
        ok = (cx >= 2) & ~y_slots & ~rank_has_y & y_zones[:, zone] & (after < qy[:, None] * (1 - _TIE))
        qy_new = self.w[lay, y] / (self.cnt[lay, y] + 1)
        key = np.where(ok, self.R[:, self.slot_rank] - items + qy_new[:, None], np.inf)
        slot = key.argmin(axis=1)
        go = need & np.isfinite(key[lay, slot])
        rows, slot, y = lay[go], slot[go], y[go]
        self.holds[rows, self.phy[rows, slot], self.slot_rank[slot]] -= 1
        self.holds[rows, y, self.slot_rank[slot]] += 1
        self.phy[rows, slot] = y
        self.refresh(rows)
        return rows, slot, y

    def retarget(self, target: np.ndarray, among: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Relieve the heaviest rank of each layer in ``among`` with one slot: a spare replica on a
        lighter rank of its zone becomes one more copy of one of the heavy rank's experts.

        Only where that brings the heavy rank down to ``max(target, second-highest load)`` while the
        receiving rank and the spare's other holders stay under ``target``.

        Returns:
            (layers, slots, new experts, change in moved slots) of the writes made.
        """
        S, E, G, D = self.S, self.E, self.G, min(8, self.P)
        none = (np.zeros(0, dtype=np.int64),) * 4
        sub = among[self.R[among].max(axis=1) > target[among] * (1 + _TIE)]
        if sub.size == 0:
            return none
        R, tgt = self.R[sub], target[sub]
        h = R.argmax(axis=1)
        Rh = R[np.arange(sub.size), h]
        goal = np.maximum(tgt, np.partition(R, G - 2, axis=1)[:, G - 2]) * (1 + _TIE)
        cap = tgt * (1 + _TIE)
        s2 = sub[:, None]
        phy = self.phy[sub]
        cnt, w, q = self.cnt.ravel(), self.w.ravel(), self.q.ravel()
        x = np.take_along_axis(phy, h[:, None] * S + np.arange(S), axis=1)  # [A, S] experts on the heavy rank
        ex = s2 * E + x  # flat [layer, expert]
        cx, wx = cnt.take(ex), w.take(ex)
        add = wx / (cx + 1)
        holds = self.holds.ravel()
        kx = holds.take(ex * G + h[:, None])
        rh_new = Rh[:, None] - kx * (wx / cx - add)
        # Donor slots: an expert with a spare replica, once on its rank, in the heavy rank's zone.
        eb = s2 * E + phy  # flat [layer, expert] of every slot
        cb = cnt.take(eb)
        spare = cb >= 2
        qb = q.take(eb)
        Rs = np.repeat(R, S, axis=1)
        top = np.full(sub.size * E, -np.inf)
        key_b = eb + ((np.arange(sub.size) - sub) * E)[:, None]  # [row of sub, expert]
        np.maximum.at(top, key_b[spare], Rs[spare])
        rise = w.take(eb) / np.maximum(cb - 1, 1) - qb
        other = np.where(spare, top.take(key_b) + rise, np.inf)  # conservative: max over every holder, this one too
        ok = (spare & (other <= cap[:, None]) & (self.slot_rank[None, :] != h[:, None])
              & ((self.slot_rank // self.Gz)[None, :] == (h // self.Gz)[:, None])
              & (holds.take(eb * G + self.slot_rank[None, :]) == 1))
        base = np.where(ok, Rs - qb, np.inf)
        cand = np.argpartition(base, D - 1, axis=1)[:, :D]  # [A, D] donor slots, lightest after the drop
        cbase = np.take_along_axis(base, cand, axis=1)
        crank = self.slot_rank[cand]
        new_r = cbase[:, None, :] + add[:, :, None]  # [A, S, D]
        x_at = ex[:, :, None] * G + crank[:, None, :]
        held = self.held.ravel()
        dcost = (held.take(np.take_along_axis(eb, cand, axis=1) * G + crank)[:, None, :].astype(np.int64)
                 - held.take(x_at))
        peak = np.maximum(np.maximum(rh_new[:, :, None], new_r), np.take_along_axis(other, cand, axis=1)[:, None, :])
        good = (np.isfinite(cbase)[:, None, :] & (holds.take(x_at) == 0) & (rh_new[:, :, None] <= goal[:, None, None])
                & (new_r <= cap[:, None, None]))
        cost_w = (_COST_TIE * self.mean[sub])[:, None, None]
        key = np.where(good, np.maximum(peak, tgt[:, None, None]) + cost_w * dcost + _TIE * peak, np.inf)
        key = key.reshape(sub.size, -1)
        best = key.argmin(axis=1)
        a = np.flatnonzero(np.isfinite(key[np.arange(sub.size), best]))
        if a.size == 0:
            return none
        ix, idd = np.divmod(best[a], D)
        rows, slot, xe = sub[a], cand[a, idd], x[a, ix]
        dc = dcost[a, ix, idd]
        rk = self.slot_rank[slot]
        self.holds[rows, self.phy[rows, slot], rk] -= 1
        self.holds[rows, xe, rk] += 1
        self.phy[rows, slot] = xe
        self.refresh(rows)
        return rows, slot, xe, dc

    def pairs(self, act: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Heavy and light rank of every pair of the rows ``act``, [rows, pairs]: i-th heaviest with i-th
        lightest per zone."""
        zones, half = self.G // self.Gz, self.Gz // 2
        order = np.argsort(-self.R[act].reshape(len(act), zones, self.Gz), axis=2, kind="stable")
        order += (np.arange(zones) * self.Gz)[None, :, None]
        heavy = order[:, :, :half].reshape(len(act), -1)
        light = order[:, :, ::-1][:, :, :half].reshape(len(act), -1)
        return heavy, light

    def swap_round(self, target: np.ndarray, active: np.ndarray, opts: _Options) -> np.ndarray:
        """One swap in every pair whose heavy rank is above ``target`` (see the module docstring).

        Appends one option per pair (pairs by heavy load, descending) to ``opts``; only the rows
        ``active`` are searched (the others keep their last option).

        Returns:
            [layers] bool, layers that made a swap.
        """
        act = np.flatnonzero(active)
        A = act.size
        heavy, light = self.pairs(act)
        a2 = act[:, None]
        Rh, Rl = self.R[a2, heavy], self.R[a2, light]
        ri, cols = np.nonzero(Rh > target[act][:, None] * (1 + _TIE))
        rows = act[ri]
        swap = _best_swaps(self, rows, heavy[ri, cols], light[ri, cols], target[rows])
        go = np.zeros(heavy.shape, dtype=bool)
        go[ri, cols] = swap.ok
        dcost, moved = np.zeros(heavy.shape, dtype=np.int64), np.zeros(heavy.shape)
        dcost[ri, cols], moved[ri, cols] = np.where(swap.ok, swap.dcost, 0), swap.moved
        # Options: pairs by heavy load; peak after the first k = max(new loads of those k, old loads of the rest).
        old_pair = np.maximum(Rh, Rl)
        new_pair = np.where(go, np.maximum(Rh - moved, Rl + moved), old_pair)
        by = None  # one zone: pairs() already ranks by load
        if self.Gz < self.G:
            by = np.argsort(-Rh, axis=1, kind="stable")
            old_pair = np.take_along_axis(old_pair, by, axis=1)
            new_pair = np.take_along_axis(new_pair, by, axis=1)
        rest = np.maximum.accumulate(old_pair[:, ::-1], axis=1)[:, ::-1]
        rest = np.concatenate([rest[:, 1:], np.full((A, 1), -np.inf)], axis=1)
        if 2 * heavy.shape[1] < self.G:  # odd zones leave one rank per zone unpaired
            paired = np.zeros((A, self.G), dtype=bool)
            ar = np.arange(A)[:, None]
            paired[ar, heavy] = paired[ar, light] = True
            rest = np.maximum(rest, np.where(paired, -np.inf, self.R[act]).max(axis=1, initial=-np.inf)[:, None])
        peak = np.maximum(np.maximum.accumulate(new_pair, axis=1), rest)
        base = len(opts.cost)
        cost = np.repeat(opts.cost[-1][None], heavy.shape[1], axis=0)
        cost[:, act] = (opts.cost[-1][act][:, None]
                        + np.cumsum(dcost if by is None else np.take_along_axis(dcost, by, axis=1), axis=1)).T
        bal = np.repeat(opts.bal[-1][None], heavy.shape[1], axis=0)
        mean = self.mean[act][:, None]
        bal[:, act] = np.where(peak > 0, mean / np.where(peak > 0, peak, 1.0), 1.0).T
        opts.cost.extend(cost)
        opts.bal.extend(bal)
        sel = swap.ok
        i, c, hs, ls, xa, xb = ri[sel], cols[sel], swap.slot_h[sel], swap.slot_l[sel], swap.xa[sel], swap.xb[sel]
        r, h, l = act[i], heavy[i, c], light[i, c]
        self.phy[r, hs], self.phy[r, ls] = xb, xa
        self.R[r, h] -= swap.moved[sel]
        self.R[r, l] += swap.moved[sel]
        holds, E, G = self.holds.ravel(), self.E, self.G
        for expert, give, take in ((xa, h, l), (xb, l, h)):
            at = (r * E + expert) * G
            holds[at + give] -= 1
            holds[at + take] += 1
        if by is None:
            option = base + c
        else:
            rank_in = np.empty_like(by)
            np.put_along_axis(rank_in, by, np.arange(by.shape[1])[None, :].repeat(A, 0), axis=1)
            option = base + rank_in[i, c]
        opts.changes.append((np.concatenate([r, r]), np.concatenate([hs, ls]), np.concatenate([xb, xa]),
                             np.concatenate([option, option])))
        out = np.zeros(self.L, dtype=bool)
        out[act] = go.any(axis=1)
        return out


@dataclass
class _Swaps:
    """The best swap of each pair (arrays over the pairs searched)."""

    ok: np.ndarray
    slot_h: np.ndarray
    slot_l: np.ndarray
    xa: np.ndarray  # expert leaving the heavy rank
    xb: np.ndarray  # expert leaving the light rank
    moved: np.ndarray  # load moved from heavy to light
    dcost: np.ndarray  # change in moved slots


def _best_swaps(lay: _Layout, rows: np.ndarray, heavy: np.ndarray, light: np.ndarray,
                target: np.ndarray) -> _Swaps:
    """For pairs (layer ``rows``, ranks ``heavy`` and ``light``): the exchange of one slot each that
    brings the pair's larger load under ``target`` (else lowest), fewest moved slots next, lowest peak last."""
    S, r2, h2, l2 = lay.S, rows[:, None], heavy[:, None], light[:, None]
    hs, ls = h2 * S + np.arange(S), l2 * S + np.arange(S)  # [A, S]
    phy = lay.phy.ravel()
    a, b = phy.take(r2 * lay.P + hs), phy.take(r2 * lay.P + ls)
    ea, eb = r2 * lay.E + a, r2 * lay.E + b  # flat [layer, expert] offsets
    at_a, at_b = ea * lay.G, eb * lay.G  # flat [layer, expert, 0] offsets
    holds, held = lay.holds.ravel(), lay.held.ravel()
    # Moved slots (a slot counts when its rank did not hold its expert before): a goes heavy -> light, b back.
    da = held.take(at_a + h2).astype(np.float64) - held.take(at_a + l2)
    db = held.take(at_b + l2).astype(np.float64) - held.take(at_b + h2)
    R = lay.R.ravel()
    Rh, Rl = R.take(rows * lay.G + heavy), R.take(rows * lay.G + light)
    mean = lay.mean.take(rows)
    mean = np.where(mean > 0, mean, 1.0)
    q = lay.q.ravel()
    d = q.take(ea)[:, :, None] - q.take(eb)[:, None, :]  # load moved heavy -> light
    # Exchanges ruled out get a penalty of _FAR or more (branch-free, unlike a masked write): d must lie in
    # (eps, Rh - Rl - eps), and a rank never takes a second copy of an expert it holds.
    eps = (_TIE * Rh)[:, None, None]
    out = np.less_equal(d, eps)
    out |= np.greater_equal(d, (Rh - Rl)[:, None, None] - eps)
    cost_w = (_COST_TIE * mean)[:, None]
    ta, tb = cost_w * da, cost_w * db
    ta[holds.take(at_a + l2) > 0] += _FAR
    tb[holds.take(at_b + h2) > 0] += _FAR
    # The pair's new peak is mid + |d - half|; rank by max(peak, target), then moved slots, then peak.
    dev = d - (0.5 * (Rh - Rl))[:, None, None]
    np.abs(dev, out=dev)
    key = np.maximum(dev, (target - 0.5 * (Rh + Rl))[:, None, None])
    key += ta[:, :, None]
    key += tb[:, None, :]
    dev *= _TIE
    key += dev
    key += out * _FAR
    key = key.reshape(len(rows), -1)
    best = key.argmin(axis=1)
    ia, ib = np.divmod(best, S)
    ar = np.arange(len(rows))
    return _Swaps(ok=key[ar, best] < _FAR, slot_h=hs[ar, ia], slot_l=ls[ar, ib], xa=a[ar, ia], xb=b[ar, ib],
                  moved=d[ar, ia, ib], dcost=np.rint(da[ar, ia] + db[ar, ib]).astype(np.int64))


def _copies(phy2log: np.ndarray, num_ranks: int, num_logical: int) -> np.ndarray:
    """[layers, num_logical, num_ranks] int16: copies of each expert on each rank."""
    layers, num_physical = phy2log.shape
    rank = np.arange(num_physical) // (num_physical // num_ranks)
    flat = ((np.arange(layers)[:, None] * num_logical + phy2log) * num_ranks + rank[None, :]).ravel()
    out = np.zeros(layers * num_logical * num_ranks, dtype=np.int16)
    out[flat] = 1
    # A rank may hold an expert twice: count the repeats (equal neighbours once each rank's slots are sorted).
    by_rank = np.sort(phy2log.reshape(layers, num_ranks, -1), axis=2)
    again = by_rank[:, :, 1:] == by_rank[:, :, :-1]
    if again.any():
        lr, rk, _ = np.nonzero(again)
        np.add.at(out, (lr * num_logical + by_rank[:, :, 1:][again]) * num_ranks + rk, 1)
    return out.reshape(layers, num_logical, num_ranks)


def _moved(held: np.ndarray, phy: np.ndarray, slot_rank: np.ndarray) -> np.ndarray:
    """[layers] slots of ``phy`` whose rank did not hold their expert before (``held``: [layers, experts,
    ranks] of the old placement, as :func:`~eplbd.policy.placement.moved_slots` counts)."""
    layers, num_logical, num_ranks = held.shape
    flat = (np.arange(layers)[:, None] * num_logical + phy) * num_ranks + slot_rank[None, :]
    return (held.ravel().take(flat) == 0).sum(axis=1)


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


def _greedy_value(val: np.ndarray, rounds: int = 3) -> np.ndarray:
    """A lower bound on the best matching's total value for each [n, n] problem in ``val`` [batch, n, n]
    (values >= 0): a greedy matching, cut after ``rounds`` rounds (rows still unmatched then count 0).
    Each round every unmatched row bids for its best free column and each column takes its highest
    bidder (the lowest row among equal bids)."""
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
    cost_f, tie, buf = cost_t.astype(np.float64), 1e-12 * cost_t, np.empty(cost_t.shape)

    def at(price: float) -> np.ndarray:  # (bal - price * cost - tie).argmax(axis=0), in place
        np.multiply(cost_f, price, out=buf)
        np.subtract(bal_t, buf, out=buf)
        np.subtract(buf, tie, out=buf)
        return buf.argmax(axis=1)

    def fits(p: np.ndarray) -> bool:
        return bool(cost_t[lay, p].sum() <= budget) if budget is not None else bool(bal_t[lay, p].sum() >= goal)

    if fits(at(0.0)) == (budget is not None):  # the budget buys the best, or the goal is out of reach
        return at(0.0)
    cheap, dear = 1.0, 0.0  # prices: at(cheap) fits the budget / misses the goal, at(dear) the opposite
    for _ in range(32):  # to 2e-10 of balancedness per slot
        mid = 0.5 * (cheap + dear)
        if fits(at(mid)) == (budget is not None):
            cheap = mid
        else:
            dear = mid
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


def _check(w: np.ndarray, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int,
           old_phy2log: torch.Tensor | np.ndarray, move_budget: int | None) -> np.ndarray:
    """Validate the arguments of :func:`plan_incremental`; returns the old placement as int64 numpy."""
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
    return np.ascontiguousarray(old)


def plan_incremental(weight: torch.Tensor | np.ndarray, num_replicas: int, num_groups: int, num_nodes: int,
                     num_gpus: int, old_phy2log: torch.Tensor | np.ndarray,
                     move_budget: int | None = None, *, keep: float = KEEP,
                     fresh_share: float = FRESH_SHARE, max_rounds: int = MAX_ROUNDS) -> IncrementalPlan:
    """Improve ``old_phy2log`` for ``weight`` with few moves (see the module docstring).

    Args:
        weight: [layers, num_logical] load per logical expert.
        num_replicas, num_groups, num_nodes, num_gpus: as for ``rebalance_experts``.
        old_phy2log: [layers, num_replicas] integer placement in force; must hold every expert.
        move_budget: at most this many slots (over all layers) receive an expert from
            another rank; None: the least movement that keeps ``keep`` of a full re-plan's gain.
        keep: when ``move_budget`` is None, the share of the full re-plan's gain (its summed
            predicted balancedness minus the placement in force's) the plan must keep.
        fresh_share: when ``move_budget`` is None, a layer whose repair costs at least this
            share of the full re-plan's moves takes the full re-plan if that balances it at
            least as well (> 1: never).
        max_rounds: cap on swap rounds.

    Returns:
        An :class:`IncrementalPlan`.
    """
    w = check_weight(weight)
    old = _check(w, num_replicas, num_groups, num_nodes, num_gpus, old_phy2log, move_budget)
    num_layers, num_logical = w.shape
    hierarchical = num_groups % num_nodes == 0 and num_nodes > 1
    zones = num_nodes if hierarchical else 1
    both = np.arange(2 * num_layers) % num_layers  # see below: two rows per layer
    holds = _copies(old, num_gpus, num_logical)
    lay = _Layout(w[both], old[both], num_gpus, zones, np.concatenate([holds, holds]))
    before = lay.balancedness()[:num_layers]
    held = lay.held[:num_layers]
    if move_budget == 0 or num_layers == 0:
        return IncrementalPlan(torch.from_numpy(old.copy()), ["kept"] * num_layers,
                               np.zeros(num_layers, dtype=np.int64), before, before.copy(), before.copy())

    replan = plan_checked(as_float32(weight), num_replicas, num_groups, num_nodes, num_gpus)[0]
    replan_bal = _predicted(w, replan, num_gpus)
    overlap = rank_overlap(replan, old, num_gpus, num_logical, held=held)
    relabelled = _Relabelled(replan, overlap, num_gpus, num_nodes, hierarchical)

    target = lay.mean[:num_layers] / np.maximum(replan_bal, 1e-300)  # the re-plan's peak rank load
    # Both paths in one layout (one search loop): rows [0, L) start from the placement in force, rows
    # [L, 2L) from its projection onto the re-plan's replica counts per node (its nodes relabelled to keep
    # the most; one zone when global), every slot keeping its expert while its node still wants a copy.
    proj = _project(w, old, _node_relabelled(replan, old, num_logical, num_nodes) if hierarchical else replan,
                    num_gpus, zones)
    lay.set_phy(np.concatenate([old, proj]), np.arange(num_layers, 2 * num_layers))
    rows, slots = np.nonzero(lay.phy != lay.old)
    opts = _Options([lay.spent()], [lay.balancedness()], [(rows, slots, lay.phy[rows, slots], np.zeros_like(rows))])
    if hierarchical:
        _regroup(lay, opts, relabelled, num_groups, num_nodes, num_layers)
    _repair(lay, opts, np.concatenate([target, target]), max_rounds)
    c2, b2 = np.stack(opts.cost), np.stack(opts.bal)
    n1 = c2.shape[0]  # options [0, n1) start from the placement in force, [n1, 2 n1) from the projection
    cost = np.concatenate([c2[:, :num_layers], c2[:, num_layers:]])
    bal = np.concatenate([b2[:, :num_layers], b2[:, num_layers:]])
    replan_cost = _replan_cost(overlap, num_replicas, cost, bal, replan_bal,
                               fresh_share if move_budget is None else None, num_nodes, hierarchical)
    cost = np.concatenate([cost, replan_cost[None]])
    bal = np.concatenate([bal, replan_bal[None]])
    n_opts = cost.shape[0] - 1  # index of the re-plan option
    goal = before.sum() + keep * max(float(replan_bal.sum() - before.sum()), 0.0)
    pick = _pick(cost, bal, None if move_budget is None else int(move_budget), float(goal))
    if move_budget is None:
        spend, got = cost[pick, np.arange(num_layers)], bal[pick, np.arange(num_layers)]
        pick = np.where((spend > 0) & (spend >= fresh_share * replan_cost) & (replan_bal >= got), n_opts, pick)

    new = old.copy()
    # Row r's option k is option k (r < L) or n1 + k (r >= L) of layer r mod L.
    row_pick = np.concatenate([pick, pick - n1])
    row_pick[:num_layers][pick >= n1] = -1
    row_pick[num_layers:][(pick < n1) | (pick == n_opts)] = -1
    for rows, slots, experts, option in opts.changes:
        take = option <= row_pick[rows]
        new[both[rows[take]], slots[take]] = experts[take]
    re_layers = np.flatnonzero(pick == n_opts)
    if re_layers.size:
        new[re_layers] = preserve_local_slots(relabelled(re_layers), old[re_layers], num_gpus).numpy()
    moved = _moved(held, new, lay.slot_rank)
    choice = ["replan" if p == n_opts else "project" if p >= n1 else
              ("moves" if m or not np.array_equal(new[i], old[i]) else "kept")
              for i, (p, m) in enumerate(zip(pick.tolist(), moved.tolist()))]
    return IncrementalPlan(torch.from_numpy(new), choice, moved, before, _predicted(w, new, num_gpus), replan_bal)


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


def _repair(lay: _Layout, opts: _Options, target: np.ndarray, max_rounds: int) -> None:
    """Steps 1-3 of the module docstring on ``lay``, each recorded as options in ``opts``."""
    for _ in range(MAX_SPLITS):
        rows, slots, experts = lay.split(target)
        if rows.size == 0:
            break
        opts.add(rows, slots, experts, lay.spent(), lay.balancedness())
    among = np.arange(lay.L)
    for _ in range(MAX_RETARGETS):
        rows, slots, experts, dcost = lay.retarget(target, among)
        if rows.size == 0:
            break
        among = rows
        cost = opts.cost[-1].copy()
        cost[rows] += dcost
        opts.add(rows, slots, experts, cost, lay.balancedness())
    active = np.ones(lay.L, dtype=bool)
    for _ in range(max_rounds):
        active &= lay.R.max(axis=1) > target * (1 + _TIE)
        if not active.any() or lay.Gz < 2:
            break
        active &= lay.swap_round(target, active, opts)


def _node_relabelled(replan: np.ndarray, old: np.ndarray, num_logical: int, num_nodes: int) -> np.ndarray:
    """``replan`` with whole node blocks moved to the old nodes that already hold most of their slots' experts
    (an exact assignment per layer)."""
    layers, num_physical = replan.shape
    node_held = np.zeros((layers, num_logical, num_nodes), dtype=bool)  # [layers, experts, nodes]
    node_held[np.arange(layers)[:, None], old, np.arange(num_physical)[None, :] // (num_physical // num_nodes)] = True
    per_slot = node_held[np.arange(layers)[:, None], replan]  # [layers, slots, old nodes]
    value = per_slot.reshape(layers, num_nodes, num_physical // num_nodes, num_nodes).sum(axis=2, dtype=np.int64)
    node_of = assignment_batch(-value)  # new node a -> old node
    order = np.empty((layers, num_nodes), dtype=np.int64)
    order[np.arange(layers)[:, None], node_of] = np.arange(num_nodes)[None, :]
    return apply_rank_order(replan, order, num_nodes)


def _holds_every_expert(old: np.ndarray, num_logical: int) -> bool:
    off = np.arange(old.shape[0])[:, None] * num_logical
    return bool((np.bincount((old + off).ravel(), minlength=old.shape[0] * num_logical) > 0).all())


def _predicted(w: np.ndarray, phy2log: np.ndarray, num_gpus: int) -> np.ndarray:
    return predicted_balancedness(w, phy2log, num_gpus).numpy()


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
