"""Real pyzmq sockets on tcp://127.0.0.1:0: PUSH/PULL and DEALER/ROUTER with copy=False frames."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch
import zmq
import zmq.asyncio

from eplbd import errors
from eplbd import proto

POLL_MS = 5000  # generous: a missed message fails the test here instead of hanging it


class Sockets:
    """Makes sockets through ``proto.make_socket`` and closes every one at teardown (linger 0)."""

    def __init__(self, ctx) -> None:
        self.ctx, self.made = ctx, []

    def __call__(self, socket_type: int, **kw):
        sock = proto.make_socket(self.ctx, socket_type, **kw)
        self.made.append(sock)
        return sock

    def close(self) -> None:
        for sock in self.made:
            sock.close(linger=0)
        self.ctx.destroy(linger=0)


@pytest.fixture
def make():
    sockets = Sockets(zmq.Context())
    yield sockets
    sockets.close()


@pytest.fixture
def amake():
    sockets = Sockets(zmq.asyncio.Context())
    yield sockets
    sockets.close()


def _recv(sock: zmq.Socket) -> list[zmq.Frame]:
    assert sock.poll(POLL_MS, zmq.POLLIN), "no message within the poll timeout"
    return sock.recv_multipart(copy=False)


def _inside(t: torch.Tensor, frame: zmq.Frame) -> bool:
    buf = np.frombuffer(frame.buffer, dtype=np.uint8)
    lo, hi = buf.ctypes.data, buf.ctypes.data + buf.nbytes
    return lo <= t.data_ptr() and t.data_ptr() + t.numel() * t.element_size() <= hi


def test_bound_endpoint_reads_back_the_real_port(make):
    sock = make(zmq.PULL, bind="tcp://127.0.0.1:0")
    endpoint = proto.bound_endpoint(sock)
    assert endpoint.startswith("tcp://127.0.0.1:") and int(endpoint.rsplit(":", 1)[1]) > 0


def test_make_socket_sets_its_options(make):
    sock = make(
        zmq.DEALER, connect="tcp://127.0.0.1:1", identity=b"rank-3", hwm=7, linger_ms=25, max_msg_size=4096
    )
    assert sock.getsockopt(zmq.SNDHWM) == 7 and sock.getsockopt(zmq.RCVHWM) == 7
    assert sock.getsockopt(zmq.LINGER) == 25
    assert sock.getsockopt(zmq.MAXMSGSIZE) == 4096
    assert sock.getsockopt(zmq.IDENTITY) == b"rank-3"
    assert sock.getsockopt(zmq.IMMEDIATE) == 1


def test_make_socket_wants_exactly_one_endpoint(make):
    with pytest.raises(errors.InvalidArgumentError, match="exactly one"):
        make(zmq.PUSH)
    with pytest.raises(errors.InvalidArgumentError, match="exactly one"):
        make(zmq.PUSH, bind="tcp://127.0.0.1:0", connect="tcp://127.0.0.1:1")
    bare = make.ctx.socket(zmq.PUSH)
    try:
        with pytest.raises(errors.InvalidArgumentError, match="not bound"):
            proto.bound_endpoint(bare)
    finally:
        bare.close(linger=0)


def test_a_failed_bind_leaves_no_socket_open(make):
    taken = make(zmq.PULL, bind="tcp://127.0.0.1:0")
    with pytest.raises(zmq.ZMQError):
        proto.make_socket(make.ctx, zmq.PULL, bind=proto.bound_endpoint(taken))


def test_push_pull_load_report_zero_copy(make):
    pull = make(zmq.PULL, bind="tcp://127.0.0.1:0")
    push = make(zmq.PUSH, connect=proto.bound_endpoint(pull))
    # Several sizes: small frames land packed in zmq's receive buffer, large ones in their own.
    loads = [torch.randint(0, 500, (s, 3, 16), dtype=torch.int32) for s in (1, 4, 2000)]
    enc, dec = proto.Encoder(), proto.Decoder()
    for seq, load in enumerate(loads):
        report = proto.LoadReport(rank=1, worker_id="r1", epoch=0, first_step=seq * 10, seq=seq, load=load)
        push.send_multipart(enc.encode(report), copy=False)
    for seq, load in enumerate(loads):
        frames = _recv(pull)
        assert len(frames) == 2
        out = dec.decode(frames)
        assert isinstance(out, proto.LoadReport) and out.seq == seq
        assert torch.equal(out.load, load)
        assert _inside(out.load, frames[1])


def test_immediate_push_refuses_until_connected_then_sends(make):
    push = make(zmq.PUSH, connect="tcp://127.0.0.1:1")  # nobody listens there
    with pytest.raises(zmq.Again):
        push.send(b"x", flags=zmq.NOBLOCK)
    pull = make(zmq.PULL, bind="tcp://127.0.0.1:0")
    push = make(zmq.PUSH, connect=proto.bound_endpoint(pull))
    assert push.poll(POLL_MS, zmq.POLLOUT), "connection not ready within the poll timeout"
    push.send_multipart(proto.Encoder().encode(proto.OkReply()), flags=zmq.NOBLOCK)
    assert isinstance(proto.Decoder().decode(_recv(pull)), proto.OkReply)
    lazy = make(zmq.PUSH, connect="tcp://127.0.0.1:1", immediate=False)
    assert lazy.getsockopt(zmq.IMMEDIATE) == 0
    lazy.send(b"queued", flags=zmq.NOBLOCK)  # queues for a peer that may come later


def test_oversize_frame_is_dropped_by_max_msg_size(make):
    pull = make(zmq.PULL, bind="tcp://127.0.0.1:0", max_msg_size=1024)
    push = make(zmq.PUSH, connect=proto.bound_endpoint(pull))
    big = proto.LoadReport(rank=0, worker_id="w", epoch=0, first_step=0, seq=0,
                           load=torch.zeros(4, 4, 64, dtype=torch.int64))  # fmt: skip
    push.send_multipart(proto.Encoder().encode(big), copy=False)
    assert not pull.poll(300, zmq.POLLIN)


def test_dealer_router_request_reply(make):
    router = make(zmq.ROUTER, bind="tcp://127.0.0.1:0")
    dealer = make(zmq.DEALER, connect=proto.bound_endpoint(router), identity=b"rank-0")
    enc, dec = proto.Encoder(), proto.Decoder()
    phy2log = torch.arange(16, dtype=torch.int64).view(2, 8) % 6
    register = proto.RegisterWorker(
        rank=0, ep_size=2, worker_id="r0-1", num_layers=2, num_logical_experts=6, num_physical_experts=8,
        num_local_physical_experts=4, epoch=0, phy2log=phy2log, req_id=41,
    )  # fmt: skip
    dealer.send_multipart(enc.encode(register), copy=False)

    identity, *frames = _recv(router)
    assert identity.bytes == b"rank-0" and len(frames) == 2
    req = proto.expect(dec.decode(frames), proto.REQUEST_TYPES, "the ROUTER socket")
    assert isinstance(req, proto.RegisterWorker) and torch.equal(req.phy2log, phy2log)
    assert _inside(req.phy2log, frames[1])
    reply = proto.Registered(epoch=1, phy2log=req.phy2log.clone(), req_id=req.req_id)
    router.send_multipart([identity, *enc.encode(reply)], copy=False)

    out = dec.decode(_recv(dealer))
    assert isinstance(out, proto.Registered) and out.req_id == 41 and torch.equal(out.phy2log, phy2log)


def test_router_answers_a_reply_sent_as_a_request_with_a_typed_error(make):
    router = make(zmq.ROUTER, bind="tcp://127.0.0.1:0")
    dealer = make(zmq.DEALER, connect=proto.bound_endpoint(router))
    enc, dec = proto.Encoder(), proto.Decoder()
    dealer.send_multipart(enc.encode(proto.OkReply(message="not a request", req_id=5)))
    identity, *frames = _recv(router)
    msg = dec.decode(frames)
    try:
        proto.expect(msg, proto.REQUEST_TYPES, "the ROUTER socket")
    except errors.ProtocolError as exc:
        router.send_multipart([identity, *enc.encode(proto.ErrorReply.from_exc(exc, req_id=msg.req_id))])
    err = dec.decode(_recv(dealer))
    assert isinstance(err, proto.ErrorReply) and err.req_id == 5
    with pytest.raises(errors.UnexpectedMessageError, match="OkReply is not accepted"):
        raise err.to_exc()


def test_router_mandatory_reports_an_unknown_peer(make):
    router = make(zmq.ROUTER, bind="tcp://127.0.0.1:0")
    with pytest.raises(zmq.ZMQError) as info:
        router.send_multipart([b"nobody", *proto.Encoder().encode(proto.OkReply())])
    assert info.value.errno == zmq.EHOSTUNREACH


async def test_asyncio_dealer_router_handshake(amake):
    router = amake(zmq.ROUTER, bind="tcp://127.0.0.1:0")
    dealer = amake(zmq.DEALER, connect=proto.bound_endpoint(router))
    assert isinstance(router, zmq.asyncio.Socket)
    enc, dec = proto.Encoder(), proto.Decoder()

    async def serve_one() -> None:
        identity, *frames = await router.recv_multipart(copy=False)
        hello = dec.decode(frames)
        assert isinstance(hello, proto.Hello)
        try:
            proto.check_version(hello.protocol_version)
            reply = proto.Welcome(protocol_version=proto.PROTOCOL_VERSION, daemon_id="d", epoch=3, req_id=hello.req_id)
        except errors.VersionMismatchError as exc:
            reply = proto.ErrorReply.from_exc(exc, req_id=hello.req_id)
        await router.send_multipart([identity, *enc.encode(reply)], copy=False)

    async def ask(version: int):
        await dealer.send_multipart(enc.encode(proto.Hello(role="operator", protocol_version=version, client_id="c")))
        return dec.decode(await dealer.recv_multipart(copy=False))

    welcome, _ = await asyncio.wait_for(asyncio.gather(ask(proto.PROTOCOL_VERSION), serve_one()), POLL_MS / 1000)
    refused, _ = await asyncio.wait_for(asyncio.gather(ask(99), serve_one()), POLL_MS / 1000)
    assert isinstance(welcome, proto.Welcome) and welcome.epoch == 3
    assert isinstance(refused, proto.ErrorReply)
    with pytest.raises(errors.VersionMismatchError, match="version 99"):
        raise refused.to_exc()
