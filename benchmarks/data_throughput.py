"""Data pipeline throughput against what a GPU consumes: training clips per second per CPU core.

Writes realistic videos (default 10 s at 25 fps, 340x256 like a Kinetics clip, H.264; or real
files with ``--video-dir``), packs them into video shards and into frame shards
(``store='frames'``: 32 JPEG frames per video at short side 256), then reads 16-frame 224^2
training clips (random resized crop + flip) through ``build_dataloader(..., train=True)``:

- ``in process``: one DataLoader worker's pipeline run in this process (``loader.iter_worker(0)``),
  i.e. the rate of one CPU core;
- ``DataLoader, W workers``: total clips/s with W worker processes.

Readers side by side: video shards decoded with PyAV, with torchcodec (when it loads), frame
shards decoded with ``torchvision.io.decode_jpeg`` on the CPU, and the same frame shards read over
HTTP from an nginx on 127.0.0.1 (started by the benchmark with its own configuration in a temporary
folder and stopped at the end; the row is left out, with a note, where ``nginx`` is not installed). Every configuration is timed in
several rounds, round-robin, after a warm-up round; medians. A second table turns
``count_gflops`` into the clips per second one H100 consumes in training (forward + backward =
3x the forward, 2 FLOPs per multiply-add, 40% of 989 TFLOP/s bf16) and the CPU cores per GPU
each reader needs.

    python benchmarks/data_throughput.py            # ~5 minutes on 2 busy cores
    python benchmarks/data_throughput.py --quick    # ~1 minute smoke run

Writes ``benchmarks/results/data_throughput[_quick].md``.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import log, machine_info, markdown_table, median, spread, write_results

H100_BF16_TFLOPS = 989.0
UTILISATION = 0.4
TARGET_PER_CORE, TARGET_RATIO, TARGET_SCALING, TARGET_HTTP = 60.0, 10.0, 1.7, 0.9
HTTP_READER = "frame shards over HTTP (nginx), CPU JPEG"
NGINX_CONF = """worker_processes 1;
daemon off;
{user}pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    sendfile on;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    server {{ listen 127.0.0.1:{port}; root {root}; location / {{ }} }}
}}
"""


@contextlib.contextmanager
def nginx(root: Path) -> Iterator[str | None]:
    """Serve ``root`` with nginx on 127.0.0.1 (a free port, its own config and temp folder): yields the base
    URL, or None where nginx is not installed. The server is stopped when the block ends."""
    binary = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
    if binary is None:
        yield None
        return
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="inti_nginx_") as tmp:
        conf = Path(tmp) / "nginx.conf"
        user = "user root;\n" if os.geteuid() == 0 else ""  # workers must read the (private) temp folder
        conf.write_text(NGINX_CONF.format(user=user, tmp=tmp, port=port, root=root))
        proc = subprocess.Popen([binary, "-c", str(conf), "-p", tmp], stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 10
            while True:
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"nginx did not start on 127.0.0.1:{port}: {proc.stderr.read().decode()[-500:]}"
                                       if proc.poll() is not None else "nginx did not answer within 10 s")
                time.sleep(0.05)
            yield f"http://127.0.0.1:{port}"
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            proc.stderr.close()
GPU_MODELS = [("ViT-B/16", "vit_base_patch16_clip_224", [4, 6]), ("ViT-L/14", "vit_large_patch14_clip_224", [9, 13])]


def synthetic_frames(num_frames: int, height: int, width: int, seed: int) -> np.ndarray:
    """Smooth moving content (a drifting colour gradient, two moving discs, texture), uint8 (T, H, W, 3)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    texture = rng.normal(0, 8, (height // 4 + 1, width // 4 + 1, 3)).repeat(4, 0).repeat(4, 1)[:height, :width]
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
        out[t] = np.clip(frame + rng.normal(0, 3, frame.shape), 0, 255).astype(np.uint8)
    return out


def write_videos(root: Path, args: argparse.Namespace) -> str:
    """Synthetic MP4s under ``root/<class>/`` (two classes); returns a description."""
    from inti_adapters.data import encode_video

    width = int(round(args.short_side * args.aspect / 2)) * 2
    frames = int(round(args.seconds * args.fps))
    for i in range(args.videos):
        path = root / f"class_{i % 2}" / f"video_{i:03d}.mp4"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode_video(synthetic_frames(frames, args.short_side, width, seed=i), fps=args.fps,
                                      crf=23, preset="veryfast"))
    return (f"{args.videos} synthetic videos, {width}x{args.short_side}, {args.seconds:g} s at {args.fps} fps = "
            f"{frames} frames, H.264 (libx264 crf 23, yuv420p)")


def time_clips(batches: Iterator[Any], untimed: int, clips: int) -> float:
    """Seconds to receive ``clips`` clips after ``untimed`` batches (start-up, prefetched batches)."""
    for _ in range(untimed):
        next(batches)
    start, taken = time.perf_counter(), 0
    while taken < clips:
        video, _ = next(batches)
        taken += video.shape[0]
    if video.is_cuda:  # GPU decoding queues its work: wait for it
        torch.cuda.synchronize(video.device)
    return time.perf_counter() - start


def time_reader(cfg: Any, clips: int, epoch: int) -> float:
    """One configuration: in this process (``num_workers == 0``) or through a DataLoader."""
    from inti_adapters.data import build_dataloader

    loader = build_dataloader(cfg, train=True, epoch=epoch)
    if cfg.num_workers == 0:
        return time_clips(loader.iter_worker(0), 1, clips)
    batches = iter(loader)
    try:
        return time_clips(batches, cfg.num_workers * 3, clips)  # start-up and prefetched batches not timed
    finally:
        del batches  # shuts the workers down before the next configuration runs


def readers(args: argparse.Namespace, video_shards: list[str], frame_shards: list[str],
            http_base: str | None = None) -> dict[str, tuple]:
    """``name -> (shards, decoder, clips per timing, device)``: video shards per decoder, then frame shards
    (local files; over HTTP from ``http_base`` when given, the shards' folder being the server's root)."""
    from inti_adapters.data.decode import torchcodec_available

    out = {"video shards, PyAV": (video_shards, "pyav", args.clips, "cpu")}
    if torchcodec_available():
        out["video shards, torchcodec"] = (video_shards, "torchcodec", args.clips, "cpu")
    out["frame shards, CPU JPEG"] = (frame_shards, "pyav", args.clips * args.frame_clip_factor, "cpu")
    if http_base is not None:
        urls = [f"{http_base}/{Path(s).name}" for s in frame_shards]
        out[HTTP_READER] = (urls, "pyav", args.clips * args.frame_clip_factor, "cpu")
    if torch.cuda.is_available():  # nvJPEG in the main process; the workers only read and choose boxes
        out["frame shards, GPU JPEG"] = (frame_shards, "pyav", args.clips * args.frame_clip_factor, "cuda")
    return out


def measure(args: argparse.Namespace, shards: dict[str, tuple]) -> dict[tuple[str, int], list[float]]:
    """Clips/s of every (reader, workers) configuration, round-robin over rounds (round 0: warm-up)."""
    from inti_adapters.data import DataConfig

    configs = [(name, w) for name in shards for w in [0, *range(1, args.workers + 1)]]
    rates: dict[tuple[str, int], list[float]] = {c: [] for c in configs}
    for r in range(args.rounds + 1):
        for name, workers in configs[r % len(configs):] + configs[:r % len(configs)]:
            paths, decoder, clips, device = shards[name]
            clips *= max(1, workers)
            cfg = DataConfig(train_shards=paths, num_frames=args.frames, sampling=args.sampling, crop_size=args.crop,
                             hflip=True, batch_size=4, num_workers=workers, decoder=decoder, shuffle_buffer=0,
                             decode_device=device,
                             seed=r, resampled=True, train_samples=4 * (clips + 16) * max(1, workers) * 2)
            seconds = time_reader(cfg, clips, epoch=r)
            if r:
                rates[name, workers].append(clips / seconds)
        log(("warm-up" if r == 0 else f"round {r}/{args.rounds}") + " done"
            + ("" if r == 0 else ": " + ", ".join(f"{n}/{w}w {v[-1]:.1f}" for (n, w), v in rates.items())))
    return rates


def breakdown(shards: dict[str, tuple], args: argparse.Namespace) -> list[list[str]]:
    """Median ms per clip of decoding (the sampled frames) and of the crop + resize, in one thread."""
    from inti_adapters.data import DataConfig, sample_indices
    from inti_adapters.data.stages import DecodeClip, ReaderState
    from inti_adapters.data.tario import iter_tar_samples
    from inti_adapters.data.transforms import to_cthw, train_transform

    rows = []
    torch.set_num_threads(1)
    for name, (paths, decoder, _, device) in shards.items():
        if device != "cpu" or name == HTTP_READER:
            continue
        cfg = DataConfig(num_frames=args.frames, crop_size=args.crop, decoder=decoder)
        stage = DecodeClip(cfg, ReaderState(0, 0, 0, 1, 1), train=True, decoder=decoder)
        samples = [s for p in paths for s in iter_tar_samples(p)]
        rng, dec, tr = np.random.default_rng(0), [], []
        for i in range(max(12, len(samples))):
            t0 = time.perf_counter()
            reader, _ = stage.open(samples[i % len(samples)])
            frames = reader.get_frames(sample_indices(args.sampling, reader.num_frames, args.frames, stride=2, rng=rng))
            t1 = time.perf_counter()
            to_cthw(train_transform(frames, crop_size=args.crop, short_side=round(args.crop * 256 / 224),
                                    scale=(0.4, 1.0), ratio=(3 / 4, 4 / 3), hflip=True, rng=rng))
            dec.append(t1 - t0)
            tr.append(time.perf_counter() - t1)
        a, b = median(dec), median(tr)
        rows.append([name, f"{1e3 * a:.1f}", f"{1e3 * b:.1f}", f"{1 / (a + b):.1f}", f"{100 * a / (a + b):.0f}%"])
    return rows


def gpu_rates(frames: int, crop: int) -> list[tuple[str, float, float]]:
    """``(model, forward GMACs, training clips/s per H100)`` from count_gflops on the meta device."""
    import timm

    import inti_adapters as ia

    out = []
    video = torch.empty(1, 3, frames, crop, crop, device="meta")
    for label, name, layers in GPU_MODELS:
        with torch.device("meta"):
            vit = timm.create_model(name, pretrained=False, num_classes=400)
        for variant, lay in (("naive", []), (f"InTI {layers}", layers)):
            model = ia.inject(vit, layers=lay)
            try:
                gmacs = float(ia.count_gflops(model, video))
            finally:
                model.unload()
            tflop_per_clip = gmacs * 2 * 3 / 1e3
            out.append((f"{label} {variant}", gmacs, UTILISATION * H100_BF16_TFLOPS / tflop_per_clip))
    return out


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--videos", type=int, default=None, help="synthetic videos to write (default 6; --quick 4)")
    p.add_argument("--video-dir", default=None, help="use the videos of this class-per-folder tree instead")
    p.add_argument("--seconds", type=float, default=None, help="length of each video (default 10; --quick 4)")
    p.add_argument("--fps", type=int, default=25)
    p.add_argument("--short-side", type=int, default=256, help="video height (short side) in pixels")
    p.add_argument("--aspect", type=float, default=340 / 256, help="width / height (default 340x256, as in Kinetics)")
    p.add_argument("--frames", type=int, default=16, help="frames per clip")
    p.add_argument("--crop", type=int, default=224, help="clip height and width")
    p.add_argument("--sampling", default="uniform", choices=["uniform", "dense"])
    p.add_argument("--frames-per-video", type=int, default=32, help="frames kept per video in the frame shards")
    p.add_argument("--clips", type=int, default=None, help="video-shard clips per timing (default 12; --quick 6)")
    p.add_argument("--frame-clip-factor", type=int, default=8, help="frame shards time this many times more clips")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default 3; --quick 2)")
    p.add_argument("--workers", type=int, default=None, help="largest DataLoader worker count (default min(2, cores))")
    p.add_argument("--quick", action="store_true", help="smoke run")
    p.add_argument("--timeout", type=float, default=3600, help="abort with a traceback after this many seconds")
    p.add_argument("--results-name", default=None, help="file name under results/ (default data_throughput[_quick])")
    p.add_argument("--results-dir", default=None, help="write the results file here instead of benchmarks/results/")
    p.add_argument("--no-http", action="store_true", help="leave out the frame shards read over HTTP from nginx")
    p.add_argument("--note", action="append", default=[], help="a line for the Notes section (repeatable)")
    args = p.parse_args(argv)
    args.videos = args.videos or (4 if args.quick else 6)
    args.seconds = args.seconds or (4.0 if args.quick else 10.0)
    args.clips = args.clips or (6 if args.quick else 12)
    args.rounds = args.rounds or (2 if args.quick else 3)
    args.workers = args.workers if args.workers is not None else min(2, os.cpu_count() or 1)
    return args


def make_shards(tmp: Path, args: argparse.Namespace) -> tuple[str, list[str], list[str]]:
    """Video shards and frame shards of the same videos; returns a description and both shard lists."""
    from inti_adapters.data import write_shards

    source = Path(args.video_dir) if args.video_dir else tmp / "videos"
    what = f"the videos under {source}" if args.video_dir else write_videos(source, args)
    per = max(1, args.videos // 2)
    video = write_shards(source=str(source), output=str(tmp / "video"), samples_per_shard=per, progress=False)
    t0 = time.perf_counter()
    frames = write_shards(source=str(tmp / "video"), output=str(tmp / "frames"), samples_per_shard=per,
                          store="frames", frames_per_video=args.frames_per_video, progress=False)
    convert = time.perf_counter() - t0
    setup = (f"{what}; video shards {video.bytes / video.written / 1e3:.0f} kB per video; frame shards (converted "
             f"from the video shards with `--store frames`, {args.frames_per_video} frames per video, short side "
             f"256, JPEG q90) {frames.bytes / frames.written / 1e3:.0f} kB per video, written at "
             f"{frames.written / convert:.2f} videos/s on one core. Training clips: {args.frames} frames "
             f"({args.sampling} sampling), random resized crop to {args.crop}^2 + horizontal flip, uint8 "
             f"(3, T, H, W), batches of 4. Medians of {args.rounds} rounds round-robin over the configurations "
             "after a warm-up round.")
    return setup, video.shards, frames.shards


def report(args, rates, rows_breakdown, gpu) -> tuple[list[tuple[str, str]], list[str]]:
    """The result sections (tables + targets) and the lines printed to the console."""
    per_core = {name: median(v) for (name, w), v in rates.items() if w == 0}
    rows = [[name, "in process (one core)" if w == 0 else f"DataLoader, {w} worker" + ("s" if w > 1 else ""),
             f"{median(v):.1f}", f"{median(v) / max(1, w):.1f}", f"±{100 * spread(v):.0f}%"] for (name, w), v in rates.items()]
    clips = markdown_table(["reader", "readers", "clips/s", "clips/s per process", "spread"], rows, align="llrrr")
    names = list(per_core)
    gpu_rows = [[m, f"{g:.0f}", f"{c:.0f}", *[f"{c / per_core[n]:.0f}" for n in names]] for m, g, c in gpu]
    gpu_table = markdown_table(["model (16x224, training)", "GMACs fwd", "clips/s per H100",
                                *[f"cores/GPU: {n}" for n in names]], gpu_rows, align="lrr" + "r" * len(names))
    frames, video = per_core["frame shards, CPU JPEG"], per_core["video shards, PyAV"]
    scaling = {n: median(rates[n, args.workers]) / median(rates[n, 1]) for n in names if args.workers >= 2}
    http = per_core.get(HTTP_READER)
    targets = [
        f"- frame shards >= {TARGET_PER_CORE:.0f} training clips/s per core: {frames:.1f} -> "
        f"**{'met' if frames >= TARGET_PER_CORE else 'missed'}**",
        f"- frame shards >= {TARGET_RATIO:.0f}x the video-shard reader (PyAV) in the same run: {frames / video:.1f}x "
        f"-> **{'met' if frames / video >= TARGET_RATIO else 'missed'}**",
        *[f"- {n}: DataLoader {args.workers} workers / 1 worker = {s:.2f}x (target >= {TARGET_SCALING}) -> "
          f"**{'met' if s >= TARGET_SCALING else 'missed'}**" for n, s in scaling.items()],
        *([f"- frame shards over HTTP (nginx on this machine) >= {TARGET_HTTP:.0%} of local files per core: "
           f"{http:.1f} vs {frames:.1f} = {http / frames:.0%} -> **{'met' if http >= TARGET_HTTP * frames else 'missed'}**"]
          if http is not None else []),
    ]
    brk = markdown_table(["reader", "decode ms/clip", "crop+resize ms/clip", "clips/s (sum)", "decode share"],
                         rows_breakdown, align="lrrrr")
    sections = [
        ("Clips per second", clips + "\n\n'in process' runs one DataLoader worker's pipeline in this process: the "
         "rate of one CPU core. DataLoader rows add worker start-up (not timed), inter-process transfer and the "
         "main process's share of the cores."),
        ("What one GPU consumes", gpu_table + f"\n\nclips/s per H100 = {UTILISATION:.0%} x {H100_BF16_TFLOPS:.0f} "
         "TFLOP/s (bf16 dense) / (GMACs x 2 FLOPs x 3 for forward + backward); cores/GPU = that rate / the "
         "reader's clips/s per core (in process). A node has 8-16 CPU cores per GPU."),
        ("Targets", "\n".join(targets)),
        ("Per-clip breakdown (one thread)", brk),
    ]
    return sections, [clips, gpu_table, *targets]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    faulthandler.dump_traceback_later(args.timeout, exit=True)  # a hung decoder or worker must not hang the run
    name = args.results_name or "data_throughput" + ("_quick" if args.quick else "")
    info = machine_info("cpu", packages=("av", "torchcodec", "torchvision", "webdataset"))
    with tempfile.TemporaryDirectory(prefix="inti_data_bench_") as tmp:
        log("writing videos, video shards and frame shards")
        setup, video_shards, frame_shards = make_shards(Path(tmp), args)
        with nginx(Path(tmp) / "frames") if not args.no_http else contextlib.nullcontext() as http_base:
            shards = readers(args, video_shards, frame_shards, http_base)
            log(f"timing {', '.join(shards)} with 0..{args.workers} workers")
            rates = measure(args, shards)
        log("per-clip breakdown")
        rows_breakdown = breakdown(shards, args)
    log("GPU consumption from count_gflops")
    gpu = gpu_rates(args.frames, args.crop)
    sections, printed = report(args, rates, rows_breakdown, gpu)
    print("\n\n".join(printed))
    notes = [*args.note]
    if "video shards, torchcodec" not in shards:
        notes.append("torchcodec is not installed or cannot load FFmpeg's libraries here: its rows are missing")
    if HTTP_READER not in shards and not args.no_http:
        notes.append("nginx is not installed here: the HTTP row is missing")
    path = write_results(name, "Data pipeline throughput (CPU) vs what a GPU consumes",
                         [("Setup", setup), *sections, ("Notes", "\n".join(f"- {n}" for n in notes) or "- none")],
                         info=info, results_dir=args.results_dir)
    print(f"\nwrote {path}")
    faulthandler.cancel_dump_traceback_later()
    return 0


if __name__ == "__main__":
    sys.exit(main())
