"""Decoding frame shards on the GPU (``DataConfig.decode_device='cuda'``).

The DataLoader workers do the cheap part: they read the shards, choose the frames and the crop
boxes with the same random draws as CPU decoding, and pass the *encoded* JPEGs with those boxes
(:class:`EncodedClip`, collated into one :class:`EncodedBatch` whose bytes are a single tensor).
The main process then decodes every frame of the batch in one call of
``torchvision.io.decode_jpeg(..., device='cuda')`` (nvJPEG), crops, resizes (bilinear,
antialiased) and flips on the device, and hands on uint8 ``(B, 3, T, H, W)`` batches (evaluation:
``(B, V, 3, T, H, W)``) that already live on the GPU. :func:`decode_batch` runs on any device;
the tests run it on CPU tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .frames import decode_jpegs

Box = tuple[int, int, int, int, bool]  # (y0, x0, y1, x1, flip) in the stored frame's pixels


@dataclass
class EncodedClip:
    """One sample's clip (training) or views (evaluation), frames still JPEG.

    ``clips[c]`` holds, for temporal clip ``c``, the index into ``jpegs`` of each of its ``T``
    frames; view ``v`` crops ``boxes[v]`` from temporal clip ``view_clip[v]``.
    """

    jpegs: list[bytes]
    clips: list[np.ndarray]
    boxes: list[Box]
    view_clip: list[int]
    size: int
    multi_view: bool


@dataclass
class EncodedBatch:
    """A batch whose clips are decoded on the device; ``decoded`` holds clips already decoded (videos)."""

    data: torch.Tensor  # uint8, every JPEG of the batch back to back
    offsets: torch.Tensor  # int64 (n + 1,)
    items: list[EncodedClip | None]  # their ``jpegs`` travel in ``data``: item i owns ``counts[i]`` of them
    counts: list[int]
    decoded: dict[int, torch.Tensor]
    labels: torch.Tensor

    def pin_memory(self) -> EncodedBatch:
        """What ``DataLoader(pin_memory=True)`` calls."""
        return EncodedBatch(self.data.pin_memory(), self.offsets, self.items, self.counts,
                            {i: t.pin_memory() for i, t in self.decoded.items()}, self.labels.pin_memory())


def collate_encoded(items: Sequence[tuple[EncodedClip | torch.Tensor, int]]) -> EncodedBatch:
    """Pack a batch of encoded clips (and clips decoded on the CPU) into one :class:`EncodedBatch`."""
    blobs: list[bytes] = []
    encoded: list[EncodedClip | None] = []
    counts: list[int] = []
    decoded: dict[int, torch.Tensor] = {}
    for i, (clip, _) in enumerate(items):
        if isinstance(clip, torch.Tensor):
            decoded[i] = clip
            encoded.append(None)
            counts.append(0)
        else:
            blobs += clip.jpegs
            counts.append(len(clip.jpegs))
            encoded.append(EncodedClip([], clip.clips, clip.boxes, clip.view_clip, clip.size, clip.multi_view))
    sizes = torch.tensor([0] + [len(b) for b in blobs], dtype=torch.int64)
    data = torch.frombuffer(bytearray(b"".join(blobs)), dtype=torch.uint8) if blobs else torch.empty(0, dtype=torch.uint8)
    labels = torch.tensor([label for _, label in items], dtype=torch.int64)
    return EncodedBatch(data, sizes.cumsum(0), encoded, counts, decoded, labels)


def _views(frames: torch.Tensor, clip: EncodedClip) -> torch.Tensor:
    """Crop, resize and flip the views of one sample from its decoded frames ``(U, 3, h, w)``."""
    views = []
    for (y0, x0, y1, x1, flip), c in zip(clip.boxes, clip.view_clip, strict=True):
        idx = torch.as_tensor(clip.clips[c], device=frames.device)
        crop = frames.index_select(0, idx)[..., y0:y1, x0:x1].float()
        out = F.interpolate(crop, size=(clip.size, clip.size), mode="bilinear", align_corners=False, antialias=True)
        if flip:
            out = out.flip(-1)
        views.append(out.round_().clamp_(0, 255).to(torch.uint8).permute(1, 0, 2, 3))
    return torch.stack(views) if clip.multi_view else views[0]


def decode_batch(batch: EncodedBatch, device: str | torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode, crop and resize a batch on ``device``: uint8 ``(B, 3, T, H, W)`` / ``(B, V, 3, T, H, W)``, labels.

    Raises:
        VideoDecodeError: a JPEG does not decode (the workers already checked every CRC).
    """
    device = torch.device(device)
    offsets = batch.offsets.tolist()
    blobs = [batch.data[a:b] for a, b in zip(offsets[:-1], offsets[1:], strict=True)]  # views, no copy
    images = decode_jpegs_by_sample(blobs, batch.counts, device)
    out = []
    for i, clip in enumerate(batch.items):
        if clip is None:
            out.append(batch.decoded[i].to(device, non_blocking=True))
        else:
            out.append(_views(images[i], clip))
    return torch.stack(out), batch.labels.to(device, non_blocking=True)


def decode_jpegs_by_sample(blobs: list[torch.Tensor], counts: Sequence[int], device: torch.device) -> dict[int, torch.Tensor]:
    """All JPEGs of a batch decoded in one call, regrouped per sample (``counts[i]`` each) as ``(U, 3, h, w)``."""
    images = decode_jpegs(blobs, device=device, what=f"a batch of {len(blobs)} frames", same_size=False) if blobs else []
    grouped, start = {}, 0
    for i, n in enumerate(counts):
        if n:
            grouped[i] = torch.stack(images[start:start + n])
            start += n
    return grouped
