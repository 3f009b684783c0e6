"""Plans applied layer by layer: reports from mixed placements, and aborts after a permission."""

import numpy as np
import torch

from daemon_helpers import G, L, DaemonThread, make_ranks, skewed_step_load, wait_for
from eplbd.proto import Abort, Commit, Plan
from eplbd.daemon.window import physical_to_logical


def _plan_everywhere(d, links, phy2log):
    links[0].send_report(0, skewed_step_load(np.random.default_rng(0), phy2log, 10), 0)
    plans = [link.poll_pushed(5) for link in links]
    assert all(isinstance(p, Plan) for p in plans), plans
    assert len(plans[0].layers) >= 2, "the skewed load should move at least two layers"
    return plans[0]


def _close(links):
    for link in links:
        link.close()


def test_report_of_a_partly_applied_plan_maps_through_the_mixed_placement():
    with DaemonThread(step_interval=10, window_size=100) as d:
        links, phy2log = make_ranks(d)
        plan = _plan_everywhere(d, links, phy2log)
        before = d.state.window.logical_load()
        mixed = phy2log.clone()
        mixed[plan.layers[0]] = plan.phy2log[0]
        load = skewed_step_load(np.random.default_rng(1), mixed, 2)
        links[1].send_report(10, load, plan.epoch, layers_applied=1)
        assert wait_for(lambda: d.state.counters.reports_received == 2)
        expect = before + physical_to_logical(load.numpy(), mixed.numpy(), d.state.topo.num_logical).sum(0)
        np.testing.assert_array_equal(d.state.window.logical_load(), expect)
        # Mapped through the base placement instead, the layer the plan changed would differ.
        wrong = before + physical_to_logical(load.numpy(), phy2log.numpy(), d.state.topo.num_logical).sum(0)
        assert not np.array_equal(wrong[plan.layers[0]], expect[plan.layers[0]])
        _close(links)


def test_abort_after_a_permission_truncates_the_plan_and_it_still_commits():
    with DaemonThread(step_interval=10, window_size=100) as d:
        links, phy2log = make_ranks(d)
        plan = _plan_everywhere(d, links, phy2log)
        first = plan.layers[0]
        for link in links:
            link.layer_ready(plan.plan_id, plan.epoch, [first])
        commits = [link.poll_pushed(5) for link in links]
        assert all(isinstance(c, Commit) and c.layers == [first] for c in commits)
        links[2].abort(plan.plan_id, plan.epoch, "transfer of the next layer failed")
        aborts = [link.poll_pushed(5) for link in links]
        assert all(isinstance(a, Abort) and a.keep_layers == [first] for a in aborts), aborts
        assert d.state.epoch == 0 and d.state.current_plan.state == "committing"
        for link in links:
            link.ack(plan.plan_id, plan.epoch, [first], step=16)
        assert wait_for(lambda: d.state.epoch == plan.epoch)
        expect = phy2log.clone()
        expect[first] = plan.phy2log[0]
        assert torch.equal(d.state.phy2log, expect)  # only the permitted layer changed
        assert d.state.current_plan.layers == [first]
        assert "truncated to 1 permitted layer(s): rank 2 failed" in d.state.current_plan.info().reason
        _close(links)


def test_abort_before_any_permission_leaves_the_placement():
    with DaemonThread(step_interval=10, window_size=100) as d:
        links, phy2log = make_ranks(d)
        plan = _plan_everywhere(d, links, phy2log)
        links[0].abort(plan.plan_id, plan.epoch, "staging failed")
        aborts = [link.poll_pushed(5) for link in links]
        assert all(isinstance(a, Abort) and a.keep_layers == [] for a in aborts)
        assert d.state.current_plan.state == "aborted" and torch.equal(d.state.phy2log, phy2log)
        assert G == len(links) and L >= 2
        _close(links)


def test_a_truncated_plan_whose_acks_time_out_is_committed_never_taken_back():
    """A permission is a point of no return: when the acks of the truncated plan do not come,
    the daemon commits the permitted layers rather than aborting them out from under ranks
    that may already run them (it used to send ``Abort(keep_layers=[])`` on the next tick)."""
    with DaemonThread(step_interval=10, window_size=100, plan_timeout_s=1.0, plan_stall_timeout_s=30.0) as d:
        links, phy2log = make_ranks(d)
        plan = _plan_everywhere(d, links, phy2log)
        first = plan.layers[0]
        for link in links:
            link.layer_ready(plan.plan_id, plan.epoch, [first])
        assert all(isinstance(link.poll_pushed(5), Commit) for link in links)
        # Nobody acks: the plan times out (truncated), then times out again.
        aborts = [[link.poll_pushed(10), link.poll_pushed(10)] for link in links]
        for pair in aborts:
            assert all(isinstance(a, Abort) and a.keep_layers == [first] for a in pair), pair
        assert wait_for(lambda: d.state.epoch == plan.epoch)
        rec = d.state.plans[plan.plan_id]
        assert rec.state == "committed" and rec.layers == [first]
        expect = phy2log.clone()
        expect[first] = plan.phy2log[0]
        assert torch.equal(d.state.phy2log, expect)
        # A late ack of the committed plan changes nothing.
        links[0].ack(plan.plan_id, plan.epoch, [first], step=32)
        assert links[0].poll_pushed(0.3) is None and d.state.epoch == plan.epoch
        _close(links)


def test_plan_history_is_bounded():
    from eplbd.daemon import lifecycle as state_mod

    with DaemonThread(step_interval=1, window_size=100, min_gain=0.0) as d:
        links, phy2log = make_ranks(d)
        old, state_mod.MAX_PLANS_KEPT = state_mod.MAX_PLANS_KEPT, 2
        try:
            seen = []
            for i in range(4):
                links[0].send_report(10 * i, skewed_step_load(np.random.default_rng(i), phy2log, 10), d.state.epoch)
                plans = [link.poll_pushed(5) for link in links]
                assert all(isinstance(p, Plan) for p in plans), plans
                seen.append(plans[0].plan_id)
                for link in links:
                    link.abort(plans[0].plan_id, plans[0].epoch, "test: drop it")
                assert all(isinstance(link.poll_pushed(5), Abort) for link in links)
            assert sorted(d.state.plans) == seen[-2:]
        finally:
            state_mod.MAX_PLANS_KEPT = old
        _close(links)
