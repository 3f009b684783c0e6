"""The interface every weight-transfer backend implements.

A rearrangement of one layer is a list of ``Transfer``s (see ``eplbd.client.schedule``):
copy the expert held in ``src_rank``'s live slot ``src_local`` into ``dst_rank``'s
staging slot ``dst_local``, for *every* tensor of the layer (weights, scales,
biases: an expert's tensors always move together). The schedule groups them into
conflict-free batches (a rank talks to at most one peer per batch); a communicator
runs one batch at a time and returns when this rank's part of it is done.

Memory model, identical on every rank:

- ``live[layer][t]``: the engine's expert tensor ``t`` of ``layer``, shape
  ``[num_local_physical, ...]`` (slot-major, so ``live[layer][t][i]`` is contiguous).
  Only read by communicators; written only at commit, by the agent.
- ``staging[buf][t]``: a pool of ``num_buffers`` staging layers, same shapes and dtypes
  as ``live[0][t]`` (every MoE layer has the same expert shapes). Written by
  communicators; the agent copies it into ``live`` at commit.

Communicators are used from one thread at a time (the agent's background thread in
async mode, the engine thread in blocking mode).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Sequence

import torch


@dataclass(frozen=True, order=True)
class Transfer:
    """One expert of one layer moving between ranks (or within one: ``src_rank == dst_rank``).

    Slots are local indices (``0..num_local_physical-1``) on their rank.
    """

    layer: int
    logical: int
    src_rank: int
    src_local: int
    dst_rank: int
    dst_local: int


class Communicator(ABC):
    """Moves expert slots between ranks. Construct on every rank of the EP group,
    then call ``setup`` collectively before the first ``run_batch``."""

    name: ClassVar[str]

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size = rank, world_size
        self.bytes_sent = 0
        self.bytes_received = 0

    @abstractmethod
    def setup(self, live: Sequence[Sequence[torch.Tensor]], staging: Sequence[Sequence[torch.Tensor]]) -> None:
        """Collective, once: register/remember the live and staging tensors (e.g. NIXL memory registration
        and metadata exchange). The tensors' storage must not be reallocated afterwards."""

    @abstractmethod
    def run_batch(self, buf: int, transfers: Sequence[Transfer]) -> None:
        """Run this rank's part of one conflict-free batch.

        ``transfers`` are the batch's transfers in which this rank is the source or the destination
        (never one with ``src_rank == dst_rank``: local copies are the agent's), in the same order on
        both ends. For each: the source's ``live[t.layer][*][t.src_local]`` lands in the destination's
        ``staging[buf][*][t.dst_local]``. Blocks until this rank's sends and receives are complete;
        raises ``eplbd.errors.EplbdError`` (e.g. ``UnavailableError``) on failure or timeout.
        """

    def close(self) -> None:
        """Release resources (memory registrations, agents). Idempotent."""
