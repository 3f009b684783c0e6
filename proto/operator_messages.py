"""Operator requests and their replies (``eplbctl`` <-> daemon, over the daemon's ROUTER)."""

from __future__ import annotations

from typing import Any

import msgspec
import torch

from eplbd.errors import InvalidArgumentError

from .base import MessageBase, check_tensor


# --- operator ----------------------------------------------------------------
class WorkerInfo(msgspec.Struct, kw_only=True):
    rank: int
    worker_id: str
    alive: bool
    last_seen_s: float  # seconds since the last message from this worker
    node: int = 0
    epoch: int = -1
    hostname: str = ""


class AbortInfo(msgspec.Struct, kw_only=True):
    """The daemon's last plan abort: which plan, which rank failed (-1: none in particular, e.g. a
    plan timeout), why, when (unix time), the cause (``timeout``, ``stalled``, ``rank_dead``,
    ``rank_failed``, ``reregistered``, ``resize``), the rank that reported it (-1: the daemon's own watchdog)
    and the layers kept (a permitted layer is never taken back; the plan then commits with them).
    ``reported_by_worker``: the registered worker id (session) of the rank that reported it."""

    plan_id: int
    rank: int
    reason: str
    at: float
    cause: str = ""
    reported_by: int = -1
    kept_layers: list[int] = msgspec.field(default_factory=list)
    reported_by_worker: str = ""


class BalanceStats(msgspec.Struct, kw_only=True):
    """Balancedness (mean rank load / max rank load) over layers; ``aggregate`` is vLLM's."""

    min: float
    p50: float
    p90: float
    mean: float
    aggregate: float


class PlanInfo(MessageBase):
    """A plan as stored by the daemon; reply to ``GetPlanRequest``.

    ``phy2log``: [len(layers), num_physical_experts] int64 when asked for, else None.
    ``timings``: phase name -> seconds (e.g. "decide", "stage", "commit").
    """

    plan_id: int
    epoch: int
    base_epoch: int
    state: str  # one of PLAN_STATES
    reason: str = ""
    layers: list[int] = msgspec.field(default_factory=list)
    policy: str = ""
    predicted_before: float = 0.0
    predicted_after: float = 0.0
    moved_slots: int = 0
    moved_bytes: int = 0
    created_at: float = 0.0  # unix time
    timings: dict[str, float] = msgspec.field(default_factory=dict)
    phy2log: torch.Tensor | None = None


class StatusRequest(MessageBase):
    pass


class StatusReply(MessageBase):
    epoch: int
    step: int
    paused: bool
    workers: list[WorkerInfo] = msgspec.field(default_factory=list)
    window_fill: int = 0  # steps in the window now
    window_size: int = 0
    current_plan: PlanInfo | None = None
    last_decision_reason: str = ""
    reports_received: int = 0
    reports_dropped: int = 0
    drop_reasons: dict[str, int] = msgspec.field(default_factory=dict)
    daemon_id: str = ""
    ep_size: int = 0
    policy: str = ""
    next_rebalance_step: int = -1
    uptime_s: float = 0.0
    # Watchdog: when the last plan committed (unix time, 0: never), the last abort, how many plans
    # in a row ended aborted, and whether rebalancing is stuck (then /healthz fails) and why.
    last_commit_at: float = 0.0
    last_abort: AbortInfo | None = None
    aborts_in_a_row: int = 0
    rebalancing_stuck: bool = False
    stuck_reason: str = ""
    resize: ResizeInfo | None = None  # the latest elastic resize (None: never resized)
    # Steps (the newest) in which no rank counted a token, and whether that reached the daemon's
    # silent_load_warn_steps: the engine steps but its layers record no load (nothing to balance on).
    silent_load_steps: int = 0
    load_silent: bool = False
    # Worker requests naming a rank that were refused: "Message:reason" -> count (eplbd.daemon.state.REFUSAL_REASONS).
    messages_refused: dict[str, int] = msgspec.field(default_factory=dict)


class BalancednessRequest(MessageBase):
    per_layer: bool = False
    per_rank: bool = False


class BalancednessReply(MessageBase):
    """``per_rank_load``: [num_layers, ep_size] float64 mean load per rank (if asked for)."""

    observed: BalanceStats
    predicted: BalanceStats
    per_layer_observed: list[float] | None = None
    per_layer_predicted: list[float] | None = None
    per_rank_load: torch.Tensor | None = None
    epoch: int = 0
    window_fill: int = 0

    def __post_init__(self) -> None:
        if self.per_rank_load is not None:
            check_tensor("BalancednessReply.per_rank_load", self.per_rank_load, 2, (torch.float64, torch.float32))


class RebalanceRequest(MessageBase):
    """Plan now. ``force`` pushes even when the predicted gain is below the threshold."""

    dry_run: bool = False
    layers: list[int] | None = None
    policy: str | None = None
    force: bool = False


class RebalanceReply(MessageBase):
    """Outcome of a rebalance; ``phy2log``: [num_layers, num_physical_experts] int64, the whole placement the plan leads to (layers outside ``layers`` unchanged), so it can be saved and loaded back; None if not computed."""

    plan_id: int
    epoch: int
    pushed: bool
    skipped: bool
    reason: str = ""
    predicted_before: float = 0.0
    predicted_after: float = 0.0
    moved_slots: int = 0
    moved_bytes: int = 0
    phy2log: torch.Tensor | None = None
    layers: list[int] = msgspec.field(default_factory=list)
    policy: str = ""

    def __post_init__(self) -> None:
        if self.phy2log is not None:
            check_tensor("RebalanceReply.phy2log", self.phy2log, 2, (torch.int64,))


class PauseRequest(MessageBase):
    reason: str = ""


class ResumeRequest(MessageBase):
    pass


class GetPlanRequest(MessageBase):
    """The plan that produced ``epoch`` (None: the latest), or plan ``plan_id`` if given."""

    epoch: int | None = None
    plan_id: int | None = None
    with_placement: bool = False


class GetPlacementRequest(MessageBase):
    epoch: int | None = None  # None: the current placement


class PlacementReply(MessageBase):
    """``phy2log``: [num_layers, num_physical_experts] int64 in force at ``epoch``."""

    epoch: int
    phy2log: torch.Tensor
    ep_size: int = 0

    def __post_init__(self) -> None:
        check_tensor("PlacementReply.phy2log", self.phy2log, 2, (torch.int64,))


class DumpWindowRequest(MessageBase):
    path: str  # on the daemon's filesystem


class DumpWindowReply(MessageBase):
    path: str
    steps: int


class LoadPlacementRequest(MessageBase):
    """Push the placement in a file (on the daemon's filesystem); answered by ``RebalanceReply``.

    ``moe_layers``: for a file with a row per decoder layer (SGLang's, dense layers included), the
    decoder layer numbers of the MoE layers, ascending, and ``num_hidden_layers`` its row count
    (0: the last MoE layer + 1); the daemon keeps those rows. Empty: the rows are the MoE layers.
    """

    path: str
    dry_run: bool = False
    moe_layers: list[int] = msgspec.field(default_factory=list)
    num_hidden_layers: int = 0


class GetConfigRequest(MessageBase):
    pass


class SetConfigRequest(MessageBase):
    key: str
    value: Any


class ConfigReply(MessageBase):
    config: dict[str, Any]


# --- elastic EP (see eplbd.policy.elastic) ---------------------------------------------
class ResizeInfo(msgspec.Struct, kw_only=True):
    """A resize of the EP group (ranks left or joined), as ``status`` shows it.

    ``mapping[old_rank]`` is the rank's new number, -1 when it left; new ranks nobody maps to joined
    empty. ``orphans[layer]``: logical experts whose only copies were on removed ranks (the engine
    reloads them; see ``eplbd.client.elastic``). ``registered``: ranks of the new group registered
    since the resize; ``complete`` once all have. ``drained_plan``/``drain``: the plan that was in
    flight (0: none) and what became of it.
    """

    epoch: int
    base_epoch: int
    old_ep_size: int
    ep_size: int
    mapping: list[int]
    orphans: list[list[int]]
    registered: list[int] = msgspec.field(default_factory=list)
    complete: bool = False
    moved_slots: int = 0
    reload_slots: int = 0
    drained_plan: int = 0
    drain: str = ""
    created_at: float = 0.0  # unix time


class ResizeRequest(MessageBase):
    """Elastic EP: ranks leave or join. ``mapping[old_rank]`` = new rank, or -1 when it leaves;
    ``ep_size``: the new group size (0: the number of surviving ranks). Answered by ``ResizeReply``."""

    mapping: list[int]
    ep_size: int = 0
    dry_run: bool = False


class GetResizeRequest(MessageBase):
    """The latest resize; ranks of the new group fetch their transition with it. Answered by
    ``ResizeReply`` (``NotFoundError`` when the group was never resized)."""

    epoch: int | None = None  # the resize that produced this epoch (None: the latest)


class ResizeReply(MessageBase):
    """A resize and the transition to it.

    ``phy2log``: [num_layers, ep_size * num_local_physical_experts] int64, the new group's placement
    (epoch ``info.epoch``). ``base``: same shape, the old placement in new-rank coordinates (a
    surviving rank's slots as they are, -1 on joining ranks). ``dry_run``: computed, nothing changed.
    """

    info: ResizeInfo
    phy2log: torch.Tensor
    base: torch.Tensor
    num_local_physical_experts: int
    dry_run: bool = False

    def __post_init__(self) -> None:
        check_tensor("ResizeReply.phy2log", self.phy2log, 2, (torch.int64,))
        check_tensor("ResizeReply.base", self.base, 2, (torch.int64,))
        want = [self.phy2log.shape[0], self.info.ep_size * self.num_local_physical_experts]
        for name, t in (("phy2log", self.phy2log), ("base", self.base)):
            if list(t.shape) != want:
                raise InvalidArgumentError(f"ResizeReply.{name} has shape {list(t.shape)}, expected {want} "
                                           "([num_layers, ep_size * num_local_physical_experts])")
