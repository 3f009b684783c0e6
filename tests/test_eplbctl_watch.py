"""``eplbctl balancedness --watch`` against a real ``eplbd serve``: JSON lines and terminal frames,
Ctrl-C ends it with 0, and it rides out a daemon that goes away and comes back on the same port."""

from __future__ import annotations

import json
import queue
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from daemon_helpers import G, L, make_ranks, wait_for
from eplbd.client.rpc import EplbClient
from test_eplbctl import CTL_TIMEOUT_S, DaemonProcess, _clean_env, ctl, stream

STEPS = 12
pytestmark = pytest.mark.timeout(180)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def fed_daemon(tmp_path):
    """A daemon with G registered ranks and STEPS steps of skewed load in its window."""
    d = DaemonProcess(tmp_path / "eplbd.log", "--step-interval", "10000", "--window-size", "100")
    links = []
    try:
        links, phy2log = make_ranks(d)
        stream(links, phy2log, np.random.default_rng(0), 0, STEPS)
        with EplbClient(d.rpc, timeout=5) as c:
            assert wait_for(lambda: c.status().window_fill == STEPS, timeout=15)
        yield d
    finally:
        for link in links:
            link.close()
        d.stop()


class Watch:
    """``eplbctl ... balancedness --watch`` as a background process whose stdout lines arrive on a queue."""

    def __init__(self, endpoint: str, *args: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "eplbd.client.ctl", "--endpoint", endpoint, *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_clean_env())
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def next_matching(self, pred, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                assert self.proc.poll() is None, f"eplbctl exited with {self.proc.returncode}: {self.proc.stderr.read()}"
                continue
            if pred(line):
                return line
        pytest.fail("eplbctl --watch printed no matching line in time")

    def interrupt(self) -> int:
        self.proc.send_signal(signal.SIGINT)
        return self.proc.wait(CTL_TIMEOUT_S)

    def __enter__(self) -> "Watch":
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(CTL_TIMEOUT_S)
        self.proc.stdout.close()
        self.proc.stderr.close()


def test_json_lines_one_per_refresh(fed_daemon):
    r = ctl(fed_daemon, "balancedness", "--watch", "0.2", "--json", "--count", "3")
    assert r.returncode == 0, r.stderr
    docs = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(docs) == 3
    for doc in docs:
        assert doc["reachable"] is True and doc["epoch"] == 0 and doc["plan"] is None
        b = doc["balancedness"]
        assert 0 < b["observed"]["aggregate"] <= 1 and len(b["per_layer_observed"]) == L
        assert np.array(b["per_rank_load"]).shape == (L, G)
    assert docs[0]["ts"] < docs[1]["ts"] < docs[2]["ts"]


def test_terminal_frames_until_ctrl_c(fed_daemon):
    with Watch(fed_daemon.rpc, "balancedness", "--watch", "0.2") as w:
        for _ in range(2):
            w.next_matching(lambda line: line.startswith(f"eplbd at {fed_daemon.rpc}"))
            assert w.next_matching(lambda line: line.startswith("epoch ")).startswith("epoch 0  step ")
            w.next_matching(lambda line: line == "per layer:")
            w.next_matching(lambda line: line.startswith("per rank (load over all layers"))
            shares = w.next_matching(lambda line: line.strip().startswith("r0")).split()
            assert shares == [f"r{r}" for r in range(G)]
            values = [float(x) for x in w.next_matching(lambda line: line.strip()[:1].isdigit()).split()]
            assert len(values) == G and sum(values) == pytest.approx(G, abs=1e-3)  # shares of the mean
        assert w.interrupt() == 0


def test_rides_out_an_unreachable_daemon(tmp_path):
    port = _free_port()
    endpoint = f"tcp://127.0.0.1:{port}"
    first = DaemonProcess(tmp_path / "first.log", "--rpc", endpoint)
    try:
        with Watch(endpoint, "--timeout", "0.5", "balancedness", "--watch", "0.2", "--json") as w:
            up = json.loads(w.next_matching(lambda line: True))
            # No ranks yet: reachable, and the daemon's reason is shown instead of figures.
            assert up["reachable"] is True and up["balancedness"].startswith("not_ready: ")
            first.stop()
            down = json.loads(w.next_matching(lambda line: '"reachable": false' in line))
            assert "0.5s" in down["error"] and endpoint in down["error"]
            again = DaemonProcess(tmp_path / "again.log", "--rpc", endpoint)
            try:
                assert json.loads(w.next_matching(lambda line: '"reachable": true' in line))["epoch"] == 0
                assert w.interrupt() == 0
            finally:
                again.stop()
    finally:
        first.stop()


def test_unreachable_from_the_start_shows_it_and_keeps_trying():
    endpoint = f"tcp://127.0.0.1:{_free_port()}"
    r = ctl(endpoint, "--timeout", "0.3", "balancedness", "--watch", "0.1", "--count", "2")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert sum(line.startswith(f"eplbd at {endpoint}  ") for line in lines) == 2
    assert sum(line.startswith("daemon unreachable: ") and line.endswith("still trying") for line in lines) == 2


@pytest.mark.parametrize("value", ["0", "-1", "soon"])
def test_bad_period_is_a_usage_error(value):
    r = ctl("tcp://127.0.0.1:1", "balancedness", f"--watch={value}")
    assert r.returncode == 2 and "refresh period in seconds > 0" in r.stderr
