"""Composition with peft (LoRA and other tuners), in both orders.

- LoRA first: ``inject(get_peft_model(vit, LoraConfig(...)), layers=[4, 6])``. The host is
  found inside the ``PeftModel``; the backbone's base weights stay frozen as peft left them and
  LoRA + InTI (+ the head, ``train_head=True``) train.
- InTI first: ``add_lora(inject(vit, layers=[4, 6]), LoraConfig(...))``. Plain
  ``get_peft_model`` would freeze the InTI layers (peft freezes everything it did not add);
  ``add_lora`` calls it and then marks the InTI layers (and the head, if asked) trainable again.
  Do not list InTI modules in ``modules_to_save``: peft would train a copy the hooks never call.

``lora_preset(backbone)`` gives the documented common case: LoRA on attention (``qkv`` for
timm, ``attn`` for OpenCLIP) with rank 16.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ._peft import is_peft_model, peft_adapter_parameters, unwrap_peft
from .hosts import resolve_host
from .model import InTIModel
from .serialization import whole_model_methods

__all__ = ["add_lora", "is_peft_model", "lora_preset", "lora_target_modules", "peft_adapter_parameters", "unwrap_peft"]


def lora_target_modules(backbone: nn.Module) -> list[str] | str:
    """Attention modules to adapt for the host of ``backbone``: names (timm: ``qkv``) or a regex
    (OpenCLIP: the visual tower's ``attn``, not the text tower's)."""
    host = resolve_host(unwrap_peft(backbone))
    targets = host.lora_targets()
    if not targets:
        raise ValueError(f"host {host.name!r} has no LoRA preset; pass target_modules yourself")
    return targets if isinstance(targets, str) else list(targets)


def lora_preset(backbone: nn.Module, r: int = 16, lora_alpha: int = 16, lora_dropout: float = 0.0, **kwargs: Any):
    """``LoraConfig`` for LoRA on the attention projections of ``backbone`` (timm: ``qkv``,
    OpenCLIP: ``attn``). Extra keyword arguments go to ``LoraConfig``."""
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                      target_modules=lora_target_modules(backbone), **kwargs)


def add_lora(model: InTIModel, lora_config: Any, *, train_head: bool = True) -> nn.Module:
    """Apply a peft config to an injected model, keeping the InTI layers (and head) trainable.

    Args:
        model: The ``InTIModel`` from :func:`inti_adapters.inject`.
        lora_config: A peft config, e.g. ``LoraConfig(r=16, target_modules=["qkv"])`` or
            :func:`lora_preset`.
        train_head: Keep the classifier head trainable too (peft would freeze it).

    Returns the ``PeftModel``. Its ``save_pretrained(dir)`` saves the whole model (InTI config,
    compressors, temporal adapters, head, and peft's part in ``dir/peft``) as
    :func:`inti_adapters.save_pretrained` does, so :func:`inti_adapters.load_pretrained` restores it;
    ``push_to_hub`` likewise; ``print_trainable_parameters()`` prints the per-part breakdown
    (compressors, temporal, peft, head, backbone) of LoRA + InTI (+ head).
    """
    from peft import get_peft_model

    if not isinstance(model, InTIModel):
        raise TypeError(f"add_lora expects an InTIModel (from inject), got {type(model).__name__}")
    try:
        peft_model = get_peft_model(model, lora_config)
    except ValueError as e:
        targets = getattr(lora_config, "target_modules", None)
        targets = sorted(targets) if isinstance(targets, (set, frozenset)) else targets
        raise ValueError(
            f"LoRA target_modules {targets!r} match no module of {type(model.host.model).__name__} "
            f"(peft said: {e}). For this host try {lora_target_modules(model.host.model)}."
        ) from e
    model.mark_added_modules_trainable(train_head=train_head)
    return whole_model_methods(peft_model)
