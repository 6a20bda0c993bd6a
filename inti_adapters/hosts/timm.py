"""timm hosts: ``VisionTransformer`` (class/dist/register tokens, avg/map pooling,
``no_embed_class``, dynamic image size, DeiT3), ``Eva`` and ``Beit``, plus any other timm model
with the same public structure (``blocks``, ``patch_embed``, ``num_prefix_tokens``,
``forward_features``, ``forward_head``).

Only the model's public methods are called; no timm ``forward`` is copied.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence

import torch
from torch import nn

from ._base import Host, QKVProjection, register_host

_REQUIRED = ("blocks", "patch_embed", "num_prefix_tokens", "forward_features", "forward_head")


def _is_timm(model: nn.Module) -> bool:
    return type(model).__module__.startswith("timm.")


def _timm_attention_class() -> type | None:
    try:
        from timm.models.vision_transformer import Attention
    except ImportError:  # pragma: no cover - timm is optional
        return None
    return Attention


# parameters before the first block, for models without timm's group_matcher()
_STEM = r"^(cls_token|reg_token|dist_token|pos_embed|patch_embed|norm_pre|mask_token)"


@register_host("timm")
class TimmHost(Host):
    """Any timm ViT with a flat list of blocks over ``prefix + H*W`` tokens."""

    requires = _REQUIRED

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

    @property
    def image_size(self) -> tuple[int, int] | None:
        img = getattr(self.model.patch_embed, "img_size", None)
        return None if img is None or self.dynamic else (int(img[0]), int(img[1]))

    @property
    def uses_rope(self) -> bool:
        return getattr(self.model, "rope", None) is not None

    def head_module_names(self) -> list[str]:
        clf = (getattr(self.model, "pretrained_cfg", None) or {}).get("classifier") or "head"
        return [clf] if isinstance(clf, str) else list(clf)

    def embedding_names(self) -> list[str]:
        matcher = getattr(self.model, "group_matcher", None)
        stem = matcher(coarse=True).get("stem", _STEM) if callable(matcher) else _STEM
        stem = stem if isinstance(stem, str) else _STEM
        return [n for n, _ in self.model.named_parameters() if re.match(stem, n)]

    def no_weight_decay_names(self) -> set[str]:
        nwd = getattr(self.model, "no_weight_decay", None)
        names = set(nwd()) if callable(nwd) else {"pos_embed", "cls_token", "reg_token", "dist_token"}
        return names | {n for n in ("mask_token",) if getattr(self.model, n, None) is not None}

    def lora_targets(self) -> list[str] | str:
        return ["qkv"]

    def mean_std(self) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
        cfg = getattr(self.model, "pretrained_cfg", None) or {}
        if cfg.get("mean") is None or cfg.get("std") is None:
            return None
        return tuple(cfg["mean"]), tuple(cfg["std"])

    def pretrained_id(self) -> str | None:
        cfg = getattr(self.model, "pretrained_cfg", None) or {}
        return cfg.get("hf_hub_id") or None

    def filter_checkpoint(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """timm's own ``checkpoint_filter_fn`` of the model family (OpenAI / OpenCLIP layouts,
        position tables of another size)."""
        filter_fn = getattr(sys.modules.get(type(self.model).__module__), "checkpoint_filter_fn", None)
        return filter_fn(state_dict, self.model) if filter_fn is not None else state_dict

    def qkv_projection(self, block: nn.Module) -> QKVProjection | None:
        attn, cls = self.attention(block), _timm_attention_class()
        if cls is None or not isinstance(attn, cls):
            return None
        return QKVProjection(attn.qkv, int(attn.num_heads), int(attn.head_dim), getattr(attn, "k_norm", None))

    def attention_mask_keyword(self, block: nn.Module) -> str | None:
        cls = _timm_attention_class()
        return "attn_mask" if cls is not None and isinstance(self.attention(block), cls) else None

    def forward_features(self, frames: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(frames)

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(tokens, pre_logits=True)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
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

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        x, x_dist = features.chunk(2, dim=-1)
        return (self.model.head(x) + self.model.head_dist(x_dist)) / 2
