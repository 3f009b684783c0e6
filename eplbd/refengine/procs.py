"""Child processes that die with their parent: the kernel's parent-death signal (Linux), set directly
(``die_with_parent``) or around an exec (``tied``), so a killed launcher or demo leaves no orphans."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys


def die_with_parent() -> None:
    """Ask the kernel to send this process SIGTERM when its parent exits, even by SIGKILL (Linux's
    PR_SET_PDEATHSIG; elsewhere a no-op). SIGTERM is the normal stop path of the daemon, torchrun and
    the ranks, so a killed launcher still leaves no orphans."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG


def exec_tied(argv: list[str]) -> None:
    """``python -c ... PARENT_PID CMD...``: ``die_with_parent``, then exec CMD (the setting survives exec)."""
    die_with_parent()
    if os.getppid() != int(argv[0]):  # the launcher died before the setting took
        sys.exit(1)
    os.execv(argv[1], argv[1:])


def tied(argv: list[str]) -> list[str]:
    """Returns: ``argv`` wrapped to run with ``die_with_parent`` set for this (the launcher's) process."""
    return [sys.executable, "-c", "import sys; from eplbd.refengine.procs import exec_tied; exec_tied(sys.argv[1:])",
            str(os.getpid()), *argv]


def exec_tied_to_parent(argv: list[str]) -> None:
    """``python -c ... CMD...`` started by some parent (torchrun, for an engine rank): ``die_with_parent``,
    then exec CMD, so the rank gets SIGTERM when its parent exits however it exits, whatever the engine."""
    parent = os.getppid()
    die_with_parent()
    if parent == 1 or os.getppid() != parent:  # the parent died before the setting took
        sys.exit(1)
    os.execv(argv[0], argv)


RANK_TIE = [sys.executable, "-c", "import sys; from eplbd.refengine.procs import exec_tied_to_parent; "
            "exec_tied_to_parent(sys.argv[1:])"]
