"""The ``default`` policy: DeepSeek's EPLB algorithm as vLLM's default policy runs it.

Hierarchical when ``num_groups % num_nodes == 0`` (else the same routine with one
group and one node):

1. pack expert groups onto nodes (``balanced_packing`` on per-group token sums);
2. inside each node, hand the node's redundant slots one at a time to the expert
   with the highest per-replica load (``weight / count``);
3. pack each node's replicas onto its GPUs (``balanced_packing`` on per-replica load).

The same output as vLLM 0.32's ``DefaultEplbPolicy.rebalance_experts`` (no previous
placement), bit for bit, ties included:

- loads are rounded to float32 first (vLLM's ``weight.float()``), group sums are
  float32 sums, per-replica loads ``weight / count`` are float64 quotients of those;
- items are ordered by numpy's default ``argsort`` of the negated loads, on the
  same dtype and row shape as vLLM: that sort is not stable (SIMD quicksort), and
  the order it leaves equal loads in *is* vLLM's tie-break, so it is called, not
  imitated; the lightest pack and the heaviest per-replica load are the first
  ``argmin`` / ``argmax``, as in vLLM's loops;
- fall-backs: global (one group, one node) when ``num_groups % num_nodes != 0``,
  whatever the number of experts per group or GPUs per node; hierarchical needs
  ``num_logical % num_groups == 0`` and ``num_gpus % num_nodes == 0`` (vLLM asserts).

The one deliberate difference: loads that are negative, NaN, infinite or beyond
float32's range raise :class:`PolicyError` (vLLM plans on them, meaninglessly).

The orders are numpy's own sorts (vectorised over rows); the greedy loops that follow them
run compiled (:mod:`eplbd.policy.kernels`, one row at a time) or, where no JIT may run
(:mod:`eplbd.policy.jit`), as numpy loops over items, every row at once: same results.
"""

from __future__ import annotations

import numpy as np
import torch

from eplbd.errors import PolicyError
from eplbd.policy import jit
from eplbd.policy.balance import _float_array
from eplbd.policy.placement import derive_log2phy


def balanced_packing(weight: np.ndarray, num_packs: int) -> tuple[np.ndarray, np.ndarray]:
    """Pack ``N`` items per row into ``num_packs`` packs of exactly ``N / num_packs`` items.

    Items are taken heaviest first, in the order of numpy's default ``argsort`` of
    ``-weight`` (vLLM's order, ties included), each into the lightest pack that is
    not yet full (lowest pack index on ties). Pack weights are float64 sums.

    Args:
        weight: [X, N] float32 or float64 (vLLM's dtype for the step: the order of
            equal weights depends on it), the weight of each item; ``N % num_packs == 0``.
        num_packs: number of packs.

    Returns:
        pack_index: [X, N] int64, the pack of each item.
        rank_in_pack: [X, N] int64, the item's position inside its pack.
    """
    num_rows, num_items = weight.shape
    per_pack = num_items // num_packs
    if per_pack == 1:
        pack_index = np.broadcast_to(np.arange(num_items, dtype=np.int64), weight.shape).copy()
        return pack_index, np.zeros(weight.shape, dtype=np.int64)

    order = np.argsort(-weight, axis=-1)  # vLLM's call: its tie order is part of the result
    if jit.enabled():
        from eplbd.policy.kernels import pack_ordered

        return pack_ordered(np.ascontiguousarray(weight), order, num_packs, per_pack)
    sorted_w = np.take_along_axis(weight, order, axis=1)
    pack_sorted_t, rank_sorted_t = _pack_sorted(sorted_w, num_packs, per_pack)
    pack_index = np.empty((num_rows, num_items), dtype=np.int64)
    rank_in_pack = np.empty((num_rows, num_items), dtype=np.int64)
    rows = np.arange(num_rows)[:, None]
    pack_index[rows, order] = pack_sorted_t
    rank_in_pack[rows, order] = rank_sorted_t
    return pack_index, rank_in_pack


def _pack_sorted(sorted_w: np.ndarray, num_packs: int, per_pack: int) -> tuple[np.ndarray, np.ndarray]:
    """The greedy loop of :func:`balanced_packing` on items already in order ([X, N]): pack and rank in
    pack of each, [X, N]. Once per item, over every row at once (numpy reference of
    :func:`eplbd.policy.kernels.pack_ordered`)."""
    num_rows, num_items = sorted_w.shape
    # Flat views: 1-D take/put are several times cheaper than 2-D fancy indexing.
    pack_w = np.zeros(num_rows * num_packs, dtype=np.float64)
    pack_n = np.zeros(num_rows * num_packs, dtype=np.int64)
    row_base = np.arange(num_rows, dtype=np.int64) * num_packs
    pack_sorted = np.empty((num_items, num_rows), dtype=np.int64)
    rank_sorted = np.empty((num_items, num_rows), dtype=np.int64)
    pack_w2 = pack_w.reshape(num_rows, num_packs)
    for k in range(num_items):
        pack = pack_w2.argmin(axis=1)
        flat = row_base + pack
        count = pack_n.take(flat)
        pack_sorted[k] = pack
        rank_sorted[k] = count
        count += 1
        pack_n.put(flat, count)
        # A full pack gets +inf so argmin never picks it again.
        new_w = pack_w.take(flat) + sorted_w[:, k]
        new_w[count == per_pack] = np.inf
        pack_w.put(flat, new_w)
    return pack_sorted.T, rank_sorted.T


def replicate_experts(weight: np.ndarray, num_phy: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Grow ``N`` experts per row to ``num_phy`` replicas, minimising the max per-replica load.

    Replica ``i < N`` is expert ``i``; each further one goes to the expert with the
    highest ``weight / count`` (float64 quotient; lowest expert index on ties).

    Args:
        weight: [X, N] float32 or float64.
        num_phy: replicas per row, ``>= N``.

    Returns:
        phy2log: [X, num_phy] int64, the expert of each replica.
        load: [X, N] float64, the final per-replica load ``weight / logcnt``.
        logcnt: [X, N] int64, replicas per expert.
    """
    if jit.enabled():
        from eplbd.policy.kernels import replicate

        return replicate(np.ascontiguousarray(weight), num_phy)
    num_rows, num_log = weight.shape
    phy2log = np.empty((num_rows, num_phy), dtype=np.int64)
    phy2log[:, :num_log] = np.arange(num_log, dtype=np.int64)
    logcnt = np.ones((num_rows, num_log), dtype=np.int64)
    load = weight.astype(np.float64)
    flat_w, flat_cnt, flat_load = load.copy().reshape(-1), logcnt.reshape(-1), load.reshape(-1)
    row_base = np.arange(num_rows, dtype=np.int64) * num_log
    for i in range(num_log, num_phy):
        expert = load.argmax(axis=1)
        phy2log[:, i] = expert
        flat = row_base + expert
        cnt = flat_cnt.take(flat) + 1
        flat_cnt.put(flat, cnt)
        flat_load.put(flat, flat_w.take(flat) / cnt)
    return phy2log, load, logcnt


def _take(a: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """``np.take_along_axis(a, idx, axis=1)`` (2-D), compiled where it may run."""
    if jit.enabled():
        from eplbd.policy.kernels import gather

        return gather(np.ascontiguousarray(a), np.ascontiguousarray(idx))
    return np.take_along_axis(a, idx, axis=1)


def _inverse(perm: np.ndarray) -> np.ndarray:
    """Row-wise inverse of a permutation [X, N]."""
    if jit.enabled():
        from eplbd.policy.kernels import inverse

        return inverse(np.ascontiguousarray(perm))
    inv = np.empty_like(perm)
    np.put_along_axis(inv, perm, np.arange(perm.shape[1], dtype=perm.dtype)[None, :].repeat(perm.shape[0], 0), axis=1)
    return inv


def _rebalance_hierarchical(
    weight: np.ndarray, num_physical: int, num_groups: int, num_nodes: int, num_gpus: int
) -> tuple[np.ndarray, np.ndarray]:
    """Steps 1-3 above on float32 ``weight`` [L, E]; returns phy2log [L, P] and logcnt [L, E]."""
    num_layers, num_logical = weight.shape
    group_size = num_logical // num_groups
    groups_per_node = num_groups // num_nodes
    log_per_node = num_logical // num_nodes
    phy_per_node = num_physical // num_nodes
    phy_per_gpu = num_physical // num_gpus

    # 1. groups -> nodes; "mlog" numbers experts node-major, group by group.
    group_tokens = weight.reshape(num_layers, num_groups, group_size).sum(axis=-1)
    group_pack, group_rank = balanced_packing(group_tokens, num_nodes)
    log2mlog = (
        ((group_pack * groups_per_node + group_rank) * group_size)[:, :, None]
        + np.arange(group_size, dtype=np.int64)
    ).reshape(num_layers, num_logical)
    mlog2log = _inverse(log2mlog)

    # 2. replicate inside each node; rows are (layer, node).
    mlog_tokens = _take(weight, mlog2log).reshape(-1, log_per_node)
    phy2mlog, mlog_load, mlogcnt = replicate_experts(mlog_tokens, phy_per_node)

    # 3. replicas -> GPUs of the node; "pphy" is the final slot order within the node.
    phy_tokens = _take(mlog_load, phy2mlog)
    pack, rank = balanced_packing(phy_tokens, num_gpus // num_nodes)
    pphy2phy = _inverse(pack * phy_per_gpu + rank)
    pphy2mlog = _take(phy2mlog, pphy2phy).reshape(num_layers, num_nodes, phy_per_node)
    pphy2mlog += (np.arange(num_nodes, dtype=np.int64) * log_per_node)[None, :, None]
    phy2log = _take(mlog2log, pphy2mlog.reshape(num_layers, num_physical))
    logcnt = _take(mlogcnt.reshape(num_layers, num_logical), log2mlog)
    return phy2log, logcnt


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise PolicyError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def check_weight(weight: torch.Tensor | np.ndarray) -> np.ndarray:
    """Validate a load matrix and return it as a float64 numpy array on the CPU.

    Args:
        weight: [layers, num_logical] of any integer or float dtype, any device.

    Returns:
        [layers, num_logical] float64 ``np.ndarray`` (a copy where a conversion was needed).
    """
    arr = _float_array(weight, 2, "weight [layers, num_logical]")
    if arr.shape[1] == 0:
        raise PolicyError(f"weight has no logical experts: shape {tuple(arr.shape)}")
    bad = ~np.isfinite(arr) | (arr < 0)
    if bad.any():
        layer, expert = (int(i) for i in np.argwhere(bad)[0])
        raise PolicyError(
            f"weight must be finite and >= 0, got {arr[layer, expert]!r} at [layer {layer}, expert {expert}]"
            f" ({int(bad.sum())} bad value(s) in all)"
        )
    return np.ascontiguousarray(arr)


def as_float32(weight: torch.Tensor | np.ndarray) -> np.ndarray:
    """A checked load matrix (:func:`check_weight`) rounded to float32 as vLLM's policy rounds it.

    Args:
        weight: [layers, num_logical] of any integer or float dtype, any device, finite and >= 0.

    Returns:
        [layers, num_logical] float32 ``np.ndarray``: ``weight.float()`` for a tensor (one
        rounding, straight from its dtype), ``astype(float32)`` for an array.

    Raises:
        PolicyError: a load beyond float32's range.
    """
    if isinstance(weight, torch.Tensor):
        w32 = weight.detach().float().cpu().numpy()
    else:
        w32 = np.asarray(weight).astype(np.float32)
    if not np.isfinite(w32).all():
        layer, expert = (int(i) for i in np.argwhere(~np.isfinite(w32))[0])
        raise PolicyError(f"weight {float(np.asarray(weight[layer, expert]))!r} at [layer {layer}, expert {expert}]"
                          " is beyond float32's range, which the policy computes in (as vLLM's does)")
    return np.ascontiguousarray(w32)


def hierarchical(num_groups: int, num_nodes: int) -> bool:
    """Whether the policy packs groups onto nodes (vLLM's rule), else it plans globally."""
    return num_groups % num_nodes == 0


def check_args(num_logical: int, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int) -> None:
    """Raise ``PolicyError`` naming the values where vLLM's policy would fail an assertion.

    Global planning (``num_groups % num_nodes != 0``) only needs enough slots, in equal
    shares per GPU; groups and nodes then need not divide anything.
    """
    num_replicas = _positive_int("num_replicas", num_replicas)
    num_groups = _positive_int("num_groups", num_groups)
    num_nodes = _positive_int("num_nodes", num_nodes)
    num_gpus = _positive_int("num_gpus", num_gpus)
    if num_replicas < num_logical:
        raise PolicyError(f"num_replicas={num_replicas} is smaller than the number of logical experts {num_logical}")
    if num_replicas % num_gpus:
        raise PolicyError(f"num_replicas={num_replicas} is not a multiple of num_gpus={num_gpus}")
    if not hierarchical(num_groups, num_nodes):
        return
    if num_logical % num_groups:
        raise PolicyError(f"number of logical experts {num_logical} is not a multiple of num_groups={num_groups}"
                          f" (hierarchical: num_groups is a multiple of num_nodes={num_nodes})")
    if num_gpus % num_nodes:
        raise PolicyError(f"num_gpus={num_gpus} is not a multiple of num_nodes={num_nodes}"
                          f" (hierarchical: num_groups={num_groups} is a multiple of it)")


def plan_checked(w32: np.ndarray, num_replicas: int, num_groups: int, num_nodes: int,
                 num_gpus: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`rebalance_experts`' phy2log and logcnt as numpy, for float32 loads from :func:`as_float32` and a
    topology already checked (``check_args``); callers that need no ``log2phy`` skip deriving it."""
    if hierarchical(num_groups, num_nodes):
        return _rebalance_hierarchical(w32, num_replicas, num_groups, num_nodes, num_gpus)
    return _rebalance_hierarchical(w32, num_replicas, 1, 1, num_gpus)


def rebalance_experts(
    weight: torch.Tensor | np.ndarray,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Compute a balanced placement for every layer (DeepSeek EPLB, vLLM default policy).

    Args:
        weight: [layers, num_logical] load per logical expert; any integer or float
            dtype, any device; finite and >= 0; rounded to float32 as in vLLM.
        num_replicas: number of physical experts (slots), a multiple of ``num_gpus``
            and ``>= num_logical``.
        num_groups: expert groups. Hierarchical balancing when ``num_groups % num_nodes
            == 0`` (then ``num_logical % num_groups == 0`` and ``num_gpus % num_nodes == 0``
            are required), else global, with no condition on groups or nodes.
        num_nodes: server nodes (fast intra-node links).
        num_gpus: EP ranks.

    Returns:
        phy2log: [layers, num_replicas] int64, the logical expert in each slot.
        log2phy: [layers, num_logical, max_replicas] int64, the slots of each logical
            expert in ascending order, -1 padded.
        logcnt: [layers, num_logical] int64, replicas per logical expert.

    Raises:
        PolicyError: a bad weight value or an impossible topology; the message quotes it.
    """
    num_logical = check_weight(weight).shape[1]
    check_args(num_logical, num_replicas, num_groups, num_nodes, num_gpus)
    phy2log, logcnt = plan_checked(as_float32(weight), num_replicas, num_groups, num_nodes, num_gpus)
    phy2log_t = torch.from_numpy(np.ascontiguousarray(phy2log))
    log2phy, _ = derive_log2phy(phy2log_t, num_logical)
    return phy2log_t, log2phy, torch.from_numpy(np.ascontiguousarray(logcnt))
