"""Elastic EP on a real daemon (loopback sockets) with simulated ranks: resize over RPC and eplbctl,
the retired group refused, the new group registered, a plan in flight drained."""

import json

import numpy as np
import pytest
import torch

from daemon_helpers import E, G, L, P, DaemonThread, make_ranks, wait_for
from test_daemon import stream
from eplbd import errors
from eplbd.client.ctl import main as eplbctl
from eplbd.client.rpc import EplbClient
from eplbd.client.worker import WorkerLink
from eplbd.policy import validate_placement
from eplbd.proto import Abort, Commit, GetResizeRequest, Plan

NL = P // G
SHRINK = [0, 1, -1, 2]  # rank 2 leaves; its slots (experts 6, 7, 0 under the linear placement) go


def register_group(d, phy2log, epoch, ep_size):
    links = [WorkerLink(d.rpc, d.ingest, r, timeout=5) for r in range(ep_size)]
    for link in links:
        link.register(ep_size=ep_size, num_layers=L, num_logical=E, num_physical=ep_size * NL, epoch=epoch,
                      phy2log=phy2log, expert_bytes=1000)
    return links


def close(*groups):
    for links in groups:
        for link in links:
            link.close()


def test_resize_over_rpc_names_orphans_retires_the_old_group_and_admits_the_new():
    rng = np.random.default_rng(0)
    with DaemonThread(step_interval=10_000) as d, EplbClient(d.rpc) as c:
        links, phy2log = make_ranks(d)
        stream(links, phy2log, rng, 0, 10)
        assert wait_for(lambda: d.state.counters.reports_received == G)
        logical_before = d.state.window.logical_load()
        dry = c.resize(SHRINK, dry_run=True)
        assert dry.dry_run and c.status().epoch == 0 and c.status().resize is None
        r = c.resize(SHRINK)
        assert (r.info.epoch, r.info.old_ep_size, r.info.ep_size, r.info.base_epoch) == (1, 4, 3, 0)
        assert r.info.orphans == [[6, 7]] * L and r.info.reload_slots == 2 * L
        assert torch.equal(r.phy2log, dry.phy2log) and r.phy2log.shape == (L, 3 * NL)
        validate_placement(r.phy2log, E, 3, L)
        assert torch.equal(r.base[:, 2 * NL:], phy2log[:, 3 * NL:])  # old rank 3 is new rank 2
        s = c.status()
        assert (s.epoch, s.ep_size, s.workers, s.resize.orphans, s.resize.complete) == (1, 3, [], [[6, 7]] * L, False)
        assert np.array_equal(d.state.window.logical_load(), logical_before)  # the load history is kept
        # The old group cannot come back: its links are unknown, its registrations refused.
        with pytest.raises(errors.NotRegisteredError):
            links[0].heartbeat(10, 0)
        with pytest.raises(errors.RegistrationMismatchError, match=r"resized \(4 -> 3 ranks \(removed \[2\], "
                                                                   r"renumbered \{3: 2\}\)\) at epoch 1"):
            links[0].register(ep_size=G, num_layers=L, num_logical=E, num_physical=P, epoch=0, phy2log=phy2log)
        fetched = links[1].request(GetResizeRequest())  # a worker fetches what the operator sees
        assert fetched.info == c.get_resize().info and torch.equal(fetched.phy2log, r.phy2log)
        assert c.resize(SHRINK).info == r.info  # a repeat while the new group registers changes nothing
        new = register_group(d, r.phy2log, 1, 3)
        s = c.status()
        assert s.resize.complete and s.resize.registered == [0, 1, 2] and all(w.alive for w in s.workers)
        for link in new:  # the new shape's reports count
            assert link.send_report(10, torch.ones(5, L, 3 * NL, dtype=torch.int64), 1)
        assert wait_for(lambda: d.state.window.fill == 15 and d.state.counters.reports_received == G + 3)
        assert c.balancedness(per_rank=True).per_rank_load.shape == (L, 3)
        with pytest.raises(errors.InvalidArgumentError, match=r"mapping has 4 entries but the group has ep_size=3"):
            c.resize(SHRINK)
        close(links, new)


def group_with_a_plan(d, c, seed):
    """4 simulated ranks with 10 steps of load and a plan pushed to them: (links, phy2log, plan)."""
    links, phy2log = make_ranks(d)
    stream(links, phy2log, np.random.default_rng(seed), 0, 10)
    assert wait_for(lambda: d.state.counters.reports_received == G)
    pushed = c.rebalance(force=True)
    assert pushed.pushed
    for link in links:
        assert isinstance(link.poll_pushed(5), Plan)
    return links, phy2log, pushed


def test_plan_in_flight_is_aborted_and_the_abort_reaches_the_old_ranks():
    with DaemonThread(step_interval=10_000) as d, EplbClient(d.rpc) as c:
        links, phy2log, pushed = group_with_a_plan(d, c, 1)
        r = c.resize(SHRINK)
        assert r.info.drained_plan == pushed.plan_id and r.info.drain.startswith("aborted")
        for link in links:  # also the leaving rank: its agent drops the staged plan
            msg = link.poll_pushed(5)
            assert isinstance(msg, Abort) and msg.plan_id == pushed.plan_id and "elastic resize" in msg.reason
        s = c.status()
        assert s.current_plan.state == "aborted" and s.epoch == r.info.epoch == 1
        assert torch.equal(r.base[:, :2 * NL], phy2log[:, :2 * NL])  # planned from the placement in force
        close(links)


def test_committing_plan_waits_for_the_survivors_then_commits_with_their_layers():
    with DaemonThread(step_interval=10_000) as d, EplbClient(d.rpc) as c:
        links, _, pushed = group_with_a_plan(d, c, 2)
        layer = pushed.layers[0]
        for link in links:
            link.layer_ready(pushed.plan_id, pushed.epoch, [layer])
        for link in links:
            assert isinstance(link.poll_pushed(5), Commit)
        for link in links[:2]:  # ranks 0 and 1 applied the layer; rank 3 (staying) has not acked yet
            link.ack(pushed.plan_id, pushed.epoch, [layer], step=8)
        with pytest.raises(errors.PlanConflictError, match=r"surviving rank\(s\) \[3\] have not acked"):
            c.resize(SHRINK)
        links[3].ack(pushed.plan_id, pushed.epoch, [layer], step=8)
        r = c.resize(SHRINK)  # rank 2 (leaving) never acks: the survivors run the layer, that is what counts
        assert (r.info.base_epoch, r.info.epoch) == (1, 2) and r.info.drain.startswith("committed with layers")
        applied = pushed.phy2log[layer]
        assert torch.equal(r.base[layer, :2 * NL], applied[:2 * NL])
        assert torch.equal(r.base[layer, 2 * NL:], applied[3 * NL:])
        assert c.get_plan(plan_id=pushed.plan_id).state == "committed"
        close(links)


def test_eplbctl_resize_dry_run_and_bad_mapping(capsys):
    with DaemonThread(step_interval=10_000) as d:
        links, _ = make_ranks(d)
        assert eplbctl(["--endpoint", d.rpc, "resize", "--mapping", "0,1,-1,2", "--dry-run"]) == 0
        out = capsys.readouterr().out
        assert "dry run" in out and "layer 0: 6,7" in out and "4 -> 3 ranks" in out
        assert eplbctl(["--endpoint", d.rpc, "--json", "resize", "--mapping", "0,1,2,3", "--ep-size", "5"]) == 0
        info = json.loads(capsys.readouterr().out)["info"]
        assert (info["ep_size"], info["orphans"], info["epoch"]) == (5, [[]] * L, 1)
        assert eplbctl(["--endpoint", d.rpc, "status"]) == 0
        assert "resize at epoch 1: 4 -> 5 ranks" in capsys.readouterr().out
        assert eplbctl(["--endpoint", d.rpc, "resize", "--mapping", "0,0,1,2,3"]) == 1
        assert "mapping[0] and mapping[1] both name new rank 0" in capsys.readouterr().err
        close(links)


def test_a_rank_refuses_to_rebuild_from_slots_the_daemon_did_not_plan_from():
    from eplbd.client.elastic import check_base, fetch_resize

    with DaemonThread(step_interval=10_000) as d, EplbClient(d.rpc) as c:
        links, phy2log = make_ranks(d)
        with pytest.raises(errors.UnavailableError, match=r"no resize to 3 ranks after epoch 0 within 0.2s "
                                                          r"\(the group has not been resized\)"):
            fetch_resize(links[0], ep_size=3, after_epoch=0, timeout=0.2)
        c.resize(SHRINK)
        reply = fetch_resize(links[0], ep_size=3, after_epoch=0, timeout=5)
        check_base(reply, 2, phy2log)  # new rank 2 was rank 3 and runs what the daemon planned from
        stale = phy2log.clone()
        stale[1, 3 * NL] = 5  # say a plan the daemon thinks aborted was applied on old rank 3
        with pytest.raises(errors.PlacementError, match=r"rank 2 \(rank 3 before the resize\) holds \[5, 2, 3\] in "
                                                        r"layer 1, but the daemon planned the resize from \[1, 2, 3\]"):
            check_base(reply, 2, stale)
        with pytest.raises(errors.InvalidArgumentError, match="pass its old phy2log"):
            check_base(reply, 0, None)
        close(links)
