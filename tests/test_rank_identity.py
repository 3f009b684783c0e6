"""A rank is who registered it: each attack a peer with network access (CURVE off) or with one worker key
(CURVE on) could make on the plan and registration paths, against a real daemon over real sockets, and
what it now gets. The stranger is a real ``WorkerLink`` (its own DEALER and PUSH) that never registered
the rank it names, or that knows the rank's worker id (``status`` shows it) but not its session."""

from __future__ import annotations

import time
import urllib.request

import numpy as np
import pytest
import torch

from daemon_helpers import E, G, L, P, DaemonThread, make_ranks, skewed_step_load, wait_for
from eplbd import errors
from eplbd.client.rpc import EplbClient
from eplbd.client.worker import WorkerLink
from eplbd.proto import Abort, Ack, Commit, Heartbeat, LayerReady, Plan

HB = 1.0  # heartbeat_timeout_s of these daemons


def _fill(d: DaemonThread, links, phy2log, steps: int = 10) -> None:
    links[0].send_report(0, skewed_step_load(np.random.default_rng(0), phy2log, steps), 0)
    assert wait_for(lambda: d.state.window.fill == steps)


def _plan(d: DaemonThread, links) -> Plan:
    with EplbClient(d.rpc, timeout=5) as c:
        reply = c.rebalance(force=True)
    assert reply.pushed
    plans = [link.poll_pushed(5) for link in links]
    assert all(isinstance(p, Plan) and p.plan_id == reply.plan_id for p in plans)
    return plans[0]


def _refused(d: DaemonThread) -> dict[str, int]:
    with EplbClient(d.rpc, timeout=5) as c:
        return c.status().messages_refused


def _metric(port: int, message: str, reason: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    want = f'eplbd_worker_messages_refused_total{{message="{message}",reason="{reason}"}}'
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(want))


def _close(*links) -> None:
    for link in links:
        link.close()


def test_strangers_abort_is_dropped_counted_and_a_dead_rank_dies_on_time():
    with DaemonThread(step_interval=100_000, heartbeat_timeout_s=HB, plan_timeout_s=60) as d:
        links, phy2log = make_ranks(d)
        _fill(d, links, phy2log)
        plan = _plan(d, links)
        stranger = WorkerLink(d.rpc, d.ingest, 1, timeout=5)
        victim = links[1].worker_id  # what `eplbctl status` shows
        forged = [Abort(plan_id=plan.plan_id, epoch=plan.epoch, reason="x", rank=1),  # the old attack
                  Abort(plan_id=plan.plan_id, epoch=plan.epoch, reason="x", rank=1, worker_id=victim),
                  Abort(plan_id=plan.plan_id, epoch=plan.epoch, reason="x", rank=1, worker_id=victim,
                        session="guessed")]
        for msg, err in zip(forged, (errors.NotRegisteredError, errors.PermissionDeniedError,
                                     errors.PermissionDeniedError)):
            with pytest.raises(err):
                stranger.request(msg)
        assert d.state.current_plan.in_flight and d.state.counters.aborts == {}
        # Rank 1 goes silent; the stranger keeps speaking for it (four aborts in a row used to make
        # /healthz fail). The other ranks heartbeat. Rank 1 must be dead once HB has passed.
        silent_since = time.monotonic()
        while time.monotonic() - silent_since < HB + 1.0:
            for msg in (*forged, Heartbeat(rank=1, worker_id=victim, step=5),
                        Abort(plan_id=0, epoch=0, reason="keep-alive", rank=1, worker_id=victim)):
                with pytest.raises((errors.NotRegisteredError, errors.PermissionDeniedError)):
                    stranger.request(msg)
            for r in (0, 2, 3):
                links[r].heartbeat(step=5)
            time.sleep(0.1)
        with EplbClient(d.rpc, timeout=5) as c:
            s = c.status()
        alive = {w.rank: w.alive for w in s.workers}
        assert alive == {0: True, 1: False, 2: True, 3: True}
        assert s.last_abort is not None and (s.last_abort.cause, s.last_abort.rank) == ("rank_dead", 1)
        assert not s.rebalancing_stuck and s.aborts_in_a_row == 1
        assert s.messages_refused["Abort:not_registered"] >= 2 and s.messages_refused["Abort:bad_session"] >= 4
        assert s.messages_refused["Heartbeat:bad_session"] >= 2
        assert wait_for(lambda: _metric(d.daemon.metrics_port, "Abort", "bad_session") >= 4, timeout=5)
        _close(*links, stranger)


def test_hijacked_registration_is_refused_and_an_impersonated_ack_does_not_commit():
    with DaemonThread(step_interval=100_000, heartbeat_timeout_s=HB) as d:
        links, phy2log = make_ranks(d)
        _fill(d, links, phy2log)
        attacker = [WorkerLink(d.rpc, d.ingest, r, timeout=5) for r in range(G)]
        for link in attacker:  # the group's current placement: a registration that used to succeed
            with pytest.raises(errors.PermissionDeniedError, match=rf"rank {link.rank} is held by the live session"):
                link.register(ep_size=G, num_layers=L, num_logical=E, num_physical=P, epoch=0, phy2log=phy2log)
        assert {r: w.worker_id for r, w in d.state.workers.items()} == {r: l.worker_id for r, l in enumerate(links)}
        plan = _plan(d, links)
        # Readiness and acks for every rank from the attacker's connections: with the ranks' worker ids and
        # no session, and even with a session stolen from the daemon's memory (the connection still differs).
        for r, link in enumerate(attacker):
            for session in ("", d.state.workers[r].session):
                ids = dict(worker_id=links[r].worker_id, session=session)
                with pytest.raises(errors.PermissionDeniedError):
                    link.request(LayerReady(rank=r, plan_id=plan.plan_id, epoch=plan.epoch, layers=plan.layers,
                                            **ids))
                with pytest.raises(errors.PermissionDeniedError):
                    link.request(Ack(rank=r, plan_id=plan.plan_id, epoch=plan.epoch, layers=plan.layers, step=9,
                                     **ids))
        rec = d.state.current_plan
        assert rec.in_flight and not rec.permitted and not rec.acked and d.state.epoch == 0
        refused = _refused(d)
        assert refused["RegisterWorker:rank_held"] == G and refused["Ack:bad_session"] == G
        assert refused["Ack:wrong_connection"] == G and refused["LayerReady:wrong_connection"] == G
        # The forged reports of the attacker (the ranks' worker ids, no session) are dropped, counted.
        before = d.state.window.fill
        for r, link in enumerate(attacker):
            link.worker_id = links[r].worker_id
            assert link.send_report(50, torch.full((1, L, P), 1000, dtype=torch.int64), 0)
        assert wait_for(lambda: d.state.counters.drop_reasons.get("bad_session") == G)
        assert d.state.window.fill == before
        # The real ranks are untouched: they heartbeat, stage, are permitted, apply and commit.
        for link in links:
            link.heartbeat(step=9)
            link.layer_ready(plan.plan_id, plan.epoch, plan.layers)
        for link in links:
            assert isinstance(link.poll_pushed(5), Commit)
            link.ack(plan.plan_id, plan.epoch, plan.layers, step=12)
        assert wait_for(lambda: d.state.epoch == plan.epoch)
        _close(*links, *attacker)


def test_a_rank_restarted_without_release_registers_once_its_old_session_timed_out():
    with DaemonThread(step_interval=100_000, heartbeat_timeout_s=HB) as d:
        links, phy2log = make_ranks(d)
        links[2].close()  # killed: no Release
        again = WorkerLink(d.rpc, d.ingest, 2, timeout=5)
        reg = dict(ep_size=G, num_layers=L, num_logical=E, num_physical=P, epoch=0, phy2log=phy2log)
        with pytest.raises(errors.PermissionDeniedError, match="heartbeat_timeout_s=1"):
            again.register(**reg)
        deadline = time.monotonic() + HB + 3.0
        while True:  # the others keep their sessions alive meanwhile
            for r in (0, 1, 3):
                links[r].heartbeat(step=1)
            try:
                again.register(**reg)
                break
            except errors.PermissionDeniedError:
                assert time.monotonic() < deadline, "rank 2 still held after its session timed out"
                time.sleep(0.1)
        assert d.state.workers[2].worker_id == again.worker_id
        again.heartbeat(step=2)
        # The same session may register again (a retried registration), with its secret.
        again.register(**reg)
        _close(links[0], links[1], links[3], again)
