"""The repair search of the ``incremental`` policy, compiled (numba): split, retarget and swap rounds.

Each row (a layer, or a layer's projection) is searched on its own, in one compiled call for all rows:
the steps of :mod:`eplbd.policy.incremental` 1-3 run until the row is under its target or a step finds
nothing. A row's steps form a prefix of the global sequence of options (split ``k``, retarget ``k``,
round ``k`` pair ``c``), so :func:`search` records each row's events at their global positions and the
options come out as the numpy reference (:class:`~eplbd.policy.incremental_layout._Layout`, all rows in
lock step) makes them.

Sums of loads are taken in numpy's order (:func:`~eplbd.policy.kernels.npsum`, pairwise), so a rank's
load here is the same float as numpy computes from the same slots. Where several candidates tie on every
key, the lowest index wins (the first in slot order); the D lightest donor slots of a retarget are taken
in (load, slot) order.
"""

from __future__ import annotations

import numpy as np

from eplbd.policy.incremental_layout import _COST_TIE, _DONORS, _TIE
from eplbd.policy.jit import njit
from eplbd.policy.kernels import npsum


@njit
def _refresh(w, phy, cnt, q, R, S, buf):  # noqa: ANN001, ANN202
    """Replica counts, per-replica loads and rank loads of one row from its placement ``phy``."""
    cnt[:] = 0
    for p in range(phy.shape[0]):
        cnt[phy[p]] += 1
    for e in range(w.shape[0]):
        q[e] = w[e] / max(cnt[e], 1)
    for g in range(R.shape[0]):
        R[g] = _rank_load(phy, q, g, S, buf)


@njit
def _rank_load(phy, q, g, S, buf):  # noqa: ANN001, ANN202
    """Rank ``g``'s load: its slots' per-replica loads summed in numpy's order (``buf``: scratch of ``S``)."""
    for s in range(S):
        buf[s] = q[phy[g * S + s]]
    return npsum(buf, S)


@njit
def _recount(w, phy, holds, cnt, q, R, S, a, b, buf):  # noqa: ANN001, ANN202
    """After one slot changed from expert ``a`` to ``b``: the counts, per-replica loads and the loads of the
    ranks holding either, each rank's load summed afresh (as :func:`_refresh` sums it)."""
    cnt[a] -= 1
    cnt[b] += 1
    q[a] = w[a] / max(cnt[a], 1)
    q[b] = w[b] / max(cnt[b], 1)
    for g in range(R.shape[0]):
        if holds[a, g] > 0 or holds[b, g] > 0:
            R[g] = _rank_load(phy, q, g, S, buf)


@njit
def _balancedness(mean: float, R: np.ndarray) -> float:
    peak = R.max()
    return mean / peak if peak > 0 else 1.0


@njit
def _spent(phy, held, S):  # noqa: ANN001, ANN202
    """Slots holding an expert their rank did not hold in the old placement."""
    n = 0
    for g in range(phy.shape[0] // S):
        for p in range(g * S, g * S + S):
            if held[phy[p], g] == 0:
                n += 1
    return n


@njit
def _move(phy, holds, slot, expert, S):  # noqa: ANN001, ANN202
    rk = slot // S
    holds[phy[slot], rk] -= 1
    holds[expert, rk] += 1
    phy[slot] = expert


@njit
def _split(w, phy, holds, cnt, q, R, target, S, Gz, buf):  # noqa: ANN001, ANN202
    """Step 1 on one row: one more replica for its largest item if that cannot fit on a rank under
    ``target``. Returns (slot, expert), or (-1, -1) if none is needed or possible."""
    P = phy.shape[0]
    top, qy = 0, -np.inf
    for p in range(P):
        if q[phy[p]] > qy:
            top, qy = p, q[phy[p]]
    # The S - 1 smallest items, ascending (an insertion-sorted buffer), summed in numpy's order.
    m, n = S - 1, 0
    for p in range(P):
        v = q[phy[p]]
        if n < m:
            n += 1
        elif m == 0 or not v < buf[m - 1]:
            continue
        k = n - 1
        while k > 0 and v < buf[k - 1]:
            buf[k] = buf[k - 1]
            k -= 1
        buf[k] = v
    small = npsum(buf, m)
    y = phy[top]
    if not qy + small > target * (1 + _TIE):
        return -1, -1
    G = R.shape[0]
    zones = G // Gz
    qy_new = w[y] / (cnt[y] + 1)
    best, best_key = -1, np.inf
    for z in range(zones):
        y_here = False
        for g in range(z * Gz, z * Gz + Gz):
            y_here |= holds[y, g] > 0
        if not y_here:
            continue
        for g in range(z * Gz, z * Gz + Gz):
            if holds[y, g] > 0:
                continue
            for p in range(g * S, g * S + S):
                x = phy[p]
                cx = cnt[x]
                if cx < 2 or x == y:
                    continue
                if not w[x] / max(cx - 1, 1) < qy * (1 - _TIE):
                    continue
                key = R[g] - q[x] + qy_new
                if key < best_key:
                    best, best_key = p, key
    if best < 0 or not np.isfinite(best_key):
        return -1, -1
    x = phy[best]
    _move(phy, holds, best, y, S)
    _recount(w, phy, holds, cnt, q, R, S, x, y, buf)
    return best, y


@njit
def _retarget(w, phy, holds, held, cnt, q, R, target, mean, S, Gz, buf, spare, top, cand, cbase,
              cother):  # noqa: ANN001, ANN202
    """Step 2 on one row: relieve the heaviest rank with one slot (a spare replica on a lighter rank of
    its zone becomes one more copy of one of its experts). Returns (slot, expert, change in moved
    slots), or (-1, -1, 0). Scratch: ``spare`` of ``P``; ``top`` of ``E``, all -inf (and left so);
    ``cand``, ``cbase``, ``cother`` of the donor count."""
    G, P = R.shape[0], phy.shape[0]
    cap = target * (1 + _TIE)
    h = 0
    for g in range(1, G):
        if R[g] > R[h]:
            h = g
    Rh = R[h]
    if not Rh > cap:
        return -1, -1, 0
    second = -np.inf
    if G == 1:
        second = Rh
    else:
        for g in range(G):
            if g != h and R[g] > second:
                second = R[g]
        second = min(second, Rh)
    goal = max(target, second) * (1 + _TIE)
    # Donor slots: an expert with a spare replica, once on its rank, in the heavy rank's zone. The slots of
    # experts with a spare replica first (in slot order, branch-free), then the rest on those only.
    n_spare = 0
    for p in range(P):
        spare[n_spare] = p
        n_spare += cnt[phy[p]] >= 2
    for k in range(n_spare):
        p = spare[k]
        e, Rg = phy[p], R[p // S]
        if Rg > top[e]:
            top[e] = Rg
    D = cand.shape[0]
    cand[:] = -1
    cbase[:] = np.inf
    zone_h = h // Gz
    for k in range(n_spare):
        p = spare[k]
        rk = p // S
        if rk // Gz == zone_h and rk != h:
            b = phy[p]
            cb = cnt[b]
            if holds[b, rk] != 1:
                continue
            other = top[b] + (w[b] / max(cb - 1, 1) - q[b])  # conservative: the max over every holder
            if not other <= cap:
                continue
            base = R[rk] - q[b]
            if not base < cbase[D - 1]:
                continue
            k = D - 1  # insert, keeping (base, slot) order
            while k > 0 and base < cbase[k - 1]:
                cbase[k], cand[k], cother[k] = cbase[k - 1], cand[k - 1], cother[k - 1]
                k -= 1
            cbase[k], cand[k], cother[k] = base, p, other
    for k in range(n_spare):  # top is -inf between calls
        top[phy[spare[k]]] = -np.inf
    cost_w = _COST_TIE * mean
    best_key, best_s, best_d = np.inf, -1, -1
    for s in range(S):
        x = phy[h * S + s]
        cx, wx = cnt[x], w[x]
        add = wx / (cx + 1)
        rh_new = Rh - holds[x, h] * (wx / cx - add)
        if not rh_new <= goal:
            continue
        for d in range(D):
            if cand[d] < 0:
                break
            rk = cand[d] // S
            if holds[x, rk] != 0:
                continue
            new_r = cbase[d] + add
            if not new_r <= cap:
                continue
            peak = max(max(rh_new, new_r), cother[d])
            dcost = np.int64(held[phy[cand[d]], rk]) - np.int64(held[x, rk])
            key = max(peak, target) + cost_w * dcost + _TIE * peak
            if key < best_key:
                best_key, best_s, best_d = key, s, d
    if best_s < 0:
        return -1, -1, 0
    slot, x = cand[best_d], phy[h * S + best_s]
    b = phy[slot]
    dc = np.int64(held[b, slot // S]) - np.int64(held[x, slot // S])
    _move(phy, holds, slot, x, S)
    _recount(w, phy, holds, cnt, q, R, S, b, x, buf)
    return slot, x, dc


@njit
def _best_swap(phy, holds, held, q, R, h, l, target, mean, S, qb, tb, keys):  # noqa: ANN001, ANN202
    """The exchange of one slot each between ranks ``h`` (heavy) and ``l`` that brings the pair's larger
    load under ``target`` (else lowest), fewest moved slots next, lowest peak last; the first such
    (heavy slot, light slot) in slot order among equals. An exchange must move load heavy -> light
    without reversing the pair, and give neither rank a second copy of an expert.

    Returns (ok, heavy slot, light slot, load moved heavy -> light, change in moved slots); ``qb``, ``tb``
    and ``keys`` are scratch of ``S``."""
    Rh, Rl = R[h], R[l]
    m = mean if mean > 0 else 1.0
    cost_w = _COST_TIE * m
    eps = _TIE * Rh
    gap = (Rh - Rl) - eps
    half, floor = 0.5 * (Rh - Rl), target - 0.5 * (Rh + Rl)
    for j in range(S):
        b = phy[l * S + j]
        qb[j] = q[b]
        tb[j] = np.inf if holds[b, h] > 0 else cost_w * (np.float64(held[b, l]) - np.float64(held[b, h]))
    best, bi, bj = np.inf, -1, -1
    for i in range(S):
        a = phy[h * S + i]
        if holds[a, l] > 0:
            continue
        ta = cost_w * (np.float64(held[a, h]) - np.float64(held[a, l]))
        qa = q[a]
        for j in range(S):  # every key first, branch-free (a ruled-out j has tb = inf), then the scan
            d = qa - qb[j]
            dev = abs(d - half)
            key = ((max(dev, floor) + ta) + tb[j]) + dev * _TIE
            keys[j] = key if (d > eps) & (d < gap) else np.inf
        for j in range(S):
            if keys[j] < best:
                best, bi, bj = keys[j], i, j
    if bi < 0:
        return False, -1, -1, 0.0, np.int64(0)
    a, b = phy[h * S + bi], phy[l * S + bj]
    dcost = (np.float64(held[a, h]) - np.float64(held[a, l])) + (np.float64(held[b, l]) - np.float64(held[b, h]))
    return True, h * S + bi, l * S + bj, q[a] - q[b], np.int64(np.rint(dcost))


@njit
def _by_load(R, idx, n, out, vals):  # noqa: ANN001, ANN202
    """``out[:n]`` = ``idx[:n]`` by ``R[idx]`` descending, equal loads in ``idx`` order (numpy's stable
    ``argsort(-R)``): each one's place is the count of those before it (branch-free; ``n`` is small, a
    zone's ranks). ``vals`` is scratch of ``n``."""
    for i in range(n):
        vals[i] = R[idx[i]]
    for i in range(n):
        v = vals[i]
        pos = 0
        for j in range(n):
            pos += (vals[j] > v) | ((vals[j] == v) & (j < i))
        out[pos] = idx[i]


@njit
def _swap_round(phy, holds, held, q, R, target, mean, S, Gz, o_cost, o_bal, sw, cost0, heavy, light, slot_h, slot_l,
                dcost, by, order, ranks, Rh, Rl, moved, rest, qb, tb, keys, vals):  # noqa: ANN001, ANN202
    """Step 3, one round on one row: pair the i-th heaviest rank with the i-th lightest in each zone, one
    swap in every pair whose heavy rank is above ``target``. Writes the round's options (pairs by heavy
    load; ``o_cost``/``o_bal`` [pairs]) and swaps (``sw`` [pairs, 5]: option position or -1, heavy slot,
    light slot, expert to light, expert to heavy). Returns whether a swap was made. ``heavy`` .. ``ranks`` are
    int scratch of ``G``, ``Rh`` .. ``vals`` float scratch of ``max(G, S)``."""
    G = R.shape[0]
    zones, half = G // Gz, Gz // 2
    npairs = zones * half
    for z in range(zones):
        for i in range(Gz):
            ranks[i] = z * Gz + i
        _by_load(R, ranks, Gz, order, vals)
        for i in range(half):
            heavy[z * half + i] = order[i]
            light[z * half + i] = order[Gz - 1 - i]
    cap = target * (1 + _TIE)
    any_go = False
    for c in range(npairs):
        Rh[c], Rl[c] = R[heavy[c]], R[light[c]]
        slot_h[c], dcost[c], moved[c] = -1, 0, 0.0
        if Rh[c] > cap:
            ok, sh, sl, mv, dc = _best_swap(phy, holds, held, q, R, heavy[c], light[c], target, mean, S, qb, tb, keys)
            if ok:
                slot_h[c], slot_l[c], moved[c], dcost[c] = sh, sl, mv, dc
                any_go = True
    if zones > 1:
        for c in range(npairs):
            ranks[c] = c
        _by_load(Rh, ranks, npairs, by, vals)
    else:  # one zone: pairs are already by heavy load
        for c in range(npairs):
            by[c] = c
    # Options: pairs by heavy load; peak after the first k = max(new loads of those k, old loads of the rest).
    rest_unpaired = -np.inf
    if 2 * npairs < G:  # odd zones leave one rank per zone unpaired
        for z in range(zones):
            g = order[half] if zones == 1 else -1
            if zones > 1:  # the middle rank of each zone
                for i in range(Gz):
                    ranks[i] = z * Gz + i
                _by_load(R, ranks, Gz, order, vals)
                g = order[half]
            rest_unpaired = max(rest_unpaired, R[g])
    acc = -np.inf
    for k in range(npairs - 1, -1, -1):
        rest[k] = max(acc, rest_unpaired)
        c = by[k]
        acc = max(acc, max(Rh[c], Rl[c]))
    run, cost = -np.inf, cost0
    for k in range(npairs):
        c = by[k]
        go = slot_h[c] >= 0
        new_pair = max(Rh[c] - moved[c], Rl[c] + moved[c]) if go else max(Rh[c], Rl[c])
        run = max(run, new_pair)
        peak = max(run, rest[k])
        cost += dcost[c]
        o_cost[k] = cost
        o_bal[k] = mean / peak if peak > 0 else 1.0
        sw[k, 0] = -1
    if not any_go:
        return False
    for k in range(npairs):
        c = by[k]
        if slot_h[c] < 0:
            continue
        h, l, sh, sl = heavy[c], light[c], slot_h[c], slot_l[c]
        xa, xb = phy[sh], phy[sl]
        phy[sh], phy[sl] = xb, xa
        R[h] -= moved[c]
        R[l] += moved[c]
        holds[xa, h] -= 1
        holds[xa, l] += 1
        holds[xb, l] -= 1
        holds[xb, h] += 1
        sw[k, 0], sw[k, 1], sw[k, 2], sw[k, 3], sw[k, 4] = k, sh, sl, xa, xb
    return True


@njit
def rank_loads(w, phy, G):  # noqa: ANN001, ANN202
    """[rows, G] load per rank of placement ``phy`` [rows, P] for loads ``w`` [rows, E] (each expert's load
    split evenly over its replicas), summed as numpy sums them."""
    rows, P = phy.shape
    E = w.shape[1]
    S = P // G
    R = np.empty((rows, G))
    cnt = np.zeros(E, dtype=np.int64)
    q = np.zeros(E)
    buf = np.zeros(max(S, 1))
    for r in range(rows):
        _refresh(w[r], phy[r], cnt, q, R[r], S, buf)
    return R


@njit
def moved_slots(old, new, G):  # noqa: ANN001, ANN202
    """[layers] slots of ``new`` whose rank did not hold their expert in ``old`` (both [layers, P])."""
    L, P = old.shape
    S = P // G
    E = max(old.max(), new.max()) + 1
    hd = np.zeros((E, G), dtype=np.uint8)
    out = np.zeros(L, dtype=np.int64)
    for layer in range(L):
        _mark(old[layer], hd, S, 1)
        out[layer] = _spent(new[layer], hd, S)
        _mark(old[layer], hd, S, 0)
    return out


@njit
def _mark(phy, held, S, value):  # noqa: ANN001, ANN202
    """``held[e, g] = value`` for every expert ``e`` on rank ``g`` in ``phy``."""
    for g in range(phy.shape[0] // S):
        for p in range(g * S, g * S + S):
            held[phy[p], g] = value


@njit
def apply_changes(new, rows, slots, experts, option, row_pick, L):  # noqa: ANN001, ANN202
    """Write into ``new`` [L, P] the changes (in the order made) that a row's pick includes: slot ``slots[k]``
    of layer ``rows[k] % L`` takes ``experts[k]`` where ``option[k] <= row_pick[rows[k]]``, a later change to
    a slot overwriting an earlier one."""
    for k in range(rows.shape[0]):
        r = rows[k]
        if option[k] <= row_pick[r]:
            new[r % L, slots[k]] = experts[k]


@njit
def _fill_copies(phy, holds, S, sign):  # noqa: ANN001, ANN202
    for g in range(phy.shape[0] // S):
        for p in range(g * S, g * S + S):
            holds[phy[p], g] += sign


@njit
def search(w, old, start, pre, regroup, target, mean, G, Gz, max_splits, max_retargets, max_rounds):  # noqa: ANN001, ANN201
    """Steps 1-3 on every row, from the row's start placement, and the options they make.

    Args:
        w, old: [L, E] loads and [L, P] placement in force; row ``r`` of the search is layer ``r % L``.
        start: [rows, P] where each row starts (option 0); moves count from ``old``.
        pre: [rows, P] the row after the hierarchical regroup (option 1), used when ``regroup``.
        target, mean: [rows] peak rank load to reach and mean rank load.

    Returns:
        (cost [options, rows] int64 moved slots, bal [options, rows] predicted balancedness, changes
        [n, 4] int64 (row, slot, expert, option) in the order made), options 0 and 1 (``regroup``)
        included, each row's past its last step repeating its last.
    """
    rows, P = start.shape
    L, E = w.shape
    S = P // G
    npairs = (G // Gz) * (Gz // 2)
    n0 = 2 if regroup else 1
    base_cost = np.zeros((n0, rows), dtype=np.int64)
    base_bal = np.zeros((n0, rows))
    n_split = np.zeros(rows, dtype=np.int64)
    split = np.full((rows, max_splits, 3), -1, dtype=np.int64)
    split_bal = np.zeros((rows, max_splits))
    n_ret = np.zeros(rows, dtype=np.int64)
    ret = np.full((rows, max_retargets, 3), -1, dtype=np.int64)
    ret_bal = np.zeros((rows, max_retargets))
    n_round = np.zeros(rows, dtype=np.int64)
    rnd_cost = np.zeros((rows, max_rounds, npairs), dtype=np.int64)
    rnd_bal = np.zeros((rows, max_rounds, npairs))
    rnd_sw = np.full((rows, max_rounds, npairs, 5), -1, dtype=np.int64)
    cnt = np.zeros(E, dtype=np.int64)
    q = np.zeros(E)
    R = np.zeros(G)
    buf = np.zeros(max(S, 1))
    # Scratch of the swap rounds, one array each (views into one table would each take a reference per round).
    heavy, light, slot_h, slot_l = (np.zeros(G, np.int64), np.zeros(G, np.int64), np.zeros(G, np.int64),
                                    np.zeros(G, np.int64))
    dcost, by, order, ranks = np.zeros(G, np.int64), np.zeros(G, np.int64), np.zeros(G, np.int64), np.zeros(G, np.int64)
    F = max(G, S)
    Rh, Rl, moved, rest = np.zeros(F), np.zeros(F), np.zeros(F), np.zeros(F)
    qb, tb, keys, vals = np.zeros(F), np.zeros(F), np.zeros(F), np.zeros(F)
    hd = np.zeros((E, G), dtype=np.uint8)  # copies in the placement in force (0/1), zeroed after each row
    hr = np.zeros((E, G), dtype=np.int16)  # copies now, likewise
    pr = np.empty(P, dtype=np.int64)
    spare = np.empty(P, dtype=np.int64)
    top = np.full(E, -np.inf)
    cand = np.empty(min(_DONORS, P), dtype=np.int64)
    cbase = np.empty(cand.shape[0])
    cother = np.zeros(cand.shape[0])
    for r in range(rows):
        lr = r % L
        wr, t, mean_r = w[lr], target[r], mean[r]
        _mark(old[lr], hd, S, 1)
        pr[:] = start[r]
        _fill_copies(pr, hr, S, 1)
        _refresh(wr, pr, cnt, q, R, S, buf)
        base_cost[0, r], base_bal[0, r] = _spent(pr, hd, S), _balancedness(mean_r, R)
        if regroup:
            _fill_copies(pr, hr, S, -1)
            pr[:] = pre[r]
            _fill_copies(pr, hr, S, 1)
            _refresh(wr, pr, cnt, q, R, S, buf)
            base_cost[1, r], base_bal[1, r] = _spent(pr, hd, S), _balancedness(mean_r, R)
        cost = base_cost[n0 - 1, r]
        for k in range(max_splits):
            slot, y = _split(wr, pr, hr, cnt, q, R, t, S, Gz, buf)
            if slot < 0:
                break
            cost = _spent(pr, hd, S)
            split[r, k, 0], split[r, k, 1], split[r, k, 2] = slot, y, cost
            split_bal[r, k] = _balancedness(mean_r, R)
            n_split[r] = k + 1
        for k in range(max_retargets):
            slot, x, dc = _retarget(wr, pr, hr, hd, cnt, q, R, t, mean_r, S, Gz, buf, spare, top, cand, cbase, cother)
            if slot < 0:
                break
            cost += dc
            ret[r, k, 0], ret[r, k, 1], ret[r, k, 2] = slot, x, dc
            ret_bal[r, k] = _balancedness(mean_r, R)
            n_ret[r] = k + 1
        if Gz >= 2:
            for k in range(max_rounds):
                if not R.max() > t * (1 + _TIE):
                    break
                n_round[r] = k + 1
                made = _swap_round(pr, hr, hd, q, R, t, mean_r, S, Gz, rnd_cost[r, k], rnd_bal[r, k], rnd_sw[r, k],
                                   cost, heavy, light, slot_h, slot_l, dcost, by, order, ranks, Rh, Rl, moved, rest,
                                   qb, tb, keys, vals)
                cost = rnd_cost[r, k, npairs - 1] if npairs else cost
                if not made:
                    break
        _fill_copies(pr, hr, S, -1)
        _mark(old[lr], hd, S, 0)
    return _assemble(base_cost, base_bal, n_split, split, split_bal, n_ret, ret, ret_bal, n_round, rnd_cost, rnd_bal,
                     rnd_sw)


@njit
def _assemble(base_cost, base_bal, n_split, split, split_bal, n_ret, ret, ret_bal, n_round, rnd_cost, rnd_bal,
              rnd_sw):  # noqa: ANN001, ANN202
    """Every row's events at their global option positions: see :func:`search`."""
    n0, rows = base_cost.shape
    npairs = rnd_cost.shape[2]
    ns, nr, nd = n_split.max(), n_ret.max(), n_round.max()
    n_opts = n0 + ns + nr + nd * npairs
    cost = np.empty((n_opts, rows), dtype=np.int64)
    bal = np.empty((n_opts, rows))
    n_changes = n_split.sum() + n_ret.sum()
    for r in range(rows):
        for k in range(n_round[r]):
            for c in range(npairs):
                if rnd_sw[r, k, c, 0] >= 0:
                    n_changes += 2
    changes = np.empty((n_changes, 4), dtype=np.int64)
    i = 0
    for r in range(rows):
        o = 0
        for k in range(n0):
            cost[o, r], bal[o, r] = base_cost[k, r], base_bal[k, r]
            o += 1
        c_last, b_last = cost[o - 1, r], bal[o - 1, r]
        for k in range(ns):
            if k < n_split[r]:
                c_last, b_last = split[r, k, 2], split_bal[r, k]
                changes[i, 0], changes[i, 1], changes[i, 2], changes[i, 3] = r, split[r, k, 0], split[r, k, 1], o
                i += 1
            cost[o, r], bal[o, r] = c_last, b_last
            o += 1
        for k in range(nr):
            if k < n_ret[r]:
                c_last, b_last = c_last + ret[r, k, 2], ret_bal[r, k]
                changes[i, 0], changes[i, 1], changes[i, 2], changes[i, 3] = r, ret[r, k, 0], ret[r, k, 1], o
                i += 1
            cost[o, r], bal[o, r] = c_last, b_last
            o += 1
        for k in range(nd):
            for c in range(npairs):
                if k < n_round[r]:
                    c_last, b_last = rnd_cost[r, k, c], rnd_bal[r, k, c]
                    if rnd_sw[r, k, c, 0] >= 0:  # heavy slot takes the light rank's expert, and back (indexed, not
                        # through a view of the swap: a view per pair costs a reference count each)
                        changes[i, 0], changes[i, 1] = r, rnd_sw[r, k, c, 1]
                        changes[i, 2], changes[i, 3] = rnd_sw[r, k, c, 4], o
                        changes[i + 1, 0], changes[i + 1, 1] = r, rnd_sw[r, k, c, 2]
                        changes[i + 1, 2], changes[i + 1, 3] = rnd_sw[r, k, c, 3], o
                        i += 2
                cost[o, r], bal[o, r] = c_last, b_last
                o += 1
    return cost, bal, changes
