"""Balancedness: how evenly a placement spreads load over ranks.

Balancedness of a layer = mean rank load / max rank load (1.0 is perfect; a layer
with no load counts as 1.0, since nothing is imbalanced). *Observed* balancedness
uses recorded per-slot loads; *predicted* balancedness of a candidate placement
spreads each logical expert's load evenly over its replicas, which is what the
engine's routing does on average. All functions are vectorised over layers and
return float64 tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from eplbd.errors import PlacementError, PolicyError
from eplbd.policy.placement import _check_ids, _int_array


def _float_array(x: torch.Tensor | np.ndarray, ndim: int, what: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        if x.dtype == torch.bool or x.is_complex():
            raise PolicyError(f"{what} must have an integer or float dtype, got {x.dtype}")
        arr = x.detach().to(device="cpu", dtype=torch.float64).numpy()
    elif isinstance(x, np.ndarray):
        if x.dtype.kind not in "iuf":
            raise PolicyError(f"{what} must have an integer or float dtype, got {x.dtype}")
        arr = x.astype(np.float64, copy=False)
    else:
        raise PolicyError(f"{what} must be a torch.Tensor or numpy array, got {type(x).__name__}")
    if arr.ndim != ndim:
        raise PolicyError(f"{what} must have {ndim} dimensions, got shape {tuple(arr.shape)}")
    return arr


def _rank_loads(phy: np.ndarray, num_ranks: int) -> np.ndarray:
    if isinstance(num_ranks, bool) or not isinstance(num_ranks, (int, np.integer)) or num_ranks < 1:
        raise PolicyError(f"num_ranks must be a positive integer, got {num_ranks!r}")
    layers, num_physical = phy.shape
    if num_physical % num_ranks:
        raise PolicyError(f"{num_physical} slots are not a multiple of num_ranks={num_ranks}")
    return phy.reshape(layers, num_ranks, num_physical // num_ranks).sum(axis=-1)


def _balancedness(rank_load: np.ndarray) -> np.ndarray:
    peak = rank_load.max(axis=1) if rank_load.shape[1] else np.zeros(rank_load.shape[0])
    mean = rank_load.mean(axis=1) if rank_load.shape[1] else np.zeros(rank_load.shape[0])
    out = np.ones(rank_load.shape[0], dtype=np.float64)
    np.divide(mean, peak, out=out, where=peak > 0)
    return out


def rank_loads(phy_load: torch.Tensor | np.ndarray, num_ranks: int) -> torch.Tensor:
    """Sum slot loads per rank.

    Args:
        phy_load: [layers, num_physical] load per slot, any int or float dtype.
        num_ranks: EP ranks; ``num_physical % num_ranks == 0``.

    Returns:
        [layers, num_ranks] float64.
    """
    return torch.from_numpy(_rank_loads(_float_array(phy_load, 2, "phy_load"), num_ranks))


def layer_balancedness(rank_load: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Mean over max rank load per layer (1.0 for a layer with zero load).

    Args:
        rank_load: [layers, num_ranks] load per rank.

    Returns:
        [layers] float64 in [0, 1].
    """
    return torch.from_numpy(_balancedness(_float_array(rank_load, 2, "rank_load")))


def spread_logical_load(
    logical_load: torch.Tensor | np.ndarray, phy2log: torch.Tensor | np.ndarray
) -> torch.Tensor:
    """Split each logical expert's load evenly over its replicas.

    Args:
        logical_load: [layers, num_logical] load per logical expert.
        phy2log: [layers, num_physical] integer placement.

    Returns:
        [layers, num_physical] float64 load per slot. An expert without a replica
        contributes nothing.
    """
    load = _float_array(logical_load, 2, "logical_load")
    placement = _int_array(phy2log)
    if placement.shape[0] != load.shape[0]:
        raise PlacementError(f"phy2log has {placement.shape[0]} layers, logical_load has {load.shape[0]}")
    num_layers, num_logical = load.shape
    _check_ids(placement, num_logical)
    layer_off = np.arange(num_layers, dtype=np.int64)[:, None] * num_logical
    flat = (placement + layer_off).ravel()
    logcnt = np.bincount(flat, minlength=num_layers * num_logical).reshape(num_layers, num_logical)
    per_replica = np.zeros_like(load)
    np.divide(load, logcnt, out=per_replica, where=logcnt > 0)
    return torch.from_numpy(np.take_along_axis(per_replica, placement, axis=1))


def observed_balancedness(phy_load: torch.Tensor | np.ndarray, num_ranks: int) -> torch.Tensor:
    """Balancedness per layer from recorded slot loads.

    Args:
        phy_load: [layers, num_physical] load per slot.
        num_ranks: EP ranks.

    Returns:
        [layers] float64.
    """
    return torch.from_numpy(_balancedness(_rank_loads(_float_array(phy_load, 2, "phy_load"), num_ranks)))


def predicted_balancedness(
    logical_load: torch.Tensor | np.ndarray, phy2log: torch.Tensor | np.ndarray, num_ranks: int
) -> torch.Tensor:
    """Balancedness per layer a placement would give for a logical load.

    Args:
        logical_load: [layers, num_logical] load per logical expert.
        phy2log: [layers, num_physical] integer candidate placement.
        num_ranks: EP ranks.

    Returns:
        [layers] float64.
    """
    spread = spread_logical_load(logical_load, phy2log).numpy()
    return torch.from_numpy(_balancedness(_rank_loads(spread, num_ranks)))


@dataclass(frozen=True)
class BalanceSummary:
    """Balancedness over layers.

    ``aggregate`` is vLLM's figure: sum over layers of mean rank load divided by sum
    over layers of max rank load, so heavy layers weigh more. With no layers every
    field is 1.0 (nothing is imbalanced), as is ``aggregate`` when no rank has load.
    """

    min: float
    p50: float
    p90: float
    mean: float
    aggregate: float
    num_layers: int


def summarize(per_layer: torch.Tensor | np.ndarray, rank_load: torch.Tensor | np.ndarray) -> BalanceSummary:
    """Summarise per-layer balancedness.

    Args:
        per_layer: [layers] balancedness per layer (e.g. from :func:`layer_balancedness`).
        rank_load: [layers, num_ranks] load per rank, for the aggregate.

    Returns:
        A :class:`BalanceSummary`.
    """
    values = _float_array(per_layer, 1, "per_layer")
    loads = _float_array(rank_load, 2, "rank_load")
    if loads.shape[0] != values.shape[0]:
        raise PolicyError(f"per_layer has {values.shape[0]} layers, rank_load has {loads.shape[0]}")
    if values.size == 0:
        return BalanceSummary(1.0, 1.0, 1.0, 1.0, 1.0, 0)
    peak = float(loads.max(axis=1).sum()) if loads.shape[1] else 0.0
    mean = float(loads.mean(axis=1).sum()) if loads.shape[1] else 0.0
    return BalanceSummary(
        min=float(values.min()),
        p50=float(np.percentile(values, 50)),
        p90=float(np.percentile(values, 90)),
        mean=float(values.mean()),
        aggregate=mean / peak if peak > 0 else 1.0,
        num_layers=int(values.size),
    )
