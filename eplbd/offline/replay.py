"""Offline evaluation: run the daemon's window and schedule over a load trace.

No sockets and no workers: each trace row is one step of global logical load.
The load a step puts on each rank is what the placement in force at that step
makes of it, each logical expert's tokens split evenly over its replicas (the
same assumption the policies plan with). A plan accepted at step ``s`` serves
from step ``s + 1``, as a committed plan would in the daemon.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import torch

from eplbd.config import EplbConfig
from eplbd.errors import InvalidArgumentError
from eplbd.policy import derive_log2phy, initial_placement
from eplbd.daemon.scheduler import SchedulerState, Topology, decide, propose
from eplbd.offline.trace import Trace
from eplbd.daemon.window import LoadWindow


def step_balancedness(load: np.ndarray, phy2log: np.ndarray, num_gpus: int) -> np.ndarray:
    """Balancedness of each step and layer under one placement.

    Args:
        load: ``[steps, layers, num_logical]`` logical load.
        phy2log: ``[layers, num_physical]`` int64 placement.
        num_gpus: ranks in the EP group.

    Returns:
        ``[steps, layers]`` float64, mean rank load / max rank load (1.0 when a
        layer has no load in that step).
    """
    steps, layers, num_logical = load.shape
    _, logcnt = derive_log2phy(torch.as_tensor(phy2log), num_logical)
    per_replica = load / logcnt.numpy()[None].astype(np.float64)
    idx = np.broadcast_to(phy2log[None], (steps,) + phy2log.shape)
    phys = np.take_along_axis(per_replica, idx, axis=2)
    ranks = phys.reshape(steps, layers, num_gpus, -1).sum(-1)
    mx = ranks.max(-1)
    mean = ranks.mean(-1)
    return np.where(mx > 0, mean / np.where(mx > 0, mx, 1.0), 1.0)


@dataclass
class ReplayResult:
    policy: str
    steps: int
    num_layers: int
    num_logical: int
    num_physical: int
    num_gpus: int
    mean_balancedness_static: float
    mean_balancedness: float
    rebalances: int
    skipped: int
    moved_slots: int
    total_slots: int
    policy_s_total: float
    policy_ms_mean: float
    decisions: list[dict] = field(default_factory=list)
    expert_bytes: int = 0
    moved_bytes: int = 0
    # [steps] balancedness of each step (mean over layers): what --plot draws; not in as_dict().
    per_step: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)
    per_step_static: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)

    def as_dict(self, *, with_decisions: bool = True) -> dict:
        d = {k: v for k, v in asdict(self).items() if k not in ("per_step", "per_step_static")}
        if not with_decisions:
            d.pop("decisions")
        return d


def replay(trace: Trace, topo: Topology, config: EplbConfig, *, policy: str | None = None,
           placement: str = "linear", expert_bytes: int = 0,
           progress: Callable[[int, int], None] | None = None) -> ReplayResult:
    """Replay ``trace`` through the window and schedule with one policy.

    Args:
        trace: ``load [steps, layers, num_logical]``.
        topo: EP group shape; ``num_physical = num_logical + config.num_redundant_experts``.
        config: window size, step interval, gating.
        policy: overrides ``config.policy``.
        placement: initial placement strategy (``linear`` or ``round_robin``).
        expert_bytes: bytes of one expert, for moved bytes and the transfer-cost gate (0 = unknown).
        progress: called as ``progress(done_steps, total_steps)`` now and then.
    """
    load = trace.load
    if (trace.num_layers, trace.num_logical) != (topo.num_layers, topo.num_logical):
        raise InvalidArgumentError(
            f"trace shape [layers={trace.num_layers}, experts={trace.num_logical}] does not match "
            f"topology [layers={topo.num_layers}, experts={topo.num_logical}]")
    name = policy or config.policy
    init = initial_placement(topo.num_layers, topo.num_logical, topo.num_physical, topo.num_gpus,
                             placement).numpy()
    static = step_balancedness(load, init, topo.num_gpus)

    window = LoadWindow(config.window_size, topo.num_layers, topo.num_logical, topo.num_physical)
    current = init
    segments: list[tuple[int, np.ndarray]] = [(0, current)]
    last_plan_step, rebalances, skipped, moved, policy_s = -1, 0, 0, 0, 0.0
    decisions: list[dict] = []
    n = load.shape[0]
    for s in range(n):
        window.add_logical(s, load[s])
        d = decide(0.0, SchedulerState(step=s, last_plan_step=last_plan_step, window_fill=window.fill),
                   config)
        if d.action == "plan":
            last_plan_step = s
            prop = propose(window.logical_load(), torch.from_numpy(current), topo, config, policy=name,
                           expert_bytes=expert_bytes)
            policy_s += prop.policy_s
            decisions.append({"step": s, "accepted": prop.accept, "reason": prop.reason,
                              "predicted_before": float(prop.before.mean()),
                              "predicted_after": float(prop.after.mean()),
                              "moved_slots": int(prop.moved_slots.sum()), "moved_bytes": prop.moved_bytes,
                              "policy_ms": 1e3 * prop.policy_s})
            if prop.accept:
                rebalances += 1
                moved += int(prop.moved_slots.sum())
                current = prop.phy2log.numpy()
                segments.append((s + 1, current))
            else:
                skipped += 1
        if progress is not None and (s + 1) % 500 == 0:
            progress(s + 1, n)

    dynamic = np.empty_like(static)
    bounds = [start for start, _ in segments] + [n]
    for (start, placement_arr), end in zip(segments, bounds[1:]):
        if end > start:
            dynamic[start:end] = step_balancedness(load[start:end], placement_arr, topo.num_gpus)
    calls = rebalances + skipped
    return ReplayResult(
        policy=name, steps=n, num_layers=topo.num_layers, num_logical=topo.num_logical,
        num_physical=topo.num_physical, num_gpus=topo.num_gpus,
        mean_balancedness_static=float(static.mean()) if n else 1.0,
        mean_balancedness=float(dynamic.mean()) if n else 1.0,
        rebalances=rebalances, skipped=skipped, moved_slots=moved,
        total_slots=topo.num_layers * topo.num_physical,
        policy_s_total=policy_s, policy_ms_mean=1e3 * policy_s / calls if calls else 0.0,
        decisions=decisions, expert_bytes=int(expert_bytes), moved_bytes=moved * int(expert_bytes),
        per_step=dynamic.mean(axis=1) if n else np.zeros(0),
        per_step_static=static.mean(axis=1) if n else np.zeros(0))


def stderr_progress(min_interval_s: float = 1.0) -> Callable[[int, int], None]:
    """A progress callback printing at most one line per ``min_interval_s`` to stderr."""
    last = [0.0]

    def report(done: int, total: int) -> None:
        now = time.monotonic()
        if now - last[0] >= min_interval_s or done == total:
            last[0] = now
            print(f"replay: step {done}/{total} ({100 * done / max(total, 1):.0f}%)", file=sys.stderr,
                  flush=True)

    return report


def plot_balancedness(results: list[ReplayResult], path: str, *, smooth: int = 50) -> list[str]:
    """Write a PNG of balancedness over steps, one line per policy plus the static placement.

    Args:
        results: replays of one trace (``per_step`` filled).
        path: PNG file to write.
        smooth: steps in the moving average drawn (per-step values are noisy).

    Returns:
        The labels of the lines drawn, in order.

    Raises:
        InvalidArgumentError: matplotlib is not installed (``pip install 'eplbd[plot]'``).
    """
    try:
        import matplotlib
    except ImportError:
        raise InvalidArgumentError("--plot needs matplotlib: pip install 'eplbd[plot]'") from None
    matplotlib.use("Agg")  # no display: write files only
    from matplotlib.figure import Figure

    def avg(x: np.ndarray) -> np.ndarray:
        k = max(1, min(smooth, x.size))
        return np.convolve(x, np.ones(k) / k, mode="valid")

    fig = Figure(figsize=(9, 4.5), dpi=100)
    ax = fig.add_subplot()
    labels = []
    for r in results:
        label = f"{r.policy} (mean {r.mean_balancedness:.3f}, {r.moved_slots} slots moved)"
        ax.plot(np.arange(avg(r.per_step).size) + smooth // 2, avg(r.per_step), label=label, linewidth=1.2)
        labels.append(label)
    if results:
        static = f"static (mean {results[0].mean_balancedness_static:.3f})"
        line = avg(results[0].per_step_static)
        ax.plot(np.arange(line.size) + smooth // 2, line, label=static, color="grey", linestyle="--", linewidth=1)
        labels.append(static)
    ax.set_xlabel("step")
    ax.set_ylabel(f"balancedness (mean/max rank load, {smooth}-step average)")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return labels
