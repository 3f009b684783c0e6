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


def _as_numpy(x: np.ndarray | torch.Tensor) -> np.ndarray:
    return x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


class _LogicalMap:
    """Maps physical load to logical load for one placement; built once per epoch.

    One ``index_add_`` over flattened (layer, logical) ids: about 30x faster
    than a bincount or ``np.add.reduceat`` at DeepSeek scale, and exact in int64.
    """

    def __init__(self, phy2log: np.ndarray, num_logical: int) -> None:
        self.source = phy2log  # the object it was built from, for a cheap identity check
        self.phy2log = np.array(_as_numpy(phy2log), dtype=np.int64, copy=True)
        layers = self.phy2log.shape[0]
        self.num_logical = num_logical
        ids = np.arange(layers, dtype=np.int64)[:, None] * num_logical + self.phy2log
        self.ids = torch.from_numpy(ids.ravel())

    def matches(self, phy2log: np.ndarray | torch.Tensor) -> bool:
        other = _as_numpy(phy2log)
        return self.phy2log.shape == other.shape and np.array_equal(self.phy2log, other)

    def __call__(self, load: np.ndarray, dtype: torch.dtype = torch.int64) -> np.ndarray:
        layers, num_physical = self.phy2log.shape
        lead = load.shape[:-2]
        flat = torch.from_numpy(np.ascontiguousarray(load).reshape(-1, layers * num_physical)).to(dtype)
        out = torch.zeros(flat.shape[0], layers * self.num_logical, dtype=dtype)
        out.index_add_(1, self.ids, flat)
        return out.numpy().reshape(*lead, layers, self.num_logical)


_FOLD_CHUNK = 64  # ring rows mapped per step of a fold


def window_bytes(window_size: int, num_layers: int, num_logical: int, num_physical: int) -> int:
    """Bytes a ``LoadWindow`` of this shape allocates: its two int32 rings (physical and logical) and
    the per-step bookkeeping; what the daemon checks against ``window_memory_bytes`` before allocating."""
    return window_size * (num_layers * (num_logical + num_physical) * 4 + 17) + num_layers * (num_logical
                                                                                             + num_physical) * 8


class LoadWindow:
    """Ring-buffered window of global load; see the module docstring.

    Storage: ``_phy`` holds the physical rows of steps recorded under the
    current epoch (and, until they leave the window, those of the previous
    placements: ``_stale``) and ``_extra`` the logical rows of everything else
    (reports of other epochs, ``add_logical``, stale rows folded in). The logical view is ``_extra`` plus ``_phy``
    mapped through the current placement, computed when asked for. So the
    common report, one of the current epoch, costs one in-place add into the
    ring and one sum: the per-report work of a daemon with 64 ranks streaming
    DeepSeek-sized rows.

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
        self._phy = np.zeros((w, num_layers, num_physical), np.int32)
        self._extra = np.zeros((w, num_layers, num_logical), np.int32)
        self._step = np.full(w, -1, np.int64)
        self._phy_epoch = np.full(w, -1, np.int64)
        self._extra_used = np.zeros(w, bool)
        self._phy_sum = np.zeros((num_layers, num_physical), np.int64)
        self._extra_sum = np.zeros((num_layers, num_logical), np.int64)
        self._phy_steps = 0
        self.epoch = 0
        self.newest_step = -1
        # Mappers of recent epochs; keys are epochs, or (epoch, layers applied) for the
        # mixed placements ranks run while a plan is applied layer by layer.
        self._maps: dict[int | tuple[int, int], _LogicalMap] = {}
        self._cur_map: _LogicalMap | None = None  # placement of the rows in _phy
        # Rows of _phy recorded under a placement no longer current, not yet folded into _extra (their
        # logical sum is in _extra_sum already): row -> that placement's mapper (``_retire_current``).
        self._stale: dict[int, _LogicalMap] = {}

    # -- ingest ---------------------------------------------------------------
    def add(self, first_step: int, load: np.ndarray | torch.Tensor, phy2log: np.ndarray | torch.Tensor,
            *, epoch: int | tuple[int, int]) -> int:
        """Add one rank's report of ``steps`` consecutive steps.

        Args:
            first_step: step number of ``load[0]``.
            load: ``[steps, layers, num_physical]`` non-negative integer loads.
            phy2log: ``[layers, num_physical]`` int64, the placement of ``epoch``.
                Passing the same object for every report of an epoch skips a
                comparison.
            epoch: the epoch the load was recorded under (any other hashable key names
                a placement that is not the current epoch's, e.g. a partly applied plan).

        Returns:
            Number of steps applied (steps older than the window are skipped).

        Raises:
            ReportRejected: bad shape, dtype, negative counts or out-of-range steps;
                nothing is applied in that case.
        """
        arr = _as_numpy(load)
        want = (self.num_layers, self.num_physical)
        if arr.ndim != 3 or tuple(arr.shape[1:]) != want:
            raise ReportRejected("bad_shape", f"load shape {tuple(arr.shape)} is not [steps, {want[0]}, {want[1]}]")
        if arr.dtype.kind not in "iu":
            raise ReportRejected("bad_dtype", f"load dtype {arr.dtype} is not an integer type")
        if arr.size and arr.dtype.kind == "i" and (low := arr.min()) < 0:
            raise ReportRejected("negative", f"load has a negative count {int(low)}")
        if arr.size and np.iinfo(arr.dtype).max > _INT32_MAX and (high := arr.max()) > _INT32_MAX:
            raise ReportRejected("overflow", f"load count {int(high)} exceeds int32 range")
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
        mapper = self._mapper(epoch, phy2log)
        self._claim(start, arr.shape[0])
        if epoch == self.epoch and mapper is self._cur_map:
            for ring, part in _ring_parts(start, arr.shape[0], self.window_size):
                if self._stale:  # a step some rank reported under the previous placement
                    self._materialize([r for r in range(ring.start, ring.stop) if r in self._stale])
                np.add(self._phy[ring], arr[part], out=self._phy[ring], casting="unsafe")
                fresh = self._phy_epoch[ring] != epoch
                self._phy_steps += int(fresh.sum())
                self._phy_epoch[ring] = epoch
            self._phy_sum += arr.sum(0, dtype=np.int64)
        else:  # another epoch's report: straight into logical space
            self._add_extra(start, mapper(arr))
        return last - start + 1

    def _mapper(self, epoch: int | tuple[int, int], phy2log: np.ndarray | torch.Tensor) -> _LogicalMap:
        mapper = self._maps.get(epoch)
        if mapper is not None and (mapper.source is phy2log or mapper.matches(phy2log)):
            mapper.source = phy2log
            return mapper
        if epoch == self.epoch and self._cur_map is not None:
            # The placement of the current epoch changed under the rows in _phy
            # (a restart reconciled by a rank): they keep the old one.
            self._retire_current()
        mapper = self._maps[epoch] = _LogicalMap(phy2log, self.num_logical)
        if len(self._maps) > 8:  # only the last few placements still get reports
            self._maps.pop(next(k for k in self._maps if k != self.epoch))  # the oldest inserted
        if epoch == self.epoch:
            self._cur_map = mapper
        return mapper

    def _add_extra(self, start: int, logical: np.ndarray) -> None:
        for ring, part in _ring_parts(start, logical.shape[0], self.window_size):
            np.add(self._extra[ring], logical[part], out=self._extra[ring], casting="unsafe")
            self._extra_used[ring] = True
        self._extra_sum += logical.sum(0, dtype=np.int64)

    def _advance(self, step: int) -> None:
        if step <= self.newest_step:
            return
        self.newest_step = step
        # A jump in steps can leave slots that no new step claims; drop
        # everything that fell out of the window.
        for old in np.flatnonzero((self._step >= 0) & (self._step <= step - self.window_size)):
            self._evict(int(old))

    def _claim(self, start: int, n: int) -> None:
        """Make slots of steps ``start..start+n-1`` (n <= window_size) hold those steps, evicting others."""
        self._advance(start + n - 1)
        steps = np.arange(start, start + n, dtype=np.int64)
        slots = steps % self.window_size
        for slot in slots[self._step[slots] != steps]:
            self._evict(int(slot))
        self._step[slots] = steps

    def _evict(self, slot: int) -> None:
        if self._step[slot] < 0:
            return
        stale = self._stale.pop(slot, None)
        if stale is not None:
            self._extra_sum -= stale(self._phy[slot][None])[0]
            self._phy[slot] = 0
        if self._extra_used[slot]:
            self._extra_sum -= self._extra[slot]
            self._extra[slot] = 0
            self._extra_used[slot] = False
        if self._phy_epoch[slot] == self.epoch:
            self._phy_sum -= self._phy[slot]
            self._phy[slot] = 0
            self._phy_steps -= 1
        self._phy_epoch[slot] = -1
        self._step[slot] = -1

    def add_logical(self, step: int, logical: np.ndarray) -> None:
        """Add one step of already-global logical load ``[layers, num_logical]`` (replay).

        Steps older than the window are ignored.
        """
        if step <= max(self.newest_step, step) - self.window_size:
            return
        self._claim(step, 1)
        self._add_extra(step, np.asarray(logical, dtype=np.int64)[None])

    # -- epochs ---------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Switch the physical view to a new epoch (its slots mean other experts now).

        The old epoch's rows move to logical space first, so the logical view
        is unchanged.
        """
        if epoch == self.epoch:
            return
        self._retire_current()
        self.epoch = epoch
        self._cur_map = self._maps.get(epoch)

    def reshape_physical(self, num_physical: int, epoch: int) -> None:
        """The EP group was resized (``eplbd.policy.elastic``): switch to ``epoch``, whose placement has
        ``num_physical`` slots per layer. The rows held so far are folded into logical space first,
        so the logical view (what the policies read) is unchanged; the physical view restarts empty,
        and reports of the old shape are refused as ``bad_shape``."""
        self._retire_current()
        self._materialize(list(self._stale))
        self.epoch, self.num_physical = epoch, num_physical
        self._phy = np.zeros((self.window_size, self.num_layers, num_physical), np.int32)
        self._phy_sum = np.zeros((self.num_layers, num_physical), np.int64)
        self._maps = {}

    def _retire_current(self) -> None:
        """The rows in ``_phy`` stop being the current placement's (an epoch change, or that placement
        changed): their logical sum joins ``_extra_sum`` at once, one row mapped, and the rows stay
        physical, each mapped on its own when it is evicted, reported into again or exported
        (``_stale``). A commit so costs O(layers x experts) on the daemon's event loop, not O(window):
        folding a whole DeepSeek-sized window took ~45 ms there."""
        held = np.flatnonzero(self._phy_epoch == self.epoch)
        if held.size and self._cur_map is not None:
            self._extra_sum += self._cur_map(self._phy_sum[None])[0]
            self._stale.update(dict.fromkeys(held.tolist(), self._cur_map))
        else:
            self._phy[held] = 0
        self._phy_epoch[held] = -1
        self._phy_sum[:] = 0
        self._phy_steps = 0
        self._cur_map = None

    def _materialize(self, rows: list[int]) -> None:
        """Fold stale rows into the logical ring (their sum is counted already), a chunk per mapper at a
        time in the ring's int32: whole-window int64 temporaries stayed resident after a fold."""
        groups: dict[int, tuple[_LogicalMap, list[int]]] = {}
        for row in rows:
            mapper = self._stale.pop(row, None)
            if mapper is not None:
                groups.setdefault(id(mapper), (mapper, []))[1].append(row)
        for mapper, held in groups.values():
            idx = np.array(held, dtype=np.int64)
            for i in range(0, idx.size, _FOLD_CHUNK):
                part = idx[i:i + _FOLD_CHUNK]
                self._extra[part] += mapper(self._phy[part], torch.int32)
            self._extra_used[idx] = True
            self._phy[idx] = 0

    # -- queries --------------------------------------------------------------
    @property
    def fill(self) -> int:
        """Number of distinct steps currently in the window."""
        return int((self._step >= 0).sum())

    def logical_load(self) -> np.ndarray:
        """``[layers, num_logical]`` int64 window sum (a copy)."""
        out = self._extra_sum.copy()
        if self._phy_steps and self._cur_map is not None:
            out += self._cur_map(self._phy_sum[None])[0]
        return out

    def snapshot(self) -> WindowSnapshot:
        return WindowSnapshot(self.logical_load(), self._phy_sum.copy(), self.fill,
                              self._phy_steps, self.newest_step, self.epoch)

    def steps_logical(self) -> tuple[np.ndarray, np.ndarray]:
        """The window as a trace: ``(steps [n] int64, load [n, layers, num_logical] int64)``, oldest first."""
        valid = np.flatnonzero(self._step >= 0)
        order = valid[np.argsort(self._step[valid], kind="stable")]
        load = self._extra[order].astype(np.int64)
        current = self._phy_epoch[order] == self.epoch
        if self._phy_steps and self._cur_map is not None and current.any():
            load[current] += self._cur_map(self._phy[order[current]])
        for i, row in enumerate(order.tolist()):
            stale = self._stale.get(row)
            if stale is not None:
                load[i] += stale(self._phy[row][None])[0]
        return self._step[order].copy(), load


_INT32_MAX = np.iinfo(np.int32).max


def _ring_parts(start: int, n: int, size: int) -> list[tuple[slice, slice]]:
    """Steps ``start..start+n-1`` (n <= size) as ring slices: ``[(ring slice, row slice)]``, one or two."""
    first = start % size
    head = min(n, size - first)
    parts = [(slice(first, first + head), slice(0, head))]
    if head < n:
        parts.append((slice(0, n - head), slice(head, n)))
    return parts
