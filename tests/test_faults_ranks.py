"""Faults on the ranks' side, end to end: the reference model in several processes, a real daemon.

- a rank SIGKILLed in the middle of a transfer;
- messages duplicated and reordered both ways;
- a rank whose load sender is throttled.

Each is ``eplbd.refengine.demo.run_demo`` with fault options (``eplbd.refengine.faults``).
"""

import numpy as np
import pytest
import torch

from eplbd.refengine.demo import DemoConfig, run_demo
from eplbd.refengine.faults import DemoHooks
from eplbd.policy import observed_balancedness

SMALL = dict(ranks=3, layers=3, num_logical=32, top_k=4, num_redundant=4, hidden=16, ffn=32, tokens_per_rank=8,
             steps=200, window_size=16, step_interval=24, commit_interval_steps=4, staging_budget_bytes=1,
             communicator="torch_gloo", check_weights=True, timeout_s=120)

pytestmark = [pytest.mark.timeout(180)]


def status_and_survivors(h, results):
    return h.client().status(), {r: res["survivor"] for r, res in results.items()}


def test_rank_killed_mid_transfer_aborts_the_plan_and_survivors_stay_on_the_old_placement():
    # Rank 2 SIGKILLs itself as its first transfer batch starts: its peer is left mid-transfer.
    cfg = DemoConfig(**SMALL, chaos_rank=2, chaos_kill_batch=1, collective_timeout_s=20, rpc_timeout_s=2,
                     heartbeat_s=0.5, daemon_settings={"heartbeat_timeout_s": 3.0, "plan_timeout_s": 300})
    s = run_demo(cfg, hooks=DemoHooks(after=status_and_survivors))
    assert s["exit_codes"][2] == -9 and s["exit_codes"][:2] == [0, 0], s["exit_codes"]
    st, survivors = s["after"]
    assert sorted(survivors) == [0, 1]
    # The daemon names the dead rank and why: a transfer error reported by a survivor (its peer in
    # the batch), or rank 2's heartbeats stopping, whichever came first.
    la = st.last_abort
    assert la is not None and la.rank == 2 and la.cause in ("rank_failed", "rank_dead"), la
    assert st.current_plan.plan_id == la.plan_id and st.current_plan.state == "aborted"
    assert st.epoch == 0 and la.kept_layers == []
    for rank in (0, 1):  # the survivors: their forward failed (the group lost a rank), nothing hung
        sv = survivors[rank]
        assert sv["placement_unchanged"] and sv["epoch"] == 0, sv
        assert sv["local_probe_ok"], sv  # their own experts still compute the right outputs
        assert sv["plan_in_flight"] is None, sv  # the plan was dropped on their side too
    assert s["outputs_identical"] and s["weights_ok"] and s["placements_agree"] and s["plans_committed"] == 0


def plans_and_stats(h, results):
    c = h.client()
    st = c.status()
    plans = [c.get_plan(plan_id=i) for i in range(1, st.current_plan.plan_id + 1)]
    return st, [(p.plan_id, p.state, list(p.layers)) for p in plans], {r: res["stats"] for r, res in results.items()}


def test_duplicated_and_reordered_messages_never_apply_twice_or_stale():
    cfg = DemoConfig(**{**SMALL, "steps": 160}, chaos_dup_p=0.3, chaos_reorder_p=0.3, chaos_delay_s=0.005)
    s = run_demo(cfg, hooks=DemoHooks(after=plans_and_stats))
    st, plans, agent_stats = s["after"]
    assert s["outputs_identical"] and s["weights_ok"] and s["placements_agree"], s
    done = [pid for pid, state, _ in plans if state == "committed"]
    assert len(done) >= 2 and st.epoch == len(done), plans
    for rank, stats in agent_stats.items():
        # No layer of any plan applied twice, and only layers of plans the daemon permitted.
        pairs = [tuple(x) for x in stats["applied"]]
        assert len(pairs) == len(set(pairs)), (rank, pairs)
        for pid, state, layers in plans:
            got = sorted(layer for p, layer in pairs if p == pid)
            if state == "committed":
                assert got == sorted(layers), (rank, pid, got, layers)
            elif state == "aborted":
                assert got == [], (rank, pid, got)  # an aborted plan had no permitted layer
            else:  # the run ended while it was being applied
                assert set(got) <= set(layers), (rank, pid, got, layers)
        assert {p for p, _ in pairs} <= {pid for pid, _, _ in plans}
        # Plans finished in order, each once: the committed ones (and maybe the one in flight).
        assert stats["applied_plans"][:len(done)] == done and len(stats["applied_plans"]) - len(done) <= 1
    # Duplicated plans did arrive and were recognised by their id.
    assert sum(stats["plans_stale"] for stats in agent_stats.values()) > 0


def test_throttled_rank_drops_and_counts_its_reports_and_balancedness_stays_exact():
    # No plans (the interval is never reached): the window holds every step in one epoch.
    steps = 160
    cfg = DemoConfig(**{**SMALL, "steps": steps, "window_size": steps, "step_interval": 10**6,
                        "check_weights": False},
                     chaos_rank=1, chaos_report_delay_s=0.5, report_max_pending_steps=8)

    def after(h, results):
        c = h.client()
        sent = sum(r["reporter"]["reports"] for r in results.values())
        h.wait(lambda st: st.reports_received >= sent, 20, f"{sent} reports received")
        return c.status(), c.balancedness(per_layer=True), results

    s = run_demo(cfg, hooks=DemoHooks(after=after))
    st, bal, results = s["after"]
    slow = results[1]
    rep = slow["reporter"]
    assert rep["dropped"] > 0 and rep["sent"] + rep["dropped"] == rep["recorded"] == steps, rep
    # Beyond the bound the slow rank dropped steps, told the daemon, and the daemon counted them.
    assert 0 < st.drop_reasons.get("sender_overflow_steps", 0) <= rep["dropped"], st.drop_reasons
    for r in (0, 2):  # the others lost nothing
        assert results[r]["reporter"]["sent"] == steps, results[r]["reporter"]
    # The window is every step of ranks 0 and 2 plus the slow rank's steps that got through.
    expect = results[0]["loads"].astype(np.int64) + results[2]["loads"]
    got_steps = [s0 + i for s0, n in slow["sent_steps"] for i in range(n)]
    assert len(got_steps) == rep["sent"]
    expect[got_steps] += slow["loads"][got_steps]
    want = observed_balancedness(torch.from_numpy(expect.sum(0)), cfg.ranks).numpy()
    assert bal.window_fill == steps
    np.testing.assert_allclose(bal.per_layer_observed, want, rtol=1e-12)
    # Counting the slow rank's dropped steps as well would give another answer: the check has teeth.
    lost = sorted(set(range(steps)) - set(got_steps))
    expect[lost] += slow["loads"][lost]
    wrong = observed_balancedness(torch.from_numpy(expect.sum(0)), cfg.ranks).numpy()
    assert not np.allclose(bal.per_layer_observed, wrong, rtol=1e-9)
