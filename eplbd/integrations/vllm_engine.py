"""The vLLM adapter's engine side: vLLM's own EPLB tensors (found, read, handed back to the model), the hook that
replaces vLLM's EPLB step, the per-worker ``Binding`` that runs each step, and the weight fingerprints.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from typing import Any, Callable, Sequence

import torch

from eplbd.errors import InvalidArgumentError
from eplbd.integrations.vllm_checks import SUPPORTED_VLLM

log = logging.getLogger("eplbd.vllm")

# Non-dummy steps in a row with no token counted before the adapter says the load view is dead.
ZERO_LOAD_WARN_STEPS = 64

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
