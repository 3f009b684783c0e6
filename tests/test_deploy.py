"""deploy/: systemd readiness (a real unix datagram socket), the unit's MemoryDenyWriteExecute claim
(the daemon run under the same kernel restriction), and the unit, env file and example config."""

import contextlib
import ctypes
import os
import pathlib
import signal
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

from eplbd.daemon.server import sd_notify

REPO = pathlib.Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
SERVE = [sys.executable, "-m", "eplbd.cli", "serve", "--rpc", "tcp://127.0.0.1:0", "--ingest", "tcp://127.0.0.1:0",
         "--metrics-port", "0"]

pytestmark = pytest.mark.timeout(120)


@contextlib.contextmanager
def serve(*flags: str, **popen):
    """``eplbd serve`` on free loopback ports; killed if the test leaves it running, pipes closed."""
    with subprocess.Popen([*SERVE, *flags], **popen) as proc:
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.kill()


def notify_socket() -> tuple[socket.socket, str]:
    """A bound AF_UNIX datagram socket like systemd's, in a short dir (sun_path is 108 bytes)."""
    path = os.path.join(tempfile.mkdtemp(prefix="eplbd-n-"), "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(60)
    return sock, path


def recv_until(sock: socket.socket, key: str) -> dict[str, str]:
    """Read notifications until one carries ``key``; returns that datagram's assignments."""
    while True:
        msg = sock.recv(4096).decode()
        fields = dict(line.split("=", 1) for line in msg.splitlines())
        if key in fields:
            return fields


def test_serve_notifies_ready_once_bound_and_stopping_on_sigterm():
    from eplbd.client.rpc import EplbClient

    sock, path = notify_socket()
    try:
        with serve(env={**os.environ, "NOTIFY_SOCKET": path}, stdout=subprocess.DEVNULL) as proc:
            ready = recv_until(sock, "READY")
            assert ready["READY"] == "1"
            rpc = dict(kv.split("=", 1) for kv in ready["STATUS"].split()[1:])["rpc"]
            with EplbClient(rpc, timeout=20) as client:  # bound when READY=1 arrived: it answers
                assert client.status().epoch == 0
            proc.send_signal(signal.SIGTERM)
            assert recv_until(sock, "STOPPING")["STOPPING"] == "1"
            assert proc.wait(60) == 0
    finally:
        sock.close()
        os.unlink(path)
        os.rmdir(os.path.dirname(path))


def test_sd_notify_abstract_socket_and_no_socket():
    name = f"eplbd-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(10)
        assert sd_notify("STATUS=hello", env={"NOTIFY_SOCKET": "@" + name})
        assert sock.recv(100) == b"STATUS=hello"
    assert not sd_notify("READY=1", env={})
    assert not sd_notify("READY=1", env={"NOTIFY_SOCKET": "@" + name})  # nobody listens: logged, not raised
    assert not sd_notify("READY=1", env={"NOTIFY_SOCKET": "vsock:2:9"})  # unsupported: logged, not raised


PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1


def _mdwe_supported() -> bool:
    probe = "import ctypes, sys; sys.exit(ctypes.CDLL(None, use_errno=True).prctl(65, 1, 0, 0, 0) != 0)"
    return subprocess.run([sys.executable, "-c", probe], timeout=30).returncode == 0


def _deny_write_execute() -> None:  # in the child, before exec: inherited by the daemon, cannot be undone
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
        os._exit(97)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_MDWE is Linux-only")
def test_daemon_plans_under_memory_deny_write_execute():
    """The unit sets MemoryDenyWriteExecute=yes: the daemon (torch, uvloop, pyzmq, the policy) must never
    need writable+executable memory. PR_SET_MDWE is the kernel's own form of that restriction."""
    if not _mdwe_supported():
        pytest.skip("this kernel has no PR_SET_MDWE (Linux >= 6.3)")
    sys.path.insert(0, str(REPO / "tests"))
    from daemon_helpers import make_ranks, skewed_step_load, wait_for

    from eplbd.client.rpc import EplbClient

    with serve("--window-size", "20", "--step-interval", "20", stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
               text=True, preexec_fn=_deny_write_execute) as proc:
        line = proc.stdout.readline()
        assert line.startswith("READY "), f"exit {proc.wait()}"  # 97: the restriction could not be set
        ends = dict(kv.split("=", 1) for kv in line.split()[1:])
        d = type("Endpoints", (), {"rpc": ends["rpc"], "ingest": ends["ingest"]})
        links, phy2log = make_ranks(d)
        rng = np.random.default_rng(0)
        for step in range(0, 40, 4):
            for link in links:
                link.send_report(step, skewed_step_load(rng, phy2log, 4), 0)
        with EplbClient(ends["rpc"], timeout=20) as client:
            assert wait_for(lambda: client.status().current_plan is not None, 60)  # the policy ran
            assert client.rebalance(dry_run=True, force=True).moved_slots > 0
        for link in links:
            link.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
