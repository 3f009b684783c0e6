"""What an operator asks of ``DaemonState``: status, balancedness, rebalance, loading a placement file,
plans and placements, dumping the window. ``OperatorOps`` is mixed into ``DaemonState``."""

from __future__ import annotations

import pathlib
import time
from typing import Callable, Sequence

import torch

from eplbd.errors import InvalidArgumentError, NotFoundError, NotReadyError, PlacementError, PlanConflictError
from eplbd.daemon.plans import PlanRecord, read_placement_file
from eplbd.policy import (get_policy, moved_slots, observed_balancedness, predicted_balancedness, rank_loads,
                          spread_logical_load, summarize, validate_placement)
from eplbd.proto import BalancednessReply, BalanceStats, RebalanceReply, StatusReply, WorkerInfo
from eplbd.daemon.scheduler import Proposal, check_layers
from eplbd.daemon.state_types import Outgoing, PlanJob
from eplbd.offline.trace import save_trace


def operator_path(path: str, verb: str) -> pathlib.Path:
    """A path an operator named on the daemon's host, checked before any syscall sees it.

    Raises:
        InvalidArgumentError: not absolute (it would resolve against wherever the daemon was
            started), a NUL byte, or longer than the system allows.
    """
    shown = f"{path[:200]!r}{'...' if len(path) > 200 else ''}"
    if "\x00" in path or not pathlib.Path(path).is_absolute():
        raise InvalidArgumentError(f"cannot {verb} {shown}: give an absolute path on the daemon's host")
    if len(path.encode(errors="surrogateescape")) >= 4096 or any(len(part) > 255 for part in path.split("/")):
        raise InvalidArgumentError(f"cannot {verb} {shown}: the path or one of its names is too long")
    return pathlib.Path(path)


MAX_PLACEMENT_FILE_BYTES = 64 << 20  # DeepSeek-V3's placement is ~0.1 MB of JSON


def _placement_path(path: str) -> pathlib.Path:
    """``operator_path`` for a placement file, refused unread when it is larger than any placement."""
    p = operator_path(path, "read")
    try:
        size = p.stat().st_size
    except OSError:
        return p  # missing or unreadable: read_placement_file names what is wrong
    if size > MAX_PLACEMENT_FILE_BYTES:
        raise PlacementError(f"placement file {path!r} has {size} bytes, more than the "
                             f"{MAX_PLACEMENT_FILE_BYTES} any placement needs")
    return p


def _stats(s) -> BalanceStats:
    return BalanceStats(min=s.min, p50=s.p50, p90=s.p90, mean=s.mean, aggregate=s.aggregate)



class OperatorOps:
    """The operator operations of ``DaemonState`` (see the module docstring)."""

    # -- operator operations ----------------------------------------------------------
    def _require_group(self) -> None:
        if self.topo is None or self.window is None:
            raise NotReadyError("no workers have registered yet")

    def status(self, now: float) -> StatusReply:
        workers = [WorkerInfo(rank=w.rank, worker_id=w.worker_id, alive=self.alive(w, now),
                              last_seen_s=now - w.last_seen, node=w.node, epoch=w.epoch, hostname=w.hostname)
                   for w in sorted(self.workers.values(), key=lambda w: w.rank)]
        st = self.scheduler_state()
        stuck, why = self.rebalancing_stuck(time.monotonic())
        why = why if stuck else ""
        nxt = (st.last_plan_step if st.last_plan_step >= 0 else -1) + self.settings.step_interval
        return StatusReply(epoch=self.epoch, step=st.step, paused=self.paused, workers=workers,
                           window_fill=st.window_fill, window_size=self.settings.window_size,
                           current_plan=self.current_plan.info() if self.current_plan else None,
                           last_decision_reason=self.last_decision_reason,
                           reports_received=self.counters.reports_received,
                           reports_dropped=self.counters.reports_dropped,
                           drop_reasons=dict(self.counters.drop_reasons), daemon_id=self.daemon_id,
                           ep_size=self.topo.num_gpus if self.topo else 0, policy=self.settings.policy,
                           next_rebalance_step=nxt, uptime_s=time.time() - self.started,
                           last_commit_at=self.last_commit_time or 0.0, last_abort=self.last_abort,
                           aborts_in_a_row=self.aborts_in_a_row, rebalancing_stuck=stuck, stuck_reason=why,
                           resize=self.resize_info(), silent_load_steps=self.silent_load_steps(),
                           load_silent=self.load_silent,
                           messages_refused={f"{m}:{r}": n for (m, r), n in self.counters.refused.items()})

    def balancedness(self, per_layer: bool = False, per_rank: bool = False) -> BalancednessReply:
        self._require_group()
        snap = self.window.snapshot()
        g = self.topo.num_gpus
        obs_rank = rank_loads(torch.from_numpy(snap.physical), g)
        obs = observed_balancedness(torch.from_numpy(snap.physical), g)
        pred = predicted_balancedness(torch.from_numpy(snap.logical), self.phy2log, g)
        pred_rank = rank_loads(spread_logical_load(torch.from_numpy(snap.logical), self.phy2log), g)
        return BalancednessReply(
            observed=_stats(summarize(obs, obs_rank)), predicted=_stats(summarize(pred, pred_rank)),
            per_layer_observed=obs.tolist() if per_layer else None,
            per_layer_predicted=pred.tolist() if per_layer else None,
            per_rank_load=obs_rank.to(torch.float64) if per_rank else None,
            epoch=self.epoch, window_fill=snap.steps)

    def rebalance(self, *, dry_run: bool, layers: list[int] | None, policy: str | None, force: bool,
                  now: float, req_id: int = 0) -> tuple[RebalanceReply, list[Outgoing]]:
        job = self.rebalance_job(dry_run=dry_run, layers=layers, policy=policy, force=force, now=now)
        return self.finish_plan(job, job.run(), now=now, dry_run=dry_run, req_id=req_id)

    def rebalance_job(self, *, dry_run: bool, layers: list[int] | None, policy: str | None, force: bool,
                      now: float) -> PlanJob:
        """Check an operator's rebalance and return its policy run (for ``finish_plan``)."""
        self._require_group()
        if self.window.fill == 0:
            raise NotReadyError("the load window is empty: no load reports received yet")
        if not dry_run:
            self._check_can_start(now)
        if policy is not None:
            get_policy(policy)  # PolicyError naming the bad name and the available ones
        if layers is not None:
            check_layers(layers, self.topo)  # here, not in the executor: a bad request is answered at once
        return self._plan_job("operator rebalance", policy=policy, layers=layers, force=force,
                              expert_bytes=self._moved_bytes(1))

    def _check_can_start(self, now: float) -> None:
        """An operator's plan may start only with no plan in flight and every rank alive."""
        rec = self.current_plan
        if rec is not None and rec.in_flight:
            raise PlanConflictError(f"cannot start a plan now: plan {rec.plan_id} (epoch {rec.epoch}) is {rec.state}")
        if not self.all_ranks_alive(now):
            raise NotReadyError(f"only {self._alive_count(now)}/{self.topo.num_gpus} ranks are alive")

    def load_placement(self, path: str, *, dry_run: bool, now: float, req_id: int = 0,
                       moe_layers: Sequence[int] = (), num_hidden_layers: int = 0):
        self._require_group()
        new = read_placement_file(_placement_path(path))
        if moe_layers:  # a row per decoder layer (SGLang's): keep the MoE layers' rows
            from eplbd.integrations.sglang import LayerAxis

            axis = LayerAxis(num_hidden_layers or max(moe_layers) + 1, tuple(moe_layers), "moe_layers")
            new = axis.moe_placement(new, where=f"placement file {path!r}")
        want = (self.topo.num_layers, self.topo.num_physical)
        if tuple(new.shape) != want:
            raise InvalidArgumentError(f"placement in {path!r} has shape {list(new.shape)}, the group needs {list(want)}")
        validate_placement(new, self.topo.num_logical, self.topo.num_gpus, self.topo.num_layers)
        if not dry_run:
            self._check_can_start(now)
        load = torch.from_numpy(self.window.logical_load())
        before = predicted_balancedness(load, self.phy2log, self.topo.num_gpus).numpy()
        after = predicted_balancedness(load, new, self.topo.num_gpus).numpy()
        changed = [l for l in range(self.topo.num_layers) if not torch.equal(new[l], self.phy2log[l])]
        prop = Proposal(new, changed, before, after, moved_slots(self.phy2log, new, self.topo.num_gpus).numpy(),
                        bool(changed), f"placement loaded from {path}" if changed else
                        f"placement in {path} equals the current one", "file")
        return self._proposal_reply(prop, dry_run, req_id, "load placement")

    def get_plan(self, epoch: int | None, plan_id: int | None) -> PlanRecord:
        if plan_id is not None:
            rec = self.plans.get(plan_id)
        elif epoch is not None:
            rec = next((p for p in reversed(self.plans.values()) if p.epoch == epoch), None)
        else:
            rec = next(reversed(self.plans.values()), None) if self.plans else None
        if rec is None:
            raise NotFoundError(f"no plan with epoch={epoch} plan_id={plan_id} (plans: {sorted(self.plans)})")
        return rec

    def get_placement(self, epoch: int | None) -> torch.Tensor:
        self._require_group()
        e = self.epoch if epoch is None else epoch
        p = self.placements.get(e)
        if p is None or (e > self.epoch):
            raise NotFoundError(f"no placement for epoch {e} (current epoch {self.epoch})")
        return p

    def dump_window(self, path: str) -> tuple[str, int]:
        """Write the window as a trace file; returns ``(path written, steps)``."""
        real, write = self.dump_window_job(path)
        return real, write()

    def dump_window_job(self, path: str) -> tuple[str, Callable[[], int]]:
        """Check ``path`` and copy the window; returns the path that will be written (``.npz`` appended
        when missing, as numpy does) and the write itself (compression: for an executor)."""
        self._require_group()
        p = operator_path(path, "write")
        if p.suffix != ".npz":
            p = p.with_name(p.name + ".npz")
        if not p.parent.is_dir():
            raise InvalidArgumentError(f"cannot write {str(p)!r}: directory {str(p.parent)!r} does not exist")
        if p.is_dir():
            raise InvalidArgumentError(f"cannot write {str(p)!r}: it is a directory")
        steps, load = self.window.steps_logical()
        meta = {"source": "eplbd dump", "daemon_id": self.daemon_id, "epoch": self.epoch,
                "ep_size": self.topo.num_gpus}

        def write() -> int:
            try:
                save_trace(p, load, steps=steps, meta=meta)
            except OSError as exc:  # permissions, a full disk: the operator's problem to fix, not a daemon bug
                raise InvalidArgumentError(f"cannot write {str(p)!r}: {exc.strerror or exc}") from None
            return int(steps.size)

        return str(p), write
