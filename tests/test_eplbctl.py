"""eplbctl end to end: a real ``eplbd serve`` subprocess, simulated ranks over WorkerLink, and
``eplbctl`` run as a subprocess for each command (output, --json and exit codes)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading

import numpy as np
import pytest

from daemon_helpers import G, L, P, make_ranks, skewed_step_load, wait_for
from eplbd.client.rpc import EplbClient
from eplbd.offline.trace import load_trace

STEPS = 20
CTL_TIMEOUT_S = 60  # per eplbctl subprocess (it imports torch: ~2 s)


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("EPLBD_")}


class DaemonProcess:
    """``eplbd serve`` on loopback ports chosen by the OS; ``.rpc``/``.ingest`` as make_ranks wants."""

    def __init__(self, log_path, *extra: str) -> None:
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "eplbd.cli", "serve", "--rpc", "tcp://127.0.0.1:0", "--ingest",
             "tcp://127.0.0.1:0", "--metrics-port", "0", *extra],
            stdout=subprocess.PIPE, stderr=self._log, text=True, env=_clean_env())
        line: list[str] = []
        reader = threading.Thread(target=lambda: line.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(30)
        if not line or not line[0].startswith("READY "):
            self.stop()
            pytest.fail(f"eplbd serve did not print READY within 30s (got {line!r}); log:\n"
                        f"{open(log_path).read()[-3000:]}")
        fields = dict(kv.split("=", 1) for kv in line[0].split()[1:])
        self.rpc, self.ingest = fields["rpc"], fields["ingest"]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            rc = None
        self.proc.stdout.close()
        self._log.close()
        return rc


def stream(links, phy2log, rng, first, steps, epoch=0):
    """Every rank reports its share of each step (as in test_daemon)."""
    total = skewed_step_load(rng, phy2log, steps)
    for r, link in enumerate(links):
        share = total // len(links) + (r == 0) * (total % len(links))
        assert link.send_report(first, share.contiguous(), epoch)
    return total


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    log = tmp_path_factory.mktemp("eplbd") / "eplbd.log"
    d = DaemonProcess(log, "--step-interval", "10000", "--window-size", "100")
    links = []
    try:
        links, phy2log = make_ranks(d)
        stream(links, phy2log, np.random.default_rng(0), 0, STEPS)
        with EplbClient(d.rpc, timeout=5) as c:
            assert wait_for(lambda: c.status().window_fill == STEPS, timeout=15), c.status()
        yield d
    finally:
        for link in links:
            link.close()
        rc = d.stop()
    assert rc == 0, f"eplbd exited with {rc}; log:\n{open(log).read()[-3000:]}"


def ctl(daemon_or_endpoint, *args: str, timeout: float = CTL_TIMEOUT_S) -> subprocess.CompletedProcess:
    endpoint = getattr(daemon_or_endpoint, "rpc", daemon_or_endpoint)
    return subprocess.run([sys.executable, "-m", "eplbd.client.ctl", "--endpoint", endpoint, *args],
                          capture_output=True, text=True, timeout=timeout, env=_clean_env())


def ctl_json(daemon, *args: str) -> dict:
    r = ctl(daemon, *args, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)  # exactly one JSON document, nothing else on stdout


def test_status_human_and_json(daemon):
    r = ctl(daemon, "status")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert f"window {STEPS}/100" in out and f"EP size {G}" in out and "paused no" in out
    assert "rank  worker" in out and "plan: none yet" in out and f"reports: {G} received, 0 dropped" in out
    assert sum(line.strip().startswith(f"{rank} ") for line in out.splitlines() for rank in range(G)) == G
    doc = ctl_json(daemon, "status")
    assert doc["epoch"] == 0 and doc["paused"] is False and doc["ep_size"] == G
    assert doc["window_fill"] == STEPS and doc["window_size"] == 100 and doc["reports_received"] == G
    assert sorted(w["rank"] for w in doc["workers"]) == list(range(G)) and all(w["alive"] for w in doc["workers"])
    assert doc["current_plan"] is None and "req_id" not in doc and "type" not in doc
    assert ctl_json(daemon, "--json", "status")["epoch"] == 0  # --json before the command works too


def test_balancedness_matches_direct_client(daemon):
    doc = ctl_json(daemon, "balancedness", "--per-layer", "--per-rank")
    with EplbClient(daemon.rpc, timeout=5) as c:
        b = c.balancedness(per_layer=True, per_rank=True)
    for side in ("observed", "predicted"):
        for key in ("min", "p50", "p90", "mean", "aggregate"):
            assert doc[side][key] == pytest.approx(getattr(getattr(b, side), key))
    assert doc["per_layer_observed"] == pytest.approx(b.per_layer_observed)
    np.testing.assert_allclose(np.array(doc["per_rank_load"]), b.per_rank_load.numpy())
    assert np.array(doc["per_rank_load"]).shape == (L, G)
    r = ctl(daemon, "balancedness", "--per-layer", "--per-rank")
    assert r.returncode == 0, r.stderr
    assert "observed" in r.stdout and "aggregate" in r.stdout and f"{b.observed.mean:.4f}" in r.stdout
    assert "per layer:" in r.stdout and "layers x ranks" in r.stdout


def test_rebalance_dry_run_pushes_nothing(daemon):
    doc = ctl_json(daemon, "rebalance", "--dry-run", "--layers", "0,2")
    assert doc["pushed"] is False and doc["layers"] == [0, 2]
    # The daemon currently returns the full [L, P] phy2log here although the proto docstring says
    # [len(layers), P]; only the slot count is checked until that is settled.
    assert doc["predicted_after"] >= doc["predicted_before"] and np.array(doc["phy2log"]).shape[1] == P
    r = ctl(daemon, "rebalance", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("dry run") and "predicted balancedness" in r.stdout and "slots" in r.stdout
    assert ctl_json(daemon, "status")["epoch"] == 0


def test_pause_resume_reflected_in_status(daemon):
    r = ctl(daemon, "pause", "--reason", "maintenance")
    assert r.returncode == 0 and "paused" in r.stdout, r.stderr
    assert ctl_json(daemon, "status")["paused"] is True
    assert "paused yes" in ctl(daemon, "status").stdout
    assert ctl(daemon, "resume").returncode == 0
    assert ctl_json(daemon, "status")["paused"] is False


def test_plan_on_missing_epoch_is_a_daemon_error(daemon):
    r = ctl(daemon, "plan", "--epoch", "7")
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.startswith("eplbctl: error: not_found: ") and "epoch=7" in r.stderr


def test_config_set_get(daemon):
    r = ctl(daemon, "config", "set", "window_size", "0")
    assert r.returncode == 1 and "eplbctl: error: config_error:" in r.stderr and "window_size" in r.stderr
    try:
        assert ctl_json(daemon, "config", "set", "step_interval", "50")["config"] == {"step_interval": 50}
        r = ctl(daemon, "config", "get", "step_interval")
        assert r.returncode == 0 and r.stdout.split() == ["step_interval", "=", "50"], (r.stdout, r.stderr)
        assert ctl_json(daemon, "config", "get")["config"]["step_interval"] == 50
    finally:
        assert ctl(daemon, "config", "set", "step_interval", "10000").returncode == 0
    r = ctl(daemon, "config", "get", "no_such_key")
    assert r.returncode == 1 and "not_found" in r.stderr


def test_dump_writes_a_loadable_trace(daemon, tmp_path, monkeypatch):
    doc = ctl_json(daemon, "dump", str(tmp_path / "w.npz"))
    assert doc["path"] == str(tmp_path / "w.npz") and doc["steps"] == STEPS
    trace = load_trace(tmp_path / "w.npz")
    assert trace.load.shape[0] == STEPS and trace.num_layers == L
    # A relative path is made absolute against eplbctl's working directory, not the daemon's.
    r = subprocess.run([sys.executable, "-m", "eplbd.client.ctl", "--endpoint", daemon.rpc, "dump", "rel.npz"],
                       capture_output=True, text=True, timeout=CTL_TIMEOUT_S, cwd=tmp_path, env=_clean_env())
    assert r.returncode == 0, r.stderr
    assert str(tmp_path / "rel.npz") in r.stdout and load_trace(tmp_path / "rel.npz").load.shape[0] == STEPS


def test_dump_without_npz_reports_the_path_numpy_wrote(daemon, tmp_path):
    doc = ctl_json(daemon, "dump", str(tmp_path / "window"))
    assert doc["path"] == str(tmp_path / "window.npz") and doc["steps"] == STEPS
    assert not (tmp_path / "window").exists() and load_trace(tmp_path / "window.npz").load.shape[0] == STEPS
    r = ctl(daemon, "dump", str(tmp_path / "w2.trace"))
    assert r.returncode == 0 and f"to {tmp_path / 'w2.trace.npz'}" in r.stdout, r.stdout


def test_placement(daemon):
    doc = ctl_json(daemon, "placement")
    assert set(doc) == {"epoch", "phy2log", "ep_size"} and doc["epoch"] == 0 and doc["ep_size"] == G
    assert np.array(doc["phy2log"]).shape == (L, P)
    r = ctl(daemon, "placement")
    assert r.returncode == 0 and r.stdout.count("layer ") == L and "|" in r.stdout, r.stderr


def test_load_placement_bad_file_is_a_daemon_error(daemon, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"phy2log": [[0, 1]]}')
    r = ctl(daemon, "load-placement", str(bad), "--dry-run")
    assert r.returncode == 1 and r.stderr.startswith("eplbctl: error: "), r.stderr
    assert "shape [1, 2]" in r.stderr
    r = ctl(daemon, "load-placement", str(tmp_path / "missing.json"))
    assert r.returncode == 1 and r.stderr.startswith("eplbctl: error: ")


@pytest.mark.parametrize("args", [["stat"], [], ["rebalance", "--layers", "a,b"], ["plan", "--ep", "1"],
                                  ["config", "set", "k"], ["--timeout", "0", "status"]])
def test_usage_errors_exit_2(daemon, args):
    r = ctl(daemon, *args)
    assert r.returncode == 2 and "usage:" in r.stderr and r.stdout == ""


def test_unreachable_endpoint_exits_3_quickly():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # free once closed; nothing listens on it
    endpoint = f"tcp://127.0.0.1:{port}"
    r = ctl(endpoint, "--timeout", "0.5", "status", timeout=30)  # ignoring --timeout would hang: TimeoutExpired
    assert r.returncode == 3 and r.stdout == ""
    assert endpoint in r.stderr and "0.5s" in r.stderr and "unavailable" in r.stderr
