"""AdamW parameter groups (weight decay, layer-wise lr decay) and the warm-up + cosine schedule."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .config import ConfigError, OptimConfig

# backbone parameters that come before the first block (layer 0 for layer-wise lr decay)
_EMBED_KEYS = ("patch_embed", "cls_token", "reg_token", "dist_token", "pos_embed", "norm_pre", "mask_token",
               "conv1", "class_embedding", "positional_embedding", "ln_pre")
# parameters that never get weight decay besides 1-D ones (tokens, position tables)
_NO_DECAY_KEYS = ("cls_token", "reg_token", "dist_token", "pos_embed", "class_embedding", "positional_embedding",
                  "mask_token", "time_embed", "alpha", "query")


def _block_prefixes(model: nn.Module) -> dict[str, int]:
    """``{'backbone.blocks.3.': 3, ...}`` for the host's blocks, found by module identity."""
    host = getattr(model, "host", None)
    if host is None:
        return {}
    index = {id(b): i for i, b in enumerate(host.blocks)}
    return {f"{name}.": index[id(m)] for name, m in model.named_modules() if id(m) in index}


def layer_id(name: str, prefixes: dict[str, int], num_blocks: int) -> int:
    """0 for embeddings, ``i + 1`` inside block ``i``, ``num_blocks + 1`` for everything after
    (final norm, head) and for added modules (compressors, temporal adapters)."""
    for prefix, i in prefixes.items():
        if name.startswith(prefix):
            return i + 1
    if name.startswith("backbone.") and any(k in name for k in _EMBED_KEYS):
        return 0
    return num_blocks + 1


def param_groups(model: nn.Module, config: OptimConfig) -> list[dict[str, Any]]:
    """Trainable parameters grouped by (layer scale, weight decay), ready for ``torch.optim.AdamW``.

    Each group carries ``lr`` (= ``config.lr * lr_scale``), ``lr_scale`` and ``weight_decay``.
    No decay on 1-D parameters (norms, biases) and on tokens / position tables.
    """
    prefixes = _block_prefixes(model)
    num_blocks = len(model.host.blocks) if hasattr(model, "host") else 0
    decay = config.layer_decay if config.layer_decay not in (None, 1.0) else None
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim <= 1 or name.endswith(".bias") or name.rsplit(".", 1)[-1] in _NO_DECAY_KEYS
        lid = layer_id(name, prefixes, num_blocks) if decay is not None else num_blocks + 1
        key = (lid, no_decay)
        if key not in groups:
            scale = decay ** (num_blocks + 1 - lid) if decay is not None else 1.0
            groups[key] = {
                "params": [], "names": [], "lr": config.lr * scale, "lr_scale": scale,
                "weight_decay": 0.0 if no_decay else config.weight_decay,
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
