"""Rebalancing policies (filled in by the policy work)."""
