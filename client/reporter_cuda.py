"""The CUDA path of a :class:`~eplbd.client.reporter.LoadReporter`: how ``record`` copies a step's load off the
GPU into a pinned host slot without ever synchronising the caller's (forward) stream with the host.

``record`` never synchronises the caller's (forward) stream with the host:

1. on the current stream, the load is copied into a small device staging
   ring (``_STAGING_DEPTH`` slots, allocated once) and an event is recorded;
2. a side stream waits on that event and copies the staging slot into the
   pinned host slot (``non_blocking=True``), then records the slot's event;
3. the sender thread polls that event (``Event.query``, no host sync of the
   forward stream) before reading the host slot.

Why the device-side snapshot in step 1 rather than copying ``load`` itself
on the side stream: ``side.wait_stream(current)`` only orders the side copy
*after* the work queued before ``record``; it does not order it *before*
work the caller queues afterwards. An engine that zeroes or refills its load
buffer on the forward stream right after ``record`` (vLLM does, every step)
would race with the side copy, and the report could carry the later values.
The snapshot copy is on the forward stream, so stream order guarantees it
reads the values of the time of ``record`` and that later writes come after
it. It costs the forward stream one small device-to-device copy (~75 KB at
DeepSeek-V3 shape); the slower device-to-host copy overlaps on the side
stream. Before a staging slot is reused, the forward stream waits (on the
GPU, not the host) for the event of the previous device-to-host copy out of
it, which has normally completed long before.
"""

from __future__ import annotations

import torch

from eplbd.errors import InvalidArgumentError

# Device staging slots: each one only has to outlive one device-to-host copy,
# which completes microseconds after it is queued.
_STAGING_DEPTH = 8
_NO_DEVICE = -2  # get_device() is -1 for CPU tensors, the index for CUDA ones


class _CudaPath:
    """The CUDA pieces (see the module docstring), made on the first CUDA ``record``."""

    def __init__(self, device: torch.device, shape: torch.Size, depth: int) -> None:
        self.device = device
        self.side = torch.cuda.Stream(device=device)
        self.staging = torch.empty((depth, *shape), dtype=torch.int32, device=device)
        # The staging ring is read on the side stream: if the reporter goes away
        # while a copy is in flight, the caching allocator must not hand the
        # memory to another tensor before that copy is done.
        self.staging.record_stream(self.side)
        self.slots = self.staging.unbind(0)
        self.snap = [torch.cuda.Event() for _ in range(depth)]  # snapshot j taken (forward stream)
        # Copy out of staging slot j done (side stream). Separate from the host
        # slots' events: those are re-recorded whenever a host slot is reused,
        # and the forward stream must wait only for the copy it is about to
        # overwrite, never for a newer one.
        self.out = [torch.cuda.Event() for _ in range(depth)]
        self.depth = depth
        self.n = 0  # records so far: picks the staging slot


class CudaCopy:
    """Mixed into :class:`~eplbd.client.reporter.LoadReporter`: binding the reporter to the device of the first
    load, and the CUDA half of ``record``."""

    def _bind_device(self, load: torch.Tensor, dev: int) -> None:
        """First record: remember the device. A later one on another device is refused: the slot
        reuse rules rely on every copy into host memory going through one stream."""
        if self._device != _NO_DEVICE:
            raise InvalidArgumentError(
                f"LoadReporter.record: load is on {load.device}, but earlier loads were on "
                f"{'cpu' if self._device < 0 else f'cuda:{self._device}'}; use one device per reporter")
        if dev >= 0:
            if load.device.type != "cuda":
                raise InvalidArgumentError(f"LoadReporter.record: load is on {load.device}, expected cpu or cuda")
            self._cuda = _CudaPath(load.device, self._shape, _STAGING_DEPTH)
        elif load.device.type != "cpu":
            raise InvalidArgumentError(f"LoadReporter.record: load is on {load.device}, expected cpu or cuda")
        self._device = dev

    def _copy_cuda(self, slot: int, load: torch.Tensor) -> None:
        """The CUDA half of ``record`` (see the module docstring); called under the lock.

        Host slot reuse needs no extra care: the sender waited for a slot's
        event before freeing it, and a dropped pending slot is overwritten by
        a copy queued behind the previous one on the same side stream.
        """
        path = self._cuda
        j = path.n % path.depth
        path.n += 1
        cur = torch.cuda.current_stream(path.device)
        side = path.side
        if path.n > path.depth:
            # On the GPU, not the host: the copy out of staging slot j queued
            # `depth` records ago is done (it normally is, long since).
            cur.wait_event(path.out[j])
        staging = path.slots[j]
        staging.copy_(load)  # forward stream: a snapshot ordered before any later write to load
        path.snap[j].record(cur)
        side.wait_event(path.snap[j])
        with torch.cuda.stream(side):
            self._slots[slot].copy_(staging, non_blocking=True)
        path.out[j].record(side)
        ev = self._host_events[slot]
        if ev is None:
            ev = self._host_events[slot] = torch.cuda.Event()
        ev.record(side)
        self._events[slot] = ev
