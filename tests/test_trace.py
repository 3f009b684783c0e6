import numpy as np
import pytest

from eplbd.errors import TraceError
from eplbd.offline.trace import (batch_schedule, convert_routing_file, load_trace, routing_to_load,
                         save_trace)


def test_batch_schedule_takes_first_free_slot():
    # 2 slots: r0 (3 tokens) slot0@0, r1 (1) slot1@0, r2 (2) slot1@1, r3 (1) slot0@3 (tie 3/3 -> slot 0)
    assert batch_schedule(np.array([3, 1, 2, 1]), 2).tolist() == [0, 0, 1, 3]


def test_routing_to_load_by_hand():
    # 3 requests, 1 layer, top-1; batch 2.
    experts = np.array([[[0]], [[1]], [[2]], [[1]], [[0]]], np.uint8)
    offsets = np.array([0, 2, 3, 5])  # r0 = tokens 0,1; r1 = token 2; r2 = tokens 3,4
    load = routing_to_load(experts, offsets, batch=2, num_experts=3)
    # step0: r0t0 (e0), r1t0 (e2); step1: r0t1 (e1), r2t0 (e1); step2: r2t1 (e0)
    np.testing.assert_array_equal(load[:, 0], [[1, 0, 1], [0, 2, 0], [1, 0, 0]])


def test_conservation_on_real_routing(shared_data):
    path = shared_data / "gpt_oss_20b" / "gptoss20b_decode_routing_tokens.npz"
    trace = convert_routing_file(path, batch=32, order="file", drop_repetitive=False)
    with np.load(path) as d:
        tokens, layers, top_k = d["experts"].shape
    assert trace.load.shape[1:] == (layers, 32)
    # Every token's top-k choices land in exactly one step of every layer.
    assert (trace.load.sum(axis=(0, 2)) == tokens * top_k).all()
    # At most `batch` tokens decode per step.
    assert trace.load[:, 0].sum(-1).max() <= 32 * top_k
    assert trace.meta["requests"] == 703


def test_round_trip(tmp_path):
    load = np.arange(24).reshape(2, 3, 4)
    save_trace(tmp_path / "t.npz", load, meta={"k": 1})
    t = load_trace(tmp_path / "t.npz")
    np.testing.assert_array_equal(t.load, load)
    assert t.load.dtype == np.int64 and t.steps.tolist() == [0, 1] and t.meta == {"k": 1}


def _write(tmp_path, **arrays):
    p = tmp_path / "bad.npz"
    np.savez(p, **arrays)
    return p


@pytest.mark.parametrize("arrays,match", [
    ({"x": np.zeros(3)}, "no 'load' key"),
    ({"experts": np.zeros((2, 1, 1)), "request_offsets": np.array([0, 2])}, "convert-trace"),
    ({"load": np.zeros((2, 3))}, r"\[steps, layers, experts\]"),
    ({"load": -np.ones((1, 2, 2))}, "negative load -1"),
    ({"load": np.full((1, 2, 2), np.nan)}, "NaN"),
    ({"load": np.full((1, 2, 2), 0.5)}, "fractional"),
    ({"load": np.zeros((2, 2, 2)), "steps": np.zeros(3)}, "'steps' shape"),
])
def test_malformed_traces(tmp_path, arrays, match):
    with pytest.raises(TraceError, match=match):
        load_trace(_write(tmp_path, **arrays))


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(TraceError, match="does not exist"):
        load_trace(tmp_path / "nope.npz")
    bad = tmp_path / "corrupt.npz"
    bad.write_bytes(b"PK\x03\x04garbage" * 10)
    with pytest.raises(TraceError, match="cannot read trace"):
        load_trace(bad)
    pickled = tmp_path / "obj.npz"
    np.savez(pickled, load=np.array([{"a": 1}], dtype=object))
    with pytest.raises(TraceError, match="cannot read"):
        load_trace(pickled)
