"""timm hosts: ``VisionTransformer`` (class/dist/register tokens, avg/map pooling,
``no_embed_class``, dynamic image size, DeiT3), ``Eva`` and ``Beit``, plus any other timm model
with the same public structure (``blocks``, ``patch_embed``, ``num_prefix_tokens``,
``forward_features``, ``forward_head``).

Only the model's public methods are called; no timm ``forward`` is copied.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ._base import Host, register_host

_REQUIRED = ("blocks", "patch_embed", "num_prefix_tokens", "forward_features", "forward_head")


def _is_timm(model: nn.Module) -> bool:
    return type(model).__module__.startswith("timm.")


@register_host("timm")
class TimmHost(Host):
    """Any timm ViT with a flat list of blocks over ``prefix + H*W`` tokens."""

    requires = _REQUIRED
    lora_target_modules = ("qkv",)

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return (
            _is_timm(model)
            and not cls.missing(model)
            and isinstance(model.blocks, (nn.Sequential, nn.ModuleList))
            and hasattr(model.patch_embed, "patch_size")
        )

    @classmethod
    def missing(cls, model: nn.Module) -> list[str]:
        miss = [a for a in _REQUIRED if not hasattr(model, a)]
        if not _is_timm(model):
            miss.append("(not a timm model)")
        return miss

    @property
    def blocks(self) -> Sequence[nn.Module]:
        return self.model.blocks

    @property
    def embed_dim(self) -> int:
        m = self.model
        return int(getattr(m, "embed_dim", None) or m.num_features)

    @property
    def num_features(self) -> int:
        return int(getattr(self.model, "num_features", self.embed_dim))

    @property
    def in_chans(self) -> int:
        proj = getattr(self.model.patch_embed, "proj", None)
        return int(getattr(proj, "in_channels", 3))

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.model.num_prefix_tokens)

    @property
    def cls_index(self) -> int | None:
        # timm puts the class token first, then distillation / register tokens
        return 0 if getattr(self.model, "cls_token", None) is not None else None

    @property
    def dynamic(self) -> bool:
        return bool(getattr(self.model, "dynamic_img_size", False))

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        pe = self.model.patch_embed
        if self.dynamic and hasattr(pe, "dynamic_feat_size"):
            return tuple(pe.dynamic_feat_size((height, width)))
        return tuple(pe.grid_size)

    def check_image_size(self, height: int, width: int) -> None:
        pe = self.model.patch_embed
        img_size = getattr(pe, "img_size", None)
        if self.dynamic or img_size is None or not getattr(pe, "strict_img_size", True):
            return
        if (height, width) != tuple(img_size):
            raise ValueError(
                f"frames are {height}x{width} but this backbone was built for {img_size[0]}x{img_size[1]}; "
                "resize the video or create the model with dynamic_img_size=True"
            )

    def patch_dropout_active(self) -> bool:
        pd = getattr(self.model, "patch_drop", None)
        return pd is not None and float(getattr(pd, "prob", 0.0)) > 0

    def head_module_names(self) -> list[str]:
        return ["head"]

    def forward_features(self, frames: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(frames)

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(tokens, pre_logits=True)

    def head(self, features: torch.Tensor) -> torch.Tensor:
        return self.model.head(features)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.model.set_grad_checkpointing(enable)


@register_host("timm_distilled")
class TimmDistilledHost(TimmHost):
    """DeiT with a distillation token: two heads whose logits are averaged (timm eval behaviour)."""

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return super().matches(model) and hasattr(model, "head_dist") and getattr(model, "dist_token", None) is not None

    @property
    def num_features(self) -> int:
        return 2 * super().num_features

    def head_module_names(self) -> list[str]:
        return ["head", "head_dist"]

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        # keep both tokens: the two heads see their own token, averaged over frames
        drop = self.model.head_drop
        return torch.cat([drop(tokens[:, 0]), drop(tokens[:, 1])], dim=-1)

    def head(self, features: torch.Tensor) -> torch.Tensor:
        x, x_dist = features.chunk(2, dim=-1)
        return (self.model.head(x) + self.model.head_dist(x_dist)) / 2
