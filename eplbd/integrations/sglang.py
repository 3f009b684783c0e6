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

Here a ``physical_to_logical_map`` file is a placement (``eplbd.daemon.plans.read_placement_file``, so
``eplbctl load-placement``) and a ``logical_count`` file is a load trace (``eplbd.offline.trace.load_trace``,
so ``eplbd replay``). ``write_placement`` / ``write_load`` (``eplbd convert-placement`` /
``convert-load``) write ours in these formats, with the one key SGLang expects, so a placement
eplbd computed can start an SGLang server and a window eplbd recorded can seed one.

``.pt`` files are only ever read with ``weights_only=True``: a file that needs arbitrary
unpickling is refused with a typed error, never executed.

**The layer axis.** SGLang sizes both tensors by ``num_hidden_layers`` (``ModelConfigForExpertLocation.
num_layers`` is the HF config's ``num_hidden_layers``): one row per decoder layer, indexed by the absolute
layer number, dense layers included. eplbd's rows are MoE layers only. A ``LayerAxis`` (from
``--moe-layers`` or the model's ``config.json``) maps between the two: ``moe_placement`` / ``moe_load``
take either shape and keep the MoE rows; ``pad_placement`` / ``pad_load`` put back what SGLang itself has in
a dense layer's rows: the trivial placement ``arange(num_physical) % num_logical`` (``init_trivial``; the
rebalancer only ever updates MoE layers) and zero counts (the recorder never sees a dense layer). A shape
that is neither ``[num_moe_layers, ...]`` nor ``[num_hidden_layers, ...]`` is refused. Without a
``LayerAxis`` every row is taken as a MoE layer: right for models without dense layers (Mixtral, Qwen3-MoE,
GPT-OSS), shifted for DeepSeek-V3/R1 (61 layers, the first 3 dense), which needs ``--moe-layers 3-60``.
"""

from __future__ import annotations

import json
import os
import pathlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from eplbd.errors import EplbdError, InvalidArgumentError, PlacementError, TraceError

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
    from eplbd.files import validate_load

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
    from eplbd.files import write_atomic

    p = pathlib.Path(path)
    if p.suffix not in SUFFIXES:
        raise error(f"an SGLang file must end in .pt or .json, got {str(p)!r}")
    if p.suffix == ".pt":
        write_atomic(p, lambda tmp: torch.save({key: value.clone()}, tmp))
    else:
        write_atomic(p, lambda tmp: tmp.write_text(json.dumps({key: value.tolist()})))


def write_placement(path: str | os.PathLike, phy2log: torch.Tensor, layers: LayerAxis | None = None) -> None:
    """Write ``phy2log [layers, num_physical]`` as ``{"physical_to_logical_map": ...}`` (``.pt`` or ``.json``),
    the file SGLang's ``--init-expert-location`` takes; with ``layers``, padded to one row per decoder layer
    (``LayerAxis.pad_placement``)."""
    phy2log = placement_tensor(phy2log, "placement")
    _save(path, PLACEMENT_KEY, phy2log if layers is None else layers.pad_placement(phy2log), PlacementError)


def write_load(path: str | os.PathLike, load: np.ndarray, layers: LayerAxis | None = None) -> None:
    """Write ``load [steps, layers, num_logical]`` as ``{"logical_count": ...}`` (``.pt`` or ``.json``): what
    SGLang's recorder dumps and ``--init-expert-location`` turns into a placement; with ``layers``, padded
    to one row per decoder layer (``LayerAxis.pad_load``)."""
    load = load_array(load, "load")
    _save(path, LOAD_KEY, torch.from_numpy(load if layers is None else layers.pad_load(load)), TraceError)


# --- the layer axis: SGLang's rows are decoder layers, eplbd's are MoE layers ----------------------------------
# Model types whose every decoder layer is a MoE layer (no key in their config says otherwise).
ALL_MOE_MODEL_TYPES = frozenset({"mixtral", "olmoe", "gpt_oss", "phimoe", "granitemoe"})


def _ranges(ids: tuple[int, ...]) -> str:
    """``(3, 4, 5, 7)`` as ``"3-5,7"``."""
    out: list[str] = []
    for i in ids:
        if out and int(out[-1].rpartition("-")[2]) == i - 1:
            out[-1] = f"{out[-1].partition('-')[0]}-{i}"
        else:
            out.append(str(i))
    return ",".join(out)


@dataclass(frozen=True)
class LayerAxis:
    """Which decoder layers of a model are MoE layers.

    Attributes:
        num_hidden_layers: decoder layers, dense ones included (the rows of SGLang's tensors).
        moe_layers: the MoE layers' decoder layer numbers, ascending (eplbd's rows, in order).
        source: where this came from, for messages (``--moe-layers 3-60``, a config file).
    """

    num_hidden_layers: int
    moe_layers: tuple[int, ...]
    source: str

    def __post_init__(self) -> None:
        ids = self.moe_layers
        if not ids:
            raise InvalidArgumentError(f"{self.source}: no MoE layers")
        if list(ids) != sorted(set(ids)) or ids[0] < 0 or ids[-1] >= self.num_hidden_layers:
            raise InvalidArgumentError(f"{self.source}: MoE layers {_ranges(ids)} must be distinct, ascending "
                                       f"and within the {self.num_hidden_layers} decoder layers")

    @property
    def num_moe_layers(self) -> int:
        return len(self.moe_layers)

    def describe(self) -> str:
        """``"58 MoE layers (3-60) of 61"``."""
        return f"{self.num_moe_layers} MoE layers ({_ranges(self.moe_layers)}) of {self.num_hidden_layers}"

    @classmethod
    def from_spec(cls, spec: str, num_hidden_layers: int | None = None) -> "LayerAxis":
        """MoE layer ids as ``"3-60"`` or ``"0,2,4-7"``; ``num_hidden_layers`` defaults to the last one + 1.

        Raises:
            InvalidArgumentError: naming the spec.
        """
        ids: list[int] = []
        try:
            for part in spec.split(","):
                lo, dash, hi = part.strip().partition("-")
                first, last = int(lo), int(hi) if dash else int(lo)
                if last < first:
                    raise ValueError
                ids.extend(range(first, last + 1))
        except ValueError:
            raise InvalidArgumentError(f"--moe-layers {spec!r}: expected layer numbers and ranges, "
                                       "e.g. 3-60 or 0,2,4-7") from None
        if len(set(ids)) != len(ids):
            raise InvalidArgumentError(f"--moe-layers {spec!r} names a layer twice")
        total = max(ids) + 1 if num_hidden_layers is None else num_hidden_layers
        return cls(total, tuple(sorted(ids)), f"--moe-layers {spec}")

    @classmethod
    def from_model_config(cls, path: str | os.PathLike) -> "LayerAxis":
        """The MoE layers of the model whose Hugging Face ``config.json`` is ``path``.

        Read as the model code decides a layer is sparse: DeepSeek-style (``first_k_dense_replace``,
        ``moe_layer_freq``: ``layer >= k and layer % freq == 0``, with ``n_routed_experts`` set);
        Qwen-MoE-style (``decoder_sparse_step``, ``mlp_only_layers``: ``layer not in mlp_only_layers and
        (layer + 1) % step == 0``, with ``num_experts > 0``); every layer for the model types in
        ``ALL_MOE_MODEL_TYPES``. A multimodal config's ``text_config`` is read when the top level has no
        ``num_hidden_layers``.

        Raises:
            InvalidArgumentError: the file is unreadable, or names no MoE layers we know how to read.
        """
        where = str(path)
        doc = read_document(path, InvalidArgumentError, "model config")
        if isinstance(doc, dict) and "num_hidden_layers" not in doc and isinstance(doc.get("text_config"), dict):
            doc, where = doc["text_config"], f"{where} (text_config)"
        if not isinstance(doc, dict):
            raise InvalidArgumentError(f"model config {where} is not a JSON object")

        def integer(key: str, default: Any = None, low: int = 0) -> int:
            value = doc.get(key, default)
            if type(value) is not int or value < low:
                raise InvalidArgumentError(f"model config {where}: {key!r} must be an integer >= {low}, "
                                           f"got {value!r}")
            return value

        n = integer("num_hidden_layers", low=1)
        model_type = doc.get("model_type", "?")
        deepseek = [k for k in ("first_k_dense_replace", "moe_layer_freq") if k in doc]
        qwen = [k for k in ("decoder_sparse_step", "mlp_only_layers") if k in doc]
        if deepseek and qwen:
            raise InvalidArgumentError(f"model config {where} has both DeepSeek-style {deepseek} and Qwen-style "
                                       f"{qwen} keys; pass --moe-layers")
        if deepseek:
            if not doc.get("n_routed_experts", doc.get("num_experts")):
                raise InvalidArgumentError(f"model config {where} (model_type {model_type}) has no routed experts")
            k, freq = integer("first_k_dense_replace", 0), integer("moe_layer_freq", 1, low=1)
            ids = [i for i in range(n) if i >= k and i % freq == 0]
            rule = f"first_k_dense_replace={k}, moe_layer_freq={freq}"
        elif qwen:
            if not integer("num_experts", 0):
                raise InvalidArgumentError(f"model config {where} (model_type {model_type}) has no experts "
                                           "(num_experts is 0)")
            step = integer("decoder_sparse_step", 1, low=1)
            dense = doc.get("mlp_only_layers") or []
            if not isinstance(dense, list) or any(type(i) is not int for i in dense):
                raise InvalidArgumentError(f"model config {where}: 'mlp_only_layers' must be a list of layer "
                                           f"numbers, got {dense!r}")
            ids = [i for i in range(n) if i not in dense and (i + 1) % step == 0]
            rule = f"decoder_sparse_step={step}, mlp_only_layers={dense}"
        elif model_type in ALL_MOE_MODEL_TYPES:
            ids, rule = list(range(n)), f"model_type {model_type}: every layer"
        else:
            raise InvalidArgumentError(
                f"cannot tell the MoE layers of model config {where} (model_type {model_type!r}): it has no "
                "DeepSeek-style (first_k_dense_replace, moe_layer_freq) or Qwen-MoE-style (decoder_sparse_step, "
                f"mlp_only_layers) keys and is not one of {sorted(ALL_MOE_MODEL_TYPES)}; pass --moe-layers")
        return cls(n, tuple(ids), f"{where} ({rule})")

    @classmethod
    def from_flags(cls, moe_layers: str | None, model_config: str | None,
                   num_hidden_layers: int | None = None) -> "LayerAxis | None":
        """What ``--moe-layers`` / ``--model-config`` / ``--num-hidden-layers`` name; None when neither of the first
        two is given (every row is a MoE layer).

        Raises:
            InvalidArgumentError: both given, ``--num-hidden-layers`` alone, or what ``from_spec`` /
                ``from_model_config`` refuse.
        """
        if moe_layers is not None and model_config is not None:
            raise InvalidArgumentError("give --moe-layers or --model-config, not both")
        if num_hidden_layers is not None and moe_layers is None:
            raise InvalidArgumentError("--num-hidden-layers goes with --moe-layers")
        if moe_layers is not None:
            return cls.from_spec(moe_layers, num_hidden_layers)
        return cls.from_model_config(model_config) if model_config is not None else None

    # -- rows in and out ------------------------------------------------------------------------------
    def _rows(self, rows: int, shape: list[int], where: str, error: type[EplbdError], what: str) -> bool:
        """True if ``rows`` counts decoder layers (rows to strip), False if MoE layers; else ``error``."""
        if rows == self.num_moe_layers:
            return False
        if rows == self.num_hidden_layers:
            return True
        raise error(f"{where}: {what} of shape {shape} has {rows} layer rows; {self.source} makes "
                    f"{self.describe()}, so rows must be {self.num_moe_layers} (MoE layers only) or "
                    f"{self.num_hidden_layers} (every decoder layer, as SGLang writes them)")

    def moe_placement(self, phy2log: torch.Tensor, where: str = "placement") -> torch.Tensor:
        """``[num_moe_layers or num_hidden_layers, num_physical]`` -> ``[num_moe_layers, num_physical]``.

        Raises:
            PlacementError: any other number of rows, naming the shape and both expected ones.
        """
        if self._rows(phy2log.shape[0], list(phy2log.shape), where, PlacementError, "placement"):
            return phy2log[list(self.moe_layers)].contiguous()
        return phy2log

    def pad_placement(self, phy2log: torch.Tensor, where: str = "placement") -> torch.Tensor:
        """``[num_moe_layers, num_physical]`` -> ``[num_hidden_layers, num_physical]``, dense layers' rows the
        trivial placement SGLang starts them with (a ``num_hidden_layers`` one is returned as it is)."""
        if self._rows(phy2log.shape[0], list(phy2log.shape), where, PlacementError, "placement"):
            return phy2log
        num_physical, num_logical = phy2log.shape[1], int(phy2log.max()) + 1
        out = (torch.arange(num_physical, dtype=phy2log.dtype) % num_logical).repeat(self.num_hidden_layers, 1)
        out[list(self.moe_layers)] = phy2log
        return out

    def moe_load(self, load: np.ndarray, where: str = "load") -> np.ndarray:
        """``[steps, num_moe_layers or num_hidden_layers, num_logical]`` -> ``[steps, num_moe_layers, ...]``.

        Raises:
            TraceError: any other number of rows, or a dense layer's row holding tokens (the layer ids
                do not match the file).
        """
        if not self._rows(load.shape[1], list(load.shape), where, TraceError, "load"):
            return load
        dense = np.setdiff1d(np.arange(self.num_hidden_layers), self.moe_layers)
        tokens = load[:, dense].sum(axis=(0, 2)) if dense.size else np.zeros(0, np.int64)
        if tokens.any():
            i = int(np.flatnonzero(tokens)[0])
            raise TraceError(f"{where}: layer {int(dense[i])} holds {int(tokens[i])} tokens, but {self.source} "
                             f"makes it a dense layer: the MoE layer ids do not match this file")
        return np.ascontiguousarray(load[:, list(self.moe_layers)])

    def pad_load(self, load: np.ndarray, where: str = "load") -> np.ndarray:
        """``[steps, num_moe_layers, num_logical]`` -> ``[steps, num_hidden_layers, ...]``, zero counts in the
        dense layers' rows (what SGLang's recorder has there)."""
        if self._rows(load.shape[1], list(load.shape), where, TraceError, "load"):
            return load
        out = np.zeros((load.shape[0], self.num_hidden_layers, load.shape[2]), dtype=load.dtype)
        out[:, list(self.moe_layers)] = load
        return out
