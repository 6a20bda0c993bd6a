"""The WebDataset reading pipeline: shards -> samples -> decoded, sampled, augmented uint8 clips -> batches.

The pipeline is an explicit list of stages (``VideoLoader.stages()``, defined in
:mod:`inti_adapters.data.stages`), in the spirit of open_clip's ``get_wds_dataset`` but driven
by a typed :class:`DataConfig`:

========================  ======================================================================
stage                     what it does
========================  ======================================================================
``ShardSource``           this reader's shards for the epoch (split by rank, then by worker; with
                          ``exclude_keys``: every shard, one pass)
``ReadSamples``           tar members grouped into samples (local files, ``http(s)://``, ``pipe:``;
                          see :mod:`inti_adapters.data.remote`); counts them (an empty pass is an
                          error); a damaged shard, one shorter than ``sizes.json`` or a remote one
                          whose retries ran out is warned about and counted (evaluation: fails)
``ShuffleSamples``        (train) a seeded shuffle buffer, drained at the end of every pass
``SkipSamples``           (train) numbers samples; drops the ones of skipped batches *before* decoding
``DecodeClip``            video samples: decode (PyAV / torchcodec); frame samples: batched JPEG
                          decode; sample frames, crop -> uint8 ``(3, T, H, W)`` (test:
                          ``(V, 3, T, H, W)``); corrupt samples are skipped and counted. With
                          ``decode_device='cuda'`` frame samples stay encoded (frames + crop boxes)
``Batch``                 stack into ``(B, 3, T, H, W)`` / ``(B, V, 3, T, H, W)``, int64 labels and the
                          keys (GPU decoding: an ``EncodedBatch``, decoded on the device in the main
                          process)
``TakeBatches``           (train) stop after this worker's share of the epoch
========================  ======================================================================

Determinism. Every random choice is drawn from ``numpy`` generators seeded by
``(seed, epoch, reader slot[, sample number])``, where the reader slot is
``rank * num_workers + worker``; an epoch is therefore reproducible given
``(seed, epoch, rank, world_size, num_workers)`` and differs from every other epoch.

Splitting. With at least ``world_size * num_workers`` shards every reader slot reads its own
shards (disjoint). With fewer shards, every slot reads all shards and keeps every
``world_size * num_workers``-th sample (still disjoint, more I/O; a warning says so).

Epochs. A training epoch is ``len(loader)`` batches on every rank:
``train_samples // world_size // batch_size``, rounded down to a multiple of ``num_workers``
(each worker yields the same share). A reader that exhausts its shards before its share starts
another, reshuffled pass over them; with ``train_samples`` equal to the data set size and as
many samples in every reader's shards, one epoch reads every sample once. ``resampled=True``
draws shards with replacement instead. Evaluation reads every sample exactly once across ranks
and workers, in a fixed order, keeps a last partial batch, and ranks may get different numbers
of batches (reduce metrics after the loop, not per batch).

Resuming. ``loader.skip_batches(k)`` before iterating makes the next epoch start at batch
``k``: the skipped samples are read from the tar files but never decoded, and the batches
that follow are identical to those of an uninterrupted epoch (unless a corrupt sample falls
inside the skipped range, which shifts later batch boundaries by one sample). On another world
size or worker count, ``loader.exclude_keys(keys)`` instead makes the epoch's pass read every
sample whose key is not in ``keys`` exactly once across all ranks and workers (see its docstring).

Keys and labels. ``with_keys=True`` adds each batch's sample keys (``__key__``, the member name up
to its first dot) as a third element. A label outside ``[0, num_classes)`` (when the loader is
given ``num_classes``), a member given twice in one sample (two ``.cls``) or a key used by two
samples of a shard stops the pass with an error naming the shard and the key: wrong data is never
skipped like an undecodable video.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader
from webdataset import DataPipeline

from .config import DataConfig
from .decode import resolve_decoder
from .device import EncodedBatch, decode_batch
from .remote import RemoteOptions
from .sizes import read_shard_sizes
from .stages import (
    DAMAGED,
    MISSING,
    UNDECODABLE,
    Batch,
    DecodeClip,
    Exclusion,
    ReaderState,
    ReadSamples,
    ShardSource,
    ShuffleSamples,
    SkipSamples,
    TakeBatches,
    plan_batches,
)
from .tario import expand_shards

logger = logging.getLogger("inti_adapters.data")

# ---------------------------------------------------------------------------------------------------
# shard lists


# ---------------------------------------------------------------------------------------------------
# the loader


@dataclass
class ReadReport:
    """What one evaluation pass of one rank read: ``expected`` (from ``sizes.json``, None if unknown),
    ``read`` (samples read from the tar files), ``undecodable`` (read but skipped), ``missing`` (listed
    but not in their damaged shards) and ``damaged_shards``."""

    expected: int | None
    read: int
    undecodable: int
    missing: int
    damaged_shards: int


class VideoLoader:
    """An iterable over batches for one rank, with ``set_epoch`` and ``skip_batches``; see the module docstring.

    Training yields ``(uint8 (B, 3, T, H, W), int64 (B,))``; evaluation yields
    ``(uint8 (B, V, 3, T, H, W), int64 (B,))`` with ``V = num_clips * num_crops``; with
    ``with_keys=True`` a third element lists the samples' keys.
    """

    def __init__(self, cfg: DataConfig, *, train: bool, rank: int = 0, world_size: int = 1, epoch: int = 0,
                 with_keys: bool = False, num_classes: int | None = None) -> None:
        if not isinstance(cfg, DataConfig):
            raise TypeError(f"cfg must be a DataConfig, got {type(cfg).__name__}")
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank!r}")
        spec = cfg.train_shards if train else cfg.val_shards
        if spec is None:
            raise ValueError(f"DataConfig.{'train' if train else 'val'}_shards is None; nothing to read")
        if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                        or num_classes < 1):
            raise ValueError(f"num_classes must be an int >= 1 or None, got {num_classes!r}")
        self.cfg, self.train, self.rank, self.world_size = cfg, train, rank, world_size
        self.with_keys, self.num_classes = bool(with_keys), num_classes
        self._exclusion: Exclusion | None = None
        self.epoch = int(epoch)
        self.decoder = resolve_decoder(cfg.decoder)
        self.shards = expand_shards(spec)
        self.num_workers = cfg.num_workers
        self.batch_size = cfg.batch_size if train else (cfg.eval_batch_size or cfg.batch_size)
        slots = world_size * max(1, self.num_workers)
        self.remote = RemoteOptions(cfg.retries, cfg.retry_backoff_s, cfg.read_timeout_s)
        self.shard_sizes = read_shard_sizes(self.shards, self.remote)
        if len(self.shards) < slots and not (train and cfg.resampled) and rank == 0:
            logger.warning(
                "%d shards for %d readers (world_size %d x %d workers): every reader reads every shard and keeps "
                "1/%d of its samples; write more, smaller shards to avoid the extra reading",
                len(self.shards), slots, world_size, max(1, self.num_workers), slots)
        self._pending_skip = 0
        # shared with the workers: per worker UNDECODABLE, READ, MISSING, DAMAGED (see stages.py)
        self._counters = torch.zeros(max(1, self.num_workers) + 1, 4, dtype=torch.int64).share_memory_()
        self._last_read: ReadReport | None = None
        self.decode_device = torch.device(cfg.decode_device)
        self.on_incomplete = cfg.on_incomplete
        if train:
            total = cfg.train_samples if cfg.train_samples is not None else (
                sum(self.shard_sizes) if self.shard_sizes is not None else None)
            if total is None:
                raise ValueError("cannot size the training epoch: the shards are remote and have no sizes.json; "
                                 "set DataConfig.train_samples")
            per_rank_batches = total // world_size // self.batch_size
            self.batches_per_worker = per_rank_batches // max(1, self.num_workers)
            if self.batches_per_worker < 1:
                raise ValueError(
                    f"an epoch of {total} samples gives {per_rank_batches} batches of {self.batch_size} per rank "
                    f"(world_size {world_size}), fewer than one per worker ({self.num_workers} workers); lower "
                    "batch_size or num_workers, or raise train_samples"
                )
            self.epoch_samples = total

    # -- epoch control -------------------------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch: its shard order, shuffle and augmentations follow from ``(seed, epoch)``.

        Ends an exclusion (:meth:`exclude_keys`) made for the previous epoch.
        """
        self.epoch = int(epoch)
        self._exclusion = None

    def exclude_keys(self, keys: Iterable[str]) -> None:
        """Make the passes of the current epoch (until the next :meth:`set_epoch`) read every sample except those
        whose ``__key__`` is in ``keys``, each once, spread evenly over all ranks and workers (training only).

        For resuming an epoch on another number of ranks or workers: pass the keys already trained in
        the epoch (e.g. from the sample logs). Every reader slot (``rank * num_workers + worker``)
        reads all shards in the epoch's shard order and keeps every ``world_size * num_workers``-th
        of the remaining samples, so the slots together yield each remaining sample exactly once.
        Every rank yields the same number of batches (``len(loader)``); batches hold at most
        ``batch_size`` samples and the sizes are spread so that none is empty. The epoch must be
        one pass over the shards (``resampled`` off, ``train_samples`` unset or equal to the data
        set size), and the keys must be unique and present in the shards (a pass that meets
        another number of them fails at its end, naming the counts). An undecodable sample is
        skipped as usual, which leaves its batch one smaller; samples lost with a damaged or
        unreadable shard are warned about, and the last batches are split to keep the planned
        number of batches where enough samples are left.

        Raises:
            ValueError: an evaluation loader, resampled shards, an epoch that is not one pass, or too
                few remaining samples to give every rank a non-empty batch.
        """
        if not self.train or self.cfg.resampled:
            raise ValueError("exclude_keys applies to training loaders that read shards without replacement "
                             f"(this one: train={self.train}, resampled={self.cfg.resampled})")
        keys = frozenset(keys)
        if not all(isinstance(k, str) for k in keys):
            raise TypeError("exclude_keys takes sample keys (str)")
        total = sum(self.shard_sizes) if self.shard_sizes is not None else None
        if total is None or self.epoch_samples != total:
            raise ValueError(f"exclude_keys needs an epoch that is one pass over the shards: the shards hold "
                             f"{total if total is not None else 'an unknown number of'} samples (sizes.json), the "
                             f"epoch is {self.epoch_samples} (data.train_samples)")
        remaining = total - len(keys)
        if remaining < 0:
            raise ValueError(f"{len(keys)} keys to exclude but the shards hold only {total} samples")
        workers = max(1, self.num_workers)
        plan = plan_batches(remaining, self.world_size, workers, self.batch_size)[self.rank]
        self._exclusion = Exclusion(keys, remaining, tuple(tuple(p) for p in plan))

    def skip_batches(self, k: int) -> None:
        """Make the next iteration start at batch ``k`` of the current epoch (training only; for resume)."""
        if not self.train:
            raise ValueError("skip_batches applies to training loaders; evaluation always reads everything")
        if self._exclusion is not None:
            raise ValueError("skip_batches cannot follow exclude_keys: pass every key trained so far in the epoch "
                             "to exclude_keys instead")
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= len(self):
            raise ValueError(f"k must be an int in [0, {len(self)}] (batches per epoch), got {k!r}")
        self._pending_skip = k

    # -- sizes -------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        """Batches this rank yields per epoch (evaluation: an upper bound if samples are corrupt)."""
        workers = max(1, self.num_workers)
        if self.train and self._exclusion is not None:
            return sum(len(p) for p in self._exclusion.plan)
        if self.train:
            return self.batches_per_worker * workers
        counts = self._eval_counts()
        if counts is None:
            raise TypeError("the number of evaluation batches is unknown: the shards are remote and have no sizes.json")
        return sum(-(-c // self.batch_size) for c in counts)

    def _eval_counts(self) -> list[int] | None:
        """Samples each worker of this rank reads in evaluation."""
        if self.shard_sizes is None:
            return None
        workers, slots, n = max(1, self.num_workers), self.world_size * max(1, self.num_workers), len(self.shards)
        out = []
        for w in range(workers):
            slot = self.rank * workers + w
            if n >= slots:
                out.append(sum(self.shard_sizes[slot::slots]))
            else:
                out.append(len(range(slot, sum(self.shard_sizes), slots)))
        return out

    @property
    def num_samples(self) -> int | None:
        """Samples this rank sees per epoch (training: batches x batch size; evaluation: its share)."""
        if self.train:
            return len(self) * self.batch_size
        counts = self._eval_counts()
        return None if counts is None else sum(counts)

    @property
    def corrupt_skipped(self) -> int:
        """Samples skipped as undecodable since this loader was made (all its workers)."""
        return int(self._counters[:, UNDECODABLE].sum())

    @property
    def samples_missing(self) -> int:
        """Samples that ``sizes.json`` lists but that could not be read from their (damaged) shards, since made."""
        return int(self._counters[:, MISSING].sum())

    @property
    def damaged_shards(self) -> int:
        """Times a damaged shard was met since this loader was made (each warned about, naming the shard)."""
        return int(self._counters[:, DAMAGED].sum())

    @property
    def read_report(self) -> ReadReport | None:
        """What the last complete evaluation pass of this rank read (None before one finished)."""
        return self._last_read

    # -- iteration -----------------------------------------------------------------------------------------

    def _state(self, worker_override: int | None = None) -> ReaderState:
        return ReaderState(seed=self.cfg.seed, epoch=self.epoch, rank=self.rank, world_size=self.world_size,
                            num_workers=max(1, self.num_workers), skip=self._pending_skip if self.train else 0,
                            worker_override=worker_override, counters=self._counters,
                            exclusion=self._exclusion if self.train else None, num_classes=self.num_classes)

    def stages(self, state: ReaderState | None = None) -> list[Any]:
        """The pipeline stages for one epoch (see the table in the module docstring)."""
        st = state or self._state()
        cfg = self.cfg
        if not self.train:
            return [ShardSource(self.shards, st, mode="eval", shard_shuffle=False),
                    ReadSamples(st, self._listed(), opener=self.remote, train=False),
                    DecodeClip(cfg, st, train=False, decoder=self.decoder, encoded=self.encoded),
                    Batch(self.batch_size, partial=True)]
        skipper = SkipSamples(st, self.batch_size)
        return [
            ShardSource(self.shards, st, mode="resampled" if cfg.resampled else "train",
                        shard_shuffle=cfg.shard_shuffle),
            ReadSamples(st, self._listed(), opener=self.remote),
            ShuffleSamples(st, cfg.shuffle_buffer),
            skipper,
            DecodeClip(cfg, st, train=True, decoder=self.decoder, encoded=self.encoded),
            Batch(self.batch_size, partial=False, state=st),
            *([] if st.exclusion is not None else [TakeBatches(skipper, self.batches_per_worker)]),
        ]

    def dataset(self) -> DataPipeline:
        """The ``webdataset.DataPipeline`` of the current epoch (what the DataLoader workers iterate)."""
        return DataPipeline(self.stages())

    @property
    def encoded(self) -> bool:
        """Whether frame samples travel encoded, to be decoded on ``decode_device`` (a GPU)."""
        return self.decode_device.type != "cpu"

    def _listed(self) -> dict[str, int]:
        return dict(zip(self.shards, self.shard_sizes, strict=True)) if self.shard_sizes is not None else {}

    def _batches(self, batches: Iterator[Any], before: torch.Tensor) -> Iterator[tuple[Any, ...]]:
        """Decode GPU batches, drop the keys unless asked for; after a whole evaluation pass, record what it
        read (:attr:`read_report`). ``before`` is a copy of the counters taken before the workers started."""
        for video, labels, keys in batches:
            if isinstance(video, EncodedBatch):
                video, labels = decode_batch(video, self.decode_device)
            yield (video, labels, keys) if self.with_keys else (video, labels)
        if not self.train:
            undecodable, read, missing, damaged = (self._counters.sum(0) - before).tolist()
            counts = self._eval_counts()
            self._last_read = ReadReport(expected=None if counts is None else sum(counts), read=read,
                                         undecodable=undecodable, missing=missing, damaged_shards=damaged)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        pipeline = self.dataset()
        self._pending_skip = 0  # a skip applies to one iteration
        before = self._counters.sum(0)
        loader = DataLoader(
            pipeline, batch_size=None, num_workers=self.num_workers, pin_memory=self.cfg.pin_memory,
            multiprocessing_context=self.cfg.multiprocessing_context if self.num_workers else None,
        )
        return self._batches(iter(loader), before)

    def iter_worker(self, worker: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Iterate, in this process, what DataLoader worker ``worker`` would yield (tests, debugging)."""
        if not 0 <= worker < max(1, self.num_workers):
            raise ValueError(f"worker must be in [0, {max(1, self.num_workers)}), got {worker}")
        before = self._counters.sum(0)
        return self._batches(iter(DataPipeline(self.stages(self._state(worker_override=worker)))), before)

    def __repr__(self) -> str:
        kind = "train" if self.train else "eval"
        return (f"VideoLoader({kind}, {len(self.shards)} shards, rank {self.rank}/{self.world_size}, "
                f"{self.num_workers} workers, batch {self.batch_size}, epoch {self.epoch})")


def build_dataloader(cfg: DataConfig, *, train: bool, rank: int = 0, world_size: int = 1, epoch: int = 0,
                     with_keys: bool = False, num_classes: int | None = None) -> VideoLoader:
    """The loader of one rank.

    ``train=True`` yields ``(video uint8 (B, 3, T, H, W), label int64 (B,))``, a fixed number of
    batches per epoch (``len(loader)``, equal on all ranks), shuffled and augmented from
    ``(seed, epoch)``. ``train=False`` yields ``(video uint8 (B, V, 3, T, H, W), label int64 (B,))``
    with ``V = num_clips * num_crops``, every sample exactly once across ranks and workers, in a
    fixed order. Resume mid-epoch with ``loader.set_epoch(e); loader.skip_batches(k)``, or on
    another world size with ``loader.set_epoch(e); loader.exclude_keys(trained_keys)``.

    ``with_keys=True`` adds a third element, the ``__key__`` of every sample of the batch
    (``list[str]``, batch order). With ``num_classes``, a label outside ``[0, num_classes)``
    raises ``ValueError`` naming the shard, the sample key, the label and the range.
    """
    return VideoLoader(cfg, train=train, rank=rank, world_size=world_size, epoch=epoch, with_keys=with_keys,
                       num_classes=num_classes)

