"""Write video data sets as WebDataset tar shards (the ``inti-shards`` command).

One sample per video: ``<key>.mp4`` (the encoded video; a copied ``.webm``/``.mkv``/... keeps its
own extension), ``<key>.cls`` (the integer label as text) and ``<key>.json`` (source path, label,
class name, frame count, fps, duration, size). With ``store='frames'`` the video is decoded once
and the sample holds ``frames_per_video`` JPEG frames instead (``<key>.00000.jpg`` ...; see
:mod:`inti_adapters.data.frames`); the source may then also be existing video shards, which
are converted. Beside the shards the writer leaves
``classes.json`` (class name -> index), ``sizes.json`` (shard file -> sample count, read by the
loader to size epochs) and ``manifest.json`` (the bookkeeping that makes runs resumable).

Robustness:

- Videos are assigned to shards deterministically (sorted, then shuffled with ``seed``), so a
  rerun produces the same shards. A shard is written to a temporary ``.<name>.*.tmp`` and renamed only when
  complete, then recorded in the manifest; rerunning an interrupted command keeps the recorded
  shards and writes the rest, so no sample is lost or duplicated and no half shard ever has a
  final name.
- A video that cannot be read is skipped with one log line and counted, never stopping the run.
  A shard whose videos were all skipped is not written (its samples are listed as skipped), a
  class that ends up with no sample is named in a warning, and a run that reads no video at all
  is an error.
- One run at a time per output folder: a run holds a lock on ``<output>/.inti-shards.lock`` (released
  when the process ends, however it ends); a second run on the same folder is refused, naming the first.
- Converting shards into their own folder (``--source S --output S --store frames --overwrite``)
  writes the new shards aside and replaces the old ones only when all are written (see
  :mod:`inti_adapters.data.inplace`).
- Worker processes are made single-threaded in torch first, so a pool started after torch work
  cannot hang (see :mod:`inti_adapters.data._processes`).

    $ inti-shards --source videos/ --output shards/train --samples-per-shard 500 --workers 4
    $ inti-shards --source videos/ --output shards/train-frames --store frames      # 32 JPEG frames a video
    $ inti-shards --source 'shards/train/shard-{000000..000099}.tar' --output shards/train-frames --store frames
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import logging
import os
import re
import shutil
import sys
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from .._config import add_config_arguments, config_from_namespace
from .._io import AtomicFile, atomic_write, temporary_name_pattern
from ._lock import OutputLock
from ._processes import worker_pool
from .annotations import CLASS_INDEX_FILE, SOURCE_CACHE_DIR, VideoItem, read_annotations, write_class_index
from .config import VIDEO_EXTENSIONS, ShardWriterConfig
from .decode import VideoDecodeError, probe_video, reencode_video
from .frames import extract_frames
from .inplace import convert_in_place, pending_swap, refuse_in_place, source_shards_in
from .sizes import SIZES_FILE
from .tario import is_local

logger = logging.getLogger("inti_adapters.data")

MANIFEST_FILE = "manifest.json"
MANIFEST_VERSION = 1


# ---------------------------------------------------------------------------------------------------
# writing one shard


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write JSON to ``path`` atomically (see :mod:`inti_adapters._io`)."""
    atomic_write(path, json.dumps(data, indent=1, sort_keys=True) + "\n")


class ShardSink:
    """A tar shard written under a temporary name and renamed to ``path`` by :meth:`commit`.

    Used as a context manager, an exception before ``commit`` deletes the temporary file.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._atomic = AtomicFile(self.path, "wb")
        self._tar = tarfile.open(fileobj=self._atomic.file, mode="w", format=tarfile.PAX_FORMAT)
        self.count = 0
        self.keys: set[str] = set()

    @property
    def tmp_path(self) -> Path:
        return self._atomic.tmp_path

    def add(self, key: str, members: dict[str, bytes]) -> None:
        """Add one sample: ``members`` maps an extension (``'mp4'``) to the member's bytes."""
        if "." in key or "/" in key:
            raise ValueError(f"sample keys may not contain '.' or '/', got {key!r}")
        if key in self.keys:
            raise ValueError(f"duplicate sample key {key!r} in {self.path.name}")
        self.keys.add(key)
        for ext, data in members.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o444
            self._tar.addfile(info, io.BytesIO(data))
        self.count += 1

    def commit(self) -> int:
        """Close the tar, flush it to disk and give it its final name; returns its size in bytes."""
        self._tar.close()
        self._atomic.commit()
        return self.path.stat().st_size

    def abort(self) -> None:
        """Drop the temporary file."""
        if not self._atomic.file.closed:
            self._tar.close()
        self._atomic.abort()

    def __enter__(self) -> ShardSink:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or self.tmp_path.exists():
            self.abort()


def sample_key(position: int, source: str) -> str:
    """A webdataset-safe key: the sample's position in the data set plus a readable stem."""
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", Path(source).stem)[:60]
    return f"{position:08d}_{stem}"


# ---------------------------------------------------------------------------------------------------
# preparing one video (runs in worker processes)


def read_item(item: VideoItem) -> tuple[bytes | str, dict[str, Any]]:
    """The video of an item (a file path, or the bytes of a shard member) and its earlier metadata."""
    if item.member is None:
        return item.path, {}
    offset, size = item.member
    with open(item.local or item.path, "rb") as f:
        f.seek(offset)
        data = f.read(size)
    if len(data) != size:
        raise VideoDecodeError(f"the shard {item.path} ends inside sample {item.source}")
    meta = json.loads(item.meta) if item.meta else {}
    return data, {k: v for k, v in meta.items() if k in ("source", "path", "class_name")}


def prepare_item(item: VideoItem, options: dict[str, Any]) -> tuple[dict[str, bytes], dict[str, Any]]:
    """Read, re-encode or turn into frames one video; returns ``(members by extension, metadata)``.

    Raises:
        VideoDecodeError / OSError: the video is missing or unreadable.
    """
    video, base = read_item(item)
    if options["store"] == "frames":
        members, info = extract_frames(video, frames_per_video=options["frames_per_video"],
                                       short_side=options["frame_short_side"], quality=options["jpeg_quality"])
        return members, {**base, **info}
    if options["reencode"]:
        data, info = reencode_video(video, short_side=options["short_side"], fps=options["fps"],
                                    codec=options["codec"], crf=options["crf"], preset=options["preset"])
        return {"mp4": data}, info.to_dict()
    data = Path(video).read_bytes() if isinstance(video, str) else video
    info = probe_video(data, full=options["check"] == "full")
    ext = Path(item.path).suffix.lower().lstrip(".")
    return {ext if ext in VIDEO_EXTENSIONS else "mp4": data}, info.to_dict()


def _prepare_safe(job: tuple[VideoItem, dict[str, Any]]) -> tuple[str, Any]:
    item, options = job
    try:
        return "ok", prepare_item(item, options)
    except FileNotFoundError:
        return "skip", "file not found"
    except (VideoDecodeError, OSError, ValueError) as exc:
        return "skip", f"unreadable: {exc}"


# ---------------------------------------------------------------------------------------------------
# the whole run


@dataclass
class ShardSummary:
    """What a :func:`write_shards` run produced (all shards, including ones kept from an earlier run)."""

    output: str
    shards: list[str]
    written: int
    skipped: int
    bytes: int
    num_classes: int
    resumed_shards: int = 0
    unlabelled: int = 0
    skipped_videos: list[tuple[str, str]] = field(default_factory=list)

    @property
    def pattern(self) -> str:
        """A brace pattern naming every shard (what ``DataConfig.train_shards`` accepts)."""
        return shard_pattern(self.shards)

    store: str = "video"
    empty_classes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        mib = self.bytes / 2**20
        per_video = self.bytes / max(self.written, 1) / 1e3
        return (f"{self.written} videos written to {len(self.shards)} shards in {self.output} ({mib:.1f} MiB, "
                f"{per_video:.0f} kB per video, {self.store}), {self.skipped} skipped, {self.num_classes} classes"
                + (f", {self.resumed_shards} shards kept from an earlier run" if self.resumed_shards else "")
                + (f"; WARNING: {len(self.empty_classes)} classes have no sample: "
                   f"{', '.join(self.empty_classes[:10])}" if self.empty_classes else ""))


def shard_pattern(shards: Sequence[str]) -> str:
    """``dir/prefix-{000000..000009}.tar`` for consecutive shards (a single path for one shard);
    ``dir/prefix-??????.tar`` when numbers are missing (shards left empty are not written)."""
    if len(shards) == 1:
        return shards[0]
    first, last = Path(shards[0]), Path(shards[-1])
    m1, m2 = re.match(r"(.*-)(\d{6})\.tar$", first.name), re.match(r"(.*-)(\d{6})\.tar$", last.name)
    if not (m1 and m2) or m1.group(1) != m2.group(1):
        raise ValueError(f"shards {first.name} .. {last.name} do not share a '<prefix>-NNNNNN.tar' name")
    if int(m2.group(2)) - int(m1.group(2)) + 1 != len(shards):
        return str(first.parent / f"{m1.group(1)}??????.tar")
    return str(first.parent / f"{m1.group(1)}{{{m1.group(2)}..{m2.group(2)}}}.tar")


def _digest(items: Sequence[VideoItem], *, normalise: bool = True) -> str:
    """A hash of the videos, their labels and (shards) members; local paths made absolute and resolved, so
    ``--source videos`` and ``--source /abs/videos`` are the same run (``normalise=False``: older manifests)."""
    h = hashlib.sha256()
    for it in items:
        member = f"\t{it.source}\t{it.member}" if it.member is not None else ""
        path = os.path.realpath(it.path) if normalise and is_local(it.path) else it.path
        h.update(f"{path}\t{it.label}{member}\n".encode())
    return h.hexdigest()


def _what_differs(old: dict[str, Any], cfg: ShardWriterConfig, items: Sequence[VideoItem], digest: str,
                  num_shards: int) -> str:
    """What an earlier run of an output folder did differently, in words."""
    then, now = old.get("fingerprint") or {}, cfg.fingerprint()
    parts = [f"{k} {then.get(k)!r} then, {now.get(k)!r} now" for k in sorted(set(then) | set(now))
             if then.get(k) != now.get(k)]
    if old.get("items_digest") != digest:
        count = old.get("num_items", "an unrecorded number of")
        source = f" from {old['source']!r}" if "source" in old else ""
        same = " (as many, but other files, labels or order)" if count == len(items) else ""
        parts.append(f"other videos: {count} videos{source} then, {len(items)} from {cfg.source!r} now{same}")
    elif old.get("num_shards") != num_shards:
        parts.append(f"{old.get('num_shards')} shards then, {num_shards} now")
    return "; ".join(parts)


def _load_manifest(out: Path, cfg: ShardWriterConfig, items: Sequence[VideoItem], num_shards: int,
                   replace_other: bool = False) -> dict[str, Any]:
    path = out / MANIFEST_FILE
    digest = _digest(items)
    fresh = {"version": MANIFEST_VERSION, "fingerprint": cfg.fingerprint(), "items_digest": digest,
             "num_shards": num_shards, "shards": {}, "complete": False, "source": cfg.source,
             "num_items": len(items)}
    if not path.exists():
        return fresh
    old = _read_json(path, "the manifest of an earlier inti-shards run")
    if old.get("items_digest") == _digest(items, normalise=False):
        old["items_digest"] = digest  # written before paths were normalised: the same videos
    same = (old.get("fingerprint") == cfg.fingerprint() and old.get("items_digest") == digest
            and old.get("num_shards") == num_shards)
    if cfg.overwrite or (replace_other and not same):
        for name in old.get("shards", {}):
            (out / name).unlink(missing_ok=True)
        return fresh
    if not same:
        raise ValueError(
            f"{out} holds shards of a different run ({_what_differs(old, cfg, items, digest, num_shards)}); "
            "pass overwrite=True (--overwrite) to replace them, or choose another output folder"
        )
    return old


def _read_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON object from ``path``; a clear error naming the file when it is not one."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path} ({what}) cannot be read: {type(exc).__name__}: {exc}; remove it to start over") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path} ({what}) must hold a JSON object, got {type(data).__name__}")
    return data


def _jobs(items: Sequence[VideoItem], shard_ids: Sequence[int], per_shard: int,
          options: dict[str, Any]) -> Iterator[tuple[VideoItem, dict[str, Any]]]:
    for s in shard_ids:
        for it in items[s * per_shard:(s + 1) * per_shard]:
            yield it, options


def _ordered_items(cfg: ShardWriterConfig) -> tuple[Any, list[VideoItem]]:
    """The annotations and their videos in shard order (sorted, then shuffled with the seed)."""
    ann = read_annotations(cfg)
    if ann.items and ann.items[0].member is not None and cfg.store != "frames":
        raise ValueError(f"{cfg.source} holds shards; they can only be converted to frame shards (--store frames)")
    items = sorted(ann.items, key=lambda it: (it.path, it.label, it.source))
    if cfg.shuffle:
        order = np.random.default_rng(cfg.seed).permutation(len(items))
        items = [items[i] for i in order]
    return ann, items


def _open_output(cfg: ShardWriterConfig, items: Sequence[VideoItem], num_shards: int,
                 class_names: list[str], replace_other: bool = False) -> tuple[Path, dict[str, Any]]:
    """Create the output folder, load or start the manifest, drop unfinished shards."""
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    manifest = _load_manifest(out, cfg, items, num_shards, replace_other)
    for stale in [*out.glob(f"{cfg.prefix}-*.tar.tmp"), *out.glob(temporary_name_pattern(f"{cfg.prefix}-*.tar"))]:
        # left by a run that was killed mid-shard (older versions named them <shard>.tmp)
        logger.info("removing unfinished shard %s", stale.name)
        stale.unlink()
    done = manifest["shards"]
    for name in list(done):
        size = done[name]["bytes"]
        if size and (not (out / name).exists() or (out / name).stat().st_size != size):
            logger.warning("shard %s is listed as complete but is missing or changed; writing it again", name)
            del done[name]
    write_class_index(out / CLASS_INDEX_FILE, class_names)
    manifest["complete"] = False
    write_json_atomic(out / MANIFEST_FILE, manifest)
    return out, manifest


def _write_shard(path: Path, index: int, shard_items: Sequence[VideoItem], results: Iterator[tuple[str, Any]],
                 class_names: list[str], per: int, bar: Any) -> dict[str, Any]:
    """Write one shard from the prepared results of its items; a shard left empty is not written."""
    skipped: list[tuple[str, str]] = []
    labels: list[int] = []
    with ShardSink(path) as sink:
        for offset, item in enumerate(shard_items):
            status, payload = next(results)
            bar.update(1)
            if status == "skip":
                logger.warning("skipped %s: %s", item.source if item.member else item.path, payload)
                skipped.append((item.source, payload))
                continue
            members, info = payload
            meta = {"source": item.source, "path": item.path, "class_name": class_names[item.label], **info,
                    "label": item.label}
            sink.add(sample_key(index * per + offset, item.source),
                     {**members, "cls": str(item.label).encode(), "json": json.dumps(meta).encode()})
            labels.append(item.label)
        count = sink.count
        if count == 0:
            logger.warning("every video of shard %s was skipped: the shard is not written", path.name)
            sink.abort()
            size = 0
        else:
            size = sink.commit()
    return {"index": index, "count": count, "bytes": size, "skipped": skipped, "labels": labels}


def write_shards(config: ShardWriterConfig | None = None, **options: Any) -> ShardSummary:
    """Turn a folder tree, an annotation file or video shards into WebDataset shards; see the module docstring.

        >>> summary = write_shards(source="videos/", output="shards/", samples_per_shard=500)  # doctest: +SKIP
        >>> summary.pattern                                                                  # doctest: +SKIP
        'shards/shard-{000000..000011}.tar'

    Pass either a :class:`ShardWriterConfig` or its fields as keyword arguments.

    Raises:
        ValueError: bad options, an unreadable source, or no readable video at all.
    """
    if config is None:
        config = ShardWriterConfig(**options)
    elif options:
        config = dataclasses.replace(config, **options)
    cfg = config
    swap = pending_swap(cfg.output)
    old = source_shards_in(cfg.source, cfg.format, cfg.output) if swap is None else []
    if old and not cfg.overwrite:
        refuse_in_place(cfg)  # before anything is touched
    with OutputLock(cfg.output, "inti-shards"):
        if swap is not None or old:
            fields = convert_in_place(cfg, old, swap, lambda c: dataclasses.asdict(_write(c, replace_other=True)),
                                      (CLASS_INDEX_FILE, SIZES_FILE), MANIFEST_FILE)
            summary = ShardSummary(**fields)
            logger.info("%s", summary)
            return summary
        summary = _write(cfg)
    shutil.rmtree(Path(cfg.output) / SOURCE_CACHE_DIR, ignore_errors=True)  # copies of remote source shards
    return summary


def _write(cfg: ShardWriterConfig, *, replace_other: bool = False) -> ShardSummary:
    """One ``inti-shards`` run into ``cfg.output`` (``replace_other``: an earlier run's shards with other
    options are deleted instead of refused; a run with the same options is resumed)."""
    ann, items = _ordered_items(cfg)
    per = cfg.samples_per_shard
    num_shards = -(-len(items) // per)
    names = [f"{cfg.prefix}-{s:06d}.tar" for s in range(num_shards)]
    out, manifest = _open_output(cfg, items, num_shards, ann.class_names, replace_other)
    done = manifest["shards"]
    resumed = len(done)
    pending = [s for s in range(num_shards) if names[s] not in done]
    job_options = {k: getattr(cfg, k) for k in ("reencode", "short_side", "fps", "codec", "crf", "preset", "check",
                                                "store", "frames_per_video", "jpeg_quality", "frame_short_side")}
    bar = tqdm(total=len(items), initial=sum(d["count"] + len(d["skipped"]) for d in done.values()),
               unit="video", disable=not cfg.progress, desc=f"shards -> {out}")
    pool = worker_pool(cfg.workers) if cfg.workers > 1 and pending else None
    try:
        jobs = _jobs(items, pending, per, job_options)
        results = pool.imap(_prepare_safe, jobs, chunksize=2) if pool else map(_prepare_safe, jobs)
        for s in pending:
            done[names[s]] = _write_shard(out / names[s], s, items[s * per:(s + 1) * per], results,
                                          ann.class_names, per, bar)
            write_json_atomic(out / MANIFEST_FILE, manifest)
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()
    return _finish(cfg, out, manifest, names, ann, resumed)


def _finish(cfg: ShardWriterConfig, out: Path, manifest: dict[str, Any], names: list[str], ann: Any,
            resumed: int) -> ShardSummary:
    """Write sizes.json, mark the run complete, warn about empty classes, and summarise."""
    done = manifest["shards"]
    written = [n for n in names if done[n]["count"]]
    skipped_all = [tuple(x) for n in names for x in done[n]["skipped"]] + list(ann.skipped)
    if not written:
        reasons = "; ".join(f"{src}: {why}" for src, why in skipped_all[:3])
        raise ValueError(f"no video of {cfg.source} could be read ({len(skipped_all)} skipped, e.g. {reasons})")
    write_json_atomic(out / SIZES_FILE, {n: done[n]["count"] for n in written})
    manifest["complete"] = True
    write_json_atomic(out / MANIFEST_FILE, manifest)
    seen = {lab for n in names for lab in done[n].get("labels", range(len(ann.class_names)))}
    empty = [name for i, name in enumerate(ann.class_names) if i not in seen]
    if empty:
        logger.warning("%d of %d classes have no sample in %s (every video skipped, or none listed): %s",
                       len(empty), len(ann.class_names), out, ", ".join(empty[:20]))
    summary = ShardSummary(
        output=str(out), shards=[str(out / n) for n in written], written=sum(done[n]["count"] for n in names),
        skipped=len(skipped_all), bytes=sum(done[n]["bytes"] for n in names), num_classes=len(ann.class_names),
        resumed_shards=resumed, unlabelled=len(ann.unlabelled), skipped_videos=skipped_all, store=cfg.store,
        empty_classes=empty,
    )
    logger.info("%s", summary)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    """The ``inti-shards`` command."""
    parser = argparse.ArgumentParser(
        prog="inti-shards",
        description="Write a folder tree (one sub-folder per class) or a Kinetics / Something-Something "
                    "annotation file as WebDataset shards. Rerun the same command to resume.",
    )
    add_config_arguments(parser, ShardWriterConfig, required=("source", "output"))
    parser.add_argument("--log-level", default="WARNING", help="logging level (default: WARNING)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = config_from_namespace(ShardWriterConfig, args)
        summary = write_shards(cfg)
    except (ValueError, FileNotFoundError) as exc:
        print(f"inti-shards: error: {exc}", file=sys.stderr)
        return 2
    print(summary)
    if summary.shards:
        print(f"shards: {summary.pattern}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
