"""The daemon a demo run talks to: a real ``Daemon`` on loopback, on a thread of this process
(``daemon_thread``) or in a process of its own that a fault scenario can kill and restart
(``daemon_main``), with the settings and message chaos of a ``DemoConfig``."""

from __future__ import annotations

import socket
import threading
from typing import Any, Callable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def daemon_cli(cfg: Any, rpc: str, ingest: str, **overrides: Any) -> dict[str, Any]:
    """The daemon's settings for a demo run (``cfg.daemon_settings`` and ``overrides`` on top)."""
    cli = {"rpc": rpc, "ingest": ingest, "metrics_port": -1, "window_size": cfg.window_size,
           "step_interval": cfg.step_interval, "policy": cfg.policy, "commit_interval_steps": cfg.commit_interval_steps,
           "log_level": "warning", "state_dir": cfg.state_dir}
    return {**cli, **cfg.daemon_settings, **overrides}


def daemon_chaos(cfg: Any, cut: dict[str, int] | None):
    """The daemon-side ``MessageChaos`` of a run (None when it injects nothing)."""
    from eplbd.chaos import MessageChaos

    chaos = MessageChaos(dup_p=cfg.chaos_dup_p, reorder_p=cfg.chaos_reorder_p, cut=dict(cut or {}),
                         seed=cfg.seed + 1000)
    return chaos if chaos.active else None


def daemon_main(conn: Any) -> None:
    """Body of a daemon process: import everything, wait for ``(cli, cut, cfg)`` on ``conn``, then
    serve until killed (or SIGTERM). Started ahead of need, so a restart costs no import time."""
    import torch
    import uvloop

    from eplbd.daemon.server import Daemon
    from eplbd.settings import load_settings

    torch.set_num_threads(1)
    try:
        job = conn.recv()
    except EOFError:
        job = None
    if job is None:  # the standby was not needed
        return
    cli, cut, cfg = job

    async def main() -> None:
        daemon = Daemon(load_settings(config_file=None, env={}, cli=cli), chaos=daemon_chaos(cfg, cut))
        await daemon.start()
        conn.send(("ready", daemon.state.daemon_id))
        await daemon.run()

    try:
        uvloop.run(main())
    except BaseException as exc:  # reported to the parent if it is still listening
        conn.send(("error", f"{type(exc).__name__}: {exc}"))


def daemon_thread(cfg: Any) -> tuple[Any, Callable[[], None]]:
    """A real ``Daemon`` for ``cfg`` on loopback, on a thread of this process. Returns: it and its stop."""
    import asyncio

    import uvloop

    from eplbd.daemon.server import Daemon
    from eplbd.settings import load_settings

    settings = load_settings(config_file=None, env={},
                             cli=daemon_cli(cfg, "tcp://127.0.0.1:0", "tcp://127.0.0.1:0"))
    box: dict[str, Any] = {}
    ready = threading.Event()

    def run() -> None:
        async def main() -> None:
            box["daemon"] = Daemon(settings, chaos=daemon_chaos(cfg, cfg.daemon_cut))
            box["loop"] = asyncio.get_running_loop()
            await box["daemon"].start()
            ready.set()
            await box["daemon"].run()
        try:
            uvloop.run(main())
        except BaseException as exc:
            box["error"] = exc
            ready.set()

    t = threading.Thread(target=run, name="eplbd-daemon", daemon=True)
    t.start()
    if not ready.wait(15) or "error" in box:
        raise RuntimeError(f"embedded daemon did not start: {box.get('error')}")

    def stop() -> None:
        box["loop"].call_soon_threadsafe(box["daemon"].request_stop)
        t.join(10)

    return box["daemon"], stop
