"""An engine that steps but records no load is reported, not silently balanced on zeros: a real daemon,
simulated ranks over real ZMQ sockets, status, eplbctl and /metrics."""

import numpy as np
import torch

from daemon_helpers import G, DaemonThread, make_ranks, skewed_step_load, wait_for
from eplbd.client.render import render_status
from eplbd.client.rpc import EplbClient
from test_daemon_lifecycle import http

LIMIT = 12


def report(links, phy2log, first, steps, *, silent_ranks, rng):
    load = skewed_step_load(rng, phy2log, steps)
    for r, link in enumerate(links):
        assert link.send_report(first, torch.zeros_like(load) if r in silent_ranks else load.clone(), 0)


def gauge(d, name):
    lines = [ln for ln in http(d.daemon.metrics_port, "/metrics")[1].splitlines() if ln.startswith(name + " ")]
    return float(lines[0].split()[1]) if lines else None


def test_load_silent_on_every_rank_is_flagged_in_status_ctl_and_metrics_and_clears():
    rng = np.random.default_rng(0)
    with DaemonThread(step_interval=10_000, silent_load_warn_steps=LIMIT) as d:
        links, phy2log = make_ranks(d)
        with EplbClient(d.rpc) as c:
            report(links, phy2log, 0, 4, silent_ranks=(), rng=rng)
            # one idle rank (dummy steps of an idle data-parallel rank) is not silence
            report(links, phy2log, 4, LIMIT + 4, silent_ranks={0}, rng=rng)
            assert wait_for(lambda: d.state.window.newest_step == LIMIT + 7 and d.state.counters.reports_received == 2 * G)
            st = c.status()
            assert (st.load_silent, st.silent_load_steps) == (False, 0)
            # every rank steps and counts nothing: the engine's load view is dead
            report(links, phy2log, LIMIT + 8, LIMIT - 1, silent_ranks=set(range(G)), rng=rng)
            assert wait_for(lambda: d.state.counters.reports_received == 3 * G)
            assert (c.status().load_silent, c.status().silent_load_steps) == (False, LIMIT - 1)
            report(links, phy2log, 2 * LIMIT + 7, 3, silent_ranks=set(range(G)), rng=rng)
            assert wait_for(lambda: d.state.counters.reports_received == 4 * G)
            st = c.status()
            assert (st.load_silent, st.silent_load_steps) == (True, LIMIT + 2)
            assert any(line.startswith(f"LOAD SILENT: no rank has counted a token for {LIMIT + 2} steps")
                       for line in render_status(st, None))
            assert wait_for(lambda: gauge(d, "eplbd_load_silent_steps") == LIMIT + 2, timeout=5)
            # one rank counts again in the middle of its newest report: silence is the steps after that
            load = torch.zeros_like(skewed_step_load(rng, phy2log, 3))
            load[1, 0, 0] = 1
            assert links[2].send_report(2 * LIMIT + 10, load, 0)
            assert wait_for(lambda: d.state.counters.reports_received == 4 * G + 1)
            assert (c.status().load_silent, c.status().silent_load_steps) == (False, 1)
        for link in links:
            link.close()
