"""Rebalancing policies, placements and balancedness.

Pure functions over tensors: no sockets, no state. See ``registry`` for policies by
name, ``default`` for the DeepSeek/vLLM algorithm, ``incremental`` for the
movement-aware policy, ``matching`` for stable rank labels, ``placement`` for placement
helpers and ``balance`` for balancedness figures.
"""

from eplbd.policy.balance import (
    BalanceSummary,
    layer_balancedness,
    observed_balancedness,
    predicted_balancedness,
    rank_loads,
    spread_logical_load,
    summarize,
)
from eplbd.policy.default import rebalance_experts
from eplbd.policy.placement import (
    STRATEGIES,
    derive_log2phy,
    initial_placement,
    moved_slots,
    preserve_local_slots,
    validate_placement,
)
from eplbd.policy.registry import (
    DefaultPolicy,
    Policy,
    available_policies,
    get_policy,
    register_policy,
    stable_relabel,
)
from eplbd.policy.incremental import IncrementalPlan, IncrementalPolicy, plan_incremental  # registers "incremental"

__all__ = [
    "STRATEGIES",
    "BalanceSummary",
    "DefaultPolicy",
    "IncrementalPlan",
    "IncrementalPolicy",
    "Policy",
    "available_policies",
    "derive_log2phy",
    "get_policy",
    "initial_placement",
    "layer_balancedness",
    "moved_slots",
    "plan_incremental",
    "observed_balancedness",
    "predicted_balancedness",
    "preserve_local_slots",
    "rank_loads",
    "rebalance_experts",
    "register_policy",
    "spread_logical_load",
    "stable_relabel",
    "summarize",
    "validate_placement",
]
