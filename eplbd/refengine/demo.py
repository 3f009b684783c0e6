"""``eplbd demo``: the whole loop on one machine.

An embedded daemon (a real ``Daemon`` on loopback, in a thread of this process) and N
worker processes of the reference EP MoE model (``eplbd.refengine.model``), one per rank, in a
real gloo group. Tokens are routed by the real GPT-OSS-20B routing trace, so the load
is real. Each rank runs a ``PlacementAgent``: it streams load, receives the daemon's
plans, stages experts on its background thread and commits in-band.

Every time a plan is applied, all ranks run a fixed probe batch and compare its output
bitwise with the output before any rearrangement (the invariant: moving experts never
changes what the model computes). With ``check_weights`` they also compare every slot's
tensors with the original expert weights.

``run_demo`` is also what the integration tests drive (smaller shapes, fault injection: see
``eplbd.refengine.faults`` for the options that kill ranks or the daemon, cut, duplicate or reorder
messages, and throttle a rank's load sender).
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
import os
import pathlib
import queue
import sys
import threading
import time
import traceback
from typing import Any, Callable

import numpy as np

DEFAULT_TRACE = pathlib.Path(__file__).resolve().parents[2].parent / "shared" / "data" / "gpt_oss_20b" / \
    "gptoss20b_decode_routing_tokens.npz"


@dataclasses.dataclass
class DemoConfig:
    ranks: int = 4
    steps: int = 600
    communicator: str = "auto"
    use_async: bool = True
    layers: int = 8  # the first 8 of GPT-OSS-20B's 24 MoE layers: keeps the demo to well under a minute
    num_logical: int = 32
    top_k: int = 4
    num_redundant: int = 8
    hidden: int = 64
    ffn: int = 128
    tokens_per_rank: int = 32
    routing: str = "trace"  # "trace" (GPT-OSS routing file) or "router" (the model's own router)
    trace: str = str(DEFAULT_TRACE)
    window_size: int = 100
    step_interval: int = 150
    commit_interval_steps: int = 8
    staging_budget_bytes: int | None = None
    policy: str = "default"
    chaos_delay_s: float = 0.0
    chaos_fail_batch: int = -1
    check_weights: bool = False
    seed: int = 0
    timeout_s: float = 300.0
    daemon: bool = True  # False: workers get endpoints nobody serves (the engine must not care)
    # -- fault injection (tests; see eplbd.refengine.faults) --
    chaos_rank: int = 1  # the rank chaos_fail_batch, chaos_kill_batch and chaos_report_delay_s apply to
    chaos_kill_batch: int = -1  # chaos_rank SIGKILLs itself as its n-th transfer batch starts
    chaos_dup_p: float = 0.0  # messages duplicated both ways (daemon pushes, rank replies)
    chaos_reorder_p: float = 0.0  # messages reordered both ways
    chaos_report_delay_s: float = 0.0  # chaos_rank's load sender sleeps this long per report
    report_max_pending_steps: int = 1024
    collective_timeout_s: float = 60.0  # the agent's gloo groups and transfer batches give up on a dead peer
    rpc_timeout_s: float = 5.0
    heartbeat_s: float = 1.0
    daemon_process: bool = False  # the daemon in its own process, on fixed endpoints (killable)
    state_dir: str | None = None
    daemon_settings: dict = dataclasses.field(default_factory=dict)  # more daemon settings
    daemon_cut: dict = dataclasses.field(default_factory=dict)  # the first daemon's MessageChaos.cut
    until_stopped: bool = False  # step until DemoHarness.stop_workers() (``steps`` is still the limit)
    step_sleep_s: float = 0.0


# -- one rank --------------------------------------------------------------------------------
def run_rank(rank: int, cfg: DemoConfig, rpc: str, ingest: str, *, stop_event: Any = None,
             step_value: Any = None) -> dict:
    """Run one EP rank of the reference model with a ``PlacementAgent`` for ``cfg.steps`` steps.

    The default process group must already be a gloo group of ``cfg.ranks`` ranks (the demo's
    worker processes and ``eplbd.refengine`` under torchrun both set one up, then call this).

    Args:
        rank: this process's rank in the group.
        cfg: model shape, routing, agent options and step count (the daemon-side fields are unused).
        rpc: the daemon's ROUTER endpoint.
        ingest: the daemon's PULL endpoint.
        stop_event, step_value: a ``DemoHarness``'s stop flag (``cfg.until_stopped``) and step counter.

    Returns:
        This rank's results: ``loads [steps, layers, num_physical] int32`` (load view per step),
        ``step_s [steps]``, ``phy2log [layers, num_physical]`` at the end, probe counts and
        mismatches, agent and reporter statistics; after losing a peer (``cfg.chaos_kill_batch``),
        ``survivor`` (``eplbd.refengine.faults.survivor_report``).
    """
    import torch
    import torch.distributed as dist

    from eplbd.client.agent import Chaos, PlacementAgent, placement_check
    from eplbd.refengine.faults import agreed_stop, group_lost, survivor_report
    from eplbd.policy import initial_placement
    from eplbd.refengine.model import RefMoEConfig, RefMoEModel, logical_expert_weights, make_inputs, TraceRouting

    torch.set_num_threads(1)
    agent = None
    try:
        mcfg = RefMoEConfig(num_layers=cfg.layers, hidden=cfg.hidden, ffn=cfg.ffn, num_logical=cfg.num_logical,
                            top_k=cfg.top_k, num_redundant=cfg.num_redundant, ep_size=cfg.ranks, seed=cfg.seed)
        P = cfg.num_logical + cfg.num_redundant
        phy2log = initial_placement(cfg.layers, cfg.num_logical, P, cfg.ranks, "linear")
        model = RefMoEModel(mcfg, rank, dist.group.WORLD, phy2log)
        originals = logical_expert_weights(mcfg) if cfg.check_weights else None
        mine = rank == cfg.chaos_rank
        chaos = Chaos(cfg.chaos_delay_s, seed=rank, fail_batch=cfg.chaos_fail_batch if mine else -1,
                      kill_batch=cfg.chaos_kill_batch if mine else -1, dup_p=cfg.chaos_dup_p,
                      reorder_p=cfg.chaos_reorder_p, report_delay_s=cfg.chaos_report_delay_s if mine else 0.0)
        agent = PlacementAgent(model, rank=rank, ep_size=cfg.ranks, rpc=rpc, ingest=ingest, phy2log=phy2log,
                               commit_interval_steps=cfg.commit_interval_steps, communicator=cfg.communicator,
                               use_async=cfg.use_async, staging_budget_bytes=cfg.staging_budget_bytes, chaos=chaos,
                               timeout=cfg.rpc_timeout_s, heartbeat_s=cfg.heartbeat_s,
                               collective_timeout_s=cfg.collective_timeout_s,
                               report_max_pending_steps=cfg.report_max_pending_steps)
        agent.start()
        deadline = time.monotonic() + (30 if cfg.daemon else 0)
        while agent.stats.registrations == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        routing = TraceRouting.for_config(mcfg, cfg.trace, tokens_per_rank=cfg.tokens_per_rank, seed=cfg.seed) \
            if cfg.routing == "trace" else None
        dist.barrier()

        def batch(step: int, r: int):
            if routing is None:
                return make_inputs(mcfg, step, r, cfg.tokens_per_rank), None
            ids = routing.rank_batch(step, r)
            return make_inputs(mcfg, step, r, ids.shape[0]), ids

        probe_x, probe_ids = batch(10**6, rank)  # a batch no step uses
        probe_ref = model.forward(probe_x, probe_ids)
        loads = np.zeros((cfg.steps, cfg.layers, P), np.int32)
        step_s = np.zeros(cfg.steps)
        probes = mismatches = 0
        bad_weights: list[str] = []
        first_apply = -1
        survivor = None
        steps_run = 0
        for step in range(cfg.steps):
            t0 = time.perf_counter()
            base = (agent.epoch, agent.phy2log.clone()) if cfg.chaos_kill_batch >= 0 else None
            applied_before = agent.stats.layers_applied
            try:
                x, ids = batch(step, rank)
                model.forward(x, ids)
                loads[step] = agent.load_view.numpy()
                agent.after_step(step)
            except BaseException as exc:
                if base is None or not group_lost(exc):
                    raise
                survivor = survivor_report(agent, model, mcfg, *base, step, exc, cfg.collective_timeout_s)
                break
            steps_run = step + 1
            if step_value is not None:
                step_value.value = step
            step_s[step] = time.perf_counter() - t0
            if agent.stats.layers_applied != applied_before:  # the same on every rank (agreed in-band)
                first_apply = step if first_apply < 0 else first_apply
                probes += 1
                mismatches += int(not torch.equal(model.forward(probe_x, probe_ids), probe_ref))
                if originals is not None:
                    bad_weights += placement_check(model.expert_weights, originals, agent.phy2log, rank,
                                                   model.num_local_physical_experts)
            if cfg.step_sleep_s:
                time.sleep(cfg.step_sleep_s)
            if cfg.until_stopped and (step + 1) % cfg.commit_interval_steps == 0 and agreed_stop(stop_event):
                break
        if survivor is None:
            dist.barrier()
        agent.reporter.flush()
        time.sleep(0.3)  # let the last reports and acks go out
        agent.close()
        s = agent.stats
        loads, step_s = loads[:steps_run], step_s[:steps_run]
        return {
            "survivor": survivor, "sent_steps": getattr(agent.reporter, "sent_steps", None),
            "loads": loads, "step_s": step_s, "probes": probes, "mismatches": mismatches,
            "bad_weights": bad_weights[:20], "first_apply": first_apply, "epoch": agent.epoch,
            "phy2log": agent.phy2log.numpy().copy(), "communicator": agent.communicator,
            "stats": {k: v for k, v in dataclasses.asdict(s).items()},
            "reporter": {"recorded": agent.reporter.steps_recorded, "sent": agent.reporter.steps_sent,
                         "dropped": agent.reporter.steps_dropped, "reports": agent.reporter.reports_sent},
        }
    except BaseException:
        if agent is not None:
            try:
                agent.close()
            except Exception:
                pass
        raise


def tie_to_parent() -> None:
    """In a process ``eplbd demo`` spawned: get SIGTERM when the demo exits, even by SIGKILL (as
    ``eplbd launch``'s children do), and leave at once if it is gone already."""
    from eplbd.refengine.procs import die_with_parent

    die_with_parent()
    parent = mp.parent_process()
    if parent is not None and os.getppid() != parent.pid:
        os._exit(1)


def _worker(rank: int, cfg: DemoConfig, port: int, rpc: str, ingest: str, out_q: Any, stop_event: Any = None,
            step_value: Any = None) -> None:
    import datetime

    import torch.distributed as dist

    tie_to_parent()  # a rank blocked in a collective would otherwise outlive a killed demo forever
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=cfg.ranks,
                                timeout=datetime.timedelta(seconds=cfg.collective_timeout_s))
        result = run_rank(rank, cfg, rpc, ingest, stop_event=stop_event, step_value=step_value)
        out_q.put(("done", rank, result))
        if result["survivor"] is not None:
            # The group lost a rank: tearing it down can wait on the dead peer for seconds. What had
            # to be said is said; leave now.
            out_q.close()
            out_q.join_thread()
            os._exit(0)
        dist.destroy_process_group()
    except BaseException as exc:  # surfaced by the parent
        out_q.put(("error", rank, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))


# -- parent ------------------------------------------------------------------------------------
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


def run_demo(cfg: DemoConfig, progress: Callable[[str], None] | None = None, hooks: Any = None) -> dict:
    """Run the demo; returns the summary (see ``eplbd demo --json``).

    ``hooks`` (an ``eplbd.refengine.faults.DemoHooks``) run fault scenarios against the run: their
    results are in the summary under ``"during"`` and ``"after"``. A rank told to kill itself
    (``cfg.chaos_kill_batch``) is expected to die; the summary covers the others.
    """
    from eplbd.client.rpc import EplbClient
    from eplbd.refengine.faults import DemoHarness
    from eplbd.errors import EplbdError

    if cfg.routing == "trace" and not pathlib.Path(cfg.trace).is_file():
        from eplbd.errors import TraceError
        raise TraceError(f"routing trace {cfg.trace!r} not found (pass --trace or --routing router)")
    ctx = mp.get_context("spawn")
    h = DemoHarness(cfg, ctx)
    out_q = ctx.Queue()
    from eplbd.refengine.embedded import free_port

    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, cfg, port, h.rpc, h.ingest, out_q, h.stop_event, h.step_value),
                         daemon=True) for r in range(cfg.ranks)]
    may_die = {cfg.chaos_rank} if cfg.chaos_kill_batch >= 0 else set()
    t0 = time.monotonic()
    for p in procs:
        p.start()
    results: dict[int, dict] = {}
    errors: list[str] = []
    extra: dict[str, Any] = {}
    during = _start_hook(hooks and hooks.during, h, extra, errors, "during")
    last_print = 0.0
    status = None
    try:
        with EplbClient(h.rpc, timeout=5) as client:
            while len(results) + len(errors) < cfg.ranks:
                dead = {r for r, p in enumerate(procs) if not p.is_alive() and p.exitcode not in (0, None)}
                if len(results) + len(dead & may_die) == cfg.ranks:
                    break
                if time.monotonic() - t0 > cfg.timeout_s:
                    errors.append(f"timed out after {cfg.timeout_s:g}s")
                    break
                try:
                    msg = out_q.get(timeout=0.2)
                except queue.Empty:
                    msg = None
                    if dead - may_die and out_q.empty():
                        errors.append("a worker process died: exit codes "
                                      f"{[p.exitcode for p in procs]}")
                        break
                if msg is not None and msg[0] == "done":
                    results[msg[1]] = msg[2]
                elif msg is not None and msg[0] == "error":
                    errors.append(f"rank {msg[1]}: {msg[2]}")
                if progress is not None and cfg.daemon and time.monotonic() - last_print > 1.0:
                    last_print = time.monotonic()
                    progress(progress_line(client))
            if during is not None:
                during.join(cfg.timeout_s)
            if hooks is not None and hooks.after is not None and not errors:
                _run_hook(lambda: hooks.after(h, results), extra, errors, "after")
            if cfg.daemon:
                try:
                    status = client.status()
                except EplbdError as exc:
                    errors.append(f"final status: {exc}")
    finally:
        h.stop_workers()
        for p in procs:
            p.join(15)
            if p.is_alive():
                p.kill()
        h.close()
    if errors:
        raise RuntimeError("demo failed:\n" + "\n".join(errors))
    summary = summarize_ranks(cfg, results, status, time.monotonic() - t0)
    summary["exit_codes"] = [p.exitcode for p in procs]
    return {**summary, **extra}


def _run_hook(fn: Callable[[], Any], extra: dict, errors: list, name: str) -> None:
    try:
        extra[name] = fn()
    except BaseException as exc:  # surfaced by run_demo
        errors.append(f"{name} hook: {type(exc).__name__}: {exc}\n{traceback.format_exc()}")


def _start_hook(fn: Callable[[Any], Any] | None, h: Any, extra: dict, errors: list, name: str):
    """Run ``fn(h)`` on a thread; once it returns (or fails), the workers are told to stop."""
    if fn is None:
        return None

    def body() -> None:
        _run_hook(lambda: fn(h), extra, errors, name)
        h.stop_workers()

    t = threading.Thread(target=body, name=f"demo-{name}", daemon=True)
    t.start()
    return t


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


def main_from_args(args: Any) -> int:
    cfg = DemoConfig(ranks=args.ranks, steps=args.steps, layers=args.layers, communicator=args.communicator,
                     use_async=not args.blocking, trace=args.trace, routing=args.routing,
                     check_weights=args.check_weights)
    progress = None if args.json else (lambda line: print(line, flush=True))
    if not args.json:
        print(f"eplbd demo: embedded daemon + {cfg.ranks} worker processes of the reference MoE model "
              f"({cfg.layers} layers x {cfg.num_logical} experts + {cfg.num_redundant} redundant, top-{cfg.top_k}), "
              f"{cfg.steps} steps", flush=True)
    summary = run_demo(cfg, progress)
    if args.json:
        print(json.dumps(summary))
    else:
        print_summary(summary)
    return 0 if summary["outputs_identical"] else 1

