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
"""

from __future__ import annotations

import functools
import math
import pathlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from eplbd.errors import InvalidArgumentError, PlacementError, TraceError
from eplbd.policy.placement import derive_log2phy, validate_placement
from eplbd.offline.trace import read_routing_file

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

#: The GPT-OSS-20B decode routing file, relative to the project's ``shared/`` directory.
GPT_OSS_ROUTING = "data/gpt_oss_20b/gptoss20b_decode_routing_tokens.npz"

_W_MAX = 7  # weights are w_int * 2**-shift with |w_int| <= _W_MAX (int4-like)
_A_RANGE_BITS = 4  # silu(gate) * up is clamped to +-2**4 before the down projection
_G_FRAC_BITS = 10  # the SiLU table has a step of 2**-10 (its range follows from the weights)
_MIN_FRAC_BITS = 10  # fewer fractional bits than this for float32 -> accumulate in float64
_MAX_FRAC_BITS = 24
_RMS_EPS = 1e-6
_DTYPES = (torch.float32, torch.float64)


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


@dataclass(frozen=True)
class RefMoEConfig:
    """Shape of the reference model. Weights depend only on ``seed``, ``num_layers``, ``hidden``,
    ``ffn`` and ``num_logical`` (not on the EP layout), so configs that differ in ``ep_size`` or
    ``num_redundant`` describe the same model.

    Attributes:
        num_layers: MoE layers.
        hidden: model width.
        ffn: expert intermediate width.
        num_logical: logical experts per layer.
        top_k: experts per token.
        num_redundant: redundant slots per layer.
        ep_size: EP ranks; ``num_logical + num_redundant`` must be a multiple of it.
        num_groups: expert groups (for hierarchical policies); divides ``num_logical``.
        seed: weight seed.
        dtype: weight and activation dtype, ``torch.float32`` or ``torch.float64``.
    """

    num_layers: int
    hidden: int
    ffn: int
    num_logical: int
    top_k: int
    num_redundant: int
    ep_size: int
    num_groups: int = 1
    seed: int = 0
    dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        for name, low in (("num_layers", 1), ("hidden", 1), ("ffn", 1), ("num_logical", 1), ("top_k", 1),
                          ("num_redundant", 0), ("ep_size", 1), ("num_groups", 1), ("seed", 0)):
            value = getattr(self, name)
            if not _is_int(value) or value < low:
                raise InvalidArgumentError(f"RefMoEConfig.{name} must be an integer >= {low}, got {value!r}")
        if self.top_k > self.num_logical:
            raise InvalidArgumentError(
                f"RefMoEConfig.top_k={self.top_k} exceeds num_logical={self.num_logical}")
        if self.num_physical % self.ep_size:
            raise InvalidArgumentError(
                f"RefMoEConfig: num_physical = num_logical + num_redundant = {self.num_logical} + "
                f"{self.num_redundant} = {self.num_physical} is not a multiple of ep_size={self.ep_size}")
        if self.num_logical % self.num_groups:
            raise InvalidArgumentError(
                f"RefMoEConfig.num_groups={self.num_groups} does not divide num_logical={self.num_logical}")
        if self.num_logical >= 2 ** 24:
            raise InvalidArgumentError(f"RefMoEConfig.num_logical={self.num_logical} is too large (< 2**24)")
        if self.dtype not in _DTYPES:
            raise InvalidArgumentError(f"RefMoEConfig.dtype must be torch.float32 or torch.float64, got {self.dtype!r}")
        _quant(self.hidden, self.ffn, self.dtype)  # raises when no exact arithmetic fits

    @property
    def num_physical(self) -> int:
        return self.num_logical + self.num_redundant

    @property
    def num_local_physical(self) -> int:
        return self.num_physical // self.ep_size


# --------------------------------------------------------------------------- exact arithmetic
@dataclass(frozen=True)
class _Quant:
    acc: torch.dtype  # matmul dtype
    x_frac: int  # expert inputs are round(xn * 2**x_frac), |.| <= x_max
    x_max: float
    a_frac: int  # silu(gate)*up is round(a * 2**a_frac), |.| <= a_max
    a_max: float
    w_gu_shift: int  # weights are w_int * 2**-shift
    w_down_shift: int
    g_range: int  # |gate| < g_range (a power of two): the SiLU table spans [-g_range, g_range]


def _weight_shift(fan_in: int) -> int:
    # uniform integers in [-7, 7] have std ~4.32; aim at std 1/sqrt(fan_in)
    return max(0, round(math.log2(4.32 * math.sqrt(fan_in))))


@functools.lru_cache(maxsize=None)
def _quant(hidden: int, ffn: int, dtype: torch.dtype) -> _Quant:
    """Pick the grids so that both expert matmuls are exact.

    gate_up: every partial sum of ``x_int * w_int`` is bounded by ``hidden * x_max * 7``, which must
    stay within the dtype's exact integers (2**24 for float32, 2**53 for float64); RMS-normed inputs
    satisfy ``|xn_i| <= sqrt(hidden)``. down: the same over ``ffn`` with ``|a_int| <= a_max``.
    The gate itself is bounded by Cauchy-Schwarz: ``sum |xn_i| <= sqrt(hidden) * ||xn|| = hidden``, so
    ``|gate| <= (hidden + 1) * 7 * 2**-w_gu_shift`` (the +1 covers rounding), which sizes the SiLU table.
    """
    x_range_bits = max(0, math.ceil(math.log2(math.sqrt(hidden))))
    w_gu_shift = _weight_shift(hidden)
    g_range = 2 ** math.ceil(math.log2((hidden + 1) * _W_MAX * 2.0 ** -w_gu_shift))
    candidates = [torch.float32, torch.float64] if dtype == torch.float32 else [torch.float64]
    for acc in candidates:
        mant = 24 if acc == torch.float32 else 53
        x_bits = math.floor(math.log2(2 ** mant / (_W_MAX * hidden)))
        a_bits = math.floor(math.log2(2 ** mant / (_W_MAX * ffn)))
        x_frac = min(_MAX_FRAC_BITS, x_bits - x_range_bits)
        a_frac = min(_MAX_FRAC_BITS, a_bits - _A_RANGE_BITS)
        if min(x_frac, a_frac) >= _MIN_FRAC_BITS:
            return _Quant(acc, x_frac, float(2 ** (x_frac + x_range_bits) - 1), a_frac,
                          float(2 ** (a_frac + _A_RANGE_BITS) - 1), w_gu_shift, _weight_shift(ffn),
                          max(1, g_range))
    raise InvalidArgumentError(
        f"RefMoEConfig: hidden={hidden}, ffn={ffn} are too large for exact float64 expert matmuls")


@functools.lru_cache(maxsize=None)
def _silu_table(q: _Quant) -> tuple[torch.Tensor, torch.Tensor]:
    """``silu(i * 2**-10) * 2**(a_frac - x_frac)`` for ``i`` in ``-g_range*2**10 .. g_range*2**10``,
    in the accumulation dtype, and the index offset ``g_range*2**10 + 0.5``. Built by one
    fixed-shape call, so the table has the same bits everywhere."""
    n = q.g_range * 2 ** _G_FRAC_BITS
    t = torch.arange(-n, n + 1, dtype=torch.float64) * 2.0 ** -_G_FRAC_BITS
    table = (t / (1.0 + torch.exp(-t)) * 2.0 ** (q.a_frac - q.x_frac)).to(q.acc)
    return table, torch.tensor(n + 0.5, dtype=q.acc)


def expert_stage(
    rows: torch.Tensor,
    counts: Sequence[int],
    weights: Sequence[torch.Tensor],
    config: RefMoEConfig,
) -> torch.Tensor:
    """Run (token, expert) pairs through their experts; a pair's result does not depend on the others.

    Args:
        rows: ``[n, hidden]`` RMS-normed inputs of the pairs, grouped by expert: the first
            ``counts[0]`` rows go to expert 0 of ``weights``, the next ``counts[1]`` to expert 1, ...
        counts: pairs per expert (``len == weights[0].shape[0]``, summing to ``n``).
        weights: ``(w_gate_up [B, 2*ffn, hidden], w_down [B, hidden, ffn], scale [B, 1])``.
        config: the model config (grids and dtype).

    Returns:
        ``[n, hidden]`` in ``config.dtype``: ``scale * (w_down @ (silu(gate) * up))`` per pair, with the
        inputs rounded to the model's fixed-point grids (see the module docstring).
    """
    q = _quant(config.hidden, config.ffn, config.dtype)
    w_gu, w_down, scale = weights
    ffn = config.ffn
    if int(rows.shape[0]) == 0:
        return rows.new_zeros((0, config.hidden), dtype=config.dtype)
    counts = np.asarray(counts, dtype=np.int64)
    offs = torch.from_numpy(np.cumsum(counts).astype(np.int32))
    # Inputs on the grid: integers round(xn * 2**x_frac), |.| <= x_max.
    xq = (rows.to(q.acc) * 2.0 ** q.x_frac).round_().clamp_(-q.x_max, q.x_max)
    h = _grouped_matmul(xq, w_gu.to(q.acc), offs)  # exact: integers in units of 2**-w_gu_shift
    gate, up = h[:, :ffn], h[:, ffn:]
    # h is the real value times 2**x_frac. Table index: round-half-up(gate_real * 2**10) + offset, as
    # one exact multiply-add (power-of-two factor) and a truncating cast of a positive value.
    table, offset = _silu_table(q)
    idx = torch.add(offset, gate, alpha=2.0 ** (_G_FRAC_BITS - q.x_frac)).to(torch.int32)
    # a_int = round(silu(gate_real) * up_real * 2**a_frac); the table carries 2**(a_frac - x_frac).
    a = table.index_select(0, idx.view(-1)).view(idx.shape)
    a = a.mul_(up).round_().clamp_(-q.a_max, q.a_max)
    y = _grouped_matmul(a, w_down.to(q.acc), offs)  # exact again
    # One correctly rounded cast (float64 accumulation only) and one rounded multiply per element.
    # (scale * 2**-a_frac is exact: a power-of-two factor.)
    row_scale = (scale.view(-1).to(config.dtype) * 2.0 ** -q.a_frac).index_select(
        0, torch.from_numpy(np.repeat(np.arange(counts.size), counts)))
    return y.to(config.dtype).mul_(row_scale.unsqueeze(1))


def _grouped_matmul(rows: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """``rows[offs[b-1]:offs[b]] @ w[b].T`` for each group ``b``. Callers only pass exact
    (integer-grid) products, so how the kernel groups or orders the sums cannot change a bit."""
    if rows.dtype == torch.float32 and _HAS_GROUPED_MM:
        return torch._grouped_mm(rows, w.mT, offs=offs)
    out = rows.new_empty((rows.shape[0], w.shape[1]))
    start = 0
    for b, end in enumerate(offs.tolist()):
        if end > start:
            torch.mm(rows[start:end], w[b].mT, out=out[start:end])
        start = end
    return out


_HAS_GROUPED_MM = hasattr(torch, "_grouped_mm")


def _route(xn: torch.Tensor, router_w: torch.Tensor, router_b: torch.Tensor, top_k: int,
           ids: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Experts ``[T, K]`` int64 (top-k, or ``ids`` in trace mode) and gate weights ``[T, K]``."""
    logits = F.linear(xn, router_w, router_b)
    if ids is None:
        top_v, top_i = torch.topk(logits, top_k, dim=1)
    else:
        top_i, top_v = ids, logits.gather(1, ids)
    return top_i, torch.softmax(top_v, dim=1)


def _combine(state: torch.Tensor, gate_w: torch.Tensor, results: torch.Tensor) -> torch.Tensor:
    """``state + sum_k gate_w[:, k] * results[:, k]``; ``results [T, K, hidden]``. The reduction over
    k runs on the full ``[T_total, K, hidden]`` tensor, whose shape is the same on every rank, in
    every placement and in ``reference_forward``: one fixed order everywhere."""
    return state + (results * gate_w.unsqueeze(2)).sum(1)


def _norm(state: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(state, (state.shape[1],), eps=_RMS_EPS)


def _check_matmul_precision(q: _Quant) -> None:
    if q.acc == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        raise InvalidArgumentError(
            "the reference model needs torch.get_float32_matmul_precision() == 'highest' "
            f"(exact float32 expert matmuls), got {torch.get_float32_matmul_precision()!r}")


# --------------------------------------------------------------------------- weights and inputs
def _generator(*key: int) -> torch.Generator:
    state = np.random.SeedSequence([int(k) for k in key]).generate_state(2, np.uint64)
    g = torch.Generator()
    g.manual_seed(int(state[0] % (2 ** 63)))
    return g


def _grid_weights(shape: tuple[int, ...], shift: int, dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    ints = torch.randint(-_W_MAX, _W_MAX + 1, shape, generator=g, dtype=torch.int64)
    return ints.to(dtype) * 2.0 ** -shift


def _logical_layer(config: RefMoEConfig, layer: int) -> list[torch.Tensor]:
    q = _quant(config.hidden, config.ffn, config.dtype)
    E, H, I = config.num_logical, config.hidden, config.ffn
    w_gu = _grid_weights((E, 2 * I, H), q.w_gu_shift, config.dtype, _generator(config.seed, layer, 1))
    w_down = _grid_weights((E, H, I), q.w_down_shift, config.dtype, _generator(config.seed, layer, 2))
    s = torch.randint(-32, 33, (E, 1), generator=_generator(config.seed, layer, 3), dtype=torch.int64)
    scale = 1.0 + s.to(config.dtype) / 64.0  # exact in [0.5, 1.5]
    return [w_gu, w_down, scale]


def logical_expert_weights(config: RefMoEConfig) -> list[list[torch.Tensor]]:
    """Per layer, the logical experts' tensors ``[w_gate_up [E, 2*ffn, hidden], w_down [E, hidden, ffn],
    scale [E, 1]]`` (deterministic in ``config.seed``, independent of the EP layout)."""
    return [_logical_layer(config, layer) for layer in range(config.num_layers)]


def local_expert_weights(config: RefMoEConfig, phy2log: torch.Tensor, rank: int,
                         logical: Sequence[Sequence[torch.Tensor]] | None = None) -> list[list[torch.Tensor]]:
    """What rank ``rank``'s slots hold under ``phy2log``: per layer, tensors ``[num_local, ...]``,
    contiguous (``logical`` defaults to ``logical_expert_weights(config)``)."""
    nl = config.num_local_physical
    out = []
    for layer in range(config.num_layers):
        tensors = logical[layer] if logical is not None else _logical_layer(config, layer)
        ids = torch.as_tensor(phy2log[layer, rank * nl:(rank + 1) * nl], dtype=torch.int64)
        out.append([t[ids].contiguous() for t in tensors])
    return out


def unfilled_expert_weights(config: RefMoEConfig) -> list[list[torch.Tensor]]:
    """Slot tensors of one rank with no expert in them yet (NaN, so a slot left unfilled shows in the
    output): a joining rank's starting point in an elastic resize."""
    return [[torch.full(shape, math.nan, dtype=config.dtype) for shape in _slot_shapes(config)]
            for _ in range(config.num_layers)]


def _slot_shapes(config: RefMoEConfig) -> list[list[int]]:
    nl, H, I = config.num_local_physical, config.hidden, config.ffn
    return [[nl, 2 * I, H], [nl, H, I], [nl, 1]]


def _adopt_expert_weights(config: RefMoEConfig, weights: Sequence[Sequence[torch.Tensor]]) -> list[list[torch.Tensor]]:
    """Check that ``weights`` have the shapes and dtype of one rank's slots under ``config``."""
    want = _slot_shapes(config)
    if len(weights) != config.num_layers:
        raise InvalidArgumentError(f"expert_weights has {len(weights)} layers, the config {config.num_layers}")
    for layer, tensors in enumerate(weights):
        got = [list(t.shape) if isinstance(t, torch.Tensor) else None for t in tensors]
        if got != want or any(t.dtype != config.dtype for t in tensors):
            raise InvalidArgumentError(f"expert_weights[{layer}] are {got} of "
                                       f"{[getattr(t, 'dtype', None) for t in tensors]}, expected {want} of {config.dtype}")
    return [list(tensors) for tensors in weights]


def router_weights(config: RefMoEConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Replicated router: weight ``[L, E, hidden]`` and bias ``[L, E]`` (the bias skews the load)."""
    g = _generator(config.seed, 10 ** 6, 4)
    w = torch.randn((config.num_layers, config.num_logical, config.hidden), generator=g, dtype=torch.float64)
    b = torch.randn((config.num_layers, config.num_logical), generator=g, dtype=torch.float64)
    return (w / math.sqrt(config.hidden)).to(config.dtype), b.to(config.dtype)


def make_inputs(config: RefMoEConfig, step: int, rank: int, num_tokens: int) -> torch.Tensor:
    """Deterministic activations ``[num_tokens, hidden]`` for ``(seed, step, rank)``."""
    if not _is_int(num_tokens) or num_tokens < 0:
        raise InvalidArgumentError(f"num_tokens must be an integer >= 0, got {num_tokens!r}")
    g = _generator(config.seed, 2 * 10 ** 6, step, rank)
    return torch.randn((num_tokens, config.hidden), generator=g, dtype=torch.float64).to(config.dtype)


def _check_expert_ids(expert_ids, num_tokens: int, config: RefMoEConfig) -> torch.Tensor:
    ids = torch.as_tensor(expert_ids)
    if ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex():
        raise InvalidArgumentError(f"expert_ids must have an integer dtype, got {ids.dtype}")
    want = (num_tokens, config.num_layers, config.top_k)
    if tuple(ids.shape) != want:
        raise InvalidArgumentError(f"expert_ids must be [tokens, layers, top_k] = {list(want)}, got {list(ids.shape)}")
    ids = ids.to(torch.int64)
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= config.num_logical):
        bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
        raise InvalidArgumentError(f"expert_ids holds expert {bad}, outside 0..{config.num_logical - 1}")
    return ids


def _check_x(x, config: RefMoEConfig) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise InvalidArgumentError(f"x must be a floating-point torch.Tensor, got {type(x).__name__}"
                                   + (f" of {x.dtype}" if isinstance(x, torch.Tensor) else ""))
    if x.dim() != 2 or x.shape[1] != config.hidden:
        raise InvalidArgumentError(f"x must be [tokens, hidden={config.hidden}], got {list(x.shape)}")
    return x.to(config.dtype).contiguous()


# --------------------------------------------------------------------------- dense reference
def reference_forward(config: RefMoEConfig, x: torch.Tensor, expert_ids: torch.Tensor | None = None,
                      *, return_routing: bool = False):
    """Single-process output for the *global* token batch ``x [T, hidden]``, without any placement.

    Uses the logical weights directly and runs each layer's pairs grouped by logical expert (another
    batching than any EP layout). ``RefMoEModel.forward`` on ranks holding consecutive pieces of ``x``
    must return exactly the matching rows.

    Returns:
        ``out [T, hidden]``, or ``(out, experts [L, T, K] int64)`` with ``return_routing``.
    """
    q = _quant(config.hidden, config.ffn, config.dtype)
    _check_matmul_precision(q)
    state = _check_x(x, config)
    T, K = state.shape[0], config.top_k
    ids = None if expert_ids is None else _check_expert_ids(expert_ids, T, config)
    rw, rb = router_weights(config)
    routing = []
    for layer in range(config.num_layers):
        xn = _norm(state)
        top_i, gate_w = _route(xn, rw[layer], rb[layer], K, None if ids is None else ids[:, layer])
        routing.append(top_i)
        flat = top_i.reshape(-1)
        order = torch.argsort(flat, stable=True)  # pairs grouped by logical expert
        counts = torch.bincount(flat, minlength=config.num_logical).tolist()
        y = expert_stage(xn.index_select(0, order // K), counts, _logical_layer(config, layer), config)
        results = torch.empty_like(y)
        results[order] = y
        state = _combine(state, gate_w, results.view(T, K, config.hidden))
    if return_routing:
        return state, torch.stack(routing) if routing else torch.zeros((0, T, K), dtype=torch.int64)
    return state


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


# --------------------------------------------------------------------------- trace routing
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
