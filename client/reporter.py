"""LoadReporter: hands each step's expert load to the daemon without slowing the forward pass.

Runs inside every engine rank. The engine calls ``record(step, load, tag)`` once
per forward step on its own thread; everything that can take time (waiting for
the GPU, stacking steps, encoding, ZeroMQ) happens on a background sender
thread that owns its own PUSH socket (zmq sockets are not thread-safe, so the
socket is touched by that thread only, and it is not ``WorkerLink``'s).

Ring and locking
----------------
Storage is a block of ``max_pending_steps + batch_steps`` slots allocated
once (int32; pinned host memory when CUDA is available so that device copies
into it can be asynchronous). Slot ids move between three places, all guarded
by one lock: a free stack, a FIFO of pending steps (at most
``max_pending_steps``), and the batch the sender is working on (at most
``batch_steps``), so a free slot always exists unless the FIFO is full.

``record`` takes the lock once: pops a free slot (or, when the FIFO is full,
drops the *oldest* pending step and reuses its slot, counted), copies the load
into it, and appends ``(slot, step, tag)`` to the FIFO. It never blocks on the
sender, never waits for the daemon and never allocates a tensor. The stack is
LIFO on purpose: the slot the sender has just released is the one reused, so
the copy lands in cache-hot memory instead of walking a 76 MB ring.

The sender takes up to ``batch_steps`` slots off the FIFO's front under the
lock, then copies them out *without* the lock (the slots are its own until it
pushes them back on the free stack), so the caller is never held up by that
copy. ``record`` wakes the sender only when a full batch is pending and the
sender is waiting; otherwise the sender wakes on its own timer
(``flush_interval_s``) to send a partial batch once the caller has been idle
that long.

CUDA
----
``record`` never synchronises the caller's (forward) stream with the host: see
``eplbd.client.reporter_cuda``. The sender thread is in ``eplbd.client.reporter_sender``.

Accounting
----------
``steps_recorded == steps_sent + steps_dropped + pending`` (pending includes a
batch the sender is working on); after ``close`` nothing is pending. A step is
dropped when the ring overflows, when its report fails to send (``zmq.Again``:
no daemon connected or its queue is full; the report still consumes its
``seq`` so the daemon sees a gap), when it is recorded after ``close``, or
when ``close`` runs out of time. Each sent report's ``dropped_steps`` is the
number of steps dropped since the previous successfully sent report, so the
daemon's ``sender_overflow_steps`` plus the steps it received add up to what
the rank recorded (up to drops after the last report that got out).
"""

from __future__ import annotations

import logging
import math
import operator
import threading
import time
from typing import Any

import torch
import zmq

from eplbd.client.reporter_cuda import _NO_DEVICE, CudaCopy, _CudaPath
from eplbd.client.reporter_sender import ReportSender
from eplbd.errors import InvalidArgumentError
from eplbd.proto import CurveKeys, Encoder, make_socket

log = logging.getLogger(__name__)

_INT_DTYPES = frozenset((torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64))


class LoadReporter(CudaCopy, ReportSender):
    """Batches per-step load and pushes ``LoadReport`` messages to the daemon's ingest socket.

    Args:
        ingest: the daemon's ingest (PULL) endpoint.
        rank: this rank in the EP group.
        num_layers, num_physical: the shape ``[num_layers, num_physical]`` of
            every load passed to ``record``.
        batch_steps: most consecutive steps per report.
        max_pending_steps: steps kept while the daemon is slow or absent (or
            before ``set_identity``); beyond it the oldest are dropped. Host
            memory: ``(max_pending_steps + batch_steps) * num_layers *
            num_physical * 4`` bytes (76 MB at DeepSeek-V3 shape [58, 320]
            with the defaults).
        hwm: reports queued in libzmq before sends fail.
        flush_interval_s: a partial batch is sent once no step was recorded
            for about this long (at most twice it: the sender notices new
            steps when it wakes); a full batch goes at once.
        ctx: zmq context (default: the process's shared instance).
        curve: a worker key pair and the daemon's public key, for a daemon with CURVE on.

    Counters (ints, readable from any thread): ``steps_recorded``,
    ``steps_sent``, ``steps_dropped``, ``reports_sent``, ``reports_failed``.

    ``record`` takes loads from one device (CPU or one CUDA device) for the
    reporter's lifetime. Call ``close`` (or use it as a context manager): the
    sender thread and its socket live until then.

    Raises:
        InvalidArgumentError: a bad argument or an endpoint zmq refuses.
    """

    def __init__(self, ingest: str, rank: int, *, num_layers: int, num_physical: int,
                 batch_steps: int = 8, max_pending_steps: int = 1024, hwm: int = 64,
                 flush_interval_s: float = 0.05, ctx: zmq.Context | None = None,
                 curve: CurveKeys | None = None) -> None:
        for name, value, low in (("rank", rank, 0), ("num_layers", num_layers, 1),
                                 ("num_physical", num_physical, 1), ("batch_steps", batch_steps, 1),
                                 ("max_pending_steps", max_pending_steps, 1), ("hwm", hwm, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise InvalidArgumentError(f"LoadReporter {name} must be an int >= {low}, got {value!r}")
        if max_pending_steps < batch_steps:
            raise InvalidArgumentError(
                f"LoadReporter max_pending_steps={max_pending_steps} must be >= batch_steps={batch_steps}")
        if not (isinstance(flush_interval_s, (int, float)) and math.isfinite(flush_interval_s)
                and flush_interval_s > 0):
            raise InvalidArgumentError(f"LoadReporter flush_interval_s must be > 0, got {flush_interval_s!r}")
        self.ingest = ingest
        self.rank = rank
        self.num_layers, self.num_physical = num_layers, num_physical
        self.batch_steps = batch_steps
        self.max_pending_steps = max_pending_steps
        self.flush_interval_s = float(flush_interval_s)
        self._shape = torch.Size((num_layers, num_physical))

        self.steps_recorded = 0
        self.steps_sent = 0
        self.steps_dropped = 0
        self.reports_sent = 0
        self.reports_failed = 0

        # -- slots (see the module docstring) ---------------------------------------------
        nslots = max_pending_steps + batch_steps
        # zeros, not empty: the pages are faulted in here rather than during
        # the caller's first records.
        self._store = torch.zeros((nslots, num_layers, num_physical), dtype=torch.int32,
                                  pin_memory=torch.cuda.is_available())
        self._slots = self._store.unbind(0)  # views made once: indexing per call would allocate
        self._free = list(range(nslots - 1, -1, -1))  # LIFO stack of slot ids
        self._events: list[Any] = [None] * nslots  # CUDA event guarding a slot's contents, or None
        self._host_events: list[Any] = [None] * nslots  # one reusable event per slot
        # FIFO of pending steps, a circular array of max_pending_steps entries:
        # logical indices _qtail <= i < _qhead are pending.
        self._cap = max_pending_steps
        self._q_slot = [0] * max_pending_steps
        self._q_step = [0] * max_pending_steps
        self._q_tag: list[tuple[int, int]] = [(0, -1)] * max_pending_steps
        self._qhead = 0
        self._qtail = 0
        self._device = _NO_DEVICE
        self._cuda: _CudaPath | None = None

        # -- shared with the sender, guarded by _lock -------------------------------------
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._sender_waiting = False
        self._worker_id: str | None = None
        self._session = ""
        self._seq = 0
        self._unreported = 0  # steps dropped since the last report that got out
        self._flush_upto = 0  # pending steps below this index go out even as a partial batch
        self._closing = False  # close() called: flush what is pending, then stop
        self._closed = False  # record() no longer queues
        self._deadline = math.inf
        # sender-only idle tracking
        self._seen_head = 0
        self._last_change = time.monotonic()

        try:
            self._sock = make_socket(ctx or zmq.Context.instance(), zmq.PUSH, connect=ingest, hwm=hwm,
                                     linger_ms=0, curve=curve)
        except zmq.ZMQError as exc:
            raise InvalidArgumentError(f"LoadReporter cannot connect to ingest endpoint {ingest!r}: {exc}") from None
        self._enc = Encoder()  # sender thread only
        self._thread = threading.Thread(target=self._run, name=f"eplbd-reporter-rank{rank}", daemon=True)
        self._thread.start()

    # -- caller's thread -------------------------------------------------------------------
    def set_identity(self, worker_id: str, session: str = "") -> None:
        """Report as ``worker_id`` (the id the agent registered with) carrying ``session`` (the secret
        its registration was given: the daemon drops reports without it); restarts ``seq`` at 0.

        Until the first call nothing is sent (the daemon would refuse reports
        from an unregistered worker); steps are kept meanwhile, oldest dropped
        beyond ``max_pending_steps``.
        """
        if not isinstance(worker_id, str) or not worker_id:
            raise InvalidArgumentError(f"LoadReporter worker_id must be a non-empty str, got {worker_id!r}")
        with self._cond:
            self._worker_id = worker_id
            self._session = session
            self._seq = 0
            self._cond.notify()

    def record(self, step: int, load: torch.Tensor, tag: tuple[int, int] = (0, -1)) -> None:
        """Queue one step's load ``[num_layers, num_physical]`` (any integer dtype, CPU or CUDA).

        Never blocks and never allocates a tensor. The caller may reuse or zero
        ``load`` as soon as this returns (on CUDA: by work queued on the current
        stream afterwards). ``tag = (epoch, layers_applied)`` is the placement
        the step ran with. Must not be called during CUDA graph capture.

        Raises:
            InvalidArgumentError: ``load`` has the wrong shape, a non-integer
                dtype, or another device than earlier loads; ``step`` is
                negative or not an int; ``tag`` is not a pair of ints.
        """
        # Cheap checks first: a Size compare, a set lookup, an int compare.
        if not isinstance(load, torch.Tensor) or load.shape != self._shape or load.dtype not in _INT_DTYPES:
            self._bad_load(load)
        if type(step) is not int or step < 0 or type(tag) is not tuple or len(tag) != 2 \
                or type(tag[0]) is not int or type(tag[1]) is not int:
            step, tag = self._check_step_tag(step, tag)
        dev = load.get_device()
        if dev != self._device:
            self._bind_device(load, dev)
        with self._lock:
            self.steps_recorded += 1
            if self._closed:
                self.steps_dropped += 1
                self._unreported += 1
                return
            i = self._qhead
            if i - self._qtail >= self._cap:  # full: drop the oldest pending step, reuse its slot
                slot = self._q_slot[self._qtail % self._cap]
                self._qtail += 1
                self.steps_dropped += 1
                self._unreported += 1
            else:
                slot = self._free.pop()
            if dev >= 0:
                self._copy_cuda(slot, load)
            else:
                self._slots[slot].copy_(load)
            q = i % self._cap
            self._q_slot[q] = slot
            self._q_step[q] = step
            self._q_tag[q] = tag
            self._qhead = i + 1
            # Wake the sender only when it can act: a full batch and an identity
            # to send it under. A needless wake-up costs the caller GIL contention.
            if self._sender_waiting and i + 1 - self._qtail >= self.batch_steps and self._worker_id is not None:
                self._sender_waiting = False
                self._cond.notify()

    def _bad_load(self, load: Any) -> None:
        if not isinstance(load, torch.Tensor):
            raise InvalidArgumentError(f"LoadReporter.record: load must be a torch.Tensor, got {type(load).__name__}")
        if load.shape != self._shape:
            raise InvalidArgumentError(
                f"LoadReporter.record: load has shape {list(load.shape)}, expected "
                f"[num_layers, num_physical] = {list(self._shape)}")
        raise InvalidArgumentError(
            f"LoadReporter.record: load has dtype {str(load.dtype).removeprefix('torch.')}, expected an integer "
            f"dtype ({', '.join(sorted(str(d).removeprefix('torch.') for d in _INT_DTYPES))})")

    @staticmethod
    def _check_step_tag(step: Any, tag: Any) -> tuple[int, tuple[int, int]]:
        """Slow path for ``step``/``tag`` that are not plain ints (numpy ints are fine)."""
        try:
            step = operator.index(step)
        except TypeError:
            raise InvalidArgumentError(f"LoadReporter.record: step must be an int, got {step!r}") from None
        if step < 0:
            raise InvalidArgumentError(f"LoadReporter.record: step must be >= 0, got {step}")
        try:
            epoch, applied = tag
            tag = (operator.index(epoch), operator.index(applied))
        except (TypeError, ValueError):
            raise InvalidArgumentError(
                f"LoadReporter.record: tag must be (epoch, layers_applied) ints, got {tag!r}") from None
        return step, tag

    def flush(self) -> None:
        """Ask the sender to send every step recorded so far, partial batches included; does not wait."""
        with self._cond:
            self._flush_upto = self._qhead
            self._cond.notify()

    @property
    def pending_steps(self) -> int:
        """Steps waiting in the FIFO (not counting a batch the sender has taken)."""
        return self._qhead - self._qtail

    @property
    def worker_id(self) -> str | None:
        return self._worker_id

    def close(self, timeout: float = 1.0) -> None:
        """Send what is pending (best effort, within ``timeout`` seconds), stop the sender, close the socket.

        Steps that cannot go out in time (or at all: no identity, no daemon)
        are counted as dropped; afterwards ``steps_recorded == steps_sent +
        steps_dropped``. Reports already handed to libzmq get until the same
        deadline to leave (socket linger). Idempotent; ``record`` after
        ``close`` counts a drop.
        """
        with self._cond:
            if not self._closing:
                self._closing = True
                self._deadline = time.monotonic() + max(0.0, timeout)
                self._cond.notify()
        # The sender bounds every wait by the deadline; the extra second only
        # covers scheduling on a loaded host.
        self._thread.join(max(0.0, timeout) + 1.0)
        if self._thread.is_alive():  # pragma: no cover - would be a bug in the sender
            log.warning("reporter of rank %d: sender thread did not stop within %.1fs", self.rank, timeout + 1.0)

    def __enter__(self) -> LoadReporter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["LoadReporter"]
