"""Fault injection around ``eplbd demo``: what the fault tests drive (``tests/test_faults*.py``).

``run_demo(cfg, hooks=DemoHooks(during=..., after=...))`` hands the hooks a ``DemoHarness``:
the parent's handle on the run. With ``cfg.daemon_process`` the daemon runs in its own process
on fixed endpoints, so a hook can SIGKILL it and start it again (same endpoints, same state
dir, or with the state dir wiped); the workers' step counter and a stop flag are shared.
Worker-side faults (a rank killing itself mid-transfer, duplicated/reordered messages, a
throttled load sender) are ``DemoConfig`` options that end up in ``eplbd.client.agent.Chaos``.

What the survivors of a killed rank do is defined here too (``survivor_report``): the reference
model dispatches tokens over the same gloo group, so without the dead rank no forward pass can
run. A real engine would stop or rebuild its EP group (elastic EP); the survivors here check
that they are still on their last agreed placement, that their own experts still compute
correctly on a probe, that the plan in flight is gone, and then exit cleanly.
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import shutil
import time
from typing import Any, Callable

from eplbd.errors import EplbdError, UnavailableError
from eplbd.refengine.embedded import daemon_cli, daemon_main, daemon_thread, free_port


@dataclasses.dataclass
class DemoHooks:
    """``during(h)`` runs on a thread while the workers step (a scenario: kill, restart, wait);
    ``after(h, results)`` runs when every worker is done, with the daemon still up. Their return
    values land in the summary under ``"during"`` and ``"after"``."""

    during: Callable[["DemoHarness"], Any] | None = None
    after: Callable[["DemoHarness", dict[int, dict]], Any] | None = None


class DemoHarness:
    """The daemon of a demo run and the workers' shared controls.

    Args:
        cfg: the run's ``DemoConfig``.
        ctx: the multiprocessing context the workers use.
    """

    def __init__(self, cfg: Any, ctx: Any) -> None:
        self.cfg = cfg
        self.ctx = ctx
        self.stop_event = ctx.Event()
        self.step_value = ctx.Value("q", -1, lock=False)
        self.daemon: Any = None  # the thread daemon (its state is readable in-process)
        self._proc: mp.Process | None = None
        self._standby: tuple[mp.Process, Any] | None = None
        self._stop_thread: Callable[[], None] = lambda: None
        self._client: Any = None
        if cfg.daemon_process:
            self.rpc, self.ingest = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
            self.start_daemon(cut=cfg.daemon_cut)
        elif cfg.daemon:
            self.daemon, self._stop_thread = daemon_thread(cfg)
            self.rpc, self.ingest = self.daemon.rpc_endpoint, self.daemon.ingest_endpoint
        else:
            self.rpc, self.ingest = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"

    # -- the daemon process -------------------------------------------------------------------
    def start_daemon(self, *, cut: dict[str, int] | None = None, wipe_state: bool = False,
                     **settings: Any) -> str:
        """Start the daemon process on the run's endpoints; returns its daemon id.

        Args:
            cut: daemon-side message cut (``MessageChaos.cut``), e.g. ``{"Commit": 0}`` to freeze
                plans once staged.
            wipe_state: delete the state dir first (a daemon that lost its disk).
            settings: daemon settings overriding the run's for this incarnation.
        """
        if not self.cfg.daemon_process:
            raise RuntimeError("start_daemon needs DemoConfig.daemon_process=True")
        if self._proc is not None and self._proc.is_alive():
            raise RuntimeError("the daemon is already running")
        if wipe_state and self.cfg.state_dir:
            shutil.rmtree(self.cfg.state_dir, ignore_errors=True)
        proc, conn = self._standby or self._spawn()
        conn.send((daemon_cli(self.cfg, self.rpc, self.ingest, **settings), cut, self.cfg))
        if not conn.poll(60):
            raise RuntimeError("the daemon process did not start within 60s")
        what, detail = conn.recv()
        if what != "ready":
            raise RuntimeError(f"the daemon process failed to start: {detail}")
        self._proc = proc
        self._standby = self._spawn()  # the next incarnation imports while this one serves
        return detail

    def _spawn(self) -> tuple[mp.Process, Any]:
        here, there = self.ctx.Pipe()
        proc = self.ctx.Process(target=daemon_main, args=(there,), daemon=True)
        proc.start()
        there.close()
        return proc, here

    def kill_daemon(self) -> None:
        """SIGKILL the daemon process (no shutdown path runs) and wait for it to be gone."""
        if self._proc is None:
            raise RuntimeError("no daemon process to kill")
        self._proc.kill()
        self._proc.join(10)
        self._proc = None

    def stop_daemon(self) -> None:
        self._stop_thread()
        if self._standby is not None:
            proc, conn = self._standby
            conn.send(None)  # the standby was not needed: it exits
            proc.join(10)
            if proc.is_alive():
                proc.kill()
            self._standby = None
        if self._proc is not None:
            self._proc.terminate()
            self._proc.join(10)
            if self._proc.is_alive():
                self._proc.kill()
            self._proc = None

    # -- queries ---------------------------------------------------------------------------------
    def client(self) -> Any:
        """An ``EplbClient`` for the hooks' thread (reconnects by itself across daemon restarts)."""
        from eplbd.client.rpc import EplbClient
        if self._client is None:
            self._client = EplbClient(self.rpc, timeout=2)
        return self._client

    def wait(self, pred: Callable[[Any], Any], timeout: float, what: str) -> Any:
        """Poll the daemon's status until ``pred(status)`` is true; returns that status.

        Raises:
            TimeoutError: naming ``what`` and the last status seen.
        """
        end, last = time.monotonic() + timeout, None
        while time.monotonic() < end:
            try:
                last = self.client().status()
                if pred(last):
                    return last
            except EplbdError as exc:
                last = exc
            time.sleep(0.05)
        raise TimeoutError(f"waited {timeout:g}s for {what}; last status: {last}")

    @property
    def step(self) -> int:
        """Rank 0's latest finished step."""
        return int(self.step_value.value)

    def stop_workers(self) -> None:
        """Make the workers of an ``until_stopped`` run stop at their next agreed boundary."""
        self.stop_event.set()

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
        self.stop_daemon()


# -- worker side ---------------------------------------------------------------------------------
def agreed_stop(stop_event: Any) -> bool:
    """Collective over the default group: True on every rank once any rank saw the stop flag."""
    import torch
    import torch.distributed as dist

    flag = torch.tensor([int(stop_event is not None and stop_event.is_set())])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def group_lost(exc: BaseException) -> bool:
    """Whether ``exc`` is what a collective raises when a peer of the group is gone."""
    return isinstance(exc, (RuntimeError, UnavailableError))


def survivor_report(agent: Any, model: Any, mcfg: Any, base_epoch: int, base_phy2log: Any, step: int,
                    exc: BaseException, wait_s: float) -> dict:
    """What a rank that lost a peer checks before it exits (see the module docstring).

    Args:
        agent, model: this rank's ``PlacementAgent`` and ``RefMoEModel``.
        mcfg: the model's ``RefMoEConfig``.
        base_epoch, base_phy2log: the placement the rank was on when the peer died.
        step: the step at which the group failed.
        exc: what the failed collective raised.
        wait_s: how long to wait for the daemon's abort of the plan in flight.

    Returns:
        JSON-able: the failure, whether the plan in flight was dropped, whether the placement and
        the epoch are unchanged, and whether the local experts still give the right outputs.
    """
    import torch

    from eplbd.refengine.model import expert_stage, local_expert_weights

    end = time.monotonic() + wait_s
    while agent.plan_in_flight is not None and time.monotonic() < end:
        time.sleep(0.05)
    rank, nl = agent.rank, model.num_local_physical_experts
    gen = torch.Generator().manual_seed(1234 + rank)
    rows = torch.randn((4 * nl, mcfg.hidden), generator=gen, dtype=mcfg.dtype)
    want = local_expert_weights(mcfg, agent.phy2log, rank)
    local_ok = all(torch.equal(expert_stage(rows, [4] * nl, model.expert_weights[layer], mcfg),
                               expert_stage(rows, [4] * nl, want[layer], mcfg))
                   for layer in range(mcfg.num_layers))
    return {"step": step, "error": f"{type(exc).__name__}: {exc}"[:300],
            "plan_in_flight": agent.plan_in_flight, "epoch": agent.epoch,
            "placement_unchanged": agent.epoch == base_epoch and bool(torch.equal(agent.phy2log, base_phy2log)),
            "local_probe_ok": local_ok}
