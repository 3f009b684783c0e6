"""A worker rank's connection to the daemon (the transport under LoadReporter/PlacementAgent).

``WorkerLink`` owns two sockets: a PUSH to the daemon's ingest (load reports,
fire-and-forget, never blocking: a full queue or absent daemon is a counted
drop) and a DEALER to its RPC socket (registration, readiness, acks, and the
plans and commits the daemon pushes unsolicited). It is synchronous and meant
for one thread; the engine-facing classes run it on their background thread.
"""

from __future__ import annotations

import collections
import itertools
import os
import socket
import uuid
from typing import Any

import torch
import zmq

from eplbd.errors import EplbdError, UnavailableError
from eplbd.client.rpc import sync_round_trip
from eplbd.proto import (PUSH_TYPES, Abort, Ack, Decoder, Encoder, ErrorReply, Heartbeat, LayerReady,
                         LoadReport, Registered, RegisterWorker, Release, make_socket)
from eplbd.proto.sockets import CurveKeys


class WorkerLink:
    """Args:
        rpc: the daemon's RPC (ROUTER) endpoint.
        ingest: the daemon's ingest (PULL) endpoint.
        rank: this rank in the EP group.
        timeout: seconds to wait for a reply to a request.
        report_hwm: load reports queued in libzmq before sends count as drops.
        curve: a worker key pair and the daemon's public key, for a daemon with CURVE on
            (used on both sockets).
    """

    def __init__(self, rpc: str, ingest: str, rank: int, *, timeout: float = 5.0, report_hwm: int = 64,
                 ctx: zmq.Context | None = None, curve: CurveKeys | None = None) -> None:
        self.rank = rank
        self.rpc, self.ingest = rpc, ingest
        self.timeout = timeout
        self.worker_id = f"rank{rank}-{uuid.uuid4().hex[:8]}"
        # The secret the daemon gave this link's registration; every message of the rank carries it.
        self.session = ""
        ctx = ctx or zmq.Context.instance()
        self._enc, self._dec = Encoder(), Decoder()
        self._ids = itertools.count(1)
        self._seq = itertools.count(0)
        self._dealer = make_socket(ctx, zmq.DEALER, connect=rpc, identity=self.worker_id.encode(), linger_ms=0,
                                   curve=curve)
        self._push = make_socket(ctx, zmq.PUSH, connect=ingest, hwm=report_hwm, linger_ms=0, curve=curve)
        self.pushed: collections.deque = collections.deque()  # Plan / Commit / Abort from the daemon
        self.reports_sent = 0
        self.reports_dropped = 0

    # -- requests -------------------------------------------------------------------------
    def request(self, msg: Any) -> Any:
        """Send a request and wait for its reply; pushed messages that arrive meanwhile are queued."""
        msg.req_id = next(self._ids)

        def accept(frames: list) -> Any | None:
            reply = self._dec.decode(frames)
            if isinstance(reply, PUSH_TYPES) and getattr(reply, "req_id", 0) == 0:
                self.pushed.append(reply)
                return None
            if reply.req_id != msg.req_id:
                return None
            if isinstance(reply, ErrorReply):
                raise reply.to_exc()
            return reply

        return sync_round_trip(self._dealer, self._enc.encode(msg), self.timeout, accept, lambda: UnavailableError(
            f"rank {self.rank}: no reply from eplbd at {self.rpc} within {self.timeout:g}s to {type(msg).__name__}"))

    def register(self, *, ep_size: int, num_layers: int, num_logical: int, num_physical: int, epoch: int,
                 phy2log: torch.Tensor, num_groups: int = 1, num_nodes: int = 1, node: int = 0,
                 expert_bytes: int = 0, communicator: str = "", step: int = 0, last_plan_id: int = 0) -> Registered:
        reply = self.request(RegisterWorker(
            rank=self.rank, ep_size=ep_size, worker_id=self.worker_id, num_layers=num_layers,
            num_logical_experts=num_logical, num_physical_experts=num_physical,
            num_local_physical_experts=num_physical // ep_size, epoch=epoch, phy2log=phy2log,
            node=node, num_nodes=num_nodes, num_groups=num_groups, expert_bytes=expert_bytes,
            communicator=communicator, step=step, hostname=socket.gethostname(), pid=os.getpid(),
            last_plan_id=last_plan_id, session=self.session))
        self.session = reply.session
        # Pushes that came in before the reply are from before this registration (a previous daemon
        # or incarnation): the daemon pushes to this worker only after registering it.
        self.pushed.clear()
        # The daemon answered, so its ingest is up: give the PUSH a moment to
        # connect so the first reports are not dropped locally.
        self.wait_ingest(min(self.timeout, 2.0))
        return reply

    def wait_ingest(self, timeout: float) -> bool:
        """Wait until the report socket is connected (IMMEDIATE drops sends before that)."""
        return bool(self._push.poll(int(timeout * 1000), zmq.POLLOUT))

    def heartbeat(self, step: int, epoch: int = -1) -> None:
        self.request(Heartbeat(rank=self.rank, worker_id=self.worker_id, step=step, epoch=epoch,
                               session=self.session))

    def layer_ready(self, plan_id: int, epoch: int, layers: list[int]) -> None:
        self.request(LayerReady(rank=self.rank, plan_id=plan_id, epoch=epoch, layers=layers,
                                worker_id=self.worker_id, session=self.session))

    def ack(self, plan_id: int, epoch: int, layers: list[int], step: int) -> None:
        self.request(Ack(rank=self.rank, plan_id=plan_id, epoch=epoch, layers=layers, step=step,
                         worker_id=self.worker_id, session=self.session))

    def abort(self, plan_id: int, epoch: int, reason: str, *, peer: int = -1) -> None:
        """Give up on a plan; ``peer``: the rank a failed transfer was with, if known."""
        self.request(Abort(plan_id=plan_id, epoch=epoch, reason=reason, rank=self.rank, peer=peer,
                           worker_id=self.worker_id, session=self.session))

    def release(self, timeout: float = 1.0) -> bool:
        """End this link's session, so that a restarted rank may register at once (best effort:
        False when the daemon did not confirm within ``timeout`` seconds)."""
        if not self.session:
            return False
        saved, self.timeout = self.timeout, min(self.timeout, timeout)
        try:
            self.request(Release(rank=self.rank, worker_id=self.worker_id, session=self.session))
            return True
        except EplbdError:
            return False
        finally:
            self.timeout = saved
            self.session = ""

    # -- pushes from the daemon -------------------------------------------------------------
    def poll_pushed(self, timeout: float = 0.0) -> Any | None:
        """The next Plan/Commit/Abort the daemon pushed, waiting up to ``timeout`` seconds."""
        if self.pushed:
            return self.pushed.popleft()
        if self._dealer.poll(int(timeout * 1000)):
            msg = self._dec.decode(self._dealer.recv_multipart(copy=False))
            if isinstance(msg, PUSH_TYPES):
                return msg
        return None

    # -- load reports -----------------------------------------------------------------------
    def send_report(self, first_step: int, load: torch.Tensor, epoch: int, *, dropped_steps: int = 0,
                    layers_applied: int = -1) -> bool:
        """Send ``load [steps, layers, num_physical]`` without blocking; False (and a counted drop) if
        the queue to the daemon is full or no daemon is connected."""
        msg = LoadReport(rank=self.rank, worker_id=self.worker_id, epoch=epoch, first_step=first_step,
                         seq=next(self._seq), load=load, dropped_steps=dropped_steps,
                         layers_applied=layers_applied, session=self.session)
        try:
            self._push.send_multipart(self._enc.encode(msg), copy=False, flags=zmq.NOBLOCK)
        except zmq.Again:
            self.reports_dropped += 1
            return False
        self.reports_sent += 1
        return True

    def close(self) -> None:
        self._dealer.close(linger=0)
        self._push.close(linger=0)
