"""Whether the policies run their compiled inner loops (numba) or the numpy references.

The compiled loops (:mod:`eplbd.policy.kernels`, :mod:`eplbd.policy.incremental_search`) give the same
plans bit for bit as the numpy code they replace, several times faster. They need a JIT: where the
process may not map writable memory executable (systemd's ``MemoryDenyWriteExecute=yes``, which
``deploy/`` sets, or SELinux's ``deny_execmem``), importing numba fails and every policy runs on numpy,
with the same results. ``EPLBD_NO_JIT=1`` chooses numpy on purpose.

Compiled code is cached on disk next to the modules, or in ``NUMBA_CACHE_DIR`` (numba's ``cache=True``;
the container image points it at ``/tmp``, its root file system being read-only), so only the first
process after an install compiles (about 10 s on a small machine); :func:`eplbd.policy.incremental.warm` does it ahead
of time (``make test`` runs it; the daemon runs it on a worker thread at start).
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import threading
from collections.abc import Callable

_lock = threading.Lock()
_state: dict[str, object] = {}


def enabled() -> bool:
    """True when the compiled loops can run here (decided once per process)."""
    if "on" not in _state:
        with _lock:
            if "on" not in _state:
                _state["on"], _state["why"] = _probe()
    return bool(_state["on"])


def reason() -> str:
    """Why the policies run on numpy, or which numba compiles them (and whether it caches them on disk)."""
    enabled()
    if _state["on"] and "uncached" in _state:
        return f"{_state['why']}, not cached: no writable cache directory (set NUMBA_CACHE_DIR)"
    return str(_state["why"])


def disable(why: str) -> None:
    """Run every policy on numpy from now on, in this process (``why`` becomes :func:`reason`)."""
    with _lock:
        _state["on"], _state["why"] = False, why


def _probe() -> tuple[bool, str]:
    if os.environ.get("EPLBD_NO_JIT", "") not in ("", "0"):
        return False, "numpy (EPLBD_NO_JIT is set)"
    try:
        import numba
    except Exception as exc:  # noqa: BLE001 - PermissionError under MemoryDenyWriteExecute, ImportError, ...
        return False, f"numpy (numba unavailable: {type(exc).__name__}: {exc})"
    return True, f"compiled (numba {numba.__version__})"


def njit(fn: Callable) -> Callable:
    """numba's ``njit`` with the options every kernel uses: cached on disk, releasing the GIL (the daemon
    runs policies on a worker thread while its event loop goes on). Where numba finds no writable cache
    directory (a read-only root file system without ``NUMBA_CACHE_DIR``), it compiles in memory, once per
    process."""
    import numba

    try:
        kernel = numba.njit(cache=True, nogil=True)(fn)
    except RuntimeError as exc:  # "cannot cache function ...: no locator available"
        _state["uncached"] = str(exc)
        return numba.njit(nogil=True)(fn)
    _forget_if_sources_changed(kernel, fn)
    return kernel


# numba keys a function's cached machine code on its own file only, but a kernel inlines the kernels and
# constants it uses from the other kernel modules: a change to any of them must drop every cached kernel.
_KERNEL_SOURCES = ("jit.py", "kernels.py", "incremental_search.py", "incremental_layout.py")


def _sources_digest() -> str:
    if "digest" not in _state:
        h = hashlib.sha256()
        for name in _KERNEL_SOURCES:
            h.update(pathlib.Path(__file__).with_name(name).read_bytes())
        _state["digest"] = h.hexdigest()
    return str(_state["digest"])


def _forget_if_sources_changed(kernel: Callable, fn: Callable) -> None:
    """Flush ``kernel``'s on-disk cache unless it was compiled from the kernel sources as they are now (a
    stamp per function next to numba's index records which)."""
    path = kernel._cache.cache_path  # noqa: SLF001 - numba's cache object is the only handle on it
    if path is None:
        return
    stamp = pathlib.Path(path) / f"{fn.__module__}.{fn.__qualname__}.eplbd-sources"
    digest = _sources_digest()
    try:
        if stamp.read_text() == digest:
            return
    except OSError:
        pass
    kernel._cache.flush()  # noqa: SLF001
    try:
        stamp.write_text(digest)
    except OSError:  # a read-only cache: it is flushed again next time, and compiled again
        pass
