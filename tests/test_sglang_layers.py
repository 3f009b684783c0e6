"""SGLang files' layer axis: SGLang has a row per decoder layer (dense layers included), eplbd a row per MoE
layer. A DeepSeek-V3-shaped placement and load (61 layers, the first 3 dense, 256 experts, 288 slots) round-trip
exactly through ``convert-placement`` / ``convert-load`` in both formats; other shapes are refused, typed."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from daemon_helpers import E, G, L, P, DaemonThread, make_ranks
from eplbd import cli
from eplbd.client import ctl
from eplbd.errors import InvalidArgumentError, PlacementError, TraceError
from eplbd.integrations.sglang import LayerAxis, write_load, write_placement
from eplbd.daemon.plans import read_placement_file, write_placement_file
from eplbd.policy import initial_placement
from eplbd.offline.trace import load_trace, save_trace

DSV3 = {"model_type": "deepseek_v3", "architectures": ["DeepseekV3ForCausalLM"], "num_hidden_layers": 61,
        "first_k_dense_replace": 3, "moe_layer_freq": 1, "n_routed_experts": 256, "n_group": 8}
DSV3_LAYERS, DSV3_EXPERTS, DSV3_SLOTS, DSV3_GPUS = 61, 256, 288, 32
MOE = list(range(3, 61))


def _dsv3_placement() -> torch.Tensor:
    """[58, 288]: each layer a different permutation of a valid placement, so a shifted row shows."""
    base = initial_placement(len(MOE), DSV3_EXPERTS, DSV3_SLOTS, DSV3_GPUS, "round_robin")
    gen = torch.Generator().manual_seed(0)
    return torch.stack([row[torch.randperm(DSV3_SLOTS, generator=gen)] for row in base])


def _dsv3_load(steps: int = 4) -> np.ndarray:
    return np.random.default_rng(0).integers(1, 100, size=(steps, len(MOE), DSV3_EXPERTS)).astype(np.int64)


def _read_sglang(path) -> tuple[list[str], torch.Tensor]:
    doc = torch.load(path, weights_only=True) if path.suffix == ".pt" else json.loads(path.read_text())
    return list(doc), torch.as_tensor(next(iter(doc.values())))


@pytest.fixture
def dsv3_config(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(DSV3))
    return str(path)


@pytest.fixture(params=["moe-layers", "model-config"])
def layer_flags(request, dsv3_config) -> list[str]:
    """The two ways to name DeepSeek-V3's MoE layers."""
    return ["--moe-layers", "3-60"] if request.param == "moe-layers" else ["--model-config", dsv3_config]


# --- where the MoE layers come from -------------------------------------------------------------------------
@pytest.mark.parametrize("config,moe", [
    (DSV3, MOE),
    ({"model_type": "deepseek_v2", "num_hidden_layers": 27, "first_k_dense_replace": 1, "moe_layer_freq": 1,
      "n_routed_experts": 64}, list(range(1, 27))),
    ({"model_type": "deepseek_v2", "num_hidden_layers": 8, "first_k_dense_replace": 1, "moe_layer_freq": 2,
      "n_routed_experts": 64}, [2, 4, 6]),
    ({"model_type": "glm4_moe", "num_hidden_layers": 46, "first_k_dense_replace": 1, "n_routed_experts": 128},
     list(range(1, 46))),
    ({"model_type": "qwen3_moe", "num_hidden_layers": 48, "decoder_sparse_step": 1, "mlp_only_layers": [],
      "num_experts": 128}, list(range(48))),
    ({"model_type": "qwen2_moe", "num_hidden_layers": 8, "decoder_sparse_step": 2, "mlp_only_layers": [3],
      "num_experts": 60}, [1, 5, 7]),
    ({"model_type": "mixtral", "num_hidden_layers": 32, "num_local_experts": 8}, list(range(32))),
    ({"model_type": "gpt_oss", "num_hidden_layers": 24, "num_local_experts": 32}, list(range(24))),
    ({"model_type": "glm4v_moe", "text_config": {"model_type": "glm4v_moe_text", "num_hidden_layers": 46,
                                                 "first_k_dense_replace": 1, "n_routed_experts": 128}},
     list(range(1, 46))),
])
def test_moe_layers_from_model_config(tmp_path, config, moe):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    axis = LayerAxis.from_model_config(path)
    assert list(axis.moe_layers) == moe
    assert axis.num_hidden_layers == (config.get("text_config") or config)["num_hidden_layers"]
    assert str(path) in axis.source


@pytest.mark.parametrize("config,match", [
    ({"model_type": "llama4_text", "num_hidden_layers": 48, "interleave_moe_layer_step": 2, "num_local_experts": 16},
     r"cannot tell the MoE layers of model config .* \(model_type 'llama4_text'\).* pass --moe-layers"),
    ({**DSV3, "n_routed_experts": None}, "has no routed experts"),
    ({"model_type": "qwen3_moe", "num_hidden_layers": 4, "decoder_sparse_step": 1, "num_experts": 0}, "no experts"),
    ({**DSV3, "num_hidden_layers": "61"}, r"'num_hidden_layers' must be an integer >= 1, got '61'"),
    ({**DSV3, "moe_layer_freq": 0}, r"'moe_layer_freq' must be an integer >= 1, got 0"),
    ({**DSV3, "decoder_sparse_step": 1}, "both DeepSeek-style"),
    ({"model_type": "qwen2_moe", "num_hidden_layers": 4, "mlp_only_layers": "3", "num_experts": 8},
     "'mlp_only_layers' must be a list"),
    ([1, 2], "is not a JSON object"),
])
def test_model_config_without_readable_moe_layers_is_refused(tmp_path, config, match):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    with pytest.raises(InvalidArgumentError, match=match) as info:
        LayerAxis.from_model_config(path)
    assert str(path) in str(info.value)


def test_model_config_file_errors(tmp_path):
    with pytest.raises(InvalidArgumentError, match="does not exist"):
        LayerAxis.from_model_config(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{num_hidden_layers")
    with pytest.raises(InvalidArgumentError, match="is not valid JSON"):
        LayerAxis.from_model_config(tmp_path / "bad.json")


def test_moe_layer_specs():
    assert LayerAxis.from_spec("3-60") == LayerAxis(61, tuple(MOE), "--moe-layers 3-60")
    axis = LayerAxis.from_spec("0, 2,4-7", 10)
    assert axis.moe_layers == (0, 2, 4, 5, 6, 7) and axis.describe() == "6 MoE layers (0,2,4-7) of 10"
    for spec, match in [("", "expected layer numbers"), ("3-", "expected"), ("-1", "expected"),
                        ("5-3", "expected"), ("a", "expected"), ("1,1-2", "names a layer twice")]:
        with pytest.raises(InvalidArgumentError, match=match):
            LayerAxis.from_spec(spec)
    with pytest.raises(InvalidArgumentError, match="within the 60 decoder layers"):
        LayerAxis.from_spec("3-60", 60)
    with pytest.raises(InvalidArgumentError, match="not both"):
        LayerAxis.from_flags("3-60", "config.json")
    with pytest.raises(InvalidArgumentError, match="goes with --moe-layers"):
        LayerAxis.from_flags(None, None, 61)
    assert LayerAxis.from_flags(None, None) is None


# --- DeepSeek-V3-shaped round trips -------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".json", ".pt"])
def test_dsv3_placement_round_trips_exactly(tmp_path, capsys, layer_flags, suffix):
    layers = layer_flags
    ours = _dsv3_placement()
    write_placement_file(tmp_path / "ours.json", ours)

    # eplbd -> SGLang: a row per decoder layer, the 3 dense ones what SGLang's init_trivial puts there.
    assert cli.main(["convert-placement", str(tmp_path / "ours.json"), "-o", str(tmp_path / f"s{suffix}"),
                     "--format", "sglang", *layers]) == 0
    assert "sglang placement, 61 layers x 288 slots (58 MoE layers (3-60) of 61)" in capsys.readouterr().out
    keys, sglang = _read_sglang(tmp_path / f"s{suffix}")
    assert keys == ["physical_to_logical_map"] and list(sglang.shape) == [DSV3_LAYERS, DSV3_SLOTS]
    trivial = torch.arange(DSV3_SLOTS) % DSV3_EXPERTS
    assert all(torch.equal(sglang[i], trivial) for i in range(3))
    assert torch.equal(sglang[3:], ours)  # absolute layer l is eplbd's MoE layer l - 3

    # SGLang -> eplbd: exactly the MoE rows back.
    assert cli.main(["convert-placement", str(tmp_path / f"s{suffix}"), "-o", str(tmp_path / "back.json"),
                     *layers]) == 0
    assert json.loads((tmp_path / "back.json").read_text()) == {"phy2log": ours.tolist()}

    # SGLang -> eplbd -> SGLang: the same file content.
    assert cli.main(["convert-placement", str(tmp_path / "back.json"), "-o", str(tmp_path / f"s2{suffix}"),
                     "--format", "sglang", *layers]) == 0
    assert torch.equal(_read_sglang(tmp_path / f"s2{suffix}")[1], sglang)
    if suffix == ".json":
        assert (tmp_path / "s2.json").read_text() == (tmp_path / "s.json").read_text()

    # A file that already has a row per decoder layer passes through; without a flag rows stay as they are.
    assert cli.main(["convert-placement", str(tmp_path / f"s{suffix}"), "-o", str(tmp_path / "s3.pt"), *layers]) == 0
    assert torch.equal(_read_sglang(tmp_path / "s3.pt")[1], sglang)
    assert tuple(read_placement_file(tmp_path / f"s{suffix}").shape) == (DSV3_LAYERS, DSV3_SLOTS)


@pytest.mark.parametrize("suffix", [".json", ".pt"])
def test_dsv3_load_round_trips_exactly(tmp_path, capsys, layer_flags, suffix):
    layers = layer_flags
    load = _dsv3_load()
    save_trace(tmp_path / "t.npz", load)
    assert cli.main(["convert-load", str(tmp_path / "t.npz"), "-o", str(tmp_path / f"c{suffix}"), *layers]) == 0
    assert "sglang load, 4 steps x 61 layers x 256 experts (58 MoE layers (3-60) of 61)" in capsys.readouterr().out
    keys, count = _read_sglang(tmp_path / f"c{suffix}")
    assert keys == ["logical_count"] and list(count.shape) == [4, DSV3_LAYERS, DSV3_EXPERTS]
    assert not count[:, :3].any() and np.array_equal(count[:, 3:].numpy(), load)  # dense layers: no tokens

    assert cli.main(["convert-load", str(tmp_path / f"c{suffix}"), "-o", str(tmp_path / "back.npz"), *layers]) == 0
    np.testing.assert_array_equal(load_trace(tmp_path / "back.npz").load, load)
    assert cli.main(["convert-load", str(tmp_path / "back.npz"), "-o", str(tmp_path / f"c2{suffix}"), *layers]) == 0
    assert torch.equal(_read_sglang(tmp_path / f"c2{suffix}")[1], count)


def test_dsv3_recorder_dump_reads_as_moe_layers(tmp_path, capsys):
    """A stat-mode dump as SGLang's recorder writes it: extra keys, int32, one row per decoder layer."""
    load = _dsv3_load()
    full = np.zeros((4, DSV3_LAYERS, DSV3_EXPERTS), np.int32)
    full[:, 3:] = load
    torch.save({"rank": 0, "logical_count": torch.from_numpy(full), "average_utilization_rate_over_window": None},
               tmp_path / "expert_distribution_recorder_1.pt")
    assert cli.main(["convert-load", str(tmp_path / "expert_distribution_recorder_1.pt"), "-o",
                     str(tmp_path / "t.npz"), "--moe-layers", "3-60"]) == 0
    np.testing.assert_array_equal(load_trace(tmp_path / "t.npz").load, load)
    # Without the flag the rows stay decoder layers (today's behaviour), with a note naming the empty ones.
    assert cli.main(["convert-load", str(tmp_path / "expert_distribution_recorder_1.pt"), "-o",
                     str(tmp_path / "t61.npz")]) == 0
    assert load_trace(tmp_path / "t61.npz").load.shape == (4, DSV3_LAYERS, DSV3_EXPERTS)
    err = capsys.readouterr().err
    assert "layer rows [0, 1, 2] hold no tokens" in err and "--moe-layers 3-60" in err


# --- refusals -----------------------------------------------------------------------------------------------
def test_shapes_that_match_neither_are_refused(tmp_path, capsys):
    axis = LayerAxis.from_spec("3-60")
    expected = r"58 MoE layers \(3-60\) of 61, so rows must be 58 \(MoE layers only\) or 61"
    for rows in (57, 60, 62):
        with pytest.raises(PlacementError, match=rf"shape \[{rows}, 288\] has {rows} layer rows.*{expected}"):
            axis.moe_placement(torch.zeros(rows, DSV3_SLOTS, dtype=torch.int64))
        with pytest.raises(PlacementError, match=rf"shape \[{rows}, 288\]"):
            axis.pad_placement(torch.zeros(rows, DSV3_SLOTS, dtype=torch.int64))
        with pytest.raises(TraceError, match=rf"shape \[2, {rows}, 256\] has {rows} layer rows.*{expected}"):
            axis.moe_load(np.zeros((2, rows, DSV3_EXPERTS), np.int64))
        with pytest.raises(TraceError, match=rf"shape \[2, {rows}, 256\]"):
            axis.pad_load(np.zeros((2, rows, DSV3_EXPERTS), np.int64))
    with pytest.raises(PlacementError, match=r"shape \[60, 288\]"):
        write_placement(tmp_path / "x.pt", torch.zeros(60, DSV3_SLOTS, dtype=torch.int64), axis)
    assert not (tmp_path / "x.pt").exists()

    # Through the CLI: exit 1, the typed error's message naming the file and the shape.
    write_placement(tmp_path / "p60.json", torch.cat([_dsv3_placement(), _dsv3_placement()[:2]]))
    assert cli.main(["convert-placement", str(tmp_path / "p60.json"), "-o", str(tmp_path / "o.json"),
                     "--moe-layers", "3-60"]) == 1
    err = capsys.readouterr().err
    assert "p60.json" in err and "shape [60, 288]" in err and "rows must be 58" in err
    write_load(tmp_path / "l59.pt", np.ones((2, 59, DSV3_EXPERTS), np.int64))
    assert cli.main(["convert-load", str(tmp_path / "l59.pt"), "-o", str(tmp_path / "o.npz"),
                     "--moe-layers", "3-60"]) == 1
    assert "shape [2, 59, 256]" in capsys.readouterr().err
    assert not (tmp_path / "o.json").exists() and not (tmp_path / "o.npz").exists()


def test_a_dense_row_with_tokens_means_the_layer_ids_are_wrong():
    full = np.zeros((2, DSV3_LAYERS, DSV3_EXPERTS), np.int64)
    full[:, 3:] = 1
    full[1, 1, 7] = 5
    with pytest.raises(TraceError, match="layer 1 holds 5 tokens, but --moe-layers 3-60 makes it a dense layer"):
        LayerAxis.from_spec("3-60").moe_load(full, where="rec.pt")


def test_cli_layer_flag_errors(tmp_path, capsys, dsv3_config):
    write_placement_file(tmp_path / "p.json", _dsv3_placement())
    out = str(tmp_path / "o.pt")
    assert cli.main(["convert-placement", str(tmp_path / "p.json"), "-o", out, "--num-hidden-layers", "61"]) == 1
    assert "--num-hidden-layers goes with --moe-layers" in capsys.readouterr().err
    assert cli.main(["convert-placement", str(tmp_path / "p.json"), "-o", out, "--moe-layers", "x"]) == 1
    assert "--moe-layers 'x'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:  # argparse: one or the other
        cli.main(["convert-placement", str(tmp_path / "p.json"), "-o", out, "--moe-layers", "3-60",
                  "--model-config", dsv3_config])
    assert info.value.code == 2
    assert not os.path.exists(out)


# --- replay and load-placement ------------------------------------------------------------------------------
def test_trailing_dense_layers_need_num_hidden_layers():
    axis = LayerAxis.from_spec("1,3", 5)
    p = initial_placement(2, E, P, G, "linear")
    padded = axis.pad_placement(p)
    assert padded.shape == (5, P) and torch.equal(padded[[1, 3]], p)
    assert torch.equal(axis.moe_placement(padded), p)


def test_replay_takes_the_moe_layers(tmp_path, capsys):
    full = np.zeros((200, L + 2, E), np.int64)
    full[:, 2:] = np.random.default_rng(1).integers(0, 50, size=(200, L, E))
    full[:, 2:, :2] *= 10
    write_load(tmp_path / "count.pt", full)
    args = ["replay", str(tmp_path / "count.pt"), "--num-gpus", str(G), "--num-redundant", str(P - E),
            "--window-size", "50", "--step-interval", "100", "--json"]
    assert cli.main([*args, "--moe-layers", f"2-{L + 1}"]) == 0
    captured = capsys.readouterr()
    doc = json.loads(captured.out)
    assert doc["num_layers"] == L and doc["rebalances"] >= 1 and "hold no tokens" not in captured.err
    assert cli.main(args) == 0  # without: the dense rows count as idle MoE layers, and a note says so
    captured = capsys.readouterr()
    assert json.loads(captured.out)["num_layers"] == L + 2 and "layer rows [0, 1] hold no tokens" in captured.err


def test_load_placement_takes_the_moe_layers(tmp_path, capsys):
    ours = initial_placement(L, E, P, G, "round_robin")
    ours[1] = ours[1].flip(0)
    axis = LayerAxis.from_spec(f"2-{L + 1}")
    write_placement(tmp_path / "s.pt", ours, axis)  # [L + 2, P], as SGLang has it
    with DaemonThread() as d:
        links, _ = make_ranks(d)
        try:
            base = ["--endpoint", d.rpc, "--json", "load-placement", str(tmp_path / "s.pt"), "--dry-run"]
            assert ctl.main([*base, "--moe-layers", f"2-{L + 1}"]) == 0
            doc = json.loads(capsys.readouterr().out)
            assert doc["phy2log"] == ours.tolist() and doc["layers"] == list(range(L))
            assert sorted(os.listdir(tmp_path)) == ["s.pt"]  # nothing written: the daemon reads the file
            # Without the flag the daemon sees L + 2 rows and says so; a wrong flag is refused here.
            assert ctl.main(base) == 1
            assert f"shape [{L + 2}, {P}]" in capsys.readouterr().err
            assert ctl.main([*base, "--moe-layers", f"{L}-{2 * L - 1}"]) == 1  # L of 2L layers
            err = capsys.readouterr().err
            assert "placement_error" in err and f"shape [{L + 2}, {P}]" in err
            assert ctl.main([*base, "--num-hidden-layers", "5"]) == 1
            assert "--num-hidden-layers goes with --moe-layers" in capsys.readouterr().err
        finally:
            for link in links:
                link.close()


def test_load_placement_sends_the_layer_ids_and_reads_nothing_here(tmp_path):
    """A daemon on another host reads PATH itself: eplbctl only resolves the MoE layer ids (from the flag or
    the model's config.json, which is read here) and sends them with the request."""
    calls = []

    class RemoteDaemon:
        def load_placement(self, path, **kw):
            calls.append((path, kw))

    args = ctl.build_parser().parse_args(["load-placement", "/remote/s.pt", "--moe-layers", f"2-{L + 1}",
                                          "--dry-run"])
    ctl.do_load_placement(RemoteDaemon(), args)
    assert calls == [("/remote/s.pt", {"dry_run": True, "moe_layers": list(range(2, L + 2)),
                                       "num_hidden_layers": L + 2})]
