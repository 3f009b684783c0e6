"""The policies' inner loops, compiled (numba): each is the loop of a numpy reference in the module named
in its docstring, and gives the same result bit for bit (``tests/test_policy_compiled.py``).

Only imported when :func:`eplbd.policy.jit.enabled`; the numpy references run otherwise.
"""

from __future__ import annotations

import numpy as np

from eplbd.policy.jit import njit


@njit
def npsum(a: np.ndarray, n: int) -> float:
    """``a[:n].sum()`` in numpy's order, so results are equal bit for bit: numpy's pairwise summation (blocks
    of up to 128 values, longer runs halved, the first half a multiple of 8), added to the identity 0.0.
    Evaluated with an explicit stack (numba's on-disk cache does not take recursive functions)."""
    if n <= 128:
        return 0.0 + _block(a, 0, n)
    ops = np.empty((192, 3), dtype=np.int64)  # (lo, n, 0: sum it / 1: add the last two sums)
    vals = np.empty(64)
    top, nv = 0, 0
    ops[0, 0], ops[0, 1], ops[0, 2] = 0, n, 0
    while top >= 0:
        lo, m, combine = ops[top, 0], ops[top, 1], ops[top, 2]
        top -= 1
        if combine:
            vals[nv - 2] = vals[nv - 2] + vals[nv - 1]
            nv -= 1
        elif m <= 128:
            vals[nv] = _block(a, lo, m)
            nv += 1
        else:
            m2 = m // 2
            m2 -= m2 % 8
            ops[top + 1, 0], ops[top + 1, 1], ops[top + 1, 2] = 0, 0, 1
            ops[top + 2, 0], ops[top + 2, 1], ops[top + 2, 2] = lo + m2, m - m2, 0
            ops[top + 3, 0], ops[top + 3, 1], ops[top + 3, 2] = lo, m2, 0
            top += 3
    return 0.0 + vals[0]


@njit
def _block(a, lo, n):  # noqa: ANN001, ANN202
    """numpy's ``pairwise_sum`` of ``a[lo:lo + n]`` for ``n <= 128``: a plain loop under 8 values, else 8
    running sums."""
    if n < 8:
        s = -0.0
        for i in range(lo, lo + n):
            s += a[i]
        return s
    r0, r1, r2, r3 = a[lo], a[lo + 1], a[lo + 2], a[lo + 3]
    r4, r5, r6, r7 = a[lo + 4], a[lo + 5], a[lo + 6], a[lo + 7]
    i = 8
    stop = n - n % 8
    while i < stop:
        r0 += a[lo + i]
        r1 += a[lo + i + 1]
        r2 += a[lo + i + 2]
        r3 += a[lo + i + 3]
        r4 += a[lo + i + 4]
        r5 += a[lo + i + 5]
        r6 += a[lo + i + 6]
        r7 += a[lo + i + 7]
        i += 8
    s = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
    while i < n:
        s += a[lo + i]
        i += 1
    return s


@njit
def _block_size(n):  # noqa: ANN001, ANN202
    """Block length for a first-best search over ``n`` values kept in blocks: a power of two near ``sqrt(n)``."""
    size = 1
    while size * size < n:
        size *= 2
    return size


@njit
def _block_best(val, lo, size, lowest):  # noqa: ANN001, ANN202
    """(value, index) of the first smallest (``lowest``) or first largest of ``val[lo:lo + size]``."""
    bv, bi = val[lo], lo
    for i in range(lo + 1, lo + size):
        if (val[i] < bv) if lowest else (val[i] > bv):
            bv, bi = val[i], i
    return bv, bi


@njit
def _blocks_first(bv, bi, lowest):  # noqa: ANN001, ANN202
    """Index of the first smallest (``lowest``) or first largest value over the blocks' bests ``bv``/``bi``:
    numpy's ``argmin`` / ``argmax`` of the whole array (blocks in order, each one's first best)."""
    v, i = bv[0], bi[0]
    for b in range(1, bv.shape[0]):
        if (bv[b] < v) if lowest else (bv[b] > v):
            v, i = bv[b], bi[b]
    return i


@njit
def pack_ordered(weight, order, num_packs, per_pack):  # noqa: ANN001, ANN202
    """``balanced_packing`` after its sort: items taken in ``order`` (numpy's ``argsort`` of ``-weight``), each
    into the first lightest pack not yet full (:func:`eplbd.policy.default._pack_sorted`'s loop), one row at a
    time. A full pack holds +inf; the packs are kept in blocks of about ``sqrt(num_packs)`` with each block's
    first lightest, so a step rescans one block and the blocks' bests. Returns (pack index, rank in pack) of
    each item, [X, N] in item order."""
    num_rows, num_items = weight.shape
    pack_index = np.empty((num_rows, num_items), dtype=np.int64)
    rank_in_pack = np.empty((num_rows, num_items), dtype=np.int64)
    size = _block_size(num_packs)
    blocks = (num_packs + size - 1) // size
    pack_w = np.empty(blocks * size)  # padding packs hold +inf and come last: never first
    pack_n = np.empty(num_packs, dtype=np.int64)
    bv = np.empty(blocks)
    bi = np.empty(blocks, dtype=np.int64)
    for r in range(num_rows):
        pack_w[:] = np.inf
        pack_w[:num_packs] = 0.0
        pack_n[:] = 0
        for b in range(blocks):
            bv[b], bi[b] = _block_best(pack_w, b * size, size, True)
        for k in range(num_items):
            item = order[r, k]
            pack = _blocks_first(bv, bi, True)
            pack_index[r, item] = pack
            rank_in_pack[r, item] = pack_n[pack]
            pack_n[pack] += 1
            pack_w[pack] = np.inf if pack_n[pack] == per_pack else pack_w[pack] + np.float64(weight[r, item])
            b = pack // size
            bv[b], bi[b] = _block_best(pack_w, b * size, size, True)
    return pack_index, rank_in_pack


@njit
def replicate(weight, num_phy):  # noqa: ANN001, ANN202
    """:func:`eplbd.policy.default.replicate_experts`, one row at a time; the first heaviest per-replica load
    (``argmax``) from blocks of loads as in :func:`pack_ordered`."""
    num_rows, num_log = weight.shape
    phy2log = np.empty((num_rows, num_phy), dtype=np.int64)
    logcnt = np.ones((num_rows, num_log), dtype=np.int64)
    load = np.empty((num_rows, num_log))
    size = _block_size(num_log)
    blocks = (num_log + size - 1) // size
    val = np.empty(blocks * size)  # padding holds -inf and comes last: never first
    bv = np.empty(blocks)
    bi = np.empty(blocks, dtype=np.int64)
    for r in range(num_rows):
        val[:] = -np.inf
        for e in range(num_log):
            phy2log[r, e] = e
            val[e] = np.float64(weight[r, e])
        if num_phy > num_log:
            for b in range(blocks):
                bv[b], bi[b] = _block_best(val, b * size, size, False)
        for i in range(num_log, num_phy):
            expert = _blocks_first(bv, bi, False)
            phy2log[r, i] = expert
            logcnt[r, expert] += 1
            val[expert] = np.float64(weight[r, expert]) / logcnt[r, expert]
            b = expert // size
            bv[b], bi[b] = _block_best(val, b * size, size, False)
        load[r] = val[:num_log]
    return phy2log, load, logcnt


@njit
def gather(a, idx):  # noqa: ANN001, ANN202
    """``np.take_along_axis(a, idx, axis=1)`` for 2-D ``a`` and ``idx``."""
    rows, n = idx.shape
    out = np.empty((rows, n), dtype=a.dtype)
    for r in range(rows):
        for k in range(n):
            out[r, k] = a[r, idx[r, k]]
    return out


@njit
def inverse(perm):  # noqa: ANN001, ANN202
    """Row-wise inverse of permutations ``perm`` [X, N]."""
    rows, n = perm.shape
    out = np.empty((rows, n), dtype=np.int64)
    for r in range(rows):
        for k in range(n):
            out[r, perm[r, k]] = k
    return out


@njit
def assign(cost):  # noqa: ANN001, ANN202
    """:func:`eplbd.policy.matching.assignment_batch`, each problem of ``cost`` [batch, n, n] in turn: a warm
    start, then the rows it left unmatched (last row first), one shortest augmenting path each (Dijkstra on
    reduced costs, with potentials)."""
    batch, n, _ = cost.shape
    n1 = n + 1
    col = np.empty((batch, n), dtype=np.int64)
    u = np.empty(n1)
    v = np.empty(n1)
    match = np.empty(n1, dtype=np.int64)  # match[j]: 1-based row given column j (0: free); column 0 is the start
    minv = np.empty(n1)
    used = np.empty(n1, dtype=np.bool_)
    way = np.zeros(n1, dtype=np.int64)
    taken = np.empty(n, dtype=np.bool_)
    left = np.empty(n, dtype=np.int64)
    won = np.empty(n, dtype=np.bool_)
    for b in range(batch):
        c = cost[b]
        u[:] = 0.0
        v[:] = 0.0
        match[:] = 0
        taken[:] = False
        # Warm start: row potentials = row minima; each row in turn takes its first free column of zero
        # reduced cost.
        n_left = 0
        for i in range(n):
            u[i + 1] = c[i].min()
        won[:] = False
        for i in range(n):
            for j in range(n):
                if not taken[j] and c[i, j] == u[i + 1]:
                    match[j + 1] = i + 1
                    taken[j] = True
                    won[i] = True
                    break
        for i in range(n - 1, -1, -1):  # the rows left, last first
            if not won[i]:
                left[n_left] = i + 1
                n_left += 1
        for k in range(n_left):
            match[0] = left[k]
            minv[:] = np.inf
            used[:] = False
            j0 = 0
            while True:
                used[j0] = True
                i0 = match[j0]
                for j in range(n1):
                    if not used[j]:
                        cur = (c[i0 - 1, j - 1] if j > 0 else 0.0) - u[i0] - v[j]
                        if cur < minv[j]:
                            minv[j], way[j] = cur, j0
                j1, delta = 0, np.inf
                for j in range(n1):
                    if not used[j] and minv[j] < delta:
                        j1, delta = j, minv[j]
                # Among the nearest columns prefer an unmatched one: it ends the path now (ties are common).
                for j in range(n1):
                    if not used[j] and minv[j] == delta and match[j] == 0:
                        j1 = j
                        break
                for j in range(n1):
                    if used[j]:
                        u[match[j]] += delta
                        v[j] -= delta
                    else:
                        minv[j] -= delta
                j0 = j1
                if match[j0] == 0:
                    break
            while j0 != 0:  # walk the path back, shifting rows one column along it
                prev = way[j0]
                match[j0] = match[prev]
                j0 = prev
        for j in range(1, n1):
            col[b, match[j] - 1] = j - 1
    return col


@njit
def greedy_matching(val, rounds):  # noqa: ANN001, ANN202
    """:func:`eplbd.policy.incremental_budget._greedy_value`, one problem at a time: per round each free row
    bids for its first best free column, each column keeps its highest bidder (the lowest row among equals)."""
    batch, n, _ = val.shape
    total = np.zeros(batch)
    row_free = np.empty(n, dtype=np.bool_)
    col_free = np.empty(n, dtype=np.bool_)
    best = np.empty(n)
    winner = np.empty(n, dtype=np.int64)
    for b in range(batch):
        row_free[:] = True
        col_free[:] = True
        for _ in range(rounds):
            best[:] = -np.inf
            winner[:] = -1
            for r in range(n):
                if not row_free[r]:
                    continue
                c_best, v_best = -1, -np.inf
                for c in range(n):
                    if col_free[c] and val[b, r, c] > v_best:
                        c_best, v_best = c, val[b, r, c]
                if c_best >= 0 and v_best > best[c_best]:  # rows in order: the lowest row keeps an equal bid
                    best[c_best], winner[c_best] = v_best, r
            any_win = False
            for c in range(n):
                if winner[c] >= 0:
                    total[b] += best[c]
                    row_free[winner[c]] = False
                    col_free[c] = False
                    any_win = True
            if not any_win:
                break
    return total


@njit
def project(w, old, target, num_gpus, zones):  # noqa: ANN001, ANN202
    """:func:`eplbd.policy.incremental_project._project`, one (layer, zone) at a time."""
    layers, P = old.shape
    E = w.shape[1]
    N, Gz = P // zones, num_gpus // zones
    S = P // num_gpus
    out = old.copy()
    cnt = np.zeros(E, dtype=np.int64)
    q = np.empty(E)
    want = np.zeros(E, dtype=np.int64)
    kept = np.zeros(N, dtype=np.bool_)
    loads = np.empty(Gz)
    vals = np.empty(S)
    free_in = np.empty(Gz, dtype=np.int64)
    missing = np.empty(N, dtype=np.int64)
    listed = np.zeros(E, dtype=np.bool_)  # experts already in missing (cleared after each zone)
    qv = np.empty(N)
    order = np.empty(N, dtype=np.int64)
    for layer in range(layers):
        cnt[:] = 0
        for p in range(P):
            cnt[target[layer, p]] += 1
        for e in range(E):
            q[e] = w[layer, e] / max(cnt[e], 1)
        for z in range(zones):
            lo = z * N
            for p in range(lo, lo + N):
                want[target[layer, p]] += 1
            for p in range(N):  # keep the first copies an expert still wanted here, in slot order
                e = old[layer, lo + p]
                kept[p] = want[e] > 0
                if kept[p]:
                    want[e] -= 1
            # want now holds the missing copies: heaviest first, lowest id among equals
            n_miss = 0
            for p in range(lo, lo + N):
                e = target[layer, p]
                if want[e] > 0 and not listed[e]:
                    missing[n_miss] = e
                    n_miss += 1
                    listed[e] = True
            for k in range(n_miss):
                listed[missing[k]] = False
            _sort_heavy_first(missing, n_miss, q, qv, order)
            for g in range(Gz):
                n_free = 0
                for s in range(S):
                    p = g * S + s
                    vals[s] = q[old[layer, lo + p]] if kept[p] else 0.0
                    if not kept[p]:
                        n_free += 1
                free_in[g] = n_free
                loads[g] = npsum(vals, S) if n_free else np.inf
            for i in range(n_miss):
                e = missing[i]
                for _ in range(want[e]):
                    g = np.argmin(loads)
                    for s in range(S):
                        if not kept[g * S + s]:
                            kept[g * S + s] = True
                            out[layer, lo + g * S + s] = e
                            break
                    loads[g] += q[e]
                    free_in[g] -= 1
                    if free_in[g] == 0:
                        loads[g] = np.inf
            for p in range(lo, lo + N):
                want[target[layer, p]] = 0
    return out


@njit
def _sort_heavy_first(items, n, q, qv, order):  # noqa: ANN001, ANN202
    """``items[:n]`` (distinct experts) in place by ``q`` descending, lower id first among equals (the order
    has no ties, so any sort lands where a stable one would). Few items (a zone's missing replicas): each
    one's place is the count of those before it, branch-free; many: numpy's stable sort of the ids, then of
    the loads. ``qv``, ``order``: scratch of ``n``."""
    if n > 64:
        ids = np.sort(items[:n])
        by = np.argsort(-q[ids], kind="mergesort")
        items[:n] = ids[by]
        return
    for i in range(n):
        qv[i] = q[items[i]]
    for i in range(n):
        v, x = qv[i], items[i]
        pos = 0
        for k in range(n):
            pos += (qv[k] > v) | ((qv[k] == v) & (items[k] < x))
        order[pos] = x
    items[:n] = order[:n]


@njit
def pick_options(cost_t, bal_t):  # noqa: ANN001, ANN202
    """Per layer, the options that can be the first best for some price >= 0: an option that costs no less
    and balances no better than an earlier one never is (rounding is monotone, and the earlier one wins
    ties). Returns (indices [layers, options], count per layer); on the search's options about 1 in 10."""
    L, K = cost_t.shape
    idx = np.empty((L, K), dtype=np.int64)
    n_kept = np.zeros(L, dtype=np.int64)
    for layer in range(L):
        last = -1
        for k in range(K):
            if last >= 0 and cost_t[layer, last] <= cost_t[layer, k] and bal_t[layer, last] >= bal_t[layer, k]:
                continue
            idx[layer, n_kept[layer]] = k
            n_kept[layer] += 1
            last = k
    return idx, n_kept


@njit
def pick_at(cost_t, bal_t, idx, n_kept, price):  # noqa: ANN001, ANN202
    """Per layer, the option with the most ``bal - price * cost - 1e-12 * cost`` (the first among equals),
    among those :func:`pick_options` kept: ``at`` of :func:`eplbd.policy.incremental_budget._bisect`."""
    L = cost_t.shape[0]
    out = np.zeros(L, dtype=np.int64)
    for layer in range(L):
        best = -np.inf
        for n in range(n_kept[layer]):
            k = idx[layer, n]
            c = np.float64(cost_t[layer, k])
            v = (bal_t[layer, k] - c * price) - 1e-12 * c
            if v > best or n == 0:
                best, out[layer] = v, k
    return out


@njit
def _fits(cost_t, bal_t, pick, budget, goal, use_budget):  # noqa: ANN001, ANN202
    L = cost_t.shape[0]
    if use_budget:
        spent = 0
        for layer in range(L):
            spent += cost_t[layer, pick[layer]]
        return spent <= budget
    got = np.empty(L)
    for layer in range(L):
        got[layer] = bal_t[layer, pick[layer]]
    return npsum(got, L) >= goal


@njit
def pick_bisect(cost_t, bal_t, idx, n_kept, budget, goal, use_budget):  # noqa: ANN001, ANN202
    """:func:`eplbd.policy.incremental_budget._bisect`: (decided at price 0, cheap, dear)."""
    if _fits(cost_t, bal_t, pick_at(cost_t, bal_t, idx, n_kept, 0.0), budget, goal, use_budget) == use_budget:
        return True, 0.0, 0.0
    cheap, dear = 1.0, 0.0
    for _ in range(32):
        mid = 0.5 * (cheap + dear)
        if _fits(cost_t, bal_t, pick_at(cost_t, bal_t, idx, n_kept, mid), budget, goal, use_budget) == use_budget:
            cheap = mid
        else:
            dear = mid
    return False, cheap, dear


@njit
def overlap(new, old, num_ranks, num_logical):  # noqa: ANN001, ANN202
    """:func:`eplbd.policy.matching.rank_overlap`: [layers, ranks (new), ranks (old)] slots of each new rank
    whose expert the old rank holds; each layer through the list of old ranks holding each expert."""
    L, P = new.shape
    S = P // num_ranks
    out = np.zeros((L, num_ranks, num_ranks), dtype=np.int64)
    mark = np.zeros((num_logical, num_ranks), dtype=np.uint8)
    start = np.zeros(num_logical + 1, dtype=np.int64)
    ranks = np.empty(P, dtype=np.int64)
    for layer in range(L):
        start[:] = 0
        for g in range(num_ranks):
            for p in range(g * S, g * S + S):
                e = old[layer, p]
                if mark[e, g] == 0:
                    mark[e, g] = 1
                    start[e + 1] += 1
        for e in range(num_logical):
            start[e + 1] += start[e]
        for g in range(num_ranks):  # old ranks by expert, each once; marks cleared on the way
            for p in range(g * S, g * S + S):
                e = old[layer, p]
                if mark[e, g] == 1:
                    mark[e, g] = 0
                    ranks[start[e]] = g
                    start[e] += 1
        for e in range(num_logical - 1, -1, -1):  # start[e] now ends expert e's list: shift back
            start[e + 1] = start[e]
        start[0] = 0
        for i in range(num_ranks):
            for p in range(i * S, i * S + S):
                e = new[layer, p]
                for k in range(start[e], start[e + 1]):
                    out[layer, i, ranks[k]] += 1
    return out


@njit
def preserve_slots(new, old, S):  # noqa: ANN001, ANN202
    """:func:`eplbd.policy.placement.preserve_local_slots` (``S`` slots per rank), one rank of one layer at a
    time: each old slot in turn keeps its expert if the rank's new set has an unused copy (the first), then
    the unused new entries fill the other slots, both in order."""
    L, P = new.shape
    out = np.empty_like(new)
    used = np.empty(S, dtype=np.bool_)
    kept = np.empty(S, dtype=np.bool_)
    for layer in range(L):
        for lo in range(0, P, S):
            used[:] = False
            kept[:] = False
            for s in range(S):
                e = old[layer, lo + s]
                for k in range(S):
                    if not used[k] and new[layer, lo + k] == e:
                        out[layer, lo + s] = e
                        used[k] = True
                        kept[s] = True
                        break
            k = 0
            for s in range(S):
                if kept[s]:
                    continue
                while used[k]:
                    k += 1
                out[layer, lo + s] = new[layer, lo + k]
                used[k] = True
    return out
