"""The daemon's Prometheus series (``prometheus_client``, one registry per daemon) and its health verdict.

Label sets are small and fixed (plan outcome, drop reason, phase, statistic):
per-layer x per-rank matrices go over RPC, never into series. The label values
that come from the state's counters (outcomes, causes, drop and refusal reasons,
message types) are literals in the daemon's code; should one ever come from a
peer instead, at most ``MAX_SERIES`` label sets per metric are kept and the rest
folded into one series whose labels read ``_overflow`` (counted in
``eplbd_metrics_overflow_total{metric}``), so a peer cannot grow the scrape.
"""

from __future__ import annotations

import time

from prometheus_client import (CollectorRegistry, Counter, GCCollector, Gauge, Histogram, PlatformCollector,
                               ProcessCollector)

_STATS = ("min", "p50", "p90", "mean", "aggregate")
_PHASES = ("first_ready", "staged", "committed", "aborted")
MAX_SERIES = 64  # label sets kept per metric fed from the state's counters
OVERFLOW = "_overflow"


class _Series:
    """The daemon's own metrics as one collector, without the ``_created`` series ``prometheus_client``
    adds to counters and histograms: the exposition keeps the names dashboards know, a counter costs one
    series per label set, and the library's process-wide switch stays untouched for other users."""

    def __init__(self) -> None:
        self.metrics: list = []

    def add(self, metric):
        self.metrics.append(metric)
        return metric

    def describe(self):
        for metric in self.metrics:
            yield from metric.describe()

    def collect(self):
        for metric in self.metrics:
            for family in metric.collect():
                family.samples = [s for s in family.samples if not s.name.endswith("_created")]
                yield family


class DaemonMetrics:
    """The series, on ``self.registry`` (with the process, platform and GC collectors operators expect)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)  # process_* (CPU, resident memory, open fds): where the host allows
        PlatformCollector(registry=r)  # python_info
        GCCollector(registry=r)  # python_gc_*
        s = _Series()
        r.register(s)

        def gauge(name: str, help: str, labels: tuple[str, ...] = ()) -> Gauge:
            return s.add(Gauge(name, help, labels, registry=None))

        def counter(name: str, help: str, labels: tuple[str, ...] = ()) -> Counter:
            return s.add(Counter(name, help, labels, registry=None))  # exposed as name (it ends in _total)

        self.balancedness = gauge("eplbd_balancedness", "Balancedness over the window (1 = perfect).",
                                  ("kind", "stat"))
        self.epoch = gauge("eplbd_epoch", "Placement epoch in force.")
        self.step = gauge("eplbd_step", "Newest step seen in load reports.")
        self.window_fill = gauge("eplbd_window_fill_steps", "Steps in the load window.")
        self.workers_alive = gauge("eplbd_workers_alive", "Registered ranks seen within the heartbeat timeout.")
        self.workers_expected = gauge("eplbd_workers_expected", "EP group size.")
        self.plans = counter("eplbd_plans_total", "Plans by outcome.", ("outcome",))
        self.aborted = counter("eplbd_plans_aborted_total",
                               "Plan aborts by cause (timeout, stalled, rank_dead, rank_failed, reregistered, resize); "
                               "an abort that keeps already permitted layers counts too.", ("reason",))
        self.reports = counter("eplbd_reports_received_total", "Load reports received.")
        self.dropped = counter("eplbd_reports_dropped_total", "Load reports dropped, by reason.", ("reason",))
        self.refused = counter("eplbd_worker_messages_refused_total",
                               "Worker requests naming a rank that were refused, by message type and reason "
                               "(not_registered, bad_session, wrong_connection, wrong_key, rank_held, "
                               "key_not_bound, limit).", ("message", "reason"))
        self.phase = s.add(Histogram("eplbd_plan_phase_seconds", "Seconds from push to each plan phase.",
                                     ("phase",), buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
                                     registry=None))
        self.last_commit = gauge("eplbd_last_commit_timestamp_seconds", "Unix time of the last committed plan.")
        self.stuck = gauge("eplbd_rebalancing_stuck",
                           "1 while rebalancing is wedged: a plan without progress beyond plan_stall_timeout_s "
                           "not yet aborted, or stuck_abort_streak plans in a row aborted without a commit.")
        self.silent = gauge("eplbd_load_silent_steps",
                            "Newest steps in a row in which no rank counted a token (the engine steps but records "
                            "no load); status load_silent once it reaches silent_load_warn_steps.")
        self.overflow = counter("eplbd_metrics_overflow_total",
                                "Label sets folded into the _overflow series because a metric hit its cap.",
                                ("metric",))
        self._seen: dict[str, float] = {}
        self._label_sets: dict[str, set[tuple[str, ...]]] = {}
        self._observed_plans: set[tuple[int, str]] = set()

    def _count(self, key: str, value: float, counter: Counter, name: str = "", labels: tuple[str, ...] = ()) -> None:
        """Add what the state's cumulative ``value`` gained since the last refresh to ``counter``'s series
        ``labels`` (the ``_overflow`` series past ``MAX_SERIES`` label sets of metric ``name``)."""
        delta = value - self._seen.get(key, 0)
        self._seen[key] = value
        if delta <= 0:
            return
        if labels:
            kept = self._label_sets.setdefault(name, set())
            if labels not in kept and len(kept) >= MAX_SERIES:
                self.overflow.labels(metric=name).inc()
                labels = (OVERFLOW,) * len(labels)
            else:
                kept.add(labels)
            counter = counter.labels(*labels)
        counter.inc(delta)

    def refresh(self, st, now: float) -> None:
        """Copy the state's figures into the series (called from the tick loop about once a second)."""
        self.epoch.set(st.epoch)
        self.workers_alive.set(sum(st.alive(w, now) for w in st.workers.values()))
        self.workers_expected.set(st.topo.num_gpus if st.topo else 0)
        self._count("reports", st.counters.reports_received, self.reports)
        for reason, n in st.counters.drop_reasons.items():
            self._count(f"drop:{reason}", n, self.dropped, "eplbd_reports_dropped_total", (reason,))
        for (message, reason), n in st.counters.refused.items():
            self._count(f"refused:{message}:{reason}", n, self.refused, "eplbd_worker_messages_refused_total",
                        (message, reason))
        for outcome, n in st.counters.plans.items():
            self._count(f"plan:{outcome}", n, self.plans, "eplbd_plans_total", (outcome,))
        for cause, n in st.counters.aborts.items():
            self._count(f"abort:{cause}", n, self.aborted, "eplbd_plans_aborted_total", (cause,))
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
