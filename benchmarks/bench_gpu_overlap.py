"""GPU: the engine's step time while the agent stages a rearrangement (needs CUDA).

The "engine" runs steps on its forward stream: ``--matmuls`` bf16 matmuls of ``--dim`` squared,
timed with CUDA events. Meanwhile a background thread plays the agent: it stages
``--layers`` layers of ``--slots`` experts of ``--expert-mb`` MB each (device-to-device copies,
as after a NIXL/NCCL receive, plus the local copies). Three runs, one process:

- ``none``: no rearrangement (the baseline);
- ``side``: staging inside ``StagingStream.staging()`` (the agent's side stream);
- ``default``: staging on the thread's default stream (what staging from a plain background
  thread does without a side stream): it serialises with the forward pass.

Prints step-time p50/p99/max per run and the ratios to ``none``.

    .venv/bin/python benchmarks/bench_gpu_overlap.py [--steps 200] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading


def _percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def run(mode: str, args) -> dict:
    import torch

    from eplbd.client.streams import StagingStream

    dev = torch.device("cuda")
    a = torch.randn(args.dim, args.dim, device=dev, dtype=torch.bfloat16)
    numel = int(args.expert_mb * 2**20 // 2)
    src = [torch.randn(args.slots, numel, device=dev, dtype=torch.bfloat16) for _ in range(2)]
    staging = torch.empty_like(src[0])
    ss = StagingStream(dev)
    stop = threading.Event()
    staged = [0]

    def agent() -> None:
        while not stop.is_set() and staged[0] < args.layers:
            if mode == "side":
                with ss.staging():
                    staging.copy_(src[staged[0] % 2])
                    ev = ss.staged()
                ev.synchronize()
            else:
                staging.copy_(src[staged[0] % 2])
                torch.cuda.current_stream().synchronize()
            staged[0] += 1

    times: list[float] = []
    torch.cuda.synchronize()
    th = threading.Thread(target=agent, daemon=True) if mode != "none" else None
    if th is not None:
        th.start()
    for _ in range(args.steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        x = a
        for _ in range(args.matmuls):
            x = x @ a
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    stop.set()
    if th is not None:
        th.join()
    torch.cuda.synchronize()
    return {"mode": mode, "p50_ms": statistics.median(times), "p99_ms": _percentile(times, 0.99),
            "max_ms": max(times), "layers_staged": staged[0],
            "staged_gb": staged[0] * args.slots * args.expert_mb / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--matmuls", type=int, default=8)
    ap.add_argument("--layers", type=int, default=10_000, help="layers to stage (upper bound; stops with the run)")
    ap.add_argument("--slots", type=int, default=8, help="experts staged per layer")
    ap.add_argument("--expert-mb", type=float, default=44.0, help="bytes of one expert (DeepSeek-V3 FP8 ~ 44 MB)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu_overlap needs CUDA")
    run("none", args)  # warm-up: cuBLAS handles, allocator
    rows = [run(m, args) for m in ("none", "side", "default")]
    base = rows[0]["p50_ms"]
    for r in rows:
        r["p50_ratio"] = r["p50_ms"] / base
    if args.json:
        print(json.dumps({"device": torch.cuda.get_device_name(), "runs": rows}))
        return
    print(f"device {torch.cuda.get_device_name()}; step = {args.matmuls} bf16 matmuls of {args.dim}^2; "
          f"staging {args.slots} x {args.expert_mb:g} MB per layer")
    print(f"{'staging':<10}{'p50 ms':>10}{'p99 ms':>10}{'max ms':>10}{'p50/none':>10}{'layers':>8}{'GB':>8}")
    for r in rows:
        print(f"{r['mode']:<10}{r['p50_ms']:>10.3f}{r['p99_ms']:>10.3f}{r['max_ms']:>10.3f}"
              f"{r['p50_ratio']:>10.2f}{r['layers_staged']:>8}{r['staged_gb']:>8.1f}")


if __name__ == "__main__":
    main()
