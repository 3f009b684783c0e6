"""Plan records and the daemon's persisted state.

A plan moves through ``pending`` (pushed, ranks staging) -> ``committing``
(every rank staged a layer and the daemon permitted it) -> ``committed`` (every
rank acked every layer) or ``aborted`` (with the reason). Only one plan is in
flight at a time.

The state dir holds ``state.json``: the current epoch, its placement and the
topology, written atomically (temp file + rename) after every commit, so a
restarted daemon resumes at the right epoch.
"""

from __future__ import annotations

import json
import os
import pathlib
import time
from dataclasses import dataclass, field

import torch

from eplbd.errors import PlacementError
from eplbd.files import write_atomic
from eplbd.proto import PlanInfo

STATE_FILE = "state.json"
STATE_VERSION = 1


@dataclass
class PlanRecord:
    """One plan and what happened to it.

    Attributes:
        phy2log: ``[layers, num_physical]`` int64, the full placement after the plan.
        layers: the layers the plan changes.
        ready: rank -> layers that rank has staged.
        acked: rank -> layers that rank has applied.
        permitted: layers the daemon told the ranks they may commit.
    """

    plan_id: int
    epoch: int
    base_epoch: int
    layers: list[int]
    phy2log: torch.Tensor
    policy: str
    reason: str
    predicted_before: float
    predicted_after: float
    moved_slots: int
    moved_bytes: int
    created_at: float
    state: str = "pending"
    end_reason: str = ""
    ready: dict[int, set[int]] = field(default_factory=dict)
    acked: dict[int, set[int]] = field(default_factory=dict)
    permitted: set[int] = field(default_factory=set)
    timings: dict[str, float] = field(default_factory=dict)
    started_mono: float = field(default_factory=time.monotonic)
    progress_mono: float = field(default_factory=time.monotonic)
    truncated_mono: float | None = None  # when an abort truncated it: its timeout restarts then

    @property
    def in_flight(self) -> bool:
        return self.state in ("pending", "committing")

    @property
    def timeout_from(self) -> float:
        """Monotonic time its plan timeout counts from: the push, or the truncation that restarted it."""
        return self.started_mono if self.truncated_mono is None else self.truncated_mono

    def mark(self, phase: str) -> None:
        """Record seconds since the plan was pushed at the first time ``phase`` happens."""
        self.timings.setdefault(phase, time.monotonic() - self.started_mono)

    def record(self, table: dict[int, set[int]], rank: int, layers: list[int], allowed) -> bool:
        """Add ``layers`` (those in ``allowed``) to ``table[rank]`` (``ready`` or ``acked``).

        Returns:
            True if that was news. Only news counts as progress for the watchdog, so a
            duplicated or replayed message cannot keep a stuck plan alive.
        """
        have = table.setdefault(rank, set())
        new = {layer for layer in layers if layer in allowed} - have
        if not new:
            return False
        have |= new
        self.progress_mono = time.monotonic()
        return True

    def layers_ready_everywhere(self, ranks: range) -> set[int]:
        sets = [self.ready.get(r, set()) for r in ranks]
        return set.intersection(*sets) if sets else set()

    def layers_acked_everywhere(self, ranks: range) -> set[int]:
        sets = [self.acked.get(r, set()) for r in ranks]
        return set.intersection(*sets) if sets else set()

    def info(self) -> PlanInfo:
        reason = self.reason if not self.end_reason else f"{self.reason}; {self.state}: {self.end_reason}"
        return PlanInfo(plan_id=self.plan_id, epoch=self.epoch, base_epoch=self.base_epoch, state=self.state,
                        reason=reason, layers=list(self.layers), policy=self.policy,
                        predicted_before=self.predicted_before, predicted_after=self.predicted_after,
                        moved_slots=self.moved_slots, moved_bytes=self.moved_bytes,
                        created_at=self.created_at, timings=dict(self.timings))


@dataclass
class PersistedState:
    """What ``state.json`` holds. ``last_commit_at``: unix time of the last committed plan (None: none yet).

    A plan in flight is not persisted: after a daemon crash the ranks settle it among themselves
    (see ``eplbd.client.agent``) and report where they ended up when they register again.
    """

    epoch: int
    phy2log: torch.Tensor
    topology: dict
    next_plan_id: int
    last_commit_at: float | None = None


def save_state(state_dir: str | os.PathLike, st: PersistedState) -> None:
    """Write ``state.json`` atomically."""
    d = pathlib.Path(state_dir)
    d.mkdir(parents=True, exist_ok=True)
    doc = {"version": STATE_VERSION, "epoch": st.epoch, "phy2log": st.phy2log.tolist(),
           "topology": st.topology, "next_plan_id": st.next_plan_id, "last_commit_at": st.last_commit_at,
           "saved_at": time.time()}
    tmp = d / (STATE_FILE + ".tmp")
    with open(tmp, "w") as fh:
        json.dump(doc, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, d / STATE_FILE)


def load_state(state_dir: str | os.PathLike) -> PersistedState | None:
    """Read ``state.json``; None if there is none. A corrupt file is an error, not silently ignored."""
    path = pathlib.Path(state_dir) / STATE_FILE
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
        phy2log = torch.tensor(doc["phy2log"], dtype=torch.int64)
        if phy2log.ndim != 2:
            raise ValueError(f"phy2log has {phy2log.ndim} dims")
        last = doc.get("last_commit_at")
        return PersistedState(int(doc["epoch"]), phy2log, dict(doc["topology"]), int(doc.get("next_plan_id", 1)),
                              None if last is None else float(last))
    except Exception as exc:
        raise PlacementError(f"state file {str(path)!r} is corrupt: {type(exc).__name__}: {exc}") from None


def read_placement_file(path: str | os.PathLike) -> torch.Tensor:
    """Read a placement file; returns ``[layers, num_physical]`` int64 (not yet validated against a topology).

    Accepted, told apart by their keys: our JSON (``{"phy2log": [[...], ...]}``, which is also what
    ``eplbctl placement --json`` prints, or a bare list of rows) and SGLang's
    ``{"physical_to_logical_map": ...}`` as ``.json`` or ``.pt`` (``eplbd.integrations.sglang``).

    Raises:
        PlacementError: naming the file and what is wrong (an SGLang ``logical_count`` file is a
            load, not a placement, and is pointed at ``eplbd replay``).
    """
    from eplbd.integrations import sglang

    where = f"placement file {str(path)!r}"
    doc = sglang.read_document(path, PlacementError, "placement")
    key = "phy2log"
    if isinstance(doc, dict):
        key = next((k for k in ("phy2log", sglang.PLACEMENT_KEY) if k in doc), "")
        if not key and sglang.LOAD_KEY in doc:
            raise PlacementError(f"{where} holds a load ({sglang.LOAD_KEY!r}), not a placement; replay it "
                                 "with `eplbd replay` or convert it with `eplbd convert-load`")
        if not key:
            raise PlacementError(f"{where} has no 'phy2log' or {sglang.PLACEMENT_KEY!r} key "
                                 f"(keys: {sorted(map(str, doc))})")
        doc = doc[key]
    return sglang.placement_tensor(doc, where, key)


def write_placement_file(path: str | os.PathLike, phy2log: torch.Tensor) -> None:
    """Write ``phy2log [layers, num_physical]`` as our placement JSON (``{"phy2log": [[...], ...]}``)."""
    doc = json.dumps({"phy2log": phy2log.to(torch.int64).tolist()})
    write_atomic(path, lambda tmp: tmp.write_text(doc))
