"""Metrics: the daemon's series on prometheus_client (names, labels, the cardinality cap) and the HTTP
endpoint beside them (/metrics, /healthz, /readyz; content negotiation; bad and slow clients)."""

import asyncio
import socket
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.openmetrics.exposition import CONTENT_TYPE_LATEST as OPENMETRICS
from prometheus_client.parser import text_string_to_metric_families

from daemon_helpers import DaemonThread, make_ranks, skewed_step_load, wait_for
from eplbd.daemon.metrics import MetricsServer
from eplbd.daemon.observe import MAX_SERIES, DaemonMetrics

# Every family the daemon exposes, with its type and label names (the README's list).
FAMILIES = {
    "eplbd_balancedness": ("gauge", {"kind", "stat"}),
    "eplbd_epoch": ("gauge", set()),
    "eplbd_step": ("gauge", set()),
    "eplbd_window_fill_steps": ("gauge", set()),
    "eplbd_workers_alive": ("gauge", set()),
    "eplbd_workers_expected": ("gauge", set()),
    "eplbd_plans": ("counter", {"outcome"}),
    "eplbd_plans_aborted": ("counter", {"reason"}),
    "eplbd_reports_received": ("counter", set()),
    "eplbd_reports_dropped": ("counter", {"reason"}),
    "eplbd_worker_messages_refused": ("counter", {"message", "reason"}),
    "eplbd_plan_phase_seconds": ("histogram", {"phase"}),
    "eplbd_last_commit_timestamp_seconds": ("gauge", set()),
    "eplbd_rebalancing_stuck": ("gauge", set()),
    "eplbd_load_silent_steps": ("gauge", set()),
    "eplbd_metrics_overflow": ("counter", {"metric"}),
}


def http(port, path, headers=None):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        with e:
            return e.code, dict(e.headers), e.read()


def test_daemon_metrics_parse_with_expected_families_and_labels():
    with DaemonThread(step_interval=10, window_size=10, plan_timeout_s=0.5) as d:
        links, phy2log = make_ranks(d)
        links[0].send_report(0, skewed_step_load(np.random.default_rng(0), phy2log, 10), 0)
        # Nobody stages the plan: it times out, which fills the plan and abort counters and a phase.
        assert wait_for(lambda: b'eplbd_plans_aborted_total{reason="timeout"} 1.0'
                        in http(d.daemon.metrics_port, "/metrics")[2], timeout=10)
        status, headers, body = http(d.daemon.metrics_port, "/metrics")
        for link in links:
            link.close()
    assert status == 200 and headers["Content-Type"] == CONTENT_TYPE_PLAIN_0_0_4
    text = body.decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name, (kind, labels) in FAMILIES.items():
        assert families[name].type == kind, name
        for sample in families[name].samples:
            assert set(sample.labels) - {"le"} == labels, (name, sample)
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert samples[("eplbd_plans_total", (("outcome", "aborted"),))] == 1
    assert samples[("eplbd_reports_received_total", ())] == 1
    assert samples[("eplbd_workers_alive", ())] == 4
    assert samples[("eplbd_plan_phase_seconds_count", (("phase", "aborted"),))] == 1
    assert {s.labels["stat"] for s in families["eplbd_balancedness"].samples} == {"min", "p50", "p90", "mean",
                                                                                  "aggregate"}
    # The exposed names are today's, counters keep their _total, no _created series beside them.
    assert "\neplbd_plans_total{" in text and "_created" not in text
    assert "python_info" in families
    if sys.platform == "linux":
        assert "process_resident_memory_bytes" in families and "process_open_fds" in families


def test_label_sets_past_the_cap_fold_into_overflow():
    m = DaemonMetrics()
    for i in range(MAX_SERIES + 6):
        m._count(f"drop:r{i}", 1, m.dropped, "eplbd_reports_dropped_total", (f"r{i}",))
    m._count("drop:r0", 3, m.dropped, "eplbd_reports_dropped_total", ("r0",))  # a kept series still grows
    families = {f.name: f for f in text_string_to_metric_families(generate_latest(m.registry).decode())}
    dropped = {s.labels["reason"]: s.value for s in families["eplbd_reports_dropped"].samples}
    assert len(dropped) == MAX_SERIES + 1 and dropped["r0"] == 3 and dropped["_overflow"] == 6
    overflow = families["eplbd_metrics_overflow"].samples
    assert [(s.labels, s.value) for s in overflow] == [({"metric": "eplbd_reports_dropped_total"}, 6)]


# --- HTTP ---------------------------------------------------------------------

class _Checks:
    def __init__(self):
        self.health = (True, "")
        self.ready = (False, "no workers registered")


@pytest.fixture
def served():
    reg = CollectorRegistry()
    Counter("eplbd_up_total", "up", registry=reg).inc()
    checks = _Checks()
    servers = []

    def start(**kw):
        server = MetricsServer(reg, "127.0.0.1", 0, lambda: checks.health, lambda: checks.ready, **kw)
        server.start()
        servers.append(server)
        return server

    yield start, reg, checks
    for server in servers:
        server.stop()


def _raw(port: int, data: bytes, *, eof: bool = True, timeout: float = 5.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        if eof:
            try:
                s.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # the server closed it already
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except ConnectionResetError:
            pass  # the server may close with unread bytes pending: still a clean refusal
        return out


def test_http_endpoints(served):
    start, reg, checks = served
    port = start().port
    status, headers, body = http(port, "/metrics?x=1")
    assert status == 200 and headers["Content-Type"] == CONTENT_TYPE_PLAIN_0_0_4
    assert body == generate_latest(reg) and int(headers["Content-Length"]) == len(body)
    assert b"eplbd_up_total 1.0" in body

    assert http(port, "/healthz")[::2] == (200, b"ok\n")
    checks.health = (False, "ingest loop stalled")
    assert http(port, "/healthz")[::2] == (503, b"ingest loop stalled\n")
    assert http(port, "/readyz")[::2] == (503, b"no workers registered\n")
    checks.ready = (True, "4 ranks registered")
    assert http(port, "/readyz")[::2] == (200, b"4 ranks registered\n")

    assert http(port, "/nope")[0] == 404
    post = _raw(port, b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
    assert post.split(b" ")[1] == b"405" and b"Allow: GET, HEAD" in post
    head = _raw(port, b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    top, _, rest = head.partition(b"\r\n\r\n")
    assert top.split(b" ")[1] == b"200" and rest == b""
    assert f"Content-Length: {len(generate_latest(reg))}".encode() in top


def test_content_negotiation(served):
    start, _, _ = served
    port = start().port
    status, headers, body = http(port, "/metrics", {"Accept": "application/openmetrics-text; version=1.0.0"})
    assert status == 200 and headers["Content-Type"].startswith("application/openmetrics-text")
    assert body.endswith(b"# EOF\n")
    assert headers["Content-Type"].split(";")[0] == OPENMETRICS.split(";")[0]


def test_raising_check_is_503():
    def boom():
        raise RuntimeError("state lock poisoned")

    server = MetricsServer(CollectorRegistry(), "127.0.0.1", 0, boom, boom)
    server.start()
    try:
        status, _, body = http(server.port, "/healthz")
        assert status == 503 and b"state lock poisoned" in body
    finally:
        server.stop()


def test_checks_run_on_the_loop_and_a_stuck_loop_is_503():
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    on_loop = []

    def health():
        on_loop.append(threading.current_thread() is thread)
        return True, "ok"

    server = MetricsServer(CollectorRegistry(), "127.0.0.1", 0, health, health, loop=loop, check_timeout_s=0.3)
    server.start()
    try:
        assert http(server.port, "/healthz")[::2] == (200, b"ok\n") and on_loop == [True]
        loop.call_soon_threadsafe(time.sleep, 1.0)  # the loop is busy past the check's timeout
        status, _, body = http(server.port, "/healthz")
        assert status == 503 and b"did not answer within 0.3s" in body
        assert http(server.port, "/metrics")[0] == 200  # a scrape does not wait for the loop
    finally:
        server.stop()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


@pytest.mark.parametrize("raw,statuses", [
    (b"\x00\xff\xfe garbage\r\n\r\n", {b"400"}),
    (b"GET /metrics\r\n\r\n", {b"200"}),  # HTTP/0.9 style: answered as HTTP/1.0, with a status line
    (b"GET /metrics SPDY/9\r\n\r\n", {b"400"}),
    (b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 70000 + b"\r\n\r\n", {b"431"}),
    (b"GET /metr", {b"404"}),  # the client half-closes mid-request
])
def test_garbage_does_not_kill_server(served, raw, statuses):
    start, _, _ = served
    port = start().port
    answer = _raw(port, raw)
    assert answer == b"" or (answer.startswith(b"HTTP/1.0 ") and answer.split(b" ")[1] in statuses), answer[:80]
    assert http(port, "/healthz")[0] == 200


def test_slow_client_is_cut_off_and_server_lives(served):
    start, _, _ = served
    port = start(read_timeout_s=0.2).port
    t0 = time.monotonic()
    _raw(port, b"GET /metrics HTTP/1.1\r\n", eof=False)  # never finishes the head
    assert time.monotonic() - t0 < 3
    assert http(port, "/metrics")[0] == 200


def test_connections_past_the_limit_are_closed(served):
    start, _, _ = served
    port = start(max_connections=2, read_timeout_s=30).port
    idle = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(2)]
    try:
        time.sleep(0.2)  # let the server accept them
        assert _raw(port, b"GET /healthz HTTP/1.1\r\n\r\n") == b""
    finally:
        for s in idle:
            s.close()

    def served_again() -> bool:  # until the server has seen the two closes, it still turns new ones away
        try:
            return http(port, "/healthz")[0] == 200
        except (ConnectionError, urllib.error.URLError):  # RemoteDisconnected is a ConnectionResetError
            return False

    assert wait_for(served_again, timeout=5)


def test_stop_ends_idle_connections_and_unbinds(served):
    start, _, _ = served
    server = start(read_timeout_s=30)
    port = server.port
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        time.sleep(0.1)  # let the server accept it
        t0 = time.monotonic()
        server.stop()
        assert s.recv(1) == b"" and time.monotonic() - t0 < 3
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


def test_ipv6_host():
    if not socket.has_ipv6:
        pytest.skip("no IPv6 here")
    server = MetricsServer(CollectorRegistry(), "::1", 0, lambda: (True, ""), lambda: (True, ""))
    try:
        server.start()
    except OSError:
        pytest.skip("::1 cannot be bound here")
    try:
        with urllib.request.urlopen(f"http://[::1]:{server.port}/healthz", timeout=5) as r:
            assert r.status == 200
    finally:
        server.stop()
