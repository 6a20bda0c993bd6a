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

from .config import DataConfig
from .decode import open_video
from .device import EncodedClip, collate_encoded
from .frames import FrameReader, frame_members
from .remote import RemoteOptions, ShardUnavailable
from .sampling import sample_indices
from .tario import ShardDamage, iter_tar_samples
from .transforms import test_view_boxes, test_views, to_cthw, train_crop_box, train_transform

logger = logging.getLogger("inti_adapters.data")

# columns of ReaderState.counters (one row per worker, row 0 = the main process)
UNDECODABLE, READ, MISSING, DAMAGED = range(4)
MAX_UNAVAILABLE_IN_A_ROW = 3  # remote shards given up in a row before training stops: the server is down


@dataclass(frozen=True)
class Exclusion:
    """A training pass without the samples of ``keys`` (see ``VideoLoader.exclude_keys``).

    ``remaining`` samples are expected once ``keys`` are dropped; ``plan[w]`` lists the batch sizes
    that worker ``w`` of this rank yields (the same number of batches on every rank).
    """

    keys: frozenset[str]
    remaining: int
    plan: tuple[tuple[int, ...], ...]


def plan_batches(remaining: int, world_size: int, workers: int, batch_size: int) -> list[list[list[int]]]:
    """Batch sizes per rank and worker when slot ``rank * workers + w`` gets every ``world_size * workers``-th of
    ``remaining`` samples: every rank gets the same number of batches, none larger than ``batch_size`` or empty.

    Raises:
        ValueError: too few samples remain to give every rank as many non-empty batches.
    """
    slots = world_size * workers
    shares = [[len(range(r * workers + w, remaining, slots)) for w in range(workers)] for r in range(world_size)]
    n = max(sum(-(-s // batch_size) for s in rank) for rank in shares)
    plans = []
    for r, rank in enumerate(shares):
        if sum(rank) < n:
            raise ValueError(f"{remaining} samples remain in the epoch: too few for {world_size} ranks to take "
                             f"{n} batches each (rank {r} would get {sum(rank)} samples); start the next epoch instead")
        counts = [-(-s // batch_size) for s in rank]
        while sum(counts) < n:  # split the fullest worker's batches once more
            w = max(range(workers), key=lambda i: rank[i] / max(counts[i], 1))
            counts[w] += 1
        plans.append([[s // c + (1 if i < s % c else 0) for i in range(c)] for s, c in zip(rank, counts, strict=True)])
    return plans


class SampleError(ValueError):
    """A label outside ``[0, num_classes)``, a member given twice, a key used twice: the data set is wrong
    (never skipped as an undecodable sample)."""


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
    counters: torch.Tensor | None = None  # shared (workers + 1, 4) counts: UNDECODABLE, READ, MISSING, DAMAGED
    exclusion: Exclusion | None = None  # a training pass without some samples (resume on another world size)
    num_classes: int | None = None  # labels outside [0, num_classes) are refused

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

    def count(self, column: int, n: int = 1) -> None:
        """Add to this process's row of the shared counters."""
        if self.counters is not None and n:
            row = 0 if get_worker_info() is None and self.worker_override is None else self.worker() + 1
            self.counters[row, column] += n


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
        if st.exclusion is not None:  # one pass; every slot reads every shard in the same order
            for i in perm:
                yield {"url": self.shards[int(i)], "pass": 0, "modulo": (slot, slots)}
            return
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


class ReadSamples:
    """Tar files -> sample dicts; keeps this slot's share in sample-split mode; refuses empty passes.

    A damaged shard (see :mod:`inti_adapters.data.tario`) and a shard with fewer samples than
    ``sizes.json`` lists are reported with a warning naming the shard and counted (MISSING,
    DAMAGED); reading goes on with the next shard.
    """

    def __init__(self, state: ReaderState, expected: dict[str, int] | None = None, *,
                 opener: RemoteOptions | None = None, train: bool = True) -> None:
        self.state, self.expected = state, expected or {}
        self.opener, self.train = opener or RemoteOptions(), train
        self.unavailable = 0  # shards in a row that could not be read from the network
        self.lost = 0  # samples sizes.json lists but damaged / unreadable shards did not give (all shards)

    def _shard(self, url: str, modulo: tuple[int, int] | None) -> Iterator[dict[str, Any]]:
        read = 0
        try:
            for sample in iter_tar_samples(url, opener=self.opener):
                read += 1
                yield sample
        except ShardDamage as exc:
            logger.warning("%s", exc)
            self.state.count(DAMAGED)
            self.unavailable = 0
        except ShardUnavailable as exc:
            if exc.permanent or not self.train:
                what = "evaluation cannot" if not self.train else "cannot"
                raise RuntimeError(f"{what} read shard {url} after {read} samples: {exc.reason}") from None
            self.unavailable += 1
            if self.unavailable >= MAX_UNAVAILABLE_IN_A_ROW:
                raise RuntimeError(f"{self.unavailable} shards in a row could not be read (the last, {url}: "
                                   f"{exc.reason}): the shard server or the network is down") from None
            logger.warning("shard %s could not be read after %d samples: %s; its other samples are left out of this "
                           "pass (counted as a damaged shard)", url, read, exc.reason)
            self.state.count(DAMAGED)
        else:
            self.unavailable = 0
        listed = self.expected.get(url)
        if listed is not None and read != listed:
            logger.warning("shard %s: read %d samples, sizes.json lists %d (a truncated shard, or a sizes.json that "
                           "disagrees with it)", url, read, listed)
            self.lost += max(0, listed - read)
            lost = range(read, listed)  # in sample-split mode, only this reader's share of them
            self.state.count(MISSING, len(lost) if modulo is None else sum(1 for i in lost if i % modulo[1] == modulo[0]))

    def __call__(self, jobs: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        if self.state.exclusion is not None:
            yield from self._excluding(jobs)
            return
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
            for sample in self._shard(job["url"], job["modulo"]):
                ordinal += 1
                if job["modulo"] is not None and (ordinal - 1) % job["modulo"][1] != job["modulo"][0]:
                    continue
                kept += 1
                self.state.count(READ)
                sample["__pass__"] = job["pass"]
                yield sample

    def _excluding(self, jobs: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """One pass without the excluded samples; this slot keeps every ``slots``-th of the others."""
        ex, slot, slots = self.state.exclusion, self.state.slot(), self.state.slots
        ordinal, met = 0, 0
        for job in jobs:
            for sample in self._shard(job["url"], job["modulo"]):
                if sample["__key__"] in ex.keys:
                    met += 1
                    continue
                ordinal += 1
                if (ordinal - 1) % slots == slot:
                    self.state.count(READ)
                    sample["__pass__"] = 0
                    yield sample
        if self.lost and ordinal + met + self.lost == ex.remaining + len(ex.keys) and met <= len(ex.keys):
            logger.warning("exclude_keys: %d samples of damaged or unreadable shards are missing from this pass; the "
                           "last batches are made smaller to keep the planned number of batches where possible",
                           self.lost)
        elif ordinal != ex.remaining or met != len(ex.keys):
            raise RuntimeError(
                f"exclude_keys: the shards hold {ordinal + met} samples of which {met} have one of the {len(ex.keys)} "
                f"excluded keys, so {ordinal} remain, but {ex.remaining} were planned for: keys that are not in the "
                "shards, keys used by several samples, or shards that changed since the epoch began")


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
    """Encoded sample -> ``(uint8 clip, label)``; undecodable samples are skipped (and counted) or raise.

    A sample is a video (a member with one of ``video_extensions``) or a frame-shard sample (JPEG
    members ``00000.jpg`` ...); both are read through the same sampling and transforms. With
    ``encoded=True`` frame samples are not decoded here: the stage yields an
    :class:`~inti_adapters.data.device.EncodedClip` (frames + crop boxes) for the GPU.
    """

    def __init__(self, cfg: DataConfig, state: ReaderState, *, train: bool, decoder: str,
                 encoded: bool = False) -> None:
        self.cfg, self.state, self.train, self.decoder, self.encoded = cfg, state, train, decoder, encoded

    def open(self, sample: dict[str, Any]) -> tuple[Any, int]:
        """The sample's reader (video or frames) and its label."""
        if "__error__" in sample:
            raise SampleError(sample["__error__"])
        if "cls" not in sample:
            raise ValueError("no .cls label member")
        label = int(sample["cls"].decode().strip())
        classes = self.state.num_classes
        if classes is not None and not 0 <= label < classes:
            raise SampleError(f"label {label} is outside [0, {classes}) (num_classes {classes})")
        ext = next((e for e in self.cfg.video_extensions if e in sample), None)
        if ext is not None:
            return open_video(sample[ext], self.decoder), label
        if frame_members(sample):
            return FrameReader(sample), label
        raise ValueError(f"no video member ({', '.join(self.cfg.video_extensions)}) and no JPEG frames; members: "
                         f"{sorted(k for k in sample if not k.startswith('__'))}")

    def indices(self, n: int, rng: np.random.Generator | None) -> list[np.ndarray]:
        """Frame indices of the training clip (``rng``) or of every test clip."""
        cfg = self.cfg
        if rng is not None:
            return [sample_indices(cfg.sampling, n, cfg.num_frames, stride=cfg.frame_stride, rng=rng)]
        return [sample_indices(cfg.sampling, n, cfg.num_frames, stride=cfg.frame_stride, clip_index=c,
                               num_clips=cfg.num_clips) for c in range(cfg.num_clips)]

    def clip(self, sample: dict[str, Any]) -> tuple[torch.Tensor | EncodedClip, int]:
        cfg = self.cfg
        reader, label = self.open(sample)
        rng = self.state.rng(self.state.slot(), sample["__number__"], 31) if self.train else None
        clips = self.indices(reader.num_frames, rng)
        if self.encoded and isinstance(reader, FrameReader):
            return self.encode(reader, clips, rng), label
        frames = reader.get_frames(np.concatenate(clips))
        if self.train:
            out = train_transform(frames, crop_size=cfg.crop_size, short_side=cfg.resolved_short_side,
                                  scale=cfg.scale, ratio=cfg.ratio, hflip=cfg.hflip, rng=rng)
            return to_cthw(out), label
        views = []
        for c in range(cfg.num_clips):
            clip = frames[c * cfg.num_frames:(c + 1) * cfg.num_frames]
            views += test_views(clip, crop_size=cfg.crop_size, short_side=cfg.resolved_short_side,
                                num_crops=cfg.num_crops)
        return torch.stack([to_cthw(v) for v in views]), label

    def encode(self, reader: FrameReader, clips: list[np.ndarray], rng: np.random.Generator | None) -> EncodedClip:
        """Frames and crop boxes of a frame sample, for decoding on the device (same draws as :meth:`clip`)."""
        cfg = self.cfg
        positions = [reader.positions(c) for c in clips]
        unique, inverse = np.unique(np.concatenate(positions), return_inverse=True)
        height, width = reader.frame_size(unique)  # checks every frame's CRC and header here, in the worker
        per_clip = np.split(inverse.reshape(-1), len(clips))
        if self.train:
            (y0, x0, y1, x1), flip = train_crop_box(height, width, short_side=cfg.resolved_short_side,
                                                    scale=cfg.scale, ratio=cfg.ratio, hflip=cfg.hflip, rng=rng)
            boxes, view_clip = [(y0, x0, y1, x1, flip)], [0]
        else:
            crops = test_view_boxes(height, width, crop_size=cfg.crop_size, short_side=cfg.resolved_short_side,
                                    num_crops=cfg.num_crops)
            boxes = [(*b, False) for _ in clips for b in crops]
            view_clip = [c for c in range(len(clips)) for _ in crops]
        return EncodedClip([reader.encoded(int(p)) for p in unique], per_clip, boxes, view_clip, cfg.crop_size,
                           multi_view=not self.train)

    def __call__(self, samples: Iterator[dict[str, Any]]) -> Iterator[tuple[Any, int, str]]:
        in_a_row = 0
        for sample in samples:
            try:
                with _one_thread():
                    out = self.clip(sample)
            except Exception as exc:  # a corrupt sample can fail in any library below
                where = f"sample {sample.get('__key__')!r} of {sample.get('__url__')}"
                if isinstance(exc, SampleError):  # wrong data, not a damaged sample: never skipped
                    raise SampleError(f"{where}: {exc}") from None
                if self.cfg.on_corrupt == "raise":
                    raise RuntimeError(f"cannot decode {where}: {type(exc).__name__}: {exc}") from exc
                in_a_row += 1
                logger.warning("skipping %s: %s: %s", where, type(exc).__name__, exc)
                self.state.count(UNDECODABLE)
                if in_a_row >= self.cfg.max_consecutive_failures:
                    raise RuntimeError(
                        f"{in_a_row} samples in a row could not be decoded (last: {where}: {exc}); the data "
                        "looks broken (raise DataConfig.max_consecutive_failures to tolerate more)"
                    ) from exc
                continue
            in_a_row = 0
            yield (*out, sample["__key__"])


class Batch:
    """Stack ``batch_size`` clips; ``partial`` keeps a last smaller batch (evaluation). With an exclusion,
    this worker's planned batch sizes instead; when samples are missing (undecodable, or lost with a
    damaged shard), the clips left at the end are split over the planned batches still to come."""

    def __init__(self, batch_size: int, *, partial: bool, state: ReaderState | None = None) -> None:
        self.batch_size, self.partial, self.state = batch_size, partial, state

    @staticmethod
    def collate(items: list[tuple[Any, int, str]]) -> tuple[Any, torch.Tensor | None, list[str]]:
        """``(clips, labels, keys)``, or ``(EncodedBatch, None, keys)`` for decoding on the GPU."""
        keys = [key for _, _, key in items]
        if any(isinstance(v, EncodedClip) for v, _, _ in items):
            return collate_encoded([(v, lab) for v, lab, _ in items]), None, keys
        return (torch.stack([v for v, _, _ in items]), torch.tensor([lab for _, lab, _ in items], dtype=torch.int64),
                keys)

    def __call__(self, clips: Iterator[tuple[Any, int, str]]) -> Iterator[tuple[Any, torch.Tensor | None, list[str]]]:
        ex = self.state.exclusion if self.state is not None else None
        sizes = iter(ex.plan[self.state.worker()] if ex is not None else itertools.repeat(self.batch_size))
        size = next(sizes, None)
        items: list[tuple[Any, int, str]] = []
        for item in clips:
            items.append(item)
            if len(items) == size:
                yield self.collate(items)
                items, size = [], next(sizes, None)
        if items and ex is not None:  # fewer samples than planned (damaged shards): keep the batch count if possible
            parts = min(len(items), 1 + sum(1 for _ in sizes))
            for i in range(parts):
                yield self.collate(items[i * len(items) // parts:(i + 1) * len(items) // parts])
        elif items and self.partial:
            yield self.collate(items)


class TakeBatches:
    """End this worker's epoch after its share of batches (minus those skipped)."""

    def __init__(self, skipper: SkipSamples, per_worker: int) -> None:
        self.skipper, self.per_worker = skipper, per_worker

    def __call__(self, batches: Iterator[Any]) -> Iterator[Any]:
        yield from itertools.islice(batches, max(0, self.per_worker - self.skipper.skipped_batches()))
