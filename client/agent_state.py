"""What a :class:`~eplbd.client.agent.PlacementAgent` keeps besides the model: the plan in flight that its
two threads share (``_Active``), its counters (``AgentStats``), and the fault injection tests give it
(``Chaos``, ``ThrottledReporter``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import signal
import time
from typing import Any

from eplbd.chaos import MessageChaos
from eplbd.client.reporter import LoadReporter
from eplbd.client.schedule import LayerSchedule
from eplbd.errors import EplbdError
from eplbd.proto import Plan

log = logging.getLogger("eplbd.agent")


@dataclasses.dataclass
class Chaos:
    """Fault injection for tests.

    Attributes:
        max_delay_s: random delay before handling each message from the daemon and before each
            transfer batch.
        fail_batch: the n-th transfer batch of this rank fails (as a corrupted transfer would).
        kill_batch: this process kills itself (SIGKILL) when its n-th transfer batch starts, so
            the peer of that batch is left mid-transfer.
        dup_p, reorder_p: messages to the daemon (LayerReady, Ack, Abort) are duplicated /
            sent after the next one with these probabilities (``eplbd.chaos.MessageChaos``).
        report_delay_s: the load sender sleeps this long before each report (a slow rank).
    """

    max_delay_s: float = 0.0
    seed: int = 0
    fail_batch: int = -1
    kill_batch: int = -1
    dup_p: float = 0.0
    reorder_p: float = 0.0
    report_delay_s: float = 0.0

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)
        self._batches = 0
        self.messages = MessageChaos(dup_p=self.dup_p, reorder_p=self.reorder_p, seed=self.seed)

    def delay(self) -> None:
        if self.max_delay_s > 0:
            time.sleep(self._rng.uniform(0, self.max_delay_s))

    def before_batch(self) -> None:
        """Before a transfer batch: the random delay, and the kill of ``kill_batch``."""
        self.delay()
        if self._batches + 1 == self.kill_batch:
            log.warning("chaos: killing this process (pid %d) at transfer batch %d", os.getpid(), self.kill_batch)
            os.kill(os.getpid(), signal.SIGKILL)

    def check_batch(self) -> None:
        """After a batch: fail the ``fail_batch``-th one (as a corrupted or partial transfer would)."""
        self._batches += 1
        if self._batches == self.fail_batch:
            raise EplbdError(f"injected transfer failure on batch {self._batches}")


class ThrottledReporter(LoadReporter):
    """A ``LoadReporter`` whose sender sleeps ``delay_s`` before each report (``Chaos.report_delay_s``):
    a slow rank for tests. ``sent_steps`` lists ``(first_step, steps)`` of every report that got out."""

    def __init__(self, *args: Any, delay_s: float, **kwargs: Any) -> None:
        self.delay_s = delay_s
        self.sent_steps: list[tuple[int, int]] = []
        super().__init__(*args, **kwargs)

    def _send(self, slots: list[int], first_step: int, tag: tuple[int, int], events: list) -> None:
        time.sleep(self.delay_s)
        before = self.steps_sent
        super()._send(slots, first_step, tag, events)
        if self.steps_sent != before:
            self.sent_steps.append((first_step, len(slots)))


@dataclasses.dataclass
class AgentStats:
    """Counters of one rank (sum them over ranks for the group)."""

    plans_received: int = 0
    plans_committed: int = 0
    plans_aborted: int = 0
    plans_refused: int = 0
    plans_stale: int = 0  # duplicated or replayed plans ignored (id not above the highest seen)
    plans_orphaned: int = 0  # plans the daemon forgot (it restarted), settled among the ranks
    applied_plans: list[int] = dataclasses.field(default_factory=list)  # plan ids applied, in order
    applied: list[list[int]] = dataclasses.field(default_factory=list)  # [plan id, layer] of each layer applied
    layers_applied: int = 0
    slots_changed: int = 0  # local slots whose expert changed at commit
    experts_received: int = 0  # remote transfers into this rank
    bytes_received: int = 0
    registrations: int = 0
    apply_s: list[float] = dataclasses.field(default_factory=list)  # time inside after_step per apply
    stage_s: list[float] = dataclasses.field(default_factory=list)  # per staged layer (agent thread)


class _Active:
    """The plan being staged/applied; shared between the two threads under the agent's lock."""

    def __init__(self, plan: Plan, schedules: list[LayerSchedule]) -> None:
        self.plan = plan
        self.layers = list(plan.layers)
        self.rows = {layer: plan.phy2log[i] for i, layer in enumerate(plan.layers)}
        self.schedules = schedules
        self.granted = 0  # layers every rank agreed to stage (in-band, at a commit boundary)
        self.started = 0  # layers this rank has run the transfers of (<= granted)
        self.claimed = 0  # layers whose staging took a buffer (started <= claimed <= granted)
        self.staged = 0  # prefix of self.layers staged successfully here
        self.permitted: set[int] = set()
        self.buffers: dict[int, int] = {}  # layer index -> staging buffer
        self.events: dict[int, Any] = {}  # layer index -> CUDA event of its staging (GPU only)
        self.applied = 0
        self.failed = ""  # a transfer failed here: no more grants for this plan, anywhere
        self.aborted = False  # the daemon aborted it (nothing kept): dropped once granted staging is done
        self.orphaned = ""  # the daemon that pushed it is gone: the ranks end it in-band (see _cadence)

    @property
    def permitted_prefix(self) -> int:
        n = 0
        while n < len(self.layers) and self.layers[n] in self.permitted:
            n += 1
        return n

    def ready(self) -> int:
        return min(self.staged, self.permitted_prefix)

    @property
    def flagged(self) -> bool:
        """No more layers of this plan may be granted, on any rank."""
        return bool(self.failed or self.aborted or self.orphaned)

    @property
    def closable(self) -> bool:
        """Orphaned, and this rank runs no granted staging a peer may be waiting on."""
        return bool(self.orphaned) and self.started >= self.granted
