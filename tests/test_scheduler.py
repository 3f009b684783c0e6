import numpy as np
import pytest
import torch

from eplbd.config import EplbConfig
from eplbd.errors import InvalidArgumentError
from eplbd.policy import initial_placement, predicted_balancedness
from eplbd.daemon.scheduler import SchedulerState, Topology, decide, propose

CFG = EplbConfig(step_interval=100, plan_timeout_s=30.0, min_gain=0.01)


@pytest.mark.parametrize("state,now,action,trigger,words", [
    (SchedulerState(step=50, window_fill=10), 0.0, "wait", None, "next scheduled re-plan at step 99"),
    (SchedulerState(step=99, window_fill=10), 0.0, "plan", "interval", "step_interval=100"),
    (SchedulerState(step=150, last_plan_step=99, window_fill=10), 0.0, "wait", None, "at step 199"),
    (SchedulerState(step=199, last_plan_step=99, window_fill=10), 0.0, "plan", "interval", "step 199"),
    (SchedulerState(step=500, window_fill=0), 0.0, "wait", None, "window is empty"),
    (SchedulerState(step=500, window_fill=10, paused=True), 0.0, "wait", None, "paused"),
    (SchedulerState(step=5, window_fill=10, paused=True, manual=True), 0.0, "plan", "manual", "operator"),
    (SchedulerState(step=5, window_fill=0, manual=True), 0.0, "wait", None, "empty"),
    (SchedulerState(step=500, window_fill=10, manual=True, plan_started_at=100.0), 110.0, "wait", None,
     "in flight"),
    (SchedulerState(step=500, window_fill=10, plan_started_at=100.0), 131.0, "abort", "timeout",
     "31.0s"),
])
def test_decide(state, now, action, trigger, words):
    d = decide(now, state, CFG)
    assert (d.action, d.trigger) == (action, trigger)
    assert words in d.reason


TOPO = Topology(num_layers=3, num_logical=8, num_physical=12, num_gpus=4)


def skewed_load():
    load = np.ones((3, 8), np.int64)
    load[:, 0] = 100  # expert 0 is hot in every layer
    load[1, 5] = 60
    return load


def test_propose_accepts_a_gain_and_reports_it():
    old = initial_placement(3, 8, 12, 4, "linear")
    prop = propose(skewed_load(), old, TOPO, CFG)
    assert prop.accept and prop.layers and "predicted gain" in prop.reason
    expect_before = predicted_balancedness(torch.as_tensor(skewed_load()), old, 4).numpy()
    np.testing.assert_allclose(prop.before, expect_before)
    assert prop.after.mean() > prop.before.mean() + 0.01
    assert prop.moved_slots.sum() > 0 and prop.policy == "default"


def test_propose_skips_below_min_gain_and_names_it():
    old = initial_placement(3, 8, 12, 4, "linear")
    first = propose(skewed_load(), old, TOPO, CFG)
    again = propose(skewed_load(), first.phy2log, TOPO, CFG)
    assert not again.accept
    assert "min_gain" in again.reason or "current placement" in again.reason
    uniform = np.full((3, 8), 10)
    flat = propose(uniform, initial_placement(3, 8, 12, 4, "linear"),
                   TOPO, EplbConfig(min_gain=0.5))
    assert not flat.accept


def test_propose_layer_subset_and_force():
    old = initial_placement(3, 8, 12, 4, "linear")
    prop = propose(skewed_load(), old, TOPO, CFG, layers=[1], force=True)
    assert prop.layers == [1]
    assert torch.equal(prop.phy2log[0], old[0]) and torch.equal(prop.phy2log[2], old[2])
    assert prop.moved_slots[0] == 0 and prop.moved_slots[2] == 0
    with pytest.raises(InvalidArgumentError, match=r"\[7\]"):
        propose(skewed_load(), old, TOPO, CFG, layers=[7])


def test_propose_skips_when_gain_per_transfer_second_is_too_low():
    old = initial_placement(3, 8, 12, 4, "linear")
    cfg = EplbConfig(min_gain=0.0, min_gain_per_transfer_s=1.0, transfer_gb_per_s=1e-6)
    # 1 MB per expert at 1 kB/s per rank: seconds of transfer per moved slot.
    prop = propose(skewed_load(), old, TOPO, cfg, expert_bytes=1_000_000)
    assert not prop.accept and prop.moved_bytes == int(prop.moved_slots.sum()) * 1_000_000
    assert "min_gain_per_transfer_s=1" in prop.reason and "GB" in prop.reason
    assert prop.transfer_s == pytest.approx(prop.moved_bytes / (4 * 1e3))
    # Unknown expert size: the cost rule cannot apply.
    assert propose(skewed_load(), old, TOPO, cfg).accept
    assert propose(skewed_load(), old, TOPO, cfg, expert_bytes=1_000_000, force=True).accept


def test_propose_replans_only_layers_below_replan_below():
    old = initial_placement(3, 8, 12, 4, "linear")
    load = skewed_load()
    before = predicted_balancedness(torch.as_tensor(load), old, 4).numpy()
    low, nxt = np.unique(before)[:2]
    cut = float((low + nxt) / 2)  # only the worst layer(s) fall below it
    prop = propose(load, old, TOPO, EplbConfig(min_gain=0.0, replan_below=cut))
    worst = np.flatnonzero(before == low).tolist()
    assert prop.layers == worst and f"{len(worst)}/3 layer(s) below replan_below={cut:g}" in prop.reason
    none = propose(load, old, TOPO, EplbConfig(replan_below=0.0))
    assert not none.accept and "nothing to re-plan" in none.reason


def test_propose_gives_incremental_its_budget_and_says_what_it_did():
    old = initial_placement(3, 8, 12, 4, "linear")
    prop = propose(skewed_load(), old, TOPO, EplbConfig(min_gain=0.0, move_budget=2), policy="incremental")
    assert int(prop.moved_slots.sum()) <= 2 and "incremental:" in prop.reason
    full = propose(skewed_load(), old, TOPO, EplbConfig(min_gain=0.0), policy="default")
    assert prop.moved_slots.sum() < full.moved_slots.sum()
