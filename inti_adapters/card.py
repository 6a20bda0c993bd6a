"""The model card (``README.md``) that ``save_pretrained`` writes beside a saved adapter.

YAML front matter for the Hugging Face Hub (``library_name: inti_adapters``, tags, the base
model, ``pipeline_tag``, license and data set when given), then what a reader needs: the backbone,
the layers and compressor, the temporal adapters, the peft part, parameter counts, the frame
schedule and GFLOPs per view, metrics when given, and how to load it.

Counting GFLOPs runs the model on the meta device (shapes only, no copy of the weights), and
only when the frame count is known: ``save_pretrained(..., card={"num_frames": 16})`` (the frame
size defaults to the backbone's). Saving stays fast for any model size.

A ``README.md`` that this module did not write (no marker line) is never overwritten.

Example:
    >>> import timm, torch, inti_adapters as ia
    >>> vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=64)
    >>> model = ia.inject(vit, layers=[4, 6])
    >>> text = render_card(model, {"num_frames": 8, "metrics": {"top1": 61.5}, "views": "8×4×3"})
    >>> print(text.split("---")[1].strip())
    library_name: "inti_adapters"
    tags:
    - "inti_adapters"
    - "video-classification"
    - "timm"
    - "inti"
    base_model: "timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k"
    pipeline_tag: "video-classification"
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._config import Config, ConfigError, check_int, option
from ._format import BACKBONE_WEIGHTS_NAME, CARD_NAME
from ._io import atomic_write
from ._version import __version__
from .flops import count_gflops

__all__ = ["CardInfo", "card_info", "render_card", "write_card"]

logger = logging.getLogger(__name__)

MARKER = "<!-- written by inti_adapters: save_pretrained rewrites this card; delete this line to keep edits -->"


@dataclass
class CardInfo(Config):
    """What the caller adds to a model card (``save_pretrained(..., card={...})``)."""

    num_frames: int | None = option(None, help="Frames per view; with it the card states the frame schedule and "
                                               "GFLOPs per view (counted on the meta device).")
    image_size: int | list[int] | None = option(None, help="Frame size (an int or [height, width]) for GFLOPs; "
                                                           "default: the backbone's.")
    metrics: dict[str, Any] = option(default_factory=dict, help="Results to state, e.g. {'top1': 82.1}.")
    views: str | None = option(None, help="Test views in mmaction2's notation frames×clips×crops, e.g. '16×4×3'.")
    dataset: str | None = option(None, help="The data set (a Hub id or a name), e.g. 'kinetics400'.")
    base_model: str | None = option(None, help="Hub id of the pretrained backbone; default: what the backbone "
                                               "names (timm's pretrained_cfg['hf_hub_id']).")
    license: str | None = option(None, help="License id for the front matter, e.g. 'apache-2.0'.")
    tags: list[str] = option(default_factory=list, help="Extra Hub tags.")
    title: str | None = option(None, help="Heading of the card.")
    description: str | None = option(None, help="Free text (markdown) placed under the heading.")
    repo_id: str | None = option(None, help="Hub id shown in the usage snippet (push_to_hub sets it).")

    def __post_init__(self) -> None:
        check_int("card num_frames", self.num_frames, 1, optional=True)
        if not isinstance(self.metrics, dict):
            raise ConfigError(f"card metrics must be a mapping of name -> value, got {self.metrics!r}")
        size = [self.image_size] if isinstance(self.image_size, int) else self.image_size
        if size is not None and (len(size) not in (1, 2) or any(isinstance(s, bool) or not isinstance(s, int)
                                                               or s < 1 for s in size)):
            raise ConfigError(f"card image_size must be an int or [height, width], got {self.image_size!r}")

    def frame_size(self, host_size: tuple[int, int] | None) -> tuple[int, int] | None:
        """(height, width) for counting GFLOPs: the given size, else the backbone's."""
        size = self.image_size
        if size is None:
            return host_size
        if isinstance(size, int):
            return size, size
        return int(size[0]), int(size[-1])


def card_info(card: CardInfo | dict[str, Any] | None, **updates: Any) -> CardInfo:
    """``card`` as a :class:`CardInfo` (unknown keys are refused), with ``updates`` applied where unset."""
    if card is None:
        info = CardInfo()
    elif isinstance(card, CardInfo):
        info = card
    elif isinstance(card, dict):
        info = CardInfo.from_dict(card, strict=True)
    else:
        raise TypeError(f"card must be a dict of CardInfo fields, a CardInfo, None or False; got {type(card).__name__}")
    return replace(info, **{k: v for k, v in updates.items() if getattr(info, k) is None})


def _yaml(meta: dict[str, Any]) -> str:
    """Front matter: strings are JSON-quoted (valid YAML), lists one item a line."""
    lines = ["---"]
    for key, value in meta.items():
        if isinstance(value, list):
            lines += [f"{key}:"] + [f"- {json.dumps(str(v))}" for v in value]
        elif value is not None:
            lines.append(f"{key}: {json.dumps(str(value))}")
    return "\n".join(lines + ["---", ""])


def _count(p: torch.Tensor) -> int:
    return int(getattr(p, "ds_numel", p.numel()))  # ZeRO-3 partitions hold a slice; ds_numel is the whole


def _parameters(model: Any) -> list[str]:
    rows = ["| part | parameters | trainable |", "|---|---:|---:|"]
    groups = model._param_groups()
    for name, params in groups.items():
        if params:
            total, trained = sum(_count(p) for _, p in params), sum(_count(p) for _, p in params if p.requires_grad)
            rows.append(f"| {name} | {total:,} | {trained:,} |")
    every = [p for params in groups.values() for _, p in params]
    rows.append(f"| **total** | {sum(map(_count, every)):,} | {sum(_count(p) for p in every if p.requires_grad):,} |")
    return rows


def _schedule(schedule: list[int]) -> str:
    """[16, 16, 8, 4] -> 'blocks 0–1: 16, block 2: 8, block 3: 4'."""
    runs, start = [], 0
    for i in range(1, len(schedule) + 1):
        if i == len(schedule) or schedule[i] != schedule[start]:
            where = f"blocks {start}–{i - 1}" if i - 1 > start else f"block {start}"
            runs.append(f"{where}: {schedule[start]}")
            start = i
    return ", ".join(runs)


def _cost(model: Any, info: CardInfo) -> list[str]:
    if info.num_frames is None:
        return ["GFLOPs per view: not counted (save with `card={'num_frames': T}` to state them)."]
    lines = [f"Frames per block for a {info.num_frames}-frame view: {_schedule(model.frame_schedule(info.num_frames))}."]
    size = info.frame_size(model.host.image_size)
    if size is None:
        return lines + ["GFLOPs per view: not counted (the backbone takes any frame size: give `image_size`)."]
    video = torch.empty(1, 3, info.num_frames, *size)
    gflops = count_gflops(model, video, meta=True, layout="NCTHW")
    return lines + [f"**{gflops:.2f} GFLOPs per view** of {info.num_frames} frames at {size[0]}×{size[1]} "
                    "(multiply-adds, as in the paper; `ia.count_gflops`)."]


def _peft_text(peft_model: nn.Module | None, order: str) -> str:
    if peft_model is None:
        return "none"
    configs = getattr(peft_model, "peft_config", {}) or {}
    parts = []
    for name, cfg in configs.items():
        kind = getattr(getattr(cfg, "peft_type", None), "value", type(cfg).__name__)
        detail = ", ".join(f"{k}={getattr(cfg, k)!r}" for k in ("r", "lora_alpha") if getattr(cfg, k, None) is not None)
        targets = getattr(cfg, "target_modules", None)
        targets = sorted(targets) if isinstance(targets, (set, frozenset)) else targets
        parts.append(f"{kind} `{name}` ({detail}) on `{targets}`")
    return f"{'; '.join(parts) or 'peft'}, applied {order.replace('_', ' ')} (saved in `peft/`)"


def _usage(model: Any, info: CardInfo, base: str | None, saved_backbone: bool) -> list[str]:
    where = info.repo_id or "path/to/this/folder"
    num_classes = getattr(model.host.model, "num_classes", None)
    if model.host.name == "timm" and base and base.startswith("timm/"):
        extra = f", num_classes={num_classes}" if isinstance(num_classes, int) else ""
        create = f'backbone = timm.create_model("{base[len("timm/"):]}", pretrained={not saved_backbone}{extra})'
    else:
        create = f"backbone = ...  # a fresh {type(model.backbone).__name__}, created as for training"
    if saved_backbone:  # its weights come from this folder: downloading the pretrained ones would be wasted
        create += f"  # no pretrained weights needed: they come from {BACKBONE_WEIGHTS_NAME}"
    head = ", head=my_head" if model.head is not None else ""
    return ["```python", "import timm, torch, inti_adapters as ia", "", create,
            f'model = ia.load_pretrained(backbone, "{where}"{head})   # also: revision="..."',
            "logits = model(video)   # (B, 3, T, H, W) float frames, normalised", "```"]


def _overview(model: Any, peft_model: nn.Module | None, peft_order: str) -> list[str]:
    cfg, host = model.config, model.host
    options = ", ".join(f"{k}={v!r}" for k, v in sorted(cfg.compressor_config.items()))
    temporal = ", ".join(f"`{t['name']}` (blocks {t.get('blocks', 'all')!r}"
                         f"{', ' + t['placement'] if 'placement' in t else ''})" for t in cfg.temporal) or "none"
    layers = ", ".join(f"`blocks[{i}]`" for i in cfg.layers)
    rows = [("backbone", f"`{type(model.backbone).__module__}.{type(model.backbone).__qualname__}` "
                         f"({len(host.blocks)} blocks, width {host.embed_dim}; host `{host.name}`)"),
            ("layers", f"`{list(cfg.layers)}`: compressor on the output of {layers}" if cfg.layers
             else "`[]` (naive frame averaging: no compressor)"),
            ("compressor", f"`{cfg.compressor}` ({options})" if cfg.layers else "none"),
            ("temporal adapters", temporal),
            ("peft", _peft_text(peft_model, peft_order)),
            ("head", "custom module (pass `head=` to load)" if model.head is not None else "the backbone's"),
            ("input", f"`{cfg.input_layout}` float video")]
    return ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]


def _metrics(info: CardInfo) -> list[str]:
    if not info.metrics:
        return []
    rows = ["## Results", "", "| metric | value |", "|---|---:|"]
    rows += [f"| {k} | {v:.2f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in info.metrics.items()]
    notes = [f"data set: {info.dataset}" if info.dataset else "",
             f"views (frames×clips×crops, as mmaction2 writes them): {info.views}" if info.views else ""]
    return rows + [""] + [n + "." for n in notes if n] + [""]


def _backbone_note(saved_backbone: int | None) -> list[str]:
    if saved_backbone is None:
        return []
    return [f"This folder also holds the fine-tuned backbone's own weights, `{BACKBONE_WEIGHTS_NAME}` "
            f"({saved_backbone / 1e6:,.0f} MB): the backbone trained (full fine-tuning). Loading takes every "
            "backbone weight from it, so the backbone is created without pretrained weights.", ""]


def render_card(model: Any, card: CardInfo | dict[str, Any] | None = None, *, peft_model: nn.Module | None = None,
                peft_order: str = "before_inject", saved_backbone: int | None = None) -> str:
    """The card text of an ``InTIModel`` (and the ``peft_model`` holding its LoRA part); ``saved_backbone``:
    the size in bytes of the backbone file saved beside it, None when there is none."""
    info = card_info(card)
    base = info.base_model if info.base_model is not None else model.host.pretrained_id()
    tags = ["inti_adapters", "video-classification", model.host.name]
    tags += [model.config.compressor] if model.config.layers else []
    tags += [t["name"] for t in model.config.temporal] + (["peft", "lora"] if peft_model is not None else [])
    tags = list(dict.fromkeys(tags + list(info.tags)))
    meta = {"library_name": "inti_adapters", "tags": tags, "base_model": base, "license": info.license,
            "datasets": [info.dataset] if info.dataset else None, "pipeline_tag": "video-classification"}
    title = info.title or f"InTI video adapter for {base or type(model.backbone).__name__}"
    body = [MARKER, "", f"# {title}", "", info.description or "", "",
            f"A video adapter for an image ViT, saved by [inti_adapters](https://pypi.org/project/inti-adapters/) "
            f"{__version__}: load it onto a fresh backbone with `ia.load_pretrained`.", "",
            *_backbone_note(saved_backbone),
            "## Configuration", "", *_overview(model, peft_model, peft_order), "",
            "## Parameters", "", *_parameters(model), "", "## Cost", "", *_cost(model, info), "",
            *_metrics(info), "## Use", "", *_usage(model, info, base, saved_backbone is not None), ""]
    return _yaml(meta) + re.sub(r"\n{3,}", "\n\n", "\n".join(body))


def write_card(directory: str | os.PathLike, model: Any, card: CardInfo | dict[str, Any] | bool | None = None, *,
               peft_model: nn.Module | None = None, peft_order: str = "before_inject") -> Path | None:
    """Write ``README.md`` into ``directory`` (atomically) unless ``card is False`` or a README that this
    module did not write is there. Returns the path written, or None."""
    if card is False:
        return None
    path = Path(directory) / CARD_NAME
    if path.is_file() and MARKER not in path.read_text(errors="replace"):
        logger.info("kept %s: it was not written by inti_adapters", path)
        return None
    backbone_file = Path(directory) / BACKBONE_WEIGHTS_NAME
    atomic_write(path, render_card(model, None if card is True else card, peft_model=peft_model, peft_order=peft_order,
                                   saved_backbone=backbone_file.stat().st_size if backbone_file.is_file() else None))
    return path
