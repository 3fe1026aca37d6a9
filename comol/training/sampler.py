"""The training sampler: one seeded global order on any number of processes, resumable mid-epoch.

It is torch's ``DistributedSampler`` (shuffle on, seeded, reshuffled per epoch by Lightning's
``set_epoch``; rank r takes entries r, r + W, ...; Lightning keeps a DistributedSampler it is given),
so W processes of batch b see together exactly the batches of one process of batch W·b. On top,
``skip_next(epoch, n)`` makes the next pass over ``epoch`` start at this rank's ``n``-th index: a run
resumed mid-epoch sees the same batches, in the same order, as an uninterrupted one. The order depends
only on (seed, epoch), never on the global RNG, so it is recomputed after a restart.
"""

from __future__ import annotations

from typing import Iterator

from torch.utils.data import DistributedSampler


class ResumableSampler(DistributedSampler):
    def __init__(self, dataset, seed: int, num_replicas: int = 1, rank: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=int(seed), drop_last=False)
        self._skip: tuple[int, int] | None = None

    def skip_next(self, epoch: int, n: int) -> None:
        self._skip = (int(epoch), int(n))

    def __iter__(self) -> Iterator[int]:
        order = list(super().__iter__())
        if self._skip is not None and self._skip[0] == self.epoch:
            order = order[self._skip[1]:]
            self._skip = None
        return iter(order)
