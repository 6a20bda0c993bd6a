"""``global_mhra``: a UniFormerV2-style global temporal module, re-implemented from the paper.

A learnable video query cross-attends, one decoder layer per selected block (ascending), to all
tokens of all frames of that block's output, ``(B, T_i * N, C)`` with that block's *current*
frame count ``T_i``. Each decoder layer is pre-norm: ``q += Attn(LN(q), LN(kv))``, then
``q += MLP(LN(q))``. Before attending, a dynamic position embedding (a depth-wise 3-D
convolution over ``(T, H, W)``) is added to the patch tokens, as in UniFormerV2.

Output and fusion. UniFormerV2 mixes the decoder output, normalised by its *own* new
LayerNorm (not the backbone's final norm), with the mean of the backbone's final class
tokens through a learnable balance. Here the frame-averaged pre-logit feature ``f`` (already
pooled and final-normed by the host, width ``D = host.num_features``) plays the role of that
mean, the decoder output is ``g = proj(LN(q))`` (``proj`` maps ``C -> D`` when they differ,
e.g. OpenCLIP towers with a projection), and

    out = f + gate * (g - f),    gate: a per-channel vector initialised to 0,

so a fresh module is exactly the identity (UniFormerV2 starts its balance at sigmoid(0) = 0.5).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .._config import Config
from ..ops import DepthwiseConv3d
from ..tokens import TokenLayout, patch_volume
from ._base import GlobalTemporalAdapter, register_temporal_adapter


@dataclass
class GlobalMHRAConfig(Config):
    """Options of ``global_mhra``."""

    num_heads: int | None = field(
        default=None, metadata={"help": "Attention heads; None = dim // 64 (12 for ViT-B, 16 for ViT-L), at least 1."}
    )
    mlp_ratio: float = field(default=4.0, metadata={"help": "Hidden width of the decoder MLP = mlp_ratio * dim."})
    mlp_dropout: float = field(default=0.0, metadata={"help": "Dropout inside the decoder MLP (UniFormerV2: 0.5)."})
    dpe: bool = field(default=True, metadata={"help": "Add the dynamic position embedding (needs the patch grid)."})
    dpe_kernel_size: int = field(default=3, metadata={"help": "Odd kernel of the depth-wise DPE convolution."})
    qkv_bias: bool = field(default=True, metadata={"help": "Biases in the query/key/value projections."})

    def __post_init__(self) -> None:
        if self.num_heads is not None and (
            isinstance(self.num_heads, bool) or not isinstance(self.num_heads, int) or self.num_heads < 1
        ):
            raise ValueError(f"num_heads must be a positive int or None, got {self.num_heads!r}")
        if not isinstance(self.mlp_ratio, (int, float)) or self.mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be a positive number, got {self.mlp_ratio!r}")
        if not isinstance(self.mlp_dropout, (int, float)) or not 0 <= self.mlp_dropout < 1:
            raise ValueError(f"mlp_dropout must be in [0, 1), got {self.mlp_dropout!r}")
        k = self.dpe_kernel_size
        if isinstance(k, bool) or not isinstance(k, int) or k < 1 or k % 2 == 0:
            raise ValueError(f"dpe_kernel_size must be an odd positive int, got {k!r}")


class CrossAttentionLayer(nn.Module):
    """One decoder layer: the query tokens attend to ``kv``, then an MLP; both pre-norm residual."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, dropout: float, qkv_bias: bool) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"global_mhra: width {dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.norm_mlp = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim))

    def forward(self, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        b, m, c = q.shape
        n, h = kv.shape[1], self.num_heads
        query = self.q(self.norm_q(q)).reshape(b, m, h, c // h).transpose(1, 2)
        k, v = self.kv(self.norm_kv(kv)).reshape(b, n, 2, h, c // h).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(query, k, v).transpose(1, 2).reshape(b, m, c)
        q = q + self.proj(a)
        return q + self.mlp(self.norm_mlp(q))


@register_temporal_adapter("global_mhra")
class GlobalMHRA(GlobalTemporalAdapter):
    """Learnable video query decoding the tokens of ``blocks``; fused into the video feature.

    ``blocks`` defaults to the last four, UniFormerV2's setting for ViT-B/16 and ViT-L/14.
    """

    config_class = GlobalMHRAConfig
    default_blocks = {"last": 4}

    def __init__(self, dim: int, out_dim: int, blocks: Sequence[int], config: GlobalMHRAConfig) -> None:
        super().__init__(dim, out_dim, blocks, config)
        heads = config.num_heads or max(1, dim // 64)
        self.query = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.trunc_normal_(self.query, std=0.02)
        self.layers = nn.ModuleDict(
            {str(i): CrossAttentionLayer(dim, heads, config.mlp_ratio, config.mlp_dropout, config.qkv_bias)
             for i in self.blocks}
        )
        k = config.dpe_kernel_size
        self.dpe = nn.ModuleDict(
            {str(i): DepthwiseConv3d(dim, k) for i in self.blocks}  # = nn.Conv3d(dim, dim, k, padding=k // 2, groups=dim)
        ) if config.dpe else None
        if self.dpe is not None:
            for conv in self.dpe.values():
                nn.init.zeros_(conv.bias)
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, out_dim) if out_dim != dim else nn.Identity()
        self.apply(self._init_linear)
        self.gate = nn.Parameter(torch.zeros(out_dim))  # identity at init

    @staticmethod
    def _init_linear(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    @property
    def needs_grid(self) -> bool:
        return self.dpe is not None

    def _with_dpe(self, block: int, x: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        vol = patch_volume(x, layout, who="global_mhra's dynamic position embedding (dpe=True)",
                           hint="Pass dpe=False.")
        b, t, h, w, c = vol.shape
        z = self.dpe[str(block)](vol).reshape(b, t, h * w, c)  # channels-last depth-wise conv
        p = layout.num_prefix_tokens
        return torch.cat([x[:, :, :p], x[:, :, p:] + z.to(x.dtype)], dim=2)

    def decode(self, tokens: Sequence[torch.Tensor], layout: TokenLayout) -> torch.Tensor:
        """The decoder output ``g = proj(LN(q))``, ``(B, D)``, from one ``(B, T_i, N, C)`` per block."""
        if len(tokens) != len(self.blocks):
            raise ValueError(f"global_mhra expects the tokens of {len(self.blocks)} blocks, got {len(tokens)}")
        q = self.query.repeat(tokens[0].shape[0], 1, 1)  # not a view: no grad-requiring view under no_grad
        for block, x in zip(self.blocks, tokens, strict=True):
            if self.dpe is not None:
                x = self._with_dpe(block, x, layout)
            b, t, n, c = x.shape
            q = self.layers[str(block)](q.to(x.dtype), x.reshape(b, t * n, c))
        return self.proj(self.norm(q[:, 0]))

    def forward(self, tokens: Sequence[torch.Tensor], layout: TokenLayout, features: torch.Tensor) -> torch.Tensor:
        g = self.decode(tokens, layout).to(features.dtype)
        return features + self.gate.to(features.dtype) * (g - features)
