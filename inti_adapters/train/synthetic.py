"""Deterministic synthetic video clips with the interface of ``inti_adapters.data`` loaders.

Used by ``inti-train --smoke`` (every recipe runs one step without its data set) and by tests.
Each class has its own colour and a motion direction, so a tiny model learns it in a few
steps; a sample's pixels depend only on ``(seed, sample id, view)``.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


class SyntheticVideoLoader:
    """Batches of uint8 clips ``(B, 3, T, H, W)`` (train) or ``(B, V, 3, T, H, W)`` (eval).

    Train: the sample order is a permutation drawn from ``(seed, epoch)``, split over ranks by
    striding, incomplete last batch dropped. Eval: every sample exactly once over all ranks.
    With ``with_keys`` a batch is ``(clips, labels, keys)``, a sample's key ``"syn{id:06d}"``.
    :meth:`exclude_keys` leaves samples out of the next epoch pass (after :meth:`set_epoch`) and spreads
    the rest over the ranks, as ``inti_adapters.data`` loaders do (resume on another world size).
    """

    def __init__(self, *, num_samples: int, num_classes: int, num_frames: int = 4, size: int = 32,
                 batch_size: int = 2, train: bool = True, rank: int = 0, world_size: int = 1,
                 num_views: int = 1, seed: int = 0, epoch: int = 0, with_keys: bool = False) -> None:
        if num_samples < 1 or num_classes < 1 or batch_size < 1 or num_views < 1:
            raise ValueError(f"num_samples, num_classes, batch_size and num_views must be >= 1, got "
                             f"{num_samples}, {num_classes}, {batch_size}, {num_views}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        self.num_samples, self.num_classes = num_samples, num_classes
        self.num_frames, self.size, self.batch_size = num_frames, size, batch_size
        self.train, self.rank, self.world_size = train, rank, world_size
        self.num_views, self.seed, self.epoch = num_views, seed, epoch
        self.with_keys = with_keys
        self._skip = 0
        self._exclude: set[str] | None = None

    @staticmethod
    def key(sample: int) -> str:
        return f"syn{sample:06d}"

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self._exclude = None

    def exclude_keys(self, keys: list[str] | set[str]) -> None:
        """For the next pass over the current epoch: drop these samples, split the rest over the ranks."""
        self._exclude = set(keys)

    def skip_batches(self, num_batches: int) -> None:
        """The next iteration starts at batch ``num_batches`` of the current epoch (resume)."""
        if num_batches < 0:
            raise ValueError(f"num_batches must be >= 0, got {num_batches}")
        self._skip = num_batches

    def indices(self) -> list[int]:
        """Sample ids of this rank for the current epoch, in order."""
        if self.train:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.num_samples, generator=g).tolist()
        else:
            order = list(range(self.num_samples))
        if self._exclude is not None:
            order = [i for i in order if self.key(i) not in self._exclude]
        return order[self.rank::self.world_size]

    def __len__(self) -> int:
        n = len(self.indices())
        return n // self.batch_size if self.train else -(-n // self.batch_size)

    def label(self, sample: int) -> int:
        return sample % self.num_classes

    def clip(self, sample: int, view: int = 0) -> torch.Tensor:
        """``(3, T, H, W)`` uint8: class colour, a bar moving in the class's direction, noise."""
        c, t, s = self.label(sample), self.num_frames, self.size
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + sample * 101 + view)
        if c < 8:  # corners of the colour cube first, then a spread of other colours
            colour = torch.tensor([200.0 if c & bit else 40.0 for bit in (1, 2, 4)])
        else:
            colour = torch.tensor([(37 * c) % 200, (91 * c + 60) % 200, (151 * c + 120) % 200], dtype=torch.float32)
        video = colour.view(3, 1, 1, 1) + 20 * torch.randn(3, t, s, s, generator=g)
        step = 1 if c % 2 == 0 else -1
        start = int(torch.randint(0, s, (1,), generator=g))
        width = max(1, s // 8)
        for f in range(t):
            x = (start + step * f * width) % s
            video[:, f, :, x:x + width] += 80.0
        return video.clamp(0, 255).to(torch.uint8)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        ids = self.indices()
        skip, self._skip, self._exclude = self._skip, 0, None
        stop = len(ids) - len(ids) % self.batch_size if self.train else len(ids)
        for start in range(skip * self.batch_size, stop, self.batch_size):
            batch = ids[start:start + self.batch_size]
            labels = torch.tensor([self.label(i) for i in batch], dtype=torch.int64)
            if self.train:
                clips = torch.stack([self.clip(i) for i in batch])
            else:
                clips = torch.stack([torch.stack([self.clip(i, v) for v in range(self.num_views)]) for i in batch])
            yield (clips, labels, [self.key(i) for i in batch]) if self.with_keys else (clips, labels)
