"""Caller-thread cost of ``LoadReporter.record``: what the engine's forward thread pays per step.

Shapes: ``[58, 320]`` int32 (DeepSeek-V3: 58 MoE layers, 256 logical + 64 redundant slots) and
``[24, 40]`` (the demo's GPT-OSS-20B trace: 24 layers, 32 experts + 8 redundant).

Conditions, each with its own reporter (one rank), timed over ``--calls`` calls of ``record``
(``time.perf_counter_ns`` around the call only):

- ``copy_``: a bare ``dst.copy_(src)`` of the same shape into a fixed buffer: the floor.
- ``pull``: a bare ZeroMQ PULL receiver in another process, decoding and counting.
- ``daemon``: a real ``python -m eplbd.cli serve`` subprocess (READY line parsed); the rank
  registers through ``WorkerLink`` and hands its worker id to the reporter.
- ``none``: an endpoint nobody binds; the reporter has an identity, so its sends fail (counted)
  and its FIFO drops the oldest steps.

Between calls the loop sleeps ``--interval-us`` (default 200 us, i.e. ~4000 steps/s, far faster
than a real engine's 10-100 steps/s; 0 = back to back, which overruns any receiver and shows the
drop path). Sleeping releases the GIL, as a forward thread waiting on the GPU does, so the sender
thread runs in between; any GIL contention with it shows in p99/max. Steps sent and dropped are
reported per condition after ``close``.

    .venv/bin/python benchmarks/bench_reporter.py [--calls 20000] [--interval-us 200] [--json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import pathlib
import platform
import select
import socket
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
SHAPES = {"dsv3": (58, 256, 320), "demo": (24, 32, 40)}  # layers, logical, physical
CONDITIONS = ("pull", "daemon", "none")


def stats_us(ns: list[int]) -> dict:
    ns = sorted(ns)
    n = len(ns)
    return {"p50_us": ns[n // 2] / 1e3, "p99_us": ns[min(n - 1, int(n * 0.99))] / 1e3,
            "max_us": ns[-1] / 1e3, "mean_us": sum(ns) / n / 1e3}


def make_loads(layers: int, physical: int, variants: int = 4):
    import torch
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 2048, (layers, physical), generator=g, dtype=torch.int32) for _ in range(variants)]


def pace(interval_s: float) -> None:
    if interval_s > 0:
        time.sleep(interval_s)


# -- bare receiver process ---------------------------------------------------------------------
def _receiver_main(conn) -> None:
    import zmq

    from eplbd.proto import Decoder, bound_endpoint, make_socket

    ctx = zmq.Context()
    sock = make_socket(ctx, zmq.PULL, bind="tcp://127.0.0.1:0", hwm=10_000, linger_ms=0)
    conn.send(bound_endpoint(sock))
    dec = Decoder()
    reports = steps = 0
    stopping_at = None
    while True:
        if stopping_at is None and conn.poll(0):
            conn.recv()
            stopping_at = time.monotonic() + 0.5  # drain what is still in flight
        if stopping_at is not None and time.monotonic() > stopping_at:
            break
        if sock.poll(50):
            msg = dec.decode(sock.recv_multipart(copy=False))
            reports += 1
            steps += msg.num_steps
    sock.close(linger=0)
    ctx.term()
    conn.send({"reports": reports, "steps": steps})


class BareReceiver:
    def __enter__(self):
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_receiver_main, args=(child,), daemon=True)
        self.proc.start()
        self.endpoint = self.conn.recv()
        return self

    def result(self) -> dict:
        self.conn.send("stop")
        return self.conn.recv()

    def __exit__(self, *exc):
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()


# -- daemon subprocess -------------------------------------------------------------------------
class DaemonProcess:
    def __enter__(self):
        cmd = [sys.executable, "-m", "eplbd.cli", "serve", "--rpc", "tcp://127.0.0.1:0", "--ingest",
               "tcp://127.0.0.1:0", "--metrics-port", "-1", "--step-interval", "100000000",
               "--log-level", "WARNING"]
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        end = time.monotonic() + 30
        line = ""
        while time.monotonic() < end:
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.5)
            if ready:
                line = self.proc.stdout.readline()
                if line.startswith("READY"):
                    break
            if self.proc.poll() is not None:
                break
        if not line.startswith("READY"):
            self.proc.kill()
            raise RuntimeError(f"eplbd serve did not print READY (got {line!r})")
        fields = dict(kv.split("=", 1) for kv in line.split()[1:])
        self.rpc, self.ingest = fields["rpc"], fields["ingest"]
        return self

    def __exit__(self, *exc):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()


def free_tcp_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


# -- measurements ------------------------------------------------------------------------------
def bench_copy(layers: int, physical: int, calls: int, interval_s: float) -> dict:
    import torch
    loads = make_loads(layers, physical)
    dst = torch.empty(layers, physical, dtype=torch.int32)
    ns = []
    for i in range(calls):
        src = loads[i & 3]
        t0 = time.perf_counter_ns()
        dst.copy_(src)
        ns.append(time.perf_counter_ns() - t0)
        pace(interval_s)
    return stats_us(ns)


def run_reporter(endpoint: str, worker_id: str, layers: int, physical: int, calls: int,
                 interval_s: float, session: str = "") -> dict:
    from eplbd.client.reporter import LoadReporter

    loads = make_loads(layers, physical)
    rep = LoadReporter(endpoint, 0, num_layers=layers, num_physical=physical)
    try:
        rep.set_identity(worker_id, session)
        for i in range(200):  # warm-up: the first slots are touched, the sender thread is running
            rep.record(i, loads[i & 3])
            pace(interval_s)
        ns = []
        for i in range(200, 200 + calls):
            src = loads[i & 3]
            t0 = time.perf_counter_ns()
            rep.record(i, src)
            ns.append(time.perf_counter_ns() - t0)
            pace(interval_s)
    finally:
        rep.close(timeout=5)
    out = stats_us(ns)
    out.update(steps_recorded=rep.steps_recorded, steps_sent=rep.steps_sent, steps_dropped=rep.steps_dropped,
               reports_sent=rep.reports_sent, reports_failed=rep.reports_failed)
    return out


def bench_condition(cond: str, shape: tuple[int, int, int], calls: int, interval_s: float) -> dict:
    layers, logical, physical = shape
    if cond == "pull":
        with BareReceiver() as rx:
            out = run_reporter(rx.endpoint, "bench-rank0", layers, physical, calls, interval_s)
            got = rx.result()
        out.update(received_steps=got["steps"], received_reports=got["reports"])
        return out
    if cond == "daemon":
        from eplbd.client.rpc import EplbClient
        from eplbd.client.worker import WorkerLink
        from eplbd.policy import initial_placement

        with DaemonProcess() as d:
            link = WorkerLink(d.rpc, d.ingest, 0, timeout=10)
            try:
                link.register(ep_size=1, num_layers=layers, num_logical=logical, num_physical=physical, epoch=0,
                              phy2log=initial_placement(layers, logical, physical, 1))
                out = run_reporter(d.ingest, link.worker_id, layers, physical, calls, interval_s, link.session)
                with EplbClient(d.rpc, timeout=10) as c:
                    end = time.monotonic() + 10
                    while True:  # let the daemon catch up before reading its counters
                        st = c.status()
                        if st.reports_received >= out["reports_sent"] or time.monotonic() > end:
                            break
                        time.sleep(0.1)
                out.update(daemon_reports_received=st.reports_received, daemon_drop_reasons=dict(st.drop_reasons))
            finally:
                link.close()
        return out
    if cond == "none":
        return run_reporter(free_tcp_endpoint(), "bench-rank0", layers, physical, calls, interval_s)
    raise ValueError(cond)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=20_000, help="timed record() calls per condition")
    ap.add_argument("--interval-us", type=float, default=200.0,
                    help="sleep between calls (0: back to back)")
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"comma list of {', '.join(SHAPES)}")
    ap.add_argument("--conditions", default=",".join(CONDITIONS), help=f"comma list of {', '.join(CONDITIONS)}")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(REPO))
    import torch

    interval_s = args.interval_us / 1e6
    results = []
    for name in args.shapes.split(","):
        shape = SHAPES[name]
        layers, _, physical = shape
        row = {"shape": name, "dims": [layers, physical], "condition": "copy_"}
        row.update(bench_copy(layers, physical, args.calls, interval_s))
        results.append(row)
        for cond in args.conditions.split(","):
            row = {"shape": name, "dims": [layers, physical], "condition": cond}
            row.update(bench_condition(cond, shape, args.calls, interval_s))
            results.append(row)
    meta = {"calls": args.calls, "interval_us": args.interval_us, "python": platform.python_version(),
            "torch": torch.__version__, "cpus": os.cpu_count(), "cuda": torch.cuda.is_available(),
            "loadavg": os.getloadavg()}
    if args.json:
        print(json.dumps({"meta": meta, "results": results}, indent=2))
        return 0
    print(f"record() caller-thread cost, {args.calls} calls, {args.interval_us:g} us between calls; "
          f"torch {meta['torch']}, {meta['cpus']} CPUs, load avg {meta['loadavg'][0]:.1f}")
    head = f"{'shape':<13} {'condition':<9} {'p50 us':>8} {'p99 us':>8} {'max us':>9} {'sent':>7} {'dropped':>8}  notes"
    print(head)
    print("-" * len(head))
    for r in results:
        sent = r.get("steps_sent", "")
        dropped = r.get("steps_dropped", "")
        notes = ""
        if "received_steps" in r:
            notes = f"receiver got {r['received_steps']} steps in {r['received_reports']} reports"
        if "daemon_reports_received" in r:
            notes = f"daemon got {r['daemon_reports_received']}/{r['reports_sent']} reports"
            if r["daemon_drop_reasons"]:
                notes += f", drops {r['daemon_drop_reasons']}"
        if r["condition"] == "none":
            notes = f"{r['reports_failed']} failed reports"
        dims = "x".join(map(str, r["dims"]))
        print(f"{r['shape'] + ' ' + dims:<13} {r['condition']:<9} {r['p50_us']:>8.2f} {r['p99_us']:>8.2f} "
              f"{r['max_us']:>9.1f} {sent!s:>7} {dropped!s:>8}  {notes}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
