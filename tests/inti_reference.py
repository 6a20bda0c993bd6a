"""The InTI layer's tensor code as it was before issue 9 (``nn.Conv3d`` on ``(B, C, T, H, W)``,
``nn.Conv1d`` and ``max_pool1d`` on ``(B, C, T)`` in the global context).

A reference for the equivalence tests: :func:`reference_forward` runs an ``InTILayer``'s own
parameters through the old formulation (permute to NCTHW, ``F.conv3d``, permute back, zero
prefix features concatenated, fused features expanded and concatenated before the head).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from inti_adapters import InTILayer, TokenLayout
from inti_adapters.inti import GlobalContext, frame_tokens
from inti_adapters.tokens import pair_frames


def _sum(tensors: list[torch.Tensor]) -> torch.Tensor:
    out = tensors[0]
    for t in tensors[1:]:
        out = out + t
    return out


def reference_cube_feature(layer: InTILayer, x: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """The old ``InTILayer._cube_feature`` (verbatim math, the layer's parameters)."""
    b, t, n, c = x.shape
    gh, gw = layout.grid_for(n)
    p = layout.num_prefix_tokens
    vol = x[:, :, p:].permute(0, 3, 1, 2).reshape(b, c, t, gh, gw)
    vol = F.conv3d(vol, layer.cube_conv.weight, layer.cube_conv.bias, padding=1, groups=c)
    vol = vol.reshape(b, c, t, gh * gw).permute(0, 2, 3, 1)  # (B, T, HW, C)
    ca, cb = pair_frames(vol, layer.config.odd_frames)
    f = layer.cube_proj(torch.cat([ca, cb], dim=-1))
    if p:
        f = torch.cat([f.new_zeros(b, f.shape[1], p, f.shape[-1]), f], dim=2)
    return f


def reference_global_context(g: GlobalContext, cls: torch.Tensor) -> torch.Tensor:
    """The old ``GlobalContext.forward``: ``nn.Conv1d`` and ``max_pool1d`` on ``(B, C, T)``."""
    z = cls.transpose(1, 2)
    for conv in g.convs[:2]:
        z = conv(z)
        z = F.gelu(F.max_pool1d(z, 2, ceil_mode=True) if z.shape[-1] > 1 else z)
    z = F.gelu(g.convs[2](z).mean(-1))
    return g.proj(z)


def _fuse(layer: InTILayer, feats: dict[str, torch.Tensor], full: tuple[int, ...]) -> torch.Tensor:
    fusion = layer.config.fusion
    if fusion == "cat":
        return torch.cat([f.expand(full) for f in feats.values()], dim=-1)
    if fusion == "add":
        return _sum(list(feats.values()))
    others = [f for k, f in feats.items() if k != "token"]
    parts = [feats["token"]] if "token" in feats else []
    if others:
        parts.append(_sum(others).expand(full))
    return torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]


def reference_weights(layer: InTILayer, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                      layout: TokenLayout) -> torch.Tensor:
    """The old ``InTILayer._weights``."""
    bsz, t2, n, _ = a.shape
    feats: dict[str, torch.Tensor] = {}
    if layer.token_proj is not None:
        feats["token"] = layer.token_proj(torch.cat([a, b], dim=-1))
    if layer.cube_proj is not None:
        feats["cube"] = reference_cube_feature(layer, x, layout)
    if layer.frame_proj is not None or layer.global_ctx is not None:
        cls = frame_tokens(x, layout)
        if layer.frame_proj is not None:
            cls_a, cls_b = pair_frames(cls, layer.config.odd_frames)
            feats["frame"] = layer.frame_proj(torch.cat([cls_a, cls_b], dim=-1))[:, :, None]
        if layer.global_ctx is not None:
            feats["global"] = reference_global_context(layer.global_ctx, cls)[:, None, None]
    out = layer.predictor(_fuse(layer, feats, (bsz, t2, n, layer.hidden_dim)))
    head = layer.config.weight_head
    if head == "softmax":
        w = out.softmax(dim=-1)
    elif head == "sigmoid":
        w = out.sigmoid()
    else:
        per_frame = out.unflatten(-1, (2, layer.hidden_dim))
        w = (per_frame @ layer.query.to(per_frame.dtype)).softmax(dim=-1)
    return w.expand(bsz, t2, n, 2)


def reference_forward(layer: InTILayer, x: torch.Tensor, layout: TokenLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """The old ``InTILayer.forward``: ``(y, w)``."""
    a, b = pair_frames(x, layer.config.odd_frames)
    t2 = a.shape[1]
    w = reference_weights(layer, x, a, b, layout).to(x.dtype)
    y = w[..., 0:1] * a + w[..., 1:2] * b
    if layer.time_embed is not None:
        y = y + (layer.alpha * layer.time_embed[:t2]).to(y.dtype)[None, :, None, :]
    return y, w
