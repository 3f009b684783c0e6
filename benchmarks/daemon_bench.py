"""Pieces shared by the benchmarks that drive a real ``eplbd serve`` subprocess with simulated ranks
(``bench_ingest.py``, ``bench_soak.py``): /proc readers, child-process bookkeeping, the daemon
launcher, DeepSeek-V3-shaped load tensors, and per-rank send accounting reconciled with the
daemon's counters.

Imported by name (``import daemon_bench``): a script run as ``python benchmarks/X.py`` has
``benchmarks/`` first on ``sys.path``, and spawned children inherit that path.
"""

from __future__ import annotations

import os
import pathlib
import select
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence

REPO = pathlib.Path(__file__).resolve().parents[1]
LAYERS, LOGICAL = 58, 256  # DeepSeek-V3: 58 MoE layers of 256 routed experts
TOKENS_PER_RANK_STEP = 2048  # e.g. 256 decode tokens x top-8 routing
CLK_TCK = os.sysconf("SC_CLK_TCK")

# Drops the daemon counts for reports it never received (the rest are reports received, then refused).
NOT_RECEIVED_REASONS = ("seq_gap", "sender_overflow_steps")


# -- /proc readers ------------------------------------------------------------------------
def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime (fields 14, 15)


def proc_rss_gb(pid: int) -> float:
    """Resident set size (VmRSS) of ``pid`` in GiB; 0.0 once the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024 ** 2
    except OSError:
        pass
    return 0.0


# -- load tensors ---------------------------------------------------------------------------
def spread_over_replicas(logical, phy2log):
    """Split integer logical load over each expert's replicas (floor division, as a router that
    spreads tokens evenly over replicas would, up to rounding).

    Args:
        logical: ``[steps, layers, num_logical]`` integer numpy array.
        phy2log: ``[layers, num_physical]`` integer numpy array.

    Returns:
        ``[steps, layers, num_physical]`` int32 numpy array (C-contiguous).
    """
    import numpy as np

    steps, layers, num_logical = logical.shape
    nrep = np.stack([np.bincount(phy2log[layer], minlength=num_logical) for layer in range(layers)])
    idx = np.broadcast_to(phy2log, (steps, *phy2log.shape))
    phys = np.take_along_axis(logical, idx, axis=2) // np.take_along_axis(
        np.broadcast_to(nrep, (steps, layers, num_logical)), idx, axis=2)
    return np.ascontiguousarray(phys.astype(np.int32))


# -- child processes ------------------------------------------------------------------------
def child_get(q, want: str, timeout: float):
    """The payload of the next ``(kind, payload)`` a child put on ``q``; raises on its "error"."""
    kind, payload = q.get(timeout=timeout)
    if kind == "error":
        raise RuntimeError(payload)
    if kind != want:
        raise RuntimeError(f"expected {want!r} from child, got {kind!r}")
    return payload


def pcts(xs: Sequence[float]) -> dict:
    """Count, p50, p99 and max of latencies in seconds, as milliseconds."""
    if not xs:
        return {"count": 0}
    s = sorted(xs)
    q = lambda f: s[min(len(s) - 1, int(f * len(s)))]  # noqa: E731
    return {"count": len(s), "p50_ms": q(0.50) * 1e3, "p99_ms": q(0.99) * 1e3, "max_ms": s[-1] * 1e3}


class Children:
    """Every child a benchmark starts, ended in ``close`` whatever happened."""

    def __init__(self) -> None:
        self.procs: list = []

    def add(self, p):
        self.procs.append(p)
        return p

    def close(self) -> None:
        for p in self.procs:
            if isinstance(p, subprocess.Popen):
                if p.poll() is None:
                    p.kill()
                    p.wait(5)
            elif p.is_alive():
                p.terminate()
                p.join(5)
                if p.is_alive():
                    p.kill()
                    p.join(5)


def start_daemon(kids: Children, log_path: str, flags: Sequence[str]):
    """Start ``python -m eplbd.cli serve`` on free loopback ports with ``flags``, stderr to ``log_path``.

    Returns:
        ``(Popen, {"rpc": ..., "ingest": ..., "metrics_port": ...}, argv)`` once it printed READY.
    """
    cmd = [sys.executable, "-m", "eplbd.cli", "serve", "--rpc", "tcp://127.0.0.1:0", "--ingest",
           "tcp://127.0.0.1:0", *flags]
    log = open(log_path, "wb")
    p = kids.add(subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=log))
    deadline = time.monotonic() + 30
    line = b""
    while time.monotonic() < deadline and p.poll() is None:
        r, _, _ = select.select([p.stdout], [], [], 0.2)
        if r:
            line = p.stdout.readline()
            if line.startswith(b"READY"):
                break
    if not line.startswith(b"READY"):
        raise RuntimeError(f"daemon did not print READY (exit {p.poll()}); log: {log_path}")
    kv = dict(tok.split("=", 1) for tok in line.decode().split()[1:])
    return p, kv, cmd


# -- accounting -----------------------------------------------------------------------------
class SendCounter:
    """Per-rank outcome of every ``send_report`` attempt.

    A report dropped locally (full queue) shows up at the daemon as a ``seq_gap`` once the rank
    gets a later report through; drops after a rank's last successful send ("trailing") never do.
    """

    def __init__(self, ranks: Iterable[int]) -> None:
        self.attempts = self.sent_ok = self.local_dropped = 0
        self._since_ok = {r: 0 for r in ranks}

    def record(self, rank: int, sent: bool) -> None:
        self.attempts += 1
        if sent:
            self.sent_ok += 1
            self._since_ok[rank] = 0
        else:
            self.local_dropped += 1
            self._since_ok[rank] += 1

    def as_dict(self) -> dict:
        return {"attempts": self.attempts, "sent_ok": self.sent_ok, "local_dropped": self.local_dropped,
                "trailing_local_dropped": sum(self._since_ok.values())}


def reconcile(sent: dict, received: int, reasons: dict) -> dict:
    """Check the senders' counts against the daemon's, exactly.

    Args:
        sent: ``SendCounter.as_dict()`` (summed over senders), plus ``link_reports_sent`` /
            ``link_reports_dropped`` when the sends went through ``WorkerLink``.
        received: reports the daemon counted as received during the run.
        reasons: the daemon's drop reasons (counts) during the run.

    Returns:
        ``{check: {"lhs", "rhs", "ok"}}``.
    """
    seq_gap = reasons.get("seq_gap", 0)
    rec = {
        "sent_ok == received": (sent["sent_ok"], received),
        "local_dropped - trailing == daemon seq_gap": (sent["local_dropped"] - sent["trailing_local_dropped"],
                                                       seq_gap),
        "attempts == received + seq_gap + trailing_local": (
            sent["attempts"], received + seq_gap + sent["trailing_local_dropped"]),
    }
    if "link_reports_sent" in sent:
        rec["WorkerLink counters == sender counters"] = (
            (sent["link_reports_sent"], sent["link_reports_dropped"]), (sent["sent_ok"], sent["local_dropped"]))
    return {k: {"lhs": a, "rhs": b, "ok": a == b} for k, (a, b) in rec.items()}


def rejected_after_receipt(reasons: dict) -> dict:
    """Drop reasons for reports the daemon received and then refused (not seq gaps)."""
    return {k: v for k, v in reasons.items() if k not in NOT_RECEIVED_REASONS and v}


# -- output ---------------------------------------------------------------------------------
def emit(out: dict, as_json: bool, table, label: str, log_path: str) -> int:
    """Print ``out`` as one JSON object or through ``table(out)``; then ``out["problems"]`` on stderr.

    Returns:
        The exit status: 1 if there are problems, else 0.
    """
    import json

    if as_json:
        print(json.dumps(out, default=str))
    else:
        table(out)
    if out["problems"]:
        print(f"{label}: " + "; ".join(out["problems"]) + f" (daemon log: {log_path})", file=sys.stderr)
        return 1
    return 0
