"""Balancedness figures against hand computations."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from eplbd.errors import PlacementError, PolicyError
from eplbd.policy import (
    BalanceSummary,
    layer_balancedness,
    observed_balancedness,
    predicted_balancedness,
    rank_loads,
    spread_logical_load,
    summarize,
)

PHY_LOAD = torch.tensor([[1, 3, 2, 2], [0, 0, 0, 0], [4, 0, 0, 0]])  # 2 ranks x 2 slots


def test_rank_loads_and_balancedness_by_hand() -> None:
    loads = rank_loads(PHY_LOAD, 2)
    assert loads.dtype == torch.float64
    assert loads.tolist() == [[4.0, 4.0], [0.0, 0.0], [4.0, 0.0]]
    # mean/max: 4/4, zero load counts as perfect, 2/4.
    assert layer_balancedness(loads).tolist() == [1.0, 1.0, 0.5]
    assert observed_balancedness(PHY_LOAD, 2).tolist() == [1.0, 1.0, 0.5]
    assert observed_balancedness(PHY_LOAD, 4).tolist() == [2 / 3, 1.0, 0.25]  # mean 2 / max 3


def test_spread_and_predicted_by_hand() -> None:
    logical = torch.tensor([[6.0, 2.0, 1.0]])
    phy2log = torch.tensor([[0, 1, 0, 2]])  # expert 0 twice
    spread = spread_logical_load(logical, phy2log)
    assert spread.dtype == torch.float64 and spread.tolist() == [[3.0, 2.0, 3.0, 1.0]]
    # ranks: [5, 4] -> 4.5 / 5
    assert predicted_balancedness(logical, phy2log, 2).tolist() == [0.9]
    # one expert missing from the placement contributes nothing
    assert spread_logical_load(logical, torch.tensor([[0, 0, 1, 1]])).tolist() == [[3.0, 3.0, 1.0, 1.0]]


def test_summarize_by_hand() -> None:
    loads = rank_loads(PHY_LOAD, 2)
    summary = summarize(layer_balancedness(loads), loads)
    assert summary.min == 0.5 and summary.p50 == 1.0 and summary.num_layers == 3
    assert summary.mean == pytest.approx(2.5 / 3)
    assert summary.p90 == 1.0
    # sum of means (4 + 0 + 2) over sum of maxes (4 + 0 + 4)
    assert summary.aggregate == pytest.approx(0.75)
    with pytest.raises(dataclasses.FrozenInstanceError):
        summary.min = 0.0  # type: ignore[misc]


def test_summarize_empty_and_zero() -> None:
    empty = summarize(torch.zeros(0, dtype=torch.float64), torch.zeros(0, 4))
    assert empty == BalanceSummary(1.0, 1.0, 1.0, 1.0, 1.0, 0)
    zero = summarize(np.ones(2), np.zeros((2, 4)))
    assert zero.aggregate == 1.0 and zero.min == 1.0


def test_vectorised_matches_loops() -> None:
    rng = np.random.default_rng(3)
    load = rng.integers(0, 100, size=(5, 24))
    got = observed_balancedness(load, 6).numpy()
    for layer in range(5):
        ranks = [load[layer, r * 4 : (r + 1) * 4].sum() for r in range(6)]
        assert got[layer] == pytest.approx(np.mean(ranks) / max(ranks))


def test_errors_quote_values() -> None:
    with pytest.raises(PolicyError, match="num_ranks=3"):
        rank_loads(PHY_LOAD, 3)
    with pytest.raises(PolicyError, match="shape \\(4,\\)"):
        layer_balancedness(torch.ones(4))
    with pytest.raises(PolicyError, match="3 layers, rank_load has 2"):
        summarize(torch.ones(3), torch.ones(2, 2))
    with pytest.raises(PlacementError, match="logical id 5"):
        spread_logical_load(torch.ones(1, 3), torch.tensor([[0, 1, 2, 5]]))
    with pytest.raises(PlacementError, match="2 layers, logical_load has 1"):
        spread_logical_load(torch.ones(1, 3), torch.zeros(2, 3, dtype=torch.int64))
