"""What a demo run reports: the summary of every rank's ``run_rank`` result and the daemon's final status,
its printed form, and the one-line live progress; shared by ``eplbd demo`` and ``eplbd launch``."""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from eplbd.refengine.demo_rank import DemoConfig


def aggregate_balancedness(loads: np.ndarray, num_ranks: int) -> float:
    """vLLM-style balancedness of summed per-rank loads: sum_l mean_r / sum_l max_r.

    ``loads [steps, layers, num_physical]``: per-rank sums are placement-independent, so steps
    recorded under different placements add up correctly.
    """
    from eplbd.policy.balance import layer_balancedness, rank_loads, summarize

    if loads.shape[0] == 0:
        return float("nan")
    per_rank = rank_loads(loads.sum(axis=0, dtype=np.int64), num_ranks)
    return summarize(layer_balancedness(per_rank), per_rank).aggregate


def progress_line(client: Any) -> str:
    """One line of live daemon state (step, epoch, balancedness, plan, reports) for a console."""
    from eplbd.errors import EplbdError
    try:
        st = client.status()
    except EplbdError as exc:
        return f"daemon: {exc}"
    try:
        bal = f"{client.balancedness().observed.aggregate:.3f}"
    except EplbdError:
        bal = "  n/a"
    plan = st.current_plan
    plan_s = f"plan {plan.plan_id} {plan.state}" if plan else "no plan yet"
    return (f"step {st.step:5d}  epoch {st.epoch}  balancedness {bal}  {plan_s}  "
            f"reports {st.reports_received} (dropped {st.reports_dropped})")


def summarize_ranks(cfg: DemoConfig, results: dict[int, dict], status: Any, wall_s: float) -> dict:
    """The run summary (what `eplbd demo --json` prints) from every rank's `run_rank` result and the
    daemon's final status (None without a daemon). Ranks that died (fault tests) are left out,
    and steps are counted up to where every remaining rank got."""
    ranks = sorted(results)
    n = min(len(results[r]["loads"]) for r in ranks)
    loads = sum(results[r]["loads"][:n].astype(np.int64) for r in ranks)
    first = min((res["first_apply"] for res in results.values() if res["first_apply"] >= 0), default=-1)
    before = aggregate_balancedness(loads[:first if first >= 0 else cfg.steps], cfg.ranks)
    after = aggregate_balancedness(loads[-cfg.window_size:], cfg.ranks)
    stats = [results[r]["stats"] for r in ranks]
    step_s = np.stack([results[r]["step_s"][:n] for r in ranks]).max(axis=0)
    apply_s = [x for s in stats for x in s["apply_s"]]
    rep = [results[r]["reporter"] for r in ranks]
    plans = status.current_plan if status is not None else None
    return {
        "ranks": cfg.ranks, "steps": n, "communicator": results[ranks[0]]["communicator"],
        "use_async": cfg.use_async, "routing": cfg.routing,
        "balancedness_before": round(before, 4), "balancedness_after": round(after, 4),
        "first_rearrangement_step": first,
        "plans_committed": stats[0]["plans_committed"], "plans_aborted": stats[0]["plans_aborted"],
        "daemon_epoch": status.epoch if status is not None else None, "last_plan": plans.state if plans else None,
        "experts_moved": sum(s["slots_changed"] for s in stats),
        "experts_transferred": sum(s["experts_received"] for s in stats),
        "bytes_moved": sum(s["bytes_received"] for s in stats),
        "reports_dropped": (int(status.reports_dropped) if status is not None else 0) + sum(r["dropped"] for r in rep),
        "steps_reported": sum(r["sent"] for r in rep), "steps_recorded": sum(r["recorded"] for r in rep),
        "outputs_identical": all(results[r]["mismatches"] == 0 for r in ranks),
        "probes": results[ranks[0]]["probes"],
        "weights_checked": cfg.check_weights,
        "weights_ok": all(not results[r]["bad_weights"] for r in ranks),
        "bad_weights": [b for r in ranks for b in results[r]["bad_weights"]][:10],
        "placements_agree": all(np.array_equal(results[r]["phy2log"], results[ranks[0]]["phy2log"])
                                for r in ranks),
        "step_ms_p50": round(float(np.percentile(step_s, 50)) * 1e3, 3),
        "step_ms_p99": round(float(np.percentile(step_s, 99)) * 1e3, 3),
        "step_ms_max": round(float(step_s.max()) * 1e3, 3),
        "apply_ms_max": round(max(apply_s, default=0.0) * 1e3, 3),
        "steps_per_s": round(n / float(step_s.sum()), 1),
        "wall_s": round(wall_s, 1),
    }


def print_summary(s: dict, out=sys.stdout) -> None:
    ok = "yes" if s["outputs_identical"] else "NO"
    print(f"\n{s['ranks']} ranks x {s['steps']} steps, communicator {s['communicator']}, "
          f"{'async' if s['use_async'] else 'blocking'}, routing: {s['routing']}", file=out)
    print(f"  balancedness before the first rearrangement : {s['balancedness_before']:.3f}", file=out)
    print(f"  balancedness over the last window           : {s['balancedness_after']:.3f}", file=out)
    print(f"  plans committed / aborted                   : {s['plans_committed']} / {s['plans_aborted']}", file=out)
    print(f"  experts moved (slots changed) / transferred : {s['experts_moved']} / {s['experts_transferred']} "
          f"({s['bytes_moved'] / 1e6:.1f} MB over the wire)", file=out)
    print(f"  load reports dropped                        : {s['reports_dropped']}", file=out)
    print(f"  probe outputs identical after every commit  : {ok} ({s['probes']} probes)", file=out)
    print(f"  step time p50 / p99 / max                   : {s['step_ms_p50']:.2f} / {s['step_ms_p99']:.2f} / "
          f"{s['step_ms_max']:.2f} ms (apply at most {s['apply_ms_max']:.2f} ms)", file=out)
