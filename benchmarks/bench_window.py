"""What a commit costs the daemon's event loop in the load window, at DeepSeek-V3 scale.

A commit switches the window to the new epoch (``LoadWindow.set_epoch``). Its rows of the old placement
stay physical and are mapped to logical space one at a time as they leave the window (``_stale``);
folding them all at the switch, as the window did before, is timed in the same run for comparison
(``_materialize`` of every stale row). Also: the cost of one report right after a commit, when each
new step evicts one row of the old placement.

    .venv/bin/python benchmarks/bench_window.py [--window 1000] [--layers 58] [--experts 256] [--slots 288]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from eplbd.daemon.window import LoadWindow


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--window", type=int, default=1000)
    p.add_argument("--layers", type=int, default=58)
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--slots", type=int, default=288)
    p.add_argument("--runs", type=int, default=5)
    a = p.parse_args()
    W, L, E, P = a.window, a.layers, a.experts, a.slots
    rng = np.random.default_rng(0)
    phy = [np.stack([rng.permutation(np.arange(P) % E) for _ in range(L)]).astype(np.int64) for _ in range(2)]
    load = rng.integers(0, 50, (W, L, P)).astype(np.int32)
    switch, eager, report = [], [], []
    for _ in range(a.runs):
        w = LoadWindow(W, L, E, P)
        w.add(0, load, phy[0], epoch=0)
        t = time.perf_counter()
        w.set_epoch(1)
        switch.append(time.perf_counter() - t)
        t = time.perf_counter()
        for s in range(W, W + 50):
            w.add(s, load[s - W:s - W + 1], phy[1], epoch=1)
        report.append((time.perf_counter() - t) / 50)
        before = w.logical_load()
        t = time.perf_counter()
        w._materialize(list(w._stale))  # the whole-window fold a commit used to do
        eager.append(time.perf_counter() - t)
        assert np.array_equal(before, w.logical_load())
    ms = lambda xs: 1e3 * statistics.median(xs)  # noqa: E731
    print(f"window {W} steps x {L} layers x {P} slots ({E} experts), median of {a.runs}")
    print(f"  commit: set_epoch                     {ms(switch):8.3f} ms")
    print(f"  the same rows folded at once (before) {ms(eager):8.3f} ms   ({ms(eager) / ms(switch):.0f}x)")
    print(f"  one report after a commit             {ms(report):8.3f} ms   (evicts one old-placement row)")


if __name__ == "__main__":
    main()
