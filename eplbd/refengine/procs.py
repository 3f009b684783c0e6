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


def _exec_tied(parent: int, argv: list[str]) -> None:
    """``die_with_parent``, then exec ``argv`` (the setting survives exec) unless ``parent`` is gone already."""
    die_with_parent()
    if parent == 1 or os.getppid() != parent:  # the parent died before the setting took
        sys.exit(1)
    os.execv(argv[0], argv)


def exec_tied(argv: list[str]) -> None:
    """``python -c ... PARENT_PID CMD...`` (``tied``): exec CMD tied to the launcher PARENT_PID."""
    _exec_tied(int(argv[0]), argv[1:])


def tied(argv: list[str]) -> list[str]:
    """Returns: ``argv`` wrapped to run with ``die_with_parent`` set for this (the launcher's) process."""
    return [sys.executable, "-c", "import sys; from eplbd.refengine.procs import exec_tied; exec_tied(sys.argv[1:])",
            str(os.getpid()), *argv]


def exec_tied_to_parent(argv: list[str]) -> None:
    """``python -c ... CMD...`` started by some parent (torchrun, for an engine rank): exec CMD tied to it,
    so the rank gets SIGTERM when its parent exits however it exits, whatever the engine."""
    _exec_tied(os.getppid(), argv)


RANK_TIE = [sys.executable, "-c", "import sys; from eplbd.refengine.procs import exec_tied_to_parent; "
            "exec_tied_to_parent(sys.argv[1:])"]
