"""Training samplers: one seeded global order on any number of processes, resumable mid-epoch.

Every sampler here is a torch ``DistributedSampler`` (Lightning keeps a DistributedSampler it is given
and reseeds it per epoch with ``set_epoch``). Each defines the *global* sequence of one epoch
(``global_order``), a function of (seed, epoch) only, never of the global RNG or of the number of
processes; rank r of W takes its entries r, r + W, ... (the sequence first repeated from its start up
to a multiple of W, as torch's DistributedSampler does). So W processes of batch b see together exactly
the batches of one process of batch W·b. ``skip_next(epoch, n)`` makes the next pass over ``epoch``
start at this rank's ``n``-th entry: a run resumed mid-epoch sees the same batches, in the same order,
as an uninterrupted one.

* ``ResumableSampler``: a seeded permutation of the rows (bitwise torch's DistributedSampler order);
* ``LengthGroupedSampler`` (``dataset.group_by_length``): the same permutation, cut into chunks of
  ``group`` rows, each chunk sorted by length, longest first: the rows of a batch have similar lengths,
  so left padding costs less, and the batches still come in a random order of chunks;
* ``PackedSampler`` (``dataset.packing``): entries are *packs* (tuples of row indices, one training
  micro-batch each; comol/data/packing.py). The packs are cut once, greedily, from the seeded
  permutation of the rows (``seed``, epoch 0), so their number is the same every epoch (Lightning counts
  the batches of an epoch once); each epoch visits them in a seeded permutation of the packs.
"""

from __future__ import annotations

import math
from typing import Iterator, Sequence

import torch
from torch.utils.data import DistributedSampler


class ResumableSampler(DistributedSampler):
    def __init__(self, dataset, seed: int, num_replicas: int = 1, rank: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=int(seed), drop_last=False)
        self._skip: tuple[int, int] | None = None

    def skip_next(self, epoch: int, n: int) -> None:
        self._skip = (int(epoch), int(n))

    def entries(self) -> int:
        """Length of the global sequence of one epoch."""
        return len(self.dataset)

    def global_order(self, epoch: int) -> list:
        g = torch.Generator()
        g.manual_seed(self.seed + epoch)
        return torch.randperm(self.entries(), generator=g).tolist()

    def __len__(self) -> int:
        return math.ceil(self.entries() / self.num_replicas)

    def rank_order(self, epoch: int) -> list:
        """This rank's entries of ``epoch``: the global sequence padded to a multiple of W, strided."""
        order = self.global_order(epoch)
        total = len(self) * self.num_replicas
        pad = total - len(order)
        if pad > 0:
            order += (order * math.ceil(pad / len(order)))[:pad]
        return order[self.rank:total:self.num_replicas]

    def __iter__(self) -> Iterator:
        order = self.rank_order(self.epoch)
        if self._skip is not None and self._skip[0] == self.epoch:
            order = order[self._skip[1]:]
            self._skip = None
        return iter(order)


class LengthGroupedSampler(ResumableSampler):
    """The seeded permutation, sorted by length (longest first) inside consecutive chunks of ``group`` rows."""

    def __init__(self, lengths: Sequence[int], seed: int, group: int, num_replicas: int = 1, rank: int = 0):
        super().__init__(list(lengths), seed, num_replicas=num_replicas, rank=rank)
        self.lengths = [int(n) for n in lengths]
        self.group = max(int(group), 1)

    def global_order(self, epoch: int) -> list:
        order = super().global_order(epoch)
        out: list[int] = []
        for start in range(0, len(order), self.group):
            out += sorted(order[start:start + self.group], key=lambda i: -self.lengths[i])  # stable: ties keep order
        return out


class PackedSampler(ResumableSampler):
    """Yields packs (tuples of row indices): one micro-batch each (see module docstring)."""

    def __init__(self, packs: Sequence[tuple[int, ...]], seed: int, num_replicas: int = 1, rank: int = 0):
        super().__init__(list(packs), seed, num_replicas=num_replicas, rank=rank)
        self.packs = [tuple(p) for p in packs]

    def global_order(self, epoch: int) -> list:
        return [self.packs[i] for i in super().global_order(epoch)]


def row_permutation(n: int, seed: int) -> list[int]:
    """The seeded permutation of ``n`` rows the packs are cut from (the epoch-0 row order)."""
    g = torch.Generator()
    g.manual_seed(int(seed))
    return torch.randperm(n, generator=g).tolist()
