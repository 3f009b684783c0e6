"""Stream ordering between the agent's background staging and the engine's forward stream.

On CUDA the agent stages on its own side stream, so staging copies overlap the forward pass
instead of queueing behind it (a background thread's current stream is otherwise the legacy
default stream, which serialises with every other stream). Three orderings keep it correct:

- staged -> apply: each staged layer records an event on the side stream; the engine stream
  waits on it before copying the staging buffer into the live slots (``before_apply``).
- apply -> reuse: the apply's copies are queued on the engine stream and read the staging
  buffer later; ``after_apply`` records an event, and the next ``staging()`` block waits on it on
  the host before anything (a host-driven NIXL/gloo receive or a side-stream copy) may write a
  staging buffer again. Blocking the agent thread here never blocks the engine.
- Transfers driven from the host (NIXL, gloo) have no stream order of their own, so the same
  host wait covers them.

On CPU every method is a no-op: the agent thread's copies are synchronous.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch


class StagingStream:
    """Args:
        device: the device of the engine's expert weights.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self._applied: torch.cuda.Event | None = None

    @contextlib.contextmanager
    def staging(self) -> Iterator[None]:
        """Agent thread: run the staging of one layer inside; device work goes on the side stream,
        after the last apply finished reading the staging buffers."""
        if self.stream is None:
            yield
            return
        applied = self._applied
        if applied is not None:
            applied.synchronize()
        with torch.cuda.stream(self.stream):
            yield

    def staged(self) -> torch.cuda.Event | None:
        """Agent thread, after a layer's staging: an event the apply must wait on (None on CPU)."""
        if self.stream is None:
            return None
        ev = torch.cuda.Event()
        ev.record(self.stream)
        return ev

    def before_apply(self, staged: torch.cuda.Event | None) -> None:
        """Engine thread: order the engine stream after a layer's staging."""
        if staged is not None:
            torch.cuda.current_stream().wait_event(staged)

    def after_apply(self) -> None:
        """Engine thread, after copying staged layers into the live slots."""
        if self.stream is not None:
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream())
            self._applied = ev
