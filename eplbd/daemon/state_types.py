"""The small value types ``DaemonState`` trades in: who sent a message, a registered rank, a message to
send, a policy run for an executor, the counters behind the metrics, and the fixed label sets."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from eplbd.daemon.scheduler import Proposal

# Fields every rank of one EP group must agree on at registration.
GROUP_FIELDS = ("ep_size", "num_layers", "num_logical_experts", "num_physical_experts",
                "num_local_physical_experts", "num_groups", "num_nodes")


@dataclass(frozen=True)
class Sender:
    """Who sent a message, as the transport tells it (not as the message claims).

    Attributes:
        identity: the ROUTER routing identity of the connection; None on the ingest socket,
            whose messages carry none.
        user_id: the CURVE ``User-Id`` of the connection (``"worker:NAME"``); None with CURVE off.
    """

    identity: bytes | None = None
    user_id: str | None = None


@dataclass
class Worker:
    """A registered rank: one session, bound to the connection (and CURVE key) that registered it
    and to ``session``, the secret its later messages must carry."""

    rank: int
    worker_id: str
    identity: bytes
    node: int
    hostname: str
    epoch: int
    expert_bytes: int
    last_seen: float
    last_seq: int = -1
    step: int = 0
    rejected_ahead: int = 0  # reports refused since the last applied one (their seqs are not gaps)
    silent_steps: int = 0  # newest steps in a row whose report counted no token in any layer
    user_id: str | None = None
    session: str = ""
    released: bool = False  # the rank said its session ends (Release): another connection may register it


@dataclass
class Outgoing:
    """A message for one rank (``rank``) or for every registered rank (``rank is None``); with
    ``identity``, for that one connection instead (a rank retired by an elastic resize)."""

    msg: Any
    rank: int | None = None
    identity: bytes | None = None


@dataclass
class PlanJob:
    """A policy run taken off the event loop: ``run`` is pure (it reads only its own copies and the
    placement tensor, which the state replaces but never changes in place), so it may run in an
    executor while the loop keeps serving; ``finish`` then applies the result on the loop.

    Attributes:
        run: computes the ``Proposal``.
        epoch: the epoch it planned from; ``finish`` refuses a result the group has moved past.
        what: why it runs: the scheduler's reason, or "operator rebalance".
        phy2log: the placement it planned from.
        scheduled: the scheduler's own re-plan (not an operator's request).
    """

    run: Callable[[], Proposal]
    epoch: int
    what: str
    phy2log: torch.Tensor
    scheduled: bool = False


@dataclass
class Counters:
    reports_received: int = 0
    reports_dropped: int = 0
    drop_reasons: dict[str, int] = field(default_factory=dict)
    plans: dict[str, int] = field(default_factory=lambda: {"committed": 0, "aborted": 0, "skipped": 0})
    # Abort actions by cause (ABORT_CAUSES); a truncating abort counts too, though its plan then commits.
    aborts: dict[str, int] = field(default_factory=dict)
    # RPC messages naming a rank that were refused: (message type, REFUSAL_REASONS) -> count.
    refused: dict[tuple[str, str], int] = field(default_factory=dict)

    def drop(self, reason: str, n: int = 1) -> None:
        self.reports_dropped += n
        self.drop_reasons[reason] = self.drop_reasons.get(reason, 0) + n

    def refuse(self, message: str, reason: str) -> None:
        key = (message, reason)
        self.refused[key] = self.refused.get(key, 0) + 1


# Why a worker message naming a rank was refused (label of eplbd_worker_messages_refused_total; load
# reports count the same reasons as drops): ``not_registered`` (no such rank, or another incarnation's
# worker id), ``bad_session`` (not the secret the registration was given), ``wrong_connection`` (not the
# connection that registered), ``wrong_key`` (not the CURVE key that registered), ``rank_held`` (a
# registration of a rank whose session is alive, from another connection), ``key_not_bound`` (a CURVE key
# that ``curve_worker_ranks`` does not bind to that rank), ``limit`` (a shape beyond the daemon's bounds).
REFUSAL_REASONS = ("not_registered", "bad_session", "wrong_connection", "wrong_key", "rank_held",
                   "key_not_bound", "limit")


# Why a plan was aborted: the label of eplbd_plans_aborted_total and AbortInfo.cause.
# ``resize`` (an operator's elastic resize drains the plan) is not a failure: it does not count
# towards ``stuck_abort_streak``.
ABORT_CAUSES = ("timeout", "stalled", "rank_dead", "rank_failed", "reregistered", "resize")
