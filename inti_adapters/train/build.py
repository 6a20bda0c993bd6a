"""Build the video model of a recipe: backbone (timm / OpenCLIP, pretrained or a local file),
LoRA, then ``inject`` with the recipe's compressor layers and temporal adapters; or load a saved
adapter onto the recipe's backbone (``inti-eval``, ``inti-export``: :func:`load_saved_model`)."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._format import BACKBONE_WEIGHTS_NAME, read_config
from ..config import InjectConfig
from ..hosts import Host, resolve_host
from ..hub import resolve_adapter
from ..lora import lora_target_modules, unwrap_peft
from ..model import InTIModel, build_video_model
from ..serialization import load_pretrained
from ..video import MEAN_STD
from .config import ConfigError, ModelConfig

logger = logging.getLogger(__name__)

_WRAPPER_KEYS = ("state_dict", "model", "module", "model_state", "state_dict_ema")


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a local weights file: ``.safetensors`` or a torch file read with ``weights_only=True``.

    Common wrappers (``{'state_dict': ...}``, ``{'model': ...}``) and DDP ``module.`` prefixes are
    removed. Pickled objects other than tensors and plain containers are refused by torch.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model.checkpoint: no such file {path!r}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        sd: Any = load_file(path)
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # pickle.UnpicklingError and friends
            raise ValueError(
                f"cannot read {path} with torch.load(weights_only=True): {e}. Only tensors and plain "
                "containers are accepted; re-save the weights with torch.save(model.state_dict()) or safetensors."
            ) from None
    while isinstance(sd, dict) and not any(isinstance(v, torch.Tensor) for v in sd.values()):
        key = next((k for k in _WRAPPER_KEYS if isinstance(sd.get(k), dict)), None)
        if key is None:
            raise ValueError(f"{path} holds no tensors at its top level and none of the wrappers {_WRAPPER_KEYS}; "
                             f"found keys {list(sd)[:8]}")
        sd = sd[key]
    if not isinstance(sd, dict):
        raise ValueError(f"{path} does not hold a state dict (got {type(sd).__name__})")
    sd = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def load_backbone_weights(backbone: nn.Module, path: str | os.PathLike, head_names: tuple[str, ...] | None = None) -> None:
    """Load a local weights file into ``backbone`` (a timm model or an OpenCLIP visual tower).

    The host's ``filter_checkpoint`` runs first (for timm, the model family's
    ``checkpoint_filter_fn``, so OpenAI / OpenCLIP layouts and other position-table sizes convert as
    they do for timm's own weights; for an OpenCLIP tower, a whole CLIP checkpoint keeps its
    ``visual.`` tensors). A classifier (``head_names``, default: the host's) of another shape
    (different class count) is skipped with a warning; any other missing or mis-shaped tensor is
    an error.
    """
    sd = read_state_dict(path)
    host: Host = resolve_host(backbone)
    if head_names is None:
        head_names = tuple(host.head_module_names())
    own = backbone.state_dict()
    try:
        sd = host.filter_checkpoint(sd)
    except (RuntimeError, ValueError, KeyError) as e:  # e.g. a position table that cannot be resampled
        differ = [f"{k} {tuple(v.shape)} (the model expects {tuple(own[k].shape)})" for k, v in sd.items()
                  if k in own and v.shape != own[k].shape]
        hint = f"; tensors of another shape than the model's: {', '.join(differ[:4])}" if differ else ""
        raise ValueError(f"{path}: cannot convert the checkpoint for {type(backbone).__name__}: {e}{hint}") from None
    is_head = tuple(f"{h}." for h in head_names)
    if not any(k in own for k in sd):
        raise ValueError(f"no tensor of {path} matches {type(backbone).__name__}: the file has e.g. "
                         f"{sorted(sd)[:4]}, the model expects e.g. {sorted(own)[:4]}")
    load = {}
    for k, v in sd.items():
        if k in own and own[k].shape != v.shape:
            if k.startswith(is_head):
                logger.warning("not loading %s from %s: shape %s != model's %s (another class count)",
                               k, path, tuple(v.shape), tuple(own[k].shape))
                continue
            raise ValueError(f"{path}: tensor {k} has shape {tuple(v.shape)}, the model expects {tuple(own[k].shape)}")
        load[k] = v
    result = backbone.load_state_dict(load, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(is_head)]
    if missing:
        raise ValueError(f"{path} lacks {len(missing)} backbone tensors, e.g. {missing[:5]}")
    if result.unexpected_keys:
        logger.warning("ignored %d tensors of %s the model does not have, e.g. %s",
                       len(result.unexpected_keys), path, result.unexpected_keys[:5])


class BackboneDownloadError(ConfigError):
    """The pretrained weights a recipe asks for could not be fetched (offline, no access, no such model)."""


@contextlib.contextmanager
def _download_of(cfg: ModelConfig, pretrained: bool) -> Iterator[None]:
    """Turn a failed download of pretrained weights into one line: what was asked for and how to
    point at local weights instead (a wrong option, a TypeError, is reported as it is)."""
    try:
        yield
    except TypeError:
        raise
    except Exception as e:
        if not pretrained:
            raise
        first = (str(e).strip().splitlines() or [""])[0][:300]
        offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") else ""
        raise BackboneDownloadError(
            f"could not fetch the pretrained weights of {cfg.source} model {cfg.name!r} (model.pretrained="
            f"{cfg.pretrained!r}){offline}: {type(e).__name__}: {first}. Point model.checkpoint at a local weights "
            "file (.safetensors or a torch state dict), or fill the Hugging Face cache where the network is "
            "reachable; model.pretrained=false starts from random weights"
        ) from e


def create_backbone(cfg: ModelConfig, num_classes: int, *, lora: bool = True) -> tuple[nn.Module, nn.Module | None]:
    """The image backbone with its weights, plus a head when the backbone has none.

    timm models get ``num_classes`` outputs in their own head; an OpenCLIP visual tower gets a
    new ``nn.Linear`` head on its projected features. With ``model.lora`` (and ``lora=True``) the
    backbone comes back as a peft ``PeftModel`` (LoRA before ``inject``, the composition
    :mod:`inti_adapters.lora` documents); pass ``lora=False`` to get the plain backbone that
    :func:`inti_adapters.load_pretrained` expects (it restores a saved LoRA part itself).
    """
    kwargs = dict(cfg.model_kwargs)
    head: nn.Module | None = None
    if cfg.source == "timm":
        import timm

        pretrained = bool(cfg.pretrained) and cfg.checkpoint is None
        with _download_of(cfg, pretrained):
            backbone = timm.create_model(cfg.name, pretrained=pretrained, num_classes=num_classes, **kwargs)
        head_names = None  # the host's
    else:
        import open_clip

        tag = cfg.pretrained if isinstance(cfg.pretrained, str) and cfg.checkpoint is None else None
        with _download_of(cfg, tag is not None):
            clip = open_clip.create_model(cfg.name, pretrained=tag, **kwargs)
        backbone = clip.visual
        head = nn.Linear(int(backbone.output_dim), num_classes)
        head_names = ()
    if cfg.checkpoint is not None:
        load_backbone_weights(backbone, cfg.checkpoint, head_names)
    if cfg.lora is not None and lora:
        from peft import LoraConfig, get_peft_model

        options = {"target_modules": None, **cfg.lora}
        if options["target_modules"] is None:
            options["target_modules"] = lora_target_modules(backbone)
        try:
            backbone = get_peft_model(backbone, LoraConfig(**options))
        except TypeError as e:
            raise ConfigError(f"model.lora: {e}") from None
    return backbone, head


def load_saved_model(cfg: ModelConfig, num_classes: int, checkpoint: str | os.PathLike, *,
                     revision: str | None = None) -> tuple[nn.Module, nn.Module]:
    """A saved adapter (a folder or a Hub id) on the recipe's backbone, for inference; returns
    ``(model, backbone)``.

    When the folder holds the backbone's own weights (``backbone_model.safetensors``: full
    fine-tuning), the backbone is created without its pretrained weights, so nothing is downloaded:
    every backbone tensor then comes from the folder (``load_pretrained`` checks that none is missing).
    """
    folder = resolve_adapter(checkpoint, revision=revision)
    model_cfg = cfg
    if not folder.is_file() and read_config(folder).get("saved_backbone"):
        logger.info("the backbone's weights come from %s: not fetching model.pretrained / model.checkpoint",
                    Path(folder) / BACKBONE_WEIGHTS_NAME)
        model_cfg = dataclasses.replace(cfg, pretrained=False, checkpoint=None)
    backbone, head = create_backbone(model_cfg, num_classes, lora=False)  # a saved LoRA part loads itself
    return load_pretrained(backbone, folder, head=head, is_trainable=False), backbone


def mean_std_of(cfg: ModelConfig, backbone: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The normalisation of uint8 clips: explicit, a named preset, or the backbone's own (``auto``)."""
    if isinstance(cfg.mean_std, list):
        return tuple(cfg.mean_std[0]), tuple(cfg.mean_std[1])
    if cfg.mean_std != "auto":
        return MEAN_STD[cfg.mean_std]
    return resolve_host(backbone).mean_std() or MEAN_STD["clip"]


def build_model(cfg: ModelConfig, num_classes: int) -> tuple[InTIModel, tuple[tuple[float, ...], tuple[float, ...]]]:
    """The video model of a recipe and the mean/std its uint8 input is normalised with.

    Example:
        >>> from inti_adapters.train import ModelConfig, build_model
        >>> cfg = ModelConfig(name="vit_tiny_patch16_224", layers=[4, 6], model_kwargs={"img_size": 64})
        >>> model, mean_std = build_model(cfg, num_classes=10)   # doctest: +SKIP
    """
    backbone, head = create_backbone(cfg, num_classes)
    inject_fields = [f.name for f in dataclasses.fields(InjectConfig)]
    model = build_video_model(backbone, InjectConfig(**{k: getattr(cfg, k) for k in inject_fields}), head=head)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model, mean_std_of(cfg, unwrap_peft(backbone))
