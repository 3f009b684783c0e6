"""``eplbd demo`` killed with SIGKILL leaves no process behind: its ranks are tied to it (PDEATHSIG),
as ``eplbd launch``'s children are. A real ``eplbd demo`` subprocess, a real SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

RANKS = 2


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def _tree(pid: int) -> set[int]:
    seen, todo = set(), [pid]
    while todo:
        for c in _children(todo.pop()):
            if c not in seen:
                seen.add(c)
                todo.append(c)
    return seen


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited (its parent, the test's subprocess, is gone)


def test_a_sigkilled_demo_leaves_no_process_behind(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("EPLBD_")}
    log = open(tmp_path / "demo.log", "w")
    demo = subprocess.Popen([sys.executable, "-m", "eplbd.cli", "demo", "--ranks", str(RANKS), "--steps", "1000000",
                             "--routing", "router", "--layers", "2"], stdout=log, stderr=log, env=env,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:  # until every rank process runs (spawned: "multiprocessing.spawn ... spawn_main")
            ranks = [p for p in _tree(demo.pid) if "spawn_main" in _cmdline(p)]
            if len(ranks) >= RANKS:
                break
            assert demo.poll() is None, (tmp_path / "demo.log").read_text()[-3000:]
            assert time.monotonic() < deadline, f"the demo's ranks did not start: {(tmp_path / 'demo.log').read_text()}"
            time.sleep(0.2)
        time.sleep(3.0)  # let them get into their step loop (collectives, the agent's threads)
        procs = _tree(demo.pid)
        assert len(procs) >= RANKS
        demo.send_signal(signal.SIGKILL)
        demo.wait(10)
        deadline = time.monotonic() + 30
        while (left := [p for p in procs if _alive(p)]) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not left, f"left behind: {[(p, _cmdline(p)[:120]) for p in left]}"
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait(10)
        for p in _tree(demo.pid) if demo.poll() is None else ():
            os.kill(p, signal.SIGKILL)
        log.close()
