"""``eplbd launch`` end to end: a real ``eplbd serve`` process and real torchrun ranks of the reference
model (gloo), wired only by EPLBD_* environment variables; plus the pure pieces (flags, precedence)."""

import argparse
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from eplbd.refengine.demo import DemoConfig
from eplbd.errors import ConfigError, InvalidArgumentError
from eplbd.refengine.launch import REFERENCE_DAEMON, LaunchConfig, config_from_args, daemon_settings, engine_env
from eplbd.refengine.rank import add_rank_arguments, daemon_wiring, main as refengine_main, rank_argv, rank_config

pytestmark = pytest.mark.timeout(180)

SMALL = ["--layers", "4", "--hidden", "16", "--ffn", "32", "--tokens-per-rank", "16", "--communicator", "torch_gloo",
         "--window-size", "32", "--step-interval", "40", "--commit-interval-steps", "4"]
EPLBD = [sys.executable, "-m", "eplbd.cli"]


def processes_mentioning(text: str) -> list[int]:
    """Pids of live processes whose command line contains ``text`` (our own unique tmp path)."""
    pids = []
    for d in pathlib.Path("/proc").iterdir():
        if d.name.isdigit() and d.name != str(os.getpid()):
            try:
                if text in (d / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(d.name))
            except OSError:
                pass
    return pids


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return pathlib.Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except (ProcessLookupError, FileNotFoundError):
        return False


def gone(pid: int, timeout: float = 30.0) -> bool:
    """Whether ``pid`` exits within ``timeout``. An exiting process drops its command line before it is a
    zombie (so ``wait_gone`` no longer sees it) while tearing down its memory: allow for that."""
    deadline = time.monotonic() + timeout
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not alive(pid)


def test_launch_runs_torchrun_ranks_that_commit_plans_and_stops_the_daemon(tmp_path):
    out = subprocess.run([*EPLBD, "launch", "--json", "--ranks", "2", "--steps", "200", *SMALL,
                          "--result-dir", str(tmp_path)], capture_output=True, text=True, timeout=170)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    s = res["summary"]
    assert res["ok"] and res["engine_rc"] == 0 and res["daemon_rc"] == 0, res
    assert s["plans_committed"] >= 1 and s["daemon_epoch"] == s["plans_committed"], s
    assert s["outputs_identical"] and s["placements_agree"] and s["probes"] >= 1, s
    assert s["experts_transferred"] > 0 and s["communicator"] == "torch_gloo"
    ranks = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in range(2)]
    assert all(r["stats"]["plans_committed"] == s["plans_committed"] and r["mismatches"] == 0 for r in ranks)
    log = (tmp_path / "eplbd.log").read_text()
    assert "rank 1 registered" in log and "eplbd stopped" in log  # the SIGTERM path, not a kill
    assert res["endpoints"]["rpc"].startswith("tcp://127.0.0.1:")
    assert not processes_mentioning(str(tmp_path))


ENGINE = """
import json, os, socket, sys, time
host, port = os.environ["EPLBD_RPC"].removeprefix("tcp://").rsplit(":", 1)
socket.create_connection((host, int(port)), timeout=20).close()  # the daemon listens there
keys = ("RANK", "WORLD_SIZE", "EPLBD_RPC", "EPLBD_INGEST", "EPLBD_COMMIT_INTERVAL_STEPS")
doc = {k: os.environ.get(k) for k in keys} | {"argv": sys.argv[1:]}
out = os.path.join(os.path.dirname(__file__), "seen-" + os.environ["RANK"] + ".json")
open(out + ".tmp", "w").write(json.dumps(doc))
os.replace(out + ".tmp", out)
time.sleep(600)  # an engine serving until it is told to stop
"""


def wait_gone(text: str, timeout: float = 60.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while (left := processes_mentioning(text)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "launcher-killed"])
def test_any_engine_gets_the_endpoints_and_a_stopped_launcher_leaves_nothing(tmp_path, sig):
    script = tmp_path / "engine.py"
    script.write_text(ENGINE)
    proc = subprocess.Popen([*EPLBD, "launch", "--ranks", "2", "--commit-interval-steps", "5", "--result-dir",
                             str(tmp_path), "--", str(script), "--port", "8000"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        header = proc.stdout.readline()  # eplbd (pid N) ready: rpc=... ingest=... metrics_port=...
        assert header.startswith("eplbd (pid "), header + proc.stdout.read()
        daemon_pid = int(header.split()[2].rstrip(")"))
        ready = dict(kv.split("=", 1) for kv in header.split() if "=" in kv)
        seen = [tmp_path / f"seen-{r}.json" for r in range(2)]
        deadline = time.monotonic() + 150
        while not all(f.exists() for f in seen):
            assert time.monotonic() < deadline and proc.poll() is None, proc.stdout.read()
            time.sleep(0.2)
        for r, f in enumerate(seen):
            doc = json.loads(f.read_text())
            assert doc["RANK"] == str(r) and doc["WORLD_SIZE"] == "2" and doc["argv"] == ["--port", "8000"]
            assert doc["EPLBD_RPC"] == ready["rpc"] and doc["EPLBD_INGEST"] == ready["ingest"]
            assert doc["EPLBD_COMMIT_INTERVAL_STEPS"] == "5"
        assert alive(daemon_pid) and len(processes_mentioning(str(script))) >= 3  # torchrun + 2 ranks
        os.kill(proc.pid, sig)  # SIGINT: a terminal's Ctrl-C; SIGKILL: the launcher gets no say
        rc = proc.wait(120)
        rest = proc.stdout.read()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.stdout.close()
    assert rc == (130 if sig == signal.SIGINT else -signal.SIGKILL), rest
    assert not wait_gone(str(tmp_path)), "left running"  # the daemon's command line has it too (its log)
    assert gone(daemon_pid)
    assert (tmp_path / "eplbd.log").read_text().rstrip().endswith("eplbd stopped")  # SIGTERM-ed, not killed


def test_a_daemon_that_cannot_start_is_reported_with_its_log(tmp_path):
    import socket

    from eplbd.errors import UnavailableError
    from eplbd.refengine.launch import launch

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        rpc = f"tcp://127.0.0.1:{taken.getsockname()[1]}"
        cfg = LaunchConfig(rank=DemoConfig(ranks=2, routing="router"), daemon_settings={"rpc": rpc},
                           result_dir=str(tmp_path))
        with pytest.raises(UnavailableError, match="did not become ready") as err:
            launch(cfg)
    assert "Address already in use" in str(err.value) and not processes_mentioning(str(tmp_path))


# -- pure pieces -----------------------------------------------------------------------------------
def _rank_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_rank_arguments(p)
    return p.parse_args(argv)


def test_rank_flags_round_trip():
    cfg = rank_config(_rank_args(["--steps", "7", "--layers", "3", "--routing", "router", "--blocking",
                                  "--check-weights", "--communicator", "torch_gloo"]), ranks=3, commit_interval_steps=6)
    assert (cfg.steps, cfg.layers, cfg.routing, cfg.use_async, cfg.check_weights) == (7, 3, "router", False, True)
    assert rank_config(_rank_args(rank_argv(cfg)), ranks=3, commit_interval_steps=6) == cfg
    assert rank_config(_rank_args([]), ranks=4, commit_interval_steps=8) == DemoConfig(ranks=4, commit_interval_steps=8)


def test_rank_wiring_precedence_flags_then_env_then_daemon_defaults():
    p = argparse.Namespace(rpc=None, ingest=None, commit_interval_steps=None)
    assert daemon_wiring(p, {}) == ("tcp://127.0.0.1:7450", "tcp://127.0.0.1:7451", 16)
    env = {"EPLBD_RPC": "tcp://h:1", "EPLBD_INGEST": "tcp://h:2", "EPLBD_COMMIT_INTERVAL_STEPS": "4"}
    assert daemon_wiring(p, env) == ("tcp://h:1", "tcp://h:2", 4)
    flags = argparse.Namespace(rpc="tcp://f:1", ingest=None, commit_interval_steps=9)
    assert daemon_wiring(flags, env) == ("tcp://f:1", "tcp://h:2", 9)
    with pytest.raises(InvalidArgumentError, match="'four'"):
        daemon_wiring(p, {"EPLBD_COMMIT_INTERVAL_STEPS": "four"})


def test_refengine_outside_torchrun_says_how_to_start_it():
    with pytest.raises(InvalidArgumentError, match="torchrun"):
        refengine_main(["--steps", "1"], env={})


def test_engine_env_carries_the_daemon_setting_names():
    env = engine_env("tcp://127.0.0.1:5", "tcp://127.0.0.1:6", 12)
    assert (env["EPLBD_RPC"], env["EPLBD_INGEST"], env["EPLBD_COMMIT_INTERVAL_STEPS"]) == \
        ("tcp://127.0.0.1:5", "tcp://127.0.0.1:6", "12")


def test_reference_defaults_fill_only_what_no_layer_sets(tmp_path):
    cfg = LaunchConfig(rank=DemoConfig())
    assert daemon_settings(cfg, {}) == REFERENCE_DAEMON
    toml = tmp_path / "d.toml"
    toml.write_text('step-interval = 500\nrpc = "tcp://127.0.0.1:7999"\n')
    got = daemon_settings(LaunchConfig(rank=DemoConfig(), config=str(toml), daemon_settings={"window_size": "7"}),
                          {"EPLBD_INGEST": "tcp://127.0.0.1:7998"})
    assert "step_interval" not in got and "rpc" not in got and "ingest" not in got  # the file's and env's stand
    assert got["window_size"] == "7" and got["commit_interval_steps"] == REFERENCE_DAEMON["commit_interval_steps"]
    with pytest.raises(ConfigError, match="window_size='-3'"):
        daemon_settings(LaunchConfig(rank=DemoConfig(), daemon_settings={"window_size": "-3"}), {})


def test_launch_flags_build_the_config():
    from eplbd.cli import build_parser
    args = build_parser().parse_args(["launch", "--ranks", "3", "--steps", "9", "--step-interval", "20", "--",
                                      "-m", "my.engine", "--x"])
    cfg = config_from_args(args)
    assert cfg.rank.ranks == 3 and cfg.rank.steps == 9 and cfg.daemon_settings == {"step_interval": "20"}
    assert cfg.engine == ["-m", "my.engine", "--x"]
