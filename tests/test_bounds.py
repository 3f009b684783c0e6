"""Bounds on what a registrant or an operator can make the daemon allocate or compute, checked before
anything is allocated, and heavy work kept off the event loop. Real daemons, real sockets."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
import zmq

from daemon_helpers import E, G, L, P, DaemonThread, make_ranks, skewed_step_load, wait_for
from eplbd import errors
from eplbd.client.rpc import EplbClient
from eplbd.client.worker import WorkerLink
from eplbd.policy import initial_placement
from eplbd.proto import Decoder, Encoder, ErrorReply, ResizeReply, ResizeRequest, make_socket
from eplbd.daemon.loops import MAX_PENDING
from eplbd.daemon.window import LoadWindow, window_bytes


def _register_shape(d: DaemonThread, layers: int, experts: int, ep_size: int = 1) -> None:
    link = WorkerLink(d.rpc, d.ingest, 0, timeout=10)
    try:
        link.register(ep_size=ep_size, num_layers=layers, num_logical=experts, num_physical=experts, epoch=0,
                      phy2log=torch.arange(experts).repeat(layers, 1))
    finally:
        link.close()


def test_window_bytes_is_what_a_window_allocates():
    w = LoadWindow(50, 3, 8, 12)
    held = sum(a.nbytes for a in vars(w).values() if hasattr(a, "nbytes"))
    assert window_bytes(50, 3, 8, 12) == held


def test_a_giant_first_registration_is_refused_naming_the_bound_before_allocating():
    with DaemonThread() as d:  # default bounds
        with pytest.raises(errors.LimitExceededError, match=r"num_layers=400 exceeds max_layers=256"):
            _register_shape(d, 400, 7000)
        assert d.state.window is None and d.state.topo is None  # nothing adopted, nothing allocated
    with DaemonThread(max_layers=1000, max_experts=8000) as d:
        # 400 layers x 7000 experts: ~22 GB of window at the default 1000 steps (the attack's figure).
        with pytest.raises(errors.LimitExceededError, match=r"needs 22444\d+ bytes, more than "
                                                            r"window_memory_bytes=2147483648") as info:
            _register_shape(d, 400, 7000)
        assert info.value.code == 205 and d.state.window is None
        with pytest.raises(errors.LimitExceededError, match=r"ep_size=2000 exceeds max_ep_size=1024"):
            _register_shape(d, 1, 2000, ep_size=2000)
        assert d.state.counters.refused[("RegisterWorker", "limit")] == 2
        links, _ = make_ranks(d)  # a sane group still registers
        assert d.state.topo.num_gpus == G
        for link in links:
            link.close()


def test_resize_beyond_max_ep_size_is_refused_at_once_and_window_size_beyond_the_budget_too():
    with DaemonThread(step_interval=100_000, max_experts=2000, window_memory_bytes=16 << 20) as d:
        links, phy2log = make_ranks(d)
        links[0].send_report(0, skewed_step_load(np.random.default_rng(0), phy2log, 5), 0)
        assert wait_for(lambda: d.state.window.fill == 5)
        with EplbClient(d.rpc, timeout=5) as c:
            t0 = time.monotonic()
            with pytest.raises(errors.LimitExceededError, match=r"ep_size=100000 .* exceeds max_ep_size=1024"):
                c.resize([0, 1, 2, 3], ep_size=100_000)
            assert time.monotonic() - t0 < 2.0
            with pytest.raises(errors.LimitExceededError, match=r"resize 4 -> 1000 ranks.*num_physical_experts=3000 "
                                                                r"exceeds max_experts=2000"):
                c.resize([0, 1, 2, 3], ep_size=1000)
            assert c.status().epoch == 0 and c.status().ep_size == G
            want = window_bytes(1_000_000, L, E, P)
            with pytest.raises(errors.LimitExceededError, match=rf"window_size=1000000.*needs {want} bytes"):
                c.set_config("window_size", 1_000_000)
            assert c.get_config().config["window_size"] == 1000 and d.state.window.window_size == 1000
            assert c.set_config("window_size", 500).config["window_size"] == 500  # within budget: taken
        for link in links:
            link.close()


def test_a_daemon_serves_the_model_it_learned_and_pinned_in_its_state_file(tmp_path):
    state_dir = str(tmp_path / "state")
    with DaemonThread(state_dir=state_dir) as d:
        links, _ = make_ranks(d)
        for link in links:
            link.close()
    with DaemonThread(state_dir=state_dir) as d:  # restarted: the pin comes from state.json
        with pytest.raises(errors.RegistrationMismatchError,
                           match=rf"num_layers=5 but this daemon serves a model with num_layers={L} "
                                 rf"\(pinned in {state_dir}/state.json\)"):
            _register_shape(d, 5, E)
        links, _ = make_ranks(d)  # the same model, any EP size within bounds, still registers
        for link in links:
            link.close()


def test_status_answers_within_a_second_while_a_large_resize_is_planned():
    layers, ep_size = 48, 2000
    phy2log = initial_placement(layers, E, P, G, "linear")
    with DaemonThread(step_interval=100_000, max_ep_size=4096, max_experts=8192) as d:
        links = [WorkerLink(d.rpc, d.ingest, r, timeout=5) for r in range(G)]
        for link in links:
            link.register(ep_size=G, num_layers=layers, num_logical=E, num_physical=P, epoch=0, phy2log=phy2log)
        links[0].send_report(0, torch.ones(3, layers, P, dtype=torch.int64), 0)
        assert wait_for(lambda: d.state.window.fill == 3)
        result: dict = {}

        def resize() -> None:
            with EplbClient(d.rpc, timeout=120) as c:
                result["reply"] = c.resize([0, 1, 2, 3], ep_size=ep_size)
            result["done"] = time.monotonic()

        worker = threading.Thread(target=resize)
        worst, during = 0.0, 0
        with EplbClient(d.rpc, timeout=5) as c:
            t0 = time.monotonic()
            worker.start()
            while worker.is_alive():
                start = time.monotonic()
                c.status()
                end = time.monotonic()
                if "done" not in result or result["done"] > end:
                    worst, during = max(worst, end - start), during + 1
                time.sleep(0.05)
            worker.join()
            took = result["done"] - t0
        assert result["reply"].info.ep_size == ep_size and d.state.topo.num_gpus == ep_size
        # The planning took long enough that a blocked loop would have shown; status kept answering.
        assert during >= 5, f"only {during} status replies during a {took:.2f}s resize"
        assert worst < 1.0, f"status took {worst:.2f}s during a {took:.2f}s resize"
        for link in links:
            link.close()


def test_requests_waiting_on_the_executor_are_bounded():
    layers = 16
    phy2log = initial_placement(layers, E, P, G, "linear")
    with DaemonThread(step_interval=100_000, max_ep_size=4096, max_experts=8192) as d:
        links = [WorkerLink(d.rpc, d.ingest, r, timeout=5) for r in range(G)]
        for link in links:
            link.register(ep_size=G, num_layers=layers, num_logical=E, num_physical=P, epoch=0, phy2log=phy2log)
        ctx = zmq.Context()
        dealer = make_socket(ctx, zmq.DEALER, connect=d.rpc, linger_ms=0)
        try:
            n = MAX_PENDING + 4
            enc, dec = Encoder(), Decoder()
            for i in range(n):  # dry runs: each plans a 1500-rank group in the executor
                dealer.send_multipart(enc.encode(ResizeRequest(mapping=[0, 1, 2, 3], ep_size=1500, dry_run=True,
                                                               req_id=i + 1)))
            replies = []
            for _ in range(n):
                assert dealer.poll(120_000)
                replies.append(dec.decode(dealer.recv_multipart()))
        finally:
            dealer.close(linger=0)
            ctx.term()
        busy = [r for r in replies if isinstance(r, ErrorReply)]
        assert len(busy) == n - MAX_PENDING and all(r.name == "unavailable" for r in busy)
        assert sum(isinstance(r, ResizeReply) and r.dry_run for r in replies) == MAX_PENDING
        assert d.state.epoch == 0 and d.state.topo.num_gpus == G
        for link in links:
            link.close()
