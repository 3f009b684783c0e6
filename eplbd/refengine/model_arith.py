"""The reference model's shape (``RefMoEConfig``) and its exact arithmetic: the fixed-point grids, the SiLU
table, the expert stage and the router/combine steps whose bits cannot depend on the batch (see "Batch
invariance" in :mod:`eplbd.refengine.model`).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from eplbd.errors import InvalidArgumentError

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
