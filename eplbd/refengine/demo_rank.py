"""What one rank of the demo runs: ``DemoConfig`` (model shape, routing, agent, daemon and fault options)
and ``run_rank``, one EP rank of the reference model with a ``PlacementAgent``, in a demo worker
process or under torchrun (``eplbd.refengine.rank``)."""

from __future__ import annotations

import dataclasses
import pathlib
import time
from typing import Any

import numpy as np

DEFAULT_TRACE = pathlib.Path(__file__).resolve().parents[2].parent / "shared" / "data" / "gpt_oss_20b" / \
    "gptoss20b_decode_routing_tokens.npz"


@dataclasses.dataclass
class DemoConfig:
    ranks: int = 4
    steps: int = 600
    communicator: str = "auto"
    use_async: bool = True
    layers: int = 8  # the first 8 of GPT-OSS-20B's 24 MoE layers: keeps the demo to well under a minute
    num_logical: int = 32
    top_k: int = 4
    num_redundant: int = 8
    hidden: int = 64
    ffn: int = 128
    tokens_per_rank: int = 32
    routing: str = "trace"  # "trace" (GPT-OSS routing file) or "router" (the model's own router)
    trace: str = str(DEFAULT_TRACE)
    window_size: int = 100
    step_interval: int = 150
    commit_interval_steps: int = 8
    staging_budget_bytes: int | None = None
    policy: str = "default"
    chaos_delay_s: float = 0.0
    chaos_fail_batch: int = -1
    check_weights: bool = False
    seed: int = 0
    timeout_s: float = 300.0
    daemon: bool = True  # False: workers get endpoints nobody serves (the engine must not care)
    # -- fault injection (tests; see eplbd.refengine.faults) --
    chaos_rank: int = 1  # the rank chaos_fail_batch, chaos_kill_batch and chaos_report_delay_s apply to
    chaos_kill_batch: int = -1  # chaos_rank SIGKILLs itself as its n-th transfer batch starts
    chaos_dup_p: float = 0.0  # messages duplicated both ways (daemon pushes, rank replies)
    chaos_reorder_p: float = 0.0  # messages reordered both ways
    chaos_report_delay_s: float = 0.0  # chaos_rank's load sender sleeps this long per report
    report_max_pending_steps: int = 1024
    collective_timeout_s: float = 60.0  # the agent's gloo groups and transfer batches give up on a dead peer
    rpc_timeout_s: float = 5.0
    heartbeat_s: float = 1.0
    daemon_process: bool = False  # the daemon in its own process, on fixed endpoints (killable)
    state_dir: str | None = None
    daemon_settings: dict = dataclasses.field(default_factory=dict)  # more daemon settings
    daemon_cut: dict = dataclasses.field(default_factory=dict)  # the first daemon's MessageChaos.cut
    until_stopped: bool = False  # step until DemoHarness.stop_workers() (``steps`` is still the limit)
    step_sleep_s: float = 0.0


# -- one rank --------------------------------------------------------------------------------
def run_rank(rank: int, cfg: DemoConfig, rpc: str, ingest: str, *, stop_event: Any = None,
             step_value: Any = None) -> dict:
    """Run one EP rank of the reference model with a ``PlacementAgent`` for ``cfg.steps`` steps.

    The default process group must already be a gloo group of ``cfg.ranks`` ranks (the demo's
    worker processes and ``eplbd.refengine`` under torchrun both set one up, then call this).

    Args:
        rank: this process's rank in the group.
        cfg: model shape, routing, agent options and step count (the daemon-side fields are unused).
        rpc: the daemon's ROUTER endpoint.
        ingest: the daemon's PULL endpoint.
        stop_event, step_value: a ``DemoHarness``'s stop flag (``cfg.until_stopped``) and step counter.

    Returns:
        This rank's results: ``loads [steps, layers, num_physical] int32`` (load view per step),
        ``step_s [steps]``, ``phy2log [layers, num_physical]`` at the end, probe counts and
        mismatches, agent and reporter statistics; after losing a peer (``cfg.chaos_kill_batch``),
        ``survivor`` (``eplbd.refengine.faults.survivor_report``).
    """
    import torch
    import torch.distributed as dist

    from eplbd.client.agent import Chaos, PlacementAgent, placement_check
    from eplbd.refengine.faults import agreed_stop, group_lost, survivor_report
    from eplbd.policy import initial_placement
    from eplbd.refengine.model import RefMoEConfig, RefMoEModel, logical_expert_weights, make_inputs, TraceRouting

    torch.set_num_threads(1)
    agent = None
    try:
        mcfg = RefMoEConfig(num_layers=cfg.layers, hidden=cfg.hidden, ffn=cfg.ffn, num_logical=cfg.num_logical,
                            top_k=cfg.top_k, num_redundant=cfg.num_redundant, ep_size=cfg.ranks, seed=cfg.seed)
        P = cfg.num_logical + cfg.num_redundant
        phy2log = initial_placement(cfg.layers, cfg.num_logical, P, cfg.ranks, "linear")
        model = RefMoEModel(mcfg, rank, dist.group.WORLD, phy2log)
        originals = logical_expert_weights(mcfg) if cfg.check_weights else None
        mine = rank == cfg.chaos_rank
        chaos = Chaos(cfg.chaos_delay_s, seed=rank, fail_batch=cfg.chaos_fail_batch if mine else -1,
                      kill_batch=cfg.chaos_kill_batch if mine else -1, dup_p=cfg.chaos_dup_p,
                      reorder_p=cfg.chaos_reorder_p, report_delay_s=cfg.chaos_report_delay_s if mine else 0.0)
        agent = PlacementAgent(model, rank=rank, ep_size=cfg.ranks, rpc=rpc, ingest=ingest, phy2log=phy2log,
                               commit_interval_steps=cfg.commit_interval_steps, communicator=cfg.communicator,
                               use_async=cfg.use_async, staging_budget_bytes=cfg.staging_budget_bytes, chaos=chaos,
                               timeout=cfg.rpc_timeout_s, heartbeat_s=cfg.heartbeat_s,
                               collective_timeout_s=cfg.collective_timeout_s,
                               report_max_pending_steps=cfg.report_max_pending_steps)
        agent.start()
        deadline = time.monotonic() + (30 if cfg.daemon else 0)
        while agent.stats.registrations == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        routing = TraceRouting.for_config(mcfg, cfg.trace, tokens_per_rank=cfg.tokens_per_rank, seed=cfg.seed) \
            if cfg.routing == "trace" else None
        dist.barrier()

        def batch(step: int, r: int):
            if routing is None:
                return make_inputs(mcfg, step, r, cfg.tokens_per_rank), None
            ids = routing.rank_batch(step, r)
            return make_inputs(mcfg, step, r, ids.shape[0]), ids

        probe_x, probe_ids = batch(10**6, rank)  # a batch no step uses
        probe_ref = model.forward(probe_x, probe_ids)
        loads = np.zeros((cfg.steps, cfg.layers, P), np.int32)
        step_s = np.zeros(cfg.steps)
        probes = mismatches = 0
        bad_weights: list[str] = []
        first_apply = -1
        survivor = None
        steps_run = 0
        for step in range(cfg.steps):
            t0 = time.perf_counter()
            base = (agent.epoch, agent.phy2log.clone()) if cfg.chaos_kill_batch >= 0 else None
            applied_before = agent.stats.layers_applied
            try:
                x, ids = batch(step, rank)
                model.forward(x, ids)
                loads[step] = agent.load_view.numpy()
                agent.after_step(step)
            except BaseException as exc:
                if base is None or not group_lost(exc):
                    raise
                survivor = survivor_report(agent, model, mcfg, *base, step, exc, cfg.collective_timeout_s)
                break
            steps_run = step + 1
            if step_value is not None:
                step_value.value = step
            step_s[step] = time.perf_counter() - t0
            if agent.stats.layers_applied != applied_before:  # the same on every rank (agreed in-band)
                first_apply = step if first_apply < 0 else first_apply
                probes += 1
                mismatches += int(not torch.equal(model.forward(probe_x, probe_ids), probe_ref))
                if originals is not None:
                    bad_weights += placement_check(model.expert_weights, originals, agent.phy2log, rank,
                                                   model.num_local_physical_experts)
            if cfg.step_sleep_s:
                time.sleep(cfg.step_sleep_s)
            if cfg.until_stopped and (step + 1) % cfg.commit_interval_steps == 0 and agreed_stop(stop_event):
                break
        if survivor is None:
            dist.barrier()
        agent.reporter.flush()
        time.sleep(0.3)  # let the last reports and acks go out
        agent.close()
        s = agent.stats
        loads, step_s = loads[:steps_run], step_s[:steps_run]
        return {
            "survivor": survivor, "sent_steps": getattr(agent.reporter, "sent_steps", None),
            "loads": loads, "step_s": step_s, "probes": probes, "mismatches": mismatches,
            "bad_weights": bad_weights[:20], "first_apply": first_apply, "epoch": agent.epoch,
            "phy2log": agent.phy2log.numpy().copy(), "communicator": agent.communicator,
            "stats": {k: v for k, v in dataclasses.asdict(s).items()},
            "reporter": {"recorded": agent.reporter.steps_recorded, "sent": agent.reporter.steps_sent,
                         "dropped": agent.reporter.steps_dropped, "reports": agent.reporter.reports_sent},
        }
    except BaseException:
        if agent is not None:
            try:
                agent.close()
            except Exception:
                pass
        raise
