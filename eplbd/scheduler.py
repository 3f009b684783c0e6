"""When to re-plan, and whether a candidate plan is worth pushing.

Both functions are pure: the daemon's tick loop and ``eplbd replay`` call them
with the state they hold, and tests call them with hand-made states and times.

- ``decide(now, state, config) -> Decision``: wait, plan, or abort the plan in flight.
- ``propose(...) -> Proposal``: run the policy on the window, predict the new
  balancedness, count moved slots, and accept or skip with a reason.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal, Sequence

import numpy as np
import torch

from eplbd.config import EplbConfig
from eplbd.errors import InvalidArgumentError
from eplbd.policy import get_policy, moved_slots, predicted_balancedness


@dataclass(frozen=True)
class Topology:
    """The EP group's shape as the policies need it."""

    num_layers: int
    num_logical: int
    num_physical: int
    num_gpus: int
    num_nodes: int = 1
    num_groups: int = 1

    @property
    def num_local(self) -> int:
        return self.num_physical // self.num_gpus


@dataclass(frozen=True)
class SchedulerState:
    """What ``decide`` looks at.

    Attributes:
        step: newest step seen in the load reports.
        last_plan_step: step at which the schedule last considered a plan (-1: never).
        window_fill: steps currently in the window.
        paused: the operator paused the schedule.
        manual: an operator asked for a rebalance now.
        plan_started_at: wall time the plan in flight was pushed (None: no plan in flight).
    """

    step: int
    last_plan_step: int = -1
    window_fill: int = 0
    paused: bool = False
    manual: bool = False
    plan_started_at: float | None = None


@dataclass(frozen=True)
class Decision:
    action: Literal["wait", "plan", "abort"]
    reason: str
    trigger: Literal["interval", "manual", "timeout", None] = None


def decide(now: float, state: SchedulerState, config: EplbConfig) -> Decision:
    """Decide what the scheduler does at wall time ``now``.

    Order matters: a plan in flight blocks everything (one plan at a time) until
    it finishes or times out; an operator request runs even while paused.
    """
    if state.plan_started_at is not None:
        age = now - state.plan_started_at
        if age > config.plan_timeout_s:
            return Decision("abort", f"plan not fully acked after {age:.1f}s "
                            f"(plan_timeout_s={config.plan_timeout_s:g})", "timeout")
        return Decision("wait", "a plan is in flight")
    if state.manual:
        if state.window_fill == 0:
            return Decision("wait", "manual rebalance requested but the load window is empty")
        return Decision("plan", "operator requested a rebalance", "manual")
    if state.paused:
        return Decision("wait", "schedule paused by operator")
    if state.window_fill == 0:
        return Decision("wait", "load window is empty")
    since = state.step - state.last_plan_step if state.last_plan_step >= 0 else state.step + 1
    if since >= config.step_interval:
        return Decision("plan", f"step_interval={config.step_interval} steps reached at step {state.step}",
                        "interval")
    nxt = (state.last_plan_step if state.last_plan_step >= 0 else -1) + config.step_interval
    return Decision("wait", f"next scheduled re-plan at step {nxt}")


@dataclass
class Proposal:
    """A candidate plan and what it is predicted to buy.

    Attributes:
        phy2log: ``[layers, num_physical]`` int64, the full new placement.
        layers: layers whose placement changes (the plan's layers).
        before, after: ``[layers]`` float64 predicted balancedness on the window.
        moved_slots: ``[layers]`` int64 slots that must receive an expert from another rank.
        accept: whether the plan should be pushed.
        reason: why it was accepted or skipped.
        policy_s: wall time the policy took.
    """

    phy2log: torch.Tensor
    layers: list[int]
    before: np.ndarray
    after: np.ndarray
    moved_slots: np.ndarray
    accept: bool
    reason: str
    policy: str
    policy_s: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def gain(self) -> float:
        return float(self.after.mean() - self.before.mean()) if self.before.size else 0.0


def propose(window_logical: np.ndarray | torch.Tensor, phy2log: torch.Tensor, topo: Topology,
            config: EplbConfig, *, policy: str | None = None,
            layers: Sequence[int] | None = None, force: bool = False) -> Proposal:
    """Run the policy on the window and gate the result.

    Args:
        window_logical: ``[layers, num_logical]`` window load per logical expert.
        phy2log: ``[layers, num_physical]`` int64 current placement.
        topo: the EP group's shape.
        config: supplies the default policy and ``min_gain``.
        policy: policy name overriding ``config.policy``.
        layers: only re-plan these layers (others keep their placement).
        force: accept whatever the gain (an operator's explicit request).

    Returns:
        The Proposal; ``accept`` is False when the gain is below ``config.min_gain``
        or nothing changes.
    """
    name = policy or config.policy
    impl = get_policy(name)
    weight = torch.as_tensor(np.asarray(window_logical))
    old = torch.as_tensor(phy2log, dtype=torch.int64)
    if layers is not None:
        bad = [l for l in layers if not 0 <= l < topo.num_layers]
        if bad:
            raise InvalidArgumentError(f"layers {bad} out of range 0..{topo.num_layers - 1}")
        sel = sorted(set(int(l) for l in layers))
    else:
        sel = list(range(topo.num_layers))
    t0 = time.perf_counter()
    part = impl.rebalance(weight[sel], topo.num_physical, topo.num_groups, topo.num_nodes,
                          topo.num_gpus, old_phy2log=old[sel])
    policy_s = time.perf_counter() - t0
    new = old.clone()
    new[sel] = part.to(torch.int64)

    before = predicted_balancedness(weight, old, topo.num_gpus).numpy()
    after = predicted_balancedness(weight, new, topo.num_gpus).numpy()
    moved = moved_slots(old, new, topo.num_gpus).numpy()
    changed = [l for l in sel if not torch.equal(old[l], new[l])]
    gain = float(after.mean() - before.mean())
    if not changed:
        accept, reason = False, "policy returned the current placement"
    elif force:
        accept, reason = True, f"forced; predicted gain {gain:+.4f}"
    elif gain < config.min_gain:
        accept, reason = False, (f"predicted gain {gain:+.4f} "
                                 f"({before.mean():.4f} -> {after.mean():.4f}) below min_gain={config.min_gain:g}")
    else:
        accept, reason = True, (f"predicted gain {gain:+.4f} "
                                f"({before.mean():.4f} -> {after.mean():.4f}) moving {int(moved.sum())} slots")
    return Proposal(new, changed, before, after, moved, accept, reason, name, policy_s)
