"""A small reference expert-parallel MoE model: real router, real experts, tokens dispatched across ranks.

Tests, the demo and the benchmarks run it to check the one invariant every rearrangement must keep:
**for the same input, the output is bitwise identical whatever the placement** (any valid ``phy2log``
with the matching weights in the slots) **and whatever the number of EP ranks.** A weight left behind,
a scale that did not move with its expert, a slot overwritten half-way or a ``log2phy`` out of step
with the weights all change the output.

Shape (DESIGN.md sections 2 and 7): ``num_layers`` MoE layers, each with a replicated router
``[num_logical, hidden]`` (+ bias) and ``num_logical`` experts. Expert ``e`` of a layer has three
tensors, all of which move with it and all of which matter to the output: ``w_gate_up [2*ffn, hidden]``,
``w_down [hidden, ffn]`` and an output ``scale [1]``. The expert computes
``scale * (w_down @ (silu(gate) * up))`` with ``gate, up = w_gate_up @ x``. Rank ``r`` holds slots
``r*num_local .. (r+1)*num_local-1`` of every layer; ``RefMoEModel.expert_weights[layer]`` are the live
``[num_local, ...]`` tensors that a placement agent overwrites in place.

One step (``RefMoEModel.forward``), on every rank:

1. Gather every rank's tokens (and trace expert ids) with one ``all_to_all_single`` (rows padded to
   a capacity all ranks agree on, the largest token count seen so far; a second exchange only when a
   rank exceeds it). Global token ``i`` of rank ``r`` has id ``offset_r + i``.
2. Per layer: RMS-norm, router logits, top-k (or the trace's experts, gate weights = softmax of the
   router logits over those k); the replica of (token, k) is ``(token_id + k) % logcnt[layer, e]``, its
   slot ``log2phy[layer, e, replica]``, its owner ``slot // num_local``. Each rank computes the experts
   of the pairs it owns, then one ``all_to_all_single`` hands every rank every pair's result, and each
   rank combines ``sum_k gate_w[k] * out_k`` (fixed k order) plus the residual for *all* tokens.
   Since every rank ends a layer with every token's state, the next layer needs no gather of token
   states: one collective per layer. (With gloo, ``all_to_all_single`` is the cheapest collective
   here: with 4 ranks on 2 cores all_reduce and all_gather cost 2-5x its CPU time and latency.)
   The expert math of a pair only ever runs on the rank that holds its slot.
3. Count, per slot, the (token, k) pairs of *this rank's* tokens (``expert_load_view``) and return this
   rank's rows.

Batch invariance (why the output cannot depend on the placement)
----------------------------------------------------------------
What a rank computes for a pair must not depend on which other pairs share its batch. Two things can
break that on CPU, and the model removes both by construction instead of hoping:

- **Matmul rounding depends on the batch size** (BLAS picks kernels and blockings by shape). The
  expert matmuls are made *exact*: weights lie on an integer grid (``w_int * 2**-shift``,
  ``|w_int| <= 7``), activations entering a matmul are rounded to a fixed-point grid and clamped, and
  the bounds are chosen so that every product and every partial sum is an integer multiple of one unit
  below ``2**24`` (float32) or ``2**53`` (float64, used when the dims are too large for float32). An
  exact sum has one value in every order, so any kernel, blocking or batch gives the same bits.
- **Elementwise kernels are position dependent**: ATen runs the last ``numel % (2 * vector width)``
  elements of a contiguous tensor through the scalar function, and for ``silu``/``sigmoid`` that gives
  different bits than the SIMD one (about 4% of such elements differ on AVX-512). So a token's
  activation would depend on its row in the batch. The expert stage uses only IEEE basic operations
  (multiply, add, round, clamp, casts: correctly rounded, identical on both paths) and evaluates SiLU
  by a lookup table with ``2**-10`` resolution (an index gather is a copy). The table covers every
  reachable gate value (``|gate| <= (hidden + 1) * 7 * 2**-shift`` by Cauchy-Schwarz on the RMS-normed
  input) and is built once by one fixed-shape call.

Everything else (RMS norm, router, top-k, softmax, combine, residual) runs on the full
``[tokens_total, ...]`` state, which has the same shape on every rank, under every placement, for
every rank count and in ``reference_forward``. ``tests/test_refmodel.py`` proves both halves: the
expert stage gives identical bits under arbitrary regroupings, and the distributed model matches the
dense single-process ``reference_forward`` bitwise under linear, round-robin and random redundant
placements with 2 and 4 ranks. The guarantee assumes one torch build and CPU type, the same torch
thread count everywhere and ``torch.get_float32_matmul_precision() == "highest"`` (checked).

Performance: call ``torch.set_num_threads(1)`` in each rank's process (the sizes are far too small to
gain from intra-op threads, and several ranks share the cores). A step costs ``1 + num_layers`` gloo
``all_to_all_single`` calls. On a 2-vCPU VM with 4 ranks each call takes ~1.2 ms of latency and, under
load, ~0.7 ms of CPU per rank, so for the demo shape (24 layers, 32 tokens per rank) gloo costs about
as much CPU as the model itself (~14 ms per rank-step alone, ~22 ms when 4 ranks share 2 cores): about
10 steps/s per rank with 4 ranks, 17 with 2 (measured; see tests/test_refmodel.py for correctness).

This module holds ``RefMoEModel`` (one EP rank); the config and the exact arithmetic are in ``model_arith``, the
weights, inputs and ``reference_forward`` in ``model_weights``, ``TraceRouting`` in ``model_trace`` (all
importable from here).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.distributed as dist

from eplbd.errors import InvalidArgumentError, PlacementError
from eplbd.policy.placement import derive_log2phy, validate_placement
from eplbd.refengine.model_arith import (RefMoEConfig, _check_matmul_precision, _combine, _is_int, _norm, _quant,
                                         _route, expert_stage)
from eplbd.refengine.model_trace import GPT_OSS_ROUTING, TraceRouting
from eplbd.refengine.model_weights import (_adopt_expert_weights, _check_expert_ids, _check_x, _logical_layer,
                                           local_expert_weights, logical_expert_weights, make_inputs,
                                           reference_forward, router_weights, unfilled_expert_weights)

__all__ = [
    "RefMoEConfig",
    "RefMoEModel",
    "TraceRouting",
    "logical_expert_weights",
    "local_expert_weights",
    "unfilled_expert_weights",
    "router_weights",
    "make_inputs",
    "reference_forward",
    "expert_stage",
    "GPT_OSS_ROUTING",
]


# --------------------------------------------------------------------------- the EP model
class RefMoEModel:
    """One EP rank of the reference model, with vLLM's ``MixtureOfExperts`` surface.

    Args:
        config: model shape; ``config.ep_size`` ranks.
        rank: this rank's index in ``group``.
        group: a gloo ``ProcessGroup`` of the ``ep_size`` ranks, or ``None`` when ``ep_size == 1``.
        phy2log: initial placement ``[num_layers, num_physical]``; the slots are filled from it.
        expert_weights: slot tensors to adopt instead (per layer ``[w_gate_up, w_down, scale]``, each
            ``[num_local, ...]``): an elastic rebuild for a resized group keeps a surviving rank's
            tensors, or starts a joining rank with ``unfilled_expert_weights``; the slots then do not
            match ``phy2log`` until ``eplbd.client.elastic.rebuild_experts`` has filled them.

    Attributes (live; other components update them in place):
        expert_weights: per layer ``[w_gate_up [nl, 2*ffn, hidden], w_down [nl, hidden, ffn],
            scale [nl, 1]]``, slot-major and contiguous. Read at every forward, never copied.
        phy2log, log2phy, logcnt: ``[L, P]``, ``[L, E, num_redundant+1]`` (-1 padded), ``[L, E]`` int64.
            ``forward`` reads ``log2phy`` and ``logcnt``.
        expert_load_view: ``[L, P]`` int64, this rank's tokens' (token, k) pairs per slot in the last step.
    """

    def __init__(self, config: RefMoEConfig, rank: int, group: dist.ProcessGroup | None,
                 phy2log: torch.Tensor, *, expert_weights: Sequence[Sequence[torch.Tensor]] | None = None) -> None:
        if not isinstance(config, RefMoEConfig):
            raise InvalidArgumentError(f"config must be a RefMoEConfig, got {type(config).__name__}")
        if not _is_int(rank) or not 0 <= rank < config.ep_size:
            raise InvalidArgumentError(f"rank must be in 0..{config.ep_size - 1} (ep_size), got {rank!r}")
        if group is None:
            if config.ep_size != 1:
                raise InvalidArgumentError(f"group=None needs ep_size == 1, got ep_size={config.ep_size}")
        else:
            size, grank = dist.get_world_size(group), dist.get_rank(group)
            if size != config.ep_size or grank != rank:
                raise InvalidArgumentError(
                    f"group has size {size} and this process is its rank {grank}; "
                    f"expected ep_size={config.ep_size}, rank={rank}")
        self.config = config
        self.rank = int(rank)
        self.group = group
        self.ep_size = config.ep_size
        self.num_moe_layers = config.num_layers
        self.num_logical_experts = config.num_logical
        self.num_physical_experts = config.num_physical
        self.num_local_physical_experts = config.num_local_physical
        self.num_redundant_experts = config.num_redundant
        self.num_expert_groups = config.num_groups
        self._quant = _quant(config.hidden, config.ffn, config.dtype)
        L, E, P = config.num_layers, config.num_logical, config.num_physical
        self.phy2log = torch.zeros((L, P), dtype=torch.int64)
        self.log2phy = torch.full((L, E, config.num_redundant + 1), -1, dtype=torch.int64)
        self.logcnt = torch.zeros((L, E), dtype=torch.int64)
        self.expert_load_view = torch.zeros((L, P), dtype=torch.int64)
        self._capacity = 0  # rows per rank in the input exchange, agreed by all ranks (see _gather_inputs)
        self.load_placement_(phy2log)
        self.expert_weights: list[list[torch.Tensor]] = (
            local_expert_weights(config, self.phy2log, self.rank) if expert_weights is None
            else _adopt_expert_weights(config, expert_weights))
        self.router_weight, self.router_bias = router_weights(config)

    # ---- MixtureOfExperts surface
    def set_eplb_state(self, expert_load_view: torch.Tensor, logical_to_physical_map: torch.Tensor,
                       logical_replica_count: torch.Tensor) -> None:
        """Use the caller's tensors (like vLLM): ``expert_load_view [L, P]``, ``logical_to_physical_map
        [L, E, R+1]``, ``logical_replica_count [L, E]``, all int64; they must already hold the
        placement in force (``phy2log`` stays the model's)."""
        L, E, P, R = self.num_moe_layers, self.num_logical_experts, self.num_physical_experts, self.num_redundant_experts
        for name, t, shape in (("expert_load_view", expert_load_view, (L, P)),
                               ("logical_to_physical_map", logical_to_physical_map, (L, E, R + 1)),
                               ("logical_replica_count", logical_replica_count, (L, E))):
            if not isinstance(t, torch.Tensor) or t.dtype != torch.int64 or tuple(t.shape) != shape:
                got = f"{t.dtype} {list(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
                raise InvalidArgumentError(f"set_eplb_state: {name} must be int64 {list(shape)}, got {got}")
        self.expert_load_view = expert_load_view
        self.log2phy = logical_to_physical_map
        self.logcnt = logical_replica_count

    def load_expert_weights_(self, layer: int, slot: int, logical: int) -> None:
        """Engine hook of elastic EP: reload logical expert ``logical`` of ``layer`` into local slot
        ``slot`` from the checkpoint (here: the deterministic weights), every tensor of it, in place."""
        nl, E = self.num_local_physical_experts, self.num_logical_experts
        if not (_is_int(layer) and 0 <= layer < self.num_moe_layers and _is_int(slot) and 0 <= slot < nl
                and _is_int(logical) and 0 <= logical < E):
            raise InvalidArgumentError(f"load_expert_weights_(layer={layer!r}, slot={slot!r}, logical={logical!r}): "
                                       f"need layer < {self.num_moe_layers}, slot < {nl}, logical < {E}")
        for live, full in zip(self.expert_weights[layer], _logical_layer(self.config, layer)):
            live[slot].copy_(full[logical])

    def placement_tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The live ``(phy2log, log2phy, logcnt)``."""
        return self.phy2log, self.log2phy, self.logcnt

    def load_placement_(self, phy2log: torch.Tensor, layers: Sequence[int] | None = None) -> None:
        """Rewrite ``phy2log``/``log2phy``/``logcnt`` in place from a new full placement ``[L, P]``
        (only rows ``layers`` when given). Does not touch ``expert_weights``.

        Raises:
            PlacementError: wrong shape, dtype or ids, an expert without a slot, a bad layer index.
        """
        L, E, P = self.num_moe_layers, self.num_logical_experts, self.num_physical_experts
        if isinstance(phy2log, (torch.Tensor, np.ndarray)) and tuple(phy2log.shape) != (L, P):
            raise PlacementError(f"phy2log must be [layers, num_physical] = [{L}, {P}], got {list(phy2log.shape)}")
        validate_placement(phy2log, E, self.ep_size, L)
        new = torch.as_tensor(phy2log).to(torch.int64)
        l2p, cnt = derive_log2phy(new, E)
        rows = list(range(L)) if layers is None else [int(i) for i in layers]
        bad = [i for i in rows if not 0 <= i < L]
        if bad:
            raise PlacementError(f"layers holds {bad[0]}, outside 0..{L - 1}")
        if layers is None:
            self.phy2log.copy_(new)
            self.log2phy.fill_(-1)
            self.log2phy[:, :, :l2p.shape[2]].copy_(l2p)
            self.logcnt.copy_(cnt)
        else:
            for i in rows:
                self.phy2log[i].copy_(new[i])
                self.log2phy[i].fill_(-1)
                self.log2phy[i, :, :l2p.shape[2]].copy_(l2p[i])
                self.logcnt[i].copy_(cnt[i])

    # ---- collectives
    def _gather_rows(self, rows: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Every rank's ``rows`` concatenated in rank order (``counts[r]`` rows from rank r)."""
        if self.ep_size == 1:
            return rows
        out = rows.new_empty((sum(counts),) + tuple(rows.shape[1:]))
        inp = rows.repeat((self.ep_size,) + (1,) * (rows.dim() - 1))
        dist.all_to_all_single(out, inp, output_split_sizes=counts,
                               input_split_sizes=[int(rows.shape[0])] * self.ep_size, group=self.group)
        return out

    def _gather_inputs(self, x: torch.Tensor, ids: torch.Tensor | None,
                       error: Exception | None) -> tuple[list[int], torch.Tensor]:
        """Every rank's tokens (rows ``[x | expert ids]``, ids as exact floats) in rank order.

        Each rank sends a header row ``[T, has_ids, ok]`` and its rows padded to a capacity all ranks
        agree on (the largest T seen so far): one collective per step. When a rank has more tokens
        than that, every rank sees it in the headers and a second exchange with exact sizes follows.
        A bad input (``error``) or mixed trace/router modes fail on every rank, without a hang.
        """
        cfg, ws = self.config, self.ep_size
        H, width = cfg.hidden, cfg.hidden + cfg.num_layers * cfg.top_k
        T, cap = int(x.shape[0]), self._capacity

        def rows(n: int) -> torch.Tensor:
            out = x.new_zeros((n, width))
            out[:T, :H] = x
            if ids is not None:
                out[:T, H:] = ids.reshape(T, width - H)
            return out

        chunk = torch.cat([torch.tensor([[T, ids is not None, error is None] + [0] * (width - 3)],
                                        dtype=x.dtype), rows(cap) if T <= cap else rows(T)[:cap]])
        got = self._gather_rows(chunk, [cap + 1] * ws)
        head = got[::cap + 1, :3].tolist()
        if error is not None:
            raise error
        bad = [r for r, h in enumerate(head) if not h[2]]
        if bad:
            raise InvalidArgumentError(f"rank {bad[0]} passed an invalid input to forward")
        if len({h[1] for h in head}) != 1:
            raise InvalidArgumentError("forward: some ranks passed expert_ids and others did not")
        sizes = [int(h[0]) for h in head]
        self._capacity = max(cap, *sizes)
        if max(sizes) > cap:
            return sizes, self._gather_rows(rows(T), sizes)
        keep = np.concatenate([r * (cap + 1) + 1 + np.arange(n) for r, n in enumerate(sizes)])
        return sizes, got.index_select(0, torch.from_numpy(keep))

    # ---- forward
    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor | None = None) -> torch.Tensor:
        """One step: ``x [T, hidden]`` are this rank's tokens (T may differ per rank, may be 0);
        ``expert_ids [T, L, top_k]`` replaces the router's choice (trace mode). Collective: every rank
        of the group must call it, all with or all without ``expert_ids``. Returns ``[T, hidden]``."""
        cfg, q = self.config, self._quant
        L, K, H, P, nl = cfg.num_layers, cfg.top_k, cfg.hidden, cfg.num_physical, cfg.num_local_physical
        error: Exception | None = None
        try:
            _check_matmul_precision(q)
            x = _check_x(x, cfg)
            ids = None if expert_ids is None else _check_expert_ids(expert_ids, x.shape[0], cfg)
        except InvalidArgumentError as exc:
            error, x, ids = exc, torch.zeros((0, H), dtype=cfg.dtype), None
        T = int(x.shape[0])
        sizes, full = self._gather_inputs(x, ids, error)
        total, offset = sum(sizes), sum(sizes[:self.rank])
        self.expert_load_view.zero_()
        if total == 0:
            return x.clone()
        state = full[:, :H].contiguous()
        # trace ids as [L, total, K] so that each layer's slice is contiguous
        has_ids = ids is not None
        all_ids = full[:, H:].long().view(total, L, K).transpose(0, 1).contiguous() if has_ids else None
        # Routing bookkeeping in numpy (cheaper per call than torch at these sizes); the placement
        # tensors are read through zero-copy views, at every forward.
        token_k = (np.arange(total)[:, None] + np.arange(K)[None, :]).ravel()  # global token id + k
        pair_ids = np.arange(total * K)
        log2phy, logcnt = self.log2phy.numpy(), self.logcnt.numpy()
        weights = self.expert_weights
        lo, hi = self.rank * nl, (self.rank + 1) * nl
        mine = np.empty((L, T * K), np.int64)
        for layer in range(L):
            xn = _norm(state)
            top_i, gate_w = _route(xn, self.router_weight[layer], self.router_bias[layer], K,
                                   None if all_ids is None else all_ids[layer])
            experts = top_i.numpy().ravel()
            slots = log2phy[layer, experts, token_k % logcnt[layer, experts]]  # [total*K]
            mine[layer] = slots[offset * K:(offset + T) * K]
            # Pairs sorted by slot are sorted by owner too: each rank computes a contiguous piece, in
            # slot order, and every rank knows where each received row belongs.
            order = np.argsort(slots, kind="stable")
            per_slot = np.bincount(slots, minlength=P)
            owner_counts = per_slot.reshape(self.ep_size, nl).sum(1).tolist()
            start = sum(owner_counts[:self.rank])
            pairs = order[start:start + owner_counts[self.rank]]
            y = expert_stage(xn.index_select(0, torch.from_numpy(pairs // K)), per_slot[lo:hi], weights[layer], cfg)
            gathered = self._gather_rows(y, owner_counts)  # every pair's result, in `order`
            inverse = np.empty_like(order)
            inverse[order] = pair_ids
            results = gathered.index_select(0, torch.from_numpy(inverse)).view(total, K, H)
            state = _combine(state, gate_w, results)
        if T:
            keys = torch.from_numpy(mine) + (torch.arange(L) * P)[:, None]
            self.expert_load_view.add_(torch.bincount(keys.view(-1), minlength=L * P).view(L, P))
        return state[offset:offset + T].clone()


    __call__ = forward
