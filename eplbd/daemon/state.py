"""The daemon's state and every operation on it, without sockets.

``DaemonState`` takes decoded messages and returns what to send: the I/O shell
(``eplbd.daemon.server``) routes ``Outgoing`` items to ranks by their registered
identity. Tests drive it directly with made-up times. The operations live in mixins by
concern: ``sessions`` (registration, sessions, ingest), ``lifecycle`` (tick, plans, commit,
abort, watchdog), ``operator_ops`` (status, rebalance, placements, dumps), ``resize`` (elastic EP).
"""

from __future__ import annotations

import logging
import time
import uuid

import torch

from eplbd.errors import ConfigError, LimitExceededError
from eplbd.daemon.lifecycle import PlanLifecycle
from eplbd.daemon.operator_ops import OperatorOps, operator_path
from eplbd.daemon.plans import PersistedState, PlanRecord, load_state, save_state
from eplbd.proto import AbortInfo
from eplbd.daemon.resize import ElasticOps
from eplbd.daemon.scheduler import Topology
from eplbd.daemon.sessions import SessionOps
from eplbd.daemon.state_types import (ABORT_CAUSES, GROUP_FIELDS, REFUSAL_REASONS, Counters, Outgoing, PlanJob,
                                      Sender, Worker)
from eplbd.daemon.window import LoadWindow

__all__ = ["ABORT_CAUSES", "REFUSAL_REASONS", "Counters", "DaemonState", "Outgoing", "PlanJob", "Sender", "Worker",
           "operator_path"]

log = logging.getLogger("eplbd.daemon.state")


class DaemonState(SessionOps, PlanLifecycle, OperatorOps, ElasticOps):
    """Everything the daemon knows. ``settings`` is a ``DaemonSettings`` (or an ``EplbConfig``
    carrying the daemon fields used here); it may be replaced at run time by ``set_settings``."""

    def __init__(self, settings, *, daemon_id: str | None = None) -> None:
        self.settings = settings
        # Ranks each CURVE worker key may register (key name -> ranks); None: not bound.
        self.rank_binding: dict[str, frozenset[int]] | None = None
        self.daemon_id = daemon_id or f"eplbd-{uuid.uuid4().hex[:8]}"
        self.started = time.time()
        self.topo: Topology | None = None
        self.group: dict[str, int] = {}
        self.workers: dict[int, Worker] = {}
        self.epoch = 0
        self.phy2log: torch.Tensor | None = None
        self.placements: dict[int, torch.Tensor] = {}  # epoch -> phy2log, recent epochs only
        self._partial: dict[tuple[int, int], torch.Tensor] = {}  # (plan epoch, layers applied) -> phy2log
        self.window: LoadWindow | None = None
        self.plans: dict[int, PlanRecord] = {}
        self.current_plan: PlanRecord | None = None
        self.next_plan_id = 1
        self.paused = False
        self.last_plan_step = -1
        self.last_decision_reason = "no workers registered yet"
        self._decided = False
        self.last_commit_time: float | None = None
        self.last_abort: AbortInfo | None = None
        self.aborts_in_a_row = 0  # plans ended aborted since the last commit
        self.load_silent = False  # every rank's newest silent_load_warn_steps steps counted no token
        self.counters = Counters()
        self._persisted: PersistedState | None = None
        if getattr(settings, "state_dir", None):
            self._persisted = load_state(settings.state_dir)
            if self._persisted is not None:
                self._restore(self._persisted)
                log.info("restored epoch %d from %s", self.epoch, settings.state_dir)

    def _restore(self, p: PersistedState) -> None:
        """Serve the persisted placement until workers register (they then confirm or override it)."""
        self.epoch, self.next_plan_id = p.epoch, p.next_plan_id
        self.last_commit_time = p.last_commit_at
        try:
            g = {f: int(p.topology[f]) for f in GROUP_FIELDS}
        except (KeyError, TypeError, ValueError):
            return
        self.check_bounds(g, f"the state file in {self.settings.state_dir!r}", ConfigError)
        self.group = g
        self.topo = Topology(num_layers=g["num_layers"], num_logical=g["num_logical_experts"],
                             num_physical=g["num_physical_experts"], num_gpus=g["ep_size"],
                             num_nodes=g["num_nodes"], num_groups=g["num_groups"])
        self.phy2log = p.phy2log
        self.placements = {self.epoch: self.phy2log}
        self.window = LoadWindow(self.settings.window_size, self.topo.num_layers, self.topo.num_logical,
                                 self.topo.num_physical, max_steps_ahead=self.settings.max_steps_ahead)
        self.window.set_epoch(self.epoch)

    # -- settings -----------------------------------------------------------------------
    def set_settings(self, settings) -> None:
        """Take new settings; a ``window_size`` the window's memory budget cannot hold is refused
        (``LimitExceededError``) before anything changes."""
        old = self.settings
        if self.window is not None and settings.window_size != old.window_size:
            self.settings = settings
            try:
                self.check_bounds(self.group, f"window_size={settings.window_size}")
            except LimitExceededError:
                self.settings = old
                raise
            self._resize_window(settings.window_size)
        self.settings = settings

    def _resize_window(self, size: int) -> None:
        steps, load = self.window.steps_logical()
        snap_epoch = self.window.epoch
        win = LoadWindow(size, self.topo.num_layers, self.topo.num_logical, self.topo.num_physical,
                         max_steps_ahead=self.settings.max_steps_ahead)
        win.set_epoch(snap_epoch)
        for s, row in zip(steps[-size:], load[-size:]):
            win.add_logical(int(s), row)
        self.window = win

    # -- persistence ------------------------------------------------------------------
    def _persist(self) -> None:
        if not getattr(self.settings, "state_dir", None) or self.phy2log is None:
            return
        try:
            save_state(self.settings.state_dir, PersistedState(self.epoch, self.phy2log, dict(self.group),
                                                               self.next_plan_id, self.last_commit_time))
        except OSError as exc:  # a full disk must not take the daemon down
            log.error("cannot write state to %s: %s", self.settings.state_dir, exc)
