"""The vLLM adapter's refusals and options: which vLLM versions and parallel configurations it serves, where the
``MixtureOfExperts`` model is, and ``eplbd_start``'s keywords parsed into ``PlacementAgent`` settings.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

from eplbd.errors import InvalidArgumentError

log = logging.getLogger("eplbd.vllm")

# vLLM releases whose worker, runners and EplbState this adapter was written against (and tested on:
# 0.32 on CPU in CI, the V2 hook against 0.32's classes). Outside it eplbd_start refuses unless
# EPLBD_ALLOW_UNTESTED_VLLM=1, which turns the refusal into a warning.
SUPPORTED_VLLM = ((0, 32), (0, 33))
ALLOW_UNTESTED_ENV = "EPLBD_ALLOW_UNTESTED_VLLM"
MOE_SURFACE = ("expert_weights", "num_moe_layers", "num_logical_experts", "num_physical_experts",
               "num_local_physical_experts", "num_redundant_experts", "num_expert_groups", "set_eplb_state")
# eplbd_start keyword -> how to parse it when it arrives as a string (vLLM's HTTP collective_rpc
# endpoint passes strings only).
_INT_OPTIONS = ("commit_interval_steps", "staging_budget_bytes", "node", "num_nodes", "report_batch_steps")
_BOOL_OPTIONS = ("use_async",)
_FLOAT_OPTIONS = ("heartbeat_s", "timeout")
_STR_OPTIONS = ("communicator",)


def _parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        raise ValueError(value)
    return text in ("1", "true", "yes", "on")


def agent_options(options: dict[str, Any], env: dict[str, str] | None = None) -> dict[str, Any]:
    """``PlacementAgent`` keyword arguments from ``eplbd_start``'s keywords, else ``EPLBD_<NAME>`` variables.

    Raises:
        InvalidArgumentError: an unknown option or a value that does not parse.
    """
    env = os.environ if env is None else env
    known = _INT_OPTIONS + _BOOL_OPTIONS + _FLOAT_OPTIONS + _STR_OPTIONS
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise InvalidArgumentError(f"eplbd_start: unknown option(s) {unknown}; known: {', '.join(known)}")
    out: dict[str, Any] = {}
    for name in known:
        value = options.get(name, env.get(f"EPLBD_{name.upper()}"))
        if value is None:
            continue
        try:
            out[name] = (int(value) if name in _INT_OPTIONS else float(value) if name in _FLOAT_OPTIONS
                         else _parse_bool(value) if name in _BOOL_OPTIONS else str(value))
        except ValueError:
            raise InvalidArgumentError(f"eplbd_start: {name} = {value!r} does not parse") from None
    return out


def check_parallel_config(parallel_config: Any) -> None:
    """Refuse a vLLM configuration the adapter cannot serve (see :mod:`eplbd.integrations.vllm`).

    Raises:
        InvalidArgumentError: naming the flag to change.
    """
    if not getattr(parallel_config, "enable_expert_parallel", False):
        raise InvalidArgumentError("eplbd needs expert parallelism: launch vLLM with --enable-expert-parallel")
    if not getattr(parallel_config, "enable_eplb", False):
        raise InvalidArgumentError(
            "eplbd needs vLLM's EPLB code path (--enable-eplb): without it vLLM's MoE layers neither route "
            "through the placement tensors nor count tokens per slot, and redundant experts are refused. "
            "The adapter takes over vLLM's eplb_step, so vLLM's own balancer never runs")
    if getattr(parallel_config, "pipeline_parallel_size", 1) != 1:
        raise InvalidArgumentError("eplbd needs one EP group spanning every rank: pipeline_parallel_size must be 1, "
                                   f"got {parallel_config.pipeline_parallel_size}")


def check_vllm_version(version: str, env: dict[str, str] | None = None) -> None:
    """Refuse a vLLM outside ``SUPPORTED_VLLM`` (a warning instead with ``EPLBD_ALLOW_UNTESTED_VLLM=1``).

    Raises:
        InvalidArgumentError: naming the version found and the supported range.
    """
    env = os.environ if env is None else env
    match = re.match(r"(\d+)\.(\d+)", version)
    if match and (int(match[1]), int(match[2])) in SUPPORTED_VLLM:
        return
    supported = ", ".join(f"{a}.{b}.x" for a, b in SUPPORTED_VLLM)
    message = (f"eplbd's vLLM adapter supports vLLM {supported}; this is vLLM {version}. Its worker, model "
               f"runner and EplbState may differ: set {ALLOW_UNTESTED_ENV}=1 to try it anyway")
    if env.get(ALLOW_UNTESTED_ENV, "") in ("1", "true", "yes"):
        log.warning("%s (trying, as %s is set)", message, ALLOW_UNTESTED_ENV)
        return
    raise InvalidArgumentError(message)


def find_moe_model(model: Any) -> Any:
    """The ``MixtureOfExperts`` model: ``model`` itself or, for a multimodal model, its ``language_model``.

    Raises:
        InvalidArgumentError: neither has the surface (the missing attributes are named).
    """
    for candidate in (model, getattr(model, "language_model", None)):
        if candidate is not None and all(hasattr(candidate, a) for a in MOE_SURFACE) \
                and getattr(candidate, "num_moe_layers", 0) > 0:
            return candidate
    missing = [a for a in MOE_SURFACE if not hasattr(model, a)]
    raise InvalidArgumentError(f"{type(model).__name__} is not a vLLM MixtureOfExperts model "
                               f"(missing {', '.join(missing) or 'MoE layers'})")
