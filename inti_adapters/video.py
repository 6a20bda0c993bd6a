"""Small helpers for video tensors on the device."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

MEAN_STD = {
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "inception": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}


def normalize_video(
    video: torch.Tensor,
    mean_std: str | tuple[Sequence[float], Sequence[float]] = "clip",
    *,
    layout: str = "NCTHW",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """uint8 ``(B, 3, T, H, W)`` (or NTCHW) clips -> float, scaled to [0, 1] and normalised.

    ``mean_std`` is ``'clip'``, ``'imagenet'``, ``'inception'`` or an explicit ``(mean, std)``.
    """
    if isinstance(mean_std, str):
        if mean_std not in MEAN_STD:
            raise ValueError(f"unknown mean/std preset {mean_std!r}; choose from {sorted(MEAN_STD)} or pass (mean, std)")
        mean_std = MEAN_STD[mean_std]
    if layout not in ("NCTHW", "NTCHW"):
        raise ValueError(f"layout must be 'NCTHW' or 'NTCHW', got {layout!r}")
    if video.dim() != 5:
        raise ValueError(f"expected a 5-D video, got shape {tuple(video.shape)}")
    cdim = 1 if layout == "NCTHW" else 2
    mean_values, std_values = _check_mean_std(mean_std, video.shape[cdim], layout)
    shape = [1] * 5
    shape[cdim] = -1
    mean = torch.tensor(mean_values, device=video.device, dtype=dtype).view(shape)
    std = torch.tensor(std_values, device=video.device, dtype=dtype).view(shape)
    x = video.to(dtype)
    if not video.is_floating_point():
        x = x / 255.0
    return (x - mean) / std


def _check_mean_std(mean_std: Any, channels: int, layout: str) -> tuple[list[float], list[float]]:
    """One finite mean and one finite positive std per channel, else a ValueError saying what was given."""
    try:
        mean, std = ([float(v) for v in values] for values in mean_std)
    except (TypeError, ValueError):
        raise ValueError(f"mean_std must be a preset name ({sorted(MEAN_STD)}) or a pair (mean, std) of "
                         f"{channels} numbers each, got {mean_std!r}") from None
    for name, values in (("mean", mean), ("std", std)):
        if len(values) != channels:
            raise ValueError(f"{name} has {len(values)} values {values} but the video has {channels} channels "
                             f"(dimension {1 if layout == 'NCTHW' else 2} of a {layout} video): give one per channel")
    if not all(math.isfinite(v) for v in mean + std) or not all(v > 0 for v in std):
        raise ValueError(f"mean must be finite and std finite and > 0 (it divides the frames), got mean {mean}, "
                         f"std {std}")
    return mean, std


def video_frames(video: Any, layout: str, in_chans: int = 3,
                 weight_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, int, int]:
    """Check a model input and flatten it to frames: ``((B*T, C, H, W), B, T)``.

    Args:
        video: ``(B, C, T, H, W)`` (``layout='NCTHW'``) or ``(B, T, C, H, W)`` (``'NTCHW'``), float.
        layout: ``'NCTHW'`` or ``'NTCHW'``.
        in_chans: Channels the model takes.
        weight_dtype: The model's floating dtype: another float dtype is refused with what to do
            (under autocast, float32 and the autocast dtype are accepted, torch casts them).
    """
    if layout not in ("NCTHW", "NTCHW"):
        raise ValueError(f"layout must be 'NCTHW' or 'NTCHW', got {layout!r}")
    expected = "(B, 3, T, H, W)" if layout == "NCTHW" else "(B, T, 3, H, W)"
    if not isinstance(video, torch.Tensor):
        raise TypeError(f"expected a video tensor of shape {expected}, got {type(video).__name__}")
    if video.dim() != 5:
        hint = " For a single image use video.unsqueeze(2) (one frame)." if video.dim() == 4 else ""
        raise ValueError(f"expected a 5-D video of shape {expected} (layout {layout}), got a {video.dim()}-D tensor "
                         f"of shape {tuple(video.shape)}.{hint}")
    if not video.is_floating_point():
        raise TypeError(f"expected a float video (normalised frames), got dtype {video.dtype}. Convert uint8 clips "
                        "on the device with inti_adapters.normalize_video(video, 'clip') (or your own mean/std).")
    _check_dtype(video, weight_dtype)
    b = video.shape[0]
    c, t = (video.shape[1], video.shape[2]) if layout == "NCTHW" else (video.shape[2], video.shape[1])
    if c != in_chans:
        other = "NTCHW" if layout == "NCTHW" else "NCTHW"
        raise ValueError(f"expected {in_chans} channels in a {expected} video (layout {layout}), got shape "
                         f"{tuple(video.shape)} with {c} channels; is the video {other}? Pass input_layout='{other}'.")
    if b == 0:
        raise ValueError(f"got an empty batch: video of shape {tuple(video.shape)}")
    if t == 0:
        raise ValueError(f"got a video with 0 frames: shape {tuple(video.shape)}")
    frames = video.transpose(1, 2) if layout == "NCTHW" else video
    return frames.reshape(b * t, c, *video.shape[3:]), b, t


def _check_dtype(video: torch.Tensor, weight: torch.dtype | None) -> None:
    """A video of another float dtype than the weights fails deep inside torch: say what is expected."""
    if weight is None or video.dtype == weight:
        return
    kind = video.device.type  # under autocast, float32 and the autocast dtype are cast by torch itself
    try:
        autocast = torch.is_autocast_enabled(kind) and video.dtype in (torch.float32, torch.get_autocast_dtype(kind))
    except RuntimeError:  # a device without autocast (meta, for counting FLOPs)
        autocast = False
    if weight is not None and video.dtype != weight and not autocast:
        raise TypeError(f"the model's weights are {weight} but the video is {video.dtype}: convert it with "
                        f"video.to({weight}) (or normalize_video(..., dtype={weight})), or run mixed precision under "
                        "torch.autocast")
