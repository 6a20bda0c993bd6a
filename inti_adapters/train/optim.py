"""AdamW parameter groups (weight decay, layer-wise lr decay) and the warm-up + cosine schedule."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .._peft import unwrap_peft
from ..model import InTIModel
from .config import ConfigError, OptimConfig


def _video_model(model: nn.Module) -> InTIModel:
    inner = unwrap_peft(model)  # a PeftModel around the InTIModel (LoRA after inject)
    if not isinstance(inner, InTIModel):
        raise TypeError(f"param_groups expects an InTIModel (or a PeftModel around one), got {type(inner).__name__}")
    return inner


def param_groups(model: nn.Module, config: OptimConfig) -> list[dict[str, Any]]:
    """Trainable parameters grouped by (layer scale, weight decay), ready for ``torch.optim.AdamW``.

    Each group carries ``lr`` (= ``config.lr * lr_scale``), ``lr_scale`` and ``weight_decay``;
    ``lr_scale`` is the layer-wise decay factor, times ``config.added_lr_scale`` for the added
    modules (compressors, temporal adapters). No decay on 1-D parameters (norms, biases) and on
    what the model declares (:meth:`InTIModel.no_weight_decay`: the host's tokens and position
    tables, the added modules' own). Layer ids for layer-wise decay come from :meth:`InTIModel.layer_ids` (host facts).
    """
    video = _video_model(model)
    num_blocks = len(video.host.blocks)
    decay = config.layer_decay if config.layer_decay not in (None, 1.0) else None
    layer_ids = video.layer_ids()
    ids = {id(p): layer_ids[n] for n, p in video.named_parameters()}  # by identity: names differ under peft
    no_decay = video.no_weight_decay()
    no_decay_ids = {id(p) for n, p in video.named_parameters() if n in no_decay}
    added_ids = {id(p) for p in (*video.compressors.parameters(), *video.temporal.parameters())}
    groups: dict[tuple[int, bool, bool], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exempt = p.ndim <= 1 or name.endswith(".bias") or id(p) in no_decay_ids
        lid = ids.get(id(p), num_blocks + 1) if decay is not None else num_blocks + 1
        added = id(p) in added_ids
        key = (lid, exempt, added)
        if key not in groups:
            scale = decay ** (num_blocks + 1 - lid) if decay is not None else 1.0
            scale *= config.added_lr_scale if added else 1.0
            groups[key] = {
                "params": [], "names": [], "lr": config.lr * scale, "lr_scale": scale,
                "weight_decay": 0.0 if exempt else config.weight_decay,
            }
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    if not groups:
        raise ValueError("the model has no trainable parameters; check model.freeze_backbone / model.lora")
    return [groups[k] for k in sorted(groups)]


def build_optimizer(model: nn.Module, config: OptimConfig) -> torch.optim.AdamW:
    """torch AdamW over :func:`param_groups` (the group names are dropped: DeepSpeed wants tensors only)."""
    groups = [{k: v for k, v in g.items() if k != "names"} for g in param_groups(model, config)]
    return torch.optim.AdamW(groups, lr=config.lr, betas=tuple(config.betas), eps=config.eps,
                             weight_decay=config.weight_decay)


class WarmupCosine:
    """Learning-rate factor for ``LambdaLR``: linear warm-up to 1, then cosine to ``min_ratio``.

    Step ``s`` (0-based optimizer step) uses ``min(1, (s + 1) / warmup)`` during warm-up, so the
    first step already moves; the cosine spans the remaining ``total - warmup`` steps.
    """

    def __init__(self, warmup_steps: int, total_steps: int, min_ratio: float) -> None:
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        self.warmup_steps = int(warmup_steps)
        self.total_steps = int(total_steps)
        self.min_ratio = float(min_ratio)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, config: OptimConfig, *, steps_per_epoch: int,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """``LambdaLR`` with :class:`WarmupCosine`; each group keeps its own ``lr_scale``."""
    warmup = config.warmup_steps if config.warmup_steps is not None else round(config.warmup_epochs * steps_per_epoch)
    if warmup >= total_steps and total_steps > 1:
        source = (f"optim.warmup_steps={config.warmup_steps}" if config.warmup_steps is not None
                  else f"optim.warmup_epochs={config.warmup_epochs} x {steps_per_epoch} steps per epoch")
        raise ConfigError(f"warm-up of {warmup} steps ({source}) must be shorter than the {total_steps} training "
                          "steps; lower the warm-up or train longer")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(warmup, total_steps, config.min_lr_ratio))
