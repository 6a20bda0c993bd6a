"""Tensor operations on channels-last video tokens.

:class:`DepthwiseConv3d` is ``nn.Conv3d(C, C, k, padding=k // 2, groups=C)`` (same parameters,
names, shapes and default initialisation, so state dicts load both ways) computed on the
``(B, T, H, W, C)`` layout that tokens already have, without a permute to ``(B, C, T, H, W)``
and back.

Two formulations, both without a permute to ``(B, C, T, H, W)`` and back (``benchmarks/dwconv.py``
measures them against ``nn.Conv3d``, with and without ``channels_last_3d`` input, and others):

- ``taps`` (default off the CPU). A depth-wise kernel ``w`` of size ``(kt, kh, kw)`` is a sum over
  its ``kt`` temporal taps of depth-wise 2-D convolutions of neighbouring frames::

      y[:, t] = bias + sum_i conv2d_dw(x[:, t + i - kt // 2], w[:, :, i])     (zero outside 0..T-1)

  Each tap is one depth-wise ``conv2d`` over all ``B * T`` frames at once, on a channels-last
  view of the tokens; the temporal offsets are shifted adds. Depth-wise 2-D convolutions in
  channels-last layout have fast kernels everywhere (cuDNN, oneDNN), depth-wise 3-D ones do not
  (cuDNN has no depth-wise 3-D algorithm; PyTorch's fallback is slow, its backward most of all).
- ``conv3d`` (default on the CPU). oneDNN does have a fast depth-wise 3-D *forward*: it runs on
  the channels-last-3d view of the tokens, and a hand-written backward avoids PyTorch's slow one:
  the input gradient is the same convolution with the flipped kernel, the weight gradient one
  depth-wise 2-D weight gradient per temporal tap, on offset views of the frames (no copies).

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
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable


def _kernel3(kernel_size: int | tuple[int, int, int]) -> tuple[int, int, int]:
    k = (kernel_size,) * 3 if isinstance(kernel_size, int) else tuple(kernel_size)
    if len(k) != 3 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 or v % 2 == 0 for v in k):
        raise ValueError(f"kernel_size must be an odd positive int or three of them (T, H, W), got {kernel_size!r}")
    return k  # type: ignore[return-value]


def _shift_frames(y: torch.Tensor, s: int) -> torch.Tensor:
    """``out[:, t] = y[:, t + s]``, zero where ``t + s`` is outside the clip (``|s| < T``); differentiable."""
    t = y.shape[1]
    pad = [0] * (2 * (y.dim() - 2))  # no padding of the dims after T
    if s > 0:
        return F.pad(y[:, s:], [*pad, 0, s])
    return F.pad(y[:, : t + s], [*pad, -s, 0])


def _tap_weight_grad(g: torch.Tensor, x: torch.Tensor, s: int, weight2d: torch.Tensor) -> torch.Tensor:
    """Weight gradient ``(C, 1, kh, kw)`` (the shape of ``weight2d``) of one temporal tap of a depth-wise 3-D convolution:
    ``sum_(b, t)`` of the depth-wise 2-D weight gradient of output frame ``g[b, t]`` against input
    frame ``x[b, t + s]`` (``0 <= t + s < T``), for channels-last ``(B, T, H, W, C)`` ``g`` and ``x``.

    Over the ``B * T`` frames laid end to end, ``x[b, t + s]`` is the frame ``s`` further on, so one
    call on two offset (uncopied) slices covers every pair; it also pairs the last ``s`` frames of each
    clip with the first of the next (``s < 0``: the reverse), which one small call takes off again.
    """
    b, t, h, w, c = x.shape
    kh, kw = weight2d.shape[2:]

    def weight_grad(go: torch.Tensor, xi: torch.Tensor) -> torch.Tensor:  # (N, H, W, C) frames each
        return torch.ops.aten.convolution_backward(
            go.permute(0, 3, 1, 2), xi.permute(0, 3, 1, 2), weight2d, None, [1, 1], [kh // 2, kw // 2],
            [1, 1], False, [0, 0], c, [False, True, False])[1]

    g2, x2 = g.reshape(b * t, h, w, c), x.reshape(b * t, h, w, c)
    if s == 0:
        return weight_grad(g2, x2)
    k = abs(s)
    out = weight_grad(g2[: b * t - s], x2[s:]) if s > 0 else weight_grad(g2[k:], x2[: b * t - k])
    if b > 1:  # the pairs that crossed from one clip into the next
        if s > 0:
            stray = weight_grad(g[:-1, t - k :].reshape(-1, h, w, c), x[1:, :k].reshape(-1, h, w, c))
        else:
            stray = weight_grad(g[1:, :k].reshape(-1, h, w, c), x[:-1, t - k :].reshape(-1, h, w, c))
        out = out - stray
    return out


def _conv3d_channels_last(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    kt, kh, kw = weight.shape[2:]
    vol = x.permute(0, 4, 1, 2, 3)  # channels-last-3d view of (B, T, H, W, C): no copy
    return F.conv3d(vol, weight, bias, padding=(kt // 2, kh // 2, kw // 2), groups=x.shape[-1]).permute(0, 2, 3, 4, 1)


class _Conv3dFn(torch.autograd.Function):
    """Formulation ``conv3d``: oneDNN's depth-wise 3-D forward on the channels-last view, and a
    backward without PyTorch's slow one: input gradient = the same convolution with the flipped
    kernel, weight gradient = one depth-wise 2-D weight gradient per temporal tap (the input frames
    offset by the tap, :func:`_tap_weight_grad`)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x = x.contiguous()
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _conv3d_channels_last(x, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        t, c = x.shape[1], x.shape[-1]
        kt, kh, kw = weight.shape[2:]
        g = g.contiguous()
        gx = _conv3d_channels_last(g, weight.flip(2, 3, 4), None) if ctx.needs_input_grad[0] else None
        gw = None
        if ctx.needs_input_grad[1]:
            taps = [_tap_weight_grad(g, x, i - kt // 2, weight[:, :, i]) if abs(i - kt // 2) < t  # the tap meets a frame
                    else weight.new_zeros(c, 1, kh, kw) for i in range(kt)]
            gw = torch.stack(taps, dim=2)
        gb = g.sum((0, 1, 2, 3)) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gb


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype active for ``device_type``, or None."""
    if hasattr(torch, "get_autocast_dtype"):  # torch >= 2.4
        return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    if device_type == "cpu":
        return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None
    return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None


def _depthwise_conv3d_fn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    dtype = _autocast_dtype(x.device.type) if x.is_floating_point() else None
    if dtype is not None:  # cast as autocast casts a convolution, then run the Function without autocast
        x, weight = x.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    with torch.autocast(x.device.type, enabled=False):
        return _Conv3dFn.apply(x, weight, bias)


def _depthwise_conv3d_taps(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    b, t, h, w, c = x.shape
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


def depthwise_conv3d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                     formulation: str | None = None) -> torch.Tensor:
    """Depth-wise 3-D convolution with 'same' zero padding on channels-last ``(B, T, H, W, C)``.

    Equals ``F.conv3d(x.permute(0, 4, 1, 2, 3), weight, bias, padding=k // 2, groups=C)`` permuted
    back to ``(B, T, H, W, C)``; see the module docstring for the formulations.

    Args:
        x: Input ``(B, T, H, W, C)``, any strides.
        weight: ``(C, 1, kt, kh, kw)`` with odd kernel sizes, as in ``nn.Conv3d``.
        bias: ``(C,)`` or None.
        formulation: ``"taps"`` (depth-wise 2-D taps + shifted adds) or ``"conv3d"`` (oneDNN
            depth-wise 3-D forward with a hand-written backward); default: ``conv3d`` on CPU,
            ``taps`` elsewhere.

    Returns:
        ``(B, T, H, W, C)``, contiguous.
    """
    if x.dim() != 5:
        raise ValueError(f"depthwise_conv3d expects (B, T, H, W, C) input, got shape {tuple(x.shape)}")
    c = x.shape[-1]
    if weight.dim() != 5 or weight.shape[:2] != (c, 1):
        raise ValueError(f"weight of shape {tuple(weight.shape)} does not fit {c} channels (expected ({c}, 1, kt, kh, kw))")
    formulation = formulation or ("conv3d" if x.device.type == "cpu" else "taps")
    if formulation == "conv3d":
        return _depthwise_conv3d_fn(x, weight, bias)
    if formulation == "taps":
        return _depthwise_conv3d_taps(x, weight, bias)
    raise ValueError(f"formulation must be 'taps' or 'conv3d', got {formulation!r}")


class DepthwiseConv3d(nn.Module):
    """``nn.Conv3d(C, C, k, padding=k // 2, groups=C)`` on channels-last ``(B, T, H, W, C)`` tokens.

    Args:
        channels: ``C``.
        kernel_size: Odd ``k`` or ``(kt, kh, kw)``.
        bias: Learn a per-channel bias.
        formulation: Force ``"taps"`` or ``"conv3d"`` (see :func:`depthwise_conv3d`).

    Parameters ``weight`` ``(C, 1, kt, kh, kw)`` and ``bias`` ``(C,)`` have the names, shapes and
    default initialisation (same random draws) of the ``nn.Conv3d`` it replaces.
    """

    def __init__(self, channels: int, kernel_size: int | tuple[int, int, int] = 3, bias: bool = True, *,
                 formulation: str | None = None, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if formulation not in (None, "taps", "conv3d"):
            raise ValueError(f"formulation must be None, 'taps' or 'conv3d', got {formulation!r}")
        self.formulation = formulation  # None: per device (see depthwise_conv3d)
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
        return depthwise_conv3d(x, self.weight, self.bias, self.formulation)

    def extra_repr(self) -> str:
        return f"{self.channels}, kernel_size={self.kernel_size}, bias={self.bias is not None}"
