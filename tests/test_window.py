import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from eplbd.daemon.window import LoadWindow, ReportRejected, physical_to_logical

L, E, P = 2, 4, 6
PHY_A = np.array([[0, 1, 2, 3, 0, 1], [3, 2, 1, 0, 3, 3]], np.int64)
PHY_B = np.array([[3, 2, 1, 0, 0, 0], [0, 1, 2, 3, 1, 2]], np.int64)


def brute_logical(load, phy2log):
    out = np.zeros(load.shape[:-1] + (E,), np.int64)
    for idx in np.ndindex(load.shape[:-1]):
        layer = idx[-1]
        for p in range(P):
            out[idx + (phy2log[layer, p],)] += load[idx + (p,)]
    return out


def test_physical_to_logical_matches_brute_force():
    rng = np.random.default_rng(0)
    load = rng.integers(0, 100, (5, L, P))
    np.testing.assert_array_equal(physical_to_logical(load, PHY_A, E), brute_logical(load, PHY_A))


def test_ranks_sum_per_step_and_window_evicts_old_steps():
    rng = np.random.default_rng(1)
    w = LoadWindow(3, L, E, P)
    loads = {r: rng.integers(0, 50, (6, L, P)) for r in range(2)}
    for r in range(2):
        w.add(0, loads[r][:4], PHY_A, epoch=0)
        w.add(4, loads[r][4:], PHY_A, epoch=0)
    total = loads[0] + loads[1]
    assert w.fill == 3 and w.newest_step == 5
    np.testing.assert_array_equal(w.logical_load(), brute_logical(total[3:], PHY_A).sum(0))
    snap = w.snapshot()
    np.testing.assert_array_equal(snap.physical, total[3:].sum(0))
    steps, rows = w.steps_logical()
    assert steps.tolist() == [3, 4, 5]
    np.testing.assert_array_equal(rows, brute_logical(total[3:], PHY_A))


def test_loads_on_both_sides_of_an_epoch_add_up_in_logical_space():
    w = LoadWindow(10, L, E, P)
    a = np.ones((2, L, P), np.int64)
    w.add(0, a, PHY_A, epoch=0)
    w.set_epoch(1)
    w.add(2, a * 2, PHY_B, epoch=1)
    expect = brute_logical(a, PHY_A).sum(0) + brute_logical(a * 2, PHY_B).sum(0)
    np.testing.assert_array_equal(w.logical_load(), expect)
    snap = w.snapshot()
    # The physical view only holds steps recorded under the current epoch.
    assert snap.physical_steps == 2 and snap.epoch == 1
    np.testing.assert_array_equal(snap.physical, (a * 2).sum(0))
    # A straggler report of the old epoch still counts in logical space only.
    w.add(1, a, PHY_A, epoch=0)
    np.testing.assert_array_equal(w.snapshot().physical, (a * 2).sum(0))
    np.testing.assert_array_equal(w.logical_load(), expect + brute_logical(a, PHY_A).sum(0))


@pytest.mark.parametrize("load,reason", [
    (np.ones((1, L, P + 1), np.int64), "bad_shape"),
    (np.ones((L, P), np.int64), "bad_shape"),
    (np.ones((1, L, P), np.float32), "bad_dtype"),
    (-np.ones((1, L, P), np.int64), "negative"),
    (np.full((1, L, P), 2**40, np.int64), "overflow"),
])
def test_bad_reports_are_refused_and_change_nothing(load, reason):
    w = LoadWindow(4, L, E, P)
    w.add(0, np.ones((1, L, P), np.int64), PHY_A, epoch=0)
    before = w.snapshot()
    with pytest.raises(ReportRejected) as ei:
        w.add(1, load, PHY_A, epoch=0)
    assert ei.value.reason == reason
    after = w.snapshot()
    np.testing.assert_array_equal(before.logical, after.logical)
    assert (before.steps, before.newest_step) == (after.steps, after.newest_step)


def test_far_future_and_stale_steps():
    w = LoadWindow(4, L, E, P, max_steps_ahead=100)
    w.add(10, np.ones((1, L, P), np.int64), PHY_A, epoch=0)
    with pytest.raises(ReportRejected, match="ahead") as ei:
        w.add(500, np.ones((1, L, P), np.int64), PHY_A, epoch=0)
    assert ei.value.reason == "step_out_of_range"
    with pytest.raises(ReportRejected, match="negative"):
        w.add(-1, np.ones((1, L, P), np.int64), PHY_A, epoch=0)
    # Older than the window: ignored, not an error (a slow rank catching up).
    assert w.add(2, np.ones((1, L, P), np.int64), PHY_A, epoch=0) == 0
    assert w.fill == 1


PLACEMENTS = {0: PHY_A, 1: PHY_B, 2: PHY_A[:, ::-1].copy()}


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 6), st.lists(
    st.one_of(st.tuples(st.just("report"), st.integers(0, 2), st.integers(0, 30), st.integers(1, 4)),
              st.tuples(st.just("epoch"), st.integers(0, 2))),
    min_size=1, max_size=30))
def test_window_equals_brute_force(window_size, ops):
    """Reports of any epoch, epoch switches and eviction against a per-step model:
    logical rows of every report, physical rows only of reports made under the
    window's epoch since it last changed."""
    rng = np.random.default_rng(len(ops))
    w = LoadWindow(window_size, L, E, P)
    logical: dict[int, np.ndarray] = {}
    physical: dict[int, np.ndarray] = {}
    newest, epoch = -1, 0
    for op in ops:
        if op[0] == "epoch":
            w.set_epoch(op[1])
            if op[1] != epoch:
                physical, epoch = {}, op[1]
            continue
        _, rep_epoch, first, n = op
        load = rng.integers(0, 9, (n, L, P))
        w.add(first, load, PLACEMENTS[rep_epoch], epoch=rep_epoch)
        last = first + n - 1
        oldest = max(newest, last) - window_size + 1
        for i in range(n):
            s = first + i
            if s >= oldest:
                logical[s] = logical.get(s, 0) + brute_logical(load[i][None], PLACEMENTS[rep_epoch])[0]
                if rep_epoch == epoch:
                    physical[s] = physical.get(s, 0) + load[i]
        newest = max(newest, last)
        logical = {s: v for s, v in logical.items() if s > newest - window_size}
        physical = {s: v for s, v in physical.items() if s > newest - window_size}
    zero_l, zero_p = np.zeros((L, E), np.int64), np.zeros((L, P), np.int64)
    np.testing.assert_array_equal(w.logical_load(), sum(logical.values(), zero_l))
    snap = w.snapshot()
    np.testing.assert_array_equal(snap.physical, sum(physical.values(), zero_p))
    assert (snap.steps, snap.physical_steps, snap.epoch) == (len(logical), len(physical), epoch)
    steps, rows = w.steps_logical()
    assert steps.tolist() == sorted(logical)
    np.testing.assert_array_equal(rows.reshape(-1, L, E), np.array([logical[s] for s in sorted(logical)]).reshape(-1, L, E))


PLACEMENTS = [PHY_A, PHY_B, np.array([[1, 1, 2, 3, 0, 0], [2, 2, 1, 0, 3, 1]], np.int64)]


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_epoch_switches_keep_every_view_equal_to_a_brute_force_window(data):
    """Random reports of the current and of other epochs, epoch switches (the commit path, where rows of the
    old placement stay physical until they leave the window or are reported into again), step jumps and
    resizes' placement changes: logical sum, physical sum, fill and the per-step export always equal
    a window kept by brute force."""
    size = data.draw(st.integers(1, 6))
    w = LoadWindow(size, L, E, P)
    logical: dict[int, np.ndarray] = {}  # step -> logical load of every report
    physical: dict[int, np.ndarray] = {}  # step -> physical load of the current epoch's reports
    placement = {0: PHY_A}
    epoch, newest = 0, -1
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16)))
    for _ in range(data.draw(st.integers(1, 25))):
        op = data.draw(st.sampled_from(["report", "report", "report", "old", "switch"]))
        if op == "switch":
            epoch += 1
            placement[epoch] = PLACEMENTS[data.draw(st.integers(0, 2))]
            w.set_epoch(epoch)
            physical.clear()
            continue
        ep = epoch if op == "report" or epoch == 0 else data.draw(st.integers(0, epoch - 1))
        first = data.draw(st.integers(max(0, newest - size - 1), newest + 3))
        load = rng.integers(0, 20, (data.draw(st.integers(1, 3)), L, P))
        w.add(first, load, placement[ep], epoch=ep)
        newest = max(newest, first + len(load) - 1)
        for i, row in enumerate(load):
            step = first + i
            if step <= newest - size:
                continue
            logical[step] = logical.get(step, 0) + brute_logical(row, placement[ep])
            if ep == epoch:
                physical[step] = physical.get(step, 0) + row
        for book in (logical, physical):
            for step in [s for s in book if s <= newest - size]:
                del book[step]
        kept = sorted(logical)
        assert w.fill == len(kept)
        np.testing.assert_array_equal(w.logical_load(), sum(logical.values(), np.zeros((L, E), np.int64)))
        np.testing.assert_array_equal(w.snapshot().physical, sum(physical.values(), np.zeros((L, P), np.int64)))
        steps, rows = w.steps_logical()
        assert steps.tolist() == kept
        np.testing.assert_array_equal(rows, np.array([logical[s] for s in kept]).reshape(len(kept), L, E))
