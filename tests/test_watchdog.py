"""The watchdog: a plan without progress is aborted and counted; status, metrics and /healthz say
when the last plan committed and whether rebalancing is stuck."""

import numpy as np

from daemon_helpers import DaemonThread, make_ranks, skewed_step_load, wait_for
from eplbd.client.rpc import EplbClient
from eplbd.config import EplbConfig
from eplbd.proto import Abort, Plan
from eplbd.daemon.scheduler import SchedulerState, decide
from test_daemon_lifecycle import http
from test_faults_state import NOW, ack, make_state, ready, start_plan

CFG = EplbConfig(step_interval=100, plan_timeout_s=60.0, plan_stall_timeout_s=5.0)


def in_flight(**kw) -> SchedulerState:
    return SchedulerState(step=10, window_fill=10, plan_started_at=100.0, **kw)


def test_decide_aborts_a_stalled_plan_but_not_one_that_progresses():
    d = decide(106.0, in_flight(plan_progress_at=100.5), CFG)
    assert (d.action, d.trigger) == ("abort", "stalled") and "plan_stall_timeout_s=5" in d.reason
    assert decide(106.0, in_flight(plan_progress_at=103.0), CFG).action == "wait"
    assert decide(104.0, in_flight(), CFG).action == "wait"  # no progress yet, but younger than the stall timeout


def test_decide_order_timeout_then_dead_rank_then_stall():
    assert decide(161.0, in_flight(plan_progress_at=100.0, dead_ranks=((2, 9.0),)), CFG).trigger == "timeout"
    d = decide(107.0, in_flight(plan_progress_at=100.0, dead_ranks=((3, 12.0), (1, 11.0))), CFG)
    assert (d.trigger, d.rank) == ("rank_dead", 1) and "also silent: [3]" in d.reason


def test_stalled_plan_is_aborted_counted_and_then_ranks_are_told():
    st, phy2log = make_state(plan_stall_timeout_s=5.0)
    plan = start_plan(st, phy2log)
    ready(st, plan, plan.layers[:1], ranks=[0])
    t0 = st.current_plan.progress_mono
    assert st.tick(NOW, t0 + 4.0) == []
    assert st.rebalancing_stuck(t0 + 4.0) == (False, "ok")
    # Stalled beyond the timeout but not yet aborted (no tick ran): that is wedged.
    stuck, why = st.rebalancing_stuck(t0 + 6.0)
    assert stuck and "no progress for 6s" in why
    out = st.tick(NOW, t0 + 6.0)
    assert [type(o.msg) for o in out] == [Abort] and "stalled" in out[0].msg.reason
    assert st.counters.aborts == {"stalled": 1} and st.last_abort.cause == "stalled"
    assert st.rebalancing_stuck(t0 + 6.0)[0] is False  # one abort is not a wedge


def test_aborts_in_a_row_mean_stuck_until_a_commit():
    st, phy2log = make_state(stuck_abort_streak=2)
    start_plan(st, phy2log)
    st.abort_plan("drained for a resize", cause="resize")  # an operator's doing, not a failure
    st.last_plan_step = -1
    assert st.aborts_in_a_row == 0
    for n in range(2):
        plan = start_plan(st, phy2log)
        st.abort_plan("test", cause="stalled")
        st.last_plan_step = -1
        assert st.rebalancing_stuck(0.0)[0] is (n == 1)
    status = st.status(NOW)
    assert status.rebalancing_stuck and status.aborts_in_a_row == 2 and "last 2 plans" in status.stuck_reason
    assert status.last_commit_at == 0.0
    plan = start_plan(st, phy2log)
    ready(st, plan, plan.layers)
    ack(st, plan, plan.layers)
    status = st.status(NOW)
    assert st.epoch == plan.epoch and not status.rebalancing_stuck and status.aborts_in_a_row == 0
    assert status.last_commit_at > 0 and status.stuck_reason == ""


def test_daemon_healthz_fails_after_repeated_stalls_and_metrics_say_why():
    with DaemonThread(step_interval=10, window_size=10, plan_stall_timeout_s=0.3, stuck_abort_streak=2) as d:
        links, phy2log = make_ranks(d)
        port = d.daemon.metrics_port
        assert http(port, "/healthz") == (200, "ok\n")
        rng = np.random.default_rng(0)
        for n in range(2):  # ranks take the plan and then say nothing: the watchdog aborts it
            links[0].send_report(10 * n, skewed_step_load(rng, phy2log, 10), 0)
            assert all(isinstance(link.poll_pushed(10), Plan) for link in links)
            assert all(isinstance(link.poll_pushed(10), Abort) for link in links)
        with EplbClient(d.rpc) as c:
            st = c.status()
        assert st.rebalancing_stuck and st.aborts_in_a_row == 2 and st.last_abort.cause == "stalled"
        assert "plan_stall_timeout_s=0.3" in st.last_abort.reason and st.last_commit_at == 0.0
        code, body = http(port, "/healthz")
        assert code == 503 and "rebalancing stuck: the last 2 plans were aborted" in body
        assert wait_for(lambda: 'eplbd_plans_aborted_total{reason="stalled"} 2' in http(port, "/metrics")[1])
        assert "eplbd_rebalancing_stuck 1" in http(port, "/metrics")[1]
        for link in links:
            link.close()


def test_eplbctl_status_shows_the_watchdog():
    from eplbd.client.render import render_status

    st, phy2log = make_state(stuck_abort_streak=1)
    lines = "\n".join(render_status(st.status(NOW), None))
    assert "rebalancing: ok  last commit never  aborts in a row 0" in lines and "last abort" not in lines
    start_plan(st, phy2log)
    st.abort_plan("plan stalled: test", cause="stalled")
    lines = "\n".join(render_status(st.status(NOW), None))
    assert "rebalancing: STUCK: the last 1 plans were aborted" in lines
    assert "last abort: plan 1 (stalled, no rank in particular): plan stalled: test" in lines
