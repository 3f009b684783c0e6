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
        plan_started_at: time the plan in flight was pushed (None: no plan in flight).
        plan_progress_at: time the plan in flight last made progress (pushed, or a rank reported
            a layer staged or applied that it had not reported before); None: use ``plan_started_at``.
        dead_ranks: ``(rank, seconds silent)`` of the group's ranks not heard from within the
            heartbeat timeout.

    ``now`` and the plan times are on the same clock (the daemon uses ``time.monotonic``).
    """

    step: int
    last_plan_step: int = -1
    window_fill: int = 0
    paused: bool = False
    manual: bool = False
    plan_started_at: float | None = None
    plan_progress_at: float | None = None
    dead_ranks: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class Decision:
    """``rank``: for a ``rank_dead`` abort, the rank that went silent (-1 otherwise)."""

    action: Literal["wait", "plan", "abort"]
    reason: str
    trigger: Literal["interval", "manual", "timeout", "rank_dead", "stalled", None] = None
    rank: int = -1


def decide(now: float, state: SchedulerState, config: EplbConfig) -> Decision:
    """Decide what the scheduler does at time ``now``.

    Order matters: a plan in flight blocks everything (one plan at a time) until
    it finishes or is aborted: when older than ``plan_timeout_s``, when a rank
    went silent (it cannot stage or apply anything any more), or by the watchdog
    when no rank reported progress for ``plan_stall_timeout_s``. An operator
    request runs even while paused.
    """
    if state.plan_started_at is not None:
        return _plan_in_flight(now, state, config)
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


def _plan_in_flight(now: float, state: SchedulerState, config: EplbConfig) -> Decision:
    age = now - state.plan_started_at
    if age > config.plan_timeout_s:
        return Decision("abort", f"plan not fully acked after {age:.1f}s "
                        f"(plan_timeout_s={config.plan_timeout_s:g})", "timeout")
    if state.dead_ranks:
        rank, silent = min(state.dead_ranks)
        others = f" (also silent: {sorted(r for r, _ in state.dead_ranks if r != rank)})" \
            if len(state.dead_ranks) > 1 else ""
        return Decision("abort", f"rank {rank} sent nothing for {silent:.1f}s (heartbeat timeout){others}",
                        "rank_dead", rank)
    idle = now - (state.plan_progress_at if state.plan_progress_at is not None else state.plan_started_at)
    if idle > config.plan_stall_timeout_s:
        return Decision("abort", f"plan stalled: no rank reported a staged or applied layer for {idle:.1f}s "
                        f"(plan_stall_timeout_s={config.plan_stall_timeout_s:g})", "stalled")
    return Decision("wait", "a plan is in flight")


@dataclass
class Proposal:
    """A candidate plan and what it is predicted to buy.

    Attributes:
        phy2log: ``[layers, num_physical]`` int64, the full new placement.
        layers: layers whose placement changes (the plan's layers).
        before, after: ``[layers]`` float64 predicted balancedness on the window.
        moved_slots: ``[layers]`` int64 slots that must receive an expert from another rank.
        accept: whether the plan should be pushed.
        reason: why it was accepted or skipped (gain, moves, bytes, transfer time, policy notes).
        policy_s: wall time the policy took.
        moved_bytes: ``moved_slots.sum()`` x the bytes of one expert (0 when unknown).
        transfer_s: estimated transfer time of ``moved_bytes`` at ``config.transfer_gb_per_s`` per rank.
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
    moved_bytes: int = 0
    transfer_s: float = 0.0

    @property
    def gain(self) -> float:
        return float(self.after.mean() - self.before.mean()) if self.before.size else 0.0


def check_layers(layers: Sequence[int], topo: Topology) -> list[int]:
    """``layers`` sorted and unique; ``InvalidArgumentError`` naming those outside the model."""
    bad = [l for l in layers if not 0 <= l < topo.num_layers]
    if bad:
        raise InvalidArgumentError(f"layers {bad} out of range 0..{topo.num_layers - 1}")
    return sorted(set(int(l) for l in layers))


def _select_layers(layers: Sequence[int] | None, before: np.ndarray, topo: Topology,
                   config: EplbConfig) -> tuple[list[int], str]:
    """The layers to re-plan: the operator's choice, else those below ``config.replan_below``."""
    if layers is not None:
        return check_layers(layers, topo), ""
    if config.replan_below >= 1.0:
        return list(range(topo.num_layers)), ""
    sel = [l for l in range(topo.num_layers) if before[l] < config.replan_below]
    return sel, f"{len(sel)}/{topo.num_layers} layer(s) below replan_below={config.replan_below:g}; "


def _gate(gain: float, before: np.ndarray, after: np.ndarray, moved: int, moved_bytes: int,
          transfer_s: float, config: EplbConfig, force: bool) -> tuple[bool, str]:
    """Accept or skip a changed plan, saying why in numbers."""
    cost = f"moving {moved} slots"
    if moved_bytes:
        cost += (f" ({moved_bytes / 1e9:.3g} GB, ~{transfer_s:.3g}s at "
                 f"{config.transfer_gb_per_s:g} GB/s per rank)")
    pred = f"predicted gain {gain:+.4f} ({before.mean():.4f} -> {after.mean():.4f})"
    if force:
        return True, f"forced; {pred} {cost}"
    if gain < config.min_gain:
        return False, f"{pred} below min_gain={config.min_gain:g}; would be {cost}"
    per_s = gain / transfer_s if transfer_s > 0 else float("inf")
    if per_s < config.min_gain_per_transfer_s:
        return False, (f"{pred} is {per_s:.3g} per transfer second, below "
                       f"min_gain_per_transfer_s={config.min_gain_per_transfer_s:g}; would be {cost}")
    return True, f"{pred} {cost}"


def propose(window_logical: np.ndarray | torch.Tensor, phy2log: torch.Tensor, topo: Topology,
            config: EplbConfig, *, policy: str | None = None,
            layers: Sequence[int] | None = None, force: bool = False, expert_bytes: int = 0) -> Proposal:
    """Run the policy on the window and gate the result.

    Gating, in order: nothing changed; ``force`` accepts; the predicted gain in mean
    balancedness is below ``config.min_gain``; the gain per second of transfer (moved
    slots x ``expert_bytes`` over ``num_gpus`` ranks at ``config.transfer_gb_per_s``
    each) is below ``config.min_gain_per_transfer_s``. Without ``layers`` only layers
    whose predicted balancedness is below ``config.replan_below`` are re-planned; the
    policy gets ``config.move_budget``.

    Args:
        window_logical: ``[layers, num_logical]`` window load per logical expert.
        phy2log: ``[layers, num_physical]`` int64 current placement.
        topo: the EP group's shape.
        config: the default policy and the gating fields above.
        policy: policy name overriding ``config.policy``.
        layers: only re-plan these layers (others keep their placement).
        force: accept whatever the gain (an operator's explicit request).
        expert_bytes: bytes of one expert's tensors (from worker registration; 0 = unknown:
            the transfer-cost rule is not applied).

    Returns:
        The Proposal; ``reason`` says why it was accepted or skipped.
    """
    name = policy or config.policy
    impl = get_policy(name)
    weight = torch.as_tensor(np.asarray(window_logical))
    old = torch.as_tensor(phy2log, dtype=torch.int64)
    before = predicted_balancedness(weight, old, topo.num_gpus).numpy()
    sel, scope = _select_layers(layers, before, topo, config)
    new = old.clone()
    policy_s = 0.0
    if sel:
        t0 = time.perf_counter()
        part = impl.rebalance(weight[sel], topo.num_physical, topo.num_groups, topo.num_nodes,
                              topo.num_gpus, old_phy2log=old[sel], move_budget=config.move_budget)
        policy_s = time.perf_counter() - t0
        new[sel] = part.to(torch.int64)
    after = predicted_balancedness(weight, new, topo.num_gpus).numpy()
    moved = moved_slots(old, new, topo.num_gpus).numpy()
    changed = [l for l in sel if not torch.equal(old[l], new[l])]
    gain = float(after.mean() - before.mean())
    moved_bytes = int(moved.sum()) * max(int(expert_bytes), 0)
    transfer_s = moved_bytes / (topo.num_gpus * config.transfer_gb_per_s * 1e9)
    note = getattr(impl, "describe", lambda: "")()
    if not sel:
        accept, reason = False, f"{scope}nothing to re-plan"
    elif not changed:
        accept, reason = False, f"{scope}policy returned the current placement"
    else:
        accept, reason = _gate(gain, before, after, int(moved.sum()), moved_bytes, transfer_s, config, force)
        reason = scope + reason
    if note:
        reason += f" [{note}]"
    return Proposal(new, changed, before, after, moved, accept, reason, name, policy_s,
                    moved_bytes=moved_bytes, transfer_s=transfer_s)
