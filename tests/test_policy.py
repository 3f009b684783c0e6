"""The default policy: golden example, a plain reference port, invariants of every policy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eplbd.errors import PolicyError
from eplbd.policy import (
    Policy,
    available_policies,
    derive_log2phy,
    get_policy,
    initial_placement,
    moved_slots,
    rebalance_experts,
    register_policy,
)
from eplbd.policy import registry as registry_mod

FAST = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --- a straightforward per-layer port of vLLM's default policy, for comparison ------
#
# vLLM 0.32 (vllm/distributed/eplb/policy/default.py) rounds loads to float32, sums groups
# in float32, divides by replica counts in float64, orders items by numpy's default
# argsort of the negated loads (not a stable sort: its order of equal loads is vLLM's
# tie-break) and takes the first lightest pack / first heaviest per-replica load.


def ref_order(values: list[float], dtype: type) -> list[int]:
    """Heaviest first in vLLM's order: numpy's default argsort of the negated values, in vLLM's dtype."""
    return np.argsort(-np.asarray(values, dtype=dtype)).tolist()


def ref_packing(weights: list[float], num_packs: int, dtype: type) -> tuple[list[int], list[int]]:
    n = len(weights)
    per_pack = n // num_packs
    if per_pack == 1:
        return list(range(n)), [0] * n
    pack, rank = [-1] * n, [-1] * n
    pack_w, pack_n = [0.0] * num_packs, [0] * num_packs
    for item in ref_order(weights, dtype):
        p = min((p for p in range(num_packs) if pack_n[p] < per_pack), key=pack_w.__getitem__)  # first lightest
        pack[item], rank[item] = p, pack_n[p]
        pack_w[p] += weights[item]  # float64
        pack_n[p] += 1
    return pack, rank


def ref_replicate(weights: list[float], num_phy: int) -> tuple[list[int], list[int]]:
    n = len(weights)
    phy2log, cnt = list(range(n)), [1] * n
    for _ in range(num_phy - n):
        e = max(range(n), key=lambda j: weights[j] / cnt[j])  # first maximum, float64 quotients
        phy2log.append(e)
        cnt[e] += 1
    return phy2log, cnt


def ref_layer(w: list[float], num_replicas: int, groups: int, nodes: int, gpus: int) -> list[int]:
    """One layer's phy2log; ``w`` is rounded to float32 here (an int64 tensor row converted by torch
    rounds the same way)."""
    if groups % nodes:
        groups, nodes = 1, 1
    w32 = np.asarray(w, dtype=np.float64).astype(np.float32)
    w = [float(x) for x in w32]
    num_logical = len(w)
    gs = num_logical // groups
    sums = [float(np.sum(w32[g * gs:(g + 1) * gs])) for g in range(groups)]  # float32, numpy's pairwise sum
    gpack, grank = ref_packing(sums, nodes, np.float32)
    phy_per_node, phy_per_gpu = num_replicas // nodes, num_replicas // gpus
    out = [-1] * num_replicas
    for node in range(nodes):
        node_groups = sorted((g for g in range(groups) if gpack[g] == node), key=lambda g: grank[g])
        experts = [g * gs + i for g in node_groups for i in range(gs)]
        node_w = [w[e] for e in experts]
        phy2m, cnt = ref_replicate(node_w, phy_per_node)
        loads = [node_w[m] / cnt[m] for m in phy2m]
        pack, rank = ref_packing(loads, gpus // nodes, np.float64)
        for i, m in enumerate(phy2m):
            out[node * phy_per_node + pack[i] * phy_per_gpu + rank[i]] = experts[m]
    return out


# --- topologies --------------------------------------------------------------------


@st.composite
def topologies(draw: st.DrawFn) -> tuple[int, int, int, int, int, int]:
    """(layers, num_logical, num_replicas, num_groups, num_nodes, num_gpus)."""
    nodes = draw(st.integers(1, 4))
    if nodes > 1 and draw(st.booleans()):
        # Global fallback: neither experts nor GPUs need divide by groups or nodes (as in vLLM).
        groups = draw(st.integers(1, 8).filter(lambda g: g % nodes != 0))
        gpus = draw(st.integers(1, 6))
        num_logical = draw(st.integers(1, 16))
    else:
        gpus = nodes * draw(st.integers(1, 3))
        groups = nodes * draw(st.integers(1, 3))
        num_logical = groups * draw(st.integers(1, 4))
    num_replicas = gpus * (math.ceil(num_logical / gpus) + draw(st.integers(0, 2)))
    layers = draw(st.integers(1, 4))
    return layers, num_logical, num_replicas, groups, nodes, gpus


def make_weight(seed: int, layers: int, num_logical: int, kind: str) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    if kind == "int":
        w = torch.from_numpy(rng.integers(0, 50, size=(layers, num_logical)))
    elif kind == "float":
        w = torch.from_numpy(rng.random((layers, num_logical)) * 100)
    else:  # skewed with whole zero layers
        w = torch.from_numpy(rng.zipf(1.6, size=(layers, num_logical)).astype(np.int32))
        w[rng.random(layers) < 0.3] = 0
    return w


# --- golden ------------------------------------------------------------------------

GOLDEN_WEIGHT = [
    [90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
    [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27],
]
GOLDEN_PHY2LOG = [
    [5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
    [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1],
]
GOLDEN_LOGCNT = [[1, 2, 1, 1, 2, 2, 1, 1, 1, 1, 2, 1], [1, 2, 1, 1, 1, 2, 2, 1, 2, 1, 1, 1]]


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.float32, torch.float64, torch.bfloat16])
def test_golden_deepseek_readme(dtype: torch.dtype) -> None:
    phy2log, log2phy, logcnt = rebalance_experts(torch.tensor(GOLDEN_WEIGHT, dtype=dtype), 16, 4, 2, 8)
    assert phy2log.tolist() == GOLDEN_PHY2LOG
    assert logcnt.tolist() == GOLDEN_LOGCNT
    assert phy2log.dtype == log2phy.dtype == logcnt.dtype == torch.int64
    assert log2phy.shape == (2, 12, 2)
    assert log2phy[0, 1].tolist() == [13, 15]  # expert 1 of layer 0 sits in slots 13 and 15


def test_golden_via_registry_and_numpy_input() -> None:
    policy = get_policy("default")
    assert policy.rebalance(np.asarray(GOLDEN_WEIGHT), 16, 4, 2, 8).tolist() == GOLDEN_PHY2LOG


def test_golden_reference_port_agrees() -> None:
    got = [ref_layer([float(x) for x in row], 16, 4, 2, 8) for row in GOLDEN_WEIGHT]
    assert got == GOLDEN_PHY2LOG


@FAST
@given(topo=topologies(), seed=st.integers(0, 2**32 - 1))
def test_matches_reference_port(topo: tuple[int, ...], seed: int) -> None:
    layers, num_logical, num_replicas, groups, nodes, gpus = topo
    # Distinct random floats: no ties anywhere but between replicas of one expert.
    w = np.random.default_rng(seed).random((layers, num_logical)) * 1000 + 1
    phy2log, _, _ = rebalance_experts(torch.from_numpy(w), num_replicas, groups, nodes, gpus)
    expected = [ref_layer(w[i].tolist(), num_replicas, groups, nodes, gpus) for i in range(layers)]
    assert phy2log.tolist() == expected


# --- invariants of every registered policy ----------------------------------------


def check_placement(phy2log: torch.Tensor, layers: int, num_logical: int, num_replicas: int, gpus: int) -> None:
    assert phy2log.dtype == torch.int64
    assert tuple(phy2log.shape) == (layers, num_replicas)
    assert int(phy2log.min()) >= 0 and int(phy2log.max()) < num_logical
    counts = torch.stack([torch.bincount(row, minlength=num_logical) for row in phy2log])
    assert bool((counts >= 1).all()), "a logical expert has no replica"
    assert bool((counts.sum(1) == num_replicas).all())
    assert num_replicas % gpus == 0  # slots per rank equal by construction of the shape


@pytest.mark.parametrize("name", available_policies())
@FAST
@given(topo=topologies(), seed=st.integers(0, 2**32 - 1), kind=st.sampled_from(["int", "float", "skewed"]))
def test_policy_invariants(name: str, topo: tuple[int, ...], seed: int, kind: str) -> None:
    layers, num_logical, num_replicas, groups, nodes, gpus = topo
    weight = make_weight(seed, layers, num_logical, kind)
    policy = get_policy(name)
    phy2log = policy.rebalance(weight, num_replicas, groups, nodes, gpus)
    check_placement(phy2log, layers, num_logical, num_replicas, gpus)
    old = initial_placement(layers, num_logical, num_replicas, gpus)
    again = policy.rebalance(weight, num_replicas, groups, nodes, gpus, old_phy2log=old)
    check_placement(again, layers, num_logical, num_replicas, gpus)
    assert moved_slots(old, again, gpus).shape == (layers,)


@FAST
@given(topo=topologies(), seed=st.integers(0, 2**32 - 1), kind=st.sampled_from(["int", "float", "skewed"]))
def test_default_outputs_consistent(topo: tuple[int, ...], seed: int, kind: str) -> None:
    layers, num_logical, num_replicas, groups, nodes, gpus = topo
    weight = make_weight(seed, layers, num_logical, kind)
    phy2log, log2phy, logcnt = rebalance_experts(weight, num_replicas, groups, nodes, gpus)
    check_placement(phy2log, layers, num_logical, num_replicas, gpus)
    assert logcnt.dtype == log2phy.dtype == torch.int64
    assert tuple(logcnt.shape) == (layers, num_logical)
    assert bool((logcnt.sum(1) == num_replicas).all())
    assert tuple(log2phy.shape) == (layers, num_logical, int(logcnt.max()))
    for layer in range(layers):
        for e in range(num_logical):
            slots = log2phy[layer, e].tolist()
            n = int(logcnt[layer, e])
            assert slots[n:] == [-1] * (len(slots) - n)
            assert slots[:n] == sorted(s for s in range(num_replicas) if int(phy2log[layer, s]) == e)
    if groups % nodes == 0:
        # Every node's slots hold experts of exactly its own groups.
        group_size = num_logical // groups
        per_node = num_replicas // nodes
        node_groups = (phy2log // group_size).reshape(layers, nodes, per_node)
        for layer in range(layers):
            seen = [set(node_groups[layer, n].tolist()) for n in range(nodes)]
            assert all(len(s) == groups // nodes for s in seen)
            assert set().union(*seen) == set(range(groups))


def test_no_redundancy_and_zero_layers() -> None:
    phy2log, log2phy, logcnt = rebalance_experts(torch.ones(3, 8), 8, 2, 2, 4)
    assert bool((logcnt == 1).all()) and log2phy.shape == (3, 8, 1)
    phy2log, log2phy, logcnt = rebalance_experts(torch.zeros(0, 8), 16, 2, 2, 4)
    assert phy2log.shape == (0, 16) and logcnt.shape == (0, 8)


def test_loads_are_rounded_to_float32_like_vllm() -> None:
    # vLLM's policy plans on weight.float(): 2**24 and 2**24 + 1 are then equal and the redundant
    # slot goes to the first of them, whatever the input dtype (this used to plan in float64).
    for dtype in (torch.int64, torch.float64, torch.float32):
        w = torch.tensor([[2**24, 2**24 + 1]], dtype=dtype)
        assert rebalance_experts(w, 3, 1, 1, 1)[2].tolist() == [[2, 1]]
    with pytest.raises(PolicyError, match="float32"):
        rebalance_experts(torch.tensor([[1e39, 1.0]], dtype=torch.float64), 2, 1, 1, 1)


def test_non_contiguous_input() -> None:
    w = torch.tensor(GOLDEN_WEIGHT, dtype=torch.float64).T.contiguous().T
    assert not w.is_contiguous()
    assert rebalance_experts(w, 16, 4, 2, 8)[0].tolist() == GOLDEN_PHY2LOG


# --- bad arguments ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "args", "needle"),
    [
        ((2, 12), (10, 4, 2, 8), "num_replicas=10"),
        ((2, 12), (18, 4, 2, 4), "num_replicas=18"),
        ((2, 12), (16, 5, 1, 8), "num_groups=5"),
        ((2, 12), (16, 4, 2, 1), "num_nodes=2"),
        ((2, 12), (16, 4, 2, 0), "0"),
        ((2, 12), (16, 4, -2, 8), "-2"),
        ((2, 12), (16.0, 4, 2, 8), "16.0"),
        ((2, 12), (True, 4, 2, 8), "True"),
        ((2, 3, 4), (16, 4, 2, 8), "(2, 3, 4)"),
        ((2, 0), (16, 4, 2, 8), "(2, 0)"),
    ],
)
def test_bad_arguments(shape: tuple[int, ...], args: tuple, needle: str) -> None:
    with pytest.raises(PolicyError, match=None) as info:
        rebalance_experts(torch.ones(shape), *args)
    assert needle in str(info.value)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(("bad", "needle"), [(float("nan"), "nan"), (float("inf"), "inf"), (-5.0, "-5.0")])
def test_bad_weight_values(bad: float, needle: str) -> None:
    w = torch.ones(3, 8)
    w[1, 6] = bad
    with pytest.raises(PolicyError) as info:
        rebalance_experts(w, 8, 1, 1, 2)
    assert needle in str(info.value) and "layer 1, expert 6" in str(info.value)


def test_bad_weight_types() -> None:
    with pytest.raises(PolicyError, match="torch.bool"):
        rebalance_experts(torch.ones(2, 4, dtype=torch.bool), 4, 1, 1, 1)
    with pytest.raises(PolicyError, match="list"):
        rebalance_experts([[1, 2]], 2, 1, 1, 1)  # type: ignore[arg-type]


def test_old_phy2log_shape_checked() -> None:
    with pytest.raises(PolicyError, match=r"\(2, 8\)"):
        get_policy("default").rebalance(torch.ones(2, 12), 16, 4, 2, 8, old_phy2log=torch.zeros(2, 8, dtype=torch.int64))


def test_old_phy2log_relabels_ranks_and_keeps_slots() -> None:
    w = torch.tensor(GOLDEN_WEIGHT)
    old = initial_placement(2, 12, 16, 8)
    plain = get_policy("default").rebalance(w, 16, 4, 2, 8)
    kept = get_policy("default").rebalance(w, 16, 4, 2, 8, old_phy2log=old)
    # Same per-rank sets (relabelled whole nodes / ranks within a node), never more moves.
    sets = lambda p: sorted(map(tuple, p.reshape(2, 8, 2).sort(-1).values.reshape(16, 2).tolist()))  # noqa: E731
    assert sets(plain) == sets(kept)
    assert bool((moved_slots(old, kept, 8) <= moved_slots(old, plain, 8)).all())
    assert int((kept == old).sum()) >= int((plain == old).sum())


# --- registry -----------------------------------------------------------------------


def test_registry() -> None:
    assert "default" in available_policies()
    with pytest.raises(PolicyError) as info:
        get_policy("nope")
    assert "'nope'" in str(info.value) and "default" in str(info.value)
    with pytest.raises(PolicyError, match="int"):
        register_policy("bad", int)  # type: ignore[arg-type]
    with pytest.raises(PolicyError, match="''"):
        register_policy("", registry_mod.DefaultPolicy)


def test_register_custom_policy() -> None:
    class Identity(Policy):
        def rebalance(self, weight, num_replicas, num_groups, num_nodes, num_gpus, old_phy2log=None,  # noqa: ANN001
                      move_budget=None):
            return initial_placement(weight.shape[0], weight.shape[1], num_replicas, num_gpus)

    register_policy("identity-test", Identity)
    try:
        assert "identity-test" in available_policies()
        out = get_policy("identity-test").rebalance(torch.ones(2, 4), 8, 1, 1, 2)
        assert derive_log2phy(out, 4)[1].tolist() == [[2, 2, 2, 2]] * 2
    finally:
        registry_mod._POLICIES.pop("identity-test")
