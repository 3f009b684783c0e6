"""Trace routing for the reference model: a recorded routing file (GPT-OSS-20B decode) replayed as the experts
each rank's tokens pick, request by request in continuous batches.
"""

from __future__ import annotations

import pathlib

import numpy as np
import torch

from eplbd.errors import TraceError
from eplbd.offline.trace import read_routing_file
from eplbd.refengine.model_arith import RefMoEConfig, _is_int

#: The GPT-OSS-20B decode routing file, relative to the project's ``shared/`` directory.
GPT_OSS_ROUTING = "data/gpt_oss_20b/gptoss20b_decode_routing_tokens.npz"


def _schedule(lengths: np.ndarray, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """Continuous batching like ``eplbd.offline.trace.batch_schedule``, also returning each request's slot."""
    import heapq

    free = [(0, slot) for slot in range(batch)]
    starts = np.empty(len(lengths), np.int64)
    slots = np.empty(len(lengths), np.int64)
    for i, n in enumerate(lengths):
        t, slot = heapq.heappop(free)
        starts[i], slots[i] = t, slot
        heapq.heappush(free, (t + int(n), slot))
    return starts, slots


class TraceRouting:
    """Per-step, per-rank expert ids replayed from token-level routing (the GPT-OSS file format).

    ``ep_size * tokens_per_rank`` requests decode concurrently, one token each per step; a finished
    request's slot takes the next request (continuous batching, as ``eplbd.offline.trace`` simulates), and
    slot ``s`` belongs to rank ``s // tokens_per_rank``. Near the end of the trace slots fall idle, so
    ranks get fewer (possibly 0) tokens. Steps past the end wrap around.

    Args:
        experts: ``[tokens, layers, top_k]`` integer expert ids.
        request_offsets: ``[requests + 1]``; request r is tokens ``offsets[r]:offsets[r+1]``.
        ep_size, tokens_per_rank: the batch layout.
        num_layers: use the first ``num_layers`` layers (default all).
        num_logical: experts per layer the model has; every id must be below it.
        seed: order of the requests (``order="shuffle"``).
        order: ``"shuffle"`` or ``"file"``.
        requests: indices of the requests to use (default all), before shuffling.
    """

    def __init__(self, experts: np.ndarray, request_offsets: np.ndarray, *, ep_size: int, tokens_per_rank: int,
                 num_layers: int | None = None, num_logical: int | None = None, seed: int = 0,
                 order: str = "shuffle", requests: np.ndarray | None = None) -> None:
        experts = np.asarray(experts)
        offsets = np.asarray(request_offsets, np.int64)
        if experts.ndim != 3 or experts.dtype.kind not in "iu":
            raise TraceError(f"experts must be integer [tokens, layers, top_k], got {experts.dtype} {experts.shape}")
        if offsets.ndim != 1 or offsets.size < 2 or offsets[0] != 0 or offsets[-1] != experts.shape[0] \
                or (np.diff(offsets) < 0).any():
            raise TraceError(f"request_offsets must rise from 0 to the number of tokens ({experts.shape[0]})")
        for name, value in (("ep_size", ep_size), ("tokens_per_rank", tokens_per_rank)):
            if not _is_int(value) or value < 1:
                raise TraceError(f"{name} must be an integer >= 1, got {value!r}")
        layers = experts.shape[1] if num_layers is None else num_layers
        if not _is_int(layers) or not 1 <= layers <= experts.shape[1]:
            raise TraceError(f"num_layers={num_layers!r} must be in 1..{experts.shape[1]} (the trace's layers)")
        self.experts = experts[:, :layers]
        if num_logical is not None and self.experts.size and int(self.experts.max()) >= num_logical:
            raise TraceError(f"the trace routes to expert {int(self.experts.max())}, but the model has "
                             f"num_logical={num_logical}")
        keep = np.arange(offsets.size - 1) if requests is None else np.asarray(requests, np.int64)
        if order == "shuffle":
            keep = np.random.default_rng(seed).permutation(keep)
        elif order != "file":
            raise TraceError(f"order must be 'shuffle' or 'file', got {order!r}")
        self.ep_size, self.tokens_per_rank = int(ep_size), int(tokens_per_rank)
        self.num_layers, self.top_k = int(layers), int(experts.shape[2])
        batch = self.ep_size * self.tokens_per_rank
        lengths = offsets[keep + 1] - offsets[keep]
        starts, slots = _schedule(lengths, batch)
        self.num_steps = max(1, int((starts + lengths).max()) if lengths.size else 1)
        table = np.full((self.num_steps, batch), -1, np.int64)
        n = int(lengths.sum())
        first = np.repeat(np.cumsum(lengths) - lengths, lengths)
        within = np.arange(n) - first
        table[np.repeat(starts, lengths) + within, np.repeat(slots, lengths)] = np.repeat(offsets[keep], lengths) + within
        self._table = table

    @classmethod
    def from_file(cls, path: str | pathlib.Path, *, ep_size: int, tokens_per_rank: int,
                  num_layers: int | None = None, num_logical: int | None = None, seed: int = 0,
                  order: str = "shuffle", drop_repetitive: bool = True) -> "TraceRouting":
        """Read a routing ``.npz``; ``drop_repetitive`` skips requests marked ``has_repetition`` in the
        sibling ``*_requests.json`` when it exists."""
        experts, offsets, requests = read_routing_file(path, drop_repetitive=drop_repetitive)
        return cls(experts, offsets, ep_size=ep_size, tokens_per_rank=tokens_per_rank, num_layers=num_layers,
                   num_logical=num_logical, seed=seed, order=order, requests=requests)

    @classmethod
    def for_config(cls, config: RefMoEConfig, path: str | pathlib.Path, *, tokens_per_rank: int,
                   seed: int = 0, **kwargs) -> "TraceRouting":
        """``from_file`` with the config's ``ep_size``, ``num_layers``, ``num_logical`` (and its top_k checked)."""
        trace = cls.from_file(path, ep_size=config.ep_size, tokens_per_rank=tokens_per_rank,
                              num_layers=config.num_layers, num_logical=config.num_logical, seed=seed, **kwargs)
        if trace.top_k != config.top_k:
            raise TraceError(f"the trace has top_k={trace.top_k}, the config top_k={config.top_k}")
        return trace

    def token_index(self, step: int, rank: int) -> np.ndarray:
        """Rows of ``experts`` that rank ``rank`` decodes at ``step`` (wrapping), in slot order."""
        if not _is_int(rank) or not 0 <= rank < self.ep_size:
            raise TraceError(f"rank must be in 0..{self.ep_size - 1}, got {rank!r}")
        row = self._table[int(step) % self.num_steps, rank * self.tokens_per_rank:(rank + 1) * self.tokens_per_rank]
        return row[row >= 0]

    def rank_batch(self, step: int, rank: int) -> torch.Tensor:
        """``expert_ids [T, num_layers, top_k]`` int64 for ``RefMoEModel.forward``."""
        return torch.from_numpy(self.experts[self.token_index(step, rank)].astype(np.int64))

    def step_batches(self, step: int) -> list[torch.Tensor]:
        """``rank_batch`` for every rank."""
        return [self.rank_batch(step, r) for r in range(self.ep_size)]
