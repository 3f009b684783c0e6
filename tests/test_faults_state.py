"""Duplicated, replayed and reordered messages against ``DaemonState`` (no sockets): acks and
readiness are idempotent, nothing about an old or aborted plan changes the state, only news is
progress, a plan's failed rank is named, and plan ids stay above what the ranks have seen."""

import numpy as np
import torch

from daemon_helpers import E, G, L, P, skewed_step_load
from eplbd.chaos import MessageChaos
from eplbd.policy import initial_placement
from eplbd.proto import Abort, Ack, Commit, Heartbeat, LayerReady, LoadReport, Plan, RegisterWorker
from eplbd.settings import load_settings
from eplbd.daemon.state import DaemonState, Sender

NOW = 1000.0


def make_state(**settings) -> tuple[DaemonState, torch.Tensor]:
    s = load_settings(env={}, cli={"step_interval": 10, "window_size": 10, **settings})
    st = DaemonState(s)
    phy2log = initial_placement(L, E, P, G, "linear")
    for r in range(G):
        st.register(register_msg(r, phy2log), sender(r), NOW)
    return st, phy2log


def sender(rank: int) -> Sender:
    return Sender(f"id{rank}".encode())


def session(st: DaemonState, rank: int) -> dict:
    """What rank ``rank``'s registered session puts in its messages."""
    return {"worker_id": f"w{rank}", "session": st.workers[rank].session}


def register_msg(rank: int, phy2log: torch.Tensor, *, epoch: int = 0, last_plan_id: int = 0) -> RegisterWorker:
    return RegisterWorker(rank=rank, ep_size=G, worker_id=f"w{rank}", num_layers=L, num_logical_experts=E,
                          num_physical_experts=P, num_local_physical_experts=P // G, epoch=epoch,
                          phy2log=phy2log, last_plan_id=last_plan_id)


def start_plan(st: DaemonState, phy2log: torch.Tensor) -> Plan:
    load = skewed_step_load(np.random.default_rng(0), phy2log, 10)
    st.ingest(LoadReport(rank=0, epoch=0, first_step=0, seq=0, load=load, **session(st, 0)), NOW)
    out = st.tick(NOW)
    plans = [o.msg for o in out if isinstance(o.msg, Plan)]
    assert plans, st.last_decision_reason
    return plans[0]


def ready(st, plan, layers, ranks=range(G)):
    return [o.msg for r in ranks for o in st.layer_ready(
        LayerReady(rank=r, plan_id=plan.plan_id, epoch=plan.epoch, layers=layers, **session(st, r)), sender(r), NOW)]


def ack(st, plan, layers, ranks=range(G)):
    for r in ranks:
        st.ack(Ack(rank=r, plan_id=plan.plan_id, epoch=plan.epoch, layers=layers, step=8, **session(st, r)),
               sender(r), NOW)


def test_duplicate_layer_ready_permits_once_and_is_not_progress():
    st, phy2log = make_state()
    plan = start_plan(st, phy2log)
    first = plan.layers[0]
    assert ready(st, plan, [first], ranks=range(G - 1)) == []
    rec = st.current_plan
    before = rec.progress_mono
    assert ready(st, plan, [first], ranks=[0]) == []  # a duplicate: no news
    assert rec.progress_mono == before
    commits = ready(st, plan, [first], ranks=[G - 1])
    assert commits == [Commit(plan_id=plan.plan_id, epoch=plan.epoch, layers=[first])]
    assert rec.progress_mono > before
    assert ready(st, plan, [first]) == []  # every rank again: already permitted, no second Commit


def test_duplicate_and_reordered_acks_commit_exactly_once():
    st, phy2log = make_state()
    plan = start_plan(st, phy2log)
    ready(st, plan, plan.layers)
    ack(st, plan, plan.layers[1:])  # reordered: later layers first (accepted: they are permitted)
    assert st.epoch == 0
    ack(st, plan, plan.layers, ranks=[0, 0, 1])  # duplicated
    assert st.epoch == 0
    ack(st, plan, plan.layers[:1], ranks=[2, 3])
    assert st.epoch == plan.epoch and st.counters.plans["committed"] == 1
    committed = st.phy2log.clone()
    ack(st, plan, plan.layers)  # replayed after the commit: ignored
    assert st.epoch == plan.epoch and st.counters.plans["committed"] == 1 and torch.equal(st.phy2log, committed)


def test_ack_for_an_old_plan_and_ready_after_abort_change_nothing():
    st, phy2log = make_state()
    plan = start_plan(st, phy2log)
    st.worker_abort(Abort(plan_id=plan.plan_id, epoch=plan.epoch, reason="staging failed", rank=1,
                          **session(st, 1)), sender(1), NOW)
    assert st.current_plan.state == "aborted"
    assert ready(st, plan, plan.layers) == []  # late readiness for the aborted plan
    ack(st, plan, plan.layers)
    assert st.epoch == 0 and torch.equal(st.phy2log, phy2log)
    # A duplicated Abort is idempotent too: the plan was aborted once.
    st.worker_abort(Abort(plan_id=plan.plan_id, epoch=plan.epoch, reason="staging failed", rank=1,
                          **session(st, 1)), sender(1), NOW)
    assert st.counters.plans["aborted"] == 1
    # The next plan is not moved by messages naming the old one.
    st.last_plan_step = -1
    nxt = start_plan(st, phy2log)
    assert nxt.plan_id == plan.plan_id + 1
    ack(st, plan, plan.layers)
    assert ready(st, plan, nxt.layers) == []
    assert st.current_plan.plan_id == nxt.plan_id and st.current_plan.ready == {}


def test_transfer_failure_names_the_peer_as_the_failed_rank():
    st, phy2log = make_state()
    plan = start_plan(st, phy2log)
    st.worker_abort(Abort(plan_id=plan.plan_id, epoch=plan.epoch, reason="recv from rank 3 failed", rank=0,
                          peer=3, **session(st, 0)), sender(0), NOW)
    la = st.status(NOW).last_abort
    assert (la.plan_id, la.rank, la.reported_by, la.cause) == (plan.plan_id, 3, 0, "rank_failed")
    assert "rank 0 failed a transfer with rank 3" in la.reason and la.at > 0
    assert la.reported_by_worker == "w0"


def test_silent_rank_aborts_the_plan_in_flight_and_is_named():
    st, phy2log = make_state(heartbeat_timeout_s=5.0)
    plan = start_plan(st, phy2log)
    for r in (0, 1, 3):
        st.heartbeat(Heartbeat(rank=r, step=10, **session(st, r)), sender(r), NOW + 6)
    out = st.tick(NOW + 6)
    assert [type(o.msg) for o in out] == [Abort] and out[0].msg.plan_id == plan.plan_id
    la = st.status(NOW + 6).last_abort
    assert (la.rank, la.cause) == (2, "rank_dead") and "rank 2 sent nothing for 6.0s" in la.reason
    assert st.counters.aborts == {"rank_dead": 1}


def test_registration_keeps_plan_ids_above_what_ranks_have_seen():
    s = load_settings(env={}, cli={"step_interval": 10})
    st = DaemonState(s)  # a daemon that lost its state
    phy2log = initial_placement(L, E, P, G, "linear")
    for r in range(G):
        st.register(register_msg(r, phy2log, epoch=3, last_plan_id=7 + r), sender(r), NOW)
    assert st.epoch == 3 and st.next_plan_id == 7 + G


def test_message_chaos_duplicates_reorders_and_cuts_deterministically():
    chaos = MessageChaos(dup_p=0.3, reorder_p=0.3, max_hold_s=1.0, seed=5)
    sent = [m for i in range(200) for m in chaos.process("r", i, now=0.0)]
    sent += [m for _, m in chaos.due(now=2.0)]
    assert sorted(set(sent)) == list(range(200))  # nothing lost
    assert len(sent) == 200 + chaos.duplicated and chaos.duplicated > 0
    assert sent != sorted(sent) and chaos.reordered > 0
    cut = MessageChaos(cut={"Commit": 1})
    commits = [Commit(plan_id=1, epoch=1, layers=[i]) for i in range(3)]
    assert [m for c in commits for m in cut.process("r", c, 0.0)] == commits[:1] and cut.dropped == 2
