"""Movement-aware planning: exact rank matching, stable default plans, the incremental policy's budget,
default trade-off (a share of the full re-plan's gain) and node locality."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eplbd.errors import PolicyError
from eplbd.policy import (get_policy, initial_placement, moved_slots, plan_incremental, predicted_balancedness,
                          preserve_local_slots, rebalance_experts)
from eplbd.policy.incremental import KEEP
from eplbd.policy.incremental_budget import _relabel_cost
from eplbd.policy.matching import (apply_rank_order, assignment, assignment_batch, rank_overlap,
                                   stable_rank_order_from)
from test_policy import check_placement, make_weight, topologies

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 6), seed=st.integers(0, 2**32 - 1))
def test_assignment_is_exact(n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    # A batch mixing many ties (small integers), all-equal rows and distinct floats.
    cost = np.concatenate([rng.integers(0, 4, size=(3, n, n)), np.zeros((1, n, n)), rng.random((2, n, n))])
    cols = assignment_batch(cost)
    for problem, col in zip(cost, cols):
        assert sorted(col.tolist()) == list(range(n))
        best = min(sum(problem[i, p[i]] for i in range(n)) for p in itertools.permutations(range(n)))
        assert problem[np.arange(n), col].sum() == pytest.approx(best, abs=1e-12)
    assert assignment(cost[0]).tolist() == cols[0].tolist()


@FAST
@given(topo=topologies(), seed=st.integers(0, 2**32 - 1))
def test_relabel_cost_bounds_the_exact_relabelling(topo: tuple[int, ...], seed: int) -> None:
    # The incremental policy prices its full re-plan option with a greedy matching: it must never
    # promise fewer moves than the exact relabelling makes (nodes as units when hierarchical).
    layers, num_logical, num_replicas, groups, nodes, gpus = topo
    w1, w2 = drifted(seed, layers, num_logical)
    hierarchical = groups % nodes == 0 and nodes > 1
    old = rebalance_experts(w1, num_replicas, groups, nodes, gpus)[0].numpy()
    new = rebalance_experts(w2, num_replicas, groups, nodes, gpus)[0].numpy()
    keep = rank_overlap(new, old, gpus, num_logical)
    order = stable_rank_order_from(keep, nodes, hierarchical)
    exact = moved_slots(old, preserve_local_slots(apply_rank_order(new, order, gpus), old, gpus), gpus)
    assert (_relabel_cost(keep, num_replicas, nodes, hierarchical) >= exact.numpy()).all()


def permute_ranks(phy2log: torch.Tensor, gpus: int, nodes: int, hierarchical: bool, seed: int) -> torch.Tensor:
    """The same plan with ranks relabelled (nodes as units when hierarchical) and slots shuffled in ranks."""
    rng = np.random.default_rng(seed)
    layers, slots = phy2log.shape
    local, per_node = slots // gpus, gpus // nodes
    out = phy2log.numpy().reshape(layers, gpus, local).copy()
    for layer in range(layers):
        if hierarchical:
            node_order = rng.permutation(nodes)
            order = np.concatenate([n * per_node + rng.permutation(per_node) for n in node_order])
        else:
            order = rng.permutation(gpus)
        out[layer] = out[layer, order]
        for r in range(gpus):
            out[layer, r] = rng.permutation(out[layer, r])
    return torch.from_numpy(out.reshape(layers, slots))


@FAST
@given(topo=topologies(), seed=st.integers(0, 2**32 - 1))
def test_stable_default_removes_every_relabelling_move(topo: tuple[int, ...], seed: int) -> None:
    layers, num_logical, num_replicas, groups, nodes, gpus = topo
    weight = make_weight(seed, layers, num_logical, "float")
    plan = rebalance_experts(weight, num_replicas, groups, nodes, gpus)[0]
    old = permute_ranks(plan, gpus, nodes, groups % nodes == 0 and nodes > 1, seed)
    again = get_policy("default").rebalance(weight, num_replicas, groups, nodes, gpus, old_phy2log=old)
    assert int(moved_slots(old, again, gpus).sum()) == 0
    local = num_replicas // gpus
    blocks = plan.reshape(layers, gpus, local)
    if all(len(set(b.tolist())) == local for b in blocks.reshape(-1, local)):
        # No rank holds an expert twice: each rank keeps its experts in the slots they were in.
        assert torch.equal(again, old)


def keeps_the_gain(plan) -> bool:  # noqa: ANN001 - an IncrementalPlan
    """The default trade-off: at least ``KEEP`` of the full re-plan's gain in summed predicted balancedness."""
    return plan.after.sum() - plan.before.sum() >= KEEP * max(plan.replan.sum() - plan.before.sum(), 0.0) - 1e-9


def drifted(seed: int, layers: int, num_logical: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two loads: a skewed one and the same drifted (each expert scaled by a random factor)."""
    rng = np.random.default_rng(seed)
    w1 = rng.zipf(1.5, size=(layers, num_logical)).astype(np.float64) * 10
    w2 = w1 * rng.uniform(0.6, 1.6, size=w1.shape)
    return torch.from_numpy(w1), torch.from_numpy(w2)


def old_plan(w1: torch.Tensor, topo: tuple[int, ...], kind: str) -> torch.Tensor:
    layers, num_logical, num_replicas, groups, nodes, gpus = topo
    if kind == "initial":
        return initial_placement(layers, num_logical, num_replicas, gpus, "round_robin")
    return rebalance_experts(w1, num_replicas, groups, nodes, gpus)[0]


@FAST
@given(topo=topologies(), seed=st.integers(0, 2**32 - 1), budget=st.integers(0, 40),
       kind=st.sampled_from(["initial", "default"]))
def test_budget_respected_exactly(topo: tuple[int, ...], seed: int, budget: int, kind: str) -> None:
    layers, num_logical, num_replicas, groups, nodes, gpus = topo
    w1, w2 = drifted(seed, layers, num_logical)
    old = old_plan(w1, topo, kind)
    plan = plan_incremental(w2, num_replicas, groups, nodes, gpus, old, move_budget=budget)
    check_placement(plan.phy2log, layers, num_logical, num_replicas, gpus)
    moved = moved_slots(old, plan.phy2log, gpus)
    assert int(moved.sum()) <= budget
    assert plan.moved.tolist() == moved.tolist()
    # Never worse than where it started.
    assert plan.after.mean() >= plan.before.mean() - 1e-9
    if budget == 0:
        assert torch.equal(plan.phy2log, old)


@FAST
@given(topo=topologies(), seed=st.integers(0, 2**32 - 1), kind=st.sampled_from(["initial", "default"]))
def test_unlimited_budget_at_least_default_and_auto_keeps_the_gain(topo: tuple[int, ...], seed: int,
                                                                     kind: str) -> None:
    layers, num_logical, num_replicas, groups, nodes, gpus = topo
    w1, w2 = drifted(seed, layers, num_logical)
    old = old_plan(w1, topo, kind)
    default = predicted_balancedness(w2, rebalance_experts(w2, num_replicas, groups, nodes, gpus)[0], gpus)
    free = plan_incremental(w2, num_replicas, groups, nodes, gpus, old, move_budget=10**9)
    assert bool((torch.from_numpy(free.after) >= default - 1e-9).all())
    auto = get_policy("incremental").rebalance(w2, num_replicas, groups, nodes, gpus, old_phy2log=old)
    check_placement(auto, layers, num_logical, num_replicas, gpus)
    got = predicted_balancedness(w2, auto, gpus)
    before = float(predicted_balancedness(w2, old, gpus).sum())
    assert float(got.sum()) - before >= KEEP * max(float(default.sum()) - before, 0.0) - 1e-9


def test_small_drift_moves_few_slots_and_keeps_balance() -> None:
    w1, w2 = drifted(3, 6, 64)
    w2 = w1 * torch.from_numpy(np.random.default_rng(4).uniform(0.9, 1.1, size=w1.shape))
    old = get_policy("incremental").rebalance(w1, 80, 1, 1, 16)
    plan = plan_incremental(w2, 80, 1, 1, 16, old)
    full = get_policy("default").rebalance(w2, 80, 1, 1, 16, old_phy2log=old)
    assert keeps_the_gain(plan)
    assert plan.moved.sum() < 0.5 * moved_slots(old, full, 16).sum()
    assert "slots moved" in plan.summary()


@FAST
@given(seed=st.integers(0, 2**32 - 1), budget=st.integers(1, 30))
def test_node_locality_in_the_hierarchical_case(seed: int, budget: int) -> None:
    # 4 nodes x 2 GPUs, 8 groups of 4 experts; old = a hierarchical plan (groups on nodes).
    layers, num_logical, num_replicas, groups, nodes, gpus = 3, 32, 40, 8, 4, 8
    w1, w2 = drifted(seed, layers, num_logical)
    old = rebalance_experts(w1, num_replicas, groups, nodes, gpus)[0]
    plan = plan_incremental(w2, num_replicas, groups, nodes, gpus, old, move_budget=budget)
    per_node, size = num_replicas // nodes, num_logical // groups
    for layer, choice in enumerate(plan.choice):
        if choice in ("replan", "project"):
            # Groups may change nodes as in the full re-plan, but each stays whole on one node.
            node_of = {}
            for slot, expert in enumerate(plan.phy2log[layer].tolist()):
                assert node_of.setdefault(expert // size, slot // per_node) == slot // per_node, (layer, expert)
            continue
        for n in range(nodes):
            before = set(old[layer, n * per_node:(n + 1) * per_node].tolist())
            after = set(plan.phy2log[layer, n * per_node:(n + 1) * per_node].tolist())
            assert after <= before, f"node {n} of layer {layer} received experts {after - before} from another node"


def test_fallbacks_and_bad_arguments() -> None:
    w = torch.tensor([[5.0, 1, 1, 9, 2, 2, 7, 1]])
    plain = get_policy("default").rebalance(w, 12, 1, 1, 4)
    assert torch.equal(get_policy("incremental").rebalance(w, 12, 1, 1, 4), plain)
    other_shape = initial_placement(1, 8, 8, 4)
    assert torch.equal(get_policy("incremental").rebalance(w, 12, 1, 1, 4, old_phy2log=other_shape), plain)
    old = initial_placement(1, 8, 12, 4)
    with pytest.raises(PolicyError, match="-1"):
        plan_incremental(w, 12, 1, 1, 4, old, move_budget=-1)
    with pytest.raises(PolicyError, match="every logical expert"):
        plan_incremental(w, 12, 1, 1, 4, torch.zeros(1, 12, dtype=torch.int64))
    zero = plan_incremental(torch.zeros(1, 8), 12, 1, 1, 4, old)
    assert torch.equal(zero.phy2log, old) and zero.choice == ["kept"]


def test_budget_is_spent_across_identical_layers() -> None:
    # Three identical layers, each needing one split (one slot): a budget of 1 or 2 buys 1 or 2 of them.
    old = initial_placement(3, 8, 12, 4)
    w = torch.tensor([[510.0, 20, 20, 20, 10, 10, 10, 10]] * 3)
    for budget in (1, 2):
        plan = plan_incremental(w, 12, 1, 1, 4, old, move_budget=budget)
        assert int(plan.moved.sum()) == budget and plan.choice.count("moves") == budget
        assert (plan.after >= plan.before - 1e-12).all() and plan.after.max() > plan.before.max()


def test_hot_expert_is_split_within_its_node() -> None:
    # Expert 15 (one replica in the initial layout) alone outweighs a rank's fair share: swaps cannot
    # help, more replicas must be made, and only on the node that holds it.
    layers, num_logical, num_replicas, groups, nodes, gpus = 2, 16, 24, 4, 2, 4
    w = torch.ones(layers, num_logical) * 10
    w[:, 15] = 400
    # Groups of 4 on their nodes: node 0 holds groups 0-1 (ranks 0-1), node 1 groups 2-3 (ranks 2-3).
    row = [0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3, 8, 9, 10, 11, 12, 13, 14, 15, 8, 9, 10, 11]
    old = torch.tensor([row] * layers)
    plan = plan_incremental(w, num_replicas, groups, nodes, gpus, old, fresh_share=2.0)
    cnt = lambda p: (p == 15).sum(axis=1)  # noqa: E731
    assert (cnt(plan.phy2log) > cnt(old)).all()
    assert (plan.after > plan.before).all()
    per_node = num_replicas // nodes
    for layer in range(layers):
        for n in range(nodes):
            node = slice(n * per_node, (n + 1) * per_node)
            assert set(plan.phy2log[layer, node].tolist()) <= set(old[layer, node].tolist())


def test_far_from_balanced_layers_take_the_full_replan() -> None:
    # From the engine's initial layout a repair costs a large share of a full re-plan: those layers
    # take the (relabelled) re-plan, unless told never to; both keep 99% of its gain.
    w1, w2 = drifted(7, 4, 64)
    old = initial_placement(4, 64, 80, 8)
    fresh = plan_incremental(w2, 80, 1, 1, 8, old)
    repair = plan_incremental(w2, 80, 1, 1, 8, old, fresh_share=2.0)
    assert fresh.choice.count("replan") > repair.choice.count("replan")
    for plan in (fresh, repair):
        assert keeps_the_gain(plan)
    for layer, choice in enumerate(fresh.choice):
        if choice == "replan":
            assert fresh.after[layer] == pytest.approx(fresh.replan[layer])
    assert fresh.moved.sum() > repair.moved.sum()


def test_layout_splitting_groups_is_regrouped_node_by_node() -> None:
    # The engine's linear layout spreads groups over nodes. Layers the policy changes end with every
    # group on one node (the full re-plan's nodes, relabelled), for fewer moves than the stable default.
    layers, num_logical, num_replicas, groups, nodes, gpus = 4, 64, 80, 8, 4, 16
    _, w = drifted(11, layers, num_logical)
    old = initial_placement(layers, num_logical, num_replicas, gpus)
    plan = plan_incremental(w, num_replicas, groups, nodes, gpus, old, fresh_share=2.0)
    assert keeps_the_gain(plan)
    per_node, size = num_replicas // nodes, num_logical // groups
    for layer, choice in enumerate(plan.choice):
        assert choice != "kept"
        node_of = {}
        for slot, expert in enumerate(plan.phy2log[layer].tolist()):
            assert node_of.setdefault(expert // size, slot // per_node) == slot // per_node, (layer, expert)
    full = get_policy("default").rebalance(w, num_replicas, groups, nodes, gpus, old_phy2log=old)
    assert plan.moved.sum() < moved_slots(old, full, gpus).sum()


def test_a_spare_replica_relieves_a_hot_rank_with_one_slot() -> None:
    # Rank loads 13.5, 23, 20, 12.5 (experts 6 and 9 have two replicas each). Within a budget of one slot
    # no swap fits (a swap moves 2); turning rank 3's spare copy of expert 9 into a second copy of rank 1's
    # expert 5 does: loads 16, 18, 20, 15, as balanced as the full re-plan.
    w = torch.tensor([[5.0, 10.0, 5.0, 5.0, 6.0, 10.0, 10.0, 5.0, 8.0, 5.0]])
    old = torch.tensor([[9, 7, 4, 8, 0, 5, 6, 2, 1, 3, 6, 9]])
    plan = plan_incremental(w, 12, 1, 1, 4, old, move_budget=1)
    assert plan.phy2log.tolist() == [[9, 7, 4, 8, 0, 5, 6, 2, 1, 3, 6, 5]]
    assert plan.moved.tolist() == [1]
    assert plan.before[0] == pytest.approx(17.25 / 23) and plan.after[0] == pytest.approx(17.25 / 20)
    assert plan.after[0] == pytest.approx(plan.replan[0])
