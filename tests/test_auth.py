"""CURVE on both daemon sockets: worker and operator keys, what each may do, and what an unknown key gets
(nothing). Real daemons on loopback, real CURVE handshakes judged by the daemon's ZAP handler."""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import shutil
import stat
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import zmq

from daemon_helpers import E, G, L, P, DaemonThread, wait_for
from eplbd import errors
from eplbd.daemon.auth import ROLE_REQUESTS, WORKER, is_loopback, keygen, load_curve
from eplbd.cli import main as eplbd_main
from eplbd.client.ctl import main as eplbctl_main
from eplbd.client.rpc import EplbClient
from eplbd.client.worker import WorkerLink
from eplbd.policy import initial_placement
from eplbd.proto import (OPERATOR_REQUEST_TYPES, CurveKeys, Heartbeat, LoadPlacementRequest, PauseRequest,
                         RebalanceRequest, SetConfigRequest, StatusRequest)
from eplbd.proto.sockets import load_key_file
from eplbd.settings import load_settings

SHORT = 0.5  # seconds: how long an unknown key waits for what never comes


@dataclass
class Keys:
    dir: Path

    def client(self, name: str) -> CurveKeys:
        return CurveKeys.from_files(self.dir / "secret" / f"{name}.key_secret", self.dir / "secret" / "server.key")

    def settings(self) -> dict[str, str]:
        return {"curve_secret_key_file": str(self.dir / "secret" / "server.key_secret"),
                "curve_worker_keys_dir": str(self.dir / "workers"),
                "curve_operator_keys_dir": str(self.dir / "operators")}


@pytest.fixture
def keys(tmp_path) -> Keys:
    """A daemon key, worker keys w0..w3, an operator key, and a stranger's key that no directory holds."""
    secret = tmp_path / "secret"
    for name in ("server", "w0", "w1", "w2", "w3", "op", "stranger"):
        keygen(secret, name)
    for sub, names in (("workers", ("w0", "w1", "w2", "w3")), ("operators", ("op",))):
        (tmp_path / sub).mkdir()
        for name in names:
            shutil.copy(secret / f"{name}.key", tmp_path / sub)  # public keys only on the daemon's side
    return Keys(tmp_path)


def _register(d: DaemonThread, keys: Keys, timeout: float = 5.0) -> list[WorkerLink]:
    phy2log = initial_placement(L, E, P, G, "linear")
    links = [WorkerLink(d.rpc, d.ingest, r, timeout=timeout, curve=keys.client(f"w{r}")) for r in range(G)]
    for link in links:
        link.register(ep_size=G, num_layers=L, num_logical=E, num_physical=P, epoch=0, phy2log=phy2log)
    return links


def _report_all(links: list[WorkerLink], step: int) -> None:
    for link in links:
        assert link.send_report(step, torch.ones(1, L, P, dtype=torch.int64), 0)


def test_worker_key_registers_and_reports_and_the_report_is_counted(keys):
    with DaemonThread(**keys.settings()) as d:
        links = _register(d, keys)
        _report_all(links, 0)
        with EplbClient(d.rpc, timeout=5, curve=keys.client("op")) as op:
            assert wait_for(lambda: op.status().reports_received == G)
            s = op.status()
            assert s.reports_dropped == 0 and s.window_fill == 1 and len(s.workers) == G
        links[0].heartbeat(step=1, epoch=0)  # the rest of a worker's RPC surface works too
        for link in links:
            link.close()


def test_worker_key_cannot_change_the_placement_or_config(keys):
    with DaemonThread(**keys.settings()) as d:
        links = _register(d, keys)
        _report_all(links, 0)
        denied = [RebalanceRequest(force=True), LoadPlacementRequest(path="/tmp/p.json"),
                  SetConfigRequest(key="min_gain", value=0.5), PauseRequest(reason="x"), StatusRequest()]
        for msg in denied:
            with pytest.raises(errors.PermissionDeniedError, match=rf"worker key 'w0' may not send {type(msg).__name__}") as info:
                links[0].request(msg)
            assert info.value.code == 403
        # The same through the operator client holding a worker key.
        with EplbClient(d.rpc, timeout=5, curve=keys.client("w1")) as c:
            with pytest.raises(errors.PermissionDeniedError):
                c.rebalance(force=True)
        with EplbClient(d.rpc, timeout=5, curve=keys.client("op")) as op:
            s = op.status()
            assert not s.paused and s.current_plan is None and s.epoch == 0
            assert op.get_config().config["min_gain"] == 0.01
        for link in links:
            link.close()


def test_operator_key_can_rebalance_but_not_act_as_a_rank(keys):
    with DaemonThread(**keys.settings()) as d:
        links = _register(d, keys)
        for step in range(3):
            _report_all(links, step)
        with EplbClient(d.rpc, timeout=5, curve=keys.client("op")) as op:
            assert wait_for(lambda: op.status().window_fill == 3)
            reply = op.rebalance(force=True)
            assert reply.pushed and reply.epoch == 1
            assert op.status().current_plan.plan_id == reply.plan_id
            with pytest.raises(errors.PermissionDeniedError, match="operator key 'op' may not send Heartbeat"):
                op._call(Heartbeat(rank=0, worker_id=links[0].worker_id, step=9))
        for link in links:
            link.close()


def test_unknown_key_gets_nothing_through(keys):
    with DaemonThread(**keys.settings()) as d:
        links = _register(d, keys)
        with EplbClient(d.rpc, timeout=SHORT, curve=keys.client("stranger")) as c:
            for call in (c.status, c.hello, lambda: c.rebalance(force=True)):
                with pytest.raises(errors.UnavailableError):
                    call()
        stranger = WorkerLink(d.rpc, d.ingest, 0, timeout=SHORT, curve=keys.client("stranger"))
        with pytest.raises(errors.UnavailableError):
            stranger.heartbeat(step=1)
        assert not stranger.wait_ingest(SHORT)  # the handshake never completes: sends fail locally
        assert not stranger.send_report(0, torch.ones(1, L, P, dtype=torch.int64), 0)
        # An operator key is no worker key on the ingest socket.
        op_push = WorkerLink(d.rpc, d.ingest, 0, timeout=SHORT, curve=keys.client("op"))
        assert not op_push.wait_ingest(SHORT)
        with EplbClient(d.rpc, timeout=5, curve=keys.client("op")) as op:
            s = op.status()
            assert s.reports_received == 0 and s.window_fill == 0 and len(s.workers) == G
        assert d.daemon._auth.refusals >= 3
        for link in (*links, stranger, op_push):
            link.close()


def _agent_rank(rpc: str, ingest: str, init_file: str, steps: int, out) -> None:
    """One engine rank (a world of one) whose PlacementAgent finds its keys in $EPLBD_CURVE_*."""
    import torch.distributed as dist

    from eplbd.client.agent import PlacementAgent
    from eplbd.refengine.model import RefMoEConfig, RefMoEModel, make_inputs

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=0, world_size=1)
    try:
        cfg = RefMoEConfig(num_layers=2, hidden=16, ffn=32, num_logical=4, top_k=2, num_redundant=0, ep_size=1)
        phy2log = initial_placement(2, 4, 4, 1, "linear")
        agent = PlacementAgent(RefMoEModel(cfg, 0, dist.group.WORLD, phy2log), rank=0, ep_size=1, rpc=rpc,
                               ingest=ingest, phy2log=phy2log, communicator="torch_gloo", report_batch_steps=1)
        agent.start()
        for _ in range(1000):
            if agent.stats.registrations:
                break
            time.sleep(0.01)
        for step in range(steps):
            agent.model.forward(make_inputs(cfg, step, 0, 8))
            agent.after_step(step)
        agent.close()
        out.put(agent.stats.registrations)
    finally:
        dist.destroy_process_group()


def test_placement_agent_takes_its_keys_from_the_environment(keys, tmp_path, monkeypatch):
    monkeypatch.setenv("EPLBD_CURVE_CLIENT_KEY", str(keys.dir / "secret" / "w0.key_secret"))
    monkeypatch.setenv("EPLBD_CURVE_SERVER_KEY", str(keys.dir / "secret" / "server.key"))
    ctx = mp.get_context("spawn")  # the child inherits the environment set above
    with DaemonThread(**keys.settings()) as d:
        out = ctx.Queue()
        proc = ctx.Process(target=_agent_rank, args=(d.rpc, d.ingest, str(tmp_path / "gloo"), 6, out))
        proc.start()
        try:
            assert out.get(timeout=90) == 1
        finally:
            proc.join(30)
        assert proc.exitcode == 0
        with EplbClient(d.rpc, timeout=5, curve=keys.client("op")) as op:
            assert wait_for(lambda: op.status().reports_received >= 1)
            s = op.status()
            assert [w.rank for w in s.workers] == [0] and s.reports_dropped == 0


def test_client_without_keys_gets_nothing_from_a_curve_daemon(keys):
    with DaemonThread(**keys.settings()) as d:
        with EplbClient(d.rpc, timeout=SHORT) as c:
            with pytest.raises(errors.UnavailableError):
                c.status()
        plain = WorkerLink(d.rpc, d.ingest, 0, timeout=SHORT)
        assert not plain.wait_ingest(SHORT)  # a plaintext peer never completes the handshake
        assert not plain.send_report(0, torch.ones(1, L, P, dtype=torch.int64), 0)
        with EplbClient(d.rpc, timeout=5, curve=keys.client("op")) as op:
            assert op.status().reports_received == 0
        plain.close()


def test_eplbctl_with_curve_keys(keys, capsys, monkeypatch):
    with DaemonThread(**keys.settings()) as d:
        op = ["--curve-client-key", str(keys.dir / "secret" / "op.key_secret"),
              "--curve-server-key", str(keys.dir / "secret" / "server.key")]
        assert eplbctl_main(["--endpoint", d.rpc, *op, "status", "--json"]) == 0
        assert '"epoch":0' in capsys.readouterr().out
        worker = ["--curve-client-key", str(keys.dir / "secret" / "w0.key_secret"),
                  "--curve-server-key", str(keys.dir / "secret" / "server.key")]
        assert eplbctl_main(["--endpoint", d.rpc, *worker, "pause"]) == 1
        assert "permission_denied" in capsys.readouterr().err
        assert eplbctl_main(["--endpoint", d.rpc, "--timeout", str(SHORT), "status"]) == 3  # no key: no answer
        monkeypatch.setenv("EPLBD_CURVE_CLIENT_KEY", op[1])
        monkeypatch.setenv("EPLBD_CURVE_SERVER_KEY", op[3])
        assert eplbctl_main(["--endpoint", d.rpc, "status"]) == 0
        capsys.readouterr()
    monkeypatch.delenv("EPLBD_CURVE_SERVER_KEY")
    with pytest.raises(SystemExit) as info:
        eplbctl_main(["--endpoint", "tcp://127.0.0.1:1", "status"])
    assert info.value.code == 2 and "--curve-server-key" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        eplbctl_main(["--curve-client-key", op[3], "--curve-server-key", op[3], "status"])
    assert info.value.code == 2 and "holds no secret key" in capsys.readouterr().err


def test_keygen_writes_loadable_keys(tmp_path, capsys):
    assert eplbd_main(["keygen", str(tmp_path / "k"), "--name", "rank0"]) == 0
    assert "rank0.key_secret" in capsys.readouterr().out
    public, secret = tmp_path / "k" / "rank0.key", tmp_path / "k" / "rank0.key_secret"
    pub, sec = load_key_file(secret, secret=True)
    assert load_key_file(public, secret=False) == (pub, None) and len(pub) == len(sec) == 40
    assert zmq.curve_public(sec) == pub
    assert stat.S_IMODE(os.stat(secret).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "k").st_mode) == 0o700
    assert eplbd_main(["keygen", str(tmp_path / "k"), "--name", "rank0"]) == 1  # never overwrites
    assert "exists already" in capsys.readouterr().err
    with pytest.raises(errors.InvalidArgumentError, match="key name '../x'"):
        keygen(tmp_path, "../x")


def test_curve_settings_are_all_or_nothing(keys):
    s = keys.settings()
    with pytest.raises(errors.ConfigError, match="needs curve_operator_keys_dir"):
        load_settings(env={}, cli={k: v for k, v in s.items() if k != "curve_operator_keys_dir"})
    with pytest.raises(errors.ConfigError, match="curve_secret_key_file is not set: CURVE would be off"):
        load_settings(env={}, cli={"curve_worker_keys_dir": s["curve_worker_keys_dir"]})
    assert load_settings(env={}, cli=s).curve_enabled and not load_settings(env={}).curve_enabled


@pytest.mark.parametrize("change,needle", [
    (lambda k, s: s.update(curve_secret_key_file=str(k.dir / "nope.key_secret")),
     r"curve_secret_key_file=.*nope.key_secret.*No such file"),
    (lambda k, s: s.update(curve_secret_key_file=str(k.dir / "secret" / "server.key")), "holds no secret key"),
    (lambda k, s: s.update(curve_secret_key_file="/dev/zero"), "not a regular file"),
    (lambda k, s: s.update(curve_worker_keys_dir=str(k.dir / "none")), "curve_worker_keys_dir=.*no such directory"),
    (lambda k, s: (k.dir / "workers" / "bad.key").write_text("curve\n    public-key = \"short\"\n"),
     r"curve_worker_keys_dir=.*bad.key.*not a 40-character Z85"),
    (lambda k, s: shutil.copy(k.dir / "secret" / "w0.key", k.dir / "operators"), "both a worker key"),
])
def test_bad_curve_files_fail_the_start_naming_them(keys, change, needle):
    s = keys.settings()
    change(keys, s)
    with pytest.raises(errors.ConfigError, match=needle):
        load_curve(load_settings(env={}, cli=s))
    with pytest.raises(errors.ConfigError, match=needle):
        with DaemonThread(**s):
            pass


def test_roles_split_the_requests():
    assert set(ROLE_REQUESTS["operator"]) == set(OPERATOR_REQUEST_TYPES)
    assert not {RebalanceRequest, LoadPlacementRequest, SetConfigRequest, PauseRequest} & set(ROLE_REQUESTS[WORKER])


def test_non_loopback_bind_without_curve_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="eplbd.daemon.auth"):
        with DaemonThread(rpc="tcp://0.0.0.0:0"):
            pass
    warned = [r for r in caplog.records if r.name == "eplbd.daemon.auth" and r.levelno == logging.WARNING]
    assert len(warned) == 1 and "rpc=tcp://0.0.0.0:0 is not a loopback address and CURVE is off" in warned[0].message
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="eplbd.daemon.auth"):
        with DaemonThread():
            pass
    assert not [r for r in caplog.records if r.name == "eplbd.daemon.auth"]


@pytest.mark.parametrize("endpoint,local", [
    ("tcp://127.0.0.1:1", True), ("tcp://127.3.2.1:1", True), ("tcp://localhost:1", True), ("tcp://[::1]:1", True),
    ("ipc:///tmp/x", True), ("inproc://x", True), ("tcp://0.0.0.0:1", False), ("tcp://*:1", False),
    ("tcp://10.0.0.1:1", False), ("tcp://eth0:1", False), ("tcp://[::]:1", False), ("tcp://host.example:1", False),
])
def test_is_loopback(endpoint, local):
    assert is_loopback(endpoint) is local


# --- a worker key speaks for the ranks it registered (and, bound, only for its own) ----------------------------
def test_a_worker_key_cannot_report_for_a_rank_another_key_registered(keys):
    with DaemonThread(**keys.settings()) as d:
        links = _register(d, keys)
        # Key w1, knowing rank 0's worker id and even its session, reports as rank 0: dropped, counted.
        thief = WorkerLink(d.rpc, d.ingest, 0, timeout=5, curve=keys.client("w1"))
        thief.worker_id, thief.session = links[0].worker_id, d.state.workers[0].session
        assert thief.wait_ingest(5) and thief.send_report(0, torch.ones(1, L, P, dtype=torch.int64), 0)
        assert wait_for(lambda: d.state.counters.drop_reasons.get("wrong_key") == 1)
        assert d.state.window.fill == 0
        _report_all(links, 0)  # the ranks' own reports count
        assert wait_for(lambda: d.state.window.fill == 1 and d.state.counters.reports_received == G + 1)
        for link in (*links, thief):
            link.close()


def test_curve_worker_ranks_binds_each_key_to_its_ranks(keys, caplog):
    s = {**keys.settings(), "curve_worker_ranks": '{"w0": "0", "w1": "1", "w2": "2-3"}'}
    with DaemonThread(**s) as d:
        phy2log = initial_placement(L, E, P, G, "linear")
        reg = dict(ep_size=G, num_layers=L, num_logical=E, num_physical=P, epoch=0, phy2log=phy2log)
        stolen = WorkerLink(d.rpc, d.ingest, 0, timeout=5, curve=keys.client("w1"))
        with pytest.raises(errors.PermissionDeniedError, match=r"worker key 'w1' may not register rank 0: "
                                                               r"curve_worker_ranks binds it to ranks 1"):
            stolen.register(**reg)  # rank 0 is free, but not w1's
        unbound = WorkerLink(d.rpc, d.ingest, 3, timeout=5, curve=keys.client("w3"))
        with pytest.raises(errors.PermissionDeniedError, match="binds it to ranks none"):
            unbound.register(**reg)
        assert d.state.workers == {}
        links = [WorkerLink(d.rpc, d.ingest, r, timeout=5, curve=keys.client(k))
                 for r, k in enumerate(("w0", "w1", "w2", "w2"))]
        for link in links:
            link.register(**reg)
        assert sorted(d.state.workers) == list(range(G))
        assert d.state.counters.refused[("RegisterWorker", "key_not_bound")] == 2
        for link in (*links, stolen, unbound):
            link.close()
    assert "does not name worker key(s) ['w3']" in caplog.text


@pytest.mark.parametrize("mapping,needle", [
    ('{"nobody": "0"}', r"curve_worker_ranks names key 'nobody', but curve_worker_keys_dir=.* has no nobody.key"),
    ('{"w0": "0-1", "w1": "1"}', "binds rank 1 to both 'w0' and 'w1'"),
])
def test_bad_curve_worker_ranks_fail_the_start_naming_them(keys, mapping, needle):
    with pytest.raises(errors.ConfigError, match=needle):
        with DaemonThread(**keys.settings(), curve_worker_ranks=mapping):
            pass


def test_curve_worker_ranks_needs_curve():
    with pytest.raises(errors.ConfigError, match="curve_worker_ranks is set but curve_secret_key_file is not"):
        load_settings(env={}, cli={"curve_worker_ranks": '{"w0": "0"}'})
