"""vLLM adapter: a worker extension that hands vLLM's expert-parallel MoE model to eplbd.

vLLM mixes the class named by ``--worker-extension-cls`` into its GPU ``Worker`` (it appends it to
the worker class's bases and refuses names the worker already has, hence the ``eplbd_`` prefix),
so the methods below run inside every worker process and see ``self.model_runner``,
``self.vllm_config`` and ``self.rank``; the engine reaches them with ``collective_rpc``::

    llm = LLM(model, enable_expert_parallel=True, enable_eplb=True, data_parallel_size=...,
              worker_extension_cls="eplbd.integrations.vllm.EplbdWorkerExtension")
    llm.collective_rpc("eplbd_start", kwargs={"rpc": "tcp://eplbd:7450", "ingest": "tcp://eplbd:7451"})
    llm.collective_rpc("eplbd_stats")   # one dict per rank

``eplbd_start`` builds a ``PlacementAgent`` over the model's ``MixtureOfExperts`` surface
(``expert_weights``, ``num_*_experts``, ``set_eplb_state``): the MoE layers route through the
placement tensors (``logical_to_physical_map``, ``logical_replica_count``) and count tokens per
slot into the load view, and the agent streams that load to the daemon and applies its plans
(weights and placement tensors, in place) at step boundaries all ranks agree on.

**Why vLLM's EPLB must be enabled, and how its balancer is kept off.** In vLLM only the EPLB code
path makes the MoE layers map logical to physical experts and record load (``enable_eplb`` decides
it per layer), and ``num_redundant_experts > 0`` is rejected without it. So the adapter requires
``--enable-eplb`` and takes over the one call through which vLLM runs its balancer after every
forward step, dummy steps of idle data-parallel ranks included, on every EP rank in lockstep:

- Model Runner V1 (``GPUModelRunner``, and ``CPUModelRunner``): the runner's
  ``eplb_step(is_dummy, is_profile)``;
- Model Runner V2 (vLLM's GPU default since 0.33): ``runner.eplb.step(is_dummy, is_profile)`` on its
  ``EPLBController``, which ``execute_model`` and ``_dummy_run`` call through ``step_eplb_after``.

The replacement records the step's load, runs the agent's in-band commit and zeroes the load;
``EplbState.step`` never runs again, so vLLM never rearranges, never signals its async worker
(``use_async``, vLLM's default, is therefore harmless: the thread waits for a rearrangement that
never comes) and never resets the layers' should-record flag. A runner with neither call is
refused by name. The placement to start from is read from vLLM's ``EplbState``.

**vLLM's tensors stay the ones the layers use.** CUDA graphs captured at start-up read the
placement and add to ``expert_load_pass`` at the addresses of vLLM's own tensors. So once the
agent has set up its own, the model is handed vLLM's back (``set_eplb_state`` again), and the hook
copies vLLM's load pass into the agent's view every step and the agent's placement into vLLM's
tensors, in place, whenever a commit applied layers: the weights move in the same step boundary,
so no forward sees one without the other.

**Staging memory.** vLLM allocates one layer of expert buffer per model (``EplbModelState.expert_buffer``)
before it profiles memory and sizes the KV cache. Its balancer never runs under eplbd, so the agent
stages into that buffer: with the default budget (one layer) eplbd adds no memory vLLM did not
count. A larger ``staging_budget_bytes`` allocates the rest after the KV cache was sized: lower
``--gpu-memory-utilization`` by that much (``eplbd_stats()["staging_allocated_bytes"]`` says how much).

Requirements checked by ``eplbd_start`` (each refusal names the setting to change): a vLLM in
``SUPPORTED_VLLM``, ``enable_expert_parallel`` and ``enable_eplb`` on, one EP group spanning the
whole torch.distributed world (no pipeline parallelism), a model with the ``MixtureOfExperts``
surface, and a runner with one of the two step calls above.

This module holds the extension class; the checks and options are in ``vllm_checks``, vLLM's tensors, the
step hook, ``Binding`` and the weight fingerprints in ``vllm_engine`` (all importable from here).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import torch

from eplbd.errors import InvalidArgumentError
from eplbd.integrations.vllm_checks import (ALLOW_UNTESTED_ENV, MOE_SURFACE, SUPPORTED_VLLM, agent_options,
                                            check_parallel_config, check_vllm_version, find_moe_model)
from eplbd.integrations.vllm_engine import (ZERO_LOAD_WARN_STEPS, Binding, _holders, current_placement, engine_state,
                                            install_step_hook, keep_engine_tensors, logical_digests, slot_digests,
                                            step_hook_target)

__all__ = ["ALLOW_UNTESTED_ENV", "MOE_SURFACE", "SUPPORTED_VLLM", "ZERO_LOAD_WARN_STEPS", "Binding",
           "EplbdWorkerExtension", "agent_options", "check_parallel_config", "check_vllm_version", "current_placement",
           "engine_state", "find_moe_model", "install_step_hook", "keep_engine_tensors", "logical_digests",
           "slot_digests", "step_hook_target"]

log = logging.getLogger("eplbd.vllm")

def _started(worker: Any, method: str) -> Binding:
    binding = getattr(worker, "_eplbd_binding", None)
    if binding is None or binding.agent is None:
        raise InvalidArgumentError(f"{method}: eplbd is not running on this worker (call eplbd_start first)")
    return binding


class EplbdWorkerExtension:
    """Mixed into vLLM's GPU worker by ``--worker-extension-cls eplbd.integrations.vllm.EplbdWorkerExtension``.

    Call every method through ``collective_rpc`` so that it runs on every rank at once.
    """

    def eplbd_start(self, rpc: str | None = None, ingest: str | None = None, **options: Any) -> dict[str, Any]:
        """Connect this rank to eplbd and take over vLLM's EPLB step. Collective (it creates gloo groups).

        Args:
            rpc, ingest: the daemon's endpoints (default ``$EPLBD_RPC`` / ``$EPLBD_INGEST``).
            options: ``PlacementAgent`` settings (``commit_interval_steps``, ``communicator``,
                ``use_async``, ``staging_budget_bytes``, ...), else ``EPLBD_<NAME>``; strings are parsed.

        Returns:
            ``eplbd_stats()``. Calling it again once started changes nothing.

        Raises:
            InvalidArgumentError: a configuration the adapter cannot serve, or a bad option.
        """
        binding = getattr(self, "_eplbd_binding", None)
        if binding is not None and binding.agent is not None:
            return binding.stats()
        import torch.distributed as dist

        from eplbd.client.agent import PlacementAgent

        runner = self.model_runner
        vllm = sys.modules.get("vllm")
        if vllm is not None:
            check_vllm_version(getattr(vllm, "__version__", "unknown"))
        check_parallel_config(self.vllm_config.parallel_config)
        step_hook_target(runner)
        rpc, ingest = rpc or os.environ.get("EPLBD_RPC"), ingest or os.environ.get("EPLBD_INGEST")
        if not rpc or not ingest:
            raise InvalidArgumentError("eplbd_start needs the daemon's endpoints: pass rpc= and ingest= or set "
                                       "EPLBD_RPC and EPLBD_INGEST in the vLLM workers' environment")
        kwargs = agent_options(options)
        model = find_moe_model(runner.get_model())
        ep_size = model.num_physical_experts // model.num_local_physical_experts
        if not dist.is_initialized() or dist.get_world_size() != ep_size:
            world = dist.get_world_size() if dist.is_initialized() else "no torch.distributed"
            raise InvalidArgumentError(f"eplbd needs the EP group to be the whole torch.distributed world: EP size "
                                       f"{ep_size}, world {world}")
        eplb_state = getattr(runner, "eplb_state", None)
        engine = engine_state(eplb_state, model)
        # vLLM's own expert buffer (counted before the KV cache was sized) stages eplbd's transfers;
        # by default nothing more is allocated (see "Staging memory" above).
        buffers = [engine.expert_buffer] if isinstance(getattr(engine, "expert_buffer", None), list) else []
        if buffers:
            kwargs.setdefault("staging_budget_bytes", sum(t.nbytes for t in model.expert_weights[0]))
        agent = PlacementAgent(model, rank=dist.get_rank(), ep_size=ep_size, rpc=rpc, ingest=ingest,
                               phy2log=current_placement(model, engine, ep_size), staging_buffers=buffers, **kwargs)
        loads = [h.expert_load_pass for h in _holders(eplb_state)] or [agent.load_view]
        binding = self._eplbd_binding = Binding(agent, engine, loads)
        if engine is not None:
            keep_engine_tensors(eplb_state, model, engine)
            binding.mirror()
        binding.hooked = install_step_hook(runner, self.eplbd_after_step)
        agent.start()
        log.info("rank %d: eplbd agent started (EP size %d, hooked %s, communicator %s)", agent.rank, ep_size,
                 self._eplbd_binding.hooked, agent.communicator)
        return self._eplbd_binding.stats()

    def eplbd_after_step(self, is_dummy: bool = False, is_profile: bool = False) -> None:
        """The per-step hook (installed by ``eplbd_start``; vLLM calls it, not the operator)."""
        binding = getattr(self, "_eplbd_binding", None)
        if binding is not None:
            binding.step(is_dummy=is_dummy, is_profile=is_profile)

    def eplbd_stats(self) -> dict[str, Any]:
        """This rank's counters: epoch, steps, plans, layers applied, load steps recorded/sent/dropped."""
        binding = getattr(self, "_eplbd_binding", None)
        stats = {"running": False, "steps": 0, "hooked": ""} if binding is None else binding.stats()
        eplb = getattr(getattr(self, "vllm_config", None), "parallel_config", None)
        stats["vllm_eplb_use_async"] = bool(getattr(getattr(eplb, "eplb_config", None), "use_async", False))
        return stats

    def eplbd_snapshot_weights(self) -> dict[str, Any]:
        """Fingerprint every logical expert's weights as they are now, for ``eplbd_verify_weights``.
        Collective (gathers every rank's slots over gloo); run it once after ``eplbd_start``.

        Returns:
            ``{"rank", "experts", "disagreeing_replicas"}``: replicas of one expert that already differ
            (should be empty: each would be a corrupted copy from before eplbd).
        """
        import torch.distributed as dist

        binding = _started(self, "eplbd_snapshot_weights")
        agent = binding.agent
        local = slot_digests(agent.model.expert_weights)
        if binding.gather_group is None:
            binding.gather_group = dist.new_group(backend="gloo")
        parts = [torch.empty_like(local) for _ in range(agent.ep_size)]
        dist.all_gather(parts, local, group=binding.gather_group)
        binding.digests, disagree = logical_digests(torch.cat(parts, dim=1), agent.phy2log.cpu(),
                                                    agent.model.num_logical_experts)
        return {"rank": agent.rank, "experts": int(binding.digests.shape[0] * binding.digests.shape[1]),
                "disagreeing_replicas": disagree}

    def eplbd_verify_weights(self, max_reported: int = 20) -> dict[str, Any]:
        """Check that every local slot holds the weights of the logical expert ``phy2log`` names, as
        fingerprinted by ``eplbd_snapshot_weights`` (every tensor of the expert, byte for byte).

        Returns:
            ``{"rank", "epoch", "verified", "slots_checked", "mismatches"}`` (up to ``max_reported``).
        """
        binding = _started(self, "eplbd_verify_weights")
        if binding.digests is None:
            raise InvalidArgumentError("eplbd_verify_weights: call eplbd_snapshot_weights first (it fingerprints "
                                       "the experts to check against)")
        agent = binding.agent
        now, n = slot_digests(agent.model.expert_weights), agent.num_local
        phy2log = agent.phy2log.cpu()
        bad = [f"layer {layer} slot {agent.rank * n + j}: not expert {int(phy2log[layer, agent.rank * n + j])}"
               for layer in range(now.shape[0]) for j in range(n)
               if not torch.equal(now[layer, j], binding.digests[layer, phy2log[layer, agent.rank * n + j]])]
        return {"rank": agent.rank, "epoch": agent.epoch, "verified": not bad, "slots_checked": now.shape[0] * n,
                "mismatches": bad[:max_reported]}

    def eplbd_stop(self) -> dict[str, Any]:
        """Disconnect from eplbd; the last placement keeps serving and vLLM's balancer stays off (its maps
        are no longer the ones the layers use, so handing the step back could move the wrong weights)."""
        binding = getattr(self, "_eplbd_binding", None)
        if binding is None or binding.agent is None:
            return self.eplbd_stats()
        agent, binding.agent = binding.agent, None
        agent.close()
        return binding.stats()
