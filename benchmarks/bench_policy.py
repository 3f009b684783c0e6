"""Time ``rebalance_experts`` at DeepSeek-V3 scale against the per-layer reference port.

Weights come from gpt-oss-20b's measured expert frequencies
(``../shared/data/gpt_oss_20b/gptoss20b_domain_expert_frequency.npz``,
``answer_count_frequency [704 domains, 24 layers, 32 experts]``, NaN where a domain
gave no answer tokens): each of the 58 layers concatenates 8 random finite
(domain, layer) rows of 32 experts into 256 experts, scaled to integer counts. Without that file a
seeded Zipf-like distribution stands in. The output says which was used.

    .venv/bin/python benchmarks/bench_policy.py [--runs 50] [--json]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time

import numpy as np
import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
FREQ = REPO.parent / "shared" / "data" / "gpt_oss_20b" / "gptoss20b_domain_expert_frequency.npz"
LAYERS, LOGICAL = 58, 256
CASES = [  # (name, num_replicas, num_groups, num_nodes, num_gpus)
    ("DSV3 32 GPUs", 288, 8, 4, 32),
    ("DSV3 64 GPUs", 320, 8, 8, 64),
]


def load_weights(seed: int = 0) -> tuple[torch.Tensor, str]:
    rng = np.random.default_rng(seed)
    if FREQ.is_file():
        freq = np.load(FREQ)["answer_count_frequency"]  # [domains, 24, 32], NaN where a domain had no answers
        pool = freq.reshape(-1, freq.shape[2])
        pool = pool[np.isfinite(pool).all(axis=1) & (pool.sum(axis=1) > 0)]  # finite (domain, layer) rows
        blocks = LOGICAL // freq.shape[2]
        weight = np.stack([pool[rng.choice(len(pool), size=blocks, replace=False)].ravel() for _ in range(LAYERS)])
        weight = np.rint(weight * 1e5).astype(np.int64)
        src = (
            f"gpt-oss-20b answer_count_frequency: {blocks} random finite (domain, layer) rows of 32 experts"
            f" (pool of {len(pool)}) per layer -> {LAYERS}x{LOGICAL}, x1e5 as counts"
        )
    else:
        ranks = np.arange(1, LOGICAL + 1, dtype=np.float64)
        weight = np.stack([rng.permutation(1e6 / ranks**1.1) for _ in range(LAYERS)])
        weight = np.rint(weight * rng.uniform(0.9, 1.1, weight.shape)).astype(np.int64)
        src = f"seeded Zipf-like (s=1.1) {LAYERS}x{LOGICAL} (shared data not found)"
    return torch.from_numpy(weight), src


def time_it(fn, runs: int, warmup: int) -> list[float]:  # noqa: ANN001
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--ref-runs", type=int, default=10)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)

    from eplbd.policy import predicted_balancedness, rebalance_experts, summarize
    from eplbd.policy.balance import rank_loads, spread_logical_load

    sys.path.insert(0, str(REPO / "tests"))
    from test_policy import ref_layer  # the plain per-layer port the tests check against

    weight, src = load_weights()
    wl = weight.double().numpy()
    results = []
    for name, replicas, groups, nodes, gpus in CASES:
        fast = time_it(lambda: rebalance_experts(weight, replicas, groups, nodes, gpus), args.runs, 5)
        ref = time_it(
            lambda: [ref_layer(wl[i].tolist(), replicas, groups, nodes, gpus) for i in range(LAYERS)],
            args.ref_runs,
            1,
        )
        phy2log = rebalance_experts(weight, replicas, groups, nodes, gpus)[0]
        same = phy2log.tolist() == [ref_layer(wl[i].tolist(), replicas, groups, nodes, gpus) for i in range(LAYERS)]
        per_layer = predicted_balancedness(weight, phy2log, gpus)
        summary = summarize(per_layer, rank_loads(spread_logical_load(weight, phy2log), gpus))
        results.append(
            {
                "case": name,
                "layers": LAYERS,
                "logical": LOGICAL,
                "physical": replicas,
                "groups": groups,
                "nodes": nodes,
                "gpus": gpus,
                "fast_p50_ms": statistics.median(fast),
                "fast_p90_ms": float(np.percentile(fast, 90)),
                "ref_p50_ms": statistics.median(ref),
                "ref_p90_ms": float(np.percentile(ref, 90)),
                "speedup": statistics.median(ref) / statistics.median(fast),
                "same_as_ref": same,
                "predicted_aggregate": summary.aggregate,
                "predicted_min": summary.min,
            }
        )
    if args.json:
        print(json.dumps({"weights": src, "runs": args.runs, "ref_runs": args.ref_runs, "results": results}))
        return 0
    print(f"weights: {src}")
    print(f"runs: {args.runs} (reference {args.ref_runs}) after warm-up; torch {torch.__version__}, numpy {np.__version__}")
    header = f"{'case':<14} {'L x E -> P':<14} {'g/n/gpus':<9} {'p50 ms':>7} {'p90 ms':>7} {'ref p50':>8} {'ref p90':>8} {'x':>6} {'same':>5} {'bal agg':>7} {'bal min':>7}"
    print(header)
    print("-" * len(header))
    for r in results:
        shape = f"{r['layers']}x{r['logical']}->{r['physical']}"
        topo = f"{r['groups']}/{r['nodes']}/{r['gpus']}"
        print(
            f"{r['case']:<14} {shape:<14} {topo:<9} {r['fast_p50_ms']:7.2f} {r['fast_p90_ms']:7.2f}"
            f" {r['ref_p50_ms']:8.1f} {r['ref_p90_ms']:8.1f} {r['speedup']:6.1f} {str(r['same_as_ref']):>5}"
            f" {r['predicted_aggregate']:7.4f} {r['predicted_min']:7.4f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
