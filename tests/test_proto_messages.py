"""Every message type round-trips; version check, error replies, request/reply grouping."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import msgspec
import pytest
import torch

from eplbd import errors
from eplbd import proto
from eplbd.proto import messages as m


def assert_same(a, b, path="msg"):
    """Deep equality for messages whose fields may hold tensors (dtype and shape included)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), path
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), path
    elif isinstance(a, msgspec.Struct):
        assert type(a) is type(b), path
        for f in msgspec.structs.fields(a):
            assert_same(getattr(a, f.name), getattr(b, f.name), f"{path}.{f.name}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), path
        for k in a:
            assert_same(a[k], b[k], f"{path}[{k!r}]")
    else:
        assert type(a) is type(b) and a == b, f"{path}: {a!r} != {b!r}"


def _phy2log(rows: int, slots: int = 8) -> torch.Tensor:
    return (torch.arange(rows * slots, dtype=torch.int64) % 6).view(rows, slots)


def _plan() -> m.Plan:
    return m.Plan(
        plan_id=7, epoch=3, base_epoch=2, layers=[0, 2], phy2log=_phy2log(2), policy="default",
        reason="gain 0.12", timeout_s=30.0, req_id=11,
    )  # fmt: skip


def _plan_info() -> m.PlanInfo:
    return m.PlanInfo(
        plan_id=7, epoch=3, base_epoch=2, state="committing", reason="gain 0.12", layers=[0, 2],
        policy="default", predicted_before=0.61, predicted_after=0.93, moved_slots=5,
        moved_bytes=5 << 20, created_at=1.7e9, timings={"decide": 0.01, "stage": 1.5},
        phy2log=_phy2log(2), req_id=12,
    )  # fmt: skip


def _stats(x: float) -> m.BalanceStats:
    return m.BalanceStats(min=x, p50=x + 0.1, p90=x + 0.2, mean=x + 0.05, aggregate=x + 0.07)


def examples() -> list[m.MessageBase]:
    """One instance of every message type, every defaulted field set to a non-default value."""
    return [
        m.Hello(role="operator", protocol_version=1, client_id="ctl-1", req_id=1),
        m.Welcome(protocol_version=1, daemon_id="d-1", epoch=4, req_id=1),
        m.RegisterWorker(
            rank=1, ep_size=2, node=1, num_nodes=2, worker_id="r1-5f0c", num_layers=3,
            num_logical_experts=6, num_physical_experts=8, num_local_physical_experts=4,
            num_groups=2, epoch=4, phy2log=_phy2log(3), expert_bytes=1 << 20,
            communicator="torch_gloo", step=100, hostname="node-b", pid=4242, last_plan_id=6, session="s-1", req_id=2,
        ),  # fmt: skip
        m.Registered(
            epoch=4, phy2log=_phy2log(3), plan=_plan(), daemon_id="d-1", heartbeat_interval_s=1.0,
            commit_interval_steps=16, session="s-1", req_id=2,
        ),  # fmt: skip
        m.LoadReport(
            rank=1, worker_id="r1-5f0c", epoch=4, first_step=96, seq=12, dropped_steps=3, layers_applied=2, req_id=5,
            session="s-1",
            load=torch.randint(0, 1000, (4, 3, 8), dtype=torch.int32),
        ),  # fmt: skip
        m.Heartbeat(rank=1, worker_id="r1-5f0c", step=120, epoch=4, session="s-1", req_id=3),
        m.Release(rank=1, worker_id="r1-5f0c", session="s-1", req_id=4),
        _plan(),
        m.LayerReady(rank=1, plan_id=7, epoch=3, layers=[0], worker_id="r1-5f0c", session="s-1", req_id=13),
        m.Commit(plan_id=7, epoch=3, layers=[0, 2], req_id=14),
        m.Ack(rank=1, plan_id=7, epoch=3, layers=[0, 2], step=160, worker_id="r1-5f0c", session="s-1", req_id=15),
        m.Abort(plan_id=7, epoch=3, reason="transfer failed", rank=1, keep_layers=[0], peer=2, worker_id="r1-5f0c",
                session="s-1", req_id=16),
        m.StatusRequest(req_id=20),
        m.StatusReply(
            epoch=4, step=1234, paused=True, req_id=20,
            workers=[m.WorkerInfo(rank=0, worker_id="r0-aa", alive=True, last_seen_s=0.2, node=1, epoch=4,
                                  hostname="node-a")],
            window_fill=900, window_size=1000, current_plan=_plan_info(), last_decision_reason="gain too low",
            reports_received=500, reports_dropped=2, drop_reasons={"stale_epoch": 1, "gap": 1},
            daemon_id="d-1", ep_size=2, policy="default", next_rebalance_step=3000, uptime_s=12.5,
            last_commit_at=1.7e9, aborts_in_a_row=3, rebalancing_stuck=True, stuck_reason="3 aborts",
            last_abort=m.AbortInfo(plan_id=6, rank=2, reason="rank 2 sent nothing for 11.0s", at=1.7e9,
                                   cause="rank_dead", reported_by=0, kept_layers=[1], reported_by_worker="r0-aa"),
            resize=_resize_info(), messages_refused={"Abort:not_registered": 4}, silent_load_steps=250,
            load_silent=True,
        ),  # fmt: skip
        m.BalancednessRequest(per_layer=True, per_rank=True, req_id=21),
        m.BalancednessReply(
            observed=_stats(0.5), predicted=_stats(0.8), per_layer_observed=[0.5, 0.6, 0.4],
            per_layer_predicted=[0.8, 0.9, 0.7], per_rank_load=torch.rand(3, 2, dtype=torch.float64),
            epoch=4, window_fill=900, req_id=21,
        ),  # fmt: skip
        m.RebalanceRequest(dry_run=True, layers=[0, 2], policy="default", force=True, req_id=22),
        m.RebalanceReply(
            plan_id=8, epoch=5, pushed=True, skipped=True, reason="dry run", predicted_before=0.6,
            predicted_after=0.9, moved_slots=4, moved_bytes=4 << 20, phy2log=_phy2log(2), layers=[0, 2],
            policy="default", req_id=22,
        ),  # fmt: skip
        m.PauseRequest(reason="maintenance", req_id=23),
        m.ResumeRequest(req_id=24),
        m.OkReply(message="paused", req_id=23),
        m.GetPlanRequest(epoch=3, plan_id=7, with_placement=True, req_id=25),
        _plan_info(),
        m.GetPlacementRequest(epoch=3, req_id=26),
        m.PlacementReply(epoch=3, phy2log=_phy2log(3), ep_size=2, req_id=26),
        m.DumpWindowRequest(path="/tmp/window.pt", req_id=27),
        m.DumpWindowReply(path="/tmp/window.pt", steps=900, req_id=27),
        m.LoadPlacementRequest(path="/tmp/placement.json", dry_run=True, req_id=28, moe_layers=[3, 4, 5],
                               num_hidden_layers=6),
        m.GetConfigRequest(req_id=29),
        m.SetConfigRequest(key="window_size", value={"nested": [1, 2.5, "x", None, True]}, req_id=30),
        m.ConfigReply(config={"window_size": 500, "policy": "default", "log_balancedness": True}, req_id=30),
        m.ErrorReply(code=302, name="stale_epoch", message="epoch 2 is stale", req_id=31),
        m.ResizeRequest(mapping=[0, 1, 2, -1], ep_size=3, dry_run=True, req_id=32),
        m.GetResizeRequest(epoch=5, req_id=33),
        m.ResizeReply(info=_resize_info(), phy2log=_phy2log(3, 6), base=_phy2log(3, 6) - 1,
                      num_local_physical_experts=2, dry_run=True, req_id=32),
    ]


def _resize_info() -> m.ResizeInfo:
    return m.ResizeInfo(epoch=5, base_epoch=4, old_ep_size=4, ep_size=3, mapping=[0, 1, 2, -1],
                        orphans=[[7], [], [0, 1]], registered=[0, 2], complete=True, moved_slots=3,
                        reload_slots=3, drained_plan=6, drain="aborted", created_at=1.7e9)


def _is_default(info: msgspec.structs.FieldInfo, value) -> bool:
    if info.default is not msgspec.NODEFAULT:
        return type(value) is type(info.default) and value == info.default
    if info.default_factory is not msgspec.NODEFAULT:
        return value == info.default_factory()
    return False


def test_examples_cover_every_type_with_non_default_values():
    msgs = examples()
    assert {type(x) for x in msgs} == set(proto.MESSAGE_TYPES)
    for msg in msgs:
        for info in msgspec.structs.fields(msg):
            assert not _is_default(info, getattr(msg, info.name)), f"{type(msg).__name__}.{info.name} is default"


@pytest.mark.parametrize("msg", examples(), ids=lambda x: type(x).__name__)
def test_every_message_round_trips(msg):
    frames = proto.Encoder().encode(msg)
    out = proto.Decoder().decode([bytes(f) for f in frames])
    assert_same(msg, out)


def test_tag_is_class_name_and_unknown_fields_are_ignored():
    header = msgspec.msgpack.encode([1, 0, {"type": "Heartbeat", "rank": 2, "worker_id": "w", "step": 9, "new": 1}])
    out = proto.Decoder().decode([header])
    assert out == m.Heartbeat(rank=2, worker_id="w", step=9)


def test_missing_field_from_older_peer_takes_its_default():
    header = msgspec.msgpack.encode([1, 0, {"type": "Abort", "plan_id": 1, "epoch": 2, "reason": "x"}])
    assert proto.Decoder().decode([header]) == m.Abort(plan_id=1, epoch=2, reason="x", rank=-1)


def test_check_version_names_both_versions():
    proto.check_version(proto.PROTOCOL_VERSION)
    with pytest.raises(errors.VersionMismatchError, match=r"version 2\b.*speaks 1"):
        proto.check_version(2)


def test_invalid_fields_are_rejected_on_construction():
    with pytest.raises(errors.InvalidArgumentError, match="role"):
        m.Hello(role="root", protocol_version=1, client_id="x")
    with pytest.raises(errors.InvalidArgumentError, match=r"phy2log.*int64.*float32"):
        m.Plan(plan_id=1, epoch=1, base_epoch=0, layers=[0], phy2log=torch.zeros(1, 4), policy="p")
    with pytest.raises(errors.InvalidArgumentError, match=r"2 rows for 1 layers"):
        m.Plan(plan_id=1, epoch=1, base_epoch=0, layers=[0], phy2log=_phy2log(2), policy="p")
    with pytest.raises(errors.InvalidArgumentError, match=r"LoadReport.load must be a 3-d"):
        m.LoadReport(rank=0, worker_id="w", epoch=0, first_step=0, seq=0, load=torch.zeros(2, 3))
    with pytest.raises(errors.InvalidArgumentError, match=r"expected \[num_layers, num_physical_experts\]"):
        m.RegisterWorker(
            rank=0, ep_size=1, worker_id="w", num_layers=3, num_logical_experts=6, num_physical_experts=8,
            num_local_physical_experts=8, epoch=0, phy2log=_phy2log(2),
        )  # fmt: skip


def test_invalid_fields_are_rejected_on_decode():
    frames = proto.Encoder().encode(m.Hello(role="worker", protocol_version=1, client_id="x"))
    header = bytes(frames[0]).replace(b"worker", b"hacker")
    with pytest.raises(errors.DecodeError, match="hacker"):
        proto.Decoder().decode([header])


def test_load_report_num_steps():
    report = m.LoadReport(rank=0, worker_id="w", epoch=0, first_step=5, seq=0, load=torch.zeros(3, 2, 4, dtype=torch.int64))
    assert report.num_steps == 3


def test_error_reply_round_trips_typed_errors():
    exc = errors.StaleEpochError("epoch 2 is stale, current is 4")
    reply = m.ErrorReply.from_exc(exc, req_id=9)
    assert (reply.code, reply.name, reply.req_id) == (302, "stale_epoch", 9)
    back = proto.Decoder().decode(proto.Encoder().encode(reply)).to_exc()
    assert type(back) is errors.StaleEpochError and str(back) == "epoch 2 is stale, current is 4"


def test_error_reply_wraps_foreign_exceptions_as_internal():
    reply = m.ErrorReply.from_exc(KeyError("layer"))
    assert reply.code == errors.InternalError.code and "KeyError" in reply.message
    assert isinstance(reply.to_exc(), errors.InternalError)


def test_request_and_reply_groups():
    assert set(proto.REQUEST_TYPES).isdisjoint(proto.REPLY_TYPES)
    assert set(proto.REQUEST_TYPES) | set(proto.REPLY_TYPES) | {m.LoadReport, m.Plan, m.Commit} == set(
        proto.MESSAGE_TYPES
    )
    assert set(proto.OPERATOR_REQUEST_TYPES) | set(proto.WORKER_REQUEST_TYPES) == set(proto.REQUEST_TYPES)
    assert m.ErrorReply in proto.REPLY_TYPES
    for req, rep in proto.REPLY_TYPE_FOR.items():
        assert rep in proto.REPLY_TYPES, req


def test_expect_rejects_a_reply_sent_as_a_request():
    ok = m.StatusRequest()
    assert proto.expect(ok, proto.REQUEST_TYPES, "the ROUTER socket") is ok
    with pytest.raises(errors.UnexpectedMessageError, match=r"StatusReply is not accepted on the ROUTER socket"):
        proto.expect(m.StatusReply(epoch=0, step=0, paused=False), proto.REQUEST_TYPES, "the ROUTER socket")


def test_import_stays_light_for_engine_workers():
    code = textwrap.dedent(
        """
        import sys
        import eplbd.proto
        heavy = [n for n in ("uvloop", "pydantic", "pydantic_settings", "eplbd.policy") if n in sys.modules]
        assert not heavy, heavy
        """
    )
    subprocess.run([sys.executable, "-W", "error", "-c", code], check=True, timeout=60)
