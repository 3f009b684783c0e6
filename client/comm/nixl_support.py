"""What the NIXL communicator (``eplbd.client.comm.nixl``) stands on: the bindings of whichever nixl wheel is
installed, the availability probe, the agent's configuration, and the records it keeps per registered
region, per peer and per read in flight, with the checks of the tensors handed to it."""

from __future__ import annotations

import functools
import itertools
import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from eplbd.errors import InvalidArgumentError

# Poll timeout of the UCX progress thread, in microseconds (rounded up to 1 ms by nixl).
_PROGRESS_DELAY_US = 1000
_agent_ids = itertools.count()  # agents' names stay unique within a process


def _bindings() -> Any:
    """The ``nixl._bindings`` module of whichever nixl wheel (cu12/cu13) ``nixl`` picked."""
    import nixl

    return nixl._bindings


@functools.cache
def nixl_available(backend: str = "UCX") -> str | None:
    """None if ``nixl`` imports and an agent with ``backend`` can be created here, else why not.

    Cached: the probe creates (and drops) a real agent, which costs a few hundred ms.
    """
    try:
        nb = _bindings()
    except Exception as exc:  # ImportError, or a broken wheel failing to load its libraries
        return f"cannot import nixl: {exc}"
    try:
        agent = nb.nixlAgent(f"eplbd-probe-{os.getpid()}-{next(_agent_ids)}", _agent_config(nb, progress=False))
        if backend not in agent.getAvailPlugins():
            return f"nixl has no {backend} plugin (has {', '.join(agent.getAvailPlugins()) or 'none'})"
        agent.createBackend(backend, {})
    except Exception as exc:
        return f"cannot create a nixl agent with the {backend} backend: {type(exc).__name__}: {exc}"
    return None


def _agent_config(nb: Any, *, progress: bool) -> Any:
    """What ``nixl_agent_config`` would build, but with a progress thread that sleeps (module docstring)."""
    cfg = nb.nixlAgentConfig()
    cfg.useProgThread = progress
    cfg.useListenThread = False  # metadata travels over the EP group, not nixl's own socket
    cfg.syncMode = nb.NIXL_THREAD_SYNC_NONE  # one caller thread at a time (see base.py)
    cfg.pthrDelay = _PROGRESS_DELAY_US
    cfg.captureTelemetry = False
    return cfg


@dataclass(frozen=True)
class _Region:
    """Where one rank's live tensor of one layer lies: ``num_slots`` slots of ``slot_bytes``, back to back."""

    addr: int
    slot_bytes: int
    num_slots: int
    dev: int


@dataclass(frozen=True)
class _InFlight:
    """A READ request that was still running when its batch gave up on it."""

    handle: int
    buf: int
    peer: int


@dataclass(frozen=True)
class _Peer:
    """What a rank publishes in ``setup``: its agent and the layout of its live tensors."""

    name: str
    metadata: bytes
    mem: str  # "DRAM" or "VRAM"
    live: tuple[tuple[_Region, ...], ...]  # [layer][tensor]


def _device_of(tensors: Sequence[torch.Tensor]) -> torch.device:
    """The one device every tensor is on (a NIXL descriptor list has a single memory type)."""
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise InvalidArgumentError(f"nixl needs all live and staging tensors on one device, got {sorted(map(str, devices))}")
    (device,) = devices
    if device.type not in ("cpu", "cuda"):
        raise InvalidArgumentError(f"nixl moves CPU (DRAM) or CUDA (VRAM) tensors, got one on {device}")
    return device


def _region(t: torch.Tensor, what: str) -> _Region:
    """The slot layout of a ``[num_slots, ...]`` tensor; slot ``i`` starts at ``addr + i * slot_bytes``."""
    if not t.is_contiguous() or t.dim() < 1 or t.shape[0] < 1:
        raise InvalidArgumentError(f"{what} must be contiguous with at least one slot, got shape {tuple(t.shape)}")
    return _Region(t.data_ptr(), t[0].nbytes, t.shape[0], 0 if t.device.type == "cpu" else t.device.index or 0)


def _check_shapes(live: Sequence[Sequence[torch.Tensor]], staging: Sequence[Sequence[torch.Tensor]]) -> None:
    """Every layer and every staging buffer holds the same tensors, slot for slot in bytes."""
    if not live or not staging:
        raise InvalidArgumentError(f"nixl needs at least one live layer and one staging buffer, got {len(live)} and {len(staging)}")
    ref = staging[0]
    for what, group in [*((f"live[{i}]", g) for i, g in enumerate(live)), *((f"staging[{i}]", g) for i, g in enumerate(staging))]:
        if len(group) != len(ref) or not group:
            raise InvalidArgumentError(f"{what} has {len(group)} tensors, staging[0] has {len(ref)}")
        for k, (t, r) in enumerate(zip(group, ref)):
            if t.dtype != r.dtype or t.shape[1:] != r.shape[1:]:
                raise InvalidArgumentError(f"{what}[{k}] is {t.dtype} {tuple(t.shape)}, staging[0][{k}] is "
                                           f"{r.dtype} {tuple(r.shape)}: an expert slot must have the same shape")
    if any(s[k].shape != ref[k].shape for s in staging for k in range(len(ref))):
        raise InvalidArgumentError("every staging buffer must have the same shapes as staging[0]")


def _text(name: Any) -> str:
    """``loadRemoteMD`` returns the remote agent's name as bytes in nixl 1.5.1."""
    return name.decode() if isinstance(name, bytes) else str(name)
