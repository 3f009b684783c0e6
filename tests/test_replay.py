import json
import subprocess
import sys

import numpy as np
import pytest

from eplbd.config import EplbConfig
from eplbd.policy import initial_placement
from eplbd.offline.replay import replay, step_balancedness
from eplbd.daemon.scheduler import Topology
from eplbd.offline.trace import Trace, save_trace


def test_step_balancedness_by_hand():
    # 1 layer, 4 logical, 6 slots on 2 GPUs: rank0 = e0,e1,e0 ; rank1 = e2,e3,e3
    phy2log = np.array([[0, 1, 0, 2, 3, 3]])
    load = np.array([[[10, 2, 4, 6]]], np.int64)
    # rank0: 5 + 2 + 5 = 12 ; rank1: 4 + 3 + 3 = 10 -> 11 / 12
    np.testing.assert_allclose(step_balancedness(load, phy2log, 2), [[11 / 12]])
    assert step_balancedness(np.zeros((1, 1, 4), np.int64), phy2log, 2)[0, 0] == 1.0


def synthetic(steps=400, layers=2, experts=8, seed=0):
    rng = np.random.default_rng(seed)
    p = np.array([0.4, 0.2, 0.1, 0.1, 0.05, 0.05, 0.05, 0.05])
    return Trace(rng.multinomial(256, p, size=(steps, layers)).astype(np.int64),
                 np.arange(steps), {})


def test_rebalancing_beats_static_and_counts_plans():
    trace = synthetic()
    topo = Topology(num_layers=2, num_logical=8, num_physical=12, num_gpus=4)
    cfg = EplbConfig(window_size=50, step_interval=100, num_redundant_experts=4, min_gain=0.0)
    r = replay(trace, topo, cfg)
    assert r.rebalances + r.skipped == 4  # steps 99, 199, 299, 399
    assert r.rebalances >= 1
    assert r.mean_balancedness > r.mean_balancedness_static + 0.1
    init = initial_placement(2, 8, 12, 4, "linear").numpy()
    assert r.mean_balancedness_static == pytest.approx(step_balancedness(trace.load, init, 4).mean())
    assert r.total_slots == 24 and 0 < r.moved_slots <= 24 * r.rebalances


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="experts=8"):
        replay(synthetic(), Topology(2, 16, 16, 4), EplbConfig())


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "eplbd.cli", *args], capture_output=True, text=True,
                          timeout=120)


def test_cli_json_on_a_trace_file(tmp_path):
    path = tmp_path / "t.npz"
    save_trace(path, synthetic().load)
    out = run_cli("replay", str(path), "--num-gpus", "4", "--num-redundant", "4", "--window-size", "50",
                  "--step-interval", "100", "--json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    for key in ("mean_balancedness_static", "mean_balancedness", "rebalances", "moved_slots", "total_slots"):
        assert key in doc
    assert doc["mean_balancedness"] > doc["mean_balancedness_static"]


def test_cli_on_real_gpt_oss_routing(shared_data):
    path = shared_data / "gpt_oss_20b" / "gptoss20b_decode_routing_tokens.npz"
    out = run_cli("replay", str(path), "--num-gpus", "8", "--num-redundant", "8", "--window-size", "200",
                  "--step-interval", "500", "--batch", "128", "--json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["num_layers"] == 24 and doc["num_logical"] == 32 and doc["rebalances"] >= 1
    assert doc["mean_balancedness"] > doc["mean_balancedness_static"]


@pytest.mark.parametrize("extra,code,words", [
    (["--num-gpus", "3"], 1, "does not divide"),
    (["--num-gpus", "4", "--policy", "nosuch"], 1, "nosuch"),
    (["--num-gpus", "4", "--window-size", "0"], 1, "window_size=0"),
    (["--num-gpu", "4"], 2, "usage"),
])
def test_cli_errors(tmp_path, extra, code, words):
    path = tmp_path / "t.npz"
    save_trace(path, synthetic(steps=10).load)
    out = run_cli("replay", str(path), *extra)
    assert out.returncode == code and words in out.stderr, out.stderr


def test_cli_malformed_trace(tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, load=-np.ones((2, 2, 2)))
    out = run_cli("replay", str(bad), "--num-gpus", "2")
    assert out.returncode == 1 and "negative load" in out.stderr


def test_convert_then_replay(shared_data, tmp_path):
    out = run_cli("convert-trace", str(shared_data / "gpt_oss_20b" / "gptoss20b_decode_routing_tokens.npz"),
                  "-o", str(tmp_path / "g.npz"), "--batch", "256")
    assert out.returncode == 0, out.stderr
    out = run_cli("replay", str(tmp_path / "g.npz"), "--num-gpus", "4", "--window-size", "100",
                  "--step-interval", "100")
    assert out.returncode == 0 and "default" in out.stdout


def test_cli_compares_policies_with_bytes_and_plot(tmp_path):
    path = tmp_path / "t.npz"
    save_trace(path, synthetic().load)
    png = tmp_path / "b.png"
    out = run_cli("replay", str(path), "--num-gpus", "4", "--num-redundant", "4", "--window-size", "50",
                  "--step-interval", "100", "--policy", "default,incremental", "--expert-bytes", "1000",
                  "--plot", str(png))
    assert out.returncode == 0, out.stderr
    assert "incremental vs default:" in out.stdout and "moved GB" in out.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = run_cli("replay", str(path), "--num-gpus", "4", "--num-redundant", "4", "--window-size", "50",
                  "--step-interval", "100", "--policy", "default,incremental", "--expert-bytes", "1000", "--json")
    docs = json.loads(out.stdout)["results"]
    assert [d["policy"] for d in docs] == ["default", "incremental"]
    for d in docs:
        assert d["moved_bytes"] == d["moved_slots"] * 1000 and d["policy_s_total"] >= 0
        assert all("reason" in x and "moved_bytes" in x for x in d["decisions"])


def test_plot_has_one_line_per_policy(tmp_path):
    from PIL import Image

    from eplbd.offline.replay import plot_balancedness

    trace = synthetic()
    topo = Topology(num_layers=2, num_logical=8, num_physical=12, num_gpus=4)
    cfg = EplbConfig(window_size=50, step_interval=100, num_redundant_experts=4, min_gain=0.0)
    results = [replay(trace, topo, cfg, policy=p) for p in ("default", "incremental")]
    assert results[0].per_step.shape == (400,)
    labels = plot_balancedness(results, str(tmp_path / "p.png"))
    assert [label.split(" ")[0] for label in labels] == ["default", "incremental", "static"]
    with Image.open(tmp_path / "p.png") as img:
        assert img.format == "PNG" and img.size[0] > 100 and img.size[1] > 100
