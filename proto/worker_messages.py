"""Messages between the daemon and worker ranks: registration, load, liveness, plans.

Sockets: ``LoadReport`` goes on the daemon's PULL socket (no reply); everything
else on its ROUTER (the worker holds a DEALER). Plans flow
``Plan`` (daemon) -> ``LayerReady`` (each rank) -> ``Commit`` (daemon) ->
``Ack`` (each rank), or ``Abort`` from either side.
"""

from __future__ import annotations

import msgspec
import torch

from eplbd.errors import InvalidArgumentError

from .base import INT_DTYPES, MessageBase, check_tensor


# --- worker ------------------------------------------------------------------
class RegisterWorker(MessageBase):
    """A rank joins (or re-joins) the EP group.

    ``phy2log``: [num_layers, num_physical_experts] int64, the placement the
    rank is running on now (epoch ``epoch``). ``worker_id`` names this
    incarnation (carries a uuid) so that a restarted rank does not collide with
    its previous life. ``expert_bytes``: bytes of all tensors of one expert in
    one layer (weights, scales, biases), used to price moves.
    """

    rank: int
    ep_size: int
    worker_id: str
    num_layers: int
    num_logical_experts: int
    num_physical_experts: int
    num_local_physical_experts: int
    epoch: int
    phy2log: torch.Tensor
    node: int = 0
    num_nodes: int = 1
    num_groups: int = 1
    expert_bytes: int = 0
    communicator: str = ""
    step: int = 0  # the engine's current step, so a re-registering rank resumes counting
    hostname: str = ""
    pid: int = 0
    # The highest plan id this rank has seen: a daemon that lost its state numbers new plans
    # above it, so a rank can tell a stale or replayed plan from a new one by its id alone.
    last_plan_id: int = 0
    # The session this connection holds for ``rank`` (``Registered.session``), when it registers
    # again while that session is alive; "" for a first registration.
    session: str = ""

    def __post_init__(self) -> None:
        check_tensor("RegisterWorker.phy2log", self.phy2log, 2, (torch.int64,))
        want = (self.num_layers, self.num_physical_experts)
        if tuple(self.phy2log.shape) != want:
            raise InvalidArgumentError(
                f"RegisterWorker.phy2log has shape {list(self.phy2log.shape)}, expected "
                f"[num_layers, num_physical_experts] = {list(want)}"
            )
        if not 0 <= self.rank < self.ep_size:
            raise InvalidArgumentError(f"RegisterWorker.rank {self.rank} is outside [0, ep_size={self.ep_size})")


class Registered(MessageBase):
    """Reply to ``RegisterWorker``.

    ``phy2log``: [num_layers, num_physical_experts] int64 the worker must switch
    to before reporting (None: keep yours). ``plan``: a plan in flight the
    worker should join. ``commit_interval_steps``: the step cadence at which
    ranks agree in-band on what to commit (0: the worker's default).
    """

    epoch: int
    phy2log: torch.Tensor | None = None
    plan: Plan | None = None
    daemon_id: str = ""
    heartbeat_interval_s: float = 0.0
    commit_interval_steps: int = 0
    session: str = ""

    def __post_init__(self) -> None:
        if self.phy2log is not None:
            check_tensor("Registered.phy2log", self.phy2log, 2, (torch.int64,))


class LoadReport(MessageBase):
    """Load of consecutive steps on one rank, sent on the PULL socket (no reply).

    ``load``: [steps, num_layers, num_physical_experts] integer tokens routed to
    each physical expert, steps ``first_step .. first_step + steps - 1``, all
    recorded under placement ``epoch`` (a reporter splits batches at an epoch
    change). ``seq`` counts reports per incarnation from 0, so the daemon sees
    gaps; ``dropped_steps`` counts steps the reporter itself dropped (bounded
    queue) since its previous report.

    ``layers_applied``: -1 when every layer runs placement ``epoch``. While a
    plan is being applied layer by layer, ``epoch`` is the plan's epoch and
    ``layers_applied = n`` says only the first ``n`` layers of the plan (in
    ``Plan.layers`` order) run it; the others still run ``epoch - 1``.
    """

    rank: int
    worker_id: str
    epoch: int
    first_step: int
    seq: int
    load: torch.Tensor
    dropped_steps: int = 0
    layers_applied: int = -1
    session: str = ""  # Registered.session of this incarnation

    def __post_init__(self) -> None:
        check_tensor("LoadReport.load", self.load, 3, INT_DTYPES)
        # Counters the daemon adds up: a negative one would subtract from them.
        if self.seq < 0 or self.dropped_steps < 0 or self.layers_applied < -1:
            raise InvalidArgumentError(
                f"LoadReport seq={self.seq}, dropped_steps={self.dropped_steps} must be >= 0 and "
                f"layers_applied={self.layers_applied} >= -1"
            )

    @property
    def num_steps(self) -> int:
        return self.load.shape[0]


class Heartbeat(MessageBase):
    """Liveness from a worker; ``epoch`` is the placement it runs on (-1: unknown)."""

    rank: int
    worker_id: str
    step: int
    epoch: int = -1
    session: str = ""


class Release(MessageBase):
    """Worker -> daemon: this session of ``rank`` ends (the process is closing its link).

    The rank stays registered (a plan in flight is not aborted by it), but another connection may
    now register ``rank`` at once instead of waiting until the session times out: a rank restarted
    on purpose comes back without waiting ``heartbeat_timeout_s``.
    """

    rank: int
    worker_id: str
    session: str


# --- plans -------------------------------------------------------------------
class Plan(MessageBase):
    """Daemon -> workers: move to a new placement for ``layers``.

    ``phy2log``: [len(layers), num_physical_experts] int64, row i is the new
    placement of layer ``layers[i]``. Applying it turns ``base_epoch`` into
    ``epoch``. ``timeout_s`` bounds staging (0: the worker's default).
    """

    plan_id: int
    epoch: int
    base_epoch: int
    layers: list[int]
    phy2log: torch.Tensor
    policy: str
    reason: str = ""
    timeout_s: float = 0.0

    def __post_init__(self) -> None:
        check_tensor("Plan.phy2log", self.phy2log, 2, (torch.int64,))
        if self.phy2log.shape[0] != len(self.layers):
            raise InvalidArgumentError(
                f"Plan.phy2log has {self.phy2log.shape[0]} rows for {len(self.layers)} layers"
            )


class LayerReady(MessageBase):
    """Worker -> daemon: ``layers`` of plan ``plan_id`` are staged on ``rank``."""

    rank: int
    plan_id: int
    epoch: int
    layers: list[int]
    worker_id: str = ""
    session: str = ""


class Commit(MessageBase):
    """Daemon -> workers: ``layers`` of plan ``plan_id`` may be applied (at the agreed step)."""

    plan_id: int
    epoch: int
    layers: list[int]


class Ack(MessageBase):
    """Worker -> daemon: ``layers`` were applied on ``rank`` at the boundary before ``step``."""

    rank: int
    plan_id: int
    epoch: int
    layers: list[int]
    step: int
    worker_id: str = ""
    session: str = ""


class Abort(MessageBase):
    """Either way: plan ``plan_id`` is abandoned; the old placement keeps serving.

    ``rank`` is the rank that failed (-1: the daemon or an operator aborted). ``peer`` (worker ->
    daemon): the rank a failed transfer was with, if known (-1 otherwise).

    ``worker_id`` and ``session`` (worker -> daemon): the registration of ``rank`` that aborts.

    ``keep_layers`` (daemon -> workers only): layers the daemon had already permitted.
    A permission is never taken back (some ranks may have applied them), so those
    layers are still applied and acked, and the plan commits with only them: its
    epoch's placement is the base placement with just those rows changed.
    """

    plan_id: int
    epoch: int
    reason: str
    rank: int = -1
    keep_layers: list[int] = msgspec.field(default_factory=list)
    peer: int = -1
    worker_id: str = ""
    session: str = ""
