"""Soak: 64 simulated ranks stream DeepSeek-V3-shaped load into a real ``eplbd serve`` for minutes
while an operator queries and rebalances; checks that nothing is lost, memory stays flat and RPC
latency stays bounded.

Shape: 58 layers x 256 logical experts -> 320 physical slots (5 per rank; DSV3's usual 288 does not
divide by 64 ranks: ``--ranks 32 --physical 288`` runs that one). Each report is int32
``[--batch, 58, P]`` (8 steps, 594 kB at P = 320).

Load: per-layer expert weights from gpt-oss-20b's measured expert frequencies, built exactly as
``bench_policy.py`` builds them (8 random (domain, layer) rows of 32 experts per DSV3 layer; a seeded
Zipf-like skew without the shared data; the output says which). ``PHASES`` such weight sets (seeds
0..3) are cycled every ``--drift`` seconds, so the hot experts move and rebalances have work to do.
Each rank-step routes 2048 tokens (multinomial), split over the replicas of the placement the
rank runs at that moment.

Ranks: ``--procs`` processes drive the ranks. In each, a sending thread reports for every rank
every ``--batch`` steps, paced at ``--rate`` global steps/s, on the rank's own PUSH socket (as a
``LoadReporter`` does), and a protocol thread runs one ``WorkerLink`` per rank (as a
``PlacementAgent`` does, minus the weights): register, heartbeat at the interval the daemon asks
for, and on ``Plan`` announce ``--stage-chunk`` staged layers at a time (``LayerReady``, in plan
order), on ``Commit`` apply the permitted layers and ``Ack``; while only the first n layers are
applied the rank reports ``(plan epoch, layers_applied=n)``, then the new epoch. On ``Abort`` it
keeps the permitted layers (``keep_layers``) or drops the plan. So a daemon that stalls delays
the protocol, never the reports.

Operator (this process): ``status`` and ``balancedness`` every ``--query-interval`` s, ``rebalance``
every ``--rebalance-every`` s; latencies per minute. A thread samples the daemon's VmRSS
(/proc/<pid>/status) and CPU every ``--sample-interval`` s.

End: the senders stop; once every report sent is counted and no plan is in flight:

- accounting, exactly: sent = received, local drops = the daemon's ``seq_gap``, attempts = received +
  seq_gap + trailing local drops, ``/metrics`` counters = ``status``'s; drops after receipt other
  than ``unknown_epoch`` (a report outliving two commits) are failures;
- plans: every pushed plan ended committed or aborted; the daemon's epoch = plans committed; every
  rank ends on the daemon's epoch and placement;
- memory: RSS growth over the second half (least-squares slope x its length) <= ``--max-rss-growth-mb``;
- the daemon logged no traceback and exits 0 on SIGTERM.

Exit 1 (reasons printed) if a check fails.

    .venv/bin/python benchmarks/bench_soak.py [--duration 300] [--rate 50] [--rebalance-every 20] [--json]
"""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing as mp
import os
import platform
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter

from daemon_bench import (LAYERS, LOGICAL, TOKENS_PER_RANK_STEP, Children, SendCounter, child_get, emit, pcts,
                          proc_cpu_s, proc_rss_gb, reconcile, rejected_after_receipt, spread_over_replicas,
                          start_daemon)

PHASES = 4  # distinct load skews, cycled every --drift seconds
VARIANTS = 4  # multinomial draws per skew, cycled over ranks and reports (no RNG in the hot loop)
ALLOWED_REJECTIONS = ("unknown_epoch",)  # received-then-refused reasons a correct run may show
RPC_OPS = ("status", "balancedness", "rebalance")


def placement_digest(phy2log) -> str:
    return hashlib.sha1(phy2log.contiguous().numpy().tobytes()).hexdigest()[:12]


# -- simulated ranks (child processes) -------------------------------------------------------
class Loads:
    """Per-process load tensors: logical draws per skew phase, physical tensors per placement."""

    def __init__(self, batch: int, physical: int) -> None:
        import numpy as np

        from bench_policy import load_weights

        rng = np.random.default_rng(1)
        self.logical = []  # [phase][variant] -> [batch, LAYERS, LOGICAL] int64
        for phase in range(PHASES):
            weight, self.source = load_weights(seed=phase)
            p = weight.double().numpy()
            p /= p.sum(axis=1, keepdims=True)
            draws = []
            for _ in range(VARIANTS):
                x = np.empty((batch, LAYERS, LOGICAL), np.int64)
                for layer in range(LAYERS):
                    x[:, layer] = rng.multinomial(TOKENS_PER_RANK_STEP, p[layer], size=batch)
                draws.append(x)
            self.logical.append(draws)
        self.physical = physical
        self._cache: dict = {}  # (placement key, phase) -> [VARIANTS] int32 tensors

    def get(self, key, placement, phase: int, variant: int):
        """Load of ``variant`` in ``phase`` as the ranks running ``placement()`` (named ``key``) see it."""
        import torch

        hit = self._cache.get((key, phase))
        if hit is None:
            if len(self._cache) >= 16:
                self._cache.pop(next(iter(self._cache)))
            p = placement().numpy()
            hit = self._cache[(key, phase)] = [torch.from_numpy(spread_over_replicas(x, p))
                                               for x in self.logical[phase]]
        return hit[variant]


class SimRank:
    """One rank's side of the plan protocol (what ``PlacementAgent`` does, without weights).

    ``service`` runs on a protocol thread (requests block on the daemon), ``tag`` on the thread
    that sends reports, as in an engine rank; a lock keeps the two consistent, and no request
    is made while it is held.

    Args:
        link: a registered ``WorkerLink``.
        phy2log: ``[layers, P]`` int64, the placement it starts on (epoch 0).
        chunk: layers announced ready per ``service`` call.
        heartbeat_s: seconds between heartbeats.
    """

    def __init__(self, link, phy2log, chunk: int, heartbeat_s: float) -> None:
        self.link, self.chunk, self.heartbeat_s = link, chunk, heartbeat_s
        self.lock = threading.Lock()
        self.epoch, self.base = 0, phy2log
        self.plan = None
        self.layers: list[int] = []  # the plan's layers in order (truncated by an Abort with keep_layers)
        self.rows: dict[int, object] = {}  # layer -> new phy2log row
        self.staged = self.applied = 0  # plan layers announced ready / applied (a prefix of self.layers)
        self.permitted: set[int] = set()
        self.last_hb = time.monotonic()
        self.counts = Counter()
        self.errors = Counter()

    def _request(self, fn, *args) -> bool:
        from eplbd.errors import EplbdError

        try:
            fn(*args)
            return True
        except EplbdError as exc:
            self.errors[f"{fn.__name__}:{type(exc).__name__}"] += 1
            return False

    def service(self, now: float, step: int) -> None:
        """Handle pushed messages, stage the next chunk, apply what is permitted and ack, heartbeat."""
        while (msg := self.link.poll_pushed(0)) is not None:
            with self.lock:
                refuse = self._on_push(msg)
            if refuse:
                self._request(self.link.abort, *refuse)
        with self.lock:
            plan = self.plan
            part = self.layers[self.staged:self.staged + self.chunk] if plan is not None else []
        if part and self._request(self.link.layer_ready, plan.plan_id, plan.epoch, part):
            with self.lock:
                if self.plan is plan:
                    self.staged += len(part)
        with self.lock:
            ack = self._apply() if self.plan is not None else None
        if ack:
            self._request(self.link.ack, *ack, step)
        if now - self.last_hb >= self.heartbeat_s:
            self.last_hb = now
            self._request(self.link.heartbeat, step, self.epoch)

    def _on_push(self, msg) -> tuple | None:
        """Update the state for a pushed message; returns abort arguments for a plan refused."""
        from eplbd.proto import Abort, Commit, Plan

        if isinstance(msg, Plan):
            return self._on_plan(msg)
        if isinstance(msg, Commit) and self._is_current(msg):
            self.counts["commits"] += 1
            self.permitted.update(msg.layers)
        elif isinstance(msg, Abort) and self._is_current(msg):
            self._on_abort(msg)
        return None

    def _on_plan(self, msg) -> tuple | None:
        self.counts["plans"] += 1
        if self.plan is not None:
            self.errors["plan_while_another_in_flight"] += 1
        if msg.base_epoch != self.epoch:
            self.errors["plan_on_another_base_epoch"] += 1
            return msg.plan_id, msg.epoch, f"rank runs epoch {self.epoch}"
        self.plan, self.layers = msg, list(msg.layers)
        self.rows = {layer: msg.phy2log[i] for i, layer in enumerate(msg.layers)}
        self.staged = self.applied = 0
        self.permitted = set()
        return None

    def _is_current(self, msg) -> bool:
        if self.plan is not None and msg.plan_id == self.plan.plan_id and msg.epoch == self.plan.epoch:
            return True
        self.errors[f"stray_{type(msg).__name__.lower()}"] += 1
        return False

    def _on_abort(self, msg) -> None:
        self.counts["aborts"] += 1
        if not msg.keep_layers:
            if self.applied:
                self.errors["abort_took_back_applied_layers"] += 1
            self.plan = None
            return
        keep = set(msg.keep_layers)
        self.layers = [layer for layer in self.layers if layer in keep]
        self.permitted |= keep
        if self.applied >= len(self.layers):
            self._finish()

    def _apply(self) -> tuple | None:
        """Apply the permitted prefix (the rank's next step runs it); returns ack arguments."""
        n = self.applied
        while n < len(self.layers) and self.layers[n] in self.permitted:
            n += 1
        if n == self.applied:
            return None
        plan, newly, self.applied = self.plan, self.layers[self.applied:n], n
        if n == len(self.layers):
            self._finish()
        return plan.plan_id, plan.epoch, newly

    def _placement(self, n: int):
        """A function building the placement with the first ``n`` plan layers applied (a snapshot:
        it stays right whatever the protocol thread does next)."""
        base, layers, rows = self.base, self.layers[:n], self.rows

        def build():
            out = base.clone()
            for layer in layers:
                out[layer] = rows[layer]
            return out
        return build

    def _finish(self) -> None:
        self.base, self.epoch = self._placement(len(self.layers))(), self.plan.epoch
        self.counts["plans_applied"] += 1
        self.plan = None

    def tag(self):
        """``(epoch, layers_applied, key, placement())`` for the next report."""
        with self.lock:
            if self.plan is None or self.applied == 0:
                base = self.base
                return self.epoch, -1, self.epoch, lambda: base
            n = self.applied
            return self.plan.epoch, n, (self.plan.plan_id, self.plan.epoch, n), self._placement(n)


class ReportPush:
    """A rank's load-report socket, owned by the thread that sends reports (``WorkerLink`` belongs to
    the protocol thread, as a ``LoadReporter`` beside a ``PlacementAgent`` does in an engine rank).

    Args:
        ctx: the process's ZeroMQ context.
        ingest: the daemon's ingest endpoint.
        rank: the rank; ``worker_id`` and ``session``: what it registered with and was given.
        hwm: reports queued before a send is a counted local drop.
    """

    def __init__(self, ctx, ingest: str, rank: int, worker_id: str, session: str, hwm: int) -> None:
        import zmq

        from eplbd.proto import Encoder, make_socket

        self.rank, self.worker_id, self.session = rank, worker_id, session
        self._sock = make_socket(ctx, zmq.PUSH, connect=ingest, hwm=hwm, linger_ms=0)
        self._sock.poll(5000, zmq.POLLOUT)  # connected, so the first reports are not dropped locally
        self._enc, self._seq = Encoder(), 0

    def send(self, first_step: int, load, epoch: int, layers_applied: int) -> bool:
        """Send without blocking; False if the queue to the daemon is full (the seq still advances,
        so the daemon counts the gap)."""
        import zmq

        from eplbd.proto import LoadReport

        msg = LoadReport(rank=self.rank, worker_id=self.worker_id, epoch=epoch, first_step=first_step,
                         seq=self._seq, load=load, layers_applied=layers_applied, session=self.session)
        self._seq += 1
        try:
            self._sock.send_multipart(self._enc.encode(msg), copy=False, flags=zmq.NOBLOCK)
        except zmq.Again:
            return False
        return True

    def close(self) -> None:
        self._sock.close(linger=0)


def protocol_loop(sims: dict, step: list, stop_ev, interval: float = 0.01) -> None:
    """The ranks' agent thread: service every rank until ``stop_ev``; ``step[0]`` is the engine's step."""
    while not stop_ev.wait(interval):
        for sim in sims.values():
            sim.service(time.monotonic(), step[0])


def ranks_main(ranks: list[int], cfg: dict, rpc: str, ingest: str, q, go, stop, exit_ev) -> None:
    """One process driving ``ranks``: register, then report (this thread) and follow plans (a
    protocol thread) until ``stop``; follow plans without reporting until ``exit_ev``, then say
    where every rank ended."""
    import torch
    import zmq

    from eplbd.client.worker import WorkerLink
    from eplbd.policy import initial_placement

    torch.set_num_threads(1)
    try:
        B, period = cfg["batch"], cfg["batch"] / cfg["rate"]
        loads = Loads(B, cfg["physical"])
        phy2log = initial_placement(LAYERS, LOGICAL, cfg["physical"], cfg["ranks"])
        ctx = zmq.Context()
        sims, pushes = {}, {}
        for r in ranks:
            link = WorkerLink(rpc, ingest, r, timeout=cfg["rpc_timeout"], report_hwm=cfg["hwm"], ctx=ctx)
            reg = link.register(ep_size=cfg["ranks"], num_layers=LAYERS, num_logical=LOGICAL,
                                num_physical=cfg["physical"], epoch=0, phy2log=phy2log, expert_bytes=44 << 20)
            sims[r] = SimRank(link, phy2log, cfg["stage_chunk"], reg.heartbeat_interval_s or 2.5)
            pushes[r] = ReportPush(ctx, ingest, r, link.worker_id, link.session, cfg["hwm"])
        q.put(("ready", {"pid": os.getpid(), "load_source": loads.source}))
        go.wait()
        step, proto_stop = [0], threading.Event()
        proto = threading.Thread(target=protocol_loop, args=(sims, step, proto_stop), daemon=True)
        proto.start()
        counter = SendCounter(ranks)
        it = slips = 0
        cpu0, t0 = time.process_time(), time.monotonic()
        t_next = t0
        while not stop.is_set():
            now = time.monotonic()
            if t_next > now:
                time.sleep(t_next - now)
            elif now - t_next > 2 * period:  # starved: an engine does not make up for lost steps
                slips += 1
                t_next = now
            t_next += period
            step[0] = it * B
            phase = int((time.monotonic() - t0) / cfg["drift"]) % PHASES
            for r, sim in sims.items():
                epoch, applied, key, placement = sim.tag()
                load = loads.get(key, placement, phase, (it + r) % VARIANTS)
                counter.record(r, pushes[r].send(step[0], load, epoch, applied))
            it += 1
        q.put(("done", {**counter.as_dict(), "iterations": it, "schedule_slips": slips,
                        "t_go": t0, "t_end": time.monotonic(), "cpu_s": time.process_time() - cpu0}))
        exit_ev.wait()  # a plan still in flight finishes on the protocol thread; reports have stopped
        proto_stop.set()
        proto.join(60)
        counts, errors = Counter(), Counter()
        for s in sims.values():
            counts.update(s.counts)
            errors.update(s.errors)
        q.put(("final", {"ranks": {r: {"epoch": s.epoch, "placement": placement_digest(s.base),
                                       "plan_in_flight": s.plan is not None} for r, s in sims.items()},
                         "counts": dict(counts), "errors": dict(errors)}))
        for r, sim in sims.items():
            sim.link.close()
            pushes[r].close()
        ctx.term()
    except BaseException as exc:  # surfaced by the parent
        import traceback
        q.put(("error", f"ranks {ranks[0]}..{ranks[-1]}: {exc!r}\n{traceback.format_exc()}"))


# -- daemon sampling and the operator loop (this process) ------------------------------------
class Sampler:
    """A thread recording ``(t since go, VmRSS MB, daemon CPU s)`` every ``interval`` seconds."""

    def __init__(self, pid: int, t_go: float, interval: float) -> None:
        self.pid, self.t_go, self.interval = pid, t_go, interval
        self.samples: list[tuple[float, float, float]] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while True:
            try:
                cpu = proc_cpu_s(self.pid)
            except OSError:
                return
            self.samples.append((time.monotonic() - self.t_go, proc_rss_gb(self.pid) * 1024, cpu))
            if self._stop.wait(self.interval):
                return

    def close(self) -> None:
        self._stop.set()
        self._t.join(5)


class Operator:
    """The operator loop: queries and rebalances, each call timed."""

    def __init__(self, client, t_go: float) -> None:
        self.client, self.t_go = client, t_go
        self.calls: list[tuple[float, str, float]] = []  # (t since go, op, seconds) of answered calls
        self.errors = Counter()
        self.received: list[tuple[float, int]] = []  # (t since go, reports_received) from status
        self.balance: list[tuple[float, float]] = []  # (t since go, observed aggregate balancedness)
        self.pushed: list[dict] = []
        self.skipped = Counter()

    def _timed(self, op: str, fn):
        from eplbd.errors import EplbdError

        t = time.perf_counter()
        try:
            reply = fn()
        except EplbdError as exc:
            self.errors[f"{op}:{type(exc).__name__}"] += 1
            return None
        self.calls.append((time.monotonic() - self.t_go, op, time.perf_counter() - t))
        return reply

    def query(self) -> None:
        st = self._timed("status", self.client.status)
        if st is not None:
            self.received.append((time.monotonic() - self.t_go, st.reports_received))
        b = self._timed("balancedness", self.client.balancedness)
        if b is not None:
            self.balance.append((time.monotonic() - self.t_go, b.observed.aggregate))

    def rebalance(self) -> None:
        rep = self._timed("rebalance", self.client.rebalance)
        if rep is None:
            return
        if rep.pushed:
            self.pushed.append({"plan_id": rep.plan_id, "epoch": rep.epoch, "layers": len(rep.layers),
                                "moved_slots": rep.moved_slots, "predicted_before": rep.predicted_before,
                                "predicted_after": rep.predicted_after})
        else:
            self.skipped[re.sub(r"[-+]?\d[\d.]*", "#", rep.reason)] += 1

    def run(self, args, check) -> None:
        """Until ``args.duration`` after go; ``check()`` raises if a child or the daemon failed."""
        next_q, next_rb, end = self.t_go, self.t_go + args.rebalance_every, self.t_go + args.duration
        while (now := time.monotonic()) < end:
            if now >= next_rb:
                next_rb += args.rebalance_every
                self.rebalance()
            if now >= next_q:
                next_q = max(next_q + args.query_interval, now)
                self.query()
            check()
            time.sleep(max(0.0, min(next_q, next_rb, end) - time.monotonic()))


# -- analysis ----------------------------------------------------------------------------------
def rss_analysis(samples: list, duration: float) -> dict:
    """First/last/max RSS while streaming and the least-squares slope over the second half."""
    import numpy as np

    run = [(t, m) for t, m, _ in samples if 0 <= t <= duration]
    if not run:
        return {}
    half = [(t, m) for t, m in run if t >= duration / 2]
    out = {"samples": len(run), "first_mb": run[0][1], "last_mb": run[-1][1], "max_mb": max(m for _, m in run),
           "max_mb_incl_drain": max(m for _, m, _ in samples)}
    if len(half) >= 3:
        t, m = np.array(half).T
        slope = float(np.polyfit(t / 60, m, 1)[0])
        out.update(second_half_slope_mb_per_min=slope,
                   second_half_growth_mb=slope * (t[-1] - t[0]) / 60,
                   second_half_raw_delta_mb=float(m[-1] - m[0]))
    return out


def rss_steps(samples: list, op_calls: list, most: int = 3, min_mb: float = 16.0) -> list[dict]:
    """The largest RSS rises between consecutive samples, each with the rebalance RPCs that ran
    during it or up to 2 s before (a daemon busy in a rebalance does not read its ingest socket)."""
    rises = sorted(((b[1] - a[1], a[0], b[0]) for a, b in zip(samples, samples[1:]) if b[1] - a[1] >= min_mb),
                   reverse=True)[:most]
    out = []
    for delta, t0, t1 in sorted(rises, key=lambda x: x[1]):
        near = [(round(t - s, 1), round(s, 2)) for t, op, s in op_calls
                if op == "rebalance" and t >= t0 - 2 and t - s <= t1]
        out.append({"from_s": round(t0, 1), "to_s": round(t1, 1), "rise_mb": round(delta, 1),
                    "rebalances_started_at_s_and_took_s": near})
    return out


def per_minute(op_calls: list, samples: list, received: list, balance: list, duration: float) -> list[dict]:
    """RPC latency percentiles, RSS, daemon CPU, ingest rate and balancedness for each minute."""
    rows = []
    for minute in range(max(1, int(-(-duration // 60)))):
        lo, hi = minute * 60, min((minute + 1) * 60, duration)
        row = {"minute": minute, "from_s": lo, "to_s": hi}
        for op in RPC_OPS:
            row[op] = pcts([s for t, o, s in op_calls if o == op and lo <= t < hi])
        win = [x for x in samples if lo <= x[0] <= hi]
        if len(win) >= 2:
            row["rss_mb"] = win[-1][1]
            row["daemon_cpu_pct"] = 100 * (win[-1][2] - win[0][2]) / (win[-1][0] - win[0][0])
        rec = [x for x in received if lo <= x[0] < hi]
        if len(rec) >= 2 and rec[-1][0] > rec[0][0]:
            row["reports_per_s"] = (rec[-1][1] - rec[0][1]) / (rec[-1][0] - rec[0][0])
        bal = sorted(b for t, b in balance if lo <= t < hi)
        if bal:
            row["balancedness_p50"] = bal[len(bal) // 2]
        rows.append(row)
    return rows


def scrape(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def metric_counts(text: str) -> dict:
    """``eplbd_reports_received_total``, ``..._dropped_total{reason}`` and ``eplbd_plans_total{outcome}``."""
    out = {"received": 0, "dropped": {}, "plans": {}}
    for line in text.splitlines():
        m = re.match(r'(eplbd_\w+?)(?:\{(\w+)="([^"]*)"\})?\s+(\S+)$', line)
        if not m:
            continue
        name, _, label, value = m.groups()
        v = int(float(value))
        if name == "eplbd_reports_received_total":
            out["received"] = v
        elif name == "eplbd_reports_dropped_total" and v:
            out["dropped"][label] = v
        elif name == "eplbd_plans_total" and v:
            out["plans"][label] = v
    return out


# -- the run -------------------------------------------------------------------------------------
def wait_until(cond, timeout: float, interval: float = 0.1) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(interval)
    return cond()


def run(args, kids: Children, log_path: str) -> dict:
    from eplbd.client.rpc import EplbClient

    flags = ["--metrics-port", "0", "--window-size", str(args.window_size), "--plan-timeout-s",
             str(args.plan_timeout), "--step-interval", str(args.step_interval or 10 ** 9)]
    proc, kv, cmd = start_daemon(kids, log_path, flags)
    mpctx = mp.get_context("spawn")
    go, stop, exit_ev = mpctx.Event(), mpctx.Event(), mpctx.Event()
    cfg = {k: getattr(args, k) for k in ("batch", "rate", "physical", "ranks", "hwm", "stage_chunk", "drift",
                                         "rpc_timeout")}
    groups = [list(range(args.ranks))[i::args.procs] for i in range(args.procs)]
    queues = [mpctx.Queue() for _ in groups]
    senders = [kids.add(mpctx.Process(target=ranks_main, args=(g, cfg, kv["rpc"], kv["ingest"], q, go, stop,
                                                                exit_ev), daemon=True))
               for g, q in zip(groups, queues)]
    for p in senders:
        p.start()
    infos = [child_get(q, "ready", 300) for q in queues]  # includes registering every rank
    client = EplbClient(kv["rpc"], timeout=args.rpc_timeout)
    st0 = client.status()
    if st0.ep_size != args.ranks or len(st0.workers) != args.ranks:
        raise RuntimeError(f"expected {args.ranks} registered ranks, status has ep_size {st0.ep_size} and "
                           f"{len(st0.workers)} workers")
    base_recv, base_drop = st0.reports_received, st0.reports_dropped
    scpu0 = sum(proc_cpu_s(i["pid"]) for i in infos)
    t_go = time.monotonic()
    sampler = Sampler(proc.pid, t_go, args.sample_interval)
    go.set()

    def check() -> None:
        for q in queues:
            try:
                kind, payload = q.get_nowait()
            except queue.Empty:
                continue
            raise RuntimeError(payload if kind == "error" else f"unexpected {kind!r} from a sender")
        if proc.poll() is not None:
            raise RuntimeError(f"daemon exited with {proc.returncode} during the run; log: {log_path}")

    op = Operator(client, t_go)
    op.run(args, check)
    stop.set()
    sent_parts = [child_get(q, "done", 120) for q in queues]
    sent = {k: sum(p[k] for p in sent_parts) for k in sent_parts[0] if k not in ("t_go", "t_end")}
    scpu = sum(proc_cpu_s(i["pid"]) for i in infos) - scpu0
    t_sent = time.monotonic() - t_go
    drained = wait_until(lambda: client.status().reports_received - base_recv >= sent["sent_ok"], args.drain_timeout)
    t_drained = time.monotonic() - t_go

    def settled() -> bool:
        cp = client.status().current_plan
        return cp is None or cp.state not in ("pending", "committing")

    plans_settled = wait_until(settled, args.plan_timeout + 15)
    time.sleep(1.5)  # anything late shows as a mismatch; metrics refresh once a second
    st = client.status()
    sampler.close()
    metrics = metric_counts(scrape(int(kv["metrics_port"]), "/metrics")[1])
    health = scrape(int(kv["metrics_port"]), "/healthz")
    plans = []
    for p in op.pushed:
        info = client.get_plan(plan_id=p["plan_id"])
        plans.append({**p, "state": info.state, "reason": info.reason, "final_layers": len(info.layers),
                      "commit_s": info.timings.get("committed")})
    placement = client.get_placement()
    exit_ev.set()
    finals = [child_get(q, "final", 60) for q in queues]
    for p in senders:
        p.join(30)
    client.close()
    dcpu_total = proc_cpu_s(proc.pid)
    proc.send_signal(signal.SIGTERM)
    try:
        rc = proc.wait(30)
    except subprocess.TimeoutExpired:
        rc = None

    received, dropped = st.reports_received - base_recv, st.reports_dropped - base_drop
    reasons = dict(st.drop_reasons)
    rec = reconcile(sent, received, reasons)
    rec["/metrics received == status received"] = {"lhs": metrics["received"], "rhs": st.reports_received,
                                                   "ok": metrics["received"] == st.reports_received}
    rec["/metrics drops by reason == status drops"] = {"lhs": metrics["dropped"], "rhs": reasons,
                                                       "ok": metrics["dropped"] == reasons}
    ranks_final = {int(r): v for f in finals for r, v in f["ranks"].items()}
    counts, rank_errors = Counter(), Counter()
    for f in finals:
        counts.update(f["counts"])
        rank_errors.update(f["errors"])
    samples = sampler.samples
    streaming = [x for x in samples if x[0] <= args.duration]
    cpu_s = streaming[-1][2] - streaming[0][2] if len(streaming) > 1 else None
    with open(log_path, errors="replace") as f:
        log_text = f.read()
    return {
        "cmd": " ".join(cmd[1:]), "load_source": infos[0]["load_source"], "exit_code": rc,
        "sent": sent, "sender_cpu_s": scpu, "sent_for_s": t_sent, "drained": drained, "drain_s": t_drained - t_sent,
        "received": received, "dropped": dropped, "drop_reasons": reasons,
        "rejected_after_receipt": rejected_after_receipt(reasons), "reconciliation": rec,
        "metrics_plans": metrics["plans"], "healthz": health[0], "healthz_body": health[1].strip()[:200],
        "plans_settled": plans_settled, "plans": plans, "rebalance_skipped": dict(op.skipped),
        "daemon_epoch": st.epoch, "placement_epoch": placement.epoch, "placement": placement_digest(placement.phy2log),
        "ranks_final": ranks_final, "rank_protocol": dict(counts), "rank_errors": dict(rank_errors),
        "rpc_errors": dict(op.errors),
        "rpc": {o: pcts([s for _, x, s in op.calls if x == o]) for o in RPC_OPS},
        "per_minute": per_minute(op.calls, samples, op.received, op.balance, args.duration),
        "rss": rss_analysis(samples, args.duration) if samples else {},
        "rss_steps": rss_steps(samples, op.calls),
        "rss_samples": [(round(t, 2), round(m, 1)) for t, m, _ in samples],
        "daemon_cpu_s": cpu_s, "daemon_cpu_over_s": streaming[-1][0] if streaming else None,
        "daemon_cpu_pct": 100 * cpu_s / streaming[-1][0] if cpu_s is not None else None,
        "daemon_cpu_total_s": dcpu_total, "window_newest_step": st.step, "window_fill": st.window_fill,
        "log": log_path, "log_tracebacks": log_text.count("Traceback"),
    }


def problems_of(d: dict, args) -> list[str]:
    out = [f"accounting: {k}: {v['lhs']} vs {v['rhs']}" for k, v in d["reconciliation"].items() if not v["ok"]]
    bad = {k: v for k, v in d["rejected_after_receipt"].items() if k not in ALLOWED_REJECTIONS}
    if bad:
        out.append(f"reports refused after receipt for reasons a correct run never has: {bad}")
    if not d["drained"]:
        out.append(f"daemon did not count every sent report within --drain-timeout {args.drain_timeout:g}s")
    if not d["plans_settled"]:
        out.append("a plan was still in flight at the end")
    unsettled = [p["plan_id"] for p in d["plans"] if p["state"] not in ("committed", "aborted")]
    if unsettled:
        out.append(f"plans neither committed nor aborted: {unsettled}")
    committed = sum(p["state"] == "committed" for p in d["plans"])
    if d["daemon_epoch"] != committed:
        out.append(f"daemon epoch {d['daemon_epoch']} != {committed} plans committed")
    off = {r: v for r, v in d["ranks_final"].items()
           if v["epoch"] != d["daemon_epoch"] or v["placement"] != d["placement"] or v["plan_in_flight"]}
    if off:
        out.append(f"{len(off)} rank(s) not on the daemon's epoch {d['daemon_epoch']} / placement "
                   f"{d['placement']}: {dict(list(off.items())[:4])}")
    if d["rank_errors"]:
        out.append(f"rank-side protocol errors: {d['rank_errors']}")
    growth = d["rss"].get("second_half_growth_mb")
    if growth is not None and growth > args.max_rss_growth_mb:
        fill_s = args.window_size * 1.0 / args.rate
        out.append(f"daemon RSS grew {growth:.1f} MB over the second half ({d['rss']['second_half_slope_mb_per_min']:.2f}"
                   f" MB/min), more than --max-rss-growth-mb {args.max_rss_growth_mb:g}"
                   + (f" (the second half starts before the load window is full at ~{fill_s:.0f} s: run longer)"
                      if args.duration / 2 < fill_s else ""))
    if args.max_rpc_p99_ms:
        for row in d["per_minute"]:
            for o in RPC_OPS:
                if row[o].get("p99_ms", 0) > args.max_rpc_p99_ms:
                    out.append(f"minute {row['minute']}: {o} p99 {row[o]['p99_ms']:.1f} ms > --max-rpc-p99-ms")
    if d["log_tracebacks"]:
        out.append(f"daemon log has {d['log_tracebacks']} traceback(s)")
    if d["healthz"] != 200:
        out.append(f"/healthz answered {d['healthz']} at the end: {d['healthz_body']!r}")
    if d["exit_code"] != 0:
        out.append(f"daemon exit code {d['exit_code']} after SIGTERM")
    return out


def _ms(p: dict) -> str:
    return f"{p['count']:>5} {p['p50_ms']:>7.2f} {p['p99_ms']:>7.1f} {p['max_ms']:>7.1f}" if p["count"] else \
        f"{0:>5} {'-':>7} {'-':>7} {'-':>7}"


def _table(out: dict) -> None:
    e, d, a = out["env"], out["soak"], out["args"]
    print(f"env: python {e['python']}, torch {e['torch']}, pyzmq {e['pyzmq']}, {e['cores']} cores, "
          f"load avg at start {e['loadavg_start']:.2f}, at end {e['loadavg_end']:.2f}")
    print(f"daemon: {d['cmd']}")
    print(f"ranks: {a['ranks']} in {a['procs']} processes, {LAYERS}x{LOGICAL}->{a['physical']}, reports int32 "
          f"[{a['batch']}, {LAYERS}, {a['physical']}] at {a['rate']:g} global steps/s for {a['duration']:g} s; "
          f"skew changes every {a['drift']:g} s; rebalance every {a['rebalance_every']:g} s")
    print(f"load: {d['load_source']}")
    s = d["sent"]
    print(f"\naccounting: attempts {s['attempts']}, sent {s['sent_ok']}, locally dropped {s['local_dropped']} "
          f"({s['trailing_local_dropped']} after a rank's last sent report), schedule slips {s['schedule_slips']}; "
          f"daemon received {d['received']}, dropped {d['dropped']} {d['drop_reasons']} "
          f"(refused after receipt: {d['rejected_after_receipt'] or 'none'}); drained {d['drain_s']:.1f} s after "
          f"the senders stopped")
    for k, v in d["reconciliation"].items():
        print(f"  {'ok  ' if v['ok'] else 'FAIL'} {k}: {v['lhs']} vs {v['rhs']}")
    states = Counter(p["state"] for p in d["plans"])
    commit = sorted(p["commit_s"] for p in d["plans"] if p["commit_s"] is not None)
    print(f"\nplans: {len(d['plans'])} pushed by rebalance, {states.get('committed', 0)} committed, "
          f"{states.get('aborted', 0)} aborted; skipped: {d['rebalance_skipped'] or 'none'}; /metrics plans_total "
          f"{d['metrics_plans']}")
    if commit:
        print(f"  push -> committed: p50 {commit[len(commit) // 2]:.2f} s, max {commit[-1]:.2f} s; daemon epoch "
              f"{d['daemon_epoch']}; all {len(d['ranks_final'])} ranks on placement {d['placement']}: "
              f"{all(v['placement'] == d['placement'] for v in d['ranks_final'].values())}")
    for p in d["plans"]:
        print(f"  plan {p['plan_id']:>3} epoch {p['epoch']:>3}: {p['state']:<9} {p['final_layers']:>2} layers, "
              f"{p['moved_slots']:>5} slots moved, predicted {p['predicted_before']:.3f} -> "
              f"{p['predicted_after']:.3f}" + (f", committed after {p['commit_s']:.2f} s" if p["commit_s"] else ""))
    r = d["rss"]
    if r:
        print(f"\ndaemon RSS: first {r['first_mb']:.0f} MB, last {r['last_mb']:.0f} MB, max {r['max_mb']:.0f} MB "
              f"({r['samples']} samples)"
              + (f"; second half slope {r['second_half_slope_mb_per_min']:+.2f} MB/min (fitted growth "
                 f"{r['second_half_growth_mb']:+.1f} MB, raw {r['second_half_raw_delta_mb']:+.1f} MB)"
                 if "second_half_slope_mb_per_min" in r else ""))
    for st in d["rss_steps"]:
        near = ", ".join(f"started {a:.1f} s, took {b:.2f} s" for a, b in st["rebalances_started_at_s_and_took_s"])
        print(f"  RSS rose {st['rise_mb']:+.0f} MB between {st['from_s']:.0f} s and {st['to_s']:.0f} s; "
              f"rebalance RPC: {near or 'none'}")
    if d["daemon_cpu_s"] is not None:
        print(f"daemon CPU while streaming: {d['daemon_cpu_s']:.1f} s over {d['daemon_cpu_over_s']:.0f} s = "
              f"{d['daemon_cpu_pct']:.0f}% of one core (all {d['daemon_cpu_total_s']:.1f} s incl. start and drain); "
              f"sender processes {d['sender_cpu_s']:.1f} s")
    cols = " ".join(f"{h:>{w}}" for h, w in (("n", 5), ("p50 ms", 7), ("p99 ms", 7), ("max ms", 7)))
    print("\n" + " " * 12 + " | ".join(f"{o:<29}" for o in RPC_OPS) + " | daemon")
    print(f"{'minute':<12}" + " | ".join([cols] * 3) + f" | {'RSS MB':>6} {'CPU%':>5} {'reports/s':>10} "
          f"{'balancedness':>12}")
    for row in d["per_minute"]:
        print(f"{row['from_s']:>4.0f}-{row['to_s']:<4.0f}s  " + " | ".join(_ms(row[o]) for o in RPC_OPS)
              + f" | {row.get('rss_mb', 0):>6.0f} {row.get('daemon_cpu_pct', 0):>5.0f} "
              f"{row.get('reports_per_s', 0):>10.0f} {row.get('balancedness_p50', float('nan')):>12.3f}")
    for o in RPC_OPS:
        p = d["rpc"][o]
        if p["count"]:
            print(f"rpc {o:<13} whole run n={p['count']:<6} p50 {p['p50_ms']:.2f} ms  p99 {p['p99_ms']:.2f} ms  "
                  f"max {p['max_ms']:.2f} ms")
    if d["rpc_errors"]:
        print(f"rpc errors: {d['rpc_errors']}")
    print(f"rank side: {d['rank_protocol']}; errors: {d['rank_errors'] or 'none'}")
    print(f"/healthz at the end: {d['healthz']}; daemon exit code after SIGTERM: {d['exit_code']}; "
          f"tracebacks in log: {d['log_tracebacks']}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=300.0, help="seconds of streaming")
    ap.add_argument("--ranks", type=int, default=64)
    ap.add_argument("--procs", type=int, default=4, help="sender processes (ranks split over them)")
    ap.add_argument("--physical", type=int, default=320, help="physical slots per layer (288 or 320)")
    ap.add_argument("--batch", type=int, default=8, help="steps per report")
    ap.add_argument("--rate", type=float, default=50.0, help="global steps/s (every rank reports every batch/rate s)")
    ap.add_argument("--rebalance-every", type=float, default=20.0, help="seconds between rebalance RPCs")
    ap.add_argument("--query-interval", type=float, default=0.25, help="seconds between status+balancedness")
    ap.add_argument("--drift", type=float, default=60.0, help="seconds per load skew")
    ap.add_argument("--stage-chunk", type=int, default=8, help="layers per LayerReady")
    ap.add_argument("--window-size", type=int, default=1000)
    ap.add_argument("--step-interval", type=int, default=0, help="daemon's own re-plan interval (0: operator only)")
    ap.add_argument("--plan-timeout", type=float, default=60.0)
    ap.add_argument("--hwm", type=int, default=64, help="per-rank PUSH high-water mark")
    ap.add_argument("--rpc-timeout", type=float, default=30.0)
    ap.add_argument("--sample-interval", type=float, default=2.0, help="seconds between RSS/CPU samples")
    ap.add_argument("--max-rss-growth-mb", type=float, default=64.0,
                    help="fail if RSS grows more than this over the second half")
    ap.add_argument("--max-rpc-p99-ms", type=float, default=0.0, help="fail if a minute's p99 exceeds it (0: off)")
    ap.add_argument("--drain-timeout", type=float, default=60.0)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    if args.physical % args.ranks or args.physical < LOGICAL:
        ap.error(f"--physical {args.physical} must be >= {LOGICAL} and divide by --ranks {args.ranks}")
    if not 1 <= args.procs <= args.ranks:
        ap.error(f"--procs {args.procs} must be in 1..{args.ranks}")

    import torch
    import zmq

    say = (lambda *a: print(*a, file=sys.stderr, flush=True)) if args.json else (lambda *a: print(*a, flush=True))
    say(f"soak: {args.ranks} ranks in {args.procs} processes, {args.duration:g} s ...")
    kids = Children()
    log_path = tempfile.mktemp(prefix="eplbd-soak-", suffix=".log")
    out = {"env": {"python": platform.python_version(), "torch": torch.__version__, "pyzmq": zmq.__version__,
                   "cores": os.cpu_count(), "platform": platform.platform(), "loadavg_start": os.getloadavg()[0]},
           "args": {k: v for k, v in vars(args).items() if k != "json"}}
    try:
        out["soak"] = run(args, kids, log_path)
    finally:
        kids.close()
    out["env"]["loadavg_end"] = os.getloadavg()[0]
    out["problems"] = problems_of(out["soak"], args)
    return emit(out, args.json, _table, "FAILED", log_path)


if __name__ == "__main__":
    sys.exit(main())
