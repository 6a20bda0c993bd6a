"""Host descriptions: every fact about a backbone family lives here and nowhere else.

A host wraps one backbone instance and answers the questions the rest of the package asks:
where the blocks are and what is inside them (attention, the end of the attention branch, the
fused ``qkv`` projection), the token layout (prefix tokens, class token, patch grid), how a
frame is pooled and classified, and the training facts (head, embedding and no-weight-decay
parameters, image size, normalisation, rotary embeddings). Hosts are registered by name;
detection tries user-registered hosts first, then the built-in ones. To support a new ViT
family, subclass :class:`Host` and decorate it with :func:`register_host` (README, "Supporting
a new host"): the required members are ``matches``, ``blocks``, ``embed_dim``,
``forward_features``, ``pool`` and ``classify``; the rest have defaults.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from .._registry import Registry
from ..errors import UnsupportedHostError


@dataclass(frozen=True)
class QKVProjection:
    """A block's fused query-key-value projection: ``module(x)`` gives ``[q; k; v]`` on the last dim."""

    module: nn.Module
    num_heads: int
    head_dim: int
    k_norm: nn.Module | None = None  # applied to the keys before attention (qk-norm), if any


class Host:
    """Describes one backbone. Subclasses override what differs.

    Required: ``matches``, ``blocks``, ``embed_dim``, ``forward_features``, ``pool``, ``classify``.
    Tokens leave ``forward_features`` batch-first ``(B*T, N, C)``; block outputs may be laid
    out differently (``to_bnc``/``from_bnc`` convert).
    """

    name: ClassVar[str] = "base"
    requires: ClassVar[tuple[str, ...]] = ()  # attribute names listed in "missing" errors
    attention_branch_ends: ClassVar[tuple[str, ...]] = ("drop_path1", "ls_1")  # timm, OpenCLIP

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "head" in cls.__dict__ and "classify" not in cls.__dict__:  # hosts written for 0.1
            warnings.warn(f"{cls.__name__}.head(features) is now called classify(features); using head",
                          DeprecationWarning, stacklevel=2)
            cls.classify = cls.__dict__["head"]  # type: ignore[method-assign]

    # -- detection ----------------------------------------------------------------------------
    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        raise NotImplementedError

    @classmethod
    def missing(cls, model: nn.Module) -> list[str]:
        """Names of the attributes this host needs that ``model`` lacks (for error messages)."""
        return [a for a in cls.requires if not hasattr(model, a)]

    # -- structure ----------------------------------------------------------------------------
    @property
    def blocks(self) -> Sequence[nn.Module]:
        raise NotImplementedError

    @property
    def embed_dim(self) -> int:
        raise NotImplementedError

    @property
    def num_features(self) -> int:
        """Width of the per-frame features that ``pool`` returns (the head's input)."""
        return self.embed_dim

    @property
    def in_chans(self) -> int:
        return 3

    @property
    def num_prefix_tokens(self) -> int:
        return 0

    @property
    def cls_index(self) -> int | None:
        return None

    def grid_size(self, height: int, width: int) -> tuple[int, int] | None:
        """Patch grid for an input of this size, or None if the host has no spatial grid."""
        return None

    @property
    def has_patch_grid(self) -> bool:
        """True if ``grid_size`` describes a spatial patch grid (the host overrides it)."""
        return type(self).grid_size is not Host.grid_size

    def check_image_size(self, height: int, width: int) -> None:
        """Raise a clear ValueError if frames of this size cannot go through the backbone."""

    def patch_dropout_active(self) -> bool:
        """True if the backbone drops patch tokens at random in training (breaks pairing)."""
        return False

    @property
    def image_size(self) -> tuple[int, int] | None:
        """Frame size the backbone was built for, or None if it takes any size."""
        return None

    @property
    def uses_rope(self) -> bool:
        """True if the blocks apply rotary position embeddings over the full patch grid."""
        return False

    def head_module_names(self) -> list[str]:
        """Names (relative to ``self.model``) of the classifier head's modules or parameters."""
        return []

    def embedding_names(self) -> list[str]:
        """Names (relative to ``self.model``) of the modules / parameters before the first block."""
        return []

    def no_weight_decay_names(self) -> set[str]:
        """Parameter names (relative to ``self.model``) that never get weight decay (tokens,
        position tables), besides 1-D parameters, which never do."""
        return set()

    def lora_targets(self) -> list[str] | str:
        """``target_modules`` for LoRA on the attention projections (peft: names or a regex)."""
        return []

    def mean_std(self) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
        """The normalisation the backbone was trained with, if it says."""
        return None

    def pretrained_id(self) -> str | None:
        """Hugging Face Hub id of the pretrained weights the backbone names, if it says (model cards)."""
        return None

    def filter_checkpoint(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Convert a checkpoint of this family (other layouts, position-table sizes) to the model's keys."""
        return state_dict

    # -- what is inside a block (for the surgery layer) -----------------------------------------
    def attention(self, block: nn.Module) -> nn.Module | None:
        """The block's attention module."""
        attn = getattr(block, "attn", None)
        return attn if isinstance(attn, nn.Module) else None

    def attention_branch_end(self, block: nn.Module) -> nn.Module | None:
        """The module whose output is the attention branch's contribution to the residual stream."""
        for name in self.attention_branch_ends:
            m = getattr(block, name, None)
            if isinstance(m, nn.Module):
                return m
        return None

    def qkv_projection(self, block: nn.Module) -> QKVProjection | None:
        """The block's fused ``qkv`` projection (to read attention keys), or None."""
        return None

    def attention_mask_keyword(self, block: nn.Module) -> str | None:
        """Keyword through which the block's attention module takes an additive logit bias, or None."""
        return None

    def head_parameters(self) -> list[nn.Parameter]:
        """The head's parameters, from ``head_module_names`` (module or parameter names)."""
        names = self.head_module_names()
        return [p for n, p in self.model.named_parameters()
                if any(n == h or n.startswith(h + ".") for h in names)]

    # -- computation --------------------------------------------------------------------------
    def forward_features(self, frames: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """Per-frame features before the classifier, ``(B*T, N, C) -> (B*T, D)``."""
        raise NotImplementedError

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """Video features ``(B, D)`` -> the backbone's output (its classifier head)."""
        raise NotImplementedError

    def to_bnc(self, x: torch.Tensor) -> torch.Tensor:
        """A block's output -> ``(B*T, N, C)``."""
        return x

    def from_bnc(self, x: torch.Tensor) -> torch.Tensor:
        """``(B*T, N, C)`` -> the layout the next block expects."""
        return x

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        raise NotImplementedError(f"host {self.name!r} does not support gradient checkpointing")


_HOSTS = Registry("host", Host, "register_host")


def register_host(name: str) -> Callable[[type[Host]], type[Host]]:
    """Class decorator: make a :class:`Host` subclass available by ``name`` and to detection."""

    def deco(cls: type[Host]) -> type[Host]:
        _HOSTS.add(name, cls)
        cls.name = name
        return cls

    return deco


def list_hosts() -> list[str]:
    return list(_HOSTS)


def resolve_host(model: nn.Module, name: str | None = None) -> Host:
    """The host for ``model``: the named one, or the most recently registered that matches."""
    if name is not None:
        if name not in _HOSTS:
            raise ValueError(f"unknown host {name!r}; registered hosts: {list_hosts()}")
        return _HOSTS[name](model)
    for cls in reversed(list(_HOSTS.values())):
        if cls.matches(model):
            return cls(model)
    hints = []
    for hname, cls in _HOSTS.items():
        miss = cls.missing(model)
        if miss:
            hints.append(f"  - {hname}: missing {', '.join(miss)}")
    raise UnsupportedHostError(
        f"inti_adapters does not know how to inject into {type(model).__module__}.{type(model).__name__}.\n"
        f"Known hosts and what this model lacks for each:\n" + "\n".join(hints) + "\n"
        "If this is a ViT with a flat list of transformer blocks, describe it: subclass "
        "inti_adapters.Host (blocks, embed_dim, num_prefix_tokens, forward_features, pool, classify) "
        "and decorate it with @inti_adapters.register_host('my_vit'), or pass host='name'."
    )
