"""LoadReporter's CUDA path: no host sync on the forward stream, and stream-ordering correctness.

Stream ordering these tests rely on (see the ``eplbd.client.reporter`` docstring):
``record`` queues, on the caller's current stream, a device-to-device snapshot of
``load`` into a staging slot, then on a side stream (waiting on an event recorded
after the snapshot) the device-to-host copy into pinned memory. Hence:

- work queued on the current stream *before* ``record`` (whatever produced the
  load) finishes before the snapshot reads it: the report has those values;
- work queued on the current stream *after* ``record`` (zeroing or refilling the
  buffer) runs after the snapshot, by plain stream order: it cannot leak into the
  report. (A side-stream copy of ``load`` itself, merely waiting on the current
  stream, would *not* guarantee this: once the wait is satisfied the side copy
  and the later write are both runnable and may run in either order.)
- nothing makes the host wait: the sender thread polls a CUDA event.

Run on a CUDA machine: ``.venv/bin/python -m pytest -m gpu tests/test_reporter_gpu.py``.
"""

from __future__ import annotations

import math
import time

import pytest
import torch

from eplbd.client.reporter import LoadReporter
from eplbd.errors import InvalidArgumentError
from test_reporter import Receiver, assert_reports_carry_their_steps, pattern, reconciled

pytestmark = pytest.mark.gpu

SHAPE = (58, 320)  # DeepSeek-V3: 58 MoE layers, 320 physical slots


@pytest.fixture(autouse=True)
def _needs_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")


@pytest.fixture
def rx():
    r = Receiver()
    yield r
    r.close()


def make_reporter(rx: Receiver, **kwargs) -> LoadReporter:
    rep = LoadReporter(rx.endpoint, 0, num_layers=SHAPE[0], num_physical=SHAPE[1],
                       **{"batch_steps": 4, "flush_interval_s": 0.02, **kwargs})
    return rep


def device_patterns(n: int, dtype=torch.int32) -> torch.Tensor:
    """``[n, *SHAPE]`` on the GPU, row s = pattern(s); made (with its host sync) before any timed part."""
    pats = torch.stack([pattern(s, SHAPE) for s in range(n)]).to(dtype).cuda()
    torch.cuda.synchronize()
    return pats


def test_record_under_sync_debug_error_mode_raises_nothing(rx):
    rep = make_reporter(rx)
    try:
        rep.set_identity("gpu0")
        pats = device_patterns(24)
        load = torch.empty(SHAPE, dtype=torch.int32, device="cuda")
        torch.cuda.set_sync_debug_mode("error")
        try:
            # The first call also builds the side stream and staging ring: no sync there either.
            for s in range(24):
                load.copy_(pats[s])
                rep.record(s, load)
                load.zero_()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        rep.close(timeout=10)
        assert reconciled(rep) and rep.steps_sent == 24
        assert rx.wait_steps(24)
        assert_reports_carry_their_steps(rx.reports, SHAPE)
    finally:
        rep.close()


def _matmul_chain_length(a: torch.Tensor, c: torch.Tensor, target_s: float) -> int:
    """How many ``a @ a`` fill about ``target_s`` seconds of GPU time."""
    for _ in range(3):
        torch.mm(a, a, out=c)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        torch.mm(a, a, out=c)
    end.record()
    end.synchronize()
    per = start.elapsed_time(end) / 5 / 1000
    return max(5, min(400, math.ceil(target_s / per)))


def test_record_returns_at_once_while_forward_stream_is_busy_and_reports_record_time_values(rx):
    rep = make_reporter(rx)
    try:
        rep.set_identity("gpu0")
        pats = device_patterns(4)
        load = torch.zeros(SHAPE, dtype=torch.int32, device="cuda")
        rep.record(0, load.copy_(pats[0]))  # warm-up: lazy CUDA setup is not what is timed
        a = torch.randn(8192, 8192, device="cuda")
        c = torch.empty_like(a)
        n = _matmul_chain_length(a, c, 0.3)
        torch.cuda.synchronize()
        cur = torch.cuda.current_stream()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(n):
            torch.mm(a, a, out=c)
        load.copy_(pats[1])  # the "forward pass" writes this step's load after the long chain
        t0 = time.perf_counter()
        rep.record(1, load)
        took = time.perf_counter() - t0
        still_busy = not cur.query()
        load.add_(1000)  # queued after record on the same stream: must not reach the report
        load.copy_(pats[2])
        rep.record(2, load)
        load.zero_()
        end.record()
        torch.cuda.synchronize()
        chain_s = start.elapsed_time(end) / 1000
        assert still_busy, "the chain had finished before record returned: it cannot show the absence of a sync"
        assert took < chain_s / 20, (took, chain_s)
        rep.close(timeout=10)
        assert rx.wait_steps(3)
        assert_reports_carry_their_steps(rx.reports, SHAPE)  # step 1 is pats[1], not pats[1] + 1000
    finally:
        rep.close()


def test_record_on_a_non_default_stream_with_int64_loads_and_immediate_reuse(rx):
    rep = make_reporter(rx, batch_steps=8)
    try:
        rep.set_identity("gpu0")
        pats = device_patterns(50, torch.int64)
        fwd = torch.cuda.Stream()
        load = torch.empty(SHAPE, dtype=torch.int64, device="cuda")
        fwd.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(fwd):  # the engine's forward stream is its own, not the default one
            for s in range(50):  # more steps than staging slots: staging reuse is exercised
                load.copy_(pats[s])
                rep.record(s, load)
                load.fill_(-1)
        fwd.synchronize()
        rep.close(timeout=10)
        assert rep.steps_sent == 50 and reconciled(rep)
        assert rx.wait_steps(50)
        assert all(r.load.dtype == torch.int32 for r in rx.reports)
        assert_reports_carry_their_steps(rx.reports, SHAPE)
    finally:
        rep.close()


def test_full_fifo_drops_oldest_cuda_steps_without_tearing(rx):
    """Before set_identity the FIFO keeps the newest steps; their pinned slots were overwritten by
    copies queued behind each other on the side stream, and what goes out is intact."""
    rep = make_reporter(rx, max_pending_steps=8, batch_steps=4)
    try:
        pats = device_patterns(100)
        load = torch.empty(SHAPE, dtype=torch.int32, device="cuda")
        for s in range(100):
            load.copy_(pats[s])
            rep.record(s, load)
            load.zero_()
        assert rep.steps_dropped == 92 and rep.pending_steps == 8
        rep.set_identity("gpu0")
        rep.close(timeout=10)
        assert rx.wait_steps(8)
        assert [r.first_step for r in rx.reports] == [92, 96]
        assert_reports_carry_their_steps(rx.reports, SHAPE)
    finally:
        rep.close()


def test_one_device_per_reporter(rx):
    rep = make_reporter(rx)
    try:
        rep.record(0, torch.zeros(SHAPE, dtype=torch.int32, device="cuda"))
        with pytest.raises(InvalidArgumentError, match="load is on cpu, but earlier loads were on cuda:0"):
            rep.record(1, torch.zeros(SHAPE, dtype=torch.int32))
    finally:
        rep.close()
