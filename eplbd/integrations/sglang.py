"""SGLang expert-location and load files: read them as a placement or a trace, write ours in their format.

SGLang's ``--init-expert-location PATH`` (``srt/eplb/expert_location.py``,
``compute_initial_expert_location_metadata``) reads one object from a ``.pt`` file
(``torch.load(path, weights_only=True)``) or a ``.json`` file and dispatches on its keys:

- ``physical_to_logical_map``: ``[layers, num_physical]`` integers, the placement used as is
  (``ExpertLocationMetadata.init_by_mapping``, which takes no other key);
- ``logical_count``: ``[layers, num_logical]`` or ``[steps, layers, num_logical]`` token counts,
  from which SGLang computes a placement (``init_by_eplb``). Its expert distribution recorder
  (``srt/eplb/expert_distribution.py``, ``stat`` mode) dumps exactly that as
  ``expert_distribution_recorder_<time>.pt``: ``{"rank": 0, "logical_count": [steps, layers,
  num_logical], ...}``, counts summed over the ranks.

Here a ``physical_to_logical_map`` file is a placement (``eplbd.plans.read_placement_file``, so
``eplbctl load-placement``) and a ``logical_count`` file is a load trace (``eplbd.trace.load_trace``,
so ``eplbd replay``). ``write_placement`` / ``write_load`` (``eplbd convert-placement`` /
``convert-load``) write ours in these formats, with the one key SGLang expects, so a placement
eplbd computed can start an SGLang server and a window eplbd recorded can seed one.

``.pt`` files are only ever read with ``weights_only=True``: a file that needs arbitrary
unpickling is refused with a typed error, never executed.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import numpy as np
import torch

from eplbd.errors import EplbdError, PlacementError, TraceError

PLACEMENT_KEY = "physical_to_logical_map"
LOAD_KEY = "logical_count"
SUFFIXES = (".pt", ".json")


def read_document(path: str | os.PathLike, error: type[EplbdError], what: str) -> Any:
    """The object stored in a ``.pt`` (weights-only torch) or JSON file (any other suffix).

    Args:
        path: the file.
        error: the error type to raise (``PlacementError`` or ``TraceError``).
        what: what the file should be, for messages (``"placement"``, ``"load"``).

    Raises:
        ``error``: the file is missing, unreadable, not JSON, or a ``.pt`` that needs pickling.
    """
    p = pathlib.Path(path)
    try:
        regular = p.is_file()
    except OSError as exc:  # a name too long, a directory we may not search
        raise error(f"{what} file {str(p)!r} cannot be read: {exc.strerror or exc}") from None
    if not regular:
        raise error(f"{what} file {str(p)!r} does not exist")
    if p.suffix == ".pt":
        try:
            return torch.load(p, map_location="cpu", weights_only=True)
        except Exception as exc:  # zip corruption and refused pickles come in many types
            raise error(f"{what} file {str(p)!r} is not a torch file loadable with weights_only=True "
                        f"(only tensors and plain containers are accepted): {type(exc).__name__}: "
                        f"{_first_line(exc)}") from None
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError, RecursionError) as exc:  # RecursionError: absurdly deep nesting
        raise error(f"{what} file {str(p)!r} is not valid JSON: {exc}") from None


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:200]


def _integer_array(value: Any, error: type[EplbdError], where: str, key: str) -> np.ndarray:
    """``value`` (a tensor or nested lists) as a rectangular int64 array of non-negative integers."""
    if isinstance(value, torch.Tensor):
        arr = value.detach().cpu().numpy()
    else:
        try:
            arr = np.array(value)
        except ValueError as exc:  # ragged nesting
            raise error(f"{where}: {key!r} is not a rectangular array ({exc})") from None
    if arr.dtype.kind == "f" and np.isfinite(arr).all() and (arr == np.round(arr)).all():
        arr = arr.astype(np.int64)
    if arr.dtype.kind not in "iu":
        raise error(f"{where}: {key!r} must hold integers, got {arr.dtype} values")
    if arr.size and arr.min() < 0:
        idx = tuple(int(i) for i in np.unravel_index(int(np.argmin(arr)), arr.shape))
        raise error(f"{where}: {key!r} holds {int(arr[idx])} at index {list(idx)}; values must be >= 0")
    return arr.astype(np.int64, copy=False)


def placement_tensor(value: Any, where: str, key: str = PLACEMENT_KEY) -> torch.Tensor:
    """A placement value (tensor or rows) as ``[layers, num_physical]`` int64.

    Raises:
        PlacementError: not rectangular, not integers, negative ids, or not 2-D.
    """
    arr = _integer_array(value, PlacementError, where, key)
    if arr.ndim != 2 or 0 in arr.shape:
        raise PlacementError(f"{where}: {key!r} must be [layers, num_physical], got shape {list(arr.shape)}")
    return torch.from_numpy(np.ascontiguousarray(arr))


def load_array(value: Any, where: str) -> np.ndarray:
    """An SGLang ``logical_count`` as ``[steps, layers, num_logical]`` int64 (a 2-D one is one step).

    Raises:
        TraceError: not rectangular, not integer counts, negative, or not 2-/3-D.
    """
    from eplbd.trace import validate_load

    arr = _integer_array(value, TraceError, where, LOAD_KEY)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise TraceError(f"{where}: {LOAD_KEY!r} must be [layers, experts] or [steps, layers, experts], "
                         f"got shape {list(arr.shape)}")
    return validate_load(arr, where=where)


def read_load(path: str | os.PathLike) -> np.ndarray:
    """The ``logical_count`` in an SGLang ``.pt`` / ``.json`` file, as ``[steps, layers, num_logical]`` int64.

    Raises:
        TraceError: naming the file and what is wrong (a placement file gets a pointer to
            ``eplbctl load-placement``).
    """
    doc = read_document(path, TraceError, "load")
    where = str(path)
    if not isinstance(doc, dict) or LOAD_KEY not in doc:
        if isinstance(doc, dict) and (PLACEMENT_KEY in doc or "phy2log" in doc):
            raise TraceError(f"{where} holds a placement, not a load; push it with "
                             "`eplbctl load-placement` or convert it with `eplbd convert-placement`")
        found = sorted(map(str, doc)) if isinstance(doc, dict) else type(doc).__name__
        raise TraceError(f"{where}: no {LOAD_KEY!r} key (found {found})")
    return load_array(doc[LOAD_KEY], where)


def _save(path: str | os.PathLike, key: str, value: torch.Tensor, error: type[EplbdError]) -> None:
    from eplbd.plans import write_atomic

    p = pathlib.Path(path)
    if p.suffix not in SUFFIXES:
        raise error(f"an SGLang file must end in .pt or .json, got {str(p)!r}")
    if p.suffix == ".pt":
        write_atomic(p, lambda tmp: torch.save({key: value.clone()}, tmp))
    else:
        write_atomic(p, lambda tmp: tmp.write_text(json.dumps({key: value.tolist()})))


def write_placement(path: str | os.PathLike, phy2log: torch.Tensor) -> None:
    """Write ``phy2log [layers, num_physical]`` as ``{"physical_to_logical_map": ...}`` (``.pt`` or ``.json``),
    the file SGLang's ``--init-expert-location`` takes."""
    _save(path, PLACEMENT_KEY, placement_tensor(phy2log, "placement"), PlacementError)


def write_load(path: str | os.PathLike, load: np.ndarray) -> None:
    """Write ``load [steps, layers, num_logical]`` as ``{"logical_count": ...}`` (``.pt`` or ``.json``): what
    SGLang's recorder dumps and ``--init-expert-location`` turns into a placement."""
    _save(path, LOAD_KEY, torch.from_numpy(load_array(load, "load")), TraceError)
