"""Convolutional temporal adapters: UniFormerV2's local MHRA and ST-Adapter.

Both are a bottleneck on the patch tokens of every frame, re-implemented from their papers:
pointwise down-projection, a depth-wise convolution over ``(T, H, W)`` (by default along time
only), pointwise up-projection, added to the stream. The up-projection starts at zero, so a
fresh adapter is exactly the identity. Prefix tokens (class, distillation, register) pass
unchanged.

- ``local_mhra`` (UniFormerV2, "local UniBlock"): ``x + U(DWConv_t(V(Norm(x))))`` with a
  temporal kernel ``(3, 1, 1)`` and hidden width ``int(C // 1.5)``. UniFormerV2 normalises with
  BatchNorm; the default here is LayerNorm (batch-independent, no running statistics to be
  updated twice under activation checkpointing); ``norm="batch"`` gives UniFormerV2's choice.
- ``st_adapter`` (ST-Adapter): ``x + W_up(f(DWConv3D(W_down(x))))`` with ``f = GELU`` and no
  norm, hidden width ``C // 2``. The kernel is configurable; the default ``(3, 1, 1)`` mixes
  time only, ``(3, 3, 3)`` also mixes spatial neighbours and then needs the patch grid.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .._config import Config
from ..ops import DepthwiseConv3d
from ..tokens import TokenLayout, patch_volume
from ._base import TemporalAdapter, register_temporal_adapter

NORMS = ("layer", "batch", "none")
ACTIVATIONS = ("gelu", "none")


def _hidden_width(dim: int, reduction: float, hidden_dim: int | None) -> int:
    return hidden_dim if hidden_dim is not None else max(1, int(dim // reduction))


def _check_width(reduction: float, hidden_dim: int | None) -> None:
    if isinstance(reduction, bool) or not isinstance(reduction, (int, float)) or reduction <= 0:
        raise ValueError(f"reduction must be a positive number (hidden width = dim // reduction), got {reduction!r}")
    if hidden_dim is not None and (isinstance(hidden_dim, bool) or not isinstance(hidden_dim, int) or hidden_dim < 1):
        raise ValueError(f"hidden_dim must be a positive int or None, got {hidden_dim!r}")


def _check_kernel(kernel: tuple[int, ...]) -> None:
    if len(kernel) != 3 or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 or k % 2 == 0 for k in kernel):
        raise ValueError(f"kernel_size must be three odd positive ints (T, H, W), e.g. (3, 1, 1), got {kernel!r}")


class ConvBottleneck(TemporalAdapter):
    """``x + up(act(dwconv(down(norm(x)))))`` on the patch tokens; ``up`` starts at zero."""

    def __init__(self, dim: int, config, *, hidden: int, kernel: tuple[int, int, int], norm: str,
                 activation: str) -> None:
        super().__init__(dim, config)
        self.kernel = kernel
        if norm == "layer":
            self.norm: nn.Module = nn.LayerNorm(dim)
        elif norm == "batch":
            self.norm = nn.BatchNorm1d(dim)
        else:
            self.norm = nn.Identity()
        self.down = nn.Linear(dim, hidden)
        # = nn.Conv3d(hidden, hidden, kernel, padding=k // 2, groups=hidden), on channels-last tokens
        self.conv = DepthwiseConv3d(hidden, kernel)
        nn.init.zeros_(self.conv.bias)
        self.act = nn.GELU() if activation == "gelu" else nn.Identity()
        self.up = nn.Linear(hidden, dim)
        nn.init.zeros_(self.up.weight)  # identity at init
        nn.init.zeros_(self.up.bias)

    @property
    def needs_grid(self) -> bool:
        return self.kernel[1:] != (1, 1)

    def _patch_residual(self, x: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        """The residual of the patch tokens, ``(B, T, H*W, C)``."""
        who = f"{self.registered_name or type(self).__name__} (kernel {self.kernel})"
        vol = patch_volume(x, layout, who=who, spatial=self.needs_grid, hint="Use a kernel of spatial size 1, e.g. (3, 1, 1).")
        b, t, h, w, c = vol.shape
        z = self.down(self.norm(vol.reshape(-1, c))).reshape(b, t, h, w, -1)
        z = self.conv(z)  # channels-last depth-wise conv, no NCTHW round trip
        return self.up(self.act(z)).reshape(b, t, h * w, c)

    def residual(self, x: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        p = layout.num_prefix_tokens
        d = self._patch_residual(x, layout).to(x.dtype)
        return torch.cat([x.new_zeros(*x.shape[:2], p, x.shape[3]), d], dim=2)

    def forward(self, x: torch.Tensor, layout: TokenLayout, *, return_residual: bool = False) -> torch.Tensor:
        if return_residual:
            return self.residual(x, layout)
        p = layout.num_prefix_tokens
        d = self._patch_residual(x, layout)
        return torch.cat([x[:, :, :p], x[:, :, p:] + d.to(x.dtype)], dim=2)  # prefix tokens pass exactly


@dataclass
class LocalMHRAConfig(Config):
    """Options of ``local_mhra`` (UniFormerV2's local temporal relation aggregator)."""

    reduction: float = field(
        default=1.5, metadata={"help": "Hidden width = dim // reduction (UniFormerV2: 1.5, i.e. 512 for ViT-B)."}
    )
    hidden_dim: int | None = field(default=None, metadata={"help": "Explicit hidden width (overrides reduction)."})
    kernel_size: int = field(default=3, metadata={"help": "Odd temporal kernel of the depth-wise convolution."})
    norm: str = field(
        default="layer",
        metadata={"help": "Norm before the down-projection: 'layer' (default), 'batch' (UniFormerV2) or 'none'."},
    )

    def __post_init__(self) -> None:
        _check_width(self.reduction, self.hidden_dim)
        if isinstance(self.kernel_size, bool) or not isinstance(self.kernel_size, int):
            raise TypeError(f"local_mhra kernel_size must be an odd int (temporal kernel), got {self.kernel_size!r}")
        _check_kernel((self.kernel_size, 1, 1))
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {list(NORMS)}, got {self.norm!r}")


@register_temporal_adapter("local_mhra")
class LocalMHRA(ConvBottleneck):
    """UniFormerV2-style local temporal module: ``x + U(DWConv_t(V(Norm(x))))`` on patch tokens.

    Example:
        >>> import torch
        >>> from inti_adapters import TokenLayout
        >>> m = LocalMHRA(32, LocalMHRAConfig())
        >>> x = torch.randn(2, 4, 1 + 9, 32)
        >>> torch.equal(m(x, TokenLayout(1, 0, (3, 3))), x)    # identity at init
        True
    """

    config_class = LocalMHRAConfig

    def __init__(self, dim: int, config: LocalMHRAConfig) -> None:
        super().__init__(dim, config, hidden=_hidden_width(dim, config.reduction, config.hidden_dim),
                         kernel=(config.kernel_size, 1, 1), norm=config.norm, activation="none")


@dataclass
class STAdapterConfig(Config):
    """Options of ``st_adapter`` (ST-Adapter)."""

    reduction: float = field(default=2.0, metadata={"help": "Hidden width = dim // reduction (384 for ViT-B)."})
    hidden_dim: int | None = field(default=None, metadata={"help": "Explicit hidden width (overrides reduction)."})
    kernel_size: tuple[int, int, int] = field(
        default=(3, 1, 1),
        metadata={"help": "Odd (T, H, W) kernel of the depth-wise 3-D convolution; an int k means (k, 1, 1). "
                          "A spatial size above 1 needs the patch grid."},
    )
    activation: str = field(default="gelu", metadata={"help": "After the convolution: 'gelu' or 'none'."})

    def __post_init__(self) -> None:
        _check_width(self.reduction, self.hidden_dim)
        k = self.kernel_size
        if isinstance(k, int) and not isinstance(k, bool):
            k = (k, 1, 1)
        if isinstance(k, (list, tuple)):
            k = tuple(k)
        else:
            raise TypeError(f"st_adapter kernel_size must be an int or three ints (T, H, W), got {k!r}")
        _check_kernel(k)
        self.kernel_size = k
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {list(ACTIVATIONS)}, got {self.activation!r}")


@register_temporal_adapter("st_adapter")
class STAdapter(ConvBottleneck):
    """ST-Adapter: ``x + W_up(GELU(DWConv3D(W_down(x))))`` on patch tokens, kernel ``(3, 1, 1)``."""

    config_class = STAdapterConfig

    def __init__(self, dim: int, config: STAdapterConfig) -> None:
        super().__init__(dim, config, hidden=_hidden_width(dim, config.reduction, config.hidden_dim),
                         kernel=config.kernel_size, norm="none", activation=config.activation)
