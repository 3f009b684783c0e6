"""vLLM's built-in EPLB against eplbd driving the same vLLM engine: one run, same model, same prompts.

Both runs start a real vLLM ``LLM`` (``eplbd.integrations.vllm_demo``: 2 expert-parallel ranks,
a tiny Qwen3-MoE whose router favours a few experts that the initial layout puts on one rank,
``--redundant`` redundant experts) and generate greedily for the same rounds with the same
``window_size`` and ``step_interval``:

- ``vllm``: vLLM's own EPLB, sync (``use_async=false``; its async mode needs a GPU stream):
  every ``step_interval`` steps it re-plans and moves experts inside that step;
- ``eplbd``: eplbd's worker extension with ``eplbd serve`` (gated re-plans, staging on the
  agent's thread, commits at an in-band step boundary).

Experts are made big enough that moving them costs something (``--hidden`` x ``--moe-ffn``
float32: 3 * 1024 * 768 * 4 B = 9.4 MB each by default). Per balancer it prints step time
p50/p99/max over the whole run and over the steps around each rearrangement (the step that
changed vLLM's ``physical_to_logical_map`` and the 2 on each side), the worst stall (worst step
minus the run's p50), balancedness before and after (load summed over the first and last
round), the slots whose expert changed, and the bytes that moved.

    .venv/bin/python benchmarks/bench_vllm.py [--rounds 6] [--json]   # or: make bench-vllm
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from eplbd.integrations.vllm_demo import VllmDemoConfig, run_child

AROUND = 2  # steps on each side of a rearranging step that count as "around" it
WARMUP = 1  # first steps left out of the step-time figures


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))] if xs else float("nan")


def figures(s: dict, expert_bytes: int) -> dict:
    """Step-time and movement figures of one run's summary (``run_child``'s)."""
    times = s["step_times_s"][WARMUP:]  # the first forward builds the CPU kernels' caches
    changed = s["slots_changed_per_step"][WARMUP:]
    hits = [i for i, c in enumerate(changed) if c]
    near = sorted({j for i in hits for j in range(max(0, i - AROUND), min(len(times), i + AROUND + 1))})
    around = [times[j] for j in near]
    p50 = statistics.median(times)
    moved = sum(changed)
    return {"balancer": s["balancer"], "steps": len(times), "rearranging_steps": len(hits),
            "p50_ms": p50 * 1e3, "p99_ms": pct(times, 99) * 1e3, "max_ms": max(times) * 1e3,
            "around_p50_ms": (statistics.median(around) if around else float("nan")) * 1e3,
            "around_max_ms": (max(around) if around else float("nan")) * 1e3,
            "worst_stall_ms": (max(times) - p50) * 1e3,
            "balancedness_before": s["balancedness_before"], "balancedness_after": s["balancedness_after"],
            "slots_moved": moved,
            "bytes_moved": s.get("bytes_moved", moved * expert_bytes),
            "outputs_identical": s["outputs_identical"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--moe-ffn", type=int, default=768)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--redundant", type=int, default=4)
    p.add_argument("--window-size", type=int, default=30)
    p.add_argument("--step-interval", type=int, default=45)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    expert_bytes = 3 * args.hidden * args.moe_ffn * 4
    rows = []
    for balancer in ("vllm", "eplbd"):
        cfg = VllmDemoConfig(balancer=balancer, rounds=args.rounds, hidden=args.hidden, moe_ffn=args.moe_ffn,
                             layers=args.layers, redundant=args.redundant, window_size=args.window_size,
                             step_interval=args.step_interval, rebalance_round=-1, timeout_s=900)
        t0 = time.monotonic()
        s = run_child(cfg, lambda line: print(f"  [{balancer}] {line}", file=sys.stderr, flush=True))
        row = figures(s, expert_bytes)
        row["wall_s"] = time.monotonic() - t0
        rows.append(row)
    if args.json:
        print(json.dumps(rows))
        return 0
    print(f"vLLM {s['vllm_version']}, 2 EP ranks, {args.layers} MoE layers, 16 experts + {args.redundant} redundant, "
          f"{expert_bytes / 2**20:.1f} MiB per expert, window {args.window_size}, interval {args.step_interval}, "
          f"{args.rounds} rounds")
    head = (f"{'balancer':8} {'steps':>5} {'rearr':>5} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7} {'near p50':>8} "
            f"{'near max':>8} {'stall ms':>8} {'bal before':>10} {'bal after':>9} {'slots':>5} {'MB moved':>8} {'same out':>8}")
    print(head)
    for r in rows:
        print(f"{r['balancer']:8} {r['steps']:5d} {r['rearranging_steps']:5d} {r['p50_ms']:7.1f} {r['p99_ms']:7.1f} "
              f"{r['max_ms']:7.1f} {r['around_p50_ms']:8.1f} {r['around_max_ms']:8.1f} {r['worst_stall_ms']:8.1f} "
              f"{r['balancedness_before']:10.4f} {r['balancedness_after']:9.4f} {r['slots_moved']:5d} "
              f"{r['bytes_moved'] / 1e6:8.1f} {str(r['outputs_identical']):>8}")
    v, e = rows
    print(f"worst stall: vLLM {v['worst_stall_ms']:.1f} ms, eplbd {e['worst_stall_ms']:.1f} ms "
          f"({v['worst_stall_ms'] / max(e['worst_stall_ms'], 1e-9):.1f}x); max step near a rearrangement: "
          f"vLLM {v['around_max_ms']:.1f} ms, eplbd {e['around_max_ms']:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
