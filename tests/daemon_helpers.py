"""Shared pieces for daemon integration tests: a daemon in a background thread and simulated ranks."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import torch
import uvloop

from eplbd.client.worker import WorkerLink
from eplbd.policy import initial_placement
from eplbd.daemon.server import Daemon
from eplbd.settings import load_settings

L, E, G, R = 3, 8, 4, 4  # layers, logical experts, ranks, redundant slots
P = E + R


class DaemonThread:
    """A real Daemon (uvloop, real sockets on loopback) run on a thread so a test can talk to it."""

    def __init__(self, **overrides):
        cli = {"rpc": "tcp://127.0.0.1:0", "ingest": "tcp://127.0.0.1:0", "metrics_port": 0, **overrides}
        self.settings = load_settings(config_file=None, env={}, cli=cli)
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.error: BaseException | None = None

    def _run(self):
        async def main():
            self.daemon = Daemon(self.settings)
            self.loop = asyncio.get_running_loop()
            await self.daemon.start()
            self._ready.set()
            await self.daemon.run()
        try:
            uvloop.run(main())
        except BaseException as exc:  # surfaced by stop()
            self.error = exc
            self._ready.set()

    def __enter__(self):
        self._thread.start()
        assert self._ready.wait(10), "daemon did not start"
        if self.error:
            raise self.error
        self.rpc, self.ingest = self.daemon.rpc_endpoint, self.daemon.ingest_endpoint
        return self

    def stop(self):
        self.loop.call_soon_threadsafe(self.daemon.request_stop)
        self._thread.join(10)
        assert not self._thread.is_alive(), "daemon did not stop"
        if self.error:
            raise self.error

    def __exit__(self, *exc):
        self.stop()

    @property
    def state(self):
        return self.daemon.state


def make_ranks(d: DaemonThread, n: int = G, *, epoch: int = 0, phy2log=None):
    phy2log = initial_placement(L, E, P, n, "linear") if phy2log is None else phy2log
    links = [WorkerLink(d.rpc, d.ingest, r, timeout=5) for r in range(n)]
    for link in links:
        link.register(ep_size=n, num_layers=L, num_logical=E, num_physical=P, epoch=epoch, phy2log=phy2log,
                      expert_bytes=1000)
    return links, phy2log


def skewed_step_load(rng, phy2log, steps=1):
    """[steps, L, P] physical load from a skewed logical distribution spread over replicas."""
    p = np.array([0.45, 0.2, 0.1, 0.05, 0.05, 0.05, 0.05, 0.05])
    logical = rng.multinomial(400, p, size=(steps, L))
    out = np.zeros((steps, L, P), np.int64)
    ph = phy2log.numpy()
    for l in range(L):
        for e in range(E):
            slots = np.flatnonzero(ph[l] == e)
            for i, s in enumerate(slots):
                out[:, l, s] = logical[:, l, e] // len(slots) + (i < logical[:, l, e] % len(slots))
    return torch.from_numpy(out)


def wait_for(cond, timeout=10.0, interval=0.02):
    import time
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(interval)
    return False
