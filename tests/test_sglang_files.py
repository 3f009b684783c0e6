"""SGLang expert-location files: read as a placement or a trace, written back in SGLang's format,
used by the real CLI and daemon; every bad file gets a typed error naming what is wrong."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
import torch

from daemon_helpers import E, G, L, P, DaemonThread, make_ranks
from eplbd import cli
from eplbd.client.rpc import EplbClient
from eplbd.errors import PlacementError, TraceError
from eplbd.integrations.sglang import write_load, write_placement
from eplbd.daemon.plans import read_placement_file, write_placement_file
from eplbd.policy import initial_placement
from eplbd.offline.trace import load_trace, save_trace


def _placement() -> torch.Tensor:
    p = initial_placement(L, E, P, G, "round_robin")
    p[1] = p[1].flip(0)  # layers differ, so a transposed or repeated row would show
    return p


def _load(steps: int = 5) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 50, size=(steps, L, E)).astype(np.int64)


@pytest.mark.parametrize("suffix", [".json", ".pt"])
def test_placement_round_trip_in_sglang_format(tmp_path, suffix):
    phy2log = _placement()
    path = tmp_path / f"p{suffix}"
    write_placement(path, phy2log)
    assert torch.equal(read_placement_file(path), phy2log)
    # Exactly the one key SGLang's init_by_mapping(**data) accepts, with the [layers, slots] rows.
    doc = torch.load(path, weights_only=True) if suffix == ".pt" else json.loads(path.read_text())
    assert list(doc) == ["physical_to_logical_map"]
    assert torch.equal(torch.as_tensor(doc["physical_to_logical_map"]), phy2log)


def test_recorder_dump_reads_as_a_trace(tmp_path):
    """A file as SGLang's expert distribution recorder dumps it (stat mode): extra keys, None values."""
    load = _load()
    torch.save({"rank": 0, "logical_count": torch.from_numpy(load).to(torch.int32),
                "average_utilization_rate_over_window": None}, tmp_path / "rec.pt")
    trace = load_trace(tmp_path / "rec.pt")
    np.testing.assert_array_equal(trace.load, load)
    assert trace.load.dtype == np.int64 and trace.steps.tolist() == list(range(5))
    assert trace.meta["format"] == "sglang"
    # A [layers, experts] count (SGLang accepts it too) is one step.
    (tmp_path / "one.json").write_text(json.dumps({"logical_count": load[0].tolist()}))
    np.testing.assert_array_equal(load_trace(tmp_path / "one.json").load, load[:1])


@pytest.mark.parametrize("suffix", [".json", ".pt"])
def test_load_round_trip_in_sglang_format(tmp_path, suffix):
    load = _load()
    write_load(tmp_path / f"l{suffix}", load)
    np.testing.assert_array_equal(load_trace(tmp_path / f"l{suffix}").load, load)


def test_cli_converts_both_ways(tmp_path, capsys):
    phy2log, load = _placement(), _load()
    write_placement_file(tmp_path / "ours.json", phy2log)
    assert cli.main(["convert-placement", str(tmp_path / "ours.json"), "-o", str(tmp_path / "s.pt")]) == 0
    assert "sglang placement" in capsys.readouterr().out
    assert cli.main(["convert-placement", str(tmp_path / "s.pt"), "-o", str(tmp_path / "back.json")]) == 0
    assert json.loads((tmp_path / "back.json").read_text()) == {"phy2log": phy2log.tolist()}
    assert cli.main(["convert-placement", str(tmp_path / "s.pt"), "-o", str(tmp_path / "s.json"),
                     "--format", "sglang"]) == 0
    assert list(json.loads((tmp_path / "s.json").read_text())) == ["physical_to_logical_map"]

    save_trace(tmp_path / "t.npz", load, meta={"from": "test"})
    assert cli.main(["convert-load", str(tmp_path / "t.npz"), "-o", str(tmp_path / "count.json")]) == 0
    assert cli.main(["convert-load", str(tmp_path / "count.json"), "-o", str(tmp_path / "back.npz")]) == 0
    np.testing.assert_array_equal(load_trace(tmp_path / "back.npz").load, load)
    capsys.readouterr()
    # A suffix the chosen format cannot have is refused before anything is written.
    assert cli.main(["convert-load", str(tmp_path / "t.npz"), "-o", str(tmp_path / "x.npz"), "--format", "sglang"]) == 1
    assert cli.main(["convert-placement", str(tmp_path / "s.pt"), "-o", str(tmp_path / "x.yaml")]) == 1
    err = capsys.readouterr().err
    assert "writes .pt or .json files, not" in err and "pass --format" in err
    assert not (tmp_path / "x.npz").exists() and not (tmp_path / "x.yaml").exists()


def test_replay_runs_on_an_sglang_load_file(tmp_path, capsys):
    load = np.repeat(_load(), 40, axis=0)
    load[:, :, :2] *= 10  # two hot experts: rebalancing must help
    write_load(tmp_path / "count.pt", load)
    assert cli.main(["replay", str(tmp_path / "count.pt"), "--num-gpus", str(G), "--num-redundant", str(P - E),
                     "--window-size", "50", "--step-interval", "100", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["rebalances"] >= 1 and doc["mean_balancedness"] > doc["mean_balancedness_static"]


def test_daemon_loads_an_sglang_placement(tmp_path):
    new = _placement()
    write_placement(tmp_path / "p.pt", new)
    with DaemonThread() as d:
        links, _ = make_ranks(d)
        try:
            with EplbClient(d.rpc, timeout=5) as c:
                reply = c.load_placement(str(tmp_path / "p.pt"), dry_run=True)
                assert torch.equal(reply.phy2log, new) and reply.layers == list(range(L))
                with pytest.raises(PlacementError, match="holds a load"):
                    write_load(tmp_path / "count.pt", _load())
                    c.load_placement(str(tmp_path / "count.pt"), dry_run=True)
        finally:
            for link in links:
                link.close()


class _Evil:
    """Unpickling this would create a file: proves .pt files are never unpickled."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def _bad_files(tmp_path: pathlib.Path) -> dict[str, pathlib.Path]:
    files = {"ragged": {"physical_to_logical_map": [[0, 1], [0]]},
             "fraction": {"physical_to_logical_map": [[0, 1.5]]},
             "negative": {"physical_to_logical_map": [[0, -1]], "logical_count": [[[0, -3]]]},
             "flat": {"physical_to_logical_map": [0, 1]},
             "deep": {"logical_count": [[[[1]]]]},
             "nokey": {"weights": [1]},
             "count": {"logical_count": [[1, 2]]},
             "map": {"physical_to_logical_map": [[0, 1]]}}
    out = {}
    for name, doc in files.items():
        out[name] = tmp_path / f"{name}.json"
        out[name].write_text(json.dumps(doc))
    out["notjson"] = tmp_path / "notjson.json"
    out["notjson"].write_text("{physical_to_logical_map")
    out["pickle"] = tmp_path / "pickle.pt"
    torch.save({"physical_to_logical_map": _Evil(tmp_path / "pwned")}, out["pickle"])
    out["corrupt"] = tmp_path / "corrupt.pt"
    out["corrupt"].write_bytes(b"PK\x03\x04not a zip" * 4)
    out["missing"] = tmp_path / "missing.pt"
    return out


_P, _T = "placement", "load"


@pytest.mark.parametrize("kind,name,match", [
    (_P, "ragged", "not a rectangular array"), (_P, "fraction", "must hold integers, got float64"),
    (_P, "negative", r"holds -1 at index \[0, 1\]"),
    (_P, "flat", r"must be \[layers, num_physical\], got shape \[2\]"),
    (_P, "nokey", r"no 'phy2log' or 'physical_to_logical_map' key \(keys: \['weights'\]\)"),
    (_P, "count", "holds a load .*eplbd replay"), (_P, "notjson", "is not valid JSON"),
    (_P, "pickle", "weights_only=True"), (_P, "corrupt", "weights_only=True"), (_P, "missing", "does not exist"),
    (_T, "negative", r"holds -3 at index \[0, 0, 1\]"),
    (_T, "deep", r"must be \[layers, experts\] or .* \[1, 1, 1, 1\]"),
    (_T, "nokey", r"no 'logical_count' key \(found \['weights'\]\)"), (_T, "map", "holds a placement, not a load"),
    (_T, "notjson", "is not valid JSON"), (_T, "pickle", "weights_only=True"), (_T, "missing", "does not exist"),
])
def test_bad_files(tmp_path, kind, name, match):
    read, error = (read_placement_file, PlacementError) if kind == _P else (load_trace, TraceError)
    path = _bad_files(tmp_path)[name]
    with pytest.raises(error, match=match) as info:
        read(path)
    assert str(path) in str(info.value)
    assert not (tmp_path / "pwned").exists()
