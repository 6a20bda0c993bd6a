"""Saving and loading adapters: one JSON config + safetensors, never pickle.

Layout of a saved directory::

    inti_config.json            config, version stamp, backbone description (sorted keys)
    adapter_model.safetensors   compressor / temporal-adapter weights (+ the head when it trains)
    backbone_model.safetensors  only when the backbone itself was trained (full fine-tuning)
    peft/                       only with LoRA (or another peft tuner): peft's own
                                adapter_config.json + adapter_model.safetensors

Files are written to a temporary name and renamed, so an interrupted save never leaves a
half-written file under the final name.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ._io import atomic_write
from ._version import __version__
from .config import InjectConfig
from .lora import is_peft_model, peft_adapter_parameters, unwrap_peft

if TYPE_CHECKING:
    from .model import InTIModel

logger = logging.getLogger(__name__)

CONFIG_NAME = "inti_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
BACKBONE_WEIGHTS_NAME = "backbone_model.safetensors"
FORMAT_VERSION = 1


PEFT_SUBFOLDER = "peft"


def adapter_keys(model: InTIModel) -> list[str]:
    """State-dict keys that belong in the adapter file."""
    keys = [k for k in model.state_dict() if k.startswith(("compressors.", "temporal."))]
    params = dict(model.named_parameters())
    head = model.head_parameter_names()
    if model.head is not None:
        keys += [k for k in model.state_dict() if k.startswith("head.")]
    elif any(params[k].requires_grad for k in head):
        keys += head
    return sorted(keys)


def _peft_keys(model: InTIModel) -> set[str]:
    ids = {id(p) for p in peft_adapter_parameters(model)}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def _backbone_trainable(model: InTIModel) -> bool:
    skip = set(model.head_parameter_names()) | _peft_keys(model)
    return any(p.requires_grad for n, p in model.named_parameters() if n.startswith("backbone.") and n not in skip)


def _saveable(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items()}


def save_pretrained(
    model: nn.Module,
    save_directory: str | os.PathLike,
    *,
    save_backbone: bool | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> None:
    """Save the adapter of ``model`` (an ``InTIModel``, or a ``PeftModel`` around one) to ``save_directory``.

    With peft in the model (LoRA before or after ``inject``), peft's part goes to
    ``save_directory/peft`` in peft's own format; ``load_pretrained`` restores both.

    Args:
        save_backbone: Also write the backbone weights. ``None`` (default) does so only when some
            backbone parameter is trainable, i.e. after full fine-tuning, so that no trained
            weight is silently lost.
        state_dict: A full state dict to save from (e.g. gathered from ZeRO-3 partitions);
            defaults to ``model.state_dict()``.
    """
    from .model import InTIModel

    peft_outer = model if is_peft_model(model) else None
    model = unwrap_peft(model)
    if not isinstance(model, InTIModel):
        raise TypeError(f"save_pretrained expects an InTIModel (or a PeftModel around one), got {type(model).__name__}")
    peft_inner = model.backbone if is_peft_model(model.backbone) else None
    out = Path(save_directory)
    out.mkdir(parents=True, exist_ok=True)
    outer_state_dict = state_dict
    if state_dict is not None and peft_outer is not None:
        prefix = "base_model.model."
        state_dict = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    sd = model.state_dict() if state_dict is None else state_dict
    keys = adapter_keys(model)
    missing = [k for k in keys if k not in sd]
    if missing:
        raise KeyError(f"state_dict lacks adapter keys {missing[:5]}{'...' if len(missing) > 5 else ''}")
    if save_backbone is None:
        save_backbone = _backbone_trainable(model)
    config = {
        "inti_adapters_version": __version__,
        "format_version": FORMAT_VERSION,
        "host": model.host.name,
        "backbone_class": f"{type(model.backbone).__module__}.{type(model.backbone).__qualname__}",
        "embed_dim": model.host.embed_dim,
        "depth": len(model.host.blocks),
        "inject": model.config.to_dict(),
        "custom_head": model.head is not None,
        "saved_backbone": bool(save_backbone),
        "peft": None,
    }
    peft_model = peft_outer or peft_inner
    if peft_model is not None:
        config["peft"] = {"order": "after_inject" if peft_outer is not None else "before_inject",
                          "subfolder": PEFT_SUBFOLDER}
        peft_sd = None  # a given (e.g. ZeRO-3-gathered) state dict must feed peft's file too
        if outer_state_dict is not None:
            peft_sd = outer_state_dict if peft_outer is not None else {
                k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
        peft_model.save_pretrained(str(out / PEFT_SUBFOLDER), state_dict=peft_sd)
    meta = {"format": "pt", "inti_adapters_version": __version__}
    atomic_write(out / ADAPTER_WEIGHTS_NAME,
                  lambda p: save_file(_saveable({k: sd[k] for k in keys}), p, metadata=meta))
    if save_backbone:
        skip = set(keys) | _peft_keys(model)
        bb = {k: v for k, v in sd.items() if k.startswith("backbone.") and k not in skip}
        atomic_write(out / BACKBONE_WEIGHTS_NAME, lambda p: save_file(_saveable(bb), p, metadata=meta))
        logger.info("saved backbone weights too (the backbone was trainable): %s", out / BACKBONE_WEIGHTS_NAME)
    elif (out / BACKBONE_WEIGHTS_NAME).exists():
        os.unlink(out / BACKBONE_WEIGHTS_NAME)  # stale file from an earlier save would mislead the loader

    atomic_write(out / CONFIG_NAME, json.dumps(config, indent=2, sort_keys=True) + "\n")


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    cfg_path = p / CONFIG_NAME if p.is_dir() else p
    if not cfg_path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {p}; expected a directory written by save_pretrained")
    with open(cfg_path) as f:
        cfg = json.load(f)
    fmt = cfg.get("format_version", 0)
    if fmt > FORMAT_VERSION:
        warnings.warn(
            f"{cfg_path} was written by inti_adapters {cfg.get('inti_adapters_version')} (format {fmt}); "
            f"this is {__version__} (format {FORMAT_VERSION}). Loading what this version understands.",
            stacklevel=3,
        )
    return cfg


def load_pretrained(
    backbone: nn.Module,
    path: str | os.PathLike,
    *,
    head: nn.Module | None = None,
    is_trainable: bool = True,
) -> nn.Module:
    """Inject ``backbone`` with the saved config and load the saved weights.

    Args:
        backbone: A freshly created backbone of the same architecture as the saved one (without
            peft: a saved peft part is restored from ``path/peft``).
        path: Directory written by :meth:`InTIModel.save_pretrained`.
        head: The custom head module, if the adapter was saved with one.
        is_trainable: If False, freeze every parameter (inference).

    Returns:
        The ``InTIModel``, or the ``PeftModel`` around it when LoRA was applied after ``inject``.
    """
    from .hosts import resolve_host
    from .model import InTIModel

    cfg = read_config(path)
    inject_cfg = InjectConfig.from_dict(cfg["inject"])
    peft_info = cfg.get("peft")
    if peft_info and is_peft_model(backbone):
        raise ValueError(f"{path} holds its own peft part: pass the plain backbone, not a PeftModel")
    if peft_info and peft_info["order"] == "before_inject":
        from peft import PeftModel

        backbone = PeftModel.from_pretrained(backbone, str(Path(path) / peft_info["subfolder"]),
                                             is_trainable=is_trainable)
    host = resolve_host(unwrap_peft(backbone), inject_cfg.host)
    if host.embed_dim != cfg["embed_dim"] or len(host.blocks) != cfg["depth"]:
        raise ValueError(
            f"the adapter in {path} was saved for a backbone of width {cfg['embed_dim']} and depth "
            f"{cfg['depth']} ({cfg['backbone_class']}); got width {host.embed_dim} and depth "
            f"{len(host.blocks)} ({type(backbone).__module__}.{type(backbone).__qualname__})"
        )
    if cfg.get("custom_head") and head is None:
        raise ValueError(f"the adapter in {path} was saved with a custom head: pass head=<module> to load it")
    model = InTIModel(backbone, inject_cfg, host, head=head)
    tensors = load_file(str(Path(path) / ADAPTER_WEIGHTS_NAME))
    if cfg.get("saved_backbone"):
        tensors.update(load_file(str(Path(path) / BACKBONE_WEIGHTS_NAME)))
    expected = set(model.state_dict())
    unexpected = sorted(set(tensors) - expected)
    if unexpected:
        model.unload()
        raise ValueError(f"{path} holds weights this model does not have: {unexpected[:5]}")
    missing = [k for k in adapter_keys(model) if k not in tensors]
    if [k for k in missing if k.startswith(("compressors.", "temporal."))]:
        model.unload()
        raise ValueError(f"{path} lacks adapter weights {missing[:5]}")
    model.load_state_dict(tensors, strict=False)
    result: nn.Module = model
    if peft_info and peft_info["order"] == "after_inject":
        from peft import PeftModel

        result = PeftModel.from_pretrained(model, str(Path(path) / peft_info["subfolder"]), is_trainable=is_trainable)
        if is_trainable:
            model.mark_added_modules_trainable(train_head=bool(set(tensors) & set(model.head_parameter_names())))
    if not is_trainable:
        for p in result.parameters():
            p.requires_grad_(False)
    return result
