"""Configuration models.

``EplbConfig`` mirrors vLLM's ``EPLBConfig`` field names, defaults and validation
so that a user can carry their ``--eplb-config`` JSON over unchanged. The
daemon's own settings (endpoints, state dir, gating) sit beside it. Every
validation error names the field and the bad value.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from eplbd.errors import ConfigError

Communicator = Literal["auto", "torch_gloo", "torch_nccl", "pynccl", "nixl"]
# NCCL-based communicators cannot run their collectives from a background
# thread alongside the engine's own NCCL stream safely; vLLM rejects the same.
_SYNC_ONLY_COMMUNICATORS = ("torch_nccl", "pynccl")

# Bounds of durations and rates beyond ``gt=0``: ``inf`` would never fire (or, as a bandwidth, make
# every move free) and ``1e-300`` would fire at once (or price one byte at years); both are typos.
MIN_TIMEOUT_S, MAX_TIMEOUT_S = 0.01, 7 * 24 * 3600.0
MIN_GB_PER_S, MAX_GB_PER_S = 1e-9, 1e6


def finite_within(value: float, lo: float, hi: float, unit: str) -> float:
    """``value`` if finite and within ``[lo, hi]``; else ``ValueError`` (pydantic names the field)."""
    if not math.isfinite(value) or not lo <= value <= hi:
        raise ValueError(f"must be a finite number of {unit} in [{lo:g}, {hi:g}]")
    return value


class EplbConfig(BaseModel):
    """vLLM-compatible EPLB settings plus the scheduler's gating knobs."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # The window is allocated as [window_size, layers, experts] (twice): cap it so that a typo fails here,
    # not as an out-of-memory kill when the first rank registers.
    window_size: int = Field(default=1000, gt=0, le=1_000_000, description="Steps of load kept in the window.")
    step_interval: int = Field(default=3000, gt=0, description="Steps between scheduled re-plans.")
    num_redundant_experts: int = Field(default=0, ge=0, description="Extra physical slots per layer.")
    log_balancedness: bool = Field(default=False, description="Log balancedness periodically.")
    log_balancedness_interval: int = Field(default=1, gt=0, description="Steps between balancedness logs.")
    use_async: bool = Field(default=True, description="Stage transfers in the background (non-blocking).")
    policy: str = Field(default="default", description="Rebalancing policy name.")
    communicator: Communicator = Field(default="auto", description="Weight transfer backend.")
    # Gating: a plan whose predicted gain in mean balancedness is below this is skipped.
    min_gain: float = Field(default=0.01, ge=0.0, le=1.0, description="Minimum predicted balancedness gain.")
    # Movement-aware gating: a plan's cost is its moved bytes (slots x the expert bytes the ranks
    # registered) over the group's transfer bandwidth; see eplbd.daemon.scheduler.propose.
    min_gain_per_transfer_s: float = Field(
        default=0.01, ge=0.0, description="Skip a plan whose predicted gain per second of expert transfer "
                                          "is below this (0 = off).")
    transfer_gb_per_s: float = Field(
        default=25.0, gt=0.0, description="Expert-weight transfer bandwidth of one rank in GB/s, for a plan's "
                                          "transfer-time estimate.")
    replan_below: float = Field(
        default=1.0, ge=0.0, le=1.0, description="Re-plan only layers whose predicted balancedness on the "
                                                 "window is below this (1.0 = every layer).")
    move_budget: int | None = Field(
        default=None, ge=0, description="Most slots one plan may fill with an expert from another rank "
                                        "(movement-aware policies; unset = the policy's default).")
    plan_timeout_s: float = Field(default=60.0, gt=0, description="Abort a plan not fully acked in this time.")
    plan_stall_timeout_s: float = Field(
        default=30.0, gt=0, description="Watchdog: abort a plan in flight that got no new LayerReady or Ack "
                                        "for this long (a plan older than plan_timeout_s is aborted anyway).")

    @field_validator("plan_timeout_s", "plan_stall_timeout_s")
    @classmethod
    def _timeout(cls, value: float) -> float:
        return finite_within(value, MIN_TIMEOUT_S, MAX_TIMEOUT_S, "seconds")

    @field_validator("transfer_gb_per_s")
    @classmethod
    def _bandwidth(cls, value: float) -> float:
        return finite_within(value, MIN_GB_PER_S, MAX_GB_PER_S, "GB/s")

    @model_validator(mode="after")
    def _check(self) -> "EplbConfig":
        if self.use_async and self.communicator in _SYNC_ONLY_COMMUNICATORS:
            raise ValueError(
                f"use_async=True is not supported with communicator={self.communicator!r}; "
                "use torch_gloo or nixl, or set use_async=False")
        return self

    @model_validator(mode="after")
    def _check_policy(self) -> "EplbConfig":
        from eplbd.policy import available_policies  # late: policies import config-free code only

        if self.policy not in available_policies():
            raise ValueError(f"policy={self.policy!r} is not one of {available_policies()}")
        return self


def config_error(exc: ValidationError, *, source: str = "config") -> ConfigError:
    """Turn a pydantic error into a ConfigError that names every bad field and value."""
    parts = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err.get("loc", ())) or "<model>"
        value = err.get("input")
        msg = err.get("msg", "invalid")
        if isinstance(value, dict):
            parts.append(f"{field}: {msg}")
        else:
            parts.append(f"{field}={value!r}: {msg}")
    return ConfigError(f"invalid {source}: " + "; ".join(parts))


def make_eplb_config(**values: Any) -> EplbConfig:
    """Build an EplbConfig, raising ConfigError (not pydantic's error) on bad values."""
    try:
        return EplbConfig(**values)
    except ValidationError as exc:
        raise config_error(exc) from None
