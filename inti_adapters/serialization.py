"""Saving and loading adapters, also with a peft part, in both orders (the format: :mod:`._format`).

``load_pretrained`` validates everything first (the config, the files, every key, shape and
dtype against the model it builds) and only then changes the backbone; when anything fails,
the backbone is left exactly as it was (weights, hooks, ``requires_grad``, peft layers).
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._format import (
    ADAPTER_WEIGHTS_NAME,
    BACKBONE_WEIGHTS_NAME,
    CONFIG_NAME,
    PEFT_SUBFOLDER,
    read_config,
    read_tensors,
)
from ._peft import is_peft_model, peft_adapter_parameters, unwrap_peft
from .config import InjectConfig
from .hosts import resolve_host
from .hub import resolve_adapter
from .model import InTIModel, build_video_model

__all__ = ["load_pretrained", "push_to_hub", "read_config", "save_pretrained", "whole_model_methods"]

_PEFT_SAVE_OPTIONS = ("is_main_process", "safe_serialization")  # peft's save options that keep a meaning here


def save_pretrained(
    model: nn.Module,
    save_directory: str | os.PathLike,
    *,
    save_backbone: bool | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
    card: Any = None,
    push_to_hub: bool = False,
    **hub_options: Any,
) -> Any:
    """Save the adapter of ``model`` (an ``InTIModel``, or a ``PeftModel`` around one) to ``save_directory``.

    With peft in the model (LoRA before or after ``inject``), peft's part goes to
    ``save_directory/peft`` in peft's own format; ``load_pretrained`` restores both.

    ``peft_model.save_pretrained(dir)`` of a model from :func:`inti_adapters.add_lora` (or loaded
    with LoRA after ``inject``) does the same.

    Args:
        model: The ``InTIModel``, or a ``PeftModel`` around one.
        save_directory: The folder to write (created if missing).
        save_backbone: Also write the backbone weights. ``None`` (default) does so only when some
            backbone parameter is trainable, i.e. after full fine-tuning, so that no trained
            weight is silently lost.
        state_dict: A full state dict to save from (e.g. gathered from ZeRO-3 partitions);
            defaults to ``model.state_dict()``.
        card: Model-card additions (``{"num_frames": 16, "metrics": {...}}``, see
            :class:`inti_adapters.card.CardInfo`) or False for no ``README.md``.
        push_to_hub, **hub_options: Also upload the folder to the Hub (``repo_id``, ``token``,
            ``private``, ``revision``, ``commit_message``, ``create_pr``). peft's ``is_main_process``
            (False: write nothing) and ``safe_serialization`` (True only) are accepted too.

    Returns:
        The Hub's ``CommitInfo`` with ``push_to_hub``, else None.
    """
    peft_options = {k: hub_options.pop(k) for k in _PEFT_SAVE_OPTIONS if k in hub_options}
    if peft_options.get("safe_serialization", True) is not True:
        raise ValueError("safe_serialization=False: inti_adapters writes safetensors only (never pickles)")
    if not peft_options.get("is_main_process", True):
        return None  # peft's convention: only the main process writes
    peft_outer = model if is_peft_model(model) else None
    inner = unwrap_peft(model)
    if not isinstance(inner, InTIModel):
        raise TypeError(f"save_pretrained expects an InTIModel (or a PeftModel around one), got {type(inner).__name__}")
    inner_sd = state_dict
    if state_dict is not None and peft_outer is not None:
        prefix = "base_model.model."
        inner_sd = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    return inner.save_pretrained(save_directory, save_backbone=save_backbone, state_dict=inner_sd,
                                 peft_outer=peft_outer, peft_state_dict=state_dict if peft_outer is not None else None,
                                 card=card, push_to_hub=push_to_hub, **hub_options)


class _WholeModelMethod:
    """A method of a ``PeftModel`` around an ``InTIModel`` that acts on the whole model: peft's own
    ``save_pretrained`` would write the LoRA part only and lose the InTI layers, temporal adapters
    and head. A plain object (not a closure), so that the model still pickles and deep-copies."""

    def __init__(self, model: nn.Module, function: Any) -> None:
        self.model, self.function = model, function
        self.__doc__ = function.__doc__

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.function(self.model, *args, **kwargs)


def _print_trainable_parameters(model: nn.Module) -> None:
    unwrap_peft(model).print_trainable_parameters()  # the per-part breakdown (compressors, peft, head, ...)


def _deepcopy(model: nn.Module, memo: dict[int, Any]) -> nn.Module:
    """A copy of the ``PeftModel`` itself. It and its tuner forward unknown attributes inward, so
    ``copy.deepcopy`` would find the inner ``InTIModel.__deepcopy__`` and copy the inner model only."""
    outer = (model, model.base_model)
    for obj in outer:
        memo.setdefault(id(obj), type(obj).__new__(type(obj)))
    for obj in reversed(outer):
        memo[id(obj)].__dict__.update(copy.deepcopy(obj.__dict__, memo))
    return memo[id(model)]


def whole_model_methods(peft_model: nn.Module) -> nn.Module:
    """Route ``save_pretrained``, ``push_to_hub`` and ``print_trainable_parameters`` of a
    ``PeftModel`` around an ``InTIModel`` (LoRA after ``inject``) to the whole model; returns it.

    ``peft_model.save_pretrained(dir)`` then writes what :func:`load_pretrained` reads back: the
    InTI config, compressors, temporal adapters, head and peft's part in ``dir/peft``.
    ``copy.deepcopy(peft_model)`` copies the ``PeftModel`` (not only the model inside it).
    """
    if is_peft_model(peft_model) and isinstance(unwrap_peft(peft_model), InTIModel):
        for name, function in (("save_pretrained", save_pretrained), ("push_to_hub", push_to_hub),
                               ("print_trainable_parameters", _print_trainable_parameters),
                               ("__deepcopy__", _deepcopy)):
            object.__setattr__(peft_model, name, _WholeModelMethod(peft_model, function))
    return peft_model


def push_to_hub(model: nn.Module, repo_id: str, *, save_backbone: bool | None = None, card: Any = None,
                **hub_options: Any) -> Any:
    """Upload the adapter of ``model`` (an ``InTIModel`` or a ``PeftModel`` around one) to the Hub.

    ``hub_options``: ``token``, ``private``, ``revision``, ``commit_message``, ``create_pr`` (see
    :meth:`InTIModel.push_to_hub`). Returns ``huggingface_hub``'s ``CommitInfo``.
    """
    with tempfile.TemporaryDirectory(prefix="inti_push_") as folder:
        return save_pretrained(model, folder, save_backbone=save_backbone, card=card, push_to_hub=True,
                               repo_id=repo_id, **hub_options)


def _check_tensors(model: InTIModel, tensors: dict[str, torch.Tensor], where: Path) -> None:
    """Every saved tensor exists in ``model`` with the same shape and a floating dtype; nothing is missing."""
    expected = model.state_dict()
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise ValueError(f"{where} holds weights this model does not have: {unexpected[:5]}")
    wrong = [f"{k}: saved {tuple(v.shape)}, model {tuple(expected[k].shape)}"
             for k, v in tensors.items() if tuple(v.shape) != tuple(expected[k].shape)]
    if wrong:
        raise ValueError(f"{where} was saved for another backbone configuration (patch size, image size, "
                         f"width?): {len(wrong)} tensors differ in shape, e.g. {wrong[:3]}")
    kinds = [f"{k}: {v.dtype}" for k, v in tensors.items() if v.is_floating_point() != expected[k].is_floating_point()]
    if kinds:
        raise ValueError(f"{where}: tensors of the wrong kind of dtype, e.g. {kinds[:3]}")
    missing = [k for k in model.adapter_keys() if k not in tensors and k.startswith(("compressors.", "temporal."))]
    if missing:
        raise ValueError(f"{where} lacks adapter weights {missing[:5]}")


def _read_saved(path: Path, cfg: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The tensors of the adapter file and (when the config says it was saved) of the backbone file."""
    adapter = read_tensors(path / ADAPTER_WEIGHTS_NAME)
    backbone = read_tensors(path / BACKBONE_WEIGHTS_NAME) if cfg.get("saved_backbone") else {}
    return adapter, backbone


def _check_sources(model: InTIModel, adapter: dict[str, torch.Tensor], backbone: dict[str, torch.Tensor],
                   path: Path) -> None:
    """Each file holds only the keys the saved config implies: the adapter file the compressors, temporal
    adapters and head; the backbone file the backbone's own weights. Anything else (e.g. a backbone
    tensor in the adapter file) could overwrite weights the config says were not saved: refused."""
    heads = set(model.head_parameter_names())
    stray = sorted(k for k in adapter if not (k.startswith(("compressors.", "temporal.")) or k in heads
                                              or (model.head is not None and k.startswith("head."))))
    if stray:
        raise ValueError(f"{path / ADAPTER_WEIGHTS_NAME} holds {stray[0]!r}{f' and {len(stray) - 1} more' if len(stray) > 1 else ''}, "
                         "which is not an adapter or head weight (the config says saved_backbone: "
                         f"{bool(backbone)}): refused, nothing was loaded")
    stray = sorted(k for k in backbone if not k.startswith("backbone.") or k.startswith(("compressors.", "temporal.")))
    if stray:
        raise ValueError(f"{path / BACKBONE_WEIGHTS_NAME} holds {stray[0]!r}, which is not a backbone weight: "
                         "refused, nothing was loaded")
    if backbone:  # the whole backbone was saved: every tensor of it comes from the folder (none left as created)
        peft = set(model._names_of(peft_adapter_parameters(model)))
        missing = sorted(k for k in model.state_dict() if k.startswith("backbone.") and k not in peft
                         and k not in backbone and k not in adapter)
        if missing:
            raise ValueError(f"{path / BACKBONE_WEIGHTS_NAME} lacks {len(missing)} backbone tensors, e.g. {missing[:3]}; "
                             "the file is incomplete")


def _inside(folder: Path, sub: str, what: str) -> Path:
    """``folder / sub``, refused unless it stays inside ``folder`` (no absolute path, no ``..``, no link out)."""
    target = folder / sub
    if Path(sub).is_absolute() or ".." in Path(sub).parts or not target.resolve().is_relative_to(folder.resolve()):
        raise ValueError(f"{folder / CONFIG_NAME}: {what} {sub!r} points outside the saved folder {folder}; "
                         "a saved adapter only names files inside its own folder")
    return target


def _check_peft_keys(folder: Path, tensors: dict[str, torch.Tensor]) -> None:
    """peft's file holds only its tuner's weights (and its modules_to_save): peft would load any
    other key into the base model, e.g. over a backbone weight."""
    from peft.mapping import PEFT_TYPE_TO_PREFIX_MAPPING

    config = json.loads((folder / "adapter_config.json").read_text())
    prefix = PEFT_TYPE_TO_PREFIX_MAPPING.get(config.get("peft_type")) if isinstance(config, dict) else None
    saved = set((config.get("modules_to_save") or []) if isinstance(config, dict) else [])
    stray = sorted(k for k in tensors if not ((prefix and prefix in k) or saved & set(k.split("."))))
    if stray:
        raise ValueError(f"{folder / 'adapter_model.safetensors'} holds {stray[0]!r}, which is not a weight of its "
                         f"peft tuner ({config.get('peft_type') if isinstance(config, dict) else '?'}, parameters "
                         f"named '{prefix}...'): refused, nothing was loaded")


def _check_peft_files(folder: Path) -> None:
    """peft's part is readable and holds only its tuner's weights (so that peft cannot fail half-way
    through injecting it, nor load anything over the backbone)."""
    config = folder / "adapter_config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{config} is missing: the saved adapter's peft part is incomplete")
    try:
        json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ValueError(f"{config} is not valid JSON ({type(e).__name__}); the file is truncated or damaged") from None
    weights = folder / "adapter_model.safetensors"
    if not weights.exists():
        raise FileNotFoundError(f"{folder} has no adapter_model.safetensors: the saved peft part is incomplete")
    _check_peft_keys(folder, read_tensors(weights))


def _check_backbone(backbone: nn.Module, cfg: dict[str, Any], inject_cfg: InjectConfig, path: Path,
                    head: nn.Module | None) -> None:
    if cfg.get("peft") and is_peft_model(backbone):
        raise ValueError(f"{path} holds its own peft part: pass the plain backbone, not a PeftModel")
    host = resolve_host(unwrap_peft(backbone), inject_cfg.host)
    if host.embed_dim != cfg["embed_dim"] or len(host.blocks) != cfg["depth"]:
        raise ValueError(
            f"the adapter in {path} was saved for a backbone of width {cfg['embed_dim']} and depth "
            f"{cfg['depth']} ({cfg.get('backbone_class')}); got width {host.embed_dim} and depth "
            f"{len(host.blocks)} ({type(backbone).__module__}.{type(backbone).__qualname__})"
        )
    if cfg.get("custom_head") and head is None:
        raise ValueError(f"the adapter in {path} was saved with a custom head: pass head=<module> to load it")


def _read_checked_config(path: Path) -> tuple[dict[str, Any], InjectConfig]:
    if path.is_file():
        raise ValueError(f"{path} is a file; load_pretrained takes the folder written by save_pretrained "
                         f"(here: {path.parent})")
    cfg = read_config(path)
    try:
        return cfg, InjectConfig.from_dict(cfg["inject"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path / CONFIG_NAME}: its 'inject' options are not valid: {e}") from None


def _peft_part(path: Path, cfg: dict[str, Any]) -> dict[str, Any]:
    """The saved peft part (order, and its folder: checked to lie inside ``path``), read and checked; {} if none."""
    peft_info = cfg.get("peft") or {}
    if peft_info:
        peft_info = {**peft_info, "subfolder": _inside(path, peft_info.get("subfolder", PEFT_SUBFOLDER), "peft.subfolder")}
        _check_peft_files(peft_info["subfolder"])
    return peft_info


def load_pretrained(
    backbone: nn.Module,
    path: str | os.PathLike,
    *,
    head: nn.Module | None = None,
    is_trainable: bool = True,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool | None = None,
) -> nn.Module:
    """Inject ``backbone`` with the saved config and load the saved weights.

    Args:
        backbone: A freshly created backbone of the same architecture as the saved one (without
            peft: a saved peft part is restored from ``path/peft``).
        path: Directory written by :meth:`InTIModel.save_pretrained`, or a Hugging Face Hub id
            ``"namespace/name"`` (downloaded whole first; ``HF_HUB_OFFLINE=1`` reads the cache only).
        head: The custom head module, if the adapter was saved with one.
        is_trainable: If False, freeze every parameter (inference).
        revision, token, cache_dir, local_files_only: For a Hub id (``huggingface_hub.snapshot_download``).

    Returns:
        The ``InTIModel``, or the ``PeftModel`` around it when LoRA was applied after ``inject``.

    Raises:
        ValueError / FileNotFoundError: On any problem with the saved files or the backbone; the
            backbone is then unchanged.
    """
    path = resolve_adapter(path, revision=revision, token=token, cache_dir=cache_dir, local_files_only=local_files_only)
    cfg, inject_cfg = _read_checked_config(path)
    _check_backbone(backbone, cfg, inject_cfg, path, head)
    adapter, saved_backbone = _read_saved(path, cfg)  # everything read (and checked by safetensors) before any change
    tensors = {**saved_backbone, **adapter}
    peft_info = _peft_part(path, cfg)
    before = peft_info.get("order") == "before_inject"
    if before:
        from peft import PeftModel

        backbone = PeftModel.from_pretrained(backbone, str(peft_info["subfolder"]), is_trainable=is_trainable)
    model: InTIModel | None = None
    try:
        model = build_video_model(backbone, inject_cfg, head=head)
        _check_sources(model, adapter, saved_backbone, path)
        for key, compressor in model.compressors.items():  # weights saved under older names
            compressor.upgrade_state_dict(tensors, f"compressors.{key}.")
        _check_tensors(model, tensors, path)
        result = _apply(model, tensors, peft_info, is_trainable)
    except BaseException:
        if model is not None:
            model.unload()  # hooks removed, requires_grad restored; no weight was written yet
        if before:
            backbone.unload()  # peft's LoRA layers out again: the caller's modules as they were
        raise
    if not is_trainable:
        for p in result.parameters():
            p.requires_grad_(False)
    return result


def _apply(model: InTIModel, tensors: dict[str, torch.Tensor], peft_info: dict[str, Any], is_trainable: bool) -> nn.Module:
    result: nn.Module = model
    if peft_info.get("order") == "after_inject":
        from peft import PeftModel

        result = whole_model_methods(PeftModel.from_pretrained(model, str(peft_info["subfolder"]),
                                                               is_trainable=is_trainable))
    model.load_state_dict(tensors, strict=False)  # checked: no error can leave it half-applied
    if result is not model and is_trainable:
        model.mark_added_modules_trainable(train_head=bool(set(tensors) & set(model.head_parameter_names())))
    return result
