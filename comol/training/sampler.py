"""A shuffling sampler whose position can be saved and restored, so a run resumed mid-epoch sees the
same batches, in the same order, as an uninterrupted one."""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler


class ResumableSampler(Sampler[int]):
    """Epoch ``e`` visits the ``e``-th permutation drawn from ``torch.Generator().manual_seed(seed)``.

    The order depends only on (seed, epoch), never on the global RNG or on what ran before, so it can be
    recomputed after a restart. ``skip_next(epoch, n)`` makes the next pass over ``epoch`` start at its
    ``n``-th index (the first ``n`` were already trained on); Lightning calls ``set_epoch`` every epoch.
    """

    def __init__(self, size: int, seed: int):
        self.size, self.seed = int(size), int(seed)
        self.epoch = 0
        self._skip: tuple[int, int] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def skip_next(self, epoch: int, n: int) -> None:
        self._skip = (int(epoch), int(n))

    def permutation(self, epoch: int) -> list[int]:
        gen = torch.Generator().manual_seed(self.seed)
        perm = None
        for _ in range(epoch + 1):
            perm = torch.randperm(self.size, generator=gen)
        return perm.tolist()

    def __iter__(self) -> Iterator[int]:
        order = self.permutation(self.epoch)
        if self._skip is not None and self._skip[0] == self.epoch:
            order = order[self._skip[1]:]
            self._skip = None
        return iter(order)

    def __len__(self) -> int:
        return self.size
