"""Requests on the RPC socket: decode, authorise (the ZAP role) and dispatch each to ``DaemonState``.

``Dispatch`` is a part of ``Daemon`` (eplbd.daemon.server); a request with heavy work (a policy run, a resize
plan, a window dump) comes back as a ``Later`` that the RPC loop (eplbd.daemon.loops) runs in the executor.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

from eplbd.daemon.auth import authorize
from eplbd.daemon.resize import ResizeJob
from eplbd.daemon.state import Outgoing, Sender
from eplbd.errors import EplbdError, PermissionDeniedError, ProtocolError
from eplbd.proto import (PROTOCOL_VERSION, REQUEST_TYPES, Abort, Ack, BalancednessRequest, ConfigReply,
                         DumpWindowReply, DumpWindowRequest, ErrorReply, GetConfigRequest, GetPlacementRequest,
                         GetPlanRequest, GetResizeRequest, Heartbeat, Hello, LayerReady, LoadPlacementRequest, OkReply,
                         PauseRequest, PlacementReply, RebalanceRequest, RegisterWorker, Release, ResizeRequest,
                         ResumeRequest, SetConfigRequest, StatusRequest, Welcome, check_version, expect)
from eplbd.settings import apply_update

log = logging.getLogger("eplbd.daemon.server")  # the shell's modules log as one


class Later:
    """A request answered after work in the executor: ``work`` runs there, ``finish`` (on the loop)
    turns its result into ``(reply, outgoing)``; an error of either is the reply to request ``req_id``."""

    def __init__(self, work: Callable[[], Any], finish: Callable[[Any], tuple[Any, list[Outgoing]]],
                 req_id: int) -> None:
        self.work, self.finish, self.req_id = work, finish, req_id


class Dispatch:
    """The ``Daemon``'s request handling (uses its ``state``, ``settings`` and decoder ``_dec``)."""

    def _handle(self, identity: bytes, body: list,
                user_id: str | None = None) -> tuple[Any, list[Outgoing]] | Later:
        """Decode, authorise (``user_id`` from ZAP; None: CURVE off, all allowed) and dispatch one request;
        a request with heavy work comes back as a ``Later`` for the executor."""
        req_id = 0
        try:
            msg = self._dec.decode(body)
            req_id = getattr(msg, "req_id", 0)
            expect(msg, REQUEST_TYPES, "the RPC socket")
            if user_id is not None:
                authorize(user_id, msg)
            return self._dispatch(msg, Sender(identity, user_id), time.time())
        except PermissionDeniedError as exc:
            log.warning("denied: %s", exc)
            return ErrorReply.from_exc(exc, req_id=req_id), []
        except EplbdError as exc:
            return ErrorReply.from_exc(exc, req_id=req_id), []
        except Exception as exc:  # a bug must cost one request, not the daemon
            log.exception("internal error handling a request")
            return ErrorReply.from_exc(exc, req_id=req_id), []

    def _dispatch(self, msg: Any, sender: Sender, now: float) -> tuple[Any, list[Outgoing]] | Later:
        st, rid = self.state, msg.req_id
        ok = OkReply(req_id=rid)
        match msg:
            case Hello():
                check_version(msg.protocol_version)
                return Welcome(protocol_version=PROTOCOL_VERSION, daemon_id=st.daemon_id, epoch=st.epoch,
                               req_id=rid), []
            case RegisterWorker():
                reply, out = st.register(msg, sender, now)
                return reply, out
            case Heartbeat():
                st.heartbeat(msg, sender, now)
                return ok, []
            case LayerReady():
                return ok, st.layer_ready(msg, sender, now)
            case Ack():
                return ok, st.ack(msg, sender, now)
            case Abort():
                return ok, st.worker_abort(msg, sender, now)
            case Release():
                st.release(msg, sender, now)
                return ok, []
            case StatusRequest():
                reply = st.status(now)
                reply.req_id = rid
                return reply, []
            case BalancednessRequest():
                reply = st.balancedness(msg.per_layer, msg.per_rank)
                reply.req_id = rid
                return reply, []
            case RebalanceRequest():
                job = st.rebalance_job(dry_run=msg.dry_run, layers=msg.layers, policy=msg.policy, force=msg.force,
                                       now=now)
                return Later(job.run, lambda prop: st.finish_plan(job, prop, now=time.time(), dry_run=msg.dry_run,
                                                                   req_id=rid), rid)
            case PauseRequest():
                st.paused, st._decided = True, True
                st.last_decision_reason = f"paused by operator{': ' + msg.reason if msg.reason else ''}"
                return OkReply(message="schedule paused", req_id=rid), []
            case ResumeRequest():
                st.paused, st._decided = False, True
                st.last_decision_reason = "resumed by operator"
                return OkReply(message="schedule resumed", req_id=rid), []
            case GetPlanRequest():
                info = st.get_plan(msg.epoch, msg.plan_id).info()
                info.req_id = rid
                return info, []
            case GetPlacementRequest():
                e = st.epoch if msg.epoch is None else msg.epoch
                return PlacementReply(epoch=e, phy2log=st.get_placement(msg.epoch), ep_size=st.topo.num_gpus,
                                      req_id=rid), []
            case DumpWindowRequest():
                path, write = st.dump_window_job(msg.path)
                return Later(write, lambda steps: (DumpWindowReply(path=path, steps=steps, req_id=rid), []), rid)
            case LoadPlacementRequest():
                return st.load_placement(msg.path, dry_run=msg.dry_run, now=now, req_id=rid, moe_layers=msg.moe_layers,
                                         num_hidden_layers=msg.num_hidden_layers)
            case ResizeRequest():
                job = st.resize_job(msg.mapping, msg.ep_size, dry_run=msg.dry_run, req_id=rid)
                if not isinstance(job, ResizeJob):
                    return job, []  # a repeat of the resize in progress
                return Later(job.run, lambda plan: st.finish_resize(job, plan, dry_run=msg.dry_run, req_id=rid),
                              rid)
            case GetResizeRequest():
                return st.get_resize(msg.epoch, req_id=rid), []
            case GetConfigRequest():
                return ConfigReply(config=self.settings.model_dump(mode="json"), req_id=rid), []
            case SetConfigRequest():
                new = apply_update(self.settings, msg.key, msg.value)
                st.set_settings(new)  # may refuse it (a window beyond window_memory_bytes)
                self.settings = new
                log.info("config %s set to %r by operator", msg.key, getattr(self.settings, msg.key))
                return ConfigReply(config=self.settings.model_dump(mode="json"), req_id=rid), []
        raise ProtocolError(f"no handler for {type(msg).__name__}")

