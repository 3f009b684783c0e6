"""Elastic EP end to end: the reference model in 4 processes (a real gloo group, a real daemon, a
PlacementAgent per rank) shrinks to 3 ranks and grows back to 4, and its output does not change.

Rank 3 holds the only copies of some experts (layer 0: 7; layer 1: 0 and 1). The operator resizes over
RPC; rank 3's process exits; the survivors rebuild a 3-rank gloo group (a new TCPStore), fetch the
transition from the daemon, keep their slots, reload the orphans through the model's hook and start a
new agent. Then a new process joins as rank 4 of 4 and receives its experts from the others. After
every phase the global probe batch gives bitwise the output of the 4-rank model (and of the dense
``reference_forward``), and every slot holds the tensors of the expert ``phy2log`` names.
"""

from __future__ import annotations

import dataclasses
import datetime
import multiprocessing as mp
import queue
import time

import numpy as np
import pytest
import torch

from daemon_helpers import DaemonThread, wait_for
from eplbd.client.rpc import EplbClient
from eplbd.refengine.embedded import free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

# 4 ranks x 3 slots, 8 experts (the initial placement of tests/test_elastic.py)
OLD = [[0, 1, 2, 3, 4, 5, 6, 0, 1, 7, 2, 3],
       [2, 3, 4, 5, 6, 7, 2, 3, 4, 0, 1, 5]]
SHAPE = dict(num_layers=2, hidden=16, ffn=32, num_logical=8, top_k=2, seed=3)
NL, PROBE_TOKENS, STEPS, TOKENS = 3, 24, 8, 6
WAIT_S = 90.0


def config(world: int):
    from eplbd.refengine.model import RefMoEConfig
    return RefMoEConfig(num_redundant=world * NL - SHAPE["num_logical"], ep_size=world, **SHAPE)


# -------------------------------------------------------------------- one rank (a spawned process)
def _serve(rank: int, world: int, model, agent_args: dict, first_step: int) -> dict:
    """Start an agent on ``model``, run some steps, then the probe and the weight check."""
    import torch.distributed as dist

    from eplbd.client.agent import PlacementAgent, placement_check
    from eplbd.refengine.model import logical_expert_weights, make_inputs

    cfg = config(world)
    agent = PlacementAgent(model, rank=rank, ep_size=world, commit_interval_steps=4, communicator="torch_gloo",
                           heartbeat_s=0.5, timeout=10, **agent_args).start()
    deadline = time.monotonic() + WAIT_S
    while agent.stats.registrations == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    for step in range(first_step, first_step + STEPS):
        model.forward(make_inputs(cfg, step, rank, TOKENS))
        agent.after_step(step)
    probe = make_inputs(cfg, 10 ** 6, 0, PROBE_TOKENS)  # the same global batch for every group size
    mine = np.array_split(np.arange(PROBE_TOKENS), world)[rank]
    out = model.forward(probe[mine[0]:mine[-1] + 1])
    bad = placement_check(model.expert_weights, logical_expert_weights(cfg), agent.phy2log, rank, NL)
    dist.barrier()
    agent.reporter.flush()
    return {"agent": agent, "report": {"rank": rank, "out": out.numpy().copy(), "bad": bad[:5],
                                       "epoch": agent.epoch, "registered": agent.stats.registrations,
                                       "phy2log": agent.phy2log.numpy().copy()}}


def _init(rank: int, world: int, port: int):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))


def _rebuild(rank: int, world: int, rpc: str, ingest: str, old_model, old_phy2log, old_epoch: int):
    """Join the resized group: fetch the transition, rebuild the model, fill its slots."""
    import torch.distributed as dist

    from eplbd.client.elastic import fetch_resize, rebuild_experts
    from eplbd.client.worker import WorkerLink
    from eplbd.refengine.model import RefMoEModel, unfilled_expert_weights

    link = WorkerLink(rpc, ingest, rank, timeout=10)
    try:
        reply = fetch_resize(link, ep_size=world, after_epoch=old_epoch, timeout=WAIT_S)
    finally:
        link.close()
    weights = old_model.expert_weights if old_model is not None else unfilled_expert_weights(config(world))
    model = RefMoEModel(config(world), rank, dist.group.WORLD, reply.phy2log, expert_weights=weights)
    stats = rebuild_experts(model, reply, rank=rank, group=dist.new_group(backend="gloo"), old_phy2log=old_phy2log)
    return model, reply, stats


def _rank_main(rank: int, world: int, port: int, rpc: str, ingest: str, joining: bool, cmd_q, out_q) -> None:
    """A rank's life: serve, then follow the parent's ("resize", new_rank, new_world, port, step) and
    ("exit",) commands. A rank mapped to -1 leaves (its process ends)."""
    import torch.distributed as dist

    from eplbd.refengine.model import RefMoEModel

    torch.set_num_threads(1)
    agent = None
    try:
        _init(rank, world, port)
        if joining:
            model, reply, stats = _rebuild(rank, world, rpc, ingest, None, None, -1)
            args = dict(rpc=rpc, ingest=ingest, phy2log=reply.phy2log.clone(), epoch=reply.info.epoch)
            first = STEPS * 2
        else:
            phy2log = torch.tensor(OLD)
            model, stats = RefMoEModel(config(world), rank, dist.group.WORLD, phy2log), None
            args, first = dict(rpc=rpc, ingest=ingest, phy2log=phy2log), 0
        while True:
            served = _serve(rank, world, model, args, first)
            agent = served["agent"]
            out_q.put(("done", {**served["report"], "rebuild": dataclasses.asdict(stats) if stats else None}))
            cmd = cmd_q.get(timeout=WAIT_S * 2)
            old_phy2log, old_epoch = agent.phy2log.clone(), agent.epoch
            agent.close()
            agent = None
            dist.destroy_process_group()
            if cmd[0] == "exit" or cmd[1] < 0:
                return
            _, rank, world, port, first = cmd
            _init(rank, world, port)
            model, reply, stats = _rebuild(rank, world, rpc, ingest, model, old_phy2log, old_epoch)
            args = dict(rpc=rpc, ingest=ingest, phy2log=reply.phy2log.clone(), epoch=reply.info.epoch)
    except BaseException as exc:  # surfaced by the parent
        import traceback
        out_q.put(("error", f"rank {rank}: {type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
        if agent is not None:
            agent.close()


# -------------------------------------------------------------------- the parent
class Group:
    """The worker processes, by current rank."""

    def __init__(self, d: DaemonThread) -> None:
        self.ctx = mp.get_context("spawn")
        self.d = d
        self.out_q = self.ctx.Queue()
        self.procs: dict[int, tuple] = {}

    def spawn(self, rank: int, world: int, port: int, joining: bool) -> None:
        cmd_q = self.ctx.Queue()
        p = self.ctx.Process(target=_rank_main, args=(rank, world, port, self.d.rpc, self.d.ingest, joining, cmd_q,
                                                      self.out_q), daemon=True)
        p.start()
        self.procs[rank] = (p, cmd_q)

    def results(self, n: int) -> list[dict]:
        got = []
        while len(got) < n:
            try:
                kind, payload = self.out_q.get(timeout=WAIT_S)
            except queue.Empty:
                pytest.fail(f"only {len(got)}/{n} ranks reported within {WAIT_S}s")
            if kind == "error":
                pytest.fail(payload)
            got.append(payload)
        return sorted(got, key=lambda r: r["rank"])

    def resize(self, mapping: list[int], world: int, first_step: int) -> None:
        port = free_port()
        old = self.procs
        self.procs = {}
        for rank, new in enumerate(mapping):
            p, q = old[rank]
            q.put(("resize", new, world, port, first_step))
            if new >= 0:
                self.procs[new] = (p, q)
            else:
                p.join(WAIT_S)
                assert p.exitcode == 0, f"leaving rank {rank} exited with {p.exitcode}"
        self.port = port

    def close(self) -> None:
        for p, q in self.procs.values():
            if p.is_alive():
                q.put(("exit",))
        for p, _ in self.procs.values():
            p.join(30)
            if p.is_alive():
                p.kill()


def probe_output(results: list[dict]) -> torch.Tensor:
    assert all(not r["bad"] for r in results), [r["bad"] for r in results]
    return torch.from_numpy(np.concatenate([r["out"] for r in results]))


def test_shrink_to_three_ranks_and_grow_back_keeps_outputs_identical():
    from eplbd.refengine.model import make_inputs, reference_forward

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the ranks: the bitwise guarantee assumes one thread count
    try:
        dense = reference_forward(config(4), make_inputs(config(4), 10 ** 6, 0, PROBE_TOKENS))
    finally:
        torch.set_num_threads(threads)
    with DaemonThread(step_interval=100_000, heartbeat_timeout_s=30) as d, EplbClient(d.rpc, timeout=10) as c:
        group = Group(d)
        try:
            port = free_port()
            for rank in range(4):
                group.spawn(rank, 4, port, joining=False)
            four = group.results(4)
            before = probe_output(four)
            assert torch.equal(before, dense)

            shrink = c.resize([0, 1, 2, -1])  # rank 3 leaves, with the only copies of 7 (layer 0), 0 and 1 (layer 1)
            assert shrink.info.orphans == [[7], [0, 1]] and shrink.info.ep_size == 3
            group.resize([0, 1, 2, -1], 3, STEPS)
            three = group.results(3)
            assert torch.equal(probe_output(three), before)
            assert sum(r["rebuild"]["reloaded"] for r in three) == 3
            assert all(r["epoch"] == shrink.info.epoch and r["registered"] == 1 for r in three)
            assert all(np.array_equal(r["phy2log"], shrink.phy2log.numpy()) for r in three)
            assert wait_for(lambda: c.status().resize.complete, 10)
            s = c.status()
            assert s.ep_size == 3 and len(s.workers) == 3 and s.resize.orphans == [[7], [0, 1]]

            grow = c.resize([0, 1, 2], ep_size=4)
            assert grow.info.orphans == [[], []]
            group.resize([0, 1, 2], 4, 2 * STEPS)
            group.spawn(3, 4, group.port, joining=True)
            back = group.results(4)
            assert torch.equal(probe_output(back), before)
            assert back[3]["rebuild"]["received"] == NL * 2 and back[3]["rebuild"]["reloaded"] == 0
            assert all(r["epoch"] == grow.info.epoch for r in back)
            assert wait_for(lambda: c.status().resize.complete, 10)
            s = c.status()
            assert (s.epoch, s.ep_size, len(s.workers)) == (grow.info.epoch, 4, 4)
            assert s.drop_reasons.get("bad_shape", 0) == 0 and s.drop_reasons.get("unknown_epoch", 0) == 0
        finally:
            group.close()
