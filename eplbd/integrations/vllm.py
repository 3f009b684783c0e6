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
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
import sys
from typing import Any, Callable, Sequence

import torch

from eplbd.errors import InvalidArgumentError

log = logging.getLogger("eplbd.vllm")

# vLLM releases whose worker, runners and EplbState this adapter was written against (and tested on:
# 0.32 on CPU in CI, the V2 hook against 0.32's classes). Outside it eplbd_start refuses unless
# EPLBD_ALLOW_UNTESTED_VLLM=1, which turns the refusal into a warning.
SUPPORTED_VLLM = ((0, 32), (0, 33))
ALLOW_UNTESTED_ENV = "EPLBD_ALLOW_UNTESTED_VLLM"
# Non-dummy steps in a row with no token counted before the adapter says the load view is dead.
ZERO_LOAD_WARN_STEPS = 64
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
    """Refuse a vLLM configuration the adapter cannot serve (see the module docstring).

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


_ENGINE_TENSORS = ("physical_to_logical_map", "logical_to_physical_map", "logical_replica_count", "expert_load_pass")


def engine_state(eplb_state: Any, model: Any) -> Any:
    """vLLM's per-model EPLB tensors for ``model``: the ``EplbModelState`` in ``EplbState.model_states``
    (recent vLLM; matched by ``.model`` when there are several, e.g. with an MoE drafter) or the
    ``EplbState`` itself (older vLLM). None without an ``EplbState``."""
    holders = _holders(eplb_state)
    mine = [h for h in holders if getattr(h, "model", None) is model]
    return (mine or holders[:1] or [None])[0]


def _holders(eplb_state: Any) -> list[Any]:
    """The objects holding vLLM's per-model EPLB tensors (all of ``_ENGINE_TENSORS``)."""
    if eplb_state is None:
        return []
    states = getattr(eplb_state, "model_states", None)
    holders = list(states.values()) if isinstance(states, dict) else [eplb_state]
    return [h for h in holders if all(isinstance(getattr(h, n, None), torch.Tensor) for n in _ENGINE_TENSORS)]


def current_placement(model: Any, engine: Any, ep_size: int) -> torch.Tensor:
    """``[layers, num_physical]`` placement the weights are in now: vLLM's map, else its initial layout."""
    from eplbd.policy import initial_placement

    L, P = model.num_moe_layers, model.num_physical_experts
    if engine is not None and tuple(engine.physical_to_logical_map.shape) == (L, P):
        return engine.physical_to_logical_map.detach().to("cpu", torch.int64).clone()
    return initial_placement(L, model.num_logical_experts, P, ep_size, "linear")


def keep_engine_tensors(eplb_state: Any, model: Any, engine: Any) -> None:
    """Give the model back vLLM's own EPLB tensors after the agent handed it its own.

    CUDA graphs captured at start-up read the placement and write the load at the addresses of
    vLLM's tensors, so those must stay the ones every path uses; the agent's are mirrored into
    them (``Binding``). vLLM gates recording on a should-record flag shared by all layers that only
    ``EplbState.step`` updates (and that step never runs again): it is shared with the layers again
    (``_propagate_shared_tensors`` since 0.32, ``_init_should_record_tensor`` before) and set for good.
    """
    model.set_eplb_state(engine.expert_load_pass, engine.logical_to_physical_map, engine.logical_replica_count)
    propagate = getattr(eplb_state, "_propagate_shared_tensors", None)
    tokens = getattr(engine, "num_unpadded_tokens_tensors", None)
    if callable(propagate) and tokens is not None:
        propagate(model, tokens)
    elif callable(getattr(eplb_state, "_init_should_record_tensor", None)):
        eplb_state._init_should_record_tensor(model)
    flag = getattr(eplb_state, "should_record_tensor", None)
    if isinstance(flag, torch.Tensor):
        flag.fill_(True)


def step_hook_target(runner: Any) -> str:
    """Which call of ``runner`` runs vLLM's EPLB step after every forward step, dummy steps included.

    Returns:
        ``"eplb.step"`` (Model Runner V2's ``EPLBController``) or ``"eplb_step"`` (V1).

    Raises:
        InvalidArgumentError: the runner has neither (a vLLM the adapter does not know how to drive).
    """
    controller = getattr(runner, "eplb", None)
    if controller is not None and callable(getattr(controller, "step", None)) and hasattr(controller, "state"):
        return "eplb.step"
    if callable(getattr(runner, "eplb_step", None)):
        return "eplb_step"
    raise InvalidArgumentError(
        f"{type(runner).__name__} has neither eplb_step (Model Runner V1) nor eplb.step (Model Runner V2): eplbd "
        "cannot see its steps or keep vLLM's balancer off. Use a supported vLLM "
        f"({', '.join(f'{a}.{b}.x' for a, b in SUPPORTED_VLLM)}); VLLM_USE_V2_MODEL_RUNNER selects the runner")


def install_step_hook(runner: Any, hook: Callable[..., None]) -> str:
    """Make ``hook(is_dummy=False, is_profile=False)`` run instead of vLLM's EPLB step (``step_hook_target``);
    instance attributes, so the classes are untouched. Returns: the target replaced."""
    target = step_hook_target(runner)
    if target == "eplb.step":
        runner.eplb.step = hook
    else:
        runner.eplb_step = hook
    return target


def slot_digests(weights: Sequence[Sequence[torch.Tensor]]) -> torch.Tensor:
    """Fingerprints of this rank's expert slots: ``[layers, num_local, 16]`` uint8, a BLAKE2b digest of the
    bytes of every tensor of the slot (``weights[layer][t]`` is ``[num_local, ...]``, any dtype or device)."""
    out = torch.empty((len(weights), weights[0][0].shape[0], 16), dtype=torch.uint8)
    for layer, tensors in enumerate(weights):
        for j in range(out.shape[1]):
            h = hashlib.blake2b(digest_size=16)
            for t in tensors:
                h.update(t[j].detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy().tobytes())
            out[layer, j] = torch.frombuffer(bytearray(h.digest()), dtype=torch.uint8)
    return out


def logical_digests(slots: torch.Tensor, phy2log: torch.Tensor, num_logical: int) -> tuple[torch.Tensor, list[str]]:
    """Each logical expert's fingerprint from every slot's (``slots`` ``[layers, num_physical, 16]``, gathered
    from all ranks) under the placement ``phy2log`` ``[layers, num_physical]``.

    Returns:
        ``[layers, num_logical, 16]`` and the replicas that disagree with their expert's first replica.
    """
    L, P = phy2log.shape
    table = torch.zeros((L, num_logical, 16), dtype=torch.uint8)
    seen = torch.zeros((L, num_logical), dtype=torch.bool)
    disagree = []
    for layer in range(L):
        for slot in range(P):
            e = int(phy2log[layer, slot])
            if not seen[layer, e]:
                table[layer, e], seen[layer, e] = slots[layer, slot], True
            elif not torch.equal(table[layer, e], slots[layer, slot]):
                disagree.append(f"layer {layer} slot {slot}: replica of expert {e} differs from its first replica")
    return table, disagree


@dataclasses.dataclass
class Binding:
    """What ``eplbd_start`` built in one worker; ``step`` is the hook. ``agent`` is None once stopped.

    Attributes:
        engine: vLLM's EPLB tensors for this model (``engine_state``), which the model's layers use;
            None when the runner has no ``EplbState`` (then the layers use the agent's tensors).
        loads: every load tensor vLLM's layers add to (drafter models included): zeroed each step.
        silent_steps: non-dummy steps in a row in which the layers counted no token (vLLM ran a
            forward with tokens, so the load view is not being written: a warning past
            ``ZERO_LOAD_WARN_STEPS``; the daemon flags the same from the reports).
        digests: ``[layers, num_logical, 16]`` uint8 fingerprints of every logical expert's tensors,
            gathered from all ranks by ``eplbd_snapshot_weights`` (None before).
    """

    agent: Any
    engine: Any
    loads: list[torch.Tensor]
    hooked: str = ""
    steps: int = 0
    dummy_steps: int = 0
    silent_steps: int = 0
    digests: torch.Tensor | None = None
    gather_group: Any = None
    _applied: int = 0

    def step(self, is_dummy: bool = False, is_profile: bool = False) -> None:
        """After a forward step: take the step's load, commit in-band, mirror a new placement into vLLM's
        tensors, zero the load (vLLM's layers add to it).

        A profile run (vLLM's memory profiling) is not a step; a dummy step (an idle DP rank) is one,
        with its load zeroed, so every rank keeps counting the same steps.
        """
        if is_profile:
            return
        agent = self.agent
        if agent is not None:
            if self.engine is not None:
                agent.load_view.copy_(self.engine.expert_load_pass)
            if is_dummy:
                agent.load_view.zero_()
                self.dummy_steps += 1
            else:
                self._watch_load(bool(agent.load_view.any()))
            agent.after_step(self.steps)
            if self.engine is not None and agent.stats.layers_applied != self._applied:
                self._applied = agent.stats.layers_applied
                self.mirror()
            agent.load_view.zero_()
        for t in self.loads:
            t.zero_()
        self.steps += 1

    def _watch_load(self, counted: bool) -> None:
        if counted:
            if self.silent_steps >= ZERO_LOAD_WARN_STEPS:
                log.warning("rank %d: the MoE layers count tokens again after %d silent steps",
                            self.agent.rank, self.silent_steps)
            self.silent_steps = 0
            return
        self.silent_steps += 1
        if self.silent_steps == ZERO_LOAD_WARN_STEPS:
            log.warning("rank %d: %d forward steps in a row counted no token in any MoE layer: the load view "
                        "is not being written (is vLLM's should-record flag off, or its router not mapping "
                        "through the EPLB tensors?); eplbd has nothing to balance on", self.agent.rank,
                        self.silent_steps)

    def mirror(self) -> None:
        """Copy the agent's placement tensors into vLLM's, in place (vLLM's ``log2phy`` may be wider)."""
        a, e = self.agent, self.engine
        e.physical_to_logical_map.copy_(a.phy2log)
        e.logical_to_physical_map[..., :a.log2phy.shape[-1]].copy_(a.log2phy)
        e.logical_to_physical_map[..., a.log2phy.shape[-1]:].fill_(-1)
        e.logical_replica_count.copy_(a.logcnt)

    def stats(self) -> dict[str, Any]:
        if self.agent is None:
            return {"running": False, "steps": self.steps, "hooked": self.hooked}
        a = self.agent
        s = dataclasses.asdict(a.stats)
        s.pop("apply_s"), s.pop("stage_s")
        return {"running": True, "rank": a.rank, "ep_size": a.ep_size, "epoch": a.epoch, "steps": self.steps,
                "dummy_steps": self.dummy_steps, "silent_steps": self.silent_steps, "hooked": self.hooked,
                "communicator": a.communicator, "staging_allocated_bytes": a.staging_allocated_bytes,
                "phy2log": a.phy2log.cpu().tolist(),
                "reporter": {"recorded": a.reporter.steps_recorded, "sent": a.reporter.steps_sent,
                             "dropped": a.reporter.steps_dropped},
                "max_apply_ms": round(max(a.stats.apply_s, default=0.0) * 1e3, 3), **s}


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
