"""``torch_gloo``: point-to-point sends over a dedicated gloo process group (CPU tensors).

Every expert tensor of a transfer travels as its own message straight from the live
slot into the destination's staging slot (slots are contiguous, so no packing copy).
The group must be used by this communicator only: the caller creates it with
``torch.distributed.new_group(backend="gloo")`` on every rank, so its traffic never
interleaves with the engine's collectives.
"""

from __future__ import annotations

import datetime
from typing import Sequence

import torch
import torch.distributed as dist

from eplbd.client.comm.base import Communicator, Transfer
from eplbd.errors import InvalidArgumentError, UnavailableError


class GlooCommunicator(Communicator):
    name = "torch_gloo"

    def __init__(self, rank: int, world_size: int, group: dist.ProcessGroup, *, timeout_s: float = 60.0) -> None:
        super().__init__(rank, world_size)
        self.group = group
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self.live: Sequence[Sequence[torch.Tensor]] = ()
        self.staging: Sequence[Sequence[torch.Tensor]] = ()

    def setup(self, live: Sequence[Sequence[torch.Tensor]], staging: Sequence[Sequence[torch.Tensor]]) -> None:
        for layer in live:
            for t in layer:
                if t.device.type != "cpu":
                    raise InvalidArgumentError(f"torch_gloo moves CPU tensors only, got one on {t.device}")
        self.live, self.staging = live, staging

    def run_batch(self, buf: int, transfers: Sequence[Transfer]) -> None:
        works = []
        peers = set()
        for t in transfers:
            if t.src_rank == self.rank:
                peers.add(t.dst_rank)
                for tensor in self.live[t.layer]:
                    works.append(dist.isend(tensor[t.src_local], group=self.group, group_dst=t.dst_rank))
                    self.bytes_sent += tensor[t.src_local].nbytes
            elif t.dst_rank == self.rank:
                peers.add(t.src_rank)
                for tensor in self.staging[buf]:
                    works.append(dist.irecv(tensor[t.dst_local], group=self.group, group_src=t.src_rank))
                    self.bytes_received += tensor[t.dst_local].nbytes
        try:
            for w in works:
                w.wait(self.timeout)
        except RuntimeError as exc:
            raise UnavailableError(f"rank {self.rank}: transfer with rank(s) {sorted(peers)} failed: {exc}") from None
