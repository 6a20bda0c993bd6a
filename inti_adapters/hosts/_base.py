"""Host descriptions: where a backbone keeps its blocks, its prefix tokens, how it pools.

A host wraps one backbone instance and answers the few questions ``InTIModel`` asks. Hosts
are registered by name; detection tries user-registered hosts first, then the built-in ones.
To support a new ViT family, subclass :class:`Host` and decorate it with
:func:`register_host` (see README, "Supporting a new host").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import ClassVar

import torch
from torch import nn

from .._registry import Registry
from ..errors import UnsupportedHostError


class Host:
    """Describes one backbone to ``InTIModel``. Subclasses override what differs.

    Required: ``matches``, ``blocks``, ``embed_dim``, ``forward_features``, ``pool``, ``head``.
    Tokens leave ``forward_features`` batch-first ``(B*T, N, C)``; block outputs may be laid
    out differently (``to_bnc``/``from_bnc`` convert).
    """

    name: ClassVar[str] = "base"
    lora_target_modules: ClassVar[tuple[str, ...]] = ()  # attention modules for the LoRA preset
    requires: ClassVar[tuple[str, ...]] = ()  # attribute names listed in "missing" errors

    def __init__(self, model: nn.Module) -> None:
        self.model = model

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

    def check_image_size(self, height: int, width: int) -> None:
        """Raise a clear ValueError if frames of this size cannot go through the backbone."""

    def patch_dropout_active(self) -> bool:
        """True if the backbone drops patch tokens at random in training (breaks pairing)."""
        return False

    def head_module_names(self) -> list[str]:
        """Names (relative to ``self.model``) of the classifier head's modules or parameters."""
        return []

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

    def head(self, features: torch.Tensor) -> torch.Tensor:
        """Video features ``(B, D)`` -> logits."""
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
        "inti_adapters.Host (blocks, embed_dim, num_prefix_tokens, forward_features, pool, head) "
        "and decorate it with @inti_adapters.register_host('my_vit'), or pass host='name'."
    )
