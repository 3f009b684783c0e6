"""The daemon gates plans by gain per transfer second and says why over RPC (real daemon, loopback)."""

import pytest
import torch

from daemon_helpers import L, P, DaemonThread, make_ranks, wait_for
from eplbd.client.rpc import EplbClient
from eplbd.errors import ConfigError


def test_plan_below_gain_per_transfer_second_is_skipped_and_reported():
    # 1000 bytes per expert (daemon_helpers registers that) at 1 kB/s per rank: a second per slot or so.
    with DaemonThread(step_interval=10, window_size=10, min_gain=0.0, min_gain_per_transfer_s=100.0,
                      transfer_gb_per_s=1e-6) as d:
        links, phy2log = make_ranks(d)
        skewed = torch.zeros((10, L, P), dtype=torch.int64)
        skewed[:, :, 0] = 50  # expert 0 is hot
        skewed[:, :, 1:] = 1
        for link in links:
            link.send_report(0, skewed, 0)
        assert wait_for(lambda: "min_gain_per_transfer_s" in d.state.last_decision_reason, timeout=30)
        assert all(link.poll_pushed(0.2) is None for link in links)
        with EplbClient(d.rpc) as c:
            st = c.status()
            assert "min_gain_per_transfer_s=100" in st.last_decision_reason and "GB" in st.last_decision_reason
            dry = c.rebalance(dry_run=True)
            assert dry.skipped and not dry.pushed and "per transfer second" in dry.reason
            assert dry.moved_bytes == dry.moved_slots * 1000 > 0
            forced = c.rebalance(dry_run=True, force=True, policy="incremental")
            assert not forced.skipped and "incremental:" in forced.reason
        for link in links:
            link.close()


def test_movement_settings_change_at_run_time():
    """eplbctl config set (EplbClient.set_config) changes the movement gating and the budget of the next plan."""
    with DaemonThread(step_interval=10_000, window_size=10, min_gain=0.0, min_gain_per_transfer_s=100.0,
                      transfer_gb_per_s=1e-6) as d:
        links, _ = make_ranks(d)
        try:
            _check_runtime_movement_settings(d, links)
        finally:
            for link in links:
                link.close()


def _check_runtime_movement_settings(d: DaemonThread, links: list) -> None:
    """Feed a skewed window, then change each movement setting and check the next dry-run plan."""
    skewed = torch.zeros((10, L, P), dtype=torch.int64)
    skewed[:, :, 0] = 50
    skewed[:, :, 1:] = 1
    for link in links:
        link.send_report(0, skewed, 0)
    assert wait_for(lambda: d.state.window is not None and d.state.window.fill >= 10, timeout=30)
    with EplbClient(d.rpc) as c:
        assert c.rebalance(dry_run=True).skipped  # far below 100 gain per transfer second
        assert c.set_config("min_gain_per_transfer_s", "0").config["min_gain_per_transfer_s"] == 0.0
        assert not c.rebalance(dry_run=True).skipped
        assert c.set_config("move_budget", "1").config["move_budget"] == 1
        budgeted = c.rebalance(dry_run=True, policy="incremental")
        assert budgeted.moved_slots == 1 and "incremental:" in budgeted.reason
        assert c.set_config("move_budget", "").config["move_budget"] is None
        assert c.rebalance(dry_run=True, policy="incremental").moved_slots > 1
        assert c.set_config("transfer_gb_per_s", "50").config["transfer_gb_per_s"] == 50.0
        assert c.set_config("replan_below", "0.01").config["replan_below"] == 0.01
        nothing = c.rebalance(dry_run=True)
        assert nothing.skipped and "replan_below=0.01" in nothing.reason
        with pytest.raises(ConfigError, match="transfer_gb_per_s"):
            c.set_config("transfer_gb_per_s", "0")
        assert c.get_config().config["transfer_gb_per_s"] == 50.0
