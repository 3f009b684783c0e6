"""The soak benchmark's pieces against a real daemon: simulated ranks that really commit plans
(and keep the permitted layers of an aborted one), and the checks that decide its exit status."""

import sys
import time

import numpy as np

from daemon_helpers import G, DaemonThread, make_ranks, skewed_step_load, wait_for
from eplbd.client.rpc import EplbClient

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_soak import SimRank, placement_digest, rss_analysis, rss_steps  # noqa: E402
from daemon_bench import SendCounter, reconcile  # noqa: E402


def _drive(sims, until, timeout=20.0, step=0):
    """Call every rank's ``service`` until ``until()`` holds."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for s in sims:
            s.service(time.monotonic(), step)
        if until():
            return True
        time.sleep(0.01)
    return False


def _sims(d, chunk=1):
    links, phy2log = make_ranks(d)
    rng = np.random.default_rng(0)
    for link in links:
        assert link.send_report(0, skewed_step_load(rng, phy2log, 10), 0)
    assert wait_for(lambda: d.state.window.fill == 10)
    return [SimRank(link, phy2log, chunk, heartbeat_s=1.0) for link in links], phy2log


def _on_daemon_placement(d, sims):
    return all(s.plan is None and s.epoch == d.state.epoch and placement_digest(s.base) == placement_digest(
        d.state.phy2log) for s in sims)


def test_simulated_ranks_commit_a_plan_layer_by_layer_and_report_mixed_placements():
    with DaemonThread(step_interval=10**9) as d:
        sims, phy2log = _sims(d, chunk=1)
        with EplbClient(d.rpc) as c:
            reply = c.rebalance()
        assert reply.pushed and len(reply.layers) >= 2
        assert _drive(sims, lambda: d.state.epoch == 1 and _on_daemon_placement(d, sims))
        assert all(s.counts["plans_applied"] == 1 and not s.errors for s in sims)
        # Between commits a rank tags its reports with the plan epoch and the applied prefix.
        s = sims[0]
        s.plan, s.layers, s.applied = type("P", (), {"epoch": 7, "plan_id": 3})(), [2, 0], 1
        s.rows = {2: phy2log[2].flip(0), 0: phy2log[0]}
        epoch, applied, key, placement = s.tag()
        assert (epoch, applied, key) == (7, 1, (3, 7, 1))
        assert placement()[2].tolist() == phy2log[2].flip(0).tolist()
        for link in (x.link for x in sims):
            link.close()


def test_an_abort_after_a_permission_leaves_every_rank_on_the_truncated_placement():
    with DaemonThread(step_interval=10**9, plan_timeout_s=60) as d:
        sims, _ = _sims(d, chunk=1)
        with EplbClient(d.rpc) as c:
            reply = c.rebalance()
        assert len(reply.layers) >= 2
        first = reply.layers[0]
        def first_layer_announced():  # each rank serviced until it has announced one staged layer
            for s in sims:
                if s.staged == 0:
                    s.service(time.monotonic(), 0)
            return all(s.staged == 1 for s in sims)

        assert wait_for(first_layer_announced)
        assert wait_for(lambda: d.state.current_plan.permitted == {first})
        sims[1].link.abort(reply.plan_id, reply.epoch, "simulated transfer failure")
        assert _drive(sims, lambda: d.state.epoch == 1 and _on_daemon_placement(d, sims))
        assert d.state.current_plan.layers == [first]
        assert all(s.counts["aborts"] == 1 and not s.errors for s in sims)
        for link in (x.link for x in sims):
            link.close()


def test_reconcile_finds_a_report_the_daemon_did_not_count():
    counter = SendCounter(range(G))
    for r in range(G):
        counter.record(r, True)
    counter.record(0, False)  # dropped locally, then a later report got through: a seq gap
    counter.record(0, True)
    sent = counter.as_dict()
    assert all(v["ok"] for v in reconcile(sent, G + 1, {"seq_gap": 1}).values())
    bad = reconcile(sent, G, {"seq_gap": 1})
    assert not bad["sent_ok == received"]["ok"] and not bad["attempts == received + seq_gap + trailing_local"]["ok"]


def test_rss_slope_is_fitted_over_the_second_half_only():
    samples = [(t, 100.0 + (50 if t < 50 else 0) + 0.5 * (t >= 50) * (t - 50), 0.0) for t in range(0, 101, 2)]
    r = rss_analysis(samples, 100)
    assert abs(r["second_half_slope_mb_per_min"] - 30.0) < 1e-6  # 0.5 MB/s
    assert r["first_mb"] == 150 and r["max_mb"] == 150 and r["last_mb"] == 125


def test_rss_rises_are_matched_with_the_rebalances_around_them():
    samples = [(0, 300, 0), (2, 301, 0), (4, 500, 0), (6, 500, 0), (8, 540, 0)]
    calls = [(3.5, "rebalance", 1.5), (7.9, "status", 0.1)]  # (finished at, op, took)
    steps = rss_steps(samples, calls)
    assert [s["rise_mb"] for s in steps] == [199, 40]
    assert steps[0]["rebalances_started_at_s_and_took_s"] == [(2.0, 1.5)]
    assert steps[1]["rebalances_started_at_s_and_took_s"] == []
