"""Rearrangement cost on CPU: transfer time per communicator against the bare transport, and
the reference model's step time during a live rearrangement, async versus blocking.

Part 1 (``transfer``): N processes in a gloo group hold the expert weights of a model
(``--layers`` MoE layers, ``--experts`` logical + ``--redundant`` slots, experts of
``--expert-mb`` MB in three tensors). A new placement from the default policy on a skewed
load is scheduled (``eplbd.client.schedule``) and staged through each communicator: one layer,
then the whole model. In the same run, the same bytes between the same rank pairs go through
the bare transport (one gloo send/recv per pair and batch; one NIXL read per pair and batch),
which is the ceiling; the ratio is communicator / bare time.

Part 2 (``steps``): ``eplbd demo`` runs (embedded daemon, 4 ranks of the reference model on
the GPT-OSS trace) with no rearrangement, with async rearrangement and with blocking
rearrangement; step-time percentiles and the worst step are compared.

    .venv/bin/python benchmarks/bench_rearrange.py [--parts transfer,steps] [--json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import socket
import sys
import time


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _placements(args):
    import numpy as np
    import torch

    from eplbd.policy import initial_placement, rebalance_experts

    P = args.experts + args.redundant
    old = initial_placement(args.layers, args.experts, P, args.ranks, "linear")
    rng = np.random.default_rng(0)
    w = torch.from_numpy(rng.zipf(1.5, size=(args.layers, args.experts)).astype(np.float64).clip(max=1e4))
    new, _, _ = rebalance_experts(w, P, 1, 1, args.ranks)
    return old, new


def _expert_shapes(args):
    # Three tensors per expert, like gate/up, down and a scale; float32.
    n = int(args.expert_mb * 1e6 / 4)
    h = max(8, int((n / 3) ** 0.5))
    return [(2 * h, h), (h, h), (h,)]


def _best_times(args, group, run) -> dict:
    """Best of ``args.repeat`` wall times of ``run(layers)`` for one layer and for the whole model,
    between barriers, so the slowest rank's time counts."""
    import torch.distributed as dist

    timings = {}
    for label, layers in (("one_layer", [0]), ("model", range(args.layers))):
        best = float("inf")
        for _ in range(args.repeat):
            dist.barrier(group)
            t0 = time.perf_counter()
            run(layers)
            dist.barrier(group)
            best = min(best, time.perf_counter() - t0)
        timings[label] = best
    return timings


def _transfer_worker(rank, args, port, q):
    import torch
    import torch.distributed as dist

    from eplbd.client.comm.gloo import GlooCommunicator
    from eplbd.client.schedule import plan_schedules

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=args.ranks)
        P = args.experts + args.redundant
        nl = P // args.ranks
        old, new = _placements(args)
        live = [[torch.randn(nl, *s) for s in _expert_shapes(args)] for _ in range(args.layers)]
        staging = [[torch.empty_like(t) for t in live[0]] for _ in range(2)]
        scheds = plan_schedules(list(range(args.layers)), old, new, args.ranks)
        results = {}
        comms = {"torch_gloo": lambda g: GlooCommunicator(rank, args.ranks, g)}
        if "nixl" in args.communicators:
            from eplbd.client.comm.nixl import NixlCommunicator, nixl_available
            if nixl_available() is None:
                comms["nixl"] = lambda g: NixlCommunicator(rank, args.ranks, g)
        group = dist.new_group(backend="gloo")
        for name in [c for c in args.communicators if c in comms]:
            comm = comms[name](group)
            comm.setup(live, staging)

            def stage(layers):
                for i in layers:
                    for b in scheds[i].for_rank(rank):
                        if b:
                            comm.run_batch(i % 2, b)
                    scheds[i].copy_local(rank, live[i], staging[i % 2])

            results[name] = _best_times(args, group, stage)
            dist.barrier(group)
            comm.close()
        # Bare gloo: per layer and batch, one flat send/recv per peer with the same byte count.
        expert_bytes = sum(t[0].nbytes for t in live[0])
        flat = torch.empty(expert_bytes * nl // 4 + 1)

        def bare(layers):
            for i in layers:
                for b in scheds[i].for_rank(rank):
                    works = []
                    peers: dict[tuple[int, int], int] = {}
                    for t in b:
                        peers[(t.src_rank, t.dst_rank)] = peers.get((t.src_rank, t.dst_rank), 0) + 1
                    for (src, dst), n in sorted(peers.items()):
                        buf = flat[: n * expert_bytes // 4]
                        if src == rank:
                            works.append(dist.isend(buf, group=group, group_dst=dst))
                        elif dst == rank:
                            works.append(dist.irecv(buf, group=group, group_src=src))
                    for w in works:
                        w.wait()

        results["bare_gloo"] = _best_times(args, group, bare)
        if "nixl" in comms:
            results["bare_nixl"] = _bare_nixl(rank, args, group, scheds, expert_bytes, nl)
        moved = {"one_layer": sum(1 for t in scheds[0].transfers) * expert_bytes,
                 "model": sum(len(s.transfers) for s in scheds) * expert_bytes}
        q.put(("ok", rank, results, moved))
        dist.destroy_process_group()
    except BaseException as exc:
        import traceback
        q.put(("error", rank, f"{exc!r}\n{traceback.format_exc()}", None))


def _bare_nixl(rank, args, group, scheds, expert_bytes, nl):
    """The same bytes as one flat NIXL read per (peer, batch), through the communicator's own
    memory registration: a layer of one big 'expert' per peer."""
    import torch

    from eplbd.client.comm.base import Transfer
    from eplbd.client.comm.nixl import NixlCommunicator

    big = [[torch.zeros(nl, expert_bytes // 4 + 1)] for _ in range(1)]
    stage = [[torch.empty_like(big[0][0])]]
    comm = NixlCommunicator(rank, args.ranks, group)
    comm.setup(big, stage)
    def bare(layers):
        for i in layers:
            for b in scheds[i].for_rank(rank):
                pairs = sorted({(t.src_rank, t.dst_rank) for t in b})
                if not pairs:
                    continue
                # The communicator reads slot by slot; here every pair reads one big slot per expert
                # it moves: the same bytes in the fewest requests.
                flat = [Transfer(0, 0, s, 0, d, 0) for s, d in pairs]
                n = {p: sum(1 for t in b if (t.src_rank, t.dst_rank) == p) for p in pairs}
                for _ in range(max(n.values())):
                    comm.run_batch(0, flat)

    timings = _best_times(args, group, bare)
    comm.close()
    return timings


def part_transfer(args) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _port()
    procs = [ctx.Process(target=_transfer_worker, args=(r, args, port, q), daemon=True) for r in range(args.ranks)]
    for p in procs:
        p.start()
    out = {}
    moved = None
    for _ in procs:
        kind, rank, res, mv = q.get(timeout=600)
        if kind == "error":
            raise RuntimeError(f"rank {rank}: {res}")
        out[rank] = res
        moved = mv
    for p in procs:
        p.join(30)
    return {"timings": out[0], "bytes": moved}


def part_steps(args) -> dict:
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from eplbd.refengine.demo import DemoConfig, run_demo

    runs = {}
    base = dict(ranks=4, steps=args.demo_steps, communicator="torch_gloo", window_size=100, step_interval=150)
    for label, kw in (("no rearrangement", dict(step_interval=10**6)), ("async", {}),
                      ("blocking", dict(use_async=False))):
        s = run_demo(DemoConfig(**{**base, **kw}))
        runs[label] = {k: s[k] for k in ("step_ms_p50", "step_ms_p99", "step_ms_max", "apply_ms_max",
                                         "plans_committed", "experts_moved", "bytes_moved", "outputs_identical",
                                         "balancedness_before", "balancedness_after")}
    return runs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", default="transfer,steps")
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--redundant", type=int, default=8)
    ap.add_argument("--expert-mb", type=float, default=2.0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--communicators", default="torch_gloo,nixl")
    ap.add_argument("--demo-steps", type=int, default=450)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    args.communicators = args.communicators.split(",")
    result = {}
    parts = args.parts.split(",")
    if "transfer" in parts:
        result["transfer"] = part_transfer(args)
    if "steps" in parts:
        result["steps"] = part_steps(args)
    if args.json:
        print(json.dumps(result))
        return 0
    if "transfer" in result:
        t, b = result["transfer"]["timings"], result["transfer"]["bytes"]
        print(f"transfer: {args.ranks} ranks, {args.layers} layers x ({args.experts}+{args.redundant}) slots, "
              f"experts of {args.expert_mb:g} MB; best of {args.repeat}")
        print(f"{'communicator':<14}{'one layer ms':>14}{'GB/s':>8}{'model ms':>12}{'GB/s':>8}{'ratio vs bare':>16}")
        for name in [n for n in t if not n.startswith("bare")]:
            bare = t.get(f"bare_{name.split('_')[-1]}", t["bare_gloo"])
            for_ratio = bare["model"] / t[name]["model"]
            print(f"{name:<14}{t[name]['one_layer'] * 1e3:>14.1f}{b['one_layer'] / t[name]['one_layer'] / 1e9:>8.2f}"
                  f"{t[name]['model'] * 1e3:>12.1f}{b['model'] / t[name]['model'] / 1e9:>8.2f}{for_ratio:>16.2f}")
        for name in [n for n in t if n.startswith("bare")]:
            print(f"{name:<14}{t[name]['one_layer'] * 1e3:>14.1f}{b['one_layer'] / t[name]['one_layer'] / 1e9:>8.2f}"
                  f"{t[name]['model'] * 1e3:>12.1f}{b['model'] / t[name]['model'] / 1e9:>8.2f}")
        print(f"bytes moved: one layer {b['one_layer'] / 1e6:.1f} MB, model {b['model'] / 1e6:.1f} MB")
    if "steps" in result:
        print("\nreference model step time (4 ranks, GPT-OSS trace, max over ranks per step):")
        print(f"{'mode':<18}{'p50 ms':>8}{'p99 ms':>8}{'max ms':>8}{'apply max ms':>14}{'plans':>7}{'identical':>11}")
        for label, s in result["steps"].items():
            print(f"{label:<18}{s['step_ms_p50']:>8.2f}{s['step_ms_p99']:>8.2f}{s['step_ms_max']:>8.2f}"
                  f"{s['apply_ms_max']:>14.2f}{s['plans_committed']:>7}{str(s['outputs_identical']):>11}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
