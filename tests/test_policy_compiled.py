"""The policies' compiled loops (numba) against their numpy references: the same plans, bit for bit.

Where no JIT may run (``MemoryDenyWriteExecute``) the daemon plans with the numpy references, so both
paths are the product; ``tests/test_deploy.py`` runs a daemon under that restriction.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from eplbd.policy import jit, plan_incremental, rebalance_experts
from eplbd.policy.incremental import warm
from eplbd.policy.matching import assignment_batch


@pytest.fixture
def numpy_only(monkeypatch):  # noqa: ANN001, ANN201
    """Run the block with the numpy references (as under MemoryDenyWriteExecute)."""
    def use(fn):  # noqa: ANN001, ANN202
        assert jit.enabled(), f"the compiled loops do not run here: {jit.reason()}"
        with monkeypatch.context() as m:
            m.setattr(jit, "_state", {"on": False, "why": "numpy (test)"})
            return fn()
    return use


def _shapes(rng: np.random.Generator, count: int):  # noqa: ANN202
    """Random (weight_before, weight_after, num_replicas, num_groups, num_nodes, num_gpus): integer loads over
    small ranges so that many are equal (ties on purpose), hierarchical and global, odd zones included."""
    out = []
    while len(out) < count:
        gpus = int(rng.choice([2, 3, 4, 6, 8, 16]))
        nodes = int(rng.choice([n for n in (1, 2, 3, 4) if gpus % n == 0]))
        per_gpu = int(rng.integers(1, 6))
        phys = gpus * per_gpu
        experts = int(rng.integers(max(1, phys // 2), phys + 1))
        groups = int(rng.choice([d for d in range(1, experts + 1) if experts % d == 0]))
        layers = int(rng.integers(1, 5))
        hi = int(rng.choice([2, 4, 50, 10_000]))
        out.append((rng.integers(0, hi, (layers, experts)), rng.integers(0, hi, (layers, experts)),
                    phys, groups, nodes, gpus))
    return out


def _both(fn, numpy_only):  # noqa: ANN001, ANN202
    return fn(), numpy_only(fn)


def test_compiled_loops_run_here_and_warm_up():
    assert jit.enabled(), jit.reason()
    assert warm().startswith("compiled (numba ")


def test_default_is_the_same_plan_compiled_and_in_numpy(numpy_only):
    rng = np.random.default_rng(11)
    for w, _, phys, groups, nodes, gpus in _shapes(rng, 400):
        for weight in (w, w.astype(np.float32) / 7):
            got, ref = _both(lambda: rebalance_experts(weight, phys, groups, nodes, gpus), numpy_only)
            for a, b in zip(got, ref):
                assert torch.equal(a, b), (phys, groups, nodes, gpus, weight)


def test_incremental_is_the_same_plan_compiled_and_in_numpy(numpy_only):
    """Every option the search records, and so the plan, choice and moves, for the placement in force being
    the last plan or the engine's linear layout, with and without a move budget."""
    rng = np.random.default_rng(12)
    checked = 0
    for w0, w1, phys, groups, nodes, gpus in _shapes(rng, 250):
        old_plan = rebalance_experts(w0, phys, groups, nodes, gpus)[0]
        linear = torch.from_numpy(np.tile(np.arange(phys) % w0.shape[1], (w0.shape[0], 1)))
        for old in (old_plan, linear):
            for budget in (None, 0, 1, 3, 1000):
                got, ref = _both(lambda: plan_incremental(w1, phys, groups, nodes, gpus, old, budget), numpy_only)
                assert torch.equal(got.phy2log, ref.phy2log), (phys, groups, nodes, gpus, budget)
                assert got.choice == ref.choice and np.array_equal(got.moved, ref.moved)
                assert np.array_equal(got.after, ref.after) and np.array_equal(got.replan, ref.replan)
                checked += 1
    assert checked == 2500


def test_incremental_is_the_same_plan_on_real_drift_at_deepseek_scale(numpy_only):
    """GPT-OSS-20B per-domain frequencies tiled to 58 x 256 -> 288 slots (the drift benchmark's shapes)."""
    from pathlib import Path

    freq = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "gpt_oss_20b" / \
        "gptoss20b_domain_expert_frequency.npz"
    f = np.load(freq)
    load = np.nan_to_num(f["think_count_frequency"]) + np.nan_to_num(f["answer_count_frequency"])
    rng = np.random.default_rng(13)
    a, b = load[rng.choice(len(load), 2, replace=False)]
    tile = lambda x: np.stack([x[rng.integers(len(x), size=8)].reshape(-1)[rng.permutation(256)]  # noqa: E731
                               for _ in range(58)])
    state = rng.bit_generator.state
    wa = np.rint(1e6 * tile(a)).astype(np.int64)
    rng.bit_generator.state = state
    wb = np.rint(1e6 * tile(b)).astype(np.int64)
    for groups, nodes, gpus, phys in ((8, 4, 32, 288), (1, 4, 32, 288), (8, 8, 64, 320)):
        old = rebalance_experts(wa, phys, groups, nodes, gpus)[0]
        got, ref = _both(lambda: plan_incremental(wb, phys, groups, nodes, gpus, old), numpy_only)
        assert torch.equal(got.phy2log, ref.phy2log) and got.choice == ref.choice
        assert got.moved.sum() > 0


def test_relabel_helpers_are_the_same_compiled_and_in_numpy(numpy_only):
    """The rank overlap (ranks or nodes as units) and the in-rank slot order of a relabelled re-plan, on random
    placements where a rank may hold an expert twice and an expert may be missing, and the re-plan relabelling
    of ``default`` given the placement in force."""
    from eplbd.policy.matching import keep_slots, rank_overlap
    from eplbd.policy.placement import preserve_local_slots
    from eplbd.policy.registry import get_policy

    rng = np.random.default_rng(16)
    for _ in range(300):
        ranks = int(rng.choice([1, 2, 3, 4, 8]))
        phys = ranks * int(rng.integers(1, 7))
        experts = int(rng.integers(1, phys + 1))
        layers = int(rng.integers(1, 4))
        new = rng.integers(0, experts, (layers, phys))
        old = rng.integers(0, experts, (layers, phys))
        got, ref = _both(lambda: rank_overlap(new, old, ranks, experts), numpy_only)
        assert got.dtype == ref.dtype == np.int64 and np.array_equal(got, ref)
        got, ref = _both(lambda: keep_slots(new, old, ranks), numpy_only)
        assert np.array_equal(got, ref) and np.array_equal(got, preserve_local_slots(new, old, ranks).numpy())
    policy = get_policy("default")
    for w0, w1, phys, groups, nodes, gpus in _shapes(rng, 150):
        old = rebalance_experts(w0, phys, groups, nodes, gpus)[0]
        got, ref = _both(lambda: policy.rebalance(w1, phys, groups, nodes, gpus, old), numpy_only)
        assert torch.equal(got, ref), (phys, groups, nodes, gpus)


def test_assignment_is_the_same_and_optimal_compiled_and_in_numpy(numpy_only):
    from itertools import permutations

    rng = np.random.default_rng(14)
    for n in (1, 2, 3, 4, 5, 6):
        cost = rng.integers(0, 4, (40, n, n)).astype(np.float64)  # many ties
        got, ref = _both(lambda: assignment_batch(cost), numpy_only)
        assert np.array_equal(got, ref)
        best = np.array([min(sum(c[i, p[i]] for i in range(n)) for p in permutations(range(n))) for c in cost])
        assert np.array_equal(cost[np.arange(40)[:, None], np.arange(n)[None, :], got].sum(axis=1), best)


@pytest.mark.parametrize("value", ["1", "yes"])
def test_no_jit_env_chooses_numpy_and_says_why(value):
    code = ("from eplbd.policy import jit, rebalance_experts; import numpy as np; "
            "rebalance_experts(np.ones((1, 8)), 8, 1, 1, 2); print(jit.enabled(), jit.reason()); "
            "import sys; print('numba' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "EPLBD_NO_JIT": value},
                         capture_output=True, text=True, timeout=120, check=True).stdout.split("\n")
    assert out[0] == "False numpy (EPLBD_NO_JIT is set)"
    assert out[1] == "False"  # numba is not even imported


def test_without_a_writable_cache_the_loops_compile_in_memory_and_say_so():
    """A read-only root file system without NUMBA_CACHE_DIR: numba finds no cache directory (emulated by
    giving it no cache locator); the policies still run compiled, and the reason names the fix."""
    code = ("import numba.core.caching as c; c.CacheImpl._locator_classes = []\n"
            "import numpy as np\n"
            "from eplbd.policy import jit, plan_incremental, rebalance_experts\n"
            "w = np.arange(16).reshape(2, 8)\n"
            "old = rebalance_experts(w, 12, 2, 2, 4)[0]\n"
            "print(plan_incremental(w[::-1].copy(), 12, 2, 2, 4, old).moved.sum() >= 0, jit.reason())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.startswith("True compiled (numba "), out.stdout + out.stderr
    assert "not cached: no writable cache directory (set NUMBA_CACHE_DIR)" in out.stdout


def test_sums_are_numpys_for_any_length():
    """Rank loads are summed in numpy's pairwise order, including past its 128-value blocks (4096 experts on
    8 ranks is 512 slots a rank)."""
    from eplbd.policy.kernels import npsum

    rng = np.random.default_rng(15)
    for n in [*range(0, 140), 255, 256, 257, 511, 1000, 4099]:
        x = rng.random((4, n)) * 10.0 ** rng.uniform(-3, 6, (4, n))
        assert [npsum(row, n) for row in x] == list(x.sum(axis=1)), n


def test_incremental_is_the_same_plan_with_hundreds_of_slots_a_rank(numpy_only):
    rng = np.random.default_rng(16)
    w0, w1 = rng.random((2, 2, 600)) * 10.0 ** rng.uniform(0, 6, (2, 2, 600))  # sums that depend on their order
    old = rebalance_experts(w0, 640, 1, 1, 4)[0]
    got, ref = _both(lambda: plan_incremental(w1, 640, 1, 1, 4, old), numpy_only)
    assert torch.equal(got.phy2log, ref.phy2log) and np.array_equal(got.after, ref.after)


def test_a_change_to_any_kernel_source_drops_every_cached_kernel(tmp_path):
    """numba checks only a function's own file; a kernel also inlines other kernel modules' code and
    constants. The stamp beside numba's index makes a cached kernel compiled from other sources recompile."""
    (tmp_path / "kmod.py").write_text("from eplbd.policy.jit import njit\n\n@njit\ndef twice(x):\n    return 2 * x\n")
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import kmod; kmod.twice(3); "
            "print(kmod.twice.stats.cache_hits.get((kmod.twice.nopython_signatures[0].args), 0))")

    def hits() -> int:
        out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True,
                             timeout=120, check=True)
        return int(out.stdout.split()[-1])

    assert hits() == 0  # compiled, cached, stamped
    assert hits() == 1  # loaded from the cache
    stamp = tmp_path / "__pycache__" / "kmod.twice.eplbd-sources"
    assert stamp.read_text() == jit._sources_digest()
    stamp.write_text("compiled from other kernel sources")
    assert hits() == 0  # flushed, compiled again
    assert stamp.read_text() == jit._sources_digest()


def test_a_kernel_that_cannot_compile_leaves_the_policies_on_numpy(monkeypatch):
    """numba importable but failing to build a kernel (an unsupported machine): the warm-up the daemon runs at
    start switches the process to the numpy references, and plans go on."""
    import eplbd.policy.kernels as kernels

    def broken(*args):  # noqa: ANN002, ANN202
        raise RuntimeError("LLVM cannot build for this CPU")

    monkeypatch.setattr(jit, "_state", dict(jit._state))
    monkeypatch.setattr(kernels, "pack_ordered", broken)
    assert warm() == "numpy (compiling the policy loops failed: RuntimeError: LLVM cannot build for this CPU)"
    assert not jit.enabled()
    w = np.arange(32).reshape(2, 16)
    assert plan_incremental(w[::-1].copy(), 24, 4, 2, 8, rebalance_experts(w, 24, 4, 2, 8)[0]).moved.sum() >= 0


def test_the_budget_pick_is_the_same_compiled_and_in_numpy(numpy_only):
    """The compiled pick skips options an earlier one dominates; on random option tables with many equal
    costs and balances (and repeated options, as the search's are) it picks what the numpy bisection picks."""
    from eplbd.policy.incremental_budget import _pick

    rng = np.random.default_rng(17)
    for _ in range(300):
        layers, options = int(rng.integers(1, 8)), int(rng.integers(1, 40))
        cost = rng.integers(0, 6, (options, layers))
        bal = np.round(rng.random((options, layers)), 1)  # many equal balances, and dominated options
        again = np.flatnonzero(rng.random(options) < 0.3)
        again = again[again > 0]
        cost[again], bal[again] = cost[again - 1], bal[again - 1]  # repeated options
        total = int(cost.sum(axis=1).max())
        for budget, goal in ((None, float(bal.sum(axis=1).mean())), (int(rng.integers(0, total + 1)), 0.0)):
            got, ref = _both(lambda: _pick(cost, bal, budget, goal), numpy_only)
            assert np.array_equal(got, ref), (cost, bal, budget, goal)
