"""Ingest throughput of a real ``eplbd serve`` subprocess against a bare pyzmq PUSH/PULL ceiling.

Shape: 64 simulated ranks (one sender process owning 64 ``WorkerLink``s), DeepSeek-V3 sized
reports: 58 layers x 256 logical experts. DSV3's usual 288 physical slots do not divide by 64
ranks, so this uses 320 physical slots (256 logical + 64 redundant, 5 per rank): each message is
an int32 load tensor ``[B, 58, 320]`` (B steps batched per report, ``--batch``, default 8).

Two phases in the same run (same sender process structure, same frame sizes):

1. ceiling: a bare receiver process (PULL, ``recv_multipart(copy=False)``, counting only) fed
   frames encoded once per rank with ``eplbd.proto.Encoder`` and resent as-is.
2. daemon: ``python -m eplbd.cli serve`` as a subprocess; the 64 ranks register, then stream
   ``WorkerLink.send_report`` (non-blocking; local drops counted). Meanwhile this process issues
   ``status`` and ``balancedness`` back to back through ``EplbClient`` and records latency.

Throughput is reports received / (time from "go" to the moment the receiver had everything),
so a backlog queued inside libzmq is paid for. The reports_received slope seen by the status
calls while senders run is printed as well. CPU: /proc/<pid>/stat utime+stime.

Safety valve: libzmq queues up to rcvhwm messages *per connected peer* on the PULL side, so a
daemon slower than the senders could buffer gigabytes. If a receiver's RSS exceeds
``--max-rss-gb`` the senders pause until it falls; paused time is reported.

    .venv/bin/python benchmarks/bench_ingest.py [--seconds 10 | --steps N] [--batch 8] [--json]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time

from daemon_bench import (LAYERS, LOGICAL, TOKENS_PER_RANK_STEP, Children, SendCounter, child_get, emit, pcts,
                          proc_cpu_s, proc_rss_gb, reconcile, spread_over_replicas, start_daemon)

PHYSICAL, RANKS = 320, 64
VARIANTS = 4  # pre-generated load tensors cycled by the senders (no RNG in the hot loop)


# -- load tensors ---------------------------------------------------------------------------
def make_loads(batch: int, seed: int = 0):
    """VARIANTS int32 tensors [batch, LAYERS, PHYSICAL]: Zipf-skewed logical counts per layer,
    split evenly over each expert's replicas under the initial linear placement."""
    import numpy as np
    import torch

    from eplbd.policy import initial_placement

    rng = np.random.default_rng(seed)
    phy2log = initial_placement(LAYERS, LOGICAL, PHYSICAL, RANKS).numpy()
    ranks = np.arange(1, LOGICAL + 1, dtype=np.float64)
    out = []
    for _ in range(VARIANTS):
        logical = np.empty((batch, LAYERS, LOGICAL), np.int64)
        for layer in range(LAYERS):
            p = ranks ** -1.1
            p = rng.permutation(p / p.sum())
            logical[:, layer] = rng.multinomial(TOKENS_PER_RANK_STEP, p, size=batch)
        out.append(torch.from_numpy(spread_over_replicas(logical, phy2log)))
    return phy2log, out


# -- child processes (module level so that spawn can import them) ------------------------
def sender_main(mode: str, rpc: str, ingest: str, cfg: dict, result_q, go, pause, stop, exit_ev) -> None:
    """One process, 64 ranks. mode 'daemon': WorkerLink per rank (register, send_report).
    mode 'bare': 64 PUSH sockets (same options as WorkerLink's) resending pre-encoded frames."""
    import torch
    import zmq

    from eplbd.client.worker import WorkerLink
    from eplbd.proto import Encoder, LoadReport, make_socket

    try:
        B, n = cfg["batch"], cfg["ranks"]
        phy2log_np, loads = make_loads(B)
        phy2log = torch.from_numpy(phy2log_np)
        ctx = zmq.Context()
        links, socks, frames = [], [], []
        if mode == "daemon":
            links = [WorkerLink(rpc, ingest, r, timeout=10, report_hwm=cfg["hwm"], ctx=ctx) for r in range(n)]
            for link in links:
                link.register(ep_size=n, num_layers=LAYERS, num_logical=LOGICAL, num_physical=PHYSICAL,
                              epoch=0, phy2log=phy2log, expert_bytes=0)
            msg_bytes = sum(len(memoryview(f).cast("B")) for f in Encoder().encode(LoadReport(
                rank=0, worker_id=links[0].worker_id, epoch=0, first_step=0, seq=0, load=loads[0])))
        else:
            enc = Encoder()
            for r in range(n):
                s = make_socket(ctx, zmq.PUSH, connect=ingest, hwm=cfg["hwm"], linger_ms=0)
                s.poll(5000, zmq.POLLOUT)
                socks.append(s)
                per_rank = []
                for v in range(VARIANTS):
                    fr = enc.encode(LoadReport(rank=r, worker_id=f"bare{r}", epoch=0, first_step=0, seq=0,
                                               load=loads[v]))
                    per_rank.append([bytes(fr[0]), *fr[1:]])
                frames.append(per_rank)
            msg_bytes = sum(len(memoryview(f).cast("B")) for f in frames[0][0])
        result_q.put(("ready", {"msg_bytes": msg_bytes, "pid": os.getpid()}))
        go.wait()

        paused_s = 0.0
        counter = SendCounter(range(n))
        it = 0
        cpu0 = time.process_time()
        t0 = time.monotonic()
        while not stop.is_set():
            now = time.monotonic()
            if cfg["steps"] and it * B >= cfg["steps"]:
                break
            if not cfg["steps"] and now - t0 >= cfg["seconds"]:
                break
            if pause.is_set():
                p0 = time.monotonic()
                while pause.is_set() and not stop.is_set():
                    time.sleep(0.005)
                paused_s += time.monotonic() - p0
            if cfg["rate"]:
                ahead = t0 + paused_s + it * B / cfg["rate"] - time.monotonic()
                if ahead > 0:
                    time.sleep(ahead)
            first = it * B
            for r in range(n):
                v = (it + r) % VARIANTS
                if mode == "daemon":
                    sent = links[r].send_report(first, loads[v], 0)
                else:
                    try:
                        socks[r].send_multipart(frames[r][v], copy=False, flags=zmq.NOBLOCK)
                        sent = True
                    except zmq.Again:
                        sent = False
                counter.record(r, sent)
            it += 1
        t1 = time.monotonic()
        res = {**counter.as_dict(), "iterations": it, "t_go": t0, "t_end": t1, "cpu_s": time.process_time() - cpu0,
               "paused_s": paused_s, "msg_bytes": msg_bytes}
        if links:  # cross-check against WorkerLink's own counters
            res["link_reports_sent"] = sum(x.reports_sent for x in links)
            res["link_reports_dropped"] = sum(x.reports_dropped for x in links)
        result_q.put(("done", res))
        # Keep the sockets open (linger 0 would discard what libzmq still queues) until told.
        exit_ev.wait(120)
        for x in links:
            x.close()
        for s in socks:
            s.close(linger=0)
        ctx.term()
    except BaseException as exc:  # surfaced by the parent
        import traceback
        result_q.put(("error", f"sender: {exc!r}\n{traceback.format_exc()}"))


def receiver_main(result_q, count, bytes_, t_last, exit_ev, max_frame_bytes: int) -> None:
    """Bare PULL: recv_multipart(copy=False) and count, nothing else."""
    import zmq

    from eplbd.proto import bound_endpoint, make_socket

    try:
        ctx = zmq.Context()
        pull = make_socket(ctx, zmq.PULL, bind="tcp://127.0.0.1:0", hwm=10_000, max_msg_size=max_frame_bytes)
        result_q.put(("ready", {"endpoint": bound_endpoint(pull), "pid": os.getpid()}))
        n = nb = 0
        while not exit_ev.is_set():
            if not pull.poll(50):
                continue
            while True:
                try:
                    fr = pull.recv_multipart(copy=False, flags=zmq.NOBLOCK)
                except zmq.Again:
                    break
                n += 1
                nb += sum(len(f) for f in fr)
                if n % 16 == 0:
                    count.value, bytes_.value, t_last.value = n, nb, time.monotonic()
            count.value, bytes_.value, t_last.value = n, nb, time.monotonic()
        pull.close(linger=0)
        ctx.term()
    except BaseException as exc:
        result_q.put(("error", f"receiver: {exc!r}"))


# -- phases ----------------------------------------------------------------------------
def run_bare(args, mpctx, kids: Children) -> dict:
    q = mpctx.Queue()
    count, nbytes, t_last = mpctx.Value("q", 0, lock=False), mpctx.Value("q", 0, lock=False), \
        mpctx.Value("d", 0.0, lock=False)
    r_exit = mpctx.Event()
    recv = kids.add(mpctx.Process(target=receiver_main, args=(q, count, nbytes, t_last, r_exit, 64 << 20),
                                  daemon=True))
    recv.start()
    rinfo = child_get(q, "ready", 30)
    sq = mpctx.Queue()
    go, pause, stop, s_exit = mpctx.Event(), mpctx.Event(), mpctx.Event(), mpctx.Event()
    snd = kids.add(mpctx.Process(target=sender_main, args=("bare", "", rinfo["endpoint"], vars(args), sq, go, pause,
                                                           stop, s_exit), daemon=True))
    snd.start()
    sinfo = child_get(sq, "ready", 60)
    rcpu0, scpu0 = proc_cpu_s(rinfo["pid"]), proc_cpu_s(sinfo["pid"])
    t_go = time.monotonic()
    go.set()
    valve = Valve(rinfo["pid"], pause, args.max_rss_gb)
    res = None
    import queue as _queue
    while res is None:
        try:
            res = child_get(sq, "done", 0.05)
        except _queue.Empty:
            pass
    valve.close()
    max_rss = valve.max_rss_gb
    deadline = time.monotonic() + args.drain_timeout
    while count.value < res["sent_ok"] and time.monotonic() < deadline:
        time.sleep(0.01)
    t_done = t_last.value if count.value >= res["sent_ok"] else time.monotonic()
    rcpu, scpu = proc_cpu_s(rinfo["pid"]) - rcpu0, proc_cpu_s(sinfo["pid"]) - scpu0
    s_exit.set()
    r_exit.set()
    snd.join(10)
    recv.join(10)
    elapsed = t_done - t_go
    received = count.value
    return {"received": received, "sent": res, "elapsed_s": elapsed, "drained": received >= res["sent_ok"],
            "msgs_per_s": received / elapsed, "MB_per_s": nbytes.value / elapsed / 1e6,
            "steps_per_s": received / args.ranks * args.batch / elapsed,
            "offered_steps_per_s": res["attempts"] / args.ranks * args.batch / (res["t_end"] - res["t_go"]),
            "receiver_cpu_s": rcpu, "receiver_cpu_pct": 100 * rcpu / elapsed, "sender_cpu_s": scpu,
            "receiver_max_rss_gb": max_rss}


class Valve:
    """A thread that pauses the senders while the receiver's RSS is above the limit (a thread, so it
    keeps working while the main loop is blocked in an RPC); ``max_rss_gb`` is what it saw."""

    def __init__(self, pid: int, pause, limit: float) -> None:
        import threading
        self.pid, self.pause, self.limit, self.max_rss_gb = pid, pause, limit, 0.0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            rss = proc_rss_gb(self.pid)
            self.max_rss_gb = max(self.max_rss_gb, rss)
            if rss > self.limit and not self.pause.is_set():
                self.pause.set()
            elif self.pause.is_set() and rss < 0.75 * self.limit:
                self.pause.clear()

    def close(self) -> None:
        self._stop.set()
        self._t.join(2)
        self.pause.clear()


def run_daemon(args, mpctx, kids: Children, log_path: str) -> dict:
    from eplbd.client.rpc import EplbClient
    from eplbd.errors import EplbdError

    proc, kv, cmd = start_daemon(kids, log_path, ["--metrics-port", "-1", "--step-interval", "1000000",
                                                  "--window-size", "1000"])
    sq = mpctx.Queue()
    go, pause, stop, s_exit = mpctx.Event(), mpctx.Event(), mpctx.Event(), mpctx.Event()
    snd = kids.add(mpctx.Process(target=sender_main, args=("daemon", kv["rpc"], kv["ingest"], vars(args), sq, go,
                                                           pause, stop, s_exit), daemon=True))
    snd.start()
    sinfo = child_get(sq, "ready", 120)  # includes registering all 64 ranks
    client = EplbClient(kv["rpc"], timeout=30)
    st0 = client.status()
    assert st0.ep_size == args.ranks and len(st0.workers) == args.ranks, (st0.ep_size, len(st0.workers))
    base_recv, base_drop = st0.reports_received, st0.reports_dropped
    dcpu0, scpu0 = proc_cpu_s(proc.pid), proc_cpu_s(sinfo["pid"])
    t_go = time.monotonic()
    go.set()
    lat = {"status": [], "balancedness": []}
    errors: dict[str, int] = {}
    samples = []  # (t, reports_received) from status replies while senders run
    res = None
    valve = Valve(proc.pid, pause, args.max_rss_gb)
    import queue as _queue
    while res is None:
        if args.rpc:
            for name in ("status", "balancedness"):
                t = time.perf_counter()
                try:
                    rep = client.status() if name == "status" else client.balancedness()
                except EplbdError as exc:  # e.g. no load yet
                    errors[f"{name}:{type(exc).__name__}"] = errors.get(f"{name}:{type(exc).__name__}", 0) + 1
                    continue
                lat[name].append(time.perf_counter() - t)
                if name == "status":
                    samples.append((time.monotonic(), rep.reports_received))
        else:
            time.sleep(0.02)
        try:
            kind, payload = sq.get_nowait()
            if kind == "error":
                raise RuntimeError(payload)
            res = payload
        except _queue.Empty:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"daemon exited with {proc.returncode} during the run; log: {log_path}")
    valve.close()
    max_rss = valve.max_rss_gb
    # Drain: wait until every report the senders queued is counted by the daemon.
    deadline = time.monotonic() + args.drain_timeout
    t_done = None
    while time.monotonic() < deadline:
        st = client.status()
        if st.reports_received - base_recv >= res["sent_ok"]:
            t_done = time.monotonic()
            break
        time.sleep(0.01)
    drained = t_done is not None
    t_done = t_done or time.monotonic()
    dcpu, scpu = proc_cpu_s(proc.pid) - dcpu0, proc_cpu_s(sinfo["pid"]) - scpu0
    time.sleep(0.2)  # anything late would show up as a mismatch
    st = client.status()
    s_exit.set()
    snd.join(10)
    client.close()
    proc.send_signal(signal.SIGTERM)
    try:
        rc = proc.wait(15)
    except subprocess.TimeoutExpired:
        rc = None

    received = st.reports_received - base_recv
    dropped = st.reports_dropped - base_drop
    reasons = dict(st.drop_reasons)
    seq_gap = reasons.get("seq_gap", 0)
    overflow = reasons.get("sender_overflow_steps", 0)
    rejected = dropped - seq_gap - overflow  # received, then refused (with a reason)
    accepted = received - rejected
    elapsed = t_done - t_go
    slope = None
    during = [s for s in samples if s[0] <= res["t_end"]]
    if len(during) >= 2 and during[-1][0] > during[0][0]:
        slope = (during[-1][1] - during[0][1]) / (during[-1][0] - during[0][0])
    return {
        "cmd": " ".join(cmd[1:]), "exit_code": rc, "drained": drained, "sent": res, "received": received,
        "dropped": dropped, "drop_reasons": reasons, "rejected_after_receipt": rejected, "accepted": accepted,
        "reconciliation": reconcile(res, received, reasons),
        "elapsed_s": elapsed, "msgs_per_s": received / elapsed,
        "MB_per_s": received * res["msg_bytes"] / elapsed / 1e6,
        "steps_per_s": accepted / args.ranks * args.batch / elapsed,
        "offered_steps_per_s": res["attempts"] / args.ranks * args.batch / (res["t_end"] - res["t_go"]),
        "steady_msgs_per_s_from_status": slope,
        "daemon_cpu_s": dcpu, "daemon_cpu_pct": 100 * dcpu / elapsed, "sender_cpu_s": scpu,
        "daemon_max_rss_gb": max_rss, "window_newest_step": st.step, "window_fill": st.window_fill,
        "rpc": {k: pcts(v) for k, v in lat.items()}, "rpc_errors": errors, "log": log_path,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=10.0, help="sending time per phase")
    ap.add_argument("--steps", type=int, default=0, help="global steps per phase instead of --seconds")
    ap.add_argument("--batch", type=int, default=8, help="steps per report message")
    ap.add_argument("--rate", type=float, default=0.0, help="global steps/s to offer (0: as fast as possible)")
    ap.add_argument("--hwm", type=int, default=64, help="per-rank PUSH high-water mark (WorkerLink default 64)")
    ap.add_argument("--no-rpc", dest="rpc", action="store_false", help="skip the RPC latency loop")
    ap.add_argument("--max-rss-gb", type=float, default=4.0, help="pause senders while a receiver exceeds this")
    ap.add_argument("--drain-timeout", type=float, default=45.0)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    args.ranks = RANKS

    import torch
    import zmq

    say = (lambda *a: print(*a, file=sys.stderr, flush=True)) if args.json else \
        (lambda *a: print(*a, flush=True))
    msg_shape = [args.batch, LAYERS, PHYSICAL]
    say(f"shape: {RANKS} ranks, {LAYERS} layers, {LOGICAL} logical experts, {PHYSICAL} physical slots "
        f"({PHYSICAL // RANKS} per rank; DSV3's 288 does not divide by 64 ranks, so 256 + 64 redundant); "
        f"each report int32 {msg_shape} = {args.batch * LAYERS * PHYSICAL * 4 / 1e3:.0f} kB")
    mpctx = mp.get_context("spawn")
    kids = Children()
    log_path = tempfile.mktemp(prefix="eplbd-bench-", suffix=".log")
    out = {"env": {"python": platform.python_version(), "torch": torch.__version__, "pyzmq": zmq.__version__,
                   "libzmq": zmq.zmq_version(), "cores": os.cpu_count(), "platform": platform.platform()},
           "shape": {"ranks": RANKS, "layers": LAYERS, "logical": LOGICAL, "physical": PHYSICAL,
                     "batch_steps": args.batch, "report": msg_shape, "dtype": "int32"},
           "args": {k: v for k, v in vars(args).items() if k != "json"}}
    try:
        say("phase 1/2: bare pyzmq PUSH/PULL ceiling ...")
        out["ceiling"] = run_bare(args, mpctx, kids)
        say("phase 2/2: eplbd serve subprocess ...")
        out["daemon"] = run_daemon(args, mpctx, kids, log_path)
    finally:
        kids.close()
    d, c = out["daemon"], out["ceiling"]
    out["ratio_daemon_over_ceiling"] = d["MB_per_s"] / c["MB_per_s"] if c["MB_per_s"] else None
    problems = [k for k, v in d["reconciliation"].items() if not v["ok"]]
    if not d["drained"]:
        problems.append("daemon did not drain within --drain-timeout")
    if not c["drained"]:
        problems.append("bare receiver did not drain within --drain-timeout")
    if d["exit_code"] != 0:
        problems.append(f"daemon exit code {d['exit_code']} after SIGTERM")
    out["problems"] = problems

    return emit(out, args.json, _table, "UNEXPLAINED / FAILED", log_path)


def _table(out: dict) -> None:
    e, d, c = out["env"], out["daemon"], out["ceiling"]
    print(f"env: python {e['python']}, torch {e['torch']}, pyzmq {e['pyzmq']} (libzmq {e['libzmq']}), "
          f"{e['cores']} cores")
    print(f"daemon: {d['cmd']}")
    hdr = f"{'':<22}{'steps/s':>10}{'msgs/s':>10}{'MB/s':>9}{'offered st/s':>13}{'rx CPU s':>9}{'rx CPU%':>8}" \
          f"{'tx CPU s':>9}{'elapsed':>8}{'maxRSS GB':>10}{'paused s':>9}"
    print(hdr)
    for name, r, cpu, rss in (("bare PUSH/PULL", c, "receiver", "receiver_max_rss_gb"),
                              ("eplbd serve", d, "daemon", "daemon_max_rss_gb")):
        print(f"{name:<22}{r['steps_per_s']:>10.0f}{r['msgs_per_s']:>10.0f}{r['MB_per_s']:>9.0f}"
              f"{r['offered_steps_per_s']:>13.0f}{r[cpu + '_cpu_s']:>9.2f}{r[cpu + '_cpu_pct']:>8.0f}"
              f"{r['sender_cpu_s']:>9.2f}{r['elapsed_s']:>8.2f}{r[rss]:>10.2f}{r['sent']['paused_s']:>9.2f}")
    print(f"ratio daemon/ceiling (MB/s): {out['ratio_daemon_over_ceiling']:.2f}  (target >= 0.5)")
    if d["steady_msgs_per_s_from_status"] is not None:
        print(f"daemon reports_received slope while sending (from status replies): "
              f"{d['steady_msgs_per_s_from_status']:.0f} msgs/s")
    s = d["sent"]
    print(f"accounting: attempts {s['attempts']}, sent {s['sent_ok']}, locally dropped {s['local_dropped']} "
          f"({s['trailing_local_dropped']} after a rank's last sent report); daemon received {d['received']}, "
          f"accepted {d['accepted']}, dropped {d['dropped']} {d['drop_reasons']}; window newest step "
          f"{d['window_newest_step']}, fill {d['window_fill']}")
    for k, v in d["reconciliation"].items():
        print(f"  {'ok  ' if v['ok'] else 'FAIL'} {k}: {v['lhs']} vs {v['rhs']}")
    for name, p in d["rpc"].items():
        if p["count"]:
            print(f"rpc {name:<13} n={p['count']:<6} p50 {p['p50_ms']:.2f} ms  p99 {p['p99_ms']:.2f} ms  "
                  f"max {p['max_ms']:.2f} ms")
        else:
            print(f"rpc {name:<13} n=0")
    if d["rpc_errors"]:
        print(f"rpc errors: {d['rpc_errors']}")
    print(f"daemon exit code after SIGTERM: {d['exit_code']}")
    print("notes: throughput = reports received / (go .. last report received), backlog drain included; "
          "the ceiling phase runs without the RPC loop; sender, receiver and RPC loop share the cores.")


if __name__ == "__main__":
    sys.exit(main())
