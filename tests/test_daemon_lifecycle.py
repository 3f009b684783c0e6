"""Plan aborts, re-registration, restarts without state, metrics/health endpoints, balancedness log."""

import logging
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch

from daemon_helpers import G, L, P, DaemonThread, make_ranks, skewed_step_load, wait_for
from eplbd import errors
from eplbd.client.rpc import EplbClient
from eplbd.client.worker import WorkerLink
from eplbd.proto import Abort, Hello, Plan


def feed(links, phy2log, steps, seed=0):
    total = skewed_step_load(np.random.default_rng(seed), phy2log, steps)
    links[0].send_report(0, total, 0)  # one rank may carry the global load; sums are what count


def close(links):
    for link in links:
        link.close()


def test_plan_not_acked_in_time_is_aborted_and_ranks_told():
    with DaemonThread(step_interval=10, window_size=10, plan_timeout_s=0.5) as d:
        links, phy2log = make_ranks(d)
        feed(links, phy2log, 10)
        plans = [link.poll_pushed(5) for link in links]
        assert all(isinstance(p, Plan) for p in plans)
        aborts = [link.poll_pushed(5) for link in links]  # nobody stages: the plan times out
        assert all(isinstance(a, Abort) and a.plan_id == plans[0].plan_id for a in aborts)
        assert "not fully acked" in aborts[0].reason
        with EplbClient(d.rpc) as c:
            st = c.status()
            assert st.epoch == 0 and st.current_plan.state == "aborted" and "plan_timeout_s" in st.current_plan.reason
        assert d.state.counters.plans["aborted"] == 1
        assert torch.equal(d.state.phy2log, phy2log)  # old placement keeps serving
        close(links)


def test_rank_failure_aborts_plan_everywhere_and_status_names_it():
    with DaemonThread(step_interval=10, window_size=10) as d:
        links, phy2log = make_ranks(d)
        feed(links, phy2log, 10)
        plan = links[0].poll_pushed(5)
        for link in links[1:]:
            assert isinstance(link.poll_pushed(5), Plan)
        links[2].abort(plan.plan_id, plan.epoch, "transfer to rank 3 timed out")
        for link in links:
            msg = link.poll_pushed(5)
            assert isinstance(msg, Abort) and msg.rank == 2
        with EplbClient(d.rpc) as c:
            reason = c.get_plan(plan_id=plan.plan_id).reason
        assert "rank 2 failed: transfer to rank 3 timed out" in reason
        # Late messages about the aborted plan are ignored, not errors.
        links[1].layer_ready(plan.plan_id, plan.epoch, plan.layers)
        assert d.state.epoch == 0
        close(links)


def test_reregistering_rank_replaces_old_incarnation_and_aborts_plan():
    with DaemonThread(step_interval=10, window_size=10) as d:
        links, phy2log = make_ranks(d)
        feed(links, phy2log, 10)
        for link in links:
            assert isinstance(link.poll_pushed(5), Plan)
        old_id = links[1].worker_id
        again = WorkerLink(d.rpc, d.ingest, 1)
        # While the old incarnation's session is alive, no other connection may take its rank ...
        with pytest.raises(errors.PermissionDeniedError, match="rank 1 is held by the live session"):
            again.register(ep_size=G, num_layers=L, num_logical=8, num_physical=P, epoch=0, phy2log=phy2log)
        assert d.state.workers[1].worker_id == old_id and d.state.current_plan.in_flight
        # ... once it released its session (a graceful restart), the new one does at once.
        assert links[1].release()
        again.register(ep_size=G, num_layers=L, num_logical=8, num_physical=P, epoch=0, phy2log=phy2log)
        assert d.state.workers[1].worker_id == again.worker_id != old_id
        assert isinstance(links[0].poll_pushed(5), Abort)
        # The old incarnation's reports are now refused.
        links[1].send_report(20, torch.ones(1, L, P, dtype=torch.int64), 0)
        assert wait_for(lambda: d.state.counters.drop_reasons.get("unknown_rank") == 1)
        close([*links, again])


def test_restart_with_state_dir_deleted_rebuilds_from_workers(tmp_path):
    placement = torch.arange(P).remainder(8).repeat(L, 1)
    with DaemonThread(state_dir=str(tmp_path / "gone")) as d:
        links, _ = make_ranks(d, epoch=5, phy2log=placement)
        with EplbClient(d.rpc) as c:
            rep = c.get_placement()
        assert rep.epoch == 5 and torch.equal(rep.phy2log, placement)
        assert (tmp_path / "gone" / "state.json").is_file()
        close(links)


def test_ranks_disagreeing_on_placement_are_refused():
    with DaemonThread() as d:
        links, phy2log = make_ranks(d, n=G)
        other = WorkerLink(d.rpc, d.ingest, 0)
        with pytest.raises(errors.RegistrationMismatchError, match="epoch 3"):
            other.register(ep_size=G, num_layers=L, num_logical=8, num_physical=P, epoch=3, phy2log=phy2log)
        close([*links, other])


def test_incompatible_protocol_version_gets_typed_error():
    with DaemonThread() as d:
        link = WorkerLink(d.rpc, d.ingest, 0)
        with pytest.raises(errors.VersionMismatchError, match="99"):
            link.request(Hello(role="worker", protocol_version=99, client_id="x"))
        close([link])


def http(port, path):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_metrics_and_probes():
    with DaemonThread(step_interval=10, window_size=10) as d:
        port = d.daemon.metrics_port
        code, body = http(port, "/readyz")
        assert code == 503 and "no workers" in body
        links, phy2log = make_ranks(d)
        assert http(port, "/readyz")[0] == 200
        feed(links, phy2log, 5)
        assert wait_for(lambda: 'eplbd_reports_received_total 1' in http(port, "/metrics")[1], timeout=5)
        body = http(port, "/metrics")[1]
        assert 'eplbd_workers_alive 4' in body and 'eplbd_epoch 0' in body
        assert 'eplbd_balancedness{kind="observed",stat="mean"}' in body
        assert http(port, "/healthz")[0] == 200
        close(links)


def test_balancedness_log_line(caplog):
    caplog.set_level(logging.INFO, logger="eplbd.daemon.server")
    with DaemonThread(step_interval=10_000, log_balancedness=True, log_balancedness_interval=5) as d:
        links, phy2log = make_ranks(d)
        feed(links, phy2log, 12)
        assert wait_for(lambda: any("balancedness step=11" in r.getMessage() for r in caplog.records))
        close(links)


def test_operator_plan_refused_while_one_is_in_flight(tmp_path):
    with DaemonThread(step_interval=10_000, window_size=10) as d:
        links, phy2log = make_ranks(d)
        feed(links, phy2log, 10)
        assert wait_for(lambda: d.state.window.fill == 10)
        with EplbClient(d.rpc) as c:
            first = c.rebalance(force=True)
            assert first.pushed
            with pytest.raises(errors.PlanConflictError, match=f"plan {first.plan_id} .* is pending"):
                c.rebalance(force=True)
            (tmp_path / "p.json").write_text('{"phy2log": %s}' % phy2log.tolist())
            with pytest.raises(errors.PlanConflictError, match="cannot start a plan now"):
                c.load_placement(str(tmp_path / "p.json"))
            assert c.rebalance(dry_run=True).pushed is False  # a dry run never conflicts
        close(links)
