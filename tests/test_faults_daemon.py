"""The daemon killed (SIGKILL) while a plan is staged and again while the ranks are committing it,
restarted on the same endpoints and state dir, then restarted with its state dir deleted.

One run of the reference model (3 processes) with the daemon in its own process
(``DemoConfig.daemon_process``). To catch a plan in a given phase, the daemon incarnation drops
the ``Commit`` messages past the first n (``MessageChaos.cut``): with n = 0 the plan stays
staged, with n = 1 its first layer is applied and the rest waits. The ranks never stop stepping.
"""

import time

import pytest
import torch

from eplbd.refengine.demo import DemoConfig, run_demo
from eplbd.refengine.faults import DemoHooks
from eplbd.policy import initial_placement
from test_faults_ranks import SMALL

pytestmark = [pytest.mark.timeout(240)]

WAIT = 60


def all_registered(n):
    return lambda s: len(s.workers) == n and all(w.alive for w in s.workers)


def snapshot(h, st):
    """(daemon epoch, the ranks' epochs as registered, the daemon's placement)."""
    return st.epoch, [w.epoch for w in st.workers], h.client().get_placement().phy2log.clone()


def scenario(h):
    out = {}
    # 1. A plan staged on every rank, no permission delivered (this incarnation drops every Commit).
    st = h.wait(lambda s: s.current_plan is not None and s.current_plan.state == "committing", WAIT,
                "plan 1 staged on every rank")
    out["plan1"] = st.current_plan
    step = h.step
    h.kill_daemon()
    time.sleep(1.0)
    out["served_without_daemon"] = h.step - step  # steps run while no daemon existed
    h.start_daemon(cut={"Commit": 1})
    out["restart1"] = snapshot(h, h.wait(all_registered(3), WAIT, "ranks registered after restart 1"))

    # 2. The next plan: its first permitted layer is applied everywhere, the next permission is lost.
    st = h.wait(lambda s: s.current_plan is not None and s.current_plan.plan_id > out["plan1"].plan_id
                and "first_ack" in s.current_plan.timings, WAIT, "plan 2 partly applied")
    out["plan2"] = st.current_plan
    h.kill_daemon()
    time.sleep(0.5)
    h.start_daemon(step_interval=10**6)  # no new plan while we look
    out["restart2"] = snapshot(h, h.wait(all_registered(3), WAIT, "ranks registered after restart 2"))

    # 3. The state dir is gone: the daemon rebuilds epoch and placement from the registrations.
    h.kill_daemon()
    h.start_daemon(wipe_state=True)
    out["restart3"] = snapshot(h, h.wait(all_registered(3), WAIT, "ranks registered after restart 3"))
    epoch = out["restart3"][0]
    out["after_recovery"] = h.wait(lambda s: s.epoch > epoch, WAIT, "a plan committed after recovery")
    return out


def final(h, results):
    st = h.client().status()
    return st, h.client().get_placement().phy2log, results


def test_daemon_killed_while_staged_and_while_committing_then_restarted_with_and_without_state(tmp_path):
    cfg = DemoConfig(**{**SMALL, "steps": 20000, "check_weights": False}, until_stopped=True, step_sleep_s=0.01,
                     daemon_process=True, state_dir=str(tmp_path / "state"), daemon_cut={"Commit": 0},
                     rpc_timeout_s=1.0, heartbeat_s=0.3,
                     daemon_settings={"plan_stall_timeout_s": 120, "plan_timeout_s": 300})
    s = run_demo(cfg, hooks=DemoHooks(during=scenario, after=final))
    out = s["during"]
    base = initial_placement(cfg.layers, cfg.num_logical, cfg.num_logical + cfg.num_redundant, cfg.ranks, "linear")

    # Killed while staged: every rank dropped the plan and stayed on the old placement, kept serving,
    # and the restarted daemon recovered epoch 0 from its state dir.
    assert out["served_without_daemon"] > 0
    epoch, rank_epochs, placement = out["restart1"]
    assert epoch == 0 and rank_epochs == [0, 0, 0] and torch.equal(placement, base), out["restart1"]

    # Killed while committing: every rank ended the plan with the one layer all of them had applied
    # (never some ranks with it and some without: they registered with the same placement, or the
    # daemon would have refused them), and the daemon took that epoch and placement.
    plan2 = out["plan2"]
    assert plan2.plan_id > out["plan1"].plan_id
    epoch, rank_epochs, placement = out["restart2"]
    assert epoch == plan2.epoch and rank_epochs == [epoch] * 3, out["restart2"]
    changed = [layer for layer in range(cfg.layers) if not torch.equal(placement[layer], base[layer])]
    assert changed == [plan2.layers[0]], (changed, plan2.layers)

    # State dir deleted: the same epoch and placement, rebuilt from the registrations, and balancing
    # goes on from there (plan ids above every plan the ranks saw).
    epoch3, rank_epochs, placement3 = out["restart3"]
    assert epoch3 == epoch and rank_epochs == [epoch] * 3 and torch.equal(placement3, placement)
    assert out["after_recovery"].current_plan.plan_id > plan2.plan_id

    # The end: one placement everywhere, the daemon's, and the outputs never changed.
    st, daemon_placement, results = s["after"]
    assert s["outputs_identical"] and s["placements_agree"], s
    for r, res in results.items():
        assert res["epoch"] == st.epoch and torch.equal(torch.from_numpy(res["phy2log"]), daemon_placement), r
        assert res["stats"]["plans_orphaned"] == 2, res["stats"]  # plans 1 and 2, settled among the ranks
