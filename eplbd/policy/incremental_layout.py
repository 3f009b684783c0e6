"""The repair search of the ``incremental`` policy in numpy: the placement under repair, all layers at
once (:class:`_Layout`: split, retarget, swap rounds) and the options it records (:class:`_Options`).

The reference for the compiled search (:mod:`eplbd.policy.incremental_search`, the same options bit for
bit), and what runs where no JIT may (:mod:`eplbd.policy.jit`). :mod:`eplbd.policy.incremental` drives
either and picks one option per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_TIE = 1e-9  # relative: loads closer than this count as equal
_COST_TIE = 1e-4  # relative to the mean rank load: one moved slot outweighs a load difference below this
_FAR = 1e300  # search keys at or above this rule a candidate out (keys of candidates allowed are loads, far below)
_DONORS = 8  # a retarget weighs the 8 donor slots lightest after the drop


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
        S, E, G, D = self.S, self.E, self.G, min(_DONORS, self.P)
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
        cand = np.argsort(base, axis=1, kind="stable")[:, :D]  # [A, D] donor slots, lightest after the drop first
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
        """One swap in every pair whose heavy rank is above ``target`` (see :mod:`eplbd.policy.incremental`).

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
