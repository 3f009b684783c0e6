"""Placement helpers: log2phy, initial layouts, validation, movement, slot preservation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from eplbd.errors import PlacementError
from eplbd.policy import (
    STRATEGIES,
    derive_log2phy,
    initial_placement,
    moved_slots,
    preserve_local_slots,
    validate_placement,
)

FAST = settings(max_examples=50, deadline=None)


def test_derive_log2phy_by_hand() -> None:
    phy2log = torch.tensor([[2, 0, 2, 1, 0, 2], [0, 1, 2, 0, 1, 2]])
    log2phy, logcnt = derive_log2phy(phy2log, 3)
    assert logcnt.tolist() == [[2, 1, 3], [2, 2, 2]]
    assert log2phy.tolist() == [
        [[1, 4, -1], [3, -1, -1], [0, 2, 5]],
        [[0, 3, -1], [1, 4, -1], [2, 5, -1]],
    ]
    assert log2phy.dtype == logcnt.dtype == torch.int64


def test_derive_log2phy_missing_expert_and_numpy() -> None:
    log2phy, logcnt = derive_log2phy(np.array([[0, 0]], dtype=np.int32), 2)
    assert logcnt.tolist() == [[2, 0]] and log2phy.tolist() == [[[0, 1], [-1, -1]]]


def test_derive_log2phy_rejects_bad_ids() -> None:
    with pytest.raises(PlacementError, match=r"logical id 7 at \[layer 1, slot 2\]"):
        derive_log2phy(torch.tensor([[0, 1, 2], [0, 1, 7]]), 3)
    with pytest.raises(PlacementError, match="-1"):
        derive_log2phy(torch.tensor([[0, -1]]), 2)


@pytest.mark.parametrize("strategy", STRATEGIES)
@FAST
@given(ranks=st.integers(1, 8), num_logical=st.integers(1, 40), extra=st.integers(0, 3), layers=st.integers(0, 3))
def test_initial_placements_valid(strategy: str, ranks: int, num_logical: int, extra: int, layers: int) -> None:
    num_physical = ranks * (-(-num_logical // ranks) + extra)
    phy2log = initial_placement(layers, num_logical, num_physical, ranks, strategy)  # type: ignore[arg-type]
    assert phy2log.dtype == torch.int64 and phy2log.shape == (layers, num_physical)
    validate_placement(phy2log, num_logical, ranks, num_layers=layers)
    if layers == 0:
        return
    row = phy2log[0].tolist()
    local = num_physical // ranks
    counts = np.bincount(row, minlength=num_logical)
    expected = np.bincount(np.arange(num_physical - num_logical) % num_logical, minlength=num_logical) + 1
    assert counts.tolist() == expected.tolist()  # the copies are of experts 0, 1, 2, ...
    if strategy == "linear":
        assert row[:num_logical] == list(range(num_logical))
    else:
        for e in range(num_logical):
            rank = e % ranks
            assert e in row[rank * local : (rank + 1) * local]


def test_initial_layouts_by_hand() -> None:
    assert initial_placement(1, 8, 12, 4).tolist() == [[0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3]]
    # Originals round robin, then each copy on the next rank after its original's.
    assert initial_placement(1, 8, 12, 4, "round_robin").tolist() == [[0, 4, 3, 1, 5, 0, 2, 6, 1, 3, 7, 2]]
    assert initial_placement(2, 10, 12, 4, "round_robin").tolist() == [[0, 4, 8, 1, 5, 9, 2, 6, 0, 3, 7, 1]] * 2


def test_round_robin_copies_avoid_their_originals_rank() -> None:
    phy2log = initial_placement(1, 256, 288, 32, "round_robin")[0].reshape(32, 9)
    for rank in range(32):
        held = phy2log[rank].tolist()
        assert len(set(held)) == 9


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        ((1, 8, 6, 2), "num_physical=6"),
        ((1, 8, 10, 4), "num_ranks=4"),
        ((1, 0, 8, 4), "num_logical"),
        ((-1, 8, 8, 4), "-1"),
        ((1, 8, 8, 0), "num_ranks"),
    ],
)
def test_initial_placement_bad_args(args: tuple[int, ...], needle: str) -> None:
    with pytest.raises(PlacementError) as info:
        initial_placement(*args)
    assert needle in str(info.value)


def test_initial_placement_unknown_strategy() -> None:
    with pytest.raises(PlacementError, match="'zigzag'"):
        initial_placement(1, 8, 8, 2, "zigzag")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("phy2log", "kwargs", "needle"),
    [
        (torch.tensor([[0, 1, 2, 9]]), {}, "logical id 9 at [layer 0, slot 3]"),
        (torch.tensor([[0, 1, 2, 0], [0, 1, 1, 0]]), {}, "layer 1 of phy2log has no slot for logical expert(s) 2"),
        (torch.tensor([[0, 1, 2]]), {}, "3 slots, not a multiple of num_ranks=2"),
        (torch.tensor([[0.0, 1.0, 2.0, 0.0]]), {}, "torch.float32"),
        (torch.tensor([0, 1, 2, 0]), {}, "shape (4,)"),
        (torch.tensor([[0, 1, 2, 0]]), {"num_layers": 2}, "1 layers, expected 2"),
        (np.array([[True, False]]), {}, "bool"),
        ([[0, 1, 2, 0]], {}, "list"),
    ],
)
def test_validate_placement_errors(phy2log: object, kwargs: dict, needle: str) -> None:
    with pytest.raises(PlacementError) as info:
        validate_placement(phy2log, 3, 2, **kwargs)  # type: ignore[arg-type]
    assert needle in str(info.value)


def test_validate_placement_too_few_slots() -> None:
    with pytest.raises(PlacementError, match="fewer than num_logical=6"):
        validate_placement(torch.tensor([[0, 1, 2, 3]]), 6, 2)


def test_moved_slots_by_hand() -> None:
    old = torch.tensor([[0, 1, 2, 3], [0, 1, 2, 3]])
    # Layer 0: swap inside rank 0 (free), rank 1 takes expert 0 (held only on rank 0).
    # Layer 1: everything swaps rank.
    new = torch.tensor([[1, 0, 2, 0], [2, 3, 0, 1]])
    assert moved_slots(old, new, 2).tolist() == [1, 4]
    assert moved_slots(old, old, 2).tolist() == [0, 0]
    assert moved_slots(old, new, 2).dtype == torch.int64


def test_moved_slots_errors() -> None:
    with pytest.raises(PlacementError, match=r"\(1, 4\).*\(1, 2\)"):
        moved_slots(torch.zeros(1, 4, dtype=torch.int64), torch.zeros(1, 2, dtype=torch.int64), 2)
    with pytest.raises(PlacementError, match="num_ranks=3"):
        moved_slots(torch.zeros(1, 4, dtype=torch.int64), torch.zeros(1, 4, dtype=torch.int64), 3)


@FAST
@given(seed=st.integers(0, 2**32 - 1), ranks=st.integers(1, 4), local=st.integers(1, 5), layers=st.integers(1, 3))
def test_preserve_local_slots(seed: int, ranks: int, local: int, layers: int) -> None:
    rng = np.random.default_rng(seed)
    num_logical = max(1, ranks * local // 2)
    old = torch.from_numpy(rng.integers(0, num_logical, size=(layers, ranks * local)))
    new = torch.from_numpy(rng.integers(0, num_logical, size=(layers, ranks * local)))
    out = preserve_local_slots(new, old, ranks)
    shape = (layers, ranks, local)
    assert torch.equal(out.reshape(shape).sort(-1).values, new.reshape(shape).sort(-1).values)
    for layer in range(layers):
        for r in range(ranks):
            lo, hi = r * local, (r + 1) * local
            remaining = new[layer, lo:hi].tolist()
            for s in range(lo, hi):  # every old expert still on the rank keeps its slot
                e = int(old[layer, s])
                if e in remaining:
                    assert int(out[layer, s]) == e
                    remaining.remove(e)
