"""Policies by name.

A policy is a class with one method, :meth:`Policy.rebalance`. ``default`` is
registered here; others (e.g. a movement-aware ``incremental`` policy) register
themselves through :func:`register_policy` from their own module.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import torch

from eplbd.errors import PolicyError
from eplbd.policy.default import rebalance_experts
from eplbd.policy.matching import apply_rank_order, keep_slots, stable_rank_order
from eplbd.policy.placement import _int_array


class Policy(ABC):
    """Turns a load window into a placement."""

    name: str = ""

    @abstractmethod
    def rebalance(
        self,
        weight: torch.Tensor | np.ndarray,
        num_replicas: int,
        num_groups: int,
        num_nodes: int,
        num_gpus: int,
        old_phy2log: torch.Tensor | None = None,
        move_budget: int | None = None,
    ) -> torch.Tensor:
        """Compute a new placement.

        Args:
            weight: [layers, num_logical] load per logical expert (int or float, >= 0).
            num_replicas: physical experts (slots) per layer, a multiple of ``num_gpus``.
            num_groups: expert groups; ``num_logical % num_groups == 0``.
            num_nodes: server nodes; ``num_gpus % num_nodes == 0``.
            num_gpus: EP ranks.
            old_phy2log: [layers, num_replicas] int64, the placement in force, or None.
            move_budget: at most this many slots (over all layers) may receive an expert
                from another rank; None: the policy's own default. Policies that do
                not plan around movement ignore it.

        Returns:
            phy2log: [layers, num_replicas] int64, every logical expert at least once,
                ``num_replicas / num_gpus`` slots per rank.

        Raises:
            PolicyError: arguments the policy cannot work with.
        """


class DefaultPolicy(Policy):
    """DeepSeek EPLB as vLLM's default policy runs it, with stable rank labels.

    Given ``old_phy2log``, the plan's per-rank expert sets are first given to the old
    ranks that already hold most of them (an exact assignment per layer; in the
    hierarchical case whole nodes are relabelled as units and ranks only within a
    node), then each rank's slots are reordered so experts it keeps stay in their
    old slots. Balance is unchanged; every move that only re-labelled ranks is gone.
    ``move_budget`` is ignored.
    """

    name = "default"

    def rebalance(
        self,
        weight: torch.Tensor | np.ndarray,
        num_replicas: int,
        num_groups: int,
        num_nodes: int,
        num_gpus: int,
        old_phy2log: torch.Tensor | None = None,
        move_budget: int | None = None,
    ) -> torch.Tensor:
        phy2log, _, _ = rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_gpus)
        if old_phy2log is None:
            return phy2log
        if tuple(old_phy2log.shape) != tuple(phy2log.shape):
            raise PolicyError(
                f"old_phy2log shape {tuple(old_phy2log.shape)} does not match [layers, num_replicas]"
                f" = {tuple(phy2log.shape)}"
            )
        return stable_relabel(phy2log, old_phy2log, num_groups, num_nodes, num_gpus)


def stable_relabel(
    phy2log: torch.Tensor, old_phy2log: torch.Tensor | np.ndarray, num_groups: int, num_nodes: int, num_gpus: int
) -> torch.Tensor:
    """Relabel a full re-plan's ranks (nodes as units when hierarchical) to keep what ranks hold.

    Args:
        phy2log: [layers, num_replicas] int64 plan from scratch.
        old_phy2log: [layers, num_replicas] integer placement in force.
        num_groups, num_nodes, num_gpus: the topology the plan was made for.

    Returns:
        [layers, num_replicas] int64 with the same per-rank sets, relabelled, kept experts in their old slots.
    """
    new = phy2log.numpy().astype(np.int64, copy=False)
    old = _int_array(old_phy2log, "old_phy2log")
    num_logical = int(max(new.max(initial=-1), old.max(initial=-1))) + 1
    hierarchical = num_nodes > 1 and num_groups % num_nodes == 0
    order = stable_rank_order(new, old, num_gpus, num_nodes, num_logical, hierarchical)
    return torch.from_numpy(keep_slots(apply_rank_order(new, order, num_gpus), old, num_gpus))


_POLICIES: dict[str, type[Policy]] = {}


def register_policy(name: str, cls: type[Policy]) -> None:
    """Make ``cls`` available as ``name``; re-registering a name replaces it."""
    if not isinstance(name, str) or not name:
        raise PolicyError(f"policy name must be a non-empty string, got {name!r}")
    if not (isinstance(cls, type) and issubclass(cls, Policy)):
        raise PolicyError(f"policy {name!r} must be a Policy subclass, got {cls!r}")
    _POLICIES[name] = cls


def available_policies() -> list[str]:
    """Registered policy names, sorted."""
    return sorted(_POLICIES)


def get_policy(name: str) -> Policy:
    """A new instance of the policy registered as ``name``."""
    try:
        cls = _POLICIES[name]
    except (KeyError, TypeError):
        raise PolicyError(
            f"unknown policy {name!r}; available: {', '.join(available_policies())}"
        ) from None
    return cls()


register_policy("default", DefaultPolicy)
