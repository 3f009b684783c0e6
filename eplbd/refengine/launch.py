"""``eplbd launch``: the daemon and N engine ranks on one machine, wired by environment variables.

1. Start ``eplbd serve`` (a child process in a session of its own; its log goes to
   ``<result-dir>/eplbd.log``) and wait for its ``READY rpc=... ingest=... metrics_port=...`` line.
2. Ask it (over RPC) for its ``commit_interval_steps`` and ``window_size``.
3. Run ``python -m torch.distributed.run --standalone --nproc-per-node N`` with ``EPLBD_RPC``,
   ``EPLBD_INGEST`` and ``EPLBD_COMMIT_INTERVAL_STEPS`` set (the daemon's own setting names):
   by default ``-m eplbd.refengine`` (the reference model), or any engine given after ``--``.
   While it runs, print one line of daemon state a second.
4. When the ranks have exited, take the daemon's final status and stop it with SIGTERM (its one
   shutdown path), SIGKILL only if it has not exited after ``grace_s``.

Ctrl-C or SIGTERM to the launcher stops everything: torchrun first (SIGTERM; torchrun stops its
ranks, which also die with torchrun if it is killed), then the daemon. Both children run in
sessions of their own, so a terminal's Ctrl-C reaches only the launcher and the order holds; if the
launcher itself is killed (SIGKILL), the kernel sends both SIGTERM (``die_with_parent``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import pathlib
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Iterator, Mapping

from eplbd.refengine.demo import DemoConfig, progress_line, summarize_ranks
from eplbd.errors import EplbdError, TraceError, UnavailableError
from eplbd.refengine.procs import RANK_TIE, tied

# Daemon settings the launcher uses when no --config is given: any free ports on loopback, and a
# window and interval short enough that a run of a few hundred steps sees plans commit.
REFERENCE_DAEMON: dict[str, Any] = {"rpc": "tcp://127.0.0.1:0", "ingest": "tcp://127.0.0.1:0", "metrics_port": 0,
                                    "window_size": 100, "step_interval": 150, "commit_interval_steps": 8}
ENGINE_ENV = ("rpc", "ingest", "commit_interval_steps")  # settings handed to the ranks as EPLBD_*


@dataclasses.dataclass
class LaunchConfig:
    """Args:
        rank: the reference ranks' options (``ranks`` is torchrun's ``--nproc-per-node``).
        daemon_settings: ``eplbd serve`` settings given on the command line (field -> value).
        config: the daemon's TOML file; ``REFERENCE_DAEMON`` fills what no layer sets.
        engine: torchrun's script and its arguments (``["-m", "pkg.mod", ...]``); None runs
            ``eplbd.refengine`` with ``rank`` and collects its results.
        result_dir: where the ranks' results and ``eplbd.log`` go (default: a new temporary dir).
        ready_timeout_s: how long to wait for the daemon's READY line.
        timeout_s: stop everything if the ranks run longer than this.
        grace_s: how long a SIGTERM-ed child may take before SIGKILL.
    """

    rank: DemoConfig
    daemon_settings: dict[str, Any] = dataclasses.field(default_factory=dict)
    config: str | None = None
    engine: list[str] | None = None
    result_dir: str | None = None
    ready_timeout_s: float = 90.0
    timeout_s: float = 3600.0
    grace_s: float = 20.0


def daemon_settings(cfg: LaunchConfig, env: Mapping[str, str]) -> dict[str, Any]:
    """The settings the launcher passes to ``eplbd serve`` as flags: the ones given to it, plus
    ``REFERENCE_DAEMON`` for each key that neither they, ``EPLBD_*`` nor the ``--config`` file set.

    Raises:
        ConfigError: the daemon would reject the result (checked here, before anything starts).
    """
    from eplbd.settings import env_name, load_settings, read_settings_file

    in_file = set(read_settings_file(pathlib.Path(cfg.config))) if cfg.config else set()
    fill = {k: v for k, v in REFERENCE_DAEMON.items() if k not in in_file and env_name(k) not in env}
    given = {**fill, **cfg.daemon_settings}
    load_settings(config_file=cfg.config, env=env, cli=given)
    return given


def serve_argv(settings: Mapping[str, Any], config: str | None = None) -> list[str]:
    """Returns: the ``eplbd serve`` command line with ``settings`` as flags (and ``--config`` if given)."""
    from eplbd.settings import flag_name

    argv = [sys.executable, "-m", "eplbd.cli", "serve"] + (["--config", config] if config else [])
    return argv + [x for k, v in settings.items() for x in (flag_name(k), str(v))]


class DaemonProcess:
    """``eplbd serve`` as a child: its stdout is read on a thread (the READY line), stderr is logged."""

    def __init__(self, argv: list[str], log_path: pathlib.Path) -> None:
        self.log_path = log_path
        self._log = log_path.open("ab")
        self.proc = subprocess.Popen(tied(argv), stdout=subprocess.PIPE, stderr=self._log, stdin=subprocess.DEVNULL,
                                     text=True, start_new_session=True)
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, name="eplbd-stdout", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def wait_ready(self, timeout_s: float) -> dict[str, str]:
        """Returns: the READY line's fields (``rpc``, ``ingest``, ``metrics_port``).

        Raises:
            UnavailableError: the daemon exited or stayed silent; the message quotes its log's tail.
        """
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self._lines.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                break
            if line.startswith("READY "):
                return dict(kv.split("=", 1) for kv in line.split()[1:])
        self.stop(0)
        raise UnavailableError(f"eplbd serve did not become ready within {timeout_s:g}s (exit code "
                          f"{self.proc.poll()}); last lines of {self.log_path}:\n{self.log_tail()}")

    def log_tail(self, lines: int = 15) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, grace_s: float) -> int:
        """SIGTERM, then SIGKILL after ``grace_s``. Returns: the exit code (negative: killed by that signal)."""
        rc = _terminate(self.proc, grace_s)
        self._reader.join(5)  # at EOF once the daemon is gone
        if not self._reader.is_alive() and self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()
        return rc


def _terminate(proc: subprocess.Popen, grace_s: float) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # its own session: the child and anything it started
            proc.wait()
    return proc.returncode


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """In the main thread, SIGTERM takes the same path as Ctrl-C (KeyboardInterrupt)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


# -- the launch ------------------------------------------------------------------------------------
def engine_argv(cfg: LaunchConfig, result_dir: pathlib.Path) -> list[str]:
    """Returns: the torchrun command line (the reference engine unless ``cfg.engine`` names another)."""
    from eplbd.refengine.rank import rank_argv

    script = cfg.engine or ["-m", "eplbd.refengine", *rank_argv(cfg.rank), "--result-dir", str(result_dir)]
    # Each rank runs as torchrun would start it (python -u SCRIPT ARGS), but tied to torchrun first: when the
    # launcher is SIGKILLed torchrun gets SIGTERM, and its own shutdown of the ranks is not to be relied on
    # (ranks of any engine were seen outliving it).
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={cfg.rank.ranks}",
            "--no-python", *RANK_TIE, sys.executable, "-u", *script]


def engine_env(rpc: str, ingest: str, commit_interval_steps: int) -> dict[str, str]:
    """Returns: this process's environment plus the ``EPLBD_*`` wiring the ranks read."""
    from eplbd.settings import env_name

    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")  # as torchrun would set, without its warning
    env.update({env_name(k): str(v) for k, v in zip(ENGINE_ENV, (rpc, ingest, commit_interval_steps))})
    return env


def launch(cfg: LaunchConfig, say: Callable[[str], None] = lambda line: None) -> dict[str, Any]:
    """Run the daemon and the ranks to the end; see the module docstring.

    Args:
        cfg: what to run.
        say: gets the header, one progress line a second and the closing lines.

    Returns:
        ``{"ok", "engine_rc", "daemon_rc", "endpoints", "result_dir", "daemon_log", "summary"}``;
        ``summary`` is ``eplbd demo``'s summary for the reference engine (None for another engine
        or when the ranks failed).

    Raises:
        UnavailableError: the daemon did not start.
        EplbdError: the ranks ran past ``cfg.timeout_s`` (both children are stopped first).
        KeyboardInterrupt: Ctrl-C or SIGTERM; both children are stopped first.
    """
    from eplbd.client.rpc import EplbClient

    if cfg.engine is None and cfg.rank.routing == "trace" and not pathlib.Path(cfg.rank.trace).is_file():
        raise TraceError(f"routing trace {cfg.rank.trace!r} not found (pass --trace or --routing router)")
    result_dir = pathlib.Path(cfg.result_dir or tempfile.mkdtemp(prefix="eplbd-launch-"))
    result_dir.mkdir(parents=True, exist_ok=True)
    engine: subprocess.Popen | None = None
    t0 = time.monotonic()
    with _sigterm_as_interrupt():
        daemon = DaemonProcess(serve_argv(daemon_settings(cfg, os.environ), cfg.config), result_dir / "eplbd.log")
        try:
            ready = daemon.wait_ready(cfg.ready_timeout_s)
            with EplbClient(ready["rpc"], timeout=10) as client:
                conf = client.get_config().config
                rank_cfg = dataclasses.replace(cfg.rank, commit_interval_steps=conf["commit_interval_steps"],
                                               window_size=conf["window_size"])
                argv = engine_argv(dataclasses.replace(cfg, rank=rank_cfg), result_dir)
                say(f"eplbd (pid {daemon.proc.pid}) ready: rpc={ready['rpc']} ingest={ready['ingest']} "
                    f"metrics_port={ready['metrics_port']} (log {daemon.log_path})")
                say("engine: torchrun " + " ".join(argv[3:]))
                engine = subprocess.Popen(tied(argv), env=engine_env(ready["rpc"], ready["ingest"],
                                                               rank_cfg.commit_interval_steps),
                                          stdin=subprocess.DEVNULL, start_new_session=True)
                engine_rc = _follow(engine, daemon, client, cfg.timeout_s, say)
                status = _final_status(client)
        finally:
            if engine is not None:
                _terminate(engine, cfg.grace_s)
            daemon_rc = daemon.stop(cfg.grace_s)
    say(f"ranks exited with {engine_rc}; eplbd stopped with {daemon_rc} after {time.monotonic() - t0:.1f}s")
    summary = None
    if cfg.engine is None and engine_rc == 0:
        from eplbd.refengine.rank import load_results
        summary = summarize_ranks(rank_cfg, load_results(result_dir, rank_cfg.ranks), status,
                                  time.monotonic() - t0)
    ok = engine_rc == 0 and daemon_rc == 0 and (summary is None or summary["outputs_identical"])
    return {"ok": ok, "engine_rc": engine_rc, "daemon_rc": daemon_rc, "endpoints": ready,
            "result_dir": str(result_dir), "daemon_log": str(daemon.log_path), "summary": summary}


def _follow(engine: subprocess.Popen, daemon: DaemonProcess, client: Any, timeout_s: float,
            say: Callable[[str], None]) -> int:
    """Wait for the ranks, a progress line a second when it changed. Returns: torchrun's exit code."""
    deadline = time.monotonic() + timeout_s
    daemon_gone = False
    last = ""
    while True:
        try:
            return engine.wait(1.0)
        except subprocess.TimeoutExpired:
            pass
        if time.monotonic() > deadline:
            raise EplbdError(f"the ranks ran past --timeout {timeout_s:g}s")
        if daemon.proc.poll() is not None and not daemon_gone:
            daemon_gone = True  # the ranks keep serving on their last placement
            say(f"eplbd exited with {daemon.proc.returncode}; the ranks go on without it:\n{daemon.log_tail(5)}")
        line = "" if daemon_gone else progress_line(client)
        if line and line != last:
            say(line)
        last = line


def _final_status(client: Any) -> Any:
    try:
        return client.status()
    except UnavailableError:
        return None


# -- command line ------------------------------------------------------------------------------------
# Daemon settings `eplbd launch` takes as flags; every other one comes from --config or EPLBD_*.
LAUNCH_SETTINGS = ("rpc", "ingest", "metrics_port", "window_size", "step_interval", "commit_interval_steps",
                   "policy", "min_gain", "state_dir", "log_level")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``eplbd launch``'s flags: ranks, the reference rank's options, a few daemon settings, the engine."""
    from eplbd.refengine.rank import add_rank_arguments
    from eplbd.settings import CONFIG_ENV, DaemonSettings, env_name, flag_name

    p.add_argument("--ranks", type=int, default=4, help="engine ranks (torchrun --nproc-per-node) [default 4]")
    p.add_argument("--result-dir", default=None, help="ranks' results and eplbd.log (default: a new temp dir)")
    p.add_argument("--timeout", type=float, default=3600.0, help="stop everything after this many seconds")
    p.add_argument("--json", action="store_true", help="print one JSON object at the end, nothing else")
    add_rank_arguments(p.add_argument_group("reference engine (eplbd.refengine)"))
    d = p.add_argument_group("daemon", "passed to eplbd serve as flags; others from --config or EPLBD_*. Without "
                                       "a value from any layer: " + ", ".join(f"{k}={v}" for k, v in
                                                                              REFERENCE_DAEMON.items()))
    d.add_argument("--config", default=None, metavar="PATH", help=f"daemon TOML settings file [env {CONFIG_ENV}]")
    for field in LAUNCH_SETTINGS:
        desc = (DaemonSettings.model_fields[field].description or "").replace("%", "%%")
        d.add_argument(flag_name(field), dest=field, default=None, help=f"{desc} [env {env_name(field)}]")
    p.add_argument("engine", nargs=argparse.REMAINDER,
                   help="after --: torchrun's script and arguments instead of the reference engine "
                        "(e.g. -- -m mypkg.serve --port 8000); the ranks get EPLBD_RPC, EPLBD_INGEST and "
                        "EPLBD_COMMIT_INTERVAL_STEPS")


def config_from_args(args: argparse.Namespace) -> LaunchConfig:
    """Returns: the LaunchConfig of ``add_arguments``' flags."""
    from eplbd.refengine.rank import rank_config
    from eplbd.settings import CONFIG_ENV

    engine = args.engine[1:] if args.engine[:1] == ["--"] else args.engine
    return LaunchConfig(rank=rank_config(args, ranks=args.ranks, commit_interval_steps=1),  # the daemon's, later
                        daemon_settings={f: getattr(args, f) for f in LAUNCH_SETTINGS if getattr(args, f) is not None},
                        config=args.config or os.environ.get(CONFIG_ENV) or None, engine=engine or None,
                        result_dir=args.result_dir, timeout_s=args.timeout)


def main_from_args(args: argparse.Namespace) -> int:
    """``eplbd launch``: exit 0 when the ranks and the daemon exited cleanly and outputs never changed."""
    import json

    from eplbd.refengine.demo import print_summary

    cfg = config_from_args(args)
    out = launch(cfg, say=(lambda line: None) if args.json else (lambda line: print(line, flush=True)))
    if args.json:
        print(json.dumps(out))
    elif out["summary"] is not None:
        print_summary(out["summary"])
    return 0 if out["ok"] else 1
