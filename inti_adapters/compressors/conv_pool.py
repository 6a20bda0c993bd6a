"""ConvPooling: the paper's "stride 3-D convolution" temporal downsampling baseline (Table 2).

The patch tokens of a clip are laid out as a volume ``(B, C, T, H, W)`` and go through one dense
``Conv3d(C, C, kernel=(2, k, k), stride=(2, 1, 1), padding=(0, k//2, k//2), bias=True)``: the
frame count halves (odd ``T``: the last frame is repeated first), the patch grid is kept.

Prefix tokens (class, distillation, register tokens) have no spatial neighbours. They are pooled
by the same kernel as a 1x1 "image" with zero padding would be, i.e. by the centre spatial taps
of the two time taps plus the bias: ``y = W[:, :, 0, c, c] @ a + W[:, :, 1, c, c] @ b + bias``.
Every output token, prefix or patch, is thus produced by the one learned kernel.

Initialisation: all weights and the bias are zero except the centre spatial tap of each time
tap, which is ``0.5 * I``; a new layer is therefore exactly the average of each frame pair.

Parameters per layer: ``2 * k * k * C * C + C``. For ViT-B (``C = 768``): k=1 -> 1.18 M,
k=3 -> 10.6 M, k=5 -> 29.5 M. The paper's ConvPooling model has 127 M parameters against
115 M for LinearPooling (two layers), ~6 M per layer: no odd ``k`` matches (k=1 gives 117 M
in all, k=3 gives 136 M; k=3 is marginally closer, k=1 is the default and the cheaper choice).
FLOPs per layer and clip: ``2 k^2 C^2 * T' * H * W + 2 C^2 * T' * P`` multiply-adds
(``T'`` output frames, ``P`` prefix tokens), all counted by :func:`inti_adapters.count_gflops`.

Example:
    >>> import torch
    >>> from inti_adapters import TokenLayout
    >>> from inti_adapters.compressors.conv_pool import ConvPool
    >>> pool = ConvPool(dim=8)
    >>> x = torch.randn(2, 4, 1 + 3 * 3, 8)
    >>> y = pool(x, TokenLayout(num_prefix_tokens=1, cls_index=0, grid=(3, 3)))
    >>> tuple(y.shape), torch.allclose(y, (x[:, 0::2] + x[:, 1::2]) / 2, atol=1e-6)
    ((2, 2, 10, 8), True)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .._config import Config, check_choice
from ..tokens import ODD_FRAME_POLICIES, TokenLayout, pair_frames, patch_volume
from ._base import Compressor, register_compressor


@dataclass
class ConvPoolConfig(Config):
    """Options of the ``conv_pool`` compressor."""

    kernel_size: int = field(
        default=1,
        metadata={
            "help": "Spatial kernel size k of the (2, k, k) stride-(2, 1, 1) convolution; odd, so "
            "that padding k//2 keeps the patch grid. Parameters per layer: 2*k*k*C*C + C."
        },
    )
    odd_frames: str = field(
        default="repeat_last",
        metadata={
            "help": "Odd frame counts: 'repeat_last' repeats the last frame before the strided "
            "convolution; 'error' refuses odd counts."
        },
    )

    def __post_init__(self) -> None:
        k = self.kernel_size
        if isinstance(k, bool) or not isinstance(k, int) or k < 1 or k % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd int (1, 3, 5, ...), got {k!r}")
        check_choice("odd_frames", self.odd_frames, ODD_FRAME_POLICIES)


@register_compressor("conv_pool")
class ConvPool(Compressor):
    """Halve the frame count with a dense stride-2 temporal convolution over the token grid.

    Args:
        dim: Embedding width ``C`` of the tokens.
        config: :class:`ConvPoolConfig`.
    """

    config_class = ConvPoolConfig

    def __init__(self, dim: int, config: ConvPoolConfig | None = None) -> None:
        config = config or ConvPoolConfig()
        super().__init__(dim, config)
        k = config.kernel_size
        self.conv = nn.Conv3d(dim, dim, (2, k, k), stride=(2, 1, 1), padding=(0, k // 2, k // 2), bias=True)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Averaging init: centre spatial tap of each time tap = 0.5 * I, all else 0."""
        c = self.config.kernel_size // 2
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.bias.zero_()
            eye = torch.eye(self.dim, dtype=self.conv.weight.dtype, device=self.conv.weight.device)
            for t in range(2):
                self.conv.weight[:, :, t, c, c] = 0.5 * eye

    def output_frames(self, num_frames: int) -> int:
        return (num_frames + 1) // 2

    def extra_repr(self) -> str:
        return f"dim={self.dim}, kernel_size={self.config.kernel_size}, odd_frames={self.config.odd_frames}"

    def forward(self, x: torch.Tensor, layout: TokenLayout | None = None) -> torch.Tensor:
        """``(B, T, P + H*W, C) -> (B, ceil(T/2), P + H*W, C)``; needs ``layout.grid``.

        The stride-2 kernel sees the two frames of each pair: ``conv(a; W[:, :, 0]) + conv(b; W[:, :, 1])``.
        """
        if x.dim() != 4 or x.shape[-1] != self.dim:
            raise ValueError(f"ConvPool expects tokens of shape (B, T, N, {self.dim}), got {tuple(x.shape)}")
        if x.shape[1] < 1:
            raise ValueError("ConvPool got a clip with 0 frames")
        layout = layout if layout is not None else TokenLayout(0, None, None)
        a, b = pair_frames(x, self.config.odd_frames)  # (B, T', N, C)
        k = self.config.kernel_size // 2
        w = self.conv.weight
        out = self._conv_pairs(a, b, layout)
        p = layout.num_prefix_tokens
        if not p:
            return out
        # prefix tokens: the centre taps, as for a 1x1 "image" with zero padding
        prefix = F.linear(a[:, :, :p], w[:, :, 0, k, k], self.conv.bias) + F.linear(b[:, :, :p], w[:, :, 1, k, k])
        return torch.cat([prefix, out], dim=2)

    def _conv_pairs(self, a: torch.Tensor, b: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        """The patch tokens of each pair through the (2, k, k) kernel: ``(B, T', H*W, C)``."""
        who = "conv_pool"
        va = patch_volume(a, layout, who=who, hint="it works on hosts with a spatial patch grid")
        vb = patch_volume(b, layout, who=who, hint="it works on hosts with a spatial patch grid")
        bsz, t2, gh, gw, c = va.shape
        pad = self.config.kernel_size // 2
        w = self.conv.weight

        def frames(v: torch.Tensor) -> torch.Tensor:  # (B, T', H, W, C) -> (B*T', C, H, W)
            return v.reshape(bsz * t2, gh, gw, c).permute(0, 3, 1, 2)

        y = F.conv2d(frames(va), w[:, :, 0], self.conv.bias, padding=pad) + F.conv2d(frames(vb), w[:, :, 1], padding=pad)
        return y.permute(0, 2, 3, 1).reshape(bsz, t2, gh * gw, c)
