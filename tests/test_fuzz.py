"""Bad input at a real daemon: thousands of random and mutated frames at both sockets, oversize
frames, and invalid config values.

The frame fuzz is seeded (``SEED``), so a failure replays exactly. What it checks:

* every request on the RPC socket gets exactly one reply, a typed ``ErrorReply`` that is never
  an ``InternalError`` (a bug) unless it is a normal reply of a read-only request;
* every frame set on the ingest socket is counted as received and dropped, with a reason that
  ``status`` and ``/metrics`` show;
* the daemon's state is unchanged afterwards: same window (its dump, bit for bit), epoch,
  placement, workers, config, balancedness; and the ranks' next real reports are still taken.
"""

from __future__ import annotations

import math
import random
import time
import typing
import urllib.request

import msgspec
import numpy as np
import pytest
import torch
import zmq
import zmq.utils.monitor
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon_helpers import E, G, L, P, DaemonThread, make_ranks, skewed_step_load, wait_for
from eplbd import errors
from eplbd.client.rpc import EplbClient
from eplbd.proto import (REPLY_TYPES, Abort, Ack, BalancednessRequest, Decoder, DumpWindowRequest, Encoder,
                         ErrorReply, GetConfigRequest, GetPlacementRequest, GetPlanRequest, Heartbeat, Hello,
                         LayerReady, LoadPlacementRequest, LoadReport, OkReply, RebalanceRequest, RegisterWorker,
                         SetConfigRequest, StatusRequest)
from eplbd.settings import FIELDS, DaemonSettings, load_settings
from eplbd.offline.trace import load_trace

SEED = 20_260_601
N_RANDOM_PER_SOCKET = 2500
RPC_WINDOW = 64  # requests in flight before their replies are read (bounded: the daemon never queues past HWM)
MAX_FRAME = 1 << 20
POLL_MS = 10_000

_NASTY = [None, True, -1, 0, 2**31, 2**63 - 1, -(2**63), 2**64 - 1, math.nan, math.inf, -math.inf, "", "x" * 3000,
          "\x00\udcff".encode("utf-8", "surrogatepass").decode("utf-8", "replace"), [], [1, [2, [3]]], {}, {"a": 1},
          b"\x00\xff", 1.5]
_INTS = [-1, 0, 1, 2, 3, L, P, G, 2**31, 2**63 - 1, -(2**63)]
# Strings a mutated field may take: none names a mutable setting or a real policy, so no mutation can
# turn a failing request into one that changes the daemon's state.
_STRS = ["", "x" * 3000, "../../etc/passwd", "/dev/zero", "\x00", "rpc", "operator", "worker", "é" * 10]
_DTYPES = ["int64", "int32", "uint8", "float32", "float64", "bfloat16", "bool", "complex64", "torch.int64", "", "x" * 99]


# --- frame generation -------------------------------------------------------------------------------------
def _header(message: dict, n_tensors: int = 1, version: int = 1) -> bytes:
    return msgspec.msgpack.encode([version, n_tensors, message])


def _ref(dtype: str, shape: list[int], frame: int = 1) -> list:
    return ["tensor", dtype, shape, frame]


def _report_doc(worker_id: str, rank: int, load_ref: list, **fields) -> dict:
    doc = {"type": "LoadReport", "rank": rank, "worker_id": worker_id, "epoch": 0, "first_step": 3, "seq": 0,
           "load": load_ref}
    doc.update(fields)
    return doc


class Mutator:
    """Random damage to a multipart message: bytes, frames and msgpack fields."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self._ops = [self.truncate, self.flip, self.insert, self.delete, self.drop_frame, self.dup_frame,
                     self.extra_frame, self.swap_frames, self.field, self.field, self.tensor_ref,
                     self.same_type, self.same_type, self.same_type, self.same_type]

    def bytes_(self, n: int) -> bytes:
        return self.rng.randbytes(n)

    def random_frames(self) -> list[bytes]:
        return [self.bytes_(self.rng.choice([0, 1, 2, 3, 7, 16, 64, 200])) for _ in range(self.rng.randint(1, 4))]

    def mutate(self, frames: list[bytes]) -> list[bytes]:
        out = list(frames)
        for _ in range(self.rng.choice((1, 1, 2, 3))):
            out = self.rng.choice(self._ops)(out) or [b""]
        return out

    def _pick(self, frames: list[bytes]) -> int:
        return self.rng.randrange(len(frames))

    def truncate(self, f: list[bytes]) -> list[bytes]:
        i = self._pick(f)
        f[i] = f[i][: self.rng.randint(0, max(len(f[i]) - 1, 0))]
        return f

    def flip(self, f: list[bytes]) -> list[bytes]:
        i = self._pick(f)
        b = bytearray(f[i])
        for _ in range(self.rng.randint(1, 8)):
            if b:
                b[self.rng.randrange(len(b))] = self.rng.randrange(256)
        f[i] = bytes(b)
        return f

    def insert(self, f: list[bytes]) -> list[bytes]:
        i = self._pick(f)
        at = self.rng.randint(0, len(f[i]))
        f[i] = f[i][:at] + self.bytes_(self.rng.randint(1, 9)) + f[i][at:]
        return f

    def delete(self, f: list[bytes]) -> list[bytes]:
        i = self._pick(f)
        at = self.rng.randint(0, len(f[i]))
        f[i] = f[i][:at] + f[i][at + self.rng.randint(1, 9):]
        return f

    def drop_frame(self, f: list[bytes]) -> list[bytes]:
        del f[self._pick(f)]
        return f

    def dup_frame(self, f: list[bytes]) -> list[bytes]:
        i = self._pick(f)
        return f[: i + 1] + [f[i]] + f[i + 1:]

    def extra_frame(self, f: list[bytes]) -> list[bytes]:
        return f + [self.bytes_(self.rng.choice([0, 8, 96]))]

    def swap_frames(self, f: list[bytes]) -> list[bytes]:
        i, j = self._pick(f), self._pick(f)
        f[i], f[j] = f[j], f[i]
        return f

    def _doc(self, f: list[bytes]) -> list | None:
        try:
            env = msgspec.msgpack.decode(f[0])
        except (msgspec.DecodeError, ValueError, RecursionError, IndexError):
            return None
        return env if isinstance(env, list) and len(env) == 3 and isinstance(env[2], dict) else None

    def field(self, f: list[bytes]) -> list[bytes]:
        """Rewrite one envelope or message field: a wrong version/count/tag, a missing field, a nasty value."""
        env = self._doc(f)
        if env is None:
            return self.flip(f)
        msg, r = env[2], self.rng.random()
        if r < 0.1:
            env[0] = self.rng.choice([0, 2, -1, 2**40])
        elif r < 0.2:
            env[1] = self.rng.choice([0, 2, 3, -1, 10**6])
        elif r < 0.35:
            msg["type"] = self.rng.choice(["", "Teleport", "StatusReply", "Plan", "Commit", "LoadReport", "Hello",
                                           "RegisterWorker", 7, None])
        elif r < 0.5 and msg:
            del msg[self.rng.choice(list(msg))]
        elif msg:
            msg[self.rng.choice(list(msg))] = self.rng.choice(_NASTY)
        f[0] = msgspec.msgpack.encode(env)
        return f

    def same_type(self, f: list[bytes]) -> list[bytes]:
        """Give one field another value of its type: past the decoder, into the handlers."""
        env = self._doc(f)
        fields = [k for k, v in (env[2].items() if env else ()) if k != "type" and v is not None
                  and not (isinstance(v, list) and v[:1] == ["tensor"])]
        if not fields:
            return self.field(f)
        key = self.rng.choice(fields)
        value = env[2][key]
        if isinstance(value, bool):
            value = not value
        elif isinstance(value, int):
            value = self.rng.choice(_INTS)
        elif isinstance(value, float):
            value = self.rng.choice([math.nan, math.inf, -1.0, 1e308])
        elif isinstance(value, str):
            value = self.rng.choice(_STRS)
        elif isinstance(value, list):
            value = [self.rng.choice(_INTS) for _ in range(self.rng.randint(0, 4))]
        env[2][key] = value
        f[0] = msgspec.msgpack.encode(env)
        return f

    def tensor_ref(self, f: list[bytes]) -> list[bytes]:
        """Damage a tensor reference: wrong dtype, huge / negative / many dims, wrong frame index."""
        env = self._doc(f)
        refs = [k for k, v in (env[2].items() if env else ()) if isinstance(v, list) and v[:1] == ["tensor"]]
        if not refs:
            return self.field(f)
        ref = env[2][self.rng.choice(refs)]
        r = self.rng.random()
        if r < 0.3:
            ref[1] = self.rng.choice(_DTYPES)
        elif r < 0.7:
            ref[2] = self.rng.choice([[2**20, 2**20, 2**20], [2**62, 2**62], [0, 2**62, 2**62], [-1, 3, 4], [1] * 17,
                                      [MAX_FRAME, 2], [1, L, P + 1], [1, L], [], [3]])
        else:
            ref[3] = self.rng.choice([0, 2, -1, 99])
        f[0] = msgspec.msgpack.encode(env)
        return f


def _frames(enc: Encoder, msg) -> list[bytes]:
    return [bytes(x) for x in enc.encode(msg)]


def _base_requests(enc: Encoder, tmp: str) -> list[list[bytes]]:
    """Requests that fail or change nothing, however they are mutated (no pause, no valid plan, no write)."""
    phy = torch.zeros(L, P + 4, dtype=torch.int64)
    phy[:, :E] = torch.arange(E)
    msgs = [Hello(role="operator", protocol_version=1, client_id="fuzz"), StatusRequest(),
            BalancednessRequest(per_layer=True, per_rank=True), GetPlanRequest(plan_id=999, with_placement=True),
            GetPlacementRequest(epoch=5), GetConfigRequest(),
            RebalanceRequest(dry_run=True, layers=[99], policy="no-such-policy", force=True),
            SetConfigRequest(key="no_such_key", value=3), SetConfigRequest(key="rpc", value="tcp://127.0.0.1:1"),
            LoadPlacementRequest(path=f"{tmp}/missing/none.json", dry_run=True),
            Heartbeat(rank=0, worker_id="fuzz-w", step=1), LayerReady(rank=0, plan_id=999, epoch=9, layers=[0]),
            Ack(rank=0, plan_id=999, epoch=9, layers=[0], step=5), Abort(plan_id=999, epoch=9, reason="fuzz"),
            RegisterWorker(rank=0, ep_size=G, worker_id="fuzz-w", num_layers=L, num_logical_experts=E,
                           num_physical_experts=P + 4, num_local_physical_experts=(P + 4) // G, epoch=0, phy2log=phy),
            OkReply(message="a reply is no request")]
    return [_frames(enc, m) for m in msgs]


def _base_reports(enc: Encoder) -> list[list[bytes]]:
    """Reports from a worker id that never registered: dropped however they are mutated."""
    load = torch.arange(2 * L * P, dtype=torch.int64).view(2, L, P)
    return [_frames(enc, LoadReport(rank=r, worker_id="fuzz-w", epoch=0, first_step=4, seq=s, load=load))
            for r, s in ((0, 0), (1, 7), (3, 1))]


# --- structured bad input: valid-looking, wrong in one way --------------------------------------------------
def _bad_reports(enc: Encoder, links) -> list[tuple[str, list[bytes]]]:
    """(expected drop reason, frames) from a registered rank's own worker id, each wrong in one way."""
    w, session = links[1].worker_id, links[1].session
    ok = torch.ones(1, L, P, dtype=torch.int64)

    def rep(reason: str, **kw) -> tuple[str, list[bytes]]:
        fields = dict(rank=1, worker_id=w, epoch=0, first_step=3, seq=10**6, load=ok, session=session)
        fields.update(kw)
        return reason, _frames(enc, LoadReport(**fields))

    def raw(reason: str, ref: list, data: bytes, **kw) -> tuple[str, list[bytes]]:
        return reason, [_header(_report_doc(w, 1, ref, seq=10**6, session=session, **kw)), data]

    nan = torch.full((1, L, P), math.nan, dtype=torch.float32).numpy().tobytes()
    return [
        rep("unknown_rank", rank=2), rep("unknown_rank", rank=G + 5), rep("unknown_epoch", epoch=7),
        rep("unknown_epoch", epoch=-1), rep("unknown_epoch", layers_applied=2),
        rep("bad_shape", load=torch.ones(1, L, P + 1, dtype=torch.int64)),
        rep("bad_shape", load=torch.ones(1, L + 1, P, dtype=torch.int64)),
        rep("negative", load=-ok), rep("overflow", load=ok * 2**40),
        rep("step_out_of_range", first_step=-4), rep("step_out_of_range", first_step=10**12),
        rep("duplicate", seq=0),
        # The rank's worker id without the session its registration was given: a forged report.
        rep("bad_session", session=""), rep("bad_session", session=session[:-1] + "x"),
        raw("malformed", _ref("float32", [1, L, P]), nan),  # NaN loads: a float tensor is no load
        raw("malformed", _ref("bool", [1, L, P]), bytes(L * P)),
        raw("malformed", _ref("complex64", [1, L, P]), bytes(8 * L * P)),
        raw("malformed", _ref("int64", [2**20, 2**20, 2**20]), bytes(8)),  # 8 EiB declared, never allocated
        raw("malformed", _ref("int64", [MAX_FRAME, 1, 1]), bytes(8)),  # over the cap, under int64 range
        raw("malformed", _ref("int64", [1, L, P]), bytes(8 * L * P - 8)),  # frame shorter than declared
        raw("malformed", _ref("int64", [1, L]), bytes(8 * L)),
        raw("malformed", _ref("int64", [1, L, P]), bytes(8 * L * P), dropped_steps=-5),
        raw("malformed", _ref("int64", [1, L, P]), bytes(8 * L * P), layers_applied=-7),
        ("malformed", _frames(enc, LoadReport(rank=1, worker_id=w, epoch=0, first_step=3, seq=1, load=ok))[:1]),
        ("malformed", [_header(_report_doc(w, 1, _ref("int64", [1, L, P])), version=2), bytes(8 * L * P)]),
        ("malformed", _frames(enc, Heartbeat(rank=1, worker_id=w, step=3))),  # not a report
    ]


def _bad_requests(enc: Encoder, tmp_path, links) -> list[tuple[type, list[bytes]]]:
    """(expected error type, frames) for requests wrong in one way."""
    bad_placement = tmp_path / "missing_expert.json"
    phy = torch.arange(P).remainder(E).repeat(L, 1)
    phy[0, 3] = 0  # layer 0 has no slot for expert 3 (it also has 2 replicas only of the others)
    phy[0, E + 3] = 0
    bad_placement.write_text(msgspec.json.encode({"phy2log": phy.tolist()}).decode())
    out_of_range = tmp_path / "out_of_range.json"
    out_of_range.write_text(msgspec.json.encode({"phy2log": [[E + 5] * P] * L}).decode())
    wrong_layers = tmp_path / "wrong_layers.json"
    wrong_layers.write_text(msgspec.json.encode({"phy2log": phy[:1].tolist()}).decode())
    (tmp_path / "a_dir.json").mkdir()
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    with open(tmp_path / "huge.json", "wb") as f:
        f.truncate(65 << 20)  # sparse: refused by its size, never read
    w0 = links[0].worker_id
    bad_rank = _header({"type": "RegisterWorker", "rank": 9, "ep_size": G, "worker_id": "x", "num_layers": L,
                        "num_logical_experts": E, "num_physical_experts": P, "num_local_physical_experts": P // G,
                        "epoch": 0, "phy2log": _ref("int64", [L, P])})
    lin = torch.arange(P).remainder(E).repeat(L, 1)
    reg = dict(ep_size=G, num_layers=L, num_logical_experts=E, num_local_physical_experts=P // G, epoch=0)
    cases: list[tuple[type, object]] = [
        (errors.VersionMismatchError, Hello(role="worker", protocol_version=99, client_id="x")),
        (errors.RegistrationMismatchError, RegisterWorker(rank=0, worker_id="x", num_physical_experts=P + 4,
                                                          **{**reg, "num_local_physical_experts": (P + 4) // G},
                                                          phy2log=torch.arange(P + 4).remainder(E).repeat(L, 1))),
        (errors.RegistrationMismatchError, RegisterWorker(rank=1, worker_id="x", num_physical_experts=P, phy2log=lin,
                                                          **{**reg, "epoch": 3})),
        (errors.PlacementError, RegisterWorker(rank=2, worker_id="x", num_physical_experts=P, phy2log=phy, **reg)),
        (errors.NotRegisteredError, Heartbeat(rank=G + 3, worker_id="x", step=1)),
        (errors.NotRegisteredError, Heartbeat(rank=0, worker_id=w0 + "-not", step=10**9)),
        (errors.NotRegisteredError, Heartbeat(rank=0, worker_id="", step=10**9)),  # no wildcard id
        (errors.InvalidArgumentError, RebalanceRequest(dry_run=True, layers=[L])),
        (errors.InvalidArgumentError, RebalanceRequest(dry_run=True, layers=[-1])),
        (errors.PolicyError, RebalanceRequest(dry_run=True, policy="nosuch")),
        (errors.NotFoundError, GetPlacementRequest(epoch=-1)), (errors.NotFoundError, GetPlacementRequest(epoch=10**18)),
        (errors.NotFoundError, GetPlanRequest(plan_id=-5)),
        (errors.InvalidArgumentError, DumpWindowRequest(path=str(tmp_path / "no-dir" / "w.npz"))),
        (errors.InvalidArgumentError, DumpWindowRequest(path="")),
        (errors.InvalidArgumentError, DumpWindowRequest(path=str(tmp_path / "a\x00b.npz"))),
        (errors.PlacementError, LoadPlacementRequest(path=str(tmp_path / "none.json"), dry_run=True)),
        (errors.PlacementError, LoadPlacementRequest(path=str(tmp_path / "a_dir.json"), dry_run=True)),
        (errors.PlacementError, LoadPlacementRequest(path="/dev/zero", dry_run=True)),
        (errors.PlacementError, LoadPlacementRequest(path=str(bad_placement), dry_run=True)),
        (errors.PlacementError, LoadPlacementRequest(path=str(out_of_range), dry_run=True)),
        (errors.InvalidArgumentError, LoadPlacementRequest(path=str(wrong_layers), dry_run=True)),
        (errors.InvalidArgumentError, LoadPlacementRequest(path="", dry_run=True)),
        (errors.InvalidArgumentError, LoadPlacementRequest(path="relative.json", dry_run=True)),
        (errors.InvalidArgumentError, LoadPlacementRequest(path="/" + "x" * 5000, dry_run=True)),
        (errors.PlacementError, LoadPlacementRequest(path=str(tmp_path / "deep.json"), dry_run=True)),
        (errors.PlacementError, LoadPlacementRequest(path=str(tmp_path / "huge.json"), dry_run=True)),
        (errors.ConfigError, SetConfigRequest(key="window_size", value=-3)),
        (errors.ConfigError, SetConfigRequest(key="window_size", value=[1, 2])),
        (errors.ConfigError, SetConfigRequest(key="window_size", value=None)),
        (errors.ConfigError, SetConfigRequest(key="min_gain", value=math.nan)),
        (errors.ConfigError, SetConfigRequest(key="policy", value="nosuch")),
        (errors.ConfigError, SetConfigRequest(key="max_frame_bytes", value=10)),
        (errors.ConfigError, SetConfigRequest(key="", value="")),
        (errors.UnexpectedMessageError, OkReply()),
        (errors.UnexpectedMessageError, LoadReport(rank=0, worker_id=w0, epoch=0, first_step=0, seq=0,
                                                   load=torch.ones(1, L, P, dtype=torch.int64))),
    ]
    out = [(err, _frames(enc, msg)) for err, msg in cases]
    return out + [(errors.DecodeError, [bad_rank, bytes(8 * L * P)]),
                  (errors.DecodeError, [b"\xc1"]), (errors.DecodeError, [b""]),
                  (errors.UnknownMessageError, [_header({"type": "Teleport" * 1000}, n_tensors=0)]),
                  (errors.FrameCountError, [_header({"type": "StatusRequest"}, n_tensors=0), b"extra"]),
                  (errors.FrameCountError, [_header({"type": "StatusRequest"}, n_tensors=0)] + [b""] * 100),
                  (errors.MessageTooLargeError, [_header({"type": "PlacementReply", "epoch": 0,
                                                          "phy2log": _ref("int64", [2**40, 2**40])}), b""])]


# --- the daemon side ------------------------------------------------------------------------------------------
def _snapshot(c: EplbClient, tmp_path, tag: str) -> dict:
    path = tmp_path / f"window-{tag}.npz"
    c.dump_window(str(path))
    trace = load_trace(path)
    s = c.status()
    bal = msgspec.to_builtins(c.balancedness(per_layer=True), enc_hook=lambda t: t.tolist())
    bal.pop("req_id")
    return {"steps": trace.steps.tolist(), "load": trace.load, "epoch": s.epoch, "paused": s.paused,
            "plan": s.current_plan, "workers": sorted((w.rank, w.worker_id) for w in s.workers),
            "placement": c.get_placement().phy2log.tolist(), "config": c.get_config().config, "balancedness": bal}


def _assert_same(before: dict, after: dict) -> None:
    np.testing.assert_array_equal(after.pop("load"), before.pop("load"))
    assert after == before


def _drive_rpc(dealer: zmq.Socket, requests: list[list[bytes]]) -> list:
    """Send every request, at most RPC_WINDOW in flight; return one decoded reply per request, in order."""
    dec, replies = Decoder(), []
    for start in range(0, len(requests), RPC_WINDOW):
        batch = requests[start:start + RPC_WINDOW]
        for frames in batch:
            dealer.send_multipart(frames)
        for _ in batch:
            assert dealer.poll(POLL_MS), f"no reply to request {len(replies)}: every request must get one"
            replies.append(dec.decode(dealer.recv_multipart(copy=False)))
    assert not dealer.poll(200), "a request got more than one reply"
    return replies


def _metric(port: int, name: str, reason: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    for line in text.splitlines():
        if line.startswith(f'{name}{{reason="{reason}"}}'):
            return float(line.split()[-1])
    return 0.0


def _fill_window(links, phy2log, steps: range) -> None:
    rng = np.random.default_rng(0)
    for s in steps:
        load = skewed_step_load(rng, phy2log)
        for link in links:
            link.send_report(s, load, 0)


def test_fuzzed_frames_at_both_sockets_change_nothing(tmp_path):
    rng = random.Random(SEED)
    mut, enc = Mutator(rng), Encoder()
    with DaemonThread(max_frame_bytes=MAX_FRAME) as d:
        links, phy2log = make_ranks(d)
        _fill_window(links, phy2log, range(10))
        ctx = zmq.Context()
        try:
            with EplbClient(d.rpc, timeout=10, ctx=ctx) as c:
                assert wait_for(lambda: c.status().reports_received == 10 * G)
                base = c.status()
                assert base.reports_dropped == 0
                before = _snapshot(c, tmp_path, "before")

                # Ingest: random frames, mutated reports, and valid-looking reports wrong in one way.
                reports = [mut.random_frames() if rng.random() < 0.3 else mut.mutate(rng.choice(_base_reports(enc)))
                           for _ in range(N_RANDOM_PER_SOCKET)]
                bad = _bad_reports(enc, links)
                push = ctx.socket(zmq.PUSH)
                push.setsockopt(zmq.LINGER, 0)
                push.connect(d.ingest)
                for frames in reports + [f for _, f in bad]:
                    push.send_multipart(frames)
                sent = len(reports) + len(bad)

                # RPC: random frames, mutated requests, and requests wrong in one way; each gets one reply.
                corpus = _base_requests(enc, str(tmp_path))
                requests = [mut.random_frames() if rng.random() < 0.3 else mut.mutate(rng.choice(corpus))
                            for _ in range(N_RANDOM_PER_SOCKET)]
                typed = _bad_requests(enc, tmp_path, links)
                dealer = ctx.socket(zmq.DEALER)
                dealer.setsockopt(zmq.LINGER, 0)
                dealer.connect(d.rpc)
                replies = _drive_rpc(dealer, requests + [f for _, f in typed])

                assert wait_for(lambda: c.status().reports_received == base.reports_received + sent, timeout=30)
                after_status = c.status()
                after = _snapshot(c, tmp_path, "after")
                # Reported, then the next real reports of every rank (rank 1 sent seq 10**6 and
                # seq -1 lookalikes above) are still taken, nothing counted as a gap.
                _fill_window(links, phy2log, range(10, 12))
                assert wait_for(lambda: c.status().reports_received == base.reports_received + sent + 2 * G)
                final = c.status()
                metrics_port = d.daemon.metrics_port
                assert wait_for(lambda: _metric(metrics_port, "eplbd_reports_dropped_total", "malformed")
                                == final.drop_reasons["malformed"])
        finally:
            ctx.destroy(linger=0)
            for link in links:
                link.close()

    _assert_same(before, after)
    # Every bad report dropped exactly once, with the expected reason for the structured ones.
    assert after_status.reports_dropped - base.reports_dropped == sent
    structured = {}
    for reason, _ in bad:
        structured[reason] = structured.get(reason, 0) + 1
    for reason, n in structured.items():
        if reason not in ("malformed", "unknown_rank"):  # the random ones add to these two
            assert after_status.drop_reasons.get(reason) == n, (reason, after_status.drop_reasons)
    assert set(after_status.drop_reasons) <= {"malformed", "unknown_rank", *structured}, after_status.drop_reasons
    assert final.reports_dropped == after_status.reports_dropped and final.window_fill == 12
    # Every RPC reply is a reply type; no bad input is answered as an internal error.
    assert len(replies) == len(requests) + len(typed)
    assert all(isinstance(r, REPLY_TYPES) for r in replies)
    internal = [(i, r.message) for i, r in enumerate(replies) if isinstance(r, ErrorReply) and r.code == 500]
    assert not internal, internal[:5]
    for (want, frames), got in zip(typed, replies[len(requests):]):
        assert isinstance(got, ErrorReply), (want, got)
        assert issubclass(type(got.to_exc()), want), (want.__name__, got.name, got.message)
        assert len(got.message) < 2000


def _disconnected(sock: zmq.Socket, monitor: zmq.Socket) -> bool:
    end = time.monotonic() + POLL_MS / 1000
    while time.monotonic() < end:
        if monitor.poll(500):
            if zmq.utils.monitor.recv_monitor_message(monitor)["event"] == zmq.EVENT_DISCONNECTED:
                return True
    return False


def test_oversize_frames_are_refused_by_libzmq_before_allocation():
    """A frame over max_frame_bytes makes libzmq drop the peer when it reads the frame's size, before
    buffering it: nothing reaches the daemon's loop, and the daemon serves everyone else."""
    limit = 64 * 1024
    with DaemonThread(max_frame_bytes=limit) as d:
        links, phy2log = make_ranks(d)
        ctx = zmq.Context()
        try:
            with EplbClient(d.rpc, timeout=10, ctx=ctx) as c:
                for socket_type, endpoint in ((zmq.PUSH, d.ingest), (zmq.DEALER, d.rpc)):
                    sock = ctx.socket(socket_type)
                    sock.setsockopt(zmq.LINGER, 0)
                    monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
                    sock.connect(endpoint)
                    sock.send_multipart([_header({"type": "StatusRequest"}, n_tensors=1), bytes(limit + 1)])
                    assert _disconnected(sock, monitor), f"{endpoint}: the oversize frame did not end the connection"
                    if socket_type == zmq.DEALER:
                        assert not sock.poll(300), "an oversize request must not be answered"
                    sock.disable_monitor()
                    monitor.close(linger=0)
                    sock.close(linger=0)
                # Nothing of the big frames was counted, and the daemon serves the ranks as before.
                assert c.status().reports_received == 0
                links[0].send_report(0, torch.ones(1, L, P, dtype=torch.int64), 0)
                assert wait_for(lambda: c.status().reports_received == 1)
                assert c.status().reports_dropped == 0
        finally:
            ctx.destroy(linger=0)
            for link in links:
                link.close()


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.lists(st.binary(max_size=300), min_size=0, max_size=5))
def test_decoder_raises_only_protocol_errors(frames):
    try:
        Decoder(max_frame_bytes=4096).decode(frames)
    except errors.ProtocolError:
        pass


def test_decoder_refuses_a_flood_of_frames_before_looking_at_them():
    frames = [_header({"type": "StatusRequest"}, n_tensors=10_000)] + [b""] * 10_000
    with pytest.raises(errors.FrameCountError, match="10001 frames"):
        Decoder().decode(frames)


# --- config values ---------------------------------------------------------------------------------------------
_WRONG_TYPE = {int: "many", float: "fast", bool: "perhaps"}
_NAMED_BAD = {"rpc": "tcp://127.0.0.1", "ingest": "udp://x:1", "log_level": "LOUD", "policy": "nosuch",
              "curve_worker_ranks": '{"node0": "7-3"}'}
# Free-form strings: any text parses; what they name is checked when the daemon starts (see below and test_auth).
_CHECKED_AT_START = {"metrics_host", "state_dir", "curve_secret_key_file", "curve_worker_keys_dir",
                     "curve_operator_keys_dir"}


def _bad_value(field: str) -> str | None:
    ann = DaemonSettings.model_fields[field].annotation
    args = [a for a in typing.get_args(ann) if a is not type(None)]
    if type(None) in typing.get_args(ann) and len(args) == 1:
        ann = args[0]  # an optional setting: its value type
    if ann in _WRONG_TYPE:
        return _WRONG_TYPE[ann]
    if typing.get_origin(ann) is typing.Literal:
        return "no-such-choice"
    return _NAMED_BAD.get(field)


_BAD_VALUES = [(f, v) for f in FIELDS if (v := _bad_value(f)) is not None]


def test_every_setting_is_covered_here():
    assert set(FIELDS) - {f for f, _ in _BAD_VALUES} == _CHECKED_AT_START


@pytest.mark.parametrize("field,value", _BAD_VALUES)
def test_every_setting_refuses_a_bad_value_naming_it(field, value):
    with pytest.raises(errors.ConfigError) as info:
        load_settings(env={f"EPLBD_{field.upper()}": value})
    assert field in str(info.value) and repr(value) in str(info.value)


@pytest.mark.parametrize("field,value,needle", [
    ("max_frame_bytes", 1000, "greater than or equal to 65536"),
    ("max_frame_bytes", 2**70, "less than or equal to"),
    ("window_size", 10**12, "less than or equal to"),
    ("plan_timeout_s", math.nan, "greater than 0"),
    ("heartbeat_timeout_s", -math.inf, "greater than 0"),
])
def test_values_that_would_break_the_daemon_are_refused(field, value, needle):
    with pytest.raises(errors.ConfigError, match=needle) as info:
        load_settings(env={}, cli={field: value})
    assert field in str(info.value)


def test_what_settings_name_is_checked_at_start(tmp_path):
    with DaemonThread() as first:
        with pytest.raises(errors.ConfigError, match=rf"cannot bind rpc='{first.rpc}'.*in use"):
            with DaemonThread(rpc=first.rpc):
                pass
        with pytest.raises(errors.ConfigError, match=rf"cannot bind ingest='{first.ingest}'"):
            with DaemonThread(ingest=first.ingest):
                pass
        busy = first.daemon.metrics_port
        with pytest.raises(errors.ConfigError, match=rf"metrics_port={busy}"):
            with DaemonThread(metrics_port=busy):
                pass
        with EplbClient(first.rpc, timeout=5) as c:
            assert c.status().reports_received == 0  # the first daemon is unaffected
    with pytest.raises(errors.ConfigError, match=r"metrics_host='no such host!'"):
        with DaemonThread(metrics_host="no such host!"):
            pass
    (tmp_path / "file").write_text("")
    with pytest.raises(errors.ConfigError, match=r"state_dir='.*file' is not a directory"):
        with DaemonThread(state_dir=str(tmp_path / "file")):
            pass
    with pytest.raises(errors.ConfigError, match=r"state_dir='.*file/sub' cannot be created"):
        with DaemonThread(state_dir=str(tmp_path / "file" / "sub")):
            pass
