"""``temporal_shift``: TSM-style shift of a fraction of the channels of patch tokens by one frame.

Zero parameters. Of the ``C`` channels, the first ``k = int(C * fraction / 2)`` take the value
of the *previous* frame, the next ``k`` the value of the *next* frame, the rest stay; a frame
with no neighbour on that side receives zeros (TSM's zero padding). Prefix tokens are not
shifted.

This adapter is the one exception to "every temporal adapter starts as the identity": a
parameter-free shift cannot be the identity unless ``fraction=0``. Consequently a static video
through a model with a temporal shift is *not* the image model's output for one frame (the
first and last frames lose the shifted channels).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .._config import Config
from ..tokens import TokenLayout, patch_volume
from ._base import TemporalAdapter, register_temporal_adapter


@dataclass
class TemporalShiftConfig(Config):
    """Options of ``temporal_shift``."""

    fraction: float = field(
        default=0.25,
        metadata={"help": "Fraction of channels shifted in total, half towards each direction (TSM: 1/4). "
                          "0 makes the adapter the identity."},
    )

    def __post_init__(self) -> None:
        if isinstance(self.fraction, bool) or not isinstance(self.fraction, (int, float)) or not 0 <= self.fraction <= 1:
            raise ValueError(f"fraction must be a number in [0, 1], got {self.fraction!r}")


def shift_frames(x: torch.Tensor, k: int) -> torch.Tensor:
    """Channels ``[0, k)`` from frame ``t-1``, ``[k, 2k)`` from frame ``t+1``, zeros at the ends."""
    if k == 0:
        return x
    b, t, n, _ = x.shape
    zeros = x.new_zeros(b, 1, n, k)
    from_prev = torch.cat([zeros, x[:, :-1, :, :k]], dim=1)
    from_next = torch.cat([x[:, 1:, :, k:2 * k], zeros], dim=1)
    return torch.cat([from_prev, from_next, x[..., 2 * k:]], dim=-1)


@register_temporal_adapter("temporal_shift")
class TemporalShift(TemporalAdapter):
    """Shift ``fraction`` of the patch-token channels by +-1 frame (not the identity at init)."""

    config_class = TemporalShiftConfig

    def __init__(self, dim: int, config: TemporalShiftConfig) -> None:
        super().__init__(dim, config)
        self.shift = int(dim * config.fraction / 2)

    def forward(self, x: torch.Tensor, layout: TokenLayout, *, return_residual: bool = False) -> torch.Tensor:
        p = layout.num_prefix_tokens
        patch_volume(x, layout, who="temporal_shift", spatial=False)  # tokens must line up over frames
        y = torch.cat([x[:, :, :p], shift_frames(x[:, :, p:], self.shift)], dim=2)
        return y - x if return_residual else y

    def residual(self, x: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        return self(x, layout, return_residual=True)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, shifted_channels={self.shift}+{self.shift}"
