"""NixlCommunicator between real processes with real nixl (UCX over cma/shm on this host).

Every rank spawns with ``torch.multiprocessing`` (start method ``spawn``), joins a gloo
group, builds live tensors whose values encode (rank, layer, slot, tensor), runs the
same hand-written batches as every other rank, and checks its staging pool bitwise.
Children report ``(rank, "ok" | traceback)`` through a queue; the parent fails the
test on any report other than "ok", a missing report, or a non-zero exit code.
"""

from __future__ import annotations

import os
import queue
import signal
import socket
import time
import traceback
from typing import Any, Callable

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from eplbd.client.comm.base import Transfer
from eplbd.client.comm import nixl as nixl_comm
from eplbd.client.comm.nixl import NixlCommunicator, nixl_available
from eplbd.errors import InvalidArgumentError, UnavailableError

NUM_LOCAL = 3
NUM_LAYERS = 2
NUM_BUFS = 2
# Generous for a loaded 2-core machine (3 ranks take ~8 s idle); CHILD_TIMEOUT_S + JOIN_S stays below
# the tests' pytest timeout, so that a hang is reported by the parent, naming the rank that hung.
CHILD_TIMEOUT_S = 90
JOIN_S = 20


@pytest.fixture(scope="module", autouse=True)
def _need_nixl() -> None:
    reason = nixl_available()
    if reason is not None:
        pytest.skip(f"nixl unusable here: {reason}")


# --- data that encodes where it came from ---------------------------------------------------------
def _value(rank: int, layer: int, slot: int, tensor: int) -> float:
    """A distinct small integer per (rank, layer, slot, tensor): exact even in bfloat16 (below 256)."""
    return float(1 + rank * 40 + layer * 10 + slot * 3 + tensor)


def _expert(rank: int, layer: int, slot: int) -> list[torch.Tensor]:
    """One expert's three tensors; float32 ones also get a per-element ramp so offsets matter."""
    w1 = torch.arange(4 * 8, dtype=torch.float32).reshape(4, 8) / 64 + _value(rank, layer, slot, 0)
    w2 = torch.arange(8 * 4, dtype=torch.float32).reshape(8, 4) / 64 + _value(rank, layer, slot, 1)
    scale = torch.full((1,), _value(rank, layer, slot, 2), dtype=torch.bfloat16)
    return [w1, w2, scale]


def _live(rank: int) -> list[list[torch.Tensor]]:
    return [[torch.stack(ts).contiguous() for ts in zip(*(_expert(rank, layer, s) for s in range(NUM_LOCAL)))]
            for layer in range(NUM_LAYERS)]


def _staging() -> list[list[torch.Tensor]]:
    """Pre-filled with a sentinel so that untouched slots can be told apart."""
    return [[torch.full((NUM_LOCAL, 4, 8), -1.0), torch.full((NUM_LOCAL, 8, 4), -2.0),
             torch.full((NUM_LOCAL, 1), -3.0, dtype=torch.bfloat16)] for _ in range(NUM_BUFS)]


# --- process plumbing ---------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(rank: int, world: int, port: int, q: Any, body: Callable[..., None], args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        body(rank, world, dist.group.WORLD, *args)
        q.put((rank, "ok"))
    except BaseException:
        q.put((rank, traceback.format_exc()))
    finally:
        dist.destroy_process_group()


def _spawn(world: int, body: Callable[..., None], *args: Any) -> None:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_child, args=(r, world, port, q, body, args)) for r in range(world)]
    for p in procs:
        p.start()
    reports: dict[int, str] = {}
    deadline = time.monotonic() + CHILD_TIMEOUT_S
    try:
        for _ in range(world):
            rank, outcome = q.get(timeout=max(0.0, deadline - time.monotonic()))
            reports[rank] = outcome
    except queue.Empty:
        pass
    finally:
        deadline = time.monotonic() + JOIN_S
        for p in procs:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()  # also ends a SIGSTOPped rank
                p.join()
        q.close()
        q.join_thread()
    failures = {r: out for r, out in reports.items() if out != "ok"}
    assert not failures, "\n".join(f"--- rank {r} ---\n{out}" for r, out in sorted(failures.items()))
    assert sorted(reports) == list(range(world)), f"ranks that never reported: {sorted(set(range(world)) - set(reports))}"
    assert [p.exitcode for p in procs] == [0] * world


# --- bodies run in every rank ----------------------------------------------------------------------
def _run_batches(rank: int, world: int, group: Any, batches: list[tuple[int, list[Transfer]]]) -> None:
    """Run every batch (buffer, transfers) and check the whole staging pool afterwards."""
    live, staging = _live(rank), _staging()
    before = [[t.clone() for t in buf] for buf in staging]
    comm = NixlCommunicator(rank, world, group, timeout_s=10.0)
    try:
        comm.setup(live, staging)
        for buf, batch in batches:
            comm.run_batch(buf, [t for t in batch if rank in (t.src_rank, t.dst_rank)])
        _check_rejects(comm, rank, (rank + 1) % world)
        dist.barrier(group)  # every reader is done before anyone's live memory goes away
    finally:
        comm.close()
    comm.close()  # idempotent
    with pytest.raises(InvalidArgumentError, match="closed"):
        comm.run_batch(0, [])
    expected = [[t.clone() for t in buf] for buf in before]
    expert_bytes = sum(t[0].nbytes for t in live[0])
    received = sent = 0
    for buf, batch in batches:
        for t in batch:
            sent += expert_bytes * (t.src_rank == rank)
            if t.dst_rank == rank:
                received += expert_bytes
                for k, src in enumerate(_expert(t.src_rank, t.layer, t.src_local)):
                    expected[buf][k][t.dst_local] = src
    for b in range(NUM_BUFS):
        for k in range(3):
            got, want = staging[b][k], expected[b][k]
            assert got.dtype == want.dtype and torch.equal(got.view(torch.uint8), want.view(torch.uint8)), (
                f"rank {rank}: staging[{b}][{k}] is\n{got}\nexpected\n{want}")
    assert (comm.bytes_received, comm.bytes_sent) == (received, sent)


def _reads_from_gone_peers(rank: int, world: int, group: Any) -> None:
    """After setup, rank 1 closes its communicator (deregisters its memory, destroys its agent) but
    stays alive, and rank 2's process exits (a crashed worker). Rank 0's reads from either must
    fail typed, naming the peer and layer, well within the deadline.
    """
    pids: list[Any] = [None] * world
    dist.all_gather_object(pids, os.getpid(), group=group)
    pair = dist.new_group([0, 1])  # collective over all ranks: created before rank 2 leaves
    comm = NixlCommunicator(rank, world, group, timeout_s=3.0)
    try:
        comm.setup(_live(rank), _staging())
        dist.barrier(group)
        if rank == 1:
            comm.close()
            dist.barrier(pair)  # closed
            dist.barrier(pair)  # rank 0 is done reading
        elif rank == 0:
            dist.barrier(pair)
            _wait_gone(pids[2])
            for peer, layer in ((1, 1), (2, 0)):
                read = [Transfer(layer, 0, src_rank=peer, src_local=2, dst_rank=0, dst_local=0)]
                if peer == 1:
                    _until_raises(lambda: comm.run_batch(0, read))
                start = time.monotonic()
                with pytest.raises(UnavailableError, match=rf"peer rank {peer} \(layer\(s\) \[{layer}\]\)"):
                    comm.run_batch(0, read)
                assert time.monotonic() - start < 3.0 + 10.0  # bounded; slack for a loaded machine
            dist.barrier(pair)
    finally:
        comm.close()


def _until_raises(fn: Callable[[], None]) -> None:
    """Call ``fn`` until it raises UnavailableError. A peer's disconnect reaches this rank's UCX
    worker asynchronously; until it does, a cma read of the (still mapped) memory may succeed."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            fn()
        except UnavailableError:
            return
        time.sleep(0.02)
    raise AssertionError("reads from the closed peer kept succeeding")


def _wait_gone(pid: int) -> None:
    """Until ``pid`` has exited (a zombie counts: its memory is gone)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                    return
        except FileNotFoundError:
            return
        time.sleep(0.05)
    raise AssertionError(f"pid {pid} did not exit")


def _check_rejects(comm: NixlCommunicator, rank: int, peer: int) -> None:
    """Malformed transfers raise InvalidArgumentError naming the value, before anything moves."""
    counters = (comm.bytes_received, comm.bytes_sent)
    bad = [
        (Transfer(0, 0, src_rank=peer, src_local=NUM_LOCAL, dst_rank=rank, dst_local=0), r"src_local 3"),
        (Transfer(0, 0, src_rank=peer, src_local=0, dst_rank=rank, dst_local=7), r"dst_local 7"),
        (Transfer(0, 0, src_rank=5, src_local=0, dst_rank=rank, dst_local=0), r"src_rank 5"),
        (Transfer(NUM_LAYERS, 0, src_rank=peer, src_local=0, dst_rank=rank, dst_local=0), r"layer 2"),
        (Transfer(0, 0, src_rank=rank, src_local=0, dst_rank=rank, dst_local=0), r"local copy"),
    ]
    for transfer, match in bad:
        # a valid read first in the list: validation must reject the batch before posting anything
        good = Transfer(1, 0, src_rank=peer, src_local=0, dst_rank=rank, dst_local=0)
        with pytest.raises(InvalidArgumentError, match=match):
            comm.run_batch(0, [good, transfer])
    with pytest.raises(InvalidArgumentError, match=r"staging buffer 2"):
        comm.run_batch(NUM_BUFS, [])
    assert (comm.bytes_received, comm.bytes_sent) == counters


def _unresponsive_peer(rank: int, world: int, group: Any) -> None:
    """Over TCP, UCX emulates one-sided reads with messages the *source* must answer: a stopped
    (SIGSTOP) source never does, so the read must end at the deadline, not hang; the staging
    buffer it targets is refused until the abandoned read ends, and usable again afterwards;
    closing while such a read still runs keeps the agent and staging memory alive.

    (With the default cma transport a stopped peer does not matter: the kernel copies its memory.)
    """
    os.environ["UCX_TLS"] = "tcp"  # read by UCX when the agent's backend is created, in setup()
    pids: list[Any] = [None] * world
    dist.all_gather_object(pids, os.getpid(), group=group)
    staging = _staging()
    comm = NixlCommunicator(rank, world, group, timeout_s=1.0)
    try:
        comm.setup(_live(rank), staging)
        dist.barrier(group)
        if rank == 0:
            read = [Transfer(layer=0, logical=0, src_rank=1, src_local=1, dst_rank=0, dst_local=2)]
            comm.run_batch(1, read)  # the transport works while the peer runs
            _stop(pids[1])
            try:
                start = time.monotonic()
                with pytest.raises(UnavailableError, match=r"peer rank 1 \(layer\(s\) \[0\]\).*timeout_s=1.0"):
                    comm.run_batch(0, read)
                assert 1.0 <= time.monotonic() - start < 1.0 + 10.0  # honours timeout_s; slack for load
                with pytest.raises(UnavailableError, match=r"staging buffer 0 is still the target .* peer rank\(s\) \[1\]"):
                    comm.run_batch(0, [])
            finally:
                os.kill(pids[1], signal.SIGCONT)
            _retry_while_busy(lambda: comm.run_batch(0, read))
            assert torch.equal(staging[0][0][2], _expert(1, 0, 1)[0])
            # Closing while a read still runs must not free the agent or staging under it.
            _stop(pids[1])
            try:
                with pytest.raises(UnavailableError, match="timeout_s=1.0"):
                    comm.run_batch(1, read)
                comm.close()  # gives the read timeout_s more, then keeps both alive
                assert nixl_comm._abandoned and nixl_comm._abandoned[-1][1] is staging
            finally:
                os.kill(pids[1], signal.SIGCONT)
        dist.barrier(group)
    finally:
        comm.close()


def _stop(pid: int) -> None:
    """SIGSTOP ``pid`` and wait until every one of its threads has actually stopped (kill() only queues it)."""
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        states = []
        for task in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{task}/stat") as f:
                    states.append(f.read().rsplit(")", 1)[1].split()[0])
            except FileNotFoundError:
                pass  # a thread that just ended
        if states and all(state in ("T", "t") for state in states):
            return
        time.sleep(0.005)
    raise AssertionError(f"pid {pid} did not stop")


def _retry_while_busy(fn: Callable[[], None]) -> None:
    """Run ``fn`` once the abandoned read into its buffer has ended (it needs a moment after SIGCONT)."""
    deadline = time.monotonic() + 30
    while True:
        try:
            return fn()
        except UnavailableError as exc:
            if "still the target" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def _mismatched_setups(rank: int, world: int, group: Any) -> None:
    """Setup fails on *every* rank, naming the culprit, instead of leaving the others blocked:
    first rank 1's live and staging tensors disagree with each other (caught before registration),
    then each rank is consistent but rank 1's experts are bigger than rank 0's (caught on exchange).
    """
    for where, match in (("local", r"rank 1: live\[0\]\[0\] is torch.float32 \(3, 4, 16\)"),
                         ("peers", r"rank 1.s layer 0 has expert slots of \[256, 128, 2\] bytes")):
        live, staging = _live(rank), _staging()
        if rank == 1:
            live = [[torch.zeros(NUM_LOCAL, 4, 16), *layer[1:]] for layer in live]
            if where == "peers":
                staging = [[torch.zeros(NUM_LOCAL, 4, 16), *buf[1:]] for buf in staging]
        comm = NixlCommunicator(rank, world, group)
        with pytest.raises(InvalidArgumentError, match=match):
            comm.setup(live, staging)
        comm.close()


# --- tests ----------------------------------------------------------------------------------------
def T(layer: int, src: int, src_local: int, dst: int, dst_local: int) -> Transfer:
    return Transfer(layer=layer, logical=100 + layer, src_rank=src, src_local=src_local, dst_rank=dst, dst_local=dst_local)


@pytest.mark.timeout(120)
@pytest.mark.slow
def test_two_ranks_exchange_experts_exactly() -> None:
    batches = [
        (0, [T(0, 0, 1, 1, 0), T(0, 1, 2, 0, 1), T(0, 1, 0, 0, 2)]),  # both ways at once, several per peer
        (1, [T(1, 1, 1, 0, 0), T(1, 0, 2, 1, 2)]),
        (1, [T(0, 0, 0, 1, 1)]),  # other layer into the same buffer, one direction only
    ]
    _spawn(2, _run_batches, batches)


@pytest.mark.timeout(120)
@pytest.mark.slow
def test_three_ranks_rotate_peers_across_batches() -> None:
    batches = [
        (0, [T(0, 1, 0, 0, 0), T(0, 0, 1, 1, 2)]),  # 0<->1, rank 2 idle
        (0, [T(0, 2, 2, 0, 1), T(0, 0, 0, 2, 0)]),  # 0<->2, rank 1 idle
        (0, [T(0, 1, 1, 2, 1), T(0, 2, 0, 1, 0)]),  # 1<->2, rank 0 idle
        (1, [T(1, 2, 1, 0, 2), T(1, 1, 2, 2, 2)]),  # a ring: 2->0, 1->2, 0->1 (each reads from one peer)
        (1, [T(1, 0, 2, 1, 1)]),
    ]
    _spawn(3, _run_batches, batches)


@pytest.mark.timeout(120)
@pytest.mark.slow
def test_read_from_a_gone_peer_raises_unavailable() -> None:
    _spawn(3, _reads_from_gone_peers)


@pytest.mark.timeout(120)
@pytest.mark.slow
def test_read_from_a_stopped_peer_times_out() -> None:
    _spawn(2, _unresponsive_peer)


@pytest.mark.timeout(120)
@pytest.mark.slow
def test_setup_fails_on_every_rank_when_shapes_differ() -> None:
    _spawn(2, _mismatched_setups)


def test_constructor_rejects_bad_arguments() -> None:
    with pytest.raises(InvalidArgumentError, match="timeout_s"):
        NixlCommunicator(0, 2, None, timeout_s=0)
    with pytest.raises(InvalidArgumentError, match="rank 2"):
        NixlCommunicator(2, 2, None)
    comm = NixlCommunicator(0, 2, None)
    assert comm.name == "nixl"
    with pytest.raises(InvalidArgumentError, match="setup"):
        comm.run_batch(0, [])
    comm.close()
    comm.close()


def test_nixl_available_reports_a_reason_for_a_missing_backend() -> None:
    assert nixl_available() is None
    reason = nixl_available("NO_SUCH_BACKEND")
    assert reason is not None and "NO_SUCH_BACKEND" in reason
