"""OpenCLIP hosts: the ``VisionTransformer`` image tower and towers built around a timm trunk.

Each host accepts the tower itself (``inject(clip.visual, ...)``) or the whole CLIP model
(``inject(clip, ...)``; ``CLIP``, ``CustomTextCLIP``, ``CoCa``: any OpenCLIP model with a
``visual`` tower and ``encode_image``). What the video model returns:

- tower: the mean over the remaining frames of the per-frame tower outputs, exactly what
  ``visual(image)`` returns for one image (unnormalised; with ``output_tokens=True`` only the
  pooled output, no tokens);
- whole CLIP model: that mean, L2-normalised (``encode_image(..., normalize=True)`` of a
  video). A user ``head`` given to ``inject`` receives the mean *before* normalisation, so a
  head must normalise itself if it needs unit vectors (:class:`~inti_adapters.ZeroShotHead`
  does).

The head: the projection ``proj`` of an OpenCLIP ``VisionTransformer`` is a bare
``nn.Parameter``, not a module; ``head_module_names`` names it (``"proj"``, or ``"visual.proj"``
for a whole CLIP model) and ``Host.head_parameters`` matches parameter names exactly, so
``inject(..., freeze_backbone=True, train_head=True)`` trains the InTI layers and the projection
and freezes everything else (the text tower included). A ``TimmModel`` tower's head is its
``head`` module (and the trunk's own ``head``, which is the projection when the tower has none).

This module does not import ``open_clip``: hosts are recognised by the class names and
modules in the model's MRO, so importing inti_adapters never requires OpenCLIP.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedHostError
from ._base import Host, QKVProjection, register_host
from .timm import TimmHost

_VIT_PARTS = ("conv1", "class_embedding", "positional_embedding", "patch_dropout", "ln_pre", "transformer",
              "ln_post", "proj")


def _is_open_clip(obj: object, class_name: str | None = None) -> bool:
    """True if ``obj``'s class (or a base class) comes from OpenCLIP, optionally with this name."""
    return any(
        c.__module__.split(".")[0] == "open_clip" and (class_name is None or c.__name__ == class_name)
        for c in type(obj).__mro__
    )


def _is_full_clip(model: nn.Module) -> bool:
    """An OpenCLIP model with a ``visual`` tower (CLIP, CustomTextCLIP, CoCa), not a tower."""
    return _is_open_clip(model) and isinstance(getattr(model, "visual", None), nn.Module) and hasattr(
        model, "encode_image"
    )


def _tower(model: nn.Module) -> nn.Module:
    return model.visual if _is_full_clip(model) else model


def _describe(obj: object) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


class _OpenCLIPHost(Host):
    """What both OpenCLIP hosts share: tower vs whole model, and the video output."""

    tower_class: str = ""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        miss = self.missing(model)
        if miss:  # reached when the host is forced with inject(..., host=name)
            raise UnsupportedHostError(f"host {self.name!r} cannot describe {_describe(model)}: missing {', '.join(miss)}")
        self.is_clip = _is_full_clip(model)
        self.visual: nn.Module = _tower(model)
        self.prefix = "visual." if self.is_clip else ""

    @classmethod
    def _tower_missing(cls, visual: nn.Module) -> list[str]:  # pragma: no cover - overridden
        raise NotImplementedError

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return not cls.missing(model)

    @classmethod
    def missing(cls, model: nn.Module) -> list[str]:
        visual = _tower(model)
        where = "visual" if visual is not model else "the model"
        if not _is_open_clip(visual, cls.tower_class):
            return [f"(not an OpenCLIP {cls.tower_class} or a CLIP model whose visual tower is one: "
                    f"{where} is {_describe(visual)})"]
        prefix = "visual." if visual is not model else ""
        return [prefix + m for m in cls._tower_missing(visual)]

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """Identity for a tower; L2 normalisation for a whole CLIP model."""
        return F.normalize(features, dim=-1) if self.is_clip else features

    def mean_std(self) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
        cfg = getattr(self.visual, "preprocess_cfg", None) or {}
        mean = cfg.get("mean", getattr(self.visual, "image_mean", None))
        std = cfg.get("std", getattr(self.visual, "image_std", None))
        return (tuple(mean), tuple(std)) if mean is not None and std is not None else None

    def filter_checkpoint(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A whole CLIP checkpoint loaded into a tower keeps only the ``visual.`` tensors."""
        if not self.is_clip and any(k.startswith("visual.") for k in state_dict):
            return {k[len("visual."):]: v for k, v in state_dict.items() if k.startswith("visual.")}
        return state_dict


@register_host("open_clip")
class OpenCLIPHost(_OpenCLIPHost):
    """OpenCLIP ``VisionTransformer`` (3.x), batch-first or sequence-first blocks, class-token or
    average pooling, ``final_ln_after_pool``, attentional poolers, ``output_tokens``.

    The ~10 lines before the blocks (patch embedding, class token, positional embedding, patch
    dropout, ``ln_pre``) and after them (``ln_post``, pooling, ``proj``) are re-stated from
    OpenCLIP's public modules, because OpenCLIP has no public method for either half; the blocks
    run through ``visual.transformer`` itself (its layout transposes and gradient checkpointing).
    Tests hold ``pool(forward_features(x)) == visual(x)``.
    """

    tower_class = "VisionTransformer"

    @classmethod
    def _tower_missing(cls, visual: nn.Module) -> list[str]:
        miss = [a for a in _VIT_PARTS if not hasattr(visual, a)]
        if "transformer" not in miss and not isinstance(getattr(visual.transformer, "resblocks", None),
                                                        (nn.ModuleList, nn.Sequential)):
            miss.append("transformer.resblocks")
        return miss

    # -- structure ------------------------------------------------------------------------------
    @property
    def blocks(self) -> Sequence[nn.Module]:
        return self.visual.transformer.resblocks

    @property
    def embed_dim(self) -> int:
        return int(self.visual.conv1.out_channels)

    @property
    def num_features(self) -> int:
        v = self.visual
        if v.proj is not None:
            return int(v.proj.shape[1])
        return int(v.attn_pool.query.shape[1]) if v.attn_pool is not None else self.embed_dim

    @property
    def in_chans(self) -> int:
        return int(self.visual.conv1.in_channels)

    @property
    def num_prefix_tokens(self) -> int:
        return 1  # OpenCLIP always prepends a class token (also with pool_type='avg')

    @property
    def cls_index(self) -> int | None:
        return 0

    @property
    def batch_first(self) -> bool:
        """Layout the blocks run in, read from the model: ``(B, N, C)`` if True, ``(N, B, C)`` if False."""
        tr = self.visual.transformer
        bf = getattr(tr, "batch_first", None)
        if bf is None:  # releases without the flag: the attention modules know their layout
            bf = getattr(getattr(tr.resblocks[0], "attn", None), "batch_first", None)
        if bf is None:
            raise ValueError(
                f"cannot tell whether the blocks of {_describe(tr)} run batch-first: it has no "
                "batch_first attribute and its first block has no attn.batch_first"
            )
        return bool(bf)

    @property
    def image_size(self) -> tuple[int, int]:
        v = self.visual
        size = getattr(v, "image_size", None)
        if size is None:
            (gh, gw), (ph, pw) = v.grid_size, v.conv1.kernel_size
            return gh * ph, gw * pw
        return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        gh, gw = self.visual.grid_size
        return int(gh), int(gw)

    def check_image_size(self, height: int, width: int) -> None:
        ih, iw = self.image_size
        if (height, width) != (ih, iw):
            gh, gw = self.grid_size(ih, iw)
            raise ValueError(
                f"frames are {height}x{width} but this OpenCLIP VisionTransformer takes {ih}x{iw} images "
                f"(its positional embedding is fixed to a {gh}x{gw} patch grid); resize the frames, e.g. "
                "with the model's own preprocessing"
            )

    def patch_dropout_active(self) -> bool:
        return float(getattr(self.visual.patch_dropout, "prob", 0.0)) > 0

    def head_module_names(self) -> list[str]:
        return [self.prefix + "proj"]

    def embedding_names(self) -> list[str]:
        return [self.prefix + n for n in ("conv1", "class_embedding", "positional_embedding", "ln_pre")]

    def no_weight_decay_names(self) -> set[str]:
        return {self.prefix + "class_embedding", self.prefix + "positional_embedding"}

    def lora_targets(self) -> str:
        """The visual tower's ``nn.MultiheadAttention`` modules only (a regex: the text tower's
        blocks have the same relative names, and may sit under ``backbone.`` after inject)."""
        return rf"(.*\.)?{re.escape(self.prefix)}transformer\.resblocks\.\d+\.attn"

    # -- computation ----------------------------------------------------------------------------
    @property
    def _contrastive_pool(self) -> nn.Module | None:
        return getattr(self.visual, "attn_pool_contrastive", None) if self.visual.attn_pool is not None else None

    @property
    def _ln_post_on_tokens(self) -> bool:
        v = self.visual
        if v.attn_pool is not None:
            return self._contrastive_pool is not None  # parallel/cascade poolers read normed tokens
        return not getattr(v, "final_ln_after_pool", False)

    def forward_features(self, frames: torch.Tensor) -> torch.Tensor:
        """Frames ``(B*T, 3, H, W)`` -> tokens ``(B*T, 1 + H'*W', C)``; ``ln_post`` applied when
        OpenCLIP applies it to the tokens (not with ``final_ln_after_pool`` or the CoCa pooler)."""
        v = self.visual
        x = v.conv1(frames).flatten(2).transpose(1, 2)  # (BT, H'*W', C)
        cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)
        x = v.ln_pre(v.patch_dropout(x))
        x = v.transformer(x)  # takes and returns batch-first tokens in either block layout
        return v.ln_post(x) if self._ln_post_on_tokens else x

    def _global_pool(self, x: torch.Tensor) -> torch.Tensor:
        pool_type = self.visual.pool_type
        if pool_type == "avg":
            return x[:, 1:].mean(dim=1)
        return x[:, 0] if pool_type == "tok" else x

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens -> the per-frame output of ``visual(image)`` (pooled, projected, not normalised)."""
        v = self.visual
        contrastive = self._contrastive_pool
        if contrastive is not None:
            if getattr(v, "attn_pool_type", "") == "cascade":
                pooled = contrastive(v.attn_pool(tokens))
            else:
                pooled = contrastive(tokens)
        elif v.attn_pool is not None:
            pooled = self._global_pool(v.ln_post(v.attn_pool(tokens)))
        elif self._ln_post_on_tokens:
            pooled = self._global_pool(tokens)
        else:
            pooled = v.ln_post(self._global_pool(tokens))
        return pooled @ v.proj if v.proj is not None else pooled

    def to_bnc(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.batch_first else x.transpose(0, 1)

    def from_bnc(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.batch_first else x.transpose(0, 1)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.set_grad_checkpointing(enable)


@register_host("open_clip_timm")
class OpenCLIPTimmHost(_OpenCLIPHost):
    """OpenCLIP ``TimmModel`` tower (``visual.trunk`` is a timm ViT, ``visual.head`` maps the
    trunk's pooled features to the embedding). The trunk is described by :class:`TimmHost`."""

    tower_class = "TimmModel"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.trunk = TimmHost(self.visual.trunk)

    @classmethod
    def _tower_missing(cls, visual: nn.Module) -> list[str]:
        trunk, head = getattr(visual, "trunk", None), getattr(visual, "head", None)
        if trunk is None or head is None:
            return [a for a in ("trunk", "head") if getattr(visual, a, None) is None]
        if not TimmHost.matches(trunk):
            return [f"trunk.{m}" for m in TimmHost.missing(trunk)] or [
                f"(trunk {_describe(trunk)} is not a timm ViT with a flat list of blocks)"
            ]
        return []

    # -- structure: the trunk's ----------------------------------------------------------------
    @property
    def blocks(self) -> Sequence[nn.Module]:
        return self.trunk.blocks

    @property
    def embed_dim(self) -> int:
        return self.trunk.embed_dim

    @property
    def num_features(self) -> int:
        linears = [m for m in self.visual.head.modules() if isinstance(m, nn.Linear)]
        if linears:
            return int(linears[-1].out_features)
        trunk_head = getattr(self.visual.trunk, "head", None)
        if isinstance(trunk_head, nn.Linear):
            return int(trunk_head.out_features)
        return self.trunk.num_features

    @property
    def in_chans(self) -> int:
        return self.trunk.in_chans

    @property
    def num_prefix_tokens(self) -> int:
        return self.trunk.num_prefix_tokens

    @property
    def cls_index(self) -> int | None:
        return self.trunk.cls_index

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        return self.trunk.grid_size(height, width)

    def check_image_size(self, height: int, width: int) -> None:
        self.trunk.check_image_size(height, width)

    def patch_dropout_active(self) -> bool:
        return self.trunk.patch_dropout_active()

    def head_module_names(self) -> list[str]:
        # the trunk's own classifier is OpenCLIP's projection when the tower has no extra one
        return [self.prefix + "head", self.prefix + "trunk.head"]

    # -- the trunk's facts, under the tower's names ----------------------------------------------
    def _trunk_names(self, names: list[str] | set[str]) -> list[str]:
        return [f"{self.prefix}trunk.{n}" for n in names]

    def embedding_names(self) -> list[str]:
        return self._trunk_names(self.trunk.embedding_names())

    def no_weight_decay_names(self) -> set[str]:
        return set(self._trunk_names(self.trunk.no_weight_decay_names()))

    def lora_targets(self) -> list[str] | str:
        return self.trunk.lora_targets()  # the trunk's attention; the text tower has none

    @property
    def image_size(self) -> tuple[int, int] | None:
        return self.trunk.image_size

    @property
    def uses_rope(self) -> bool:
        return self.trunk.uses_rope

    def attention(self, block: nn.Module) -> nn.Module | None:
        return self.trunk.attention(block)

    def attention_branch_end(self, block: nn.Module) -> nn.Module | None:
        return self.trunk.attention_branch_end(block)

    def qkv_projection(self, block: nn.Module) -> QKVProjection | None:
        return self.trunk.qkv_projection(block)

    def attention_mask_keyword(self, block: nn.Module) -> str | None:
        return self.trunk.attention_mask_keyword(block)

    # -- computation ----------------------------------------------------------------------------
    def forward_features(self, frames: torch.Tensor) -> torch.Tensor:
        return self.trunk.forward_features(frames)

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens -> the per-frame output of ``visual(image)``: the trunk's pooling and head, then
        the tower's projection head."""
        return self.visual.head(self.visual.trunk.forward_head(tokens))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        # the trunk directly: TimmModel.set_grad_checkpointing only logs a warning when it fails
        self.trunk.set_grad_checkpointing(enable)
