"""Load trace files and the converter from token-level routing.

Trace format (``.npz``):

- ``load``: int64 ``[steps, layers, num_logical_experts]``, global tokens routed
  to each logical expert in each step (all ranks summed). Required.
- ``steps``: int64 ``[steps]``, the step number of each row. Optional
  (default ``0..steps-1``); the daemon's window dump writes it.
- ``meta``: a 0-d string array holding a JSON object (source, how it was made).
  Optional.

``load_trace`` also reads SGLang's load files (``.pt`` / ``.json`` with ``logical_count``, as its
expert distribution recorder dumps them; see ``eplbd.integrations.sglang``).

The converter turns per-token routing (``experts [tokens, layers, top_k]`` with
``request_offsets``, like the GPT-OSS-20B file in ``shared/data``) into such a
trace by simulating continuous batching: ``batch`` requests in flight, each
decoding one token per step, a finished request replaced by the next one.
"""

from __future__ import annotations

import heapq
import json
import pathlib
from dataclasses import dataclass

import numpy as np

from eplbd.errors import TraceError
from eplbd.files import validate_load


@dataclass
class Trace:
    """Attributes:
        load: ``[steps, layers, num_logical]`` int64.
        steps: ``[steps]`` int64 step numbers.
        meta: free-form provenance.
    """

    load: np.ndarray
    steps: np.ndarray
    meta: dict

    @property
    def num_layers(self) -> int:
        return int(self.load.shape[1])

    @property
    def num_logical(self) -> int:
        return int(self.load.shape[2])


def save_trace(path: str | pathlib.Path, load: np.ndarray, *, steps: np.ndarray | None = None,
               meta: dict | None = None) -> None:
    """Write a trace file (see the module docstring for the keys)."""
    load = validate_load(np.asarray(load))
    steps = np.arange(load.shape[0], dtype=np.int64) if steps is None else np.asarray(steps, np.int64)
    np.savez_compressed(path, load=load, steps=steps, meta=np.array(json.dumps(meta or {})))


def load_trace(path: str | pathlib.Path) -> Trace:
    """Read a trace file (or an SGLang ``logical_count`` ``.pt``/``.json``); raises TraceError naming the
    file and what is wrong."""
    p = pathlib.Path(path)
    if not p.is_file():
        raise TraceError(f"trace file {str(p)!r} does not exist")
    if p.suffix in (".pt", ".json"):
        from eplbd.integrations.sglang import read_load

        load = read_load(p)
        return Trace(load, np.arange(load.shape[0], dtype=np.int64), {"source": str(p), "format": "sglang"})
    try:
        # Open the file ourselves: np.load leaks its handle when the zip is corrupt.
        with open(p, "rb") as fh, np.load(fh, allow_pickle=False) as data:
            keys = set(data.files)
            if "load" not in keys:
                if {"experts", "request_offsets"} <= keys:
                    raise TraceError(
                        f"{p} holds token-level routing, not a load trace; "
                        "convert it with `eplbd convert-trace` (replay does this automatically)")
                raise TraceError(f"{p}: no 'load' key (found {sorted(keys)})")
            load = validate_load(data["load"], where=str(p))
            steps = data["steps"].astype(np.int64) if "steps" in keys else np.arange(load.shape[0])
            meta = json.loads(str(data["meta"])) if "meta" in keys else {}
    except TraceError:
        raise
    except Exception as exc:  # zip/npy corruption comes in many exception types
        raise TraceError(f"cannot read trace {str(p)!r}: {type(exc).__name__}: {exc}") from None
    if steps.shape != (load.shape[0],):
        raise TraceError(f"{p}: 'steps' shape {steps.shape} does not match {load.shape[0]} load rows")
    return Trace(load, steps, meta)


def is_token_routing(path: str | pathlib.Path) -> bool:
    """True if ``path`` is a token-level routing file the converter understands."""
    try:
        with open(path, "rb") as fh, np.load(fh, allow_pickle=False) as data:
            return {"experts", "request_offsets"} <= set(data.files) and "load" not in data.files
    except Exception:
        return False


def batch_schedule(lengths: np.ndarray, batch: int) -> np.ndarray:
    """Start step of each request under continuous batching.

    Args:
        lengths: ``[requests]`` tokens each request decodes (one per step).
        batch: requests in flight at once.

    Returns:
        ``[requests]`` int64 start steps: each request takes the slot that frees
        first (lowest slot index on ties), in request order.
    """
    free = [(0, slot) for slot in range(batch)]
    starts = np.empty(len(lengths), np.int64)
    for i, n in enumerate(lengths):
        t, slot = heapq.heappop(free)
        starts[i] = t
        heapq.heappush(free, (t + int(n), slot))
    return starts


def routing_to_load(experts: np.ndarray, request_offsets: np.ndarray, *, batch: int = 64,
                    num_experts: int | None = None, requests: np.ndarray | None = None) -> np.ndarray:
    """Per-step logical load from per-token routing under continuous batching.

    Args:
        experts: ``[tokens, layers, top_k]`` integer expert ids per token.
        request_offsets: ``[requests + 1]`` int64; request r is tokens
            ``request_offsets[r]:request_offsets[r+1]``.
        batch: requests decoding concurrently.
        num_experts: experts per layer (default: max id + 1).
        requests: indices of the requests to use, in admission order (default all).

    Returns:
        ``[steps, layers, num_experts]`` int64.
    """
    if batch <= 0:
        raise TraceError(f"batch must be positive, got {batch}")
    if experts.ndim != 3:
        raise TraceError(f"'experts' must be [tokens, layers, top_k], got shape {experts.shape}")
    offsets = np.asarray(request_offsets, np.int64)
    if offsets.ndim != 1 or offsets.size < 2 or offsets[0] != 0 or offsets[-1] != experts.shape[0] \
            or (np.diff(offsets) < 0).any():
        raise TraceError("'request_offsets' must rise from 0 to the number of tokens "
                         f"({experts.shape[0]}); got first={offsets[:1]}, last={offsets[-1:]}")
    ne = int(experts.max()) + 1 if num_experts is None else num_experts
    if experts.size and int(experts.max()) >= ne:
        raise TraceError(f"expert id {int(experts.max())} >= num_experts {ne}")
    order = np.arange(offsets.size - 1) if requests is None else np.asarray(requests, np.int64)
    lengths = offsets[order + 1] - offsets[order]
    starts = batch_schedule(lengths, batch)
    # Token t of request r decodes at step starts[r] + t.
    tok_idx = np.concatenate([np.arange(offsets[r], offsets[r + 1]) for r in order]) \
        if order.size else np.zeros(0, np.int64)
    tok_step = np.repeat(starts, lengths) + (np.arange(tok_idx.size) - np.repeat(np.cumsum(lengths) - lengths, lengths))
    num_steps = int(tok_step.max()) + 1 if tok_step.size else 0
    layers = experts.shape[1]
    ids = ((tok_step[:, None, None] * layers + np.arange(layers)[None, :, None]) * ne
           + experts[tok_idx].astype(np.int64))
    counts = np.bincount(ids.ravel(), minlength=num_steps * layers * ne)
    return counts.reshape(num_steps, layers, ne).astype(np.int64)


def read_routing_file(path: str | pathlib.Path, *, drop_repetitive: bool = True
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Read a token-routing ``.npz`` (GPT-OSS format, see shared/data/README.md).

    Returns:
        ``(experts [tokens, layers, top_k], request_offsets [requests + 1], requests)``, where
        ``requests`` are the indices of the requests to use: all of them, minus those marked
        ``has_repetition`` in the sibling ``*_requests.json`` (they loop on repeated text) when
        ``drop_repetitive`` and that file exists.
    """
    p = pathlib.Path(path)
    try:
        with open(p, "rb") as fh, np.load(fh, allow_pickle=False) as data:
            experts, offsets = data["experts"], data["request_offsets"]
    except Exception as exc:
        raise TraceError(f"cannot read routing file {str(p)!r}: {type(exc).__name__}: {exc}") from None
    keep = np.arange(offsets.size - 1)
    meta_path = p.with_name(p.name.replace("_tokens.npz", "_requests.json"))
    if drop_repetitive and meta_path != p and meta_path.is_file():
        info = json.loads(meta_path.read_text())
        if len(info) == keep.size:
            keep = keep[np.array([not r.get("has_repetition", False) for r in info], bool)]
    return experts, offsets, keep


def convert_routing_file(path: str | pathlib.Path, *, batch: int = 64, order: str = "shuffle",
                         seed: int = 0, drop_repetitive: bool = True) -> Trace:
    """Build a Trace from a token-routing ``.npz`` (GPT-OSS format, see shared/data/README.md).

    Args:
        path: the ``.npz`` with ``experts`` and ``request_offsets``.
        batch: requests in flight per step.
        order: ``shuffle`` (seeded; a mixed workload) or ``file`` (requests
            back to back in file order: the mix drifts as datasets change).
        seed: shuffle seed.
        drop_repetitive: skip requests marked ``has_repetition`` in the sibling
            ``*_requests.json`` (they loop on repeated text), if that file exists.
    """
    p = pathlib.Path(path)
    experts, offsets, keep = read_routing_file(p, drop_repetitive=drop_repetitive)
    dropped = offsets.size - 1 - keep.size
    if order == "shuffle":
        keep = np.random.default_rng(seed).permutation(keep)
    elif order != "file":
        raise TraceError(f"order must be 'shuffle' or 'file', got {order!r}")
    load = routing_to_load(experts, offsets, batch=batch, requests=keep)
    meta = {"source": str(p), "batch": batch, "order": order, "seed": seed,
            "requests": int(keep.size), "dropped_repetitive": dropped,
            "tokens": int(load[:, 0].sum() // max(1, experts.shape[2]))}
    return Trace(load, np.arange(load.shape[0], dtype=np.int64), meta)
