"""The stages of the reading pipeline (see :mod:`inti_adapters.data.pipeline` for the table).

Each stage is a callable on an iterator (the first one takes no argument), as
``webdataset.DataPipeline`` expects. All of them read a shared, per-epoch :class:`ReaderState`.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import get_worker_info
from webdataset.tariterators import tarfile_samples

from .config import DataConfig
from .decode import open_video
from .sampling import sample_indices
from .transforms import test_views, train_transform

logger = logging.getLogger("inti_adapters.data")


@dataclass
class ReaderState:
    """What every stage needs to know; fixed for one iteration (a fresh copy per epoch)."""

    seed: int
    epoch: int
    rank: int
    world_size: int
    num_workers: int
    skip: int = 0  # training batches of this epoch to skip (all workers together)
    worker_override: int | None = None  # simulate worker i of num_workers in this process
    failures: torch.Tensor | None = None  # shared per-worker counters of skipped samples

    @property
    def slots(self) -> int:
        return self.world_size * self.num_workers

    def worker(self) -> int:
        """The worker role of this process; with a skip, roles rotate so batch ``skip`` comes first."""
        if self.worker_override is not None:
            wid = self.worker_override
        else:
            info = get_worker_info()
            wid = 0 if info is None else info.id
            if info is not None and info.num_workers != self.num_workers:
                raise RuntimeError(f"the loader was built for {self.num_workers} workers but runs with "
                                   f"{info.num_workers}")
        return (wid + self.skip) % self.num_workers

    def slot(self) -> int:
        return self.rank * self.num_workers + self.worker()

    def rng(self, *parts: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, *parts])


class ShardSource:
    """Yields ``{"url", "pass", "modulo"}`` jobs: the shards this reader slot reads, pass after pass."""

    def __init__(self, shards: list[str], state: ReaderState, *, mode: str, shard_shuffle: bool) -> None:
        self.shards, self.state, self.mode, self.shard_shuffle = shards, state, mode, shard_shuffle

    def __call__(self) -> Iterator[dict[str, Any]]:
        st, n = self.state, len(self.shards)
        slot, slots = st.slot(), st.slots
        if self.mode == "resampled":
            # a "pass" of 10 * n draws that yields no sample at all means the shards are empty/unreadable
            rng = st.rng(slot, 11)
            for draw in itertools.count():
                yield {"url": self.shards[int(rng.integers(n))], "pass": draw // (10 * n), "modulo": None}
        if self.mode == "eval":
            if n >= slots:
                for url in self.shards[slot::slots]:
                    yield {"url": url, "pass": 0, "modulo": None}
            else:
                for url in self.shards:
                    yield {"url": url, "pass": 0, "modulo": (slot, slots)}
            return
        # training without replacement: endless passes, each a fresh order of the same split
        perm = st.rng(12).permutation(n) if self.shard_shuffle else np.arange(n)
        for p in itertools.count():
            if n >= slots:
                mine = perm[slot::slots]
                order = st.rng(slot, p, 13).permutation(mine) if (self.shard_shuffle and p) else mine
                modulo = None
            else:  # every slot reads every shard in the same order and keeps its share of samples
                order = st.rng(p, 14).permutation(n) if (self.shard_shuffle and p) else perm
                modulo = (slot, slots)
            for i in order:
                yield {"url": self.shards[int(i)], "pass": p, "modulo": modulo}


def _tar_error(exn: Exception) -> bool:
    logger.warning("skipping an unreadable part of a shard: %s", exn)
    return True


class ReadSamples:
    """Tar files -> sample dicts; keeps this slot's share in sample-split mode; refuses empty passes."""

    def __call__(self, jobs: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        current_pass, kept, ordinal = None, 0, 0
        for job in jobs:
            if job["pass"] != current_pass:
                if current_pass is not None and kept == 0:
                    raise RuntimeError(
                        "a reader got no sample from a whole pass over its shards (the shards are empty or "
                        "unreadable, or the data set has fewer samples than world_size * num_workers readers); "
                        f"last shard: {job['url']}"
                    )
                current_pass, kept, ordinal = job["pass"], 0, 0
            for sample in tarfile_samples([{"url": job["url"]}], handler=_tar_error):
                ordinal += 1
                if job["modulo"] is not None and (ordinal - 1) % job["modulo"][1] != job["modulo"][0]:
                    continue
                kept += 1
                sample["__pass__"] = job["pass"]
                yield sample


class ShuffleSamples:
    """A seeded shuffle buffer, drained at the end of every pass (so one pass = every sample once)."""

    def __init__(self, state: ReaderState, size: int) -> None:
        self.state, self.size = state, size

    def __call__(self, samples: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        if self.size <= 1:
            yield from samples
            return
        rng = self.state.rng(self.state.slot(), 21)
        buf: list[dict[str, Any]] = []
        current = None
        for sample in samples:
            if sample["__pass__"] != current:
                rng.shuffle(buf)
                yield from buf
                buf, current = [], sample["__pass__"]
            if len(buf) < self.size:
                buf.append(sample)
                continue
            i = int(rng.integers(len(buf)))
            out, buf[i] = buf[i], sample
            yield out
        rng.shuffle(buf)
        yield from buf


class SkipSamples:
    """Numbers samples (the key of their augmentation seed) and drops those of skipped batches."""

    def __init__(self, state: ReaderState, batch_size: int) -> None:
        self.state, self.batch_size = state, batch_size

    def skipped_batches(self) -> int:
        st = self.state
        role = st.worker()
        return max(0, -(-(st.skip - role) // st.num_workers))

    def __call__(self, samples: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        drop = self.skipped_batches() * self.batch_size
        for number, sample in enumerate(samples):
            if number < drop:
                continue
            sample["__number__"] = number
            yield sample


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run the small per-sample tensor ops on one thread in the main process.

    DataLoader workers are single-threaded already; in the main process (``num_workers=0``)
    intra-op threads on tiny tensors are slower, and on a busy machine many times slower.
    """
    if get_worker_info() is not None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class DecodeClip:
    """Encoded sample -> ``(uint8 clip, label)``; undecodable samples are skipped (and counted) or raise."""

    def __init__(self, cfg: DataConfig, state: ReaderState, *, train: bool, decoder: str) -> None:
        self.cfg, self.state, self.train, self.decoder = cfg, state, train, decoder

    def clip(self, sample: dict[str, Any]) -> tuple[torch.Tensor, int]:
        cfg = self.cfg
        ext = next((e for e in cfg.video_extensions if e in sample), None)
        if ext is None:
            raise ValueError(f"no video member ({', '.join(cfg.video_extensions)}); members: "
                             f"{sorted(k for k in sample if not k.startswith('__'))}")
        if "cls" not in sample:
            raise ValueError("no .cls label member")
        label = int(sample["cls"].decode().strip())
        reader = open_video(sample[ext], self.decoder)
        n = reader.num_frames
        if self.train:
            rng = self.state.rng(self.state.slot(), sample["__number__"], 31)
            idx = sample_indices(cfg.sampling, n, cfg.num_frames, stride=cfg.frame_stride, rng=rng)
            frames = reader.get_frames(idx)
            out = train_transform(frames, crop_size=cfg.crop_size, short_side=cfg.resolved_short_side,
                                  scale=cfg.scale, ratio=cfg.ratio, hflip=cfg.hflip, rng=rng)
            return out.permute(1, 0, 2, 3).contiguous(), label
        clips = [sample_indices(cfg.sampling, n, cfg.num_frames, stride=cfg.frame_stride, clip_index=c,
                                num_clips=cfg.num_clips) for c in range(cfg.num_clips)]
        frames = reader.get_frames(np.concatenate(clips))
        views = []
        for c in range(cfg.num_clips):
            clip = frames[c * cfg.num_frames:(c + 1) * cfg.num_frames]
            views += test_views(clip, crop_size=cfg.crop_size, short_side=cfg.resolved_short_side,
                                num_crops=cfg.num_crops)
        return torch.stack([v.permute(1, 0, 2, 3) for v in views]).contiguous(), label

    def __call__(self, samples: Iterator[dict[str, Any]]) -> Iterator[tuple[torch.Tensor, int]]:
        in_a_row = 0
        for sample in samples:
            try:
                with _one_thread():
                    out = self.clip(sample)
            except Exception as exc:  # a corrupt sample can fail in any library below
                where = f"sample {sample.get('__key__')!r} of {sample.get('__url__')}"
                if self.cfg.on_corrupt == "raise":
                    raise RuntimeError(f"cannot decode {where}: {type(exc).__name__}: {exc}") from exc
                in_a_row += 1
                logger.warning("skipping %s: %s: %s", where, type(exc).__name__, exc)
                if self.state.failures is not None:
                    self.state.failures[self.state.worker() + 1] += 1
                if in_a_row >= self.cfg.max_consecutive_failures:
                    raise RuntimeError(
                        f"{in_a_row} samples in a row could not be decoded (last: {where}: {exc}); the data "
                        "looks broken (raise DataConfig.max_consecutive_failures to tolerate more)"
                    ) from exc
                continue
            in_a_row = 0
            yield out


class Batch:
    """Stack ``batch_size`` clips; ``partial`` keeps a last smaller batch (evaluation)."""

    def __init__(self, batch_size: int, *, partial: bool) -> None:
        self.batch_size, self.partial = batch_size, partial

    @staticmethod
    def collate(items: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.stack([v for v, _ in items]), torch.tensor([lab for _, lab in items], dtype=torch.int64)

    def __call__(self, clips: Iterator[tuple[torch.Tensor, int]]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        items: list[tuple[torch.Tensor, int]] = []
        for item in clips:
            items.append(item)
            if len(items) == self.batch_size:
                yield self.collate(items)
                items = []
        if items and self.partial:
            yield self.collate(items)


class TakeBatches:
    """End this worker's epoch after its share of batches (minus those skipped)."""

    def __init__(self, skipper: SkipSamples, per_worker: int) -> None:
        self.skipper, self.per_worker = skipper, per_worker

    def __call__(self, batches: Iterator[Any]) -> Iterator[Any]:
        yield from itertools.islice(batches, max(0, self.per_worker - self.skipper.skipped_batches()))
