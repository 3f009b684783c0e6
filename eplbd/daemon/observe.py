"""The daemon's Prometheus series and its health verdict.

Label sets are small and fixed (plan outcome, drop reason, phase, statistic):
per-layer x per-rank matrices go over RPC, never into series.
"""

from __future__ import annotations

import time

from eplbd.daemon.metrics import Registry

_STATS = ("min", "p50", "p90", "mean", "aggregate")
_PHASES = ("first_ready", "staged", "committed", "aborted")


class DaemonMetrics:
    def __init__(self) -> None:
        r = self.registry = Registry()
        self.balancedness = r.gauge("eplbd_balancedness", "Balancedness over the window (1 = perfect).",
                                    ("kind", "stat"))
        self.epoch = r.gauge("eplbd_epoch", "Placement epoch in force.")
        self.step = r.gauge("eplbd_step", "Newest step seen in load reports.")
        self.window_fill = r.gauge("eplbd_window_fill_steps", "Steps in the load window.")
        self.workers_alive = r.gauge("eplbd_workers_alive", "Registered ranks seen within the heartbeat timeout.")
        self.workers_expected = r.gauge("eplbd_workers_expected", "EP group size.")
        self.plans = r.counter("eplbd_plans_total", "Plans by outcome.", ("outcome",))
        self.aborted = r.counter("eplbd_plans_aborted_total",
                                 "Plan aborts by cause (timeout, stalled, rank_dead, rank_failed, reregistered, resize); "
                                 "an abort that keeps already permitted layers counts too.", ("reason",))
        self.reports = r.counter("eplbd_reports_received_total", "Load reports received.")
        self.dropped = r.counter("eplbd_reports_dropped_total", "Load reports dropped, by reason.", ("reason",))
        self.refused = r.counter("eplbd_worker_messages_refused_total",
                                 "Worker requests naming a rank that were refused, by message type and reason "
                                 "(not_registered, bad_session, wrong_connection, wrong_key, rank_held, "
                                 "key_not_bound, limit).", ("message", "reason"))
        self.phase = r.histogram("eplbd_plan_phase_seconds", "Seconds from push to each plan phase.",
                                 (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60), ("phase",))
        self.last_commit = r.gauge("eplbd_last_commit_timestamp_seconds", "Unix time of the last committed plan.")
        self.stuck = r.gauge("eplbd_rebalancing_stuck",
                             "1 while rebalancing is wedged: a plan without progress beyond plan_stall_timeout_s "
                             "not yet aborted, or stuck_abort_streak plans in a row aborted without a commit.")
        self.silent = r.gauge("eplbd_load_silent_steps",
                              "Newest steps in a row in which no rank counted a token (the engine steps but records "
                              "no load); status load_silent once it reaches silent_load_warn_steps.")
        self._seen: dict[str, float] = {}
        self._observed_plans: set[tuple[int, str]] = set()

    def _count(self, key: str, value: float, counter) -> None:
        delta = value - self._seen.get(key, 0)
        if delta > 0:
            counter.inc(delta)
        self._seen[key] = value

    def refresh(self, st, now: float) -> None:
        """Copy the state's figures into the series (called from the tick loop about once a second)."""
        self.epoch.set(st.epoch)
        self.workers_alive.set(sum(st.alive(w, now) for w in st.workers.values()))
        self.workers_expected.set(st.topo.num_gpus if st.topo else 0)
        self._count("reports", st.counters.reports_received, self.reports)
        for reason, n in st.counters.drop_reasons.items():
            self._count(f"drop:{reason}", n, self.dropped.labels(reason=reason))
        for (message, reason), n in st.counters.refused.items():
            self._count(f"refused:{message}:{reason}", n, self.refused.labels(message=message, reason=reason))
        for outcome, n in st.counters.plans.items():
            self._count(f"plan:{outcome}", n, self.plans.labels(outcome=outcome))
        for cause, n in st.counters.aborts.items():
            self._count(f"abort:{cause}", n, self.aborted.labels(reason=cause))
        for rec in st.plans.values():
            for phase in _PHASES:
                if phase in rec.timings and (rec.plan_id, phase) not in self._observed_plans:
                    self._observed_plans.add((rec.plan_id, phase))
                    self.phase.labels(phase=phase).observe(rec.timings[phase])
        if st.last_commit_time is not None:
            self.last_commit.set(st.last_commit_time)
        self.stuck.set(1.0 if st.rebalancing_stuck(time.monotonic())[0] else 0.0)
        self.silent.set(st.silent_load_steps())
        if st.window is None or st.topo is None:
            return
        self.step.set(st.window.newest_step)
        self.window_fill.set(st.window.fill)
        b = st.balancedness()
        for kind, stats in (("observed", b.observed), ("predicted", b.predicted)):
            for stat in _STATS:
                self.balancedness.labels(kind=kind, stat=stat).set(getattr(stats, stat))

    @staticmethod
    def health(st, mono: float) -> tuple[bool, str]:
        """Unhealthy while rebalancing is wedged (``DaemonState.rebalancing_stuck``)."""
        stuck, why = st.rebalancing_stuck(mono)
        return (False, f"rebalancing stuck: {why}") if stuck else (True, "ok")
