"""The reference model's deterministic weights and inputs (from the config's seed, independent of the EP
layout), their checks, and ``reference_forward``: the dense single-process output every EP layout must match
bitwise.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from eplbd.errors import InvalidArgumentError
from eplbd.refengine.model_arith import (_W_MAX, RefMoEConfig, _check_matmul_precision, _combine, _is_int, _norm,
                                         _quant, _route, expert_stage)

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
