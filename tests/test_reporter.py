"""LoadReporter against a real daemon and bare ZMQ receivers on loopback (no mocks)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
import zmq

from daemon_helpers import E, L, P, DaemonThread, make_ranks, skewed_step_load, wait_for
from eplbd.client.reporter import LoadReporter
from eplbd.client.worker import WorkerLink
from eplbd.errors import InvalidArgumentError
from eplbd.policy import initial_placement
from eplbd.proto import Decoder, LoadReport, bound_endpoint, make_socket


# -- helpers ----------------------------------------------------------------------------------
class Receiver:
    """A bare PULL socket standing in for the daemon's ingest; decodes every report it gets."""

    def __init__(self, endpoint: str = "tcp://127.0.0.1:0", *, hwm: int = 1000):
        self.sock = make_socket(zmq.Context.instance(), zmq.PULL, bind=endpoint, hwm=hwm, linger_ms=0)
        self.endpoint = bound_endpoint(self.sock)
        self.dec = Decoder()
        self.reports: list[LoadReport] = []

    def drain(self, timeout: float = 0.0) -> None:
        while self.sock.poll(int(timeout * 1000)):
            msg = self.dec.decode(self.sock.recv_multipart(copy=False))
            assert isinstance(msg, LoadReport)
            self.reports.append(msg)
            timeout = 0.0

    def wait_steps(self, n: int, timeout: float = 5.0) -> bool:
        end = time.monotonic() + timeout
        while self.steps < n and time.monotonic() < end:
            self.drain(0.05)
        return self.steps >= n

    @property
    def steps(self) -> int:
        return sum(r.num_steps for r in self.reports)

    def close(self) -> None:
        self.sock.close(linger=0)


def pattern(step: int, shape=(L, P)) -> torch.Tensor:
    """A load that says which step it belongs to in every entry."""
    rows, cols = shape
    return (torch.arange(rows * cols, dtype=torch.int32).view(rows, cols) % 1000) + step


def assert_reports_carry_their_steps(reports, shape=(L, P)):
    for rep in reports:
        for j in range(rep.num_steps):
            assert torch.equal(rep.load[j], pattern(rep.first_step + j, shape)), (rep.first_step, j)


def reconciled(r: LoadReporter) -> bool:
    return r.steps_recorded == r.steps_sent + r.steps_dropped


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


# -- real daemon ------------------------------------------------------------------------------
@pytest.mark.parametrize("ranks", [2, 4])
def test_loads_from_several_ranks_arrive_exactly(ranks):
    rng = np.random.default_rng(ranks)
    steps = 37  # not a multiple of batch_steps: the tail goes out on close
    with DaemonThread(step_interval=10_000) as d:
        links, phy2log = make_ranks(d, ranks)
        reporters = [LoadReporter(d.ingest, link.rank, num_layers=L, num_physical=P, batch_steps=4,
                                  flush_interval_s=0.02) for link in links]
        for link, rep in zip(links, reporters):
            rep.set_identity(link.worker_id, link.session)
        total = skewed_step_load(rng, phy2log, steps)  # [steps, L, P] int64, the global load
        shares = [total // ranks + (r == 0) * (total % ranks) for r in range(ranks)]
        bufs = [torch.empty(L, P, dtype=torch.int64) for _ in range(ranks)]
        for s in range(steps):
            for r, rep in enumerate(reporters):
                bufs[r].copy_(shares[r][s])
                rep.record(s, bufs[r])
                bufs[r].zero_()  # the engine reuses its buffer at once
        for rep in reporters:
            rep.close(timeout=5)
        for rep in reporters:
            assert rep.steps_recorded == steps and rep.steps_sent == steps and rep.steps_dropped == 0
            assert rep.reports_failed == 0 and rep.reports_sent >= steps // 4
        sent = sum(rep.reports_sent for rep in reporters)
        assert wait_for(lambda: d.state.counters.reports_received == sent)
        assert d.state.counters.reports_dropped == 0, d.state.counters.drop_reasons
        assert d.state.window.fill == steps
        want = np.zeros((L, E), np.int64)
        phys = total.sum(0).numpy()
        for layer in range(L):
            np.add.at(want[layer], phy2log[layer].numpy(), phys[layer])
        np.testing.assert_array_equal(d.state.window.logical_load(), want)
        for link in links:
            link.close()


def test_daemon_absent_at_first_then_registered_counts_reconcile(tmp_path):
    """Steps recorded before the daemon exists are kept (newest max_pending_steps) and sent once the
    rank registers; the daemon's own counters add up to what the rank recorded."""
    rpc, ingest = f"ipc://{tmp_path}/rpc", f"ipc://{tmp_path}/ingest"
    rep = LoadReporter(ingest, 0, num_layers=L, num_physical=P, batch_steps=4, max_pending_steps=32,
                       flush_interval_s=0.02)
    rng = np.random.default_rng(7)
    phy2log = initial_placement(L, E, P, 1)
    loads = skewed_step_load(rng, phy2log, 212).to(torch.int32)
    t0 = time.perf_counter()
    for s in range(200):
        rep.record(s, loads[s])
    assert time.perf_counter() - t0 < 2.0
    assert rep.pending_steps == 32 and rep.steps_dropped == 168 and rep.steps_sent == 0
    with DaemonThread(rpc=rpc, ingest=ingest, step_interval=10_000) as d:
        link = WorkerLink(d.rpc, d.ingest, 0)
        link.register(ep_size=1, num_layers=L, num_logical=E, num_physical=P, epoch=0, phy2log=phy2log)
        rep.set_identity(link.worker_id, link.session)
        assert wait_for(lambda: rep.steps_sent == 32)
        for s in range(200, 212):
            rep.record(s, loads[s])
        rep.close(timeout=5)
        assert rep.steps_recorded == 212 and rep.steps_sent == 44 and rep.steps_dropped == 168
        assert wait_for(lambda: d.state.counters.reports_received == rep.reports_sent)
        assert d.state.window.fill == 44
        assert d.state.counters.drop_reasons == {"sender_overflow_steps": 168}
        kept = loads[168:].to(torch.int64).sum(0).numpy()  # drop-oldest kept steps 168..211
        want = np.zeros((L, E), np.int64)
        for layer in range(L):
            np.add.at(want[layer], phy2log[layer].numpy(), kept[layer])
        np.testing.assert_array_equal(d.state.window.logical_load(), want)
        link.close()


# -- bare receiver: message contents ----------------------------------------------------------
def test_batches_split_at_tag_changes_and_step_gaps():
    rx = Receiver()
    rep = LoadReporter(rx.endpoint, 3, num_layers=L, num_physical=P, batch_steps=4, flush_interval_s=30)
    try:
        plan = ([(s, (0, -1)) for s in range(10)] + [(s, (1, 2)) for s in range(10, 14)]
                + [(s, (1, -1)) for s in range(14, 20)] + [(s, (1, -1)) for s in range(25, 28)])
        for step, tag in plan:
            rep.record(step, pattern(step), tag)
        # Nothing goes out before the agent hands over the registered identity.
        rx.drain(0.1)
        assert rx.reports == [] and rep.pending_steps == len(plan)
        rep.set_identity("rank3-abc")
        rep.flush()  # the trailing partial batches would otherwise wait flush_interval_s (30 s)
        assert rx.wait_steps(len(plan))
        got = [(r.first_step, r.num_steps, r.epoch, r.layers_applied, r.seq) for r in rx.reports]
        assert got == [(0, 4, 0, -1, 0), (4, 4, 0, -1, 1), (8, 2, 0, -1, 2), (10, 4, 1, 2, 3),
                       (14, 4, 1, -1, 4), (18, 2, 1, -1, 5), (25, 3, 1, -1, 6)]
        assert all(r.rank == 3 and r.worker_id == "rank3-abc" and r.dropped_steps == 0 for r in rx.reports)
        assert all(r.load.dtype == torch.int32 for r in rx.reports)
        assert_reports_carry_their_steps(rx.reports)
        # The counters move just after send returns, which may be after the receiver has the report.
        assert wait_for(lambda: rep.reports_sent == 7 and rep.steps_sent == len(plan))
    finally:
        rep.close()
        rx.close()


def test_partial_batch_goes_out_after_idle_interval_and_identity_restarts_seq():
    rx = Receiver()
    rep = LoadReporter(rx.endpoint, 0, num_layers=L, num_physical=P, batch_steps=8, flush_interval_s=0.05)
    try:
        rep.set_identity("rank0-first")
        for s in range(3):
            rep.record(s, pattern(s))
        assert rx.wait_steps(3, timeout=5)  # no flush: the idle timer sends the partial batch
        assert [(r.first_step, r.num_steps, r.seq) for r in rx.reports] == [(0, 3, 0)]
        for s in range(3, 11):  # a full batch goes out at once
            rep.record(s, pattern(s))
        assert rx.wait_steps(11)
        rep.set_identity("rank0-second")  # re-registered: a new incarnation counts seq from 0
        for s in range(11, 13):
            rep.record(s, pattern(s))
        rep.flush()
        assert rx.wait_steps(13)
        got = [(r.worker_id, r.first_step, r.num_steps, r.seq) for r in rx.reports]
        assert got == [("rank0-first", 0, 3, 0), ("rank0-first", 3, 8, 1), ("rank0-second", 11, 2, 0)]
        assert_reports_carry_their_steps(rx.reports)
    finally:
        rep.close()
        rx.close()


def test_caller_reusing_its_buffer_does_not_corrupt_reports():
    rx = Receiver()
    rep = LoadReporter(rx.endpoint, 0, num_layers=L, num_physical=P, batch_steps=5, flush_interval_s=0.02)
    try:
        rep.set_identity("w")
        buf = torch.empty(L, P, dtype=torch.int64)
        strided = torch.empty(P, L, dtype=torch.int16).t()  # a non-contiguous view is fine too
        for s in range(40):
            src = buf if s % 2 else strided
            src.copy_(pattern(s))
            rep.record(s, src)
            src.fill_(-7)  # overwritten right away
        rep.close(timeout=5)
        assert rx.wait_steps(40)
        assert_reports_carry_their_steps(rx.reports)
        assert sorted(r.first_step for r in rx.reports) == list(range(0, 40, 5))
    finally:
        rep.close()
        rx.close()


# -- absent or slow daemon --------------------------------------------------------------------
def test_absent_receiver_never_blocks_bounds_memory_and_reconciles(tmp_path):
    """Nobody binds the endpoint: sends fail (each consumes a seq), the FIFO drops its oldest, record
    stays fast and memory flat. Then a receiver appears and everything adds up."""
    endpoint = f"ipc://{tmp_path}/ingest"
    shape = (58, 320)  # DeepSeek-V3: an unbounded queue of 5000 steps would be 370 MB
    rep = LoadReporter(endpoint, 1, num_layers=shape[0], num_physical=shape[1], batch_steps=8,
                       max_pending_steps=64, flush_interval_s=0.02)
    rx = None
    try:
        rep.set_identity("rank1-x")
        buf = pattern(0, shape)
        rss0 = rss_mb()
        worst = 0.0
        t0 = time.perf_counter()
        for s in range(5000):
            t = time.perf_counter()
            rep.record(s, buf)
            worst = max(worst, time.perf_counter() - t)
            assert rep.pending_steps <= 64
        elapsed = time.perf_counter() - t0
        assert elapsed < 2.0 and worst < 0.2, (elapsed, worst)
        assert rss_mb() - rss0 < 64
        assert rep.steps_dropped >= 5000 - 64 - 8 and rep.steps_sent == 0
        assert wait_for(lambda: rep.reports_failed >= 1, timeout=5)  # the first attempt gave up
        rx = Receiver(endpoint)
        assert wait_for(lambda: rep.pending_steps == 0 and rep.steps_sent > 0, timeout=10)
        for s in range(5000, 5010):
            rep.record(s, pattern(s, shape))
        rep.close(timeout=5)
        assert reconciled(rep)
        assert rx.wait_steps(rep.steps_sent)
        assert rx.steps == rep.steps_sent and len(rx.reports) == rep.reports_sent
        seqs = [r.seq for r in rx.reports]
        assert seqs == sorted(seqs) and seqs[-1] + 1 == rep.reports_sent + rep.reports_failed
        assert seqs[0] >= 1  # the failed attempts consumed theirs: the daemon would count the gap
        assert sum(r.dropped_steps for r in rx.reports) == rep.steps_dropped
        last = [r for r in rx.reports if r.first_step >= 5000]
        assert_reports_carry_their_steps(last, shape)
    finally:
        rep.close()
        if rx is not None:
            rx.close()


def test_slow_receiver_counts_drops_and_reconciles():
    """A receiver that does not read: libzmq and TCP buffers fill, sends fail, the FIFO overflows.
    Once it drains, what was sent arrives intact and recorded == sent + dropped."""
    shape = (58, 320)
    rx = Receiver(hwm=1)
    rep = LoadReporter(rx.endpoint, 0, num_layers=shape[0], num_physical=shape[1], batch_steps=8,
                       max_pending_steps=64, hwm=1, flush_interval_s=0.01)
    stop = threading.Event()
    drainer = None
    try:
        rep.set_identity("rank0-slow")
        buf = torch.empty(shape, dtype=torch.int32)
        t0 = time.perf_counter()
        for s in range(3000):
            buf.copy_(pattern(s, shape))
            rep.record(s, buf)
            buf.zero_()
        assert time.perf_counter() - t0 < 5.0
        assert rep.steps_dropped > 0
        # Left alone, the sender gives up on a report (seq consumed, steps counted as dropped).
        assert wait_for(lambda: rep.reports_failed >= 1, timeout=5)
        def drain():
            while not stop.is_set():
                rx.drain(0.05)

        drainer = threading.Thread(target=drain)
        drainer.start()
        rep.close(timeout=5)
        assert reconciled(rep) and rep.steps_sent > 0
        assert wait_for(lambda: rx.steps == rep.steps_sent, timeout=10)
        stop.set()
        drainer.join(5)
        assert_reports_carry_their_steps(rx.reports, shape)
        steps = [r.first_step + j for r in rx.reports for j in range(r.num_steps)]
        assert steps == sorted(set(steps))  # in order, no duplicates
        seqs = [r.seq for r in rx.reports]
        assert seqs == sorted(seqs) and seqs[-1] + 1 == rep.reports_sent + rep.reports_failed
        assert len(seqs) < seqs[-1] + 1  # gaps where reports failed: what the daemon counts
        assert sum(r.dropped_steps for r in rx.reports) == rep.steps_dropped
    finally:
        stop.set()
        if drainer is not None:
            drainer.join(5)
        rep.close()
        rx.close()


def test_close_is_bounded_and_later_records_are_counted_drops(tmp_path):
    rep = LoadReporter(f"ipc://{tmp_path}/nobody", 0, num_layers=L, num_physical=P, batch_steps=4,
                       flush_interval_s=0.01)
    rep.set_identity("w")
    for s in range(20):
        rep.record(s, pattern(s))
    t0 = time.perf_counter()
    rep.close(timeout=0.3)
    assert time.perf_counter() - t0 < 5.0  # bounded (generous: shared, loaded CI machines)
    assert not rep._thread.is_alive()
    assert rep.steps_sent == 0 and rep.steps_dropped == 20 and reconciled(rep)
    rep.record(20, pattern(20))
    rep.close()  # idempotent
    assert rep.steps_recorded == 21 and rep.steps_dropped == 21
    # Without an identity there is nothing to wait for: close returns at once.
    rep2 = LoadReporter(f"ipc://{tmp_path}/nobody", 0, num_layers=L, num_physical=P)
    rep2.record(0, pattern(0))
    t0 = time.perf_counter()
    rep2.close(timeout=5)
    assert time.perf_counter() - t0 < 3.0 and rep2.steps_dropped == 1  # well under its 5 s timeout


# -- bad input --------------------------------------------------------------------------------
def test_bad_input_raises_typed_errors_naming_the_value(tmp_path):
    with LoadReporter(f"ipc://{tmp_path}/x", 0, num_layers=L, num_physical=P) as rep:
        with pytest.raises(InvalidArgumentError, match=rf"shape \[{L}, {P + 1}\].*\[{L}, {P}\]"):
            rep.record(0, torch.zeros(L, P + 1, dtype=torch.int32))
        with pytest.raises(InvalidArgumentError, match=r"shape \[1, 3, 12\]"):
            rep.record(0, torch.zeros(1, L, P, dtype=torch.int32))
        with pytest.raises(InvalidArgumentError, match="dtype float32"):
            rep.record(0, torch.zeros(L, P))
        with pytest.raises(InvalidArgumentError, match="dtype bool"):
            rep.record(0, torch.zeros(L, P, dtype=torch.bool))
        with pytest.raises(InvalidArgumentError, match="torch.Tensor, got list"):
            rep.record(0, [[0] * P] * L)
        with pytest.raises(InvalidArgumentError, match="step must be >= 0, got -1"):
            rep.record(-1, torch.zeros(L, P, dtype=torch.int32))
        with pytest.raises(InvalidArgumentError, match="step must be an int, got 1.5"):
            rep.record(1.5, torch.zeros(L, P, dtype=torch.int32))
        with pytest.raises(InvalidArgumentError, match=r"tag must be .*got \(1, 2, 3\)"):
            rep.record(0, torch.zeros(L, P, dtype=torch.int32), (1, 2, 3))
        with pytest.raises(InvalidArgumentError, match="worker_id"):
            rep.set_identity("")
        rep.record(np.int64(4), torch.zeros(L, P, dtype=torch.uint8), [np.int32(1), -1])  # index-able: fine
        assert rep.steps_recorded == 1  # the refused calls queued nothing
    for kwargs, match in (({"batch_steps": 0}, "batch_steps must be an int >= 1, got 0"),
                          ({"max_pending_steps": 4, "batch_steps": 8}, "max_pending_steps=4 must be >= batch_steps=8"),
                          ({"flush_interval_s": 0}, "flush_interval_s must be > 0, got 0"),
                          ({"num_layers": -1}, "num_layers must be an int >= 1, got -1")):
        with pytest.raises(InvalidArgumentError, match=match):
            LoadReporter(f"ipc://{tmp_path}/x", 0, **{"num_layers": L, "num_physical": P, **kwargs})
    with pytest.raises(InvalidArgumentError, match="nonsense://x"):
        LoadReporter("nonsense://x", 0, num_layers=L, num_physical=P)
