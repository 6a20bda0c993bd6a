"""Saving and loading adapters: one JSON config + safetensors, never pickle.

Layout of a saved directory::

    inti_config.json            config, version stamp, backbone description (sorted keys)
    adapter_model.safetensors   compressor weights (+ the head when it trains or is custom)
    backbone_model.safetensors  only when the backbone itself was trained (full fine-tuning)

Files are written to a temporary name and renamed, so an interrupted save never leaves a
half-written file under the final name.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ._version import __version__
from .config import InjectConfig

if TYPE_CHECKING:
    from .model import InTIModel

logger = logging.getLogger(__name__)

CONFIG_NAME = "inti_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
BACKBONE_WEIGHTS_NAME = "backbone_model.safetensors"
FORMAT_VERSION = 1


def _head_keys(model: InTIModel) -> list[str]:
    heads = tuple(f"backbone.{h}." for h in model.host.head_module_names())
    return [n for n, _ in model.named_parameters() if n.startswith(heads) or n.startswith("head.")]


def adapter_keys(model: InTIModel) -> list[str]:
    """State-dict keys that belong in the adapter file."""
    keys = [k for k in model.state_dict() if k.startswith(("compressors.", "temporal."))]
    params = dict(model.named_parameters())
    head = _head_keys(model)
    if model.head is not None or any(params[k].requires_grad for k in head):
        keys += [k for k in model.state_dict() if k.startswith("head.")] if model.head is not None else head
    return sorted(keys)


def _backbone_trainable(model: InTIModel) -> bool:
    head = set(_head_keys(model))
    return any(p.requires_grad for n, p in model.named_parameters() if n.startswith("backbone.") and n not in head)


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _saveable(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items()}


def save_pretrained(
    model: InTIModel,
    save_directory: str | os.PathLike,
    *,
    save_backbone: bool | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> None:
    """Save the adapter of ``model`` to ``save_directory``.

    Args:
        save_backbone: Also write the backbone weights. ``None`` (default) does so only when some
            backbone parameter is trainable, i.e. after full fine-tuning, so that no trained
            weight is silently lost.
        state_dict: A full state dict to save from (e.g. gathered from ZeRO-3 partitions);
            defaults to ``model.state_dict()``.
    """
    out = Path(save_directory)
    out.mkdir(parents=True, exist_ok=True)
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
    }
    meta = {"format": "pt", "inti_adapters_version": __version__}
    _atomic_write(out / ADAPTER_WEIGHTS_NAME,
                  lambda p: save_file(_saveable({k: sd[k] for k in keys}), p, metadata=meta))
    if save_backbone:
        bb = {k: v for k, v in sd.items() if k.startswith("backbone.") and k not in keys}
        _atomic_write(out / BACKBONE_WEIGHTS_NAME, lambda p: save_file(_saveable(bb), p, metadata=meta))
        logger.info("saved backbone weights too (the backbone was trainable): %s", out / BACKBONE_WEIGHTS_NAME)
    elif (out / BACKBONE_WEIGHTS_NAME).exists():
        os.unlink(out / BACKBONE_WEIGHTS_NAME)  # stale file from an earlier save would mislead the loader

    def write_json(p: str) -> None:
        with open(p, "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
            f.write("\n")

    _atomic_write(out / CONFIG_NAME, write_json)


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
) -> InTIModel:
    """Inject ``backbone`` with the saved config and load the saved weights.

    Args:
        backbone: A freshly created backbone of the same architecture as the saved one.
        path: Directory written by :meth:`InTIModel.save_pretrained`.
        head: The custom head module, if the adapter was saved with one.
        is_trainable: If False, freeze every parameter (inference).
    """
    from .hosts import resolve_host
    from .model import InTIModel

    cfg = read_config(path)
    inject_cfg = InjectConfig.from_dict(cfg["inject"])
    host = resolve_host(backbone, inject_cfg.host)
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
    if not is_trainable:
        for p in model.parameters():
            p.requires_grad_(False)
    return model
