"""LinearPooling: the paper's "fixed linear weights for adjacent frames" baseline (Table 2).

Frames are paired exactly as in InTI, (1,2), (3,4), ..., and every token of a pair becomes
``w_a * a_k + w_b * b_k`` with ONE learned weight pair per layer shared by all tokens, all
samples and all frame pairs. The weights are the softmax of two learned logits, so they always
sum to 1 (the image feature space is preserved); the logits start equal, so a new layer is the
plain average of each pair. Two parameters per layer; no FLOPs worth counting (element-wise).

Example:
    >>> import torch
    >>> from inti_adapters.compressors.linear_pool import LinearPool
    >>> pool = LinearPool(dim=8)
    >>> x = torch.randn(2, 5, 3, 8)
    >>> y = pool(x)
    >>> tuple(y.shape), torch.allclose(y[:, :2], (x[:, 0:4:2] + x[:, 1:4:2]) / 2)
    ((2, 3, 3, 8), True)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .._config import Config, check_choice
from ..tokens import ODD_FRAME_POLICIES, TokenLayout, pair_frames
from ._base import Compressor, register_compressor


@dataclass
class LinearPoolConfig(Config):
    """Options of the ``linear_pool`` compressor."""

    odd_frames: str = field(
        default="repeat_last",
        metadata={
            "help": "Odd frame counts: 'repeat_last' pairs the last frame with itself (it passes "
            "unchanged, the weights sum to 1); 'error' refuses odd counts."
        },
    )

    def __post_init__(self) -> None:
        check_choice("odd_frames", self.odd_frames, ODD_FRAME_POLICIES)


@register_compressor("linear_pool")
class LinearPool(Compressor):
    """Halve the frame count with one softmax-normalised weight pair per layer.

    Args:
        dim: Embedding width ``C`` of the tokens (only checked against the input).
        config: :class:`LinearPoolConfig`.
    """

    config_class = LinearPoolConfig

    def __init__(self, dim: int, config: LinearPoolConfig | None = None) -> None:
        super().__init__(dim, config or LinearPoolConfig())
        self.logits = nn.Parameter(torch.zeros(2))  # equal logits: a new layer averages the pair

    def output_frames(self, num_frames: int) -> int:
        return (num_frames + 1) // 2

    def weights(self) -> torch.Tensor:
        """The current pair weights ``(w_a, w_b)``; they sum to 1."""
        return self.logits.softmax(dim=0)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, odd_frames={self.config.odd_frames}"

    def forward(self, x: torch.Tensor, layout: TokenLayout | None = None) -> torch.Tensor:
        """``(B, T, N, C) -> (B, ceil(T/2), N, C)``; ``layout`` is unused (every token is pooled alike)."""
        if x.dim() != 4 or x.shape[-1] != self.dim:
            raise ValueError(
                f"LinearPool expects tokens of shape (B, T, N, {self.dim}), got {tuple(x.shape)}"
            )
        if x.shape[1] < 1:
            raise ValueError("LinearPool got a clip with 0 frames")
        a, b = pair_frames(x, self.config.odd_frames)
        w = self.weights().to(x.dtype)
        return w[0] * a + w[1] * b
