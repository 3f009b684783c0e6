"""The reference EP MoE model (eplbd.refengine.model): real gloo process groups, no mocks.

The distributed checks run in one spawn of 4 processes: a 4-rank EP group (WORLD), then a 2-rank
one (the subgroup {0, 1}). Each rank runs many forwards (three placements x router/trace mode x
several steps, an in-place rearrangement, corrupted slots, a bad input) and saves what it saw; the
parent compares with the single-process ``reference_forward`` and with loads derived independently
from the reference routing.
"""

from __future__ import annotations

import contextlib
import datetime
import pathlib
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from eplbd.errors import InvalidArgumentError, PlacementError, TraceError
from eplbd.policy.placement import derive_log2phy, initial_placement, validate_placement
from eplbd.refengine.model import (
    RefMoEConfig,
    RefMoEModel,
    TraceRouting,
    _quant,
    expert_stage,
    local_expert_weights,
    logical_expert_weights,
    make_inputs,
    reference_forward,
    router_weights,
)
from eplbd.offline.trace import batch_schedule
from eplbd.refengine.model_trace import _schedule

SHAPE = dict(num_layers=4, hidden=32, ffn=40, num_logical=32, top_k=4, num_redundant=8, seed=3)


def config(ep_size: int, **kw) -> RefMoEConfig:
    return RefMoEConfig(ep_size=ep_size, **{**SHAPE, **kw})


@contextlib.contextmanager
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def random_placement(cfg: RefMoEConfig, seed: int) -> torch.Tensor:
    """Every expert once plus random extra replicas (some experts 2-3 times), shuffled over the slots."""
    rng = np.random.default_rng(seed)
    E, P = cfg.num_logical, cfg.num_physical
    rows = [rng.permutation(np.concatenate([np.arange(E), rng.integers(0, E, P - E)])) for _ in range(cfg.num_layers)]
    phy2log = torch.from_numpy(np.stack(rows).astype(np.int64))
    validate_placement(phy2log, E, cfg.ep_size, cfg.num_layers)
    return phy2log


def placements(cfg: RefMoEConfig) -> dict[str, torch.Tensor]:
    L, E, P, R = cfg.num_layers, cfg.num_logical, cfg.num_physical, cfg.ep_size
    return {"linear": initial_placement(L, E, P, R, "linear"),
            "round_robin": initial_placement(L, E, P, R, "round_robin"),
            "random": random_placement(cfg, 11)}


def split(n: int, parts: int, pattern: list[float]) -> list[int]:
    """Uneven, deterministic split of n tokens (some parts may be 0)."""
    w = np.asarray(pattern[:parts], float)
    sizes = np.floor(n * w / w.sum()).astype(int)
    sizes[0] += n - sizes.sum()
    return sizes.tolist()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def global_batches(trace_ids: list[torch.Tensor]) -> list[dict]:
    """Global steps (same for every rank count): router mode, then trace mode."""
    cfg = config(1)
    out = []
    # 20 then 37 tokens: the second step overflows the exchange capacity set by the first
    for step, n in enumerate((20, 37, 5)):
        out.append({"mode": "router", "x": make_inputs(cfg, step, 0, n), "ids": None})
    for step, ids in enumerate(trace_ids):
        out.append({"mode": "trace", "x": make_inputs(cfg, 100 + step, 0, ids.shape[0]), "ids": ids})
    return out


def per_rank(batch: dict, ws: int, pattern: list[float]) -> tuple[list[torch.Tensor], list | None]:
    sizes = split(batch["x"].shape[0], ws, pattern)
    xs = list(torch.split(batch["x"], sizes))
    ids = None if batch["ids"] is None else list(torch.split(batch["ids"], sizes))
    return xs, ids


PATTERNS = {2: [3.0, 1.0], 4: [2.0, 0.0, 1.0, 1.5]}  # rank 1 of 4 gets no tokens


# -------------------------------------------------------------------- the spawned ranks
def _checks(rank: int, ws: int, group, batches: list[dict]) -> dict:
    """Everything one rank of a ``ws``-rank EP group does; returns what it saw."""
    cfg = config(ws)
    nl = cfg.num_local_physical
    originals = logical_expert_weights(cfg)
    res: dict = {"outputs": {}, "loads": {}, "weights_ok": {}}

    def run_all(model: RefMoEModel, name: str) -> None:
        for i, b in enumerate(batches):
            xs, ids = per_rank(b, ws, PATTERNS[ws])
            res["outputs"][name, i] = model.forward(xs[rank], None if ids is None else ids[rank])
            res["loads"][name, i] = model.expert_load_view.clone()

    models = {}
    for name, phy2log in placements(cfg).items():
        model = RefMoEModel(cfg, rank, group, phy2log)
        res["weights_ok"][name] = all(
            torch.equal(model.expert_weights[layer][t][j], originals[layer][t][int(phy2log[layer, rank * nl + j])])
            for layer in range(cfg.num_layers) for t in range(3) for j in range(nl))
        run_all(model, name)
        models[name] = model

    # A rearrangement done the way a placement agent does it: new placement tensors in place,
    # the new experts copied into the live slots in place; nothing reallocated.
    model = models["linear"]
    new = placements(cfg)["random"]
    ptrs = [t.data_ptr() for t in model.placement_tensors()] + \
        [t.data_ptr() for layer in model.expert_weights for t in layer]
    model.load_placement_(new)
    for layer, tensors in enumerate(local_expert_weights(cfg, new, rank)):
        for live, fresh in zip(model.expert_weights[layer], tensors):
            live.copy_(fresh)
    res["same_storage"] = ptrs == [t.data_ptr() for t in model.placement_tensors()] + \
        [t.data_ptr() for layer in model.expert_weights for t in layer]
    run_all(model, "rearranged")

    # Every tensor of an expert matters: swap one tensor between two slots of rank 0 that hold
    # different experts (all three tensors differ) and get tokens from rank 0, run, restore.
    model = models["round_robin"]
    xs, _ = per_rank(batches[0], ws, PATTERNS[ws])
    layer, used = 0, res["loads"]["round_robin", 0][0, :nl]
    if rank == 0:
        loaded = [j for j in torch.argsort(used, descending=True, stable=True).tolist() if used[j] > 0]
        i = loaded[0]
        j = next(j for j in loaded[1:] if all(not torch.equal(w[i], w[j]) for w in model.expert_weights[layer]))
    res["corrupted"] = {}
    for t in range(3):
        tensor = model.expert_weights[layer][t]
        if rank == 0:
            saved = tensor.clone()
            tensor[[i, j]] = tensor[[j, i]].clone()
        res["corrupted"][t] = model.forward(xs[rank])
        if rank == 0:
            tensor.copy_(saved)
    res["restored"] = model.forward(xs[rank])

    # A bad input on one rank fails on every rank instead of hanging the others.
    bad = torch.zeros((3, cfg.hidden + 1)) if rank == ws - 1 else xs[rank]
    try:
        model.forward(bad)
        res["bad_input"] = None
    except InvalidArgumentError as exc:
        res["bad_input"] = str(exc)
    res["after_bad_input"] = model.forward(xs[rank])
    return res


def _worker(rank: int, world: int, port: int, batches: list[dict], out_dir: str) -> None:
    """4 processes: the 4-rank checks on WORLD, then the 2-rank checks on the subgroup {0, 1}."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        pair = dist.new_group([0, 1], backend="gloo")  # collective: every process calls it
        res = {world: _checks(rank, world, dist.group.WORLD, batches)}
        if rank < 2:
            res[2] = _checks(rank, 2, pair, batches)
        torch.save(res, pathlib.Path(out_dir) / f"rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def trace_ids(shared_data) -> list[torch.Tensor]:
    path = shared_data / "gpt_oss_20b" / "gptoss20b_decode_routing_tokens.npz"
    tr = TraceRouting.from_file(path, ep_size=4, tokens_per_rank=8, num_layers=SHAPE["num_layers"],
                                num_logical=SHAPE["num_logical"], seed=5)
    tail = tr.num_steps - 3  # few requests left: fewer tokens than slots
    return [torch.cat(tr.step_batches(s)) for s in (0, 1, tail)]


@pytest.fixture(scope="module")
def reference(trace_ids):
    batches = global_batches(trace_ids)
    with one_thread():
        refs = [reference_forward(config(1), b["x"], b["ids"], return_routing=True) for b in batches]
    return batches, refs


def expected_loads(cfg: RefMoEConfig, phy2log: torch.Tensor, routing: torch.Tensor, sizes: list[int]) -> np.ndarray:
    """[ranks, L, P]: each rank's tokens' (token, k) pairs per slot, from the replica rule."""
    log2phy, logcnt = derive_log2phy(phy2log, cfg.num_logical)
    L, T, K = routing.shape
    out = np.zeros((len(sizes), L, cfg.num_physical), np.int64)
    owner = np.repeat(np.arange(len(sizes)), sizes)
    for layer in range(L):
        for t in range(T):
            for k in range(K):
                e = int(routing[layer, t, k])
                slot = int(log2phy[layer, e, (t + k) % int(logcnt[layer, e])])
                out[owner[t], layer, slot] += 1
    return out


@pytest.fixture(scope="module")
def all_runs(reference, tmp_path_factory) -> dict[int, list[dict]]:
    batches, _ = reference
    out = tmp_path_factory.mktemp("refmodel")
    mp.spawn(_worker, args=(4, free_port(), batches, str(out)), nprocs=4, join=True)
    saved = [torch.load(out / f"rank{r}.pt") for r in range(4)]
    return {4: [saved[r][4] for r in range(4)], 2: [saved[r][2] for r in range(2)]}


@pytest.fixture(params=[2, 4])
def ranks_run(request, all_runs):
    return request.param, all_runs[request.param]


# -------------------------------------------------------------------- distributed checks
def test_slots_hold_the_experts_phy2log_names(ranks_run):
    ws, res = ranks_run
    for r in range(ws):
        assert res[r]["weights_ok"] == {"linear": True, "round_robin": True, "random": True}


def test_output_is_bitwise_the_dense_reference_for_every_placement_and_rank_count(ranks_run, reference):
    ws, res = ranks_run
    batches, refs = reference
    for name in ("linear", "round_robin", "random", "rearranged"):
        for i, b in enumerate(batches):
            got = torch.cat([res[r]["outputs"][name, i] for r in range(ws)])
            assert torch.equal(got, refs[i][0]), f"{ws} ranks, {name}, batch {i} ({b['mode']})"
    # and the output really depends on the input and the layers (not a pass-through)
    assert not torch.equal(refs[0][0], batches[0]["x"])


def test_rearrangement_in_place_keeps_storage(ranks_run):
    ws, res = ranks_run
    assert all(res[r]["same_storage"] for r in range(ws))


def test_load_view_counts_this_ranks_pairs_per_slot(ranks_run, reference):
    ws, res = ranks_run
    batches, refs = reference
    cfg = config(ws)
    split_replicas = 0
    for name, phy2log in {**placements(cfg), "rearranged": placements(cfg)["random"]}.items():
        for i, b in enumerate(batches):
            routing = refs[i][1]
            sizes = split(b["x"].shape[0], ws, PATTERNS[ws])
            want = expected_loads(cfg, phy2log, routing, sizes)
            got = np.stack([res[r]["loads"][name, i].numpy() for r in range(ws)])
            assert (got == want).all(), f"{name}, batch {i}"
            # summed over ranks and mapped to logical experts: the routing's counts
            logical = np.zeros((cfg.num_layers, cfg.num_logical), np.int64)
            for layer in range(cfg.num_layers):
                np.add.at(logical[layer], phy2log[layer].numpy(), got.sum(0)[layer])
                assert (logical[layer] == np.bincount(routing[layer].reshape(-1).numpy(),
                                                      minlength=cfg.num_logical)).all()
            # a replicated expert's load is split over its replicas
            log2phy, logcnt = derive_log2phy(phy2log, cfg.num_logical)
            total = got.sum(0)
            for layer in range(cfg.num_layers):
                for e in np.flatnonzero(logcnt[layer].numpy() > 1):
                    slots = log2phy[layer, e, :int(logcnt[layer, e])].numpy()
                    split_replicas += int((total[layer, slots] > 0).sum() > 1)
    assert split_replicas > 10


def test_every_expert_tensor_matters(ranks_run, reference):
    ws, res = ranks_run
    clean = torch.cat([res[r]["restored"] for r in range(ws)])
    batches, refs = reference
    assert torch.equal(clean, refs[0][0])
    for t, what in enumerate(("w_gate_up", "w_down", "scale")):
        bad = torch.cat([res[r]["corrupted"][t] for r in range(ws)])
        assert not torch.equal(bad, clean), f"swapping {what} between two slots changed nothing"


def test_bad_input_on_one_rank_fails_on_all(ranks_run, reference):
    ws, res = ranks_run
    for r in range(ws):
        msg = res[r]["bad_input"]
        assert msg is not None
        assert ("hidden=32" in msg) if r == ws - 1 else (f"rank {ws - 1}" in msg), msg
    assert torch.equal(torch.cat([res[r]["after_bad_input"] for r in range(ws)]), reference[1][0][0])


# -------------------------------------------------------------------- batch invariance
def test_silu_kernels_are_position_dependent_so_the_model_avoids_them():
    """Why the expert stage uses a SiLU table: ATen's silu gives other bits for the tail elements."""
    x = torch.randn(1 << 16, generator=torch.Generator().manual_seed(0)) * 4
    strided = F.silu(x[::2])  # scalar path
    contiguous = F.silu(x[::2].contiguous())  # SIMD path (on a CPU with vector kernels)
    differ = int((strided != contiguous).sum())
    # informative: on AVX2/AVX-512 builds a few percent differ; the model must not care either way
    assert differ >= 0


def test_expert_stage_is_batch_invariant():
    """The same (row, expert) pairs give the same bits however they are grouped and batched."""
    cfg = config(1)
    weights = logical_expert_weights(cfg)[1]
    gen = torch.Generator().manual_seed(1)
    n = 300
    rows = F.rms_norm(torch.randn(n, cfg.hidden, generator=gen) * 3, (cfg.hidden,), eps=1e-6)
    experts = torch.randint(0, cfg.num_logical, (n,), generator=gen)

    def run(order: torch.Tensor, chunks: int) -> torch.Tensor:
        out = torch.empty(n, cfg.hidden)
        for part in torch.tensor_split(order, chunks):
            e = experts[part]
            srt = torch.argsort(e, stable=True)
            idx = part[srt]
            counts = torch.bincount(e, minlength=cfg.num_logical).tolist()
            out[idx] = expert_stage(rows[idx], counts, weights, cfg)
        return out

    with one_thread():
        base = run(torch.arange(n), 1)
        for seed, chunks in ((2, 1), (3, 7), (4, n)):
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
            assert torch.equal(run(perm, chunks), base), f"chunks={chunks}"
    # and it computes the documented expert (up to the fixed-point grids)
    w_gu, w_down, scale = weights
    h = torch.einsum("nh,nfh->nf", rows.double(), w_gu[experts].double())
    act = F.silu(h[:, :cfg.ffn]) * h[:, cfg.ffn:]
    want = torch.einsum("nf,nhf->nh", act, w_down[experts].double()) * scale[experts].double()
    assert torch.allclose(base.double(), want, atol=2e-3, rtol=1e-2)


def test_expert_stage_float64_accumulation_matches_float32():
    """Large dims switch the matmuls to float64; small ones can be forced to: same exact products."""
    cfg32 = config(1)
    cfg64 = config(1, dtype=torch.float64)
    q32, q64 = _quant(cfg32.hidden, cfg32.ffn, torch.float32), _quant(cfg64.hidden, cfg64.ffn, torch.float64)
    assert q32.acc == torch.float32 and q64.acc == torch.float64
    assert _quant(4096, 1536, torch.float32).acc == torch.float64
    x = make_inputs(cfg64, 0, 0, 24)
    m = RefMoEModel(cfg64, 0, None, initial_placement(4, 32, 40, 1))
    with one_thread():
        assert torch.equal(m.forward(x), reference_forward(cfg64, x))
        assert m.forward(x).dtype == torch.float64


def test_single_process_model_equals_reference_and_placement_does_not_matter():
    cfg = config(1)
    x = make_inputs(cfg, 7, 0, 50)
    with one_thread():
        ref = reference_forward(cfg, x)
        for name, phy2log in placements(cfg).items():
            m = RefMoEModel(cfg, 0, None, phy2log)
            assert torch.equal(m.forward(x), ref), name
            assert int(m.expert_load_view.sum()) == 50 * cfg.top_k * cfg.num_layers
        assert m.forward(x[:0]).shape == (0, cfg.hidden)
        assert int(m.expert_load_view.sum()) == 0


# -------------------------------------------------------------------- placement tensors, errors
def test_load_placement_updates_in_place():
    m = RefMoEModel(config(1), 0, None, initial_placement(4, 32, 40, 1))
    ptrs = [t.data_ptr() for t in m.placement_tensors()]
    weights_before = [t.clone() for t in m.expert_weights[0]]
    new = random_placement(config(1), 5)
    m.load_placement_(new)
    phy2log, log2phy, logcnt = m.placement_tensors()
    assert [t.data_ptr() for t in (phy2log, log2phy, logcnt)] == ptrs
    want_l2p, want_cnt = derive_log2phy(new, 32)
    width = want_l2p.shape[2]
    assert torch.equal(phy2log, new) and torch.equal(logcnt, want_cnt)
    assert log2phy.shape == (4, 32, 9)
    assert torch.equal(log2phy[:, :, :width], want_l2p) and (log2phy[:, :, width:] == -1).all()
    assert all(torch.equal(a, b) for a, b in zip(m.expert_weights[0], weights_before))  # weights untouched
    # layer by layer, as an agent commits
    lin = initial_placement(4, 32, 40, 1)
    m.load_placement_(lin, layers=[2])
    assert torch.equal(phy2log[2], lin[2]) and torch.equal(phy2log[1], new[1])
    assert torch.equal(logcnt[2], derive_log2phy(lin, 32)[1][2]) and torch.equal(logcnt[1], want_cnt[1])


@pytest.mark.parametrize("bad, match", [
    (torch.zeros((4, 39), dtype=torch.int64), r"\[4, 40\].*\[4, 39\]"),
    (torch.zeros((3, 40), dtype=torch.int64), r"\[4, 40\].*\[3, 40\]"),
    (torch.full((4, 40), 32, dtype=torch.int64), r"logical id 32"),
    (torch.zeros((4, 40), dtype=torch.int64), r"no slot for logical expert"),
    (torch.zeros((4, 40)), r"integer dtype"),
])
def test_load_placement_rejects_bad_placements(bad, match):
    m = RefMoEModel(config(1), 0, None, initial_placement(4, 32, 40, 1))
    before = [t.clone() for t in m.placement_tensors()]
    with pytest.raises(PlacementError, match=match):
        m.load_placement_(bad)
    assert all(torch.equal(a, b) for a, b in zip(m.placement_tensors(), before))
    with pytest.raises(PlacementError, match="layers holds 4"):
        m.load_placement_(initial_placement(4, 32, 40, 1), layers=[4])


def test_set_eplb_state_uses_the_callers_tensors():
    cfg = config(1)
    m = RefMoEModel(cfg, 0, None, initial_placement(4, 32, 40, 1))
    _, log2phy, logcnt = (t.clone() for t in m.placement_tensors())
    load = torch.zeros((4, 40), dtype=torch.int64)
    m.set_eplb_state(load, log2phy, logcnt)
    assert m.expert_load_view is load and m.placement_tensors()[1] is log2phy
    m.forward(make_inputs(cfg, 0, 0, 10))
    assert int(load.sum()) == 10 * 4 * 4
    with pytest.raises(InvalidArgumentError, match=r"logical_replica_count must be int64 \[4, 32\]"):
        m.set_eplb_state(load, log2phy, logcnt[:, :5])
    with pytest.raises(InvalidArgumentError, match="expert_load_view"):
        m.set_eplb_state(load.int(), log2phy, logcnt)


@pytest.mark.parametrize("kw, match", [
    (dict(ep_size=3), r"num_physical = .*40 is not a multiple of ep_size=3"),
    (dict(ep_size=1, num_redundant=-1), r"num_redundant must be an integer >= 0, got -1"),
    (dict(ep_size=1, top_k=33), r"top_k=33 exceeds num_logical=32"),
    (dict(ep_size=1, num_groups=5), r"num_groups=5 does not divide num_logical=32"),
    (dict(ep_size=1, hidden=0), r"hidden must be an integer >= 1, got 0"),
    (dict(ep_size=1, dtype=torch.float16), r"dtype must be torch.float32 or torch.float64"),
    (dict(ep_size=1, num_layers=2.0), r"num_layers must be an integer >= 1, got 2.0"),
])
def test_bad_config_names_the_value(kw, match):
    ep = kw.pop("ep_size")
    with pytest.raises(InvalidArgumentError, match=match):
        config(ep, **kw)


def test_bad_model_arguments():
    cfg = config(1)
    p = initial_placement(4, 32, 40, 1)
    with pytest.raises(InvalidArgumentError, match="rank must be in 0..0"):
        RefMoEModel(cfg, 1, None, p)
    with pytest.raises(InvalidArgumentError, match="group=None needs ep_size == 1"):
        RefMoEModel(config(2), 0, None, initial_placement(4, 32, 40, 2))
    with pytest.raises(PlacementError):
        RefMoEModel(cfg, 0, None, p[:, :39])
    m = RefMoEModel(cfg, 0, None, p)
    with pytest.raises(InvalidArgumentError, match=r"x must be \[tokens, hidden=32\], got \[5, 31\]"):
        m.forward(torch.zeros(5, 31))
    with pytest.raises(InvalidArgumentError, match=r"expert_ids holds expert 32"):
        m.forward(torch.zeros(2, 32), torch.full((2, 4, 4), 32))
    with pytest.raises(InvalidArgumentError, match=r"expert_ids must be \[tokens, layers, top_k\]"):
        m.forward(torch.zeros(2, 32), torch.zeros((2, 3, 4), dtype=torch.int64))
    prev = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        with pytest.raises(InvalidArgumentError, match="float32_matmul_precision"):
            m.forward(torch.zeros(2, 32))
    finally:
        torch.set_float32_matmul_precision(prev)


# -------------------------------------------------------------------- weights, inputs, trace
def test_weights_are_deterministic_on_the_grid_and_independent_of_the_ep_layout():
    a = logical_expert_weights(config(1))
    b = logical_expert_weights(config(4, num_redundant=0))
    q = _quant(32, 40, torch.float32)
    for la, lb in zip(a, b):
        assert [t.shape for t in la] == [(32, 80, 32), (32, 32, 40), (32, 1)]
        assert all(torch.equal(x, y) for x, y in zip(la, lb))
        gu, down, scale = la
        assert ((gu * 2 ** q.w_gu_shift).round() == gu * 2 ** q.w_gu_shift).all() and (gu.abs() <= 7 / 32).all()
        assert ((down * 2 ** q.w_down_shift).round() == down * 2 ** q.w_down_shift).all()
        assert ((scale >= 0.5) & (scale <= 1.5)).all() and scale.unique().numel() > 10
    assert not torch.equal(a[0][0], a[1][0])
    assert not torch.equal(a[0][0], logical_expert_weights(config(1, seed=4))[0][0])
    assert torch.equal(router_weights(config(1))[0], router_weights(config(2))[0])
    assert torch.equal(make_inputs(config(1), 3, 1, 7), make_inputs(config(2), 3, 1, 7))
    assert not torch.equal(make_inputs(config(1), 3, 1, 7), make_inputs(config(1), 3, 0, 7))


def test_trace_routing_batches_requests_continuously():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 30, 50)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    experts = rng.integers(0, 8, (int(offsets[-1]), 3, 2)).astype(np.uint8)
    tr = TraceRouting(experts, offsets, ep_size=3, tokens_per_rank=2, num_layers=2, seed=1)
    order = np.random.default_rng(1).permutation(50)
    starts, slots = _schedule(lengths[order], 6)
    assert (starts == batch_schedule(lengths[order], 6)).all()
    seen = []
    for step in range(tr.num_steps):
        for r in range(3):
            idx = tr.token_index(step, r)
            assert len(idx) <= 2
            seen += idx.tolist()
            b = tr.rank_batch(step, r)
            assert b.dtype == torch.int64 and b.shape == (len(idx), 2, 2)
            assert torch.equal(b, torch.from_numpy(experts[idx, :2].astype(np.int64)))
    assert sorted(seen) == list(range(int(offsets[-1])))  # every token once
    # each request decodes in order, one token per step, in one slot
    assert torch.equal(tr.rank_batch(tr.num_steps + 4, 1), tr.rank_batch(4, 1))  # wraps
    same = TraceRouting(experts, offsets, ep_size=3, tokens_per_rank=2, num_layers=2, seed=1)
    assert all(torch.equal(same.rank_batch(s, 2), tr.rank_batch(s, 2)) for s in range(20))
    with pytest.raises(TraceError, match="expert 7, but the model has num_logical=4"):
        TraceRouting(experts, offsets, ep_size=1, tokens_per_rank=1, num_logical=4)
    with pytest.raises(TraceError, match="num_layers=4"):
        TraceRouting(experts, offsets, ep_size=1, tokens_per_rank=1, num_layers=4)


def test_trace_routing_from_the_gpt_oss_file(shared_data):
    path = shared_data / "gpt_oss_20b" / "gptoss20b_decode_routing_tokens.npz"
    cfg = RefMoEConfig(num_layers=24, hidden=64, ffn=128, num_logical=32, top_k=4, num_redundant=8, ep_size=4)
    tr = TraceRouting.for_config(cfg, path, tokens_per_rank=32, seed=0)
    batches = tr.step_batches(0)
    assert [b.shape for b in batches] == [(32, 24, 4)] * 4
    assert all(int(b.max()) < 32 for b in batches)
    first3 = TraceRouting.for_config(config(4, num_layers=3), path, tokens_per_rank=32, seed=0)
    assert torch.equal(first3.rank_batch(5, 2), tr.rank_batch(5, 2)[:, :3])
    with pytest.raises(TraceError, match="num_logical=16"):
        TraceRouting.for_config(config(4, num_logical=16, top_k=4, num_redundant=0), path, tokens_per_rank=1)
