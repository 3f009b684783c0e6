"""Elastic EP, the pure parts: rank mappings, the resized placement, the transition schedule, the window."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from test_schedule import simulate

from eplbd.client.schedule import layer_schedule
from eplbd.policy.elastic import (EMPTY, elastic_placement, parse_mapping, reload_slots, transition_rows)
from eplbd.errors import InvalidArgumentError, PlacementError
from eplbd.policy import validate_placement
from eplbd.daemon.window import LoadWindow

# 4 ranks x 3 slots, 8 experts. Rank 3 holds the only copy of 7 in layer 0 and of 0 and 1 in layer 1.
OLD = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 0, 1, 7, 2, 3],
                    [2, 3, 4, 5, 6, 7, 2, 3, 4, 0, 1, 5]])
E, NL = 8, 3


# -- mappings -------------------------------------------------------------------------------------
def test_mapping_shrink_grow_and_renumber():
    m = parse_mapping([0, 1, 2, -1], 4)
    assert (m.new_ep_size, m.survivors, m.removed, m.joining) == (3, {0: 0, 1: 1, 2: 2}, [3], [])
    assert m.describe() == "4 -> 3 ranks (removed [3])"
    g = parse_mapping([0, 1, 2], 3, 4)
    assert (g.joining, g.old_rank) == ([3], [0, 1, 2, -1])
    r = parse_mapping([1, -1, 0], 3, 3)
    assert r.describe() == "3 -> 3 ranks (removed [1], joining [2], renumbered {0: 1, 2: 0})"


@pytest.mark.parametrize("mapping, old, new, match", [
    ([0, 1, 2], 4, None, r"3 entries but the group has ep_size=4"),
    ([0, 1, -2, 2], 4, None, r"mapping\[2\] = -2 is neither"),
    ([0, 1, 1.5, 2], 4, None, r"mapping\[2\] = 1.5"),
    ([0, 2, 2, -1], 4, None, r"mapping\[1\] and mapping\[2\] both name new rank 2"),
    ([0, 2, -1, -1], 4, None, r"\[0, 2\], not onto 0..1"),
    ([0, 1, 4, -1], 4, 4, r"mapping\[2\] = 4 is outside the new group's ranks 0..3"),
    ([-1, -1], 2, 2, "removes every rank"),
    ([0, 1, 2], 3, None, "changes nothing"),
    ([0, 1], 2, -3, "new ep_size must be a positive integer, got -3"),
])
def test_bad_mappings_are_refused_naming_the_value(mapping, old, new, match):
    with pytest.raises(InvalidArgumentError, match=match):
        parse_mapping(mapping, old, new)


# -- the resized placement --------------------------------------------------------------------------
def test_shrink_reloads_orphans_into_the_cheapest_redundant_slots():
    weight = torch.ones(2, E) * 10
    weight[1, 3] = 1  # layer 1: expert 3's replicas carry the least load
    weight[1, 2] = 4
    p = elastic_placement(OLD, parse_mapping([0, 1, 2, -1], 4), NL, E, weight)
    assert p.orphans == [[7], [0, 1]]
    assert p.base.tolist() == OLD[:, :9].tolist()
    validate_placement(p.phy2log, E, 3, 2)
    # layer 0: 7 replaces a replica of 0 or 1 (equal load per replica: the later slot)
    assert p.phy2log[0].tolist() == [0, 1, 2, 3, 4, 5, 6, 0, 7]
    # layer 1: 0 and 1 evict a replica of 3 and then of 2, the lowest loads per replica
    changed = {s: (int(p.base[1, s]), int(p.phy2log[1, s])) for s in range(9) if p.base[1, s] != p.phy2log[1, s]}
    assert sorted(changed.values()) == [(2, 1), (3, 0)]
    assert p.num_reloads == 3 and p.moved_slots() == 0  # a shrink reloads, it sends nothing


def test_grow_fills_joining_slots_with_the_hottest_experts():
    base = elastic_placement(OLD, parse_mapping([0, 1, 2, -1], 4), NL, E).phy2log
    weight = torch.zeros(2, E)
    weight[:, 5], weight[:, 6], weight[:, 2] = 100, 60, 50
    p = elastic_placement(base, parse_mapping([0, 1, 2], 3, 4), NL, E, weight)
    assert p.orphans == [[], []]
    assert p.phy2log[:, :9].tolist() == base.tolist()  # survivors keep every slot
    # highest load per replica first, an expert the rank lacks: 5 (100), 6 (60), then 2 (layer 0: 50 on its
    # one replica, layer 1: 25 on each of two; 5 at 50 per replica is on the rank already)
    assert p.phy2log[:, 9:].tolist() == [[5, 6, 2]] * 2
    assert p.moved_slots() == 6 and p.num_reloads == 0


def test_orphans_go_to_joining_ranks_before_evicting():
    # Rank 3 leaves and a new rank takes its place: the orphans land on the joining rank.
    p = elastic_placement(OLD, parse_mapping([0, 1, 2, -1], 4, 4), NL, E)
    assert p.orphans == [[7], [0, 1]]
    assert p.phy2log[:, :9].tolist() == OLD[:, :9].tolist()
    assert p.phy2log.tolist() == OLD.tolist()  # uniform load: the hot fill restores the old replicas too
    assert reload_slots(p.base, p.phy2log, p.orphans, 3, NL) == [(0, 0, 7), (1, 0, 0), (1, 1, 1)]
    assert all(reload_slots(p.base, p.phy2log, p.orphans, r, NL) == [] for r in range(3))


def test_too_few_slots_and_bad_inputs_are_refused():
    with pytest.raises(PlacementError, match=r"2 ranks x 3 slots = 6 slots per layer cannot hold 8 logical experts"):
        elastic_placement(OLD, parse_mapping([0, 1, -1, -1], 4), NL, E)
    with pytest.raises(InvalidArgumentError, match=r"weight has shape \[2, 7\]"):
        elastic_placement(OLD, parse_mapping([0, 1, 2, -1], 4), NL, E, torch.ones(2, 7))
    with pytest.raises(PlacementError, match="expected ep_size 4 x num_local 2"):
        elastic_placement(OLD, parse_mapping([0, 1, 2, -1], 4), 2, E)


@st.composite
def resizes(draw):
    old_ep = draw(st.integers(1, 5))
    nl = draw(st.integers(1, 4))
    experts = draw(st.integers(1, old_ep * nl))
    layers = draw(st.integers(1, 3))
    rows = [draw(st.permutations(list(range(experts)) + [draw(st.integers(0, experts - 1))
                                                         for _ in range(old_ep * nl - experts)]))
            for _ in range(layers)]
    kept = draw(st.lists(st.booleans(), min_size=old_ep, max_size=old_ep).filter(any))
    extra = draw(st.integers(0, 3))
    new_ep = sum(kept) + extra
    new_ranks = draw(st.permutations(list(range(new_ep))))
    it = iter(new_ranks)
    mapping = [next(it) if k else -1 for k in kept]
    weight = draw(st.lists(st.integers(0, 50), min_size=layers * experts, max_size=layers * experts))
    return torch.tensor(rows), mapping, new_ep, nl, experts, torch.tensor(weight).view(layers, experts)


@settings(max_examples=200, deadline=None)
@given(resizes())
def test_resized_placement_invariants(case):
    old, mapping, new_ep, nl, experts, weight = case
    if new_ep * nl < experts or (new_ep == old.shape[1] // nl and mapping == list(range(new_ep))):
        return  # refused (tested above)
    m = parse_mapping(mapping, old.shape[1] // nl, new_ep)
    p = elastic_placement(old, m, nl, experts, weight)
    validate_placement(p.phy2log, experts, new_ep, old.shape[0])  # every expert kept, equal slots per rank
    assert (p.phy2log >= 0).all()
    for layer in range(old.shape[0]):
        surviving = {int(e) for e in p.base[layer] if e != EMPTY}
        assert p.orphans[layer] == sorted(set(range(experts)) - surviving)
        for s in range(p.phy2log.shape[1]):
            b, n = int(p.base[layer, s]), int(p.phy2log[layer, s])
            # a surviving slot changes only to take an orphan, and only if its expert keeps a replica
            assert b in (EMPTY, n) or (n in p.orphans[layer] and b in p.phy2log[layer].tolist())
        # reloads, then the ordinary schedule, reach the new placement, on every rank
        held = transition_rows(p.base, p.phy2log, p.orphans)[layer].tolist()
        assert sorted(e for r in range(new_ep) for lay, _, e in reload_slots(p.base, p.phy2log, p.orphans, r, nl)
                      if lay == layer) == p.orphans[layer]
        new = p.phy2log[layer].tolist()
        sched = layer_schedule(layer, torch.tensor(held), p.phy2log[layer], new_ep)
        assert simulate(held, new, new_ep, sched) == new
        assert all(held[t.src_rank * nl + t.src_local] != EMPTY for t in sched.transfers)


# -- the window keeps its logical history across a resize ----------------------------------------------
def test_window_reshape_keeps_the_logical_view():
    win = LoadWindow(8, 2, E, 12)
    load = torch.randint(0, 9, (3, 2, 12), dtype=torch.int64)
    win.add(0, load, OLD, epoch=0)
    before = win.logical_load()
    win.reshape_physical(9, epoch=1)
    assert np.array_equal(win.logical_load(), before) and win.snapshot().physical.shape == (2, 9)
    assert win.snapshot().physical_steps == 0
    new = OLD[:, :9].clone()
    new[0, 8], new[1, 6], new[1, 7] = 7, 0, 1
    win.add(3, torch.ones(1, 2, 9, dtype=torch.int64), new, epoch=1)
    assert win.logical_load().sum() == before.sum() + 18 and win.snapshot().physical.sum() == 18
    with pytest.raises(InvalidArgumentError, match="bad_shape|is not"):
        win.add(4, load[:1], OLD, epoch=0)


# -- the reference model's side of a rebuild ------------------------------------------------------------
def test_refmodel_adopts_slot_tensors_and_reloads_experts_through_its_hook():
    from eplbd.refengine.model import (RefMoEConfig, RefMoEModel, local_expert_weights, make_inputs, reference_forward,
                                unfilled_expert_weights)

    cfg = RefMoEConfig(num_layers=2, hidden=16, ffn=32, num_logical=E, top_k=2, num_redundant=4, ep_size=1)
    phy2log = torch.cat([OLD[:, :6], OLD[:, 9:], OLD[:, 6:9]], dim=1)  # any valid placement of 12 slots
    model = RefMoEModel(cfg, 0, None, phy2log, expert_weights=unfilled_expert_weights(cfg))
    assert all(t.isnan().all() for layer in model.expert_weights for t in layer)
    for layer in range(2):
        for slot in range(12):
            model.load_expert_weights_(layer, slot, int(phy2log[layer, slot]))
    want = local_expert_weights(cfg, phy2log, 0)
    assert all(torch.equal(a, b) for la, lb in zip(model.expert_weights, want) for a, b in zip(la, lb))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x = make_inputs(cfg, 0, 0, 10)
        assert torch.equal(model.forward(x), reference_forward(cfg, x))
    finally:
        torch.set_num_threads(threads)
    with pytest.raises(InvalidArgumentError, match=r"slot=12.*slot < 12"):
        model.load_expert_weights_(0, 12, 0)
    with pytest.raises(InvalidArgumentError, match=r"expert_weights\[0\] are \[\[12, 64, 16\], \[12, 16, 32\]\]"):
        RefMoEModel(cfg, 0, None, phy2log, expert_weights=[w[:2] for w in unfilled_expert_weights(cfg)])
