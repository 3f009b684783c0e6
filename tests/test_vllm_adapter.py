"""The vLLM adapter (``eplbd.integrations.vllm``) against stand-ins for what cannot run here.

vLLM itself cannot run on this machine, so its pieces are replaced by stand-ins with the same
attribute names and call pattern: a worker into which the extension is mixed exactly the way
vLLM's ``WorkerWrapperBase.init_worker`` does it, a model runner whose ``execute_model`` ends with
``self.eplb_step()`` and whose dummy runs (idle data-parallel ranks) end with
``eplb_step(is_dummy=True)``, an ``EplbState`` with ``model_states[...].physical_to_logical_map``
and the shared ``should_record_tensor`` gate, and a ``MixtureOfExperts`` model over the project's
reference model whose layers, like vLLM's ``FusedMoE``, *add* each forward's token counts to the
load view. Everything else is real: ``eplbd.daemon.server.Daemon`` on loopback, gloo worker processes,
the ``PlacementAgent`` moving expert weights between them.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import re
import socket
import time
import traceback
import types

import numpy as np
import pytest
import torch

from daemon_helpers import DaemonThread, wait_for
from eplbd.client.rpc import EplbClient
from eplbd.refengine.demo import DEFAULT_TRACE
from eplbd.errors import InvalidArgumentError
from eplbd.integrations.vllm import (ZERO_LOAD_WARN_STEPS, Binding, EplbdWorkerExtension, agent_options,
                                     check_vllm_version, logical_digests, slot_digests)
from eplbd.policy import derive_log2phy, initial_placement
from eplbd.refengine.model import RefMoEConfig, RefMoEModel
from eplbd.offline.trace import load_trace

RANKS, STEPS_BEFORE = 2, 6
SHAPE = dict(num_layers=3, hidden=16, ffn=32, num_logical=32, top_k=4, num_redundant=8, seed=0)
TOKENS_PER_RANK = 16

pytestmark = pytest.mark.timeout(240)


# --- stand-ins for vLLM (it cannot run here) ------------------------------------------------------
class StandInMoE:
    """vLLM's ``MixtureOfExperts`` surface over the reference model. Like vLLM's ``FusedMoE`` layers it
    adds each forward's per-slot counts to the load view handed over by ``set_eplb_state`` (vLLM's
    ``EplbState.step`` zeroes it), and only while the shared should-record flag is set. Once
    ``captured`` (vLLM captures CUDA graphs after loading), it keeps reading and writing the tensors it
    was captured with, as a graph replay does, whatever ``set_eplb_state`` is called with later."""

    def __init__(self, inner: RefMoEModel) -> None:
        self.inner = inner
        for name in ("num_moe_layers", "num_logical_experts", "num_physical_experts", "num_local_physical_experts",
                     "num_redundant_experts", "num_expert_groups", "expert_weights"):
            setattr(self, name, getattr(inner, name))
        self.num_routed_experts, self.num_shared_experts = inner.num_logical_experts, 0
        self.should_record: torch.Tensor | None = None  # EplbLayerState.should_record_tensor
        self.captured = False

    def set_eplb_state(self, expert_load_view, logical_to_physical_map, logical_replica_count) -> None:
        if self.captured:
            return
        self.expert_load_view = expert_load_view
        self.inner.set_eplb_state(torch.zeros_like(expert_load_view, dtype=torch.int64), logical_to_physical_map,
                                  logical_replica_count)

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        out = self.inner.forward(x, expert_ids)
        if self.should_record is None or bool(self.should_record):
            self.expert_load_view.add_(self.inner.expert_load_view.to(self.expert_load_view.dtype))
        return out


class StandInEplbState:
    """vLLM's ``EplbState`` as the adapter meets it: ``add_model`` hands the model vLLM's own tensors (an
    int32 load pass) and a should-record flag that starts off (as vLLM sets it early in a period);
    ``step`` counts the steps vLLM's balancer ran."""

    def __init__(self, model: StandInMoE, phy2log: torch.Tensor) -> None:
        log2phy, logcnt = derive_log2phy(phy2log, model.num_logical_experts)
        width = model.num_redundant_experts + 1
        log2phy = torch.nn.functional.pad(log2phy, (0, width - log2phy.shape[2]), value=-1)
        self.load_pass = torch.zeros(tuple(phy2log.shape), dtype=torch.int32)
        self.model_states = {"model-hash": types.SimpleNamespace(
            model=model, physical_to_logical_map=phy2log.clone(), logical_to_physical_map=log2phy,
            logical_replica_count=logcnt, expert_load_pass=self.load_pass)}
        model.set_eplb_state(self.load_pass, log2phy, logcnt)
        self.should_record_tensor = torch.zeros((), dtype=torch.bool)
        model.should_record = self.should_record_tensor
        self.steps = 0

    def step(self, is_dummy: bool = False, is_profile: bool = False, log_stats: bool = False) -> None:
        self.steps += 1
        self.load_pass.zero_()


class StandInRunner:
    """``GPUModelRunner``'s EPLB call pattern."""

    def __init__(self, parallel_config, model: StandInMoE, eplb_state: StandInEplbState) -> None:
        self.parallel_config, self.model, self.eplb_state = parallel_config, model, eplb_state
        model.captured = True  # CUDA graphs are captured after the model and its EplbState are set up

    def get_model(self) -> StandInMoE:
        return self.model

    def execute_model(self, x: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        out = self.model.forward(x, expert_ids)
        self.eplb_step()
        return out

    def _dummy_run(self) -> None:
        cfg = self.model.inner.config
        self.model.forward(torch.zeros((0, cfg.hidden)), torch.zeros((0, cfg.num_layers, cfg.top_k), dtype=torch.long))
        self.eplb_step(is_dummy=True)

    def eplb_step(self, is_dummy: bool = False, is_profile: bool = False) -> None:
        if not self.parallel_config.enable_eplb:
            return
        self.eplb_state.step(is_dummy, is_profile, log_stats=False)


class StandInWorkerBase:
    pass


class StandInWorker(StandInWorkerBase):
    def __init__(self, vllm_config, rank: int, model_runner: StandInRunner) -> None:
        self.vllm_config, self.rank, self.local_rank, self.model_runner = vllm_config, rank, rank, model_runner


def mix_in(worker_class: type, extension: type) -> None:
    """What vLLM's ``WorkerWrapperBase.init_worker`` does with ``worker_extension_cls``."""
    if extension in worker_class.__bases__:
        return
    for attr in dir(extension):
        if not attr.startswith("__"):
            assert not hasattr(worker_class, attr), f"{attr} conflicts with the worker"
    worker_class.__bases__ = worker_class.__bases__ + (extension,)


def parallel_config(**overrides):
    eplb = types.SimpleNamespace(use_async=False, step_interval=3000, window_size=1000,
                                 num_redundant_experts=SHAPE["num_redundant"])
    cfg = dict(enable_expert_parallel=True, enable_eplb=True, eplb_config=eplb, pipeline_parallel_size=1)
    cfg.update(overrides)
    return types.SimpleNamespace(**cfg)


def make_worker(rank: int, ep_size: int, group, **config_overrides) -> StandInWorker:
    cfg = RefMoEConfig(ep_size=ep_size, **SHAPE)
    phy2log = initial_placement(cfg.num_layers, cfg.num_logical, cfg.num_physical, ep_size, "linear")
    model = StandInMoE(RefMoEModel(cfg, rank, group, phy2log))
    pc = parallel_config(**config_overrides)
    runner = StandInRunner(pc, model, StandInEplbState(model, phy2log))
    mix_in(StandInWorker, EplbdWorkerExtension)
    return StandInWorker(types.SimpleNamespace(parallel_config=pc), rank, runner)


# --- the engine side, in each worker process --------------------------------------------------------
class Engine:
    """What vLLM's engine does with its workers: every step each rank runs ``execute_model``, or a dummy
    run when it has no requests (here rank r is idle when ``(step + r) % 5 == 0``)."""

    def __init__(self, worker: StandInWorker, routing) -> None:
        self.worker, self.routing = worker, routing
        self.runner = worker.model_runner
        self.cfg = self.runner.model.inner.config

    def _batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        from eplbd.refengine.model import make_inputs

        ids = self.routing.rank_batch(step, self.worker.rank)
        return make_inputs(self.cfg, step, self.worker.rank, int(ids.shape[0])), ids

    def serve(self, first: int, n: int) -> dict:
        pairs = {}
        for step in range(first, first + n):
            if (step + self.worker.rank) % 5 == 0:
                self.runner._dummy_run()
                continue
            x, ids = self._batch(step)
            self.runner.execute_model(x, ids)
            pairs[step] = int(ids.numel() // self.cfg.num_layers)  # (token, k) pairs per layer
        return {"pairs": pairs, "vllm_steps": self.runner.eplb_state.steps,
                "view_after": int(self.runner.model.expert_load_view.abs().sum())}

    def probe(self) -> torch.Tensor:
        x, ids = self._batch(10 ** 6)  # a batch no step uses
        return self.runner.model.inner.forward(x, ids)

    def check(self) -> dict:
        from eplbd.client.agent import placement_check
        from eplbd.refengine.model import logical_expert_weights

        agent = self.worker._eplbd_binding.agent
        vllm = next(iter(self.runner.eplb_state.model_states.values()))
        inner = self.runner.model.inner  # routes through the tensors it was captured with: vLLM's
        return {"bad_slots": placement_check(self.runner.model.expert_weights, logical_expert_weights(self.cfg),
                                             agent.phy2log, self.worker.rank, self.cfg.num_local_physical),
                "vllm_map_in_step": torch.equal(vllm.physical_to_logical_map, agent.phy2log),
                "routing_in_step": inner.log2phy is vllm.logical_to_physical_map
                and torch.equal(inner.log2phy, agent.log2phy) and torch.equal(inner.logcnt, agent.logcnt)}


def _worker_main(rank: int, port: int, commands, replies) -> None:
    import torch.distributed as dist

    from eplbd.refengine.model import TraceRouting

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=RANKS)
        worker = make_worker(rank, RANKS, dist.group.WORLD)
        routing = TraceRouting.for_config(worker.model_runner.model.inner.config, DEFAULT_TRACE,
                                          tokens_per_rank=TOKENS_PER_RANK, seed=0)
        engine = Engine(worker, routing)
    except BaseException as exc:
        replies.put((rank, "error", f"setup: {type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
        return
    replies.put((rank, "ok", "ready"))
    while True:
        method, args, kwargs = commands.get()
        if method == "exit":
            break
        try:  # vLLM's worker side of collective_rpc: getattr(worker, method)(*args, **kwargs)
            target = engine if hasattr(Engine, method) else worker
            replies.put((rank, "ok", getattr(target, method)(*args, **kwargs)))
        except BaseException as exc:
            replies.put((rank, "error", f"{method}: {type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
    dist.destroy_process_group()


class Workers:
    """``RANKS`` worker processes and ``collective_rpc``: one call on every worker, one result per rank."""

    def __enter__(self) -> "Workers":
        ctx = mp.get_context("spawn")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.commands = [ctx.Queue() for _ in range(RANKS)]
        self.replies = ctx.Queue()
        self.procs = [ctx.Process(target=_worker_main, args=(r, port, self.commands[r], self.replies), daemon=True)
                      for r in range(RANKS)]
        for p in self.procs:
            p.start()
        self._collect()
        return self

    def _collect(self, timeout: float = 120.0) -> list:
        out: dict[int, object] = {}
        deadline = time.monotonic() + timeout
        while len(out) < RANKS:
            try:
                rank, kind, value = self.replies.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"workers did not answer within {timeout:g}s (exit codes {[p.exitcode for p in self.procs]})")
            if kind == "error":
                pytest.fail(f"rank {rank}: {value}")
            out[rank] = value
        return [out[r] for r in range(RANKS)]

    def collective_rpc(self, method: str, *args, **kwargs) -> list:
        for q in self.commands:
            q.put((method, args, kwargs))
        return self._collect()

    def __exit__(self, *exc) -> None:
        for q in self.commands:
            q.put(("exit", (), {}))
        for p in self.procs:
            p.join(20)
            if p.is_alive():
                p.kill()


# --- end to end -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_extension_streams_load_commits_plans_and_keeps_outputs(tmp_path):
    with DaemonThread(window_size=40, step_interval=40, commit_interval_steps=4, metrics_port=-1) as d, \
            Workers() as w, EplbClient(d.rpc, timeout=5) as client:
        before = w.collective_rpc("serve", 0, STEPS_BEFORE)
        assert [r["vllm_steps"] for r in before] == [STEPS_BEFORE] * RANKS  # vLLM's balancer ran until now
        # Options arrive as strings, as vLLM's HTTP /collective_rpc passes them.
        started = w.collective_rpc("eplbd_start", rpc=d.rpc, ingest=d.ingest, commit_interval_steps="4",
                                   communicator="torch_gloo", use_async="true")
        linear = initial_placement(SHAPE["num_layers"], SHAPE["num_logical"], 40, RANKS, "linear").tolist()
        assert [(s["running"], s["rank"], s["hooked"], s["phy2log"]) for s in started] == \
            [(True, r, "eplb_step", linear) for r in range(RANKS)]
        assert w.collective_rpc("eplbd_start", rpc=d.rpc, ingest=d.ingest)[0]["running"]  # a second call: no-op
        assert wait_for(lambda: len(client.status().workers) == RANKS, timeout=30)
        reference = w.collective_rpc("probe")

        step, pairs = STEPS_BEFORE, {}
        deadline = time.monotonic() + 150
        while client.status().epoch < 1:
            assert time.monotonic() < deadline, client.status()
            for r in w.collective_rpc("serve", step, 20):
                for s, n in r["pairs"].items():
                    pairs[s] = pairs.get(s, 0) + n
                assert r["vllm_steps"] == STEPS_BEFORE and r["view_after"] == 0
            step += 20
        assert all(torch.equal(a, b) for a, b in zip(w.collective_rpc("probe"), reference))
        for check in w.collective_rpc("check"):
            assert check == {"bad_slots": [], "vllm_map_in_step": True, "routing_in_step": True}
        stats = w.collective_rpc("eplbd_stats")
        assert all(s["plans_committed"] >= 1 and s["epoch"] >= 1 and s["dummy_steps"] > 0 for s in stats), stats
        assert stats[0]["phy2log"] == stats[1]["phy2log"] == client.get_placement().phy2log.tolist()

        # Every (token, k) pair the ranks routed reached the daemon, once, under its step; dummy steps
        # added nothing. Binding step b is engine step STEPS_BEFORE + b.
        last = step - STEPS_BEFORE - 1
        assert wait_for(lambda: client.status().step >= last, timeout=30)
        client.dump_window(str(tmp_path / "window.npz"))
        window = load_trace(tmp_path / "window.npz")
        assert window.steps.size > 0 and window.steps.max() == last
        expected = np.array([[pairs.get(int(b) + STEPS_BEFORE, 0)] * SHAPE["num_layers"] for b in window.steps])
        np.testing.assert_array_equal(window.load.sum(axis=2), expected)

        stopped = w.collective_rpc("eplbd_stop")
        assert [s["running"] for s in stopped] == [False] * RANKS
        after_stop = w.collective_rpc("serve", step, 5)  # the engine keeps serving; vLLM's balancer stays off
        assert [r["vllm_steps"] for r in after_stop] == [STEPS_BEFORE] * RANKS
        assert all(r["view_after"] == 0 for r in after_stop)


# --- refusals (one process, nothing started) --------------------------------------------------------
@pytest.mark.parametrize("overrides,match", [
    ({"enable_eplb": False}, "--enable-eplb"),
    ({"enable_expert_parallel": False}, "--enable-expert-parallel"),
    ({"pipeline_parallel_size": 2}, "pipeline_parallel_size must be 1, got 2"),
])
def test_refuses_vllm_configs_it_cannot_serve(overrides, match):
    worker = make_worker(0, 1, None, **overrides)
    with pytest.raises(InvalidArgumentError, match=match):
        worker.eplbd_start(rpc="tcp://127.0.0.1:1", ingest="tcp://127.0.0.1:2")
    assert worker.eplbd_stats() == {"running": False, "steps": 0, "hooked": "", "vllm_eplb_use_async": False}
    assert worker.model_runner.eplb_step.__func__ is StandInRunner.eplb_step  # nothing was hooked


def test_refuses_missing_endpoints_bad_options_non_moe_models_and_a_partial_world(monkeypatch):
    monkeypatch.delenv("EPLBD_RPC", raising=False)
    monkeypatch.delenv("EPLBD_INGEST", raising=False)
    worker = make_worker(0, 1, None)
    with pytest.raises(InvalidArgumentError, match="EPLBD_RPC and EPLBD_INGEST"):
        worker.eplbd_start()
    endpoints = dict(rpc="tcp://127.0.0.1:1", ingest="tcp://127.0.0.1:2")
    with pytest.raises(InvalidArgumentError, match=r"unknown option\(s\) \['window'\]"):
        worker.eplbd_start(window=3, **endpoints)
    with pytest.raises(InvalidArgumentError, match="commit_interval_steps = 'often' does not parse"):
        worker.eplbd_start(commit_interval_steps="often", **endpoints)
    # Not initialised: torch.distributed is what the EP group must be.
    with pytest.raises(InvalidArgumentError, match="EP size 1, world no torch.distributed"):
        worker.eplbd_start(**endpoints)
    worker.model_runner.model = types.SimpleNamespace(num_moe_layers=2, language_model=None)
    with pytest.raises(InvalidArgumentError, match="not a vLLM MixtureOfExperts model .*missing expert_weights"):
        worker.eplbd_start(**endpoints)


def test_options_come_from_the_environment_and_parse():
    env = {"EPLBD_COMMIT_INTERVAL_STEPS": "8", "EPLBD_USE_ASYNC": "off", "EPLBD_COMMUNICATOR": "nixl"}
    assert agent_options({"timeout": "2.5"}, env) == {"commit_interval_steps": 8, "use_async": False,
                                                      "communicator": "nixl", "timeout": 2.5}
    assert agent_options({"commit_interval_steps": 4}, env)["commit_interval_steps"] == 4  # argument wins
    with pytest.raises(InvalidArgumentError, match="use_async = 'maybe' does not parse"):
        agent_options({"use_async": "maybe"}, {})


def test_a_runner_without_an_eplb_step_is_refused_before_anything_starts(monkeypatch):
    """Wrapping execute_model instead would miss the dummy steps of idle DP ranks and leave vLLM's balancer
    running: refused by name, nothing connected, nothing hooked."""
    worker = make_worker(0, 1, None)

    class OldRunner:
        model = worker.model_runner.model

        def execute_model(self, batch):
            return batch

    worker.model_runner = OldRunner()
    with pytest.raises(InvalidArgumentError, match="OldRunner has neither eplb_step .* nor eplb.step"):
        worker.eplbd_start(rpc="tcp://127.0.0.1:1", ingest="tcp://127.0.0.1:2")
    assert worker.eplbd_stats()["running"] is False


@pytest.mark.parametrize("version,ok", [("0.32.0", True), ("0.33.1", True), ("0.32.0rc2.dev5+g1234", True),
                                        ("0.31.1", False), ("0.34.0", False), ("1.0.0", False), ("nightly", False)])
def test_vllm_version_outside_the_supported_range_is_refused_by_name(version, ok):
    if ok:
        check_vllm_version(version, env={})
        return
    with pytest.raises(InvalidArgumentError, match=rf"supports vLLM 0\.32\.x, 0\.33\.x; this is vLLM {re.escape(version)}"):
        check_vllm_version(version, env={})
    check_vllm_version(version, env={"EPLBD_ALLOW_UNTESTED_VLLM": "1"})  # the escape hatch: a warning


def test_a_load_view_that_stays_empty_while_serving_is_reported(caplog):
    """vLLM steps with tokens but no MoE layer counts any (a reset should-record flag, an unmapped router):
    the binding says so once past ZERO_LOAD_WARN_STEPS, and again when counting resumes; dummy steps
    (idle DP ranks, no tokens) do not count as silent."""
    view = torch.zeros((2, 4), dtype=torch.int64)
    agent = types.SimpleNamespace(load_view=view, rank=3, after_step=lambda step: None,
                                  stats=types.SimpleNamespace(layers_applied=0))
    binding = Binding(agent, None, [view])
    caplog.set_level("WARNING", logger="eplbd.vllm")
    for _ in range(ZERO_LOAD_WARN_STEPS - 1):
        binding.step()
    for _ in range(10):
        binding.step(is_dummy=True)
    assert binding.silent_steps == ZERO_LOAD_WARN_STEPS - 1 and not caplog.records
    binding.step()
    binding.step()
    assert [r.getMessage() for r in caplog.records] == [
        f"rank 3: {ZERO_LOAD_WARN_STEPS} forward steps in a row counted no token in any MoE layer: the load view is "
        "not being written (is vLLM's should-record flag off, or its router not mapping through the EPLB tensors?); "
        "eplbd has nothing to balance on"]
    view[1, 2] = 5
    binding.step()
    assert binding.silent_steps == 0 and "count tokens again after 65 silent steps" in caplog.records[-1].getMessage()


def test_extension_names_cannot_clash_with_vllm_worker_attributes():
    public = [a for a in dir(EplbdWorkerExtension) if not a.startswith("__")]
    assert public and all(a.startswith("eplbd_") for a in public), public


def test_weight_fingerprints_catch_a_slot_that_did_not_move_with_its_expert():
    """``eplbd_snapshot_weights`` / ``eplbd_verify_weights`` on one rank of two: the table is built from every
    rank's slots; after a move the slot must hold the expert phy2log names, every tensor byte for byte."""
    torch.manual_seed(0)
    experts = [[torch.randn(4, 3, 2), torch.randn(4, 5).to(torch.bfloat16)]]  # 1 layer, 4 logical experts
    phy2log = torch.tensor([[0, 1, 2, 3, 0, 1]])  # 2 ranks x 3 slots; slots 4, 5 replicate experts 0, 1
    rank_slots = [[t[phy2log[0, r * 3:(r + 1) * 3]].clone() for t in experts[0]] for r in range(2)]
    slots = torch.cat([slot_digests([rank_slots[r]]) for r in range(2)], dim=1)
    table, disagree = logical_digests(slots, phy2log, 4)
    assert disagree == [] and torch.equal(table[0, 0], slots[0, 4])
    rank_slots[1][1][2, 0] += 1  # a replica corrupted before eplbd ever ran
    bad = torch.cat([slot_digests([rank_slots[r]]) for r in range(2)], dim=1)
    assert logical_digests(bad, phy2log, 4)[1] == ["layer 0 slot 5: replica of expert 1 differs from its first replica"]

    worker = EplbdWorkerExtension()
    live = [[t.clone() for t in rank_slots[0]]]  # rank 0 holds experts 0, 1, 2
    agent = types.SimpleNamespace(model=types.SimpleNamespace(expert_weights=live), phy2log=phy2log.clone(), rank=0,
                                  num_local=3, epoch=1)
    worker._eplbd_binding = Binding(agent, None, [], digests=table)
    assert worker.eplbd_verify_weights()["verified"]
    # a commit put expert 3 in slot 2 but only its first tensor moved: the bf16 one still holds expert 2's
    agent.phy2log[0, 2] = 3
    live[0][0][2] = experts[0][0][3]
    assert worker.eplbd_verify_weights()["mismatches"] == ["layer 0 slot 2: not expert 3"]
    live[0][1][2] = experts[0][1][3]
    assert worker.eplbd_verify_weights() == {"rank": 0, "epoch": 1, "verified": True, "slots_checked": 3,
                                             "mismatches": []}
