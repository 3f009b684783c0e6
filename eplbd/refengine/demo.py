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
messages, and throttle a rank's load sender). One rank's loop is ``demo_rank.run_rank``; the
summary and its printing are in ``demo_summary``.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import pathlib
import queue
import threading
import time
import traceback
from typing import Any, Callable

from eplbd.refengine.demo_rank import DEFAULT_TRACE, DemoConfig, run_rank
from eplbd.refengine.demo_summary import print_summary, progress_line, summarize_ranks

__all__ = ["DEFAULT_TRACE", "DemoConfig", "main_from_args", "print_summary", "progress_line", "run_demo", "run_rank",
           "summarize_ranks", "tie_to_parent"]


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
