"""The worker side end to end: N processes of the reference model, a real daemon, real transfers.

Each run is ``eplbd.refengine.demo.run_demo`` with a small model: the workers check after every commit
that a fixed probe batch gives bitwise the same output as before any rearrangement, and
(``check_weights``) that every slot holds the original tensors of the expert phy2log names.
"""

import pytest

from eplbd.refengine.demo import DemoConfig, run_demo

SMALL = dict(ranks=4, layers=4, num_logical=32, top_k=4, num_redundant=8, hidden=16, ffn=32, tokens_per_rank=16,
             steps=160, window_size=32, step_interval=40, commit_interval_steps=4, check_weights=True,
             staging_budget_bytes=1, timeout_s=150)

pytestmark = [pytest.mark.timeout(200)]


def assert_consistent(s):
    assert s["outputs_identical"], s
    assert s["weights_ok"], s["bad_weights"]
    assert s["placements_agree"], s


def test_gloo_plans_commit_and_outputs_stay_identical():
    s = run_demo(DemoConfig(communicator="torch_gloo", **SMALL))
    assert_consistent(s)
    assert s["plans_committed"] >= 2 and s["daemon_epoch"] == s["plans_committed"], s
    assert s["probes"] >= 2 and s["experts_transferred"] > 0 and s["bytes_moved"] > 0
    assert s["balancedness_after"] > s["balancedness_before"], s
    assert s["steps_reported"] + s["reports_dropped"] >= s["steps_recorded"] - 4 * 8


def test_nixl_plans_commit_and_outputs_stay_identical():
    from eplbd.client.comm.nixl import nixl_available
    reason = nixl_available()
    if reason is not None:
        pytest.skip(f"nixl cannot be used here: {reason}")
    s = run_demo(DemoConfig(communicator="nixl", **SMALL))
    assert s["communicator"] == "nixl"
    assert_consistent(s)
    assert s["plans_committed"] >= 2 and s["experts_transferred"] > 0


def test_random_delays_in_messages_and_transfers_change_nothing():
    s = run_demo(DemoConfig(communicator="torch_gloo", chaos_delay_s=0.01, **SMALL))
    assert_consistent(s)
    assert s["plans_committed"] >= 1


def test_blocking_mode_is_also_exact():
    s = run_demo(DemoConfig(communicator="torch_gloo", use_async=False, **SMALL))
    assert_consistent(s)
    assert s["plans_committed"] >= 2 and s["daemon_epoch"] == s["plans_committed"]


def test_failed_transfer_aborts_everywhere_and_old_placement_keeps_serving():
    s = run_demo(DemoConfig(communicator="torch_gloo", chaos_fail_batch=1, **SMALL))
    assert_consistent(s)
    assert s["plans_aborted"] >= 1, s  # the first plan dies on rank 1's first transfer batch
    assert s["daemon_epoch"] == s["plans_committed"]  # later plans still commit


def test_no_daemon_never_blocks_a_step():
    s = run_demo(DemoConfig(communicator="torch_gloo", daemon=False, **{**SMALL, "steps": 60}))
    assert_consistent(s)
    assert s["plans_committed"] == 0 and s["reports_dropped"] > 0
