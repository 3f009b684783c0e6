"""The ``incremental`` policy: keep most experts where they are, move only what buys balance.

A full re-plan (``default``) reaches its balance by recomputing every slot; after a
small drift in load most slots then need an expert from another rank. This policy
starts from the placement in force and repairs it, every layer on its own (the search is
compiled, :mod:`eplbd.policy.incremental_search`; its numpy reference, all layers in lock
step, runs where no JIT may: :mod:`eplbd.policy.jit`):

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
from eplbd.policy import jit
from eplbd.policy.balance import _balancedness, predicted_balancedness
from eplbd.policy.default import as_float32, check_args, check_weight, plan_checked, rebalance_experts
from eplbd.policy.incremental_budget import _pick, _replan_cost
from eplbd.policy.incremental_layout import _TIE, _copies, _Layout, _moved, _Options
from eplbd.policy.incremental_project import _node_relabelled, _project, _regroup, _Relabelled, _split_groups
from eplbd.policy.matching import keep_slots, rank_overlap
from eplbd.policy.placement import _int_array
from eplbd.policy.registry import Policy, register_policy

KEEP = 0.99  # a plan keeps >= 99% of the full re-plan's gain in predicted balancedness (summed over layers)
FRESH_SHARE = 0.5
MAX_ROUNDS = 24
MAX_RETARGETS = 24
MAX_SPLITS = 4  # split iterations (one split per layer each)


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
    compiled = jit.enabled()
    if compiled:
        from eplbd.policy.incremental_search import apply_changes, moved_slots, rank_loads

        R_old = rank_loads(w, old, num_gpus)
        mean, before = R_old.mean(axis=1), _balancedness(R_old)
        held = None
    else:
        holds = _copies(old, num_gpus, num_logical)
        lay = _Layout(w[both], old[both], num_gpus, zones, np.concatenate([holds, holds]))
        before, mean = lay.balancedness()[:num_layers], lay.mean[:num_layers]
        held = lay.held[:num_layers]
    if move_budget == 0 or num_layers == 0:
        return IncrementalPlan(torch.from_numpy(old.copy()), ["kept"] * num_layers,
                               np.zeros(num_layers, dtype=np.int64), before, before.copy(), before.copy())

    replan = plan_checked(as_float32(weight), num_replicas, num_groups, num_nodes, num_gpus)[0]
    replan_bal = _predicted(w, replan, num_gpus)
    overlap = rank_overlap(replan, old, num_gpus, num_logical, held=held)
    relabelled = _Relabelled(replan, overlap, num_gpus, num_nodes, hierarchical)

    target = mean / np.maximum(replan_bal, 1e-300)  # the re-plan's peak rank load
    # Both paths in one search (one loop): rows [0, L) start from the placement in force, rows [L, 2L)
    # from its projection onto the re-plan's replica counts per node (its nodes relabelled to keep the
    # most; one zone when global), every slot keeping its expert while its node still wants a copy.
    proj = _project(w, old, _node_relabelled(replan, old, num_logical, num_nodes) if hierarchical else replan,
                    num_gpus, zones)
    start = np.concatenate([old, proj])
    if compiled:
        bad = _split_groups(old, num_logical, num_groups, num_nodes) if hierarchical else np.zeros(num_layers, bool)
        c2, b2, changes = _search_compiled(w, old, start, np.flatnonzero(bad), relabelled, target, mean, num_gpus,
                                           zones, max_rounds)
    else:
        c2, b2, changes = _search_numpy(lay, start, relabelled, target, num_groups, num_nodes, hierarchical,
                                        max_rounds)
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
    for rows, slots, experts, option in changes:  # in the order made; a slot may change more than once
        if compiled:
            apply_changes(new, rows, slots, experts, option, row_pick, num_layers)
            continue
        take = option <= row_pick[rows]
        at = both[rows[take]] * num_replicas + slots[take]
        last = at.size - 1 - np.unique(at[::-1], return_index=True)[1]
        new.ravel()[at[last]] = experts[take][last]
    re_layers = np.flatnonzero(pick == n_opts)
    if re_layers.size:
        new[re_layers] = keep_slots(relabelled(re_layers), old[re_layers], num_gpus)
    if compiled:
        moved = moved_slots(old, new, num_gpus)
    else:
        moved = _moved(held, new, np.arange(num_replicas) // (num_replicas // num_gpus))
    choice = ["replan" if p == n_opts else "project" if p >= n1 else
              ("moves" if m or not np.array_equal(new[i], old[i]) else "kept")
              for i, (p, m) in enumerate(zip(pick.tolist(), moved.tolist()))]
    return IncrementalPlan(torch.from_numpy(new), choice, moved, before, _predicted(w, new, num_gpus), replan_bal)


def _search_compiled(w: np.ndarray, old: np.ndarray, start: np.ndarray, bad: np.ndarray, relabelled: _Relabelled,
                     target: np.ndarray, mean: np.ndarray, num_gpus: int, zones: int,
                     max_rounds: int) -> tuple[np.ndarray, np.ndarray, list]:
    """Every option of both start points (``start``: [2L, P], rows [0, L) the placement in force, [L, 2L) its
    projection), compiled: (cost, bal) [options, 2L] and the changes (rows, slots, experts, option) in the
    order made. ``bad``: layers whose placement splits an expert group over nodes, regrouped first."""
    from eplbd.policy.incremental_search import search

    L = len(old)
    both = np.arange(2 * L) % L
    rows, slots = np.nonzero(start != old[both])
    changes = [(rows, slots, start[rows, slots], np.zeros_like(rows))]
    pre = start
    if bad.size:
        pre = start.copy()
        pre[bad] = _project(w[bad], old[bad], relabelled(bad), num_gpus, zones)
        rows, slots = np.nonzero(pre[bad] != old[bad])
        rows = bad[rows]
        changes.append((rows, slots, pre[rows, slots], np.ones_like(rows)))
    cost, bal, made = search(w, old, start, pre, bool(bad.size), np.concatenate([target, target]), mean[both],
                             num_gpus, num_gpus // zones, MAX_SPLITS, MAX_RETARGETS, max_rounds)
    changes.append(tuple(np.ascontiguousarray(made.T)))
    return cost, bal, changes


def _search_numpy(lay: _Layout, start: np.ndarray, relabelled: _Relabelled, target: np.ndarray, num_groups: int,
                  num_nodes: int, hierarchical: bool, max_rounds: int) -> tuple[np.ndarray, np.ndarray, list]:
    """:func:`_search_compiled` in numpy, on ``lay`` (both start points' rows, all in lock step)."""
    L = lay.L // 2
    lay.set_phy(start, np.arange(L, 2 * L))
    rows, slots = np.nonzero(lay.phy != lay.old)
    opts = _Options([lay.spent()], [lay.balancedness()], [(rows, slots, lay.phy[rows, slots], np.zeros_like(rows))])
    if hierarchical:
        _regroup(lay, opts, relabelled, num_groups, num_nodes, L)
    _repair_numpy(lay, opts, np.concatenate([target, target]), max_rounds)
    return np.stack(opts.cost), np.stack(opts.bal), opts.changes


def _repair_numpy(lay: _Layout, opts: _Options, target: np.ndarray, max_rounds: int) -> None:
    """Steps 1-3 of the module docstring on every row of ``lay``, each recorded as options in ``opts``:
    split ``k`` and retarget ``k`` are one option each, swap round ``k`` one option per pair, for every
    row (a row past its last step repeats its last option); every step over all rows at once, until no
    row makes one. The numpy reference of :func:`eplbd.policy.incremental_search.search`."""
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


def _holds_every_expert(old: np.ndarray, num_logical: int) -> bool:
    off = np.arange(old.shape[0])[:, None] * num_logical
    return bool((np.bincount((old + off).ravel(), minlength=old.shape[0] * num_logical) > 0).all())


def _predicted(w: np.ndarray, phy2log: np.ndarray, num_gpus: int) -> np.ndarray:
    """:func:`~eplbd.policy.balance.predicted_balancedness` of a valid placement (the same floats; rank loads
    summed by the compiled loop where it runs)."""
    if not jit.enabled():
        return predicted_balancedness(w, phy2log, num_gpus).numpy()
    from eplbd.policy.incremental_search import rank_loads

    return _balancedness(rank_loads(w, np.ascontiguousarray(phy2log, dtype=np.int64), num_gpus))


def warm() -> str:
    """Compile (or load from numba's cache) every compiled loop of ``default`` and ``incremental``, with the
    argument types the policies use; returns :func:`eplbd.policy.jit.reason`. Where compiling fails (numba
    present but unable to build for this machine), the process falls back to the numpy references."""
    if jit.enabled():
        try:
            rng = np.random.default_rng(0)
            for groups, nodes in ((4, 2), (1, 1)):
                w = rng.integers(1, 100, (2, 16))
                old = rebalance_experts(w, 24, groups, nodes, 8)[0]
                plan_incremental(w[::-1].copy(), 24, groups, nodes, 8, old)
                plan_incremental(w[::-1].copy(), 24, groups, nodes, 8, old, move_budget=2)
        except Exception as exc:  # noqa: BLE001 - whatever numba raises, numpy plans the same
            jit.disable(f"numpy (compiling the policy loops failed: {type(exc).__name__}: {exc})")
    return jit.reason()


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
