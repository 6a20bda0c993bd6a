"""Part 4 of the GPU suite: how fast frames can be decoded, on the device and on one CPU core.

- JPEG frames (256-pixel short side, smooth content with light sensor noise, quality 90, made in
  memory with ``torchvision.io.encode_jpeg``) decoded in batches on the device with
  ``torchvision.io.decode_jpeg(list, device='cuda')`` (nvjpeg), and one by one on one CPU thread;
- the library's CPU video reader (PyAV H.264 -> 16 x 224^2 training clips, one worker's pipeline
  in this process), the figure behind the data rate of the design notes.

Figures are frames/s and the clips/s they amount to (``frames`` per clip), next to the training
clips/s of part 1, to show how many cores (or what share of the device) keep one GPU fed.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from _common import log, markdown_table, synchronize, torch_threads
from _gpu_common import Settings, fmt, seconds_left


def smooth_frames(count: int, height: int, width: int, seed: int = 0) -> list[torch.Tensor]:
    """``count`` uint8 (3, H, W) images: smooth colour fields with light per-pixel noise (camera-like)."""
    gen = torch.Generator().manual_seed(seed)
    frames = []
    for _ in range(count):
        low = torch.rand(1, 3, height // 24 + 2, width // 24 + 2, generator=gen)
        img = F.interpolate(low, size=(height, width), mode="bicubic", align_corners=False)
        img = img + 0.03 * torch.randn(1, 3, height, width, generator=gen)
        frames.append((img.clamp(0, 1) * 255).round().to(torch.uint8)[0])
    return frames


def encode_frames(frames: list[torch.Tensor], quality: int) -> list[torch.Tensor]:
    from torchvision.io import encode_jpeg

    return [encode_jpeg(f, quality=quality) for f in frames]


def cpu_decode_rate(encoded: list[torch.Tensor], min_s: float) -> float:
    """Frames per second decoded one by one on one CPU thread (every frame at least once)."""
    from torchvision.io import decode_jpeg

    with torch_threads(1):
        n, start = 0, time.perf_counter()
        while n < len(encoded) or time.perf_counter() - start < min_s:
            decode_jpeg(encoded[n % len(encoded)])
            n += 1
        return n / (time.perf_counter() - start)


def batch_decode_rate(encoded: list[torch.Tensor], device: torch.device, batch: int, min_s: float) -> float:
    """Frames per second decoded in batches of ``batch`` by ``decode_jpeg(list, device=...)`` (after a warm-up)."""
    from torchvision.io import decode_jpeg

    frames = [encoded[i % len(encoded)] for i in range(batch)]
    decode_jpeg(frames, device=device)  # creates the nvjpeg handles
    synchronize(device)
    calls, start = 0, time.perf_counter()
    while calls < 3 or time.perf_counter() - start < min_s:
        decode_jpeg(frames, device=device)
        synchronize(device)
        calls += 1
    return calls * batch / (time.perf_counter() - start)


def reader_rate(d: dict[str, Any], tmp: Path) -> float:
    """Training clips per second of one worker of the library's video reader (PyAV, in this process)."""
    from data_throughput import time_in_process, write_videos

    from inti_adapters.data import DataConfig, write_shards

    width = int(round(d["video_short_side"] * 16 / 9 / 2)) * 2
    write_videos(tmp / "videos", d["videos"], d["video_seconds"], 25, d["video_short_side"], width)
    summary = write_shards(source=str(tmp / "videos"), output=str(tmp / "shards"), samples_per_shard=d["videos"],
                           progress=False)
    cfg = DataConfig(train_shards=summary.shards, num_frames=d["clip_frames"], sampling="uniform",
                     crop_size=d["crop"], batch_size=1, num_workers=0, decoder="pyav", shuffle_buffer=0, seed=0,
                     resampled=True, train_samples=4 * d["reader_clips"])
    with torch_threads(1):
        return d["reader_clips"] / time_in_process(cfg, d["reader_clips"], 0)


def library_decode_note() -> str:
    """Whether ``inti_adapters.data`` has its own device decode path (frame shards) yet."""
    # HOOK(frame shards): when the reader decodes JPEG frame shards on the device (DataConfig.decode_device
    # = "cuda"), time build_dataloader(DataConfig(..., decode_device="cuda")) here and add its clips/s as a
    # row of the table next to the torchvision figures; until then this part measures torchvision directly.
    try:
        from inti_adapters.data import DataConfig
    except ImportError as e:
        return f"inti_adapters.data is not importable ({e})"
    if "decode_device" in {f.name for f in dataclasses.fields(DataConfig)}:
        return ("inti_adapters.data.DataConfig has decode_device: the library's own device decode path exists, "
                "but this suite does not time it yet (HOOK in benchmarks/_gpu_data.py)")
    return ("inti_adapters.data has no device decode path yet (no DataConfig.decode_device); the device rows "
            "use torchvision.io.decode_jpeg directly")


def run_data(s: Settings, deadline: float, train_clips_per_s: float | None) -> tuple[str, dict[str, Any], list[str]]:
    """``(markdown body, figures, problems)``; each measurement is skipped once the deadline has passed."""
    d, T = s.data, s.data["clip_frames"]
    warnings.filterwarnings("ignore", message=".*decod.*deprecated.*")
    warnings.filterwarnings("ignore", category=UserWarning, module="torchvision.*")
    frames = smooth_frames(d["jpegs"], d["height"], d["width"])
    encoded = encode_frames(frames, d["quality"])
    kb = sum(e.numel() for e in encoded) / len(encoded) / 1e3
    where = "GPU (nvjpeg)" if s.device.type == "cuda" else "CPU (smoke: not a GPU figure)"
    rows, figures, problems = [], {}, []
    log(f"data: {len(encoded)} JPEGs of {d['width']}x{d['height']}, {kb:.0f} kB each")
    figures["cpu_jpeg_fps"] = cpu_decode_rate(encoded, d["min_s"])
    rows.append(["JPEG decode, torchvision, one by one", "CPU, 1 thread", f"{figures['cpu_jpeg_fps']:.0f}",
                 f"{figures['cpu_jpeg_fps'] / T:.1f} per core"])
    for batch in d["batches"]:
        if seconds_left(deadline) <= 0:
            problems.append(f"device decode at batch {batch} skipped: time share spent")
            continue
        fps = batch_decode_rate(encoded, s.device, batch, d["min_s"])
        figures[f"device_jpeg_fps_{batch}"] = fps
        rows.append([f"JPEG decode, decode_jpeg(list of {batch}, device={s.device.type!r})", where,
                     f"{fps:.0f}", f"{fps / T:.1f}"])
    if seconds_left(deadline) > 0:
        try:
            with tempfile.TemporaryDirectory(prefix="inti_gpu_suite_data_") as tmp:
                figures["reader_clips_s"] = reader_rate(d, Path(tmp))
            rows.append([f"video reader (PyAV H.264 {d['video_short_side']}p -> {d['clip_frames']} x "
                         f"{d['crop']}^2 clips, uniform)", "CPU, 1 worker", "-",
                         f"{figures['reader_clips_s']:.2f} per core"])
        except Exception as e:  # noqa: BLE001 - a missing PyAV / encoder must not hide the other rows
            problems.append(f"video reader not measured: {type(e).__name__}: {e}")
    else:
        problems.append("video reader skipped: time share spent")
    body = (f"{len(encoded)} distinct JPEG frames, {d['width']}x{d['height']} (short side {d['height']}), quality "
            f"{d['quality']}, {kb:.0f} kB per frame; clips of {T} frames.\n\n"
            + markdown_table(["path", "where", "frames/s", "clips/s"], [[str(c) for c in r] for r in rows], "llrr"))
    body += "\n\n" + feeding_text(figures, train_clips_per_s, T, d["batches"]) + "\n\n" + library_decode_note()
    return body, figures, problems


def feeding_text(figures: dict[str, Any], train_clips_per_s: float | None, T: int, batches: list[int]) -> str:
    """What it takes to feed the training throughput of part 1."""
    if not train_clips_per_s:
        return "Training clips/s of part 1 not available: no feeding estimate."
    need = train_clips_per_s * T
    parts = [f"InTI training (part 1, eager) consumes {train_clips_per_s:.0f} clips/s = {need:.0f} frames/s: "
             f"{need / figures['cpu_jpeg_fps']:.1f} CPU cores of JPEG decoding"]
    if figures.get("reader_clips_s"):
        parts.append(f"{train_clips_per_s / figures['reader_clips_s']:.0f} cores of H.264 decoding")
    best = max((figures.get(f"device_jpeg_fps_{b}", 0.0) for b in batches), default=0.0)
    if best:
        parts.append(f"or {100 * need / best:.0f}% of the device decoder's best rate ({fmt(best, '.0f')} frames/s)")
    return ", ".join(parts) + "."
