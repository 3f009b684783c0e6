"""``torch_nccl``: ``batch_isend_irecv`` over an NCCL group on a side CUDA stream (GPU only).

The transfers of one batch are posted together on a dedicated side stream, so they
overlap the engine's forward stream; ``run_batch`` waits on the side stream only. As in
vLLM, this communicator is rejected with ``use_async`` (NCCL calls from a second host
thread next to the engine's own NCCL calls can deadlock), so it runs in the blocking
mode, on the engine thread, inside a step boundary.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist

from eplbd.client.comm.base import Communicator, Transfer
from eplbd.errors import InvalidArgumentError, UnavailableError


class NcclCommunicator(Communicator):
    name = "torch_nccl"

    def __init__(self, rank: int, world_size: int, group: dist.ProcessGroup | None = None) -> None:
        super().__init__(rank, world_size)
        if not torch.cuda.is_available():
            raise InvalidArgumentError("communicator 'torch_nccl' needs CUDA; use 'torch_gloo' or 'nixl' on CPU")
        # The caller's group is gloo (for CPU metadata); transfers need an NCCL group of the same ranks.
        self.group = dist.new_group(backend="nccl")
        self.stream = torch.cuda.Stream()
        self.live: Sequence[Sequence[torch.Tensor]] = ()
        self.staging: Sequence[Sequence[torch.Tensor]] = ()

    def setup(self, live: Sequence[Sequence[torch.Tensor]], staging: Sequence[Sequence[torch.Tensor]]) -> None:
        for layer in live:
            for t in layer:
                if t.device.type != "cuda":
                    raise InvalidArgumentError(f"torch_nccl moves CUDA tensors only, got one on {t.device}")
        self.live, self.staging = live, staging

    def run_batch(self, buf: int, transfers: Sequence[Transfer]) -> None:
        ops = []
        for t in transfers:
            if t.src_rank == self.rank:
                for tensor in self.live[t.layer]:
                    ops.append(dist.P2POp(dist.isend, tensor[t.src_local], group=self.group, group_peer=t.dst_rank))
                    self.bytes_sent += tensor[t.src_local].nbytes
            elif t.dst_rank == self.rank:
                for tensor in self.staging[buf]:
                    ops.append(dist.P2POp(dist.irecv, tensor[t.dst_local], group=self.group, group_peer=t.src_rank))
                    self.bytes_received += tensor[t.dst_local].nbytes
        if not ops:
            return
        self.stream.wait_stream(torch.cuda.current_stream())
        try:
            with torch.cuda.stream(self.stream):
                for w in dist.batch_isend_irecv(ops):
                    w.wait()
            self.stream.synchronize()
        except RuntimeError as exc:
            raise UnavailableError(f"rank {self.rank}: NCCL transfer failed: {exc}") from None
