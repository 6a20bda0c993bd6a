"""Spatial transforms on uint8 clips ``(T, 3, H, W)``: the same crop for every frame of a clip.

Training: random resized crop (area ``scale``, aspect ``ratio``, measured on the frame after its
short side is resized to ``short_side``) and an optional horizontal flip. Testing: resize the
short side, then 1 centre crop or 3 crops along the long side. Outputs stay uint8; one resize
per clip (the crop is mapped back to the original frame, so training never resizes twice).

Layout: clips may come planar (``contiguous()``) or channels-last (a ``(T, 3, H, W)`` view of
``(T, H, W, 3)`` pixels, what the decoders give). The uint8 resize is 2-3x faster on channels-last
input, so nothing here converts to planar; :func:`to_cthw` makes the final ``(3, T, H, W)``
tensor in one cheap copy.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def _resize(video: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bilinear (antialiased) resize of a uint8 ``(T, 3, H, W)`` clip, computed in uint8 (fast on CPU)."""
    if video.shape[-2:] == (height, width):
        return video
    return F.interpolate(video, size=(height, width), mode="bilinear", align_corners=False, antialias=True)


def to_cthw(video: torch.Tensor) -> torch.Tensor:
    """A contiguous ``(3, T, H, W)`` copy of a ``(T, 3, H, W)`` clip of either layout.

    For channels-last clips numpy's transpose copy is ~4x faster than torch's on uint8.
    """
    if video.dim() == 4 and video.stride(1) == 1 and video.shape[1] > 1 and not video.is_cuda:
        hwc = video.permute(0, 2, 3, 1)
        return torch.from_numpy(np.ascontiguousarray(hwc.numpy().transpose(3, 0, 1, 2)))
    return video.permute(1, 0, 2, 3).contiguous()


def short_side_size(height: int, width: int, short_side: int) -> tuple[int, int]:
    """``(h, w)`` after resizing so that ``min(h, w) == short_side`` (aspect kept)."""
    if height <= width:
        return short_side, max(short_side, int(round(width * short_side / height)))
    return max(short_side, int(round(height * short_side / width))), short_side


def resize_short_side(video: torch.Tensor, short_side: int) -> torch.Tensor:
    """Resize a uint8 ``(T, 3, H, W)`` clip so its short side is ``short_side``."""
    h, w = short_side_size(video.shape[-2], video.shape[-1], short_side)
    return _resize(video, h, w)


def random_resized_crop_box(
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    rng: np.random.Generator,
    attempts: int = 10,
) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` of a random crop with area fraction in ``scale`` and aspect in ``ratio``.

    After ``attempts`` misses it falls back to the largest centred crop with an aspect inside ``ratio``.
    """
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(attempts):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def train_crop_box(
    height: int,
    width: int,
    *,
    short_side: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    hflip: bool,
    rng: np.random.Generator,
) -> tuple[tuple[int, int, int, int], bool]:
    """The random resized crop of a ``height x width`` frame: ``((y0, x0, y1, x1), flip)`` in its pixels.

    The crop is drawn on the frame resized to ``short_side`` (so that ``scale`` means the same for
    every source size) and mapped back to the frame's own pixels.
    """
    rh, rw = short_side_size(height, width, short_side)
    top, left, h, w = random_resized_crop_box(rh, rw, scale, ratio, rng)
    sy, sx = height / rh, width / rw
    y0, x0 = int(round(top * sy)), int(round(left * sx))
    y1 = min(height, max(y0 + 1, int(round((top + h) * sy))))
    x1 = min(width, max(x0 + 1, int(round((left + w) * sx))))
    flip = bool(hflip and rng.random() < 0.5)
    return (y0, x0, y1, x1), flip


def train_transform(
    video: torch.Tensor,
    *,
    crop_size: int,
    short_side: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    hflip: bool,
    rng: np.random.Generator,
) -> torch.Tensor:
    """Random resized crop (+ optional flip) of a uint8 ``(T, 3, H, W)`` clip -> ``(T, 3, crop, crop)``."""
    (y0, x0, y1, x1), flip = train_crop_box(video.shape[-2], video.shape[-1], short_side=short_side, scale=scale,
                                            ratio=ratio, hflip=hflip, rng=rng)
    out = _resize(video[..., y0:y1, x0:x1], crop_size, crop_size)
    return out.flip(-1) if flip else out


def test_view_boxes(height: int, width: int, *, crop_size: int, short_side: int,
                    num_crops: int) -> list[tuple[int, int, int, int]]:
    """The test crops of :func:`test_views` as boxes ``(y0, x0, y1, x1)`` in the frame's own pixels.

    Cropping such a box and resizing it to ``crop_size`` is what the GPU decoder does; it equals
    resize-then-crop up to the filter's behaviour at the box edges.
    """
    rh, rw = short_side_size(height, width, short_side)
    if rh < crop_size or rw < crop_size:
        raise ValueError(f"a {rh}x{rw} frame is smaller than crop_size={crop_size}")
    top, left = (rh - crop_size) // 2, (rw - crop_size) // 2
    if num_crops == 1:
        corners = [(top, left)]
    elif rw >= rh:
        corners = [(top, x) for x in (0, left, rw - crop_size)]
    else:
        corners = [(y, left) for y in (0, top, rh - crop_size)]
    sy, sx = height / rh, width / rw
    return [(int(round(y * sy)), int(round(x * sx)), max(int(round(y * sy)) + 1, min(height, int(round((y + crop_size) * sy)))),
             max(int(round(x * sx)) + 1, min(width, int(round((x + crop_size) * sx))))) for y, x in corners]


test_view_boxes.__test__ = False  # type: ignore[attr-defined]  # not a pytest test when imported


def spatial_crops(video: torch.Tensor, crop_size: int, num_crops: int) -> list[torch.Tensor]:
    """1 centre crop, or 3 crops (start, centre, end) along the long side, of a ``(T, 3, H, W)`` clip."""
    height, width = video.shape[-2:]
    if height < crop_size or width < crop_size:
        raise ValueError(f"a {height}x{width} frame is smaller than crop_size={crop_size}")
    top, left = (height - crop_size) // 2, (width - crop_size) // 2
    if num_crops == 1:
        return [video[..., top:top + crop_size, left:left + crop_size]]
    if num_crops != 3:
        raise ValueError(f"num_crops must be 1 or 3, got {num_crops}")
    if width >= height:
        lefts = [0, left, width - crop_size]
        return [video[..., top:top + crop_size, x:x + crop_size] for x in lefts]
    tops = [0, top, height - crop_size]
    return [video[..., y:y + crop_size, left:left + crop_size] for y in tops]


def test_views(video: torch.Tensor, *, crop_size: int, short_side: int, num_crops: int) -> list[torch.Tensor]:
    """Resize the short side of a ``(T, 3, H, W)`` clip, then cut its test crops."""
    return spatial_crops(resize_short_side(video, short_side), crop_size, num_crops)


test_views.__test__ = False  # type: ignore[attr-defined]  # not a pytest test when imported
