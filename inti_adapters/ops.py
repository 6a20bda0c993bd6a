"""Tensor operations on channels-last video tokens.

:class:`DepthwiseConv3d` is ``nn.Conv3d(C, C, k, padding=k // 2, groups=C)`` (same parameters,
names, shapes and default initialisation, so state dicts load both ways) computed on the
``(B, T, H, W, C)`` layout that tokens already have, without a permute to ``(B, C, T, H, W)``
and back.

Formulation. A depth-wise kernel ``w`` of size ``(kt, kh, kw)`` is a sum over its ``kt``
temporal taps of depth-wise 2-D convolutions of neighbouring frames::

    y[:, t] = bias + sum_i conv2d_dw(x[:, t + i - kt // 2], w[:, :, i])     (zero outside 0..T-1)

Each tap is one depth-wise ``conv2d`` over all ``B * T`` frames at once, on a channels-last view
of the tokens; the temporal offsets are then shifted adds. (A tap of spatial size 1 x 1 is a
per-channel scale, but as a 1 x 1 depth-wise ``conv2d`` its weight gradient is a fast per-channel
reduction, and autocast treats it as it treats ``nn.Conv3d``.) Why: depth-wise 3-D convolutions have no fast
kernel (CPU: PyTorch's slow reference path, whose backward costs ~15x its forward; CUDA: cuDNN
has no depth-wise 3-D algorithm), while depth-wise 2-D convolutions in channels-last layout have
fast ones on both (oneDNN, cuDNN). ``benchmarks/dwconv.py`` measures this against the other
formulations (``nn.Conv3d``, also with ``channels_last_3d`` input, and 27 shifted slices).

Example:
    >>> import torch
    >>> from torch import nn
    >>> from inti_adapters.ops import DepthwiseConv3d
    >>> conv = DepthwiseConv3d(8)                        # like nn.Conv3d(8, 8, 3, padding=1, groups=8)
    >>> ref = nn.Conv3d(8, 8, 3, padding=1, groups=8)
    >>> _ = ref.load_state_dict(conv.state_dict())      # the same parameters load both ways
    >>> x = torch.randn(2, 5, 4, 6, 8)                  # (B, T, H, W, C)
    >>> y = conv(x)
    >>> expected = ref(x.permute(0, 4, 1, 2, 3)).permute(0, 2, 3, 4, 1)
    >>> tuple(y.shape), torch.allclose(y, expected, atol=1e-5)
    ((2, 5, 4, 6, 8), True)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _kernel3(kernel_size: int | tuple[int, int, int]) -> tuple[int, int, int]:
    k = (kernel_size,) * 3 if isinstance(kernel_size, int) else tuple(kernel_size)
    if len(k) != 3 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 or v % 2 == 0 for v in k):
        raise ValueError(f"kernel_size must be an odd positive int or three of them (T, H, W), got {kernel_size!r}")
    return k  # type: ignore[return-value]


def _shift_frames(y: torch.Tensor, s: int) -> torch.Tensor:
    """``out[:, t] = y[:, t + s]``, zero where ``t + s`` is outside the clip (``|s| < T``)."""
    t = y.shape[1]
    pad = [0] * (2 * (y.dim() - 2))  # no padding of the dims after T
    if s > 0:
        return F.pad(y[:, s:], [*pad, 0, s])
    return F.pad(y[:, : t + s], [*pad, -s, 0])


def depthwise_conv3d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Depth-wise 3-D convolution with 'same' zero padding on channels-last ``(B, T, H, W, C)``.

    Equals ``F.conv3d(x.permute(0, 4, 1, 2, 3), weight, bias, padding=k // 2, groups=C)`` permuted
    back to ``(B, T, H, W, C)``; see the module docstring for the formulation.

    Args:
        x: Input ``(B, T, H, W, C)``, any strides.
        weight: ``(C, 1, kt, kh, kw)`` with odd kernel sizes, as in ``nn.Conv3d``.
        bias: ``(C,)`` or None.

    Returns:
        ``(B, T, H, W, C)``, contiguous.
    """
    if x.dim() != 5:
        raise ValueError(f"depthwise_conv3d expects (B, T, H, W, C) input, got shape {tuple(x.shape)}")
    b, t, h, w, c = x.shape
    if weight.dim() != 5 or weight.shape[:2] != (c, 1):
        raise ValueError(f"weight of shape {tuple(weight.shape)} does not fit {c} channels (expected ({c}, 1, kt, kh, kw))")
    kt, kh, kw = weight.shape[2:]
    mid = kt // 2
    offsets = [s for s in range(-mid, mid + 1) if abs(s) < t]  # taps that reach a frame of the clip
    frames = x.reshape(b * t, h, w, c).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
    taps = {s: F.conv2d(frames, weight[:, :, mid + s], bias if s == 0 else None, padding=(kh // 2, kw // 2),
                        groups=c).permute(0, 2, 3, 1).reshape(b, t, h, w, c)
            for s in offsets}
    out = taps[0]
    for s in offsets:
        if s:
            out = out + _shift_frames(taps[s], s)
    return out


class DepthwiseConv3d(nn.Module):
    """``nn.Conv3d(C, C, k, padding=k // 2, groups=C)`` on channels-last ``(B, T, H, W, C)`` tokens.

    Args:
        channels: ``C``.
        kernel_size: Odd ``k`` or ``(kt, kh, kw)``.
        bias: Learn a per-channel bias.

    Parameters ``weight`` ``(C, 1, kt, kh, kw)`` and ``bias`` ``(C,)`` have the names, shapes and
    default initialisation (same random draws) of the ``nn.Conv3d`` it replaces.
    """

    def __init__(self, channels: int, kernel_size: int | tuple[int, int, int] = 3, bias: bool = True, *,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
            raise ValueError(f"channels must be a positive int, got {channels!r}")
        self.channels = channels
        self.kernel_size = _kernel3(kernel_size)
        self.weight = nn.Parameter(torch.empty(channels, 1, *self.kernel_size, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(channels, device=device, dtype=dtype)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``nn.Conv3d``'s default: Kaiming-uniform weight, bias uniform in ``±1/sqrt(fan_in)``."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(math.prod(self.kernel_size))  # fan_in = C / groups * kernel volume
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, T, H, W, C)`` -> ``(B, T, H, W, C)``."""
        return depthwise_conv3d(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{self.channels}, kernel_size={self.kernel_size}, bias={self.bias is not None}"
