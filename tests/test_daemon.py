"""Integration tests: a real daemon on tcp://127.0.0.1:0 and simulated ranks over real ZMQ sockets."""

import numpy as np
import pytest
import torch
import zmq

from daemon_helpers import E, G, L, P, DaemonThread, make_ranks, skewed_step_load, wait_for
from eplbd import errors
from eplbd.client.rpc import EplbClient
from eplbd.client.worker import WorkerLink
from eplbd.policy import observed_balancedness, predicted_balancedness, rank_loads, summarize
from eplbd.proto import Commit, Plan


def stream(links, phy2log, rng, first, steps, epoch=0):
    """Every rank reports its share of each step (the global load split over ranks)."""
    total = skewed_step_load(rng, phy2log, steps)
    for r, link in enumerate(links):
        share = total // len(links) + (torch.arange(len(links)).view(-1, 1, 1, 1)[r] == 0) * (total % len(links))
        assert link.send_report(first, share.contiguous(), epoch)
    return total


def test_balancedness_over_rpc_equals_direct_computation():
    rng = np.random.default_rng(0)
    with DaemonThread(step_interval=10_000) as d:
        links, phy2log = make_ranks(d)
        total = stream(links, phy2log, rng, 0, 20)
        assert wait_for(lambda: d.state.window.fill == 20 and d.state.counters.reports_received == G)
        with EplbClient(d.rpc) as c:
            b = c.balancedness(per_layer=True, per_rank=True)
        phys = total.sum(0)
        obs = observed_balancedness(phys, G)
        want = summarize(obs, rank_loads(phys, G))
        assert b.observed.mean == pytest.approx(want.mean) and b.observed.min == pytest.approx(want.min)
        assert b.observed.aggregate == pytest.approx(want.aggregate)
        logical = torch.zeros(L, E, dtype=torch.int64)
        for l in range(L):
            logical[l].index_add_(0, phy2log[l], phys[l])
        assert b.per_layer_predicted == pytest.approx(predicted_balancedness(logical, phy2log, G).tolist())
        torch.testing.assert_close(b.per_rank_load, rank_loads(phys, G).to(torch.float64))
        for link in links:
            link.close()


def run_plan(links, timeout=5.0):
    """Simulated ranks: stage on Plan, apply on Commit, ack."""
    plans = {}
    for link in links:
        msg = link.poll_pushed(timeout)
        assert isinstance(msg, Plan), msg
        plans[link.rank] = msg
        link.layer_ready(msg.plan_id, msg.epoch, msg.layers)
    for link in links:
        msg = link.poll_pushed(timeout)
        assert isinstance(msg, Commit), msg
        link.ack(msg.plan_id, msg.epoch, msg.layers, step=0)
    return plans[0]


def test_skewed_load_triggers_plan_at_step_interval_and_commits():
    rng = np.random.default_rng(1)
    with DaemonThread(step_interval=30, window_size=30) as d:
        links, phy2log = make_ranks(d)
        stream(links, phy2log, rng, 0, 29)
        assert wait_for(lambda: d.state.window.fill == 29)
        assert all(link.poll_pushed(0.3) is None for link in links)  # not yet due
        stream(links, phy2log, rng, 29, 1)
        plan = run_plan(links)
        assert plan.epoch == 1 and plan.base_epoch == 0 and plan.layers
        assert wait_for(lambda: d.state.epoch == 1)
        with EplbClient(d.rpc) as c:
            st = c.status()
            assert st.epoch == 1 and st.current_plan.state == "committed" and "step_interval" in st.last_decision_reason
            assert c.get_placement().epoch == 1
            info = c.get_plan(epoch=1)
            assert info.moved_bytes == info.moved_slots * 1000 and "committed" in info.timings
        for link in links:
            link.close()


def test_balanced_load_is_skipped_with_reason():
    with DaemonThread(step_interval=10, window_size=10, min_gain=0.05) as d:
        links, phy2log = make_ranks(d)
        flat = torch.full((10, L, P), 5, dtype=torch.int64)
        for link in links:
            link.send_report(0, flat, 0)
        assert wait_for(lambda: "below min_gain" in d.state.last_decision_reason
                        or "current placement" in d.state.last_decision_reason)
        assert all(link.poll_pushed(0.2) is None for link in links)
        with EplbClient(d.rpc) as c:
            assert "min_gain" in c.status().last_decision_reason or "current" in c.status().last_decision_reason
        for link in links:
            link.close()


def test_dry_run_pushes_nothing_pause_stops_schedule_manual_works_while_paused():
    rng = np.random.default_rng(2)
    with DaemonThread(step_interval=20, window_size=50) as d:
        links, phy2log = make_ranks(d)
        with EplbClient(d.rpc) as c:
            c.pause("maintenance")
            stream(links, phy2log, rng, 0, 40)
            assert wait_for(lambda: d.state.window.fill == 40)
            assert all(link.poll_pushed(0.3) is None for link in links)
            assert c.status().paused and "paused" in c.status().last_decision_reason
            dry = c.rebalance(dry_run=True)
            assert not dry.pushed and dry.phy2log.shape == (L, P) and dry.predicted_after > dry.predicted_before
            assert all(link.poll_pushed(0.2) is None for link in links)
            reply = c.rebalance(layers=[1])
            assert reply.pushed and reply.layers == [1] and reply.epoch == 1
            plan = run_plan(links)
            assert plan.layers == [1]
            assert wait_for(lambda: d.state.epoch == 1)
            c.resume()
            assert not c.status().paused
        for link in links:
            link.close()


def test_restart_keeps_epoch(tmp_path):
    rng = np.random.default_rng(3)
    with DaemonThread(step_interval=10, window_size=10, state_dir=str(tmp_path)) as d:
        links, phy2log = make_ranks(d)
        stream(links, phy2log, rng, 0, 10)
        run_plan(links)
        assert wait_for(lambda: d.state.epoch == 1)
        new_placement = d.state.phy2log.clone()
        for link in links:
            link.close()
    with DaemonThread(state_dir=str(tmp_path)) as d2:
        with EplbClient(d2.rpc) as c:
            assert c.status().epoch == 1
            assert torch.equal(c.get_placement().phy2log, new_placement)
        links, _ = make_ranks(d2, epoch=1, phy2log=new_placement)
        assert d2.state.epoch == 1 and len(d2.state.workers) == G
        for link in links:
            link.close()


def test_bad_inputs_get_typed_errors_and_daemon_keeps_serving(tmp_path):
    with DaemonThread() as d:
        links, phy2log = make_ranks(d)
        bad = WorkerLink(d.rpc, d.ingest, 1)
        with pytest.raises(errors.RegistrationMismatchError, match="num_layers=4"):
            bad.register(ep_size=G, num_layers=4, num_logical=E, num_physical=P, epoch=0,
                         phy2log=torch.zeros(4, P, dtype=torch.int64).copy_(torch.arange(P) % E))
        with EplbClient(d.rpc, timeout=3) as c:
            with pytest.raises(errors.NotReadyError, match="window is empty"):
                c.rebalance()
            with pytest.raises(errors.NotFoundError):
                c.get_plan(epoch=7)
            with pytest.raises(errors.ConfigError, match="window_size"):
                c.set_config("window_size", 0)
            with pytest.raises(errors.ConfigError, match="rpc"):
                c.set_config("rpc", "tcp://0.0.0.0:1")
            assert c.set_config("step_interval", "77").config["step_interval"] == 77
            (tmp_path / "p.json").write_text('{"phy2log": [[0, 1]]}')
            with pytest.raises(errors.InvalidArgumentError, match=r"shape \[1, 2\]"):
                c.load_placement(str(tmp_path / "p.json"))
            with pytest.raises(errors.PolicyError, match="nosuch"):
                links[0].send_report(0, torch.ones(1, L, P, dtype=torch.int64), 0)
                wait_for(lambda: d.state.window.fill == 1)
                c.rebalance(dry_run=True, policy="nosuch")
        # Bad reports: unknown rank, unknown epoch, wrong shape, negative counts, far future, garbage.
        before = d.state.window.logical_load()
        stranger = WorkerLink(d.rpc, d.ingest, 2)
        assert stranger.wait_ingest(3)
        stranger.send_report(5, torch.ones(1, L, P, dtype=torch.int64), 0)
        links[1].send_report(5, torch.ones(1, L, P, dtype=torch.int64), 9)
        links[1].send_report(5, torch.ones(1, L, P + 1, dtype=torch.int64), 0)
        links[1].send_report(5, -torch.ones(1, L, P, dtype=torch.int64), 0)
        links[1].send_report(10**9, torch.ones(1, L, P, dtype=torch.int64), 0)
        raw = zmq.Context.instance().socket(zmq.PUSH)
        raw.connect(d.ingest)
        raw.send_multipart([b"\x93garbage", b"x"])
        assert wait_for(lambda: d.state.counters.reports_dropped >= 6)
        reasons = d.state.counters.drop_reasons
        for key in ("unknown_rank", "unknown_epoch", "bad_shape", "negative", "step_out_of_range", "malformed"):
            assert reasons.get(key) == 1, reasons
        np.testing.assert_array_equal(d.state.window.logical_load(), before)
        # A garbage request on the RPC socket gets a typed error reply.
        dealer = zmq.Context.instance().socket(zmq.DEALER)
        dealer.connect(d.rpc)
        dealer.send_multipart([b"not msgpack at all"])
        assert dealer.poll(3000)
        from eplbd.proto import Decoder, ErrorReply
        reply = Decoder().decode(dealer.recv_multipart())
        assert isinstance(reply, ErrorReply) and reply.code == errors.DecodeError.code
        with EplbClient(d.rpc) as c:
            assert c.status().ep_size == G  # still serving
        for s in (raw, dealer):
            s.close(linger=0)
        for link in (*links, bad, stranger):
            link.close()


def test_seq_gaps_are_counted():
    with DaemonThread() as d:
        links, _ = make_ranks(d)
        load = torch.ones(1, L, P, dtype=torch.int64)
        links[0].send_report(0, load, 0)
        next(links[0]._seq)  # a report lost on the way
        next(links[0]._seq)
        links[0].send_report(1, load, 0)
        assert wait_for(lambda: d.state.counters.drop_reasons.get("seq_gap") == 2)
        for link in links:
            link.close()


async def test_async_client_same_operations():
    from eplbd.client.rpc import AsyncEplbClient

    with DaemonThread() as d:
        links, _ = make_ranks(d)
        async with AsyncEplbClient(d.rpc, timeout=5) as c:
            st = await c.status()
            assert st.ep_size == G and len(st.workers) == G
            assert (await c.pause()).message == "schedule paused"
            assert (await c.status()).paused
            assert (await c.get_config()).config["window_size"] == 1000
            with pytest.raises(errors.NotReadyError):
                await c.rebalance()
        for link in links:
            link.close()


def test_unreachable_daemon_times_out_with_typed_error():
    with EplbClient("tcp://127.0.0.1:9", timeout=0.3) as c:
        with pytest.raises(errors.UnavailableError, match="127.0.0.1:9"):
            c.status()
