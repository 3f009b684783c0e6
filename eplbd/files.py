"""Helpers shared by every module that reads or writes users' files (the daemon's state and placement
files, traces, SGLang's formats): atomic writes and the check of a load array."""

from __future__ import annotations

import os
import pathlib
from typing import Callable

import numpy as np

from eplbd.errors import TraceError


def write_atomic(path: str | os.PathLike, write: Callable[[pathlib.Path], None]) -> None:
    """Write ``path`` by ``write(tmp)`` on a sibling temp file, then rename: no reader sees half a file."""
    p = pathlib.Path(path)
    tmp = p.with_name(p.name + ".tmp")
    write(tmp)
    os.replace(tmp, p)


def validate_load(load: np.ndarray, *, where: str = "trace") -> np.ndarray:
    """Check a ``[steps, layers, experts]`` load array; return it as int64."""
    if load.ndim != 3:
        raise TraceError(f"{where}: 'load' must be [steps, layers, experts], got shape {load.shape}")
    if load.dtype.kind not in "iuf":
        raise TraceError(f"{where}: 'load' dtype {load.dtype} is not numeric")
    if load.dtype.kind == "f":
        if not np.isfinite(load).all():
            raise TraceError(f"{where}: 'load' contains NaN or infinite values")
        if (load != np.round(load)).any():
            raise TraceError(f"{where}: 'load' holds fractional token counts")
    if load.size and load.min() < 0:
        idx = np.unravel_index(int(np.argmin(load)), load.shape)
        raise TraceError(f"{where}: negative load {load[idx]} at [step, layer, expert]={tuple(int(i) for i in idx)}")
    if 0 in load.shape[1:]:
        raise TraceError(f"{where}: 'load' has no layers or no experts (shape {load.shape})")
    return load.astype(np.int64, copy=False)
