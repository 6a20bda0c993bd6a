"""Data pipeline throughput: decoded, sampled and cropped training clips per second per worker.

Writes a few synthetic videos (320-pixel short side, H.264 MP4, smooth moving content) with
PyAV, packs them into WebDataset shards with ``inti_adapters.data.write_shards``, then reads
16-frame 224^2 training clips back through ``build_dataloader(DataConfig(...), train=True)``:

- in one process (``loader.iter_worker(0)``, exactly what one DataLoader worker runs), which
  is the per-worker throughput, with a breakdown into decoding (open + seek/decode the sampled
  frames) and the crop/resize transform;
- through a ``DataLoader`` with 1..W worker processes (total clips/s, and per worker).

Each configuration is measured in several rounds, round-robin over the configurations, and the
median is reported; PyAV and torchcodec (when installed) are compared side by side.

    python benchmarks/data_throughput.py               # ~2-3 minutes on 2 cores
    python benchmarks/data_throughput.py --quick       # ~30 s smoke run

Writes ``benchmarks/results/data_throughput[_quick].md``.
"""

from __future__ import annotations

import argparse
import faulthandler
import importlib.util
import itertools
import multiprocessing
import os
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import log, machine_info, markdown_table, median, spread, write_results


def synthetic_frames(num_frames: int, height: int, width: int, seed: int) -> np.ndarray:
    """Smooth moving content (a drifting colour gradient, two moving discs, light texture), uint8 (T, H, W, 3)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    texture = rng.normal(0, 6, (height // 8 + 1, width // 8 + 1, 3)).repeat(8, 0).repeat(8, 1)[:height, :width]
    base_colour = rng.uniform(40, 200, 3)
    velocity = rng.uniform(-4, 4, (2, 2))
    start = rng.uniform([0, 0], [height, width], (2, 2))
    out = np.empty((num_frames, height, width, 3), np.uint8)
    for t in range(num_frames):
        phase = 2 * np.pi * t / max(num_frames, 1)
        frame = base_colour + 50 * np.sin(xx[..., None] / width * 4 + phase + np.arange(3)) \
            + 30 * np.cos(yy[..., None] / height * 3 - phase) + texture
        for k in range(2):
            cy, cx = (start[k] + velocity[k] * t) % (height, width)
            disc = (yy - cy) ** 2 + (xx - cx) ** 2 < (height / 6) ** 2
            frame[disc] = (255 - base_colour) if k else base_colour / 3
        out[t] = np.clip(frame, 0, 255).astype(np.uint8)
    return out


def write_videos(root: Path, count: int, seconds: float, fps: int, height: int, width: int) -> list[Path]:
    """``count`` synthetic MP4s under ``root/<class>/`` (two classes)."""
    from inti_adapters.data import encode_video

    paths = []
    for i in range(count):
        path = root / f"class_{i % 2}" / f"video_{i:03d}.mp4"
        path.parent.mkdir(parents=True, exist_ok=True)
        frames = synthetic_frames(int(round(seconds * fps)), height, width, seed=i)
        path.write_bytes(encode_video(frames, fps=fps, crf=23, preset="veryfast"))
        paths.append(path)
    return paths


def _shard_samples(shards: Sequence[str]) -> list[bytes]:
    """The encoded videos inside the shards."""
    out = []
    for shard in shards:
        with tarfile.open(shard) as tar:
            out += [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".mp4")]
    return out


PREFETCH = 2  # torch DataLoader's default prefetch_factor


def time_clips(batches: Iterator[Any], untimed: int, clips: int) -> float:
    """Seconds to receive ``clips`` clips after ``untimed`` batches (start-up, prefetched batches)."""
    for _ in range(untimed):
        next(batches)
    start, taken = time.perf_counter(), 0
    while taken < clips:
        video, _ = next(batches)
        taken += video.shape[0]
    return time.perf_counter() - start


def time_in_process(cfg: Any, clips: int, epoch: int) -> float:
    """One worker's pipeline run in this process (``iter_worker(0)``); the first clip is not timed."""
    from inti_adapters.data import build_dataloader

    loader = build_dataloader(cfg, train=True, epoch=epoch)
    return time_clips(loader.iter_worker(0), 1, clips)


def time_dataloader(cfg: Any, clips: int, epoch: int) -> float:
    """A DataLoader with fresh workers; their start-up and prefetched first batches are not timed."""
    from inti_adapters.data import build_dataloader

    loader = build_dataloader(cfg, train=True, epoch=epoch)
    batches = iter(loader)
    try:
        return time_clips(batches, cfg.num_workers * (1 + PREFETCH), clips)
    finally:
        del batches  # shuts the workers down before the next configuration runs


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--videos", type=int, default=None, help="synthetic videos to write (default 8; --quick 4)")
    p.add_argument("--seconds", type=float, default=None, help="length of each video (default 8; --quick 3)")
    p.add_argument("--fps", type=int, default=25)
    p.add_argument("--short-side", type=int, default=320, help="video height (short side) in pixels")
    p.add_argument("--aspect", type=float, default=16 / 9, help="width / height")
    p.add_argument("--frames", type=int, default=16, help="frames per clip")
    p.add_argument("--crop", type=int, default=224, help="clip height and width")
    p.add_argument("--clips", type=int, default=None, help="clips timed per configuration and round (default 16)")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default 3; --quick 2)")
    p.add_argument("--workers", type=int, default=None,
                   help="largest DataLoader worker count to try (default min(2, cores))")
    p.add_argument("--decoders", default="pyav,torchcodec", help="decoders to compare (uninstalled ones are skipped)")
    p.add_argument("--sampling", default="uniform,dense", help="frame sampling modes")
    p.add_argument("--quick", action="store_true", help="smoke run: 4 short videos, 8 clips, 2 rounds")
    p.add_argument("--timeout", type=float, default=1800, help="abort with a traceback after this many seconds")
    p.add_argument("--results-name", default=None, help="file name under results/ (default data_throughput[_quick])")
    p.add_argument("--note", action="append", default=[], help="a line for the Notes section (repeatable)")
    args = p.parse_args(argv)
    args.videos = args.videos or (4 if args.quick else 8)
    args.seconds = args.seconds or (3.0 if args.quick else 8.0)
    args.clips = args.clips or (8 if args.quick else 16)
    args.rounds = args.rounds or (2 if args.quick else 3)
    args.workers = args.workers if args.workers is not None else min(2, os.cpu_count() or 1)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    faulthandler.dump_traceback_later(args.timeout, exit=True)  # a hung decoder or worker must not hang the run
    name = args.results_name or "data_throughput" + ("_quick" if args.quick else "")
    info = machine_info("cpu", packages=("av", "torchcodec", "webdataset"))
    notes: list[str] = []
    try:
        from inti_adapters.data import (
            DataConfig,
            build_dataloader,  # noqa: F401  (what the timed runs use)
            open_video,
            sample_indices,
            write_shards,
        )
        from inti_adapters.data.transforms import train_transform
    except ImportError as exc:
        msg = (f"inti_adapters.data is not available ({exc}); this benchmark needs build_dataloader(DataConfig(...), "
               "train=True) and write_shards, so it could not be run")
        print(msg, file=sys.stderr)
        write_results(name, "Data pipeline throughput", [("Status", msg)], info=info)
        return 1

    decoders = []
    for d in (x.strip() for x in args.decoders.split(",")):
        if d == "torchcodec" and importlib.util.find_spec("torchcodec") is None:
            notes.append("torchcodec is not installed: its rows are missing (pip install torchcodec to compare)")
        elif d in ("pyav", "torchcodec"):
            decoders.append(d)
        else:
            notes.append(f"unknown decoder {d!r} skipped")
    modes = [m.strip() for m in args.sampling.split(",")]
    height = args.short_side
    width = int(round(args.short_side * args.aspect / 2)) * 2

    with tempfile.TemporaryDirectory(prefix="inti_data_bench_") as tmp:
        tmp_path = Path(tmp)
        log(f"writing {args.videos} synthetic {width}x{height} videos of {args.seconds:g} s at {args.fps} fps")
        write_videos(tmp_path / "videos", args.videos, args.seconds, args.fps, height, width)
        summary = write_shards(source=str(tmp_path / "videos"), output=str(tmp_path / "shards"),
                               samples_per_shard=max(1, args.videos // max(2, args.workers)), progress=False)
        shard_bytes = sum(Path(s).stat().st_size for s in summary.shards)
        samples = _shard_samples(summary.shards)
        setup = (f"{args.videos} synthetic videos, {width}x{height} (short side {height}), {args.seconds:g} s at "
                 f"{args.fps} fps = {int(round(args.seconds * args.fps))} frames, H.264 (libx264 crf 23, yuv420p), "
                 f"{len(summary.shards)} shards, {shard_bytes / len(samples) / 1e3:.0f} kB per video. Training clips: "
                 f"{args.frames} frames, random resized crop to {args.crop}^2 (short side resized to "
                 f"{round(args.crop * 256 / 224)} first), uint8 (3, T, H, W). 'dense' takes frames 2 apart "
                 "from a random start, 'uniform' one random frame per segment of the whole video. "
                 f"{args.clips} clips per configuration and round, {args.rounds} rounds round-robin over the "
                 "configurations after one warm-up round; medians.")

        def config(decoder: str, mode: str, workers: int) -> DataConfig:
            # resampled shards: an epoch of any length from a few videos, long enough for one timed run
            epoch = 2 * (args.clips + 2 + PREFETCH) * max(1, workers)
            return DataConfig(train_shards=summary.shards, num_frames=args.frames, sampling=mode, crop_size=args.crop,
                              batch_size=1, num_workers=workers, decoder=decoder, shuffle_buffer=0, seed=0,
                              resampled=True, train_samples=epoch)

        # Only one configuration runs at a time, round-robin over the configurations in every round.
        # The in-process pipeline runs in a helper process forked before anything is decoded here:
        # a process that has decoded with PyAV holds a swscale context with worker threads, and a child
        # forked from it hangs in its first sws_scale (inti_adapters.data.decode caches that context per
        # process), which would hang the DataLoader workers forked later.
        configs: dict[str, tuple[str, str, str, int]] = {}
        for decoder, mode in itertools.product(decoders, modes):
            configs[f"{decoder}/{mode}/in-process"] = (decoder, mode, "in process (one worker's work)", 0)
            for w in range(1, args.workers + 1):
                configs[f"{decoder}/{mode}/{w}-workers"] = (decoder, mode, f"DataLoader, {w} worker"
                                                            + ("s" if w > 1 else ""), w)
        timings: dict[str, list[float]] = {k: [] for k in configs}
        names = list(configs)
        with multiprocessing.get_context("fork").Pool(1) as helper:
            for r in range(args.rounds + 1):  # round 0 is the warm-up
                for key in names[r % len(names):] + names[:r % len(names)]:
                    decoder, mode, _, workers = configs[key]
                    cfg = config(decoder, mode, workers)
                    clips = args.clips * max(1, workers)
                    if workers:
                        sec = time_dataloader(cfg, clips, epoch=r)
                    else:
                        sec = helper.apply(time_in_process, (cfg, clips, r))
                    if r:
                        timings[key].append(sec)
                log(("warm-up" if r == 0 else f"round {r}/{args.rounds}") + " done" + (": " + ", ".join(
                    f"{k} {args.clips * max(1, configs[k][3]) / timings[k][-1]:.1f} clips/s" for k in names)
                    if r else ""))

        # 3) where the time goes, per clip, in this process
        log("per-clip breakdown: decode vs transform")
        breakdown = {}
        torch.set_num_threads(1)  # as in a DataLoader worker
        for decoder, mode in itertools.product(decoders, modes):
            rng = np.random.default_rng(0)
            dec_t, tr_t = [], []
            for i in range(max(args.clips, len(samples))):
                data = samples[i % len(samples)]
                t0 = time.perf_counter()
                reader = open_video(data, decoder)
                idx = sample_indices(mode, reader.num_frames, args.frames, stride=2, rng=rng)
                frames = reader.get_frames(idx)
                t1 = time.perf_counter()
                train_transform(frames, crop_size=args.crop, short_side=round(args.crop * 256 / 224),
                                scale=(0.4, 1.0), ratio=(3 / 4, 4 / 3), hflip=False, rng=rng)
                t2 = time.perf_counter()
                dec_t.append(t1 - t0)
                tr_t.append(t2 - t1)
            breakdown[(decoder, mode)] = (median(dec_t), median(tr_t))

    headers = ["decoder", "sampling", "readers", "clips/s", "clips/s per worker", "spread"]
    rows = []
    for key, ts in timings.items():
        decoder, mode, readers, workers = configs[key]
        rate = args.clips * max(1, workers) / median(ts)
        rows.append([decoder, mode, readers, f"{rate:.2f}", f"{rate / max(1, workers):.2f}", f"±{100 * spread(ts):.0f}%"])
    table = markdown_table(headers, rows, align="lllrrr")
    brk = markdown_table(["decoder", "sampling", "decode ms/clip", "crop+resize ms/clip", "clips/s (sum)"],
                         [[d, m, f"{1e3 * a:.1f}", f"{1e3 * b:.1f}", f"{1 / (a + b):.2f}"]
                          for (d, m), (a, b) in breakdown.items()], align="llrrr")
    print(table)
    print()
    print(brk)
    sections = [
        ("Setup", setup),
        ("Clips per second", table + "\n\n'in process' runs the loader's pipeline for one worker slot in the main "
         "process (no worker start-up, no inter-process transfer): the per-worker rate. DataLoader rows include "
         "the transfer of the uint8 clips from the workers; their per-worker rate is the total divided by the "
         "number of workers (on a 2-core machine, 2 workers compete with the main process and other jobs)."),
        ("Per-clip breakdown (one thread, this process)", brk + "\n\n" + " ".join(
            f"{d}/{m}: decoding is {100 * a / (a + b):.0f}% of the clip's time." for (d, m), (a, b) in breakdown.items())
         + " Decoding covers opening the stream, decoding up to the last sampled frame and converting the "
         "sampled frames to RGB; 'uniform' spreads its frames over the whole video, 'dense' stops after the "
         "sampled span."),
        ("Notes", "\n".join(f"- {n}" for n in [*notes, *args.note]) or "- none"),
    ]
    path = write_results(name, "Data pipeline throughput (CPU)", sections, info=info)
    print(f"\nwrote {path}")
    faulthandler.cancel_dump_traceback_later()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
