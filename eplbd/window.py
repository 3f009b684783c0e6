"""The sliding load window: the last ``window_size`` steps of global expert load.

Ranks report load per *physical* slot under the placement epoch they ran with.
The window keeps two views:

- logical ``[window_size, layers, num_logical]``: each report is mapped through
  the ``phy2log`` of its own epoch, so loads recorded on both sides of a
  rearrangement add up. This is what the policies read.
- physical ``[window_size, layers, num_physical]`` for the steps recorded under
  the *current* epoch only: the observed balancedness of the placement in force.

Both are ring buffers indexed by ``step % window_size`` with running sums, so a
query costs ``O(layers * experts)`` however long the window is. Ranks step in
lockstep and report independently; a step's slot is (re)claimed the first time
any rank reports that step, which evicts whatever step was there before.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from eplbd.errors import InvalidArgumentError


class ReportRejected(InvalidArgumentError):
    """A report the window refuses; ``reason`` is a short stable label for counters."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class WindowSnapshot:
    """Copies of the window sums at one moment (safe to hand to another thread).

    Attributes:
        logical: ``[layers, num_logical]`` int64, tokens per logical expert.
        physical: ``[layers, num_physical]`` int64, tokens per slot under ``epoch``.
        steps: number of distinct steps in the window.
        physical_steps: how many of them were recorded under ``epoch``.
        newest_step: highest step seen (-1 if none).
        epoch: the epoch the physical sums belong to.
    """

    logical: np.ndarray
    physical: np.ndarray
    steps: int
    physical_steps: int
    newest_step: int
    epoch: int


def physical_to_logical(load: np.ndarray, phy2log: np.ndarray, num_logical: int) -> np.ndarray:
    """Sum slot loads into logical experts.

    Args:
        load: ``[..., layers, num_physical]`` integer loads.
        phy2log: ``[layers, num_physical]`` int64 placement the load was recorded under.
        num_logical: number of logical experts per layer.

    Returns:
        ``[..., layers, num_logical]`` int64.
    """
    return _LogicalMap(phy2log, num_logical)(load)


class _LogicalMap:
    """Maps physical load to logical load for one placement; built once per epoch.

    One ``index_add_`` over flattened (layer, logical) ids: about 30x faster
    than a bincount or ``np.add.reduceat`` at DeepSeek scale, and exact in int64.
    """

    def __init__(self, phy2log: np.ndarray, num_logical: int) -> None:
        self.phy2log = np.array(phy2log, dtype=np.int64, copy=True)
        layers = self.phy2log.shape[0]
        self.num_logical = num_logical
        ids = np.arange(layers, dtype=np.int64)[:, None] * num_logical + self.phy2log
        self.ids = torch.from_numpy(ids.ravel())

    def matches(self, phy2log: np.ndarray) -> bool:
        return self.phy2log.shape == phy2log.shape and np.array_equal(self.phy2log, phy2log)

    def __call__(self, load: np.ndarray) -> np.ndarray:
        layers, num_physical = self.phy2log.shape
        lead = load.shape[:-2]
        flat = torch.from_numpy(np.ascontiguousarray(load).reshape(-1, layers * num_physical)).to(torch.int64)
        out = torch.zeros(flat.shape[0], layers * self.num_logical, dtype=torch.int64)
        out.index_add_(1, self.ids, flat)
        return out.numpy().reshape(*lead, layers, self.num_logical)


class LoadWindow:
    """Ring-buffered window of global load; see the module docstring.

    Args:
        window_size: number of steps kept.
        num_layers, num_logical, num_physical: model shape.
        max_steps_ahead: a report more than this many steps beyond the newest
            step seen is refused as out of range (a rank with a corrupt counter
            must not evict the whole window).
    """

    def __init__(self, window_size: int, num_layers: int, num_logical: int, num_physical: int,
                 *, max_steps_ahead: int = 100_000) -> None:
        if window_size <= 0:
            raise InvalidArgumentError(f"window_size must be positive, got {window_size}")
        self.window_size = window_size
        self.num_layers = num_layers
        self.num_logical = num_logical
        self.num_physical = num_physical
        self.max_steps_ahead = max_steps_ahead
        w = window_size
        # int32 storage halves the memory at DeepSeek scale (tokens per step per
        # expert stay far below 2**31); sums are int64.
        self._log = np.zeros((w, num_layers, num_logical), np.int32)
        self._phy = np.zeros((w, num_layers, num_physical), np.int32)
        self._step = np.full(w, -1, np.int64)
        self._phy_epoch = np.full(w, -1, np.int64)
        self._log_sum = np.zeros((num_layers, num_logical), np.int64)
        self._phy_sum = np.zeros((num_layers, num_physical), np.int64)
        self._phy_steps = 0
        self.epoch = 0
        self.newest_step = -1
        self._maps: dict[int, _LogicalMap] = {}

    # -- ingest ---------------------------------------------------------------
    def add(self, first_step: int, load: np.ndarray | torch.Tensor, phy2log: np.ndarray,
            *, epoch: int) -> int:
        """Add one rank's report of ``steps`` consecutive steps.

        Args:
            first_step: step number of ``load[0]``.
            load: ``[steps, layers, num_physical]`` non-negative integer loads.
            phy2log: ``[layers, num_physical]`` int64, the placement of ``epoch``.
            epoch: the epoch the load was recorded under.

        Returns:
            Number of steps applied (steps older than the window are skipped).

        Raises:
            ReportRejected: bad shape, dtype, negative counts or out-of-range steps;
                nothing is applied in that case.
        """
        arr = load.numpy() if isinstance(load, torch.Tensor) else np.asarray(load)
        want = (self.num_layers, self.num_physical)
        if arr.ndim != 3 or tuple(arr.shape[1:]) != want:
            raise ReportRejected("bad_shape", f"load shape {tuple(arr.shape)} is not [steps, {want[0]}, {want[1]}]")
        if arr.dtype.kind not in "iu":
            raise ReportRejected("bad_dtype", f"load dtype {arr.dtype} is not an integer type")
        if arr.size and arr.min() < 0:
            raise ReportRejected("negative", f"load has a negative count {int(arr.min())}")
        if arr.size and arr.max() > np.iinfo(np.int32).max:
            raise ReportRejected("overflow", f"load count {int(arr.max())} exceeds int32 range")
        steps = arr.shape[0]
        if first_step < 0:
            raise ReportRejected("step_out_of_range", f"first_step {first_step} is negative")
        last = first_step + steps - 1
        if self.newest_step >= 0 and last > self.newest_step + self.max_steps_ahead:
            raise ReportRejected(
                "step_out_of_range",
                f"step {last} is more than {self.max_steps_ahead} steps ahead of the newest step {self.newest_step}")
        oldest_kept = max(self.newest_step, last) - self.window_size + 1
        start = max(first_step, oldest_kept)
        if start > last:
            return 0
        arr = arr[start - first_step:]
        mapper = self._maps.get(epoch)
        if mapper is None or not mapper.matches(phy2log):
            mapper = self._maps[epoch] = _LogicalMap(phy2log, self.num_logical)
            if len(self._maps) > 4:  # only the last few epochs still get reports
                self._maps.pop(min(self._maps))
        logical = mapper(arr)
        self._add_block(start, logical, arr, epoch)
        return last - start + 1

    def _advance(self, step: int) -> None:
        if step <= self.newest_step:
            return
        self.newest_step = step
        # A jump in steps can leave slots that no new step claims; drop
        # everything that fell out of the window.
        for old in np.flatnonzero((self._step >= 0) & (self._step <= step - self.window_size)):
            self._evict(int(old))

    def _add_block(self, start: int, logical: np.ndarray, physical: np.ndarray | None, epoch: int) -> None:
        """Add consecutive steps ``start..start+n-1`` (n <= window_size, so their slots are distinct)."""
        n = logical.shape[0]
        self._advance(start + n - 1)
        steps = np.arange(start, start + n, dtype=np.int64)
        slots = steps % self.window_size
        for slot in slots[self._step[slots] != steps]:
            self._evict(int(slot))
        self._step[slots] = steps
        self._log[slots] += logical.astype(np.int32, copy=False)
        self._log_sum += logical.sum(0)
        if physical is not None and epoch == self.epoch:
            fresh = self._phy_epoch[slots] != epoch
            self._phy_steps += int(fresh.sum())
            self._phy_epoch[slots] = epoch
            self._phy[slots] += physical.astype(np.int32, copy=False)
            self._phy_sum += physical.sum(0, dtype=np.int64)

    def _evict(self, slot: int) -> None:
        if self._step[slot] < 0:
            return
        self._log_sum -= self._log[slot]
        self._log[slot] = 0
        if self._phy_epoch[slot] == self.epoch:
            self._phy_sum -= self._phy[slot]
            self._phy_steps -= 1
        self._phy[slot] = 0
        self._phy_epoch[slot] = -1
        self._step[slot] = -1

    def add_logical(self, step: int, logical: np.ndarray) -> None:
        """Add one step of already-global logical load ``[layers, num_logical]`` (replay).

        Steps older than the window are ignored.
        """
        if step <= max(self.newest_step, step) - self.window_size:
            return
        self._add_block(step, np.asarray(logical, dtype=np.int64)[None], None, self.epoch)

    # -- epochs ---------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Switch the physical view to a new epoch (its slots mean other experts now)."""
        if epoch == self.epoch:
            return
        self.epoch = epoch
        self._phy[:] = 0
        self._phy_epoch[:] = -1
        self._phy_sum[:] = 0
        self._phy_steps = 0

    # -- queries --------------------------------------------------------------
    @property
    def fill(self) -> int:
        """Number of distinct steps currently in the window."""
        return int((self._step >= 0).sum())

    def logical_load(self) -> np.ndarray:
        """``[layers, num_logical]`` int64 window sum (a copy)."""
        return self._log_sum.copy()

    def snapshot(self) -> WindowSnapshot:
        return WindowSnapshot(self._log_sum.copy(), self._phy_sum.copy(), self.fill,
                              self._phy_steps, self.newest_step, self.epoch)

    def steps_logical(self) -> tuple[np.ndarray, np.ndarray]:
        """The window as a trace: ``(steps [n] int64, load [n, layers, num_logical] int64)``, oldest first."""
        valid = np.flatnonzero(self._step >= 0)
        order = valid[np.argsort(self._step[valid], kind="stable")]
        return self._step[order].copy(), self._log[order].astype(np.int64)
