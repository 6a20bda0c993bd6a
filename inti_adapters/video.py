"""Small helpers for video tensors on the device."""

from __future__ import annotations

from collections.abc import Sequence

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
    if video.dim() != 5:
        raise ValueError(f"expected a 5-D video, got shape {tuple(video.shape)}")
    cdim = 1 if layout == "NCTHW" else 2
    shape = [1] * 5
    shape[cdim] = -1
    mean = torch.tensor(mean_std[0], device=video.device, dtype=dtype).view(shape)
    std = torch.tensor(mean_std[1], device=video.device, dtype=dtype).view(shape)
    x = video.to(dtype)
    if not video.is_floating_point():
        x = x / 255.0
    return (x - mean) / std
