"""The agent's CUDA stream ordering (``eplbd.client.streams.StagingStream``).

Each test makes one stream busy with ``torch.cuda._sleep`` (a kernel that spins for a given
number of cycles) so that an ordering mistake shows up as a wrong value or an event that
completed too early, not as a timing difference. Run on a CUDA machine:
``.venv/bin/python -m pytest -m gpu tests/test_staging_gpu.py``.
"""

from __future__ import annotations

import pytest
import torch

from eplbd.client.streams import StagingStream

pytestmark = pytest.mark.gpu

SPIN = 2_000_000_000  # cycles: about a second at GPU clocks, far longer than the copies below


@pytest.fixture(autouse=True)
def _needs_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")


def expert_tensor(value: float) -> torch.Tensor:
    return torch.full((8, 1024, 1024), value, device="cuda")  # 8 slots x 4 MiB


def test_staging_overlaps_a_busy_forward_stream():
    ss = StagingStream(torch.device("cuda"))
    live, staging = expert_tensor(1.0), expert_tensor(0.0)
    torch.cuda.synchronize()
    torch.cuda._sleep(SPIN)  # the "forward pass" on the engine's stream
    forward_done = torch.cuda.Event()
    forward_done.record()
    with ss.staging():
        staging.copy_(live)
        ev = ss.staged()
    ev.synchronize()
    assert not forward_done.query(), "staging waited for the forward stream"
    torch.cuda.synchronize()
    assert torch.equal(staging, live)


def test_apply_waits_for_staging():
    ss = StagingStream(torch.device("cuda"))
    live, staging, source = expert_tensor(1.0), expert_tensor(0.0), expert_tensor(7.0)
    torch.cuda.synchronize()
    with ss.staging():
        torch.cuda._sleep(SPIN)
        staging.copy_(source)
        ev = ss.staged()
    ss.before_apply(ev)
    live.copy_(staging)  # engine stream: must see the staged values, not the zeros
    ss.after_apply()
    torch.cuda.synchronize()
    assert torch.equal(live, source)


def test_staging_buffer_is_not_reused_before_the_apply_read_it():
    ss = StagingStream(torch.device("cuda"))
    live, staging = expert_tensor(1.0), expert_tensor(5.0)
    torch.cuda.synchronize()
    torch.cuda._sleep(SPIN)  # the apply's copy is queued behind a busy engine stream
    live.copy_(staging)
    ss.after_apply()
    with ss.staging():  # the next layer's staging reuses the buffer
        staging.fill_(9.0)
        ss.staged()
    torch.cuda.synchronize()
    assert torch.equal(live, torch.full_like(live, 5.0)), "staging overwrote the buffer before the apply read it"

