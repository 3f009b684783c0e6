"""The daemon gates plans by gain per transfer second and says why over RPC (real daemon, loopback)."""

import torch

from daemon_helpers import L, P, DaemonThread, make_ranks, wait_for
from eplbd.client.rpc import EplbClient


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
