"""The on-disk format of a saved adapter: file names, version stamp, reading and writing.

Layout of a saved directory::

    inti_config.json            config, version stamp, backbone description (sorted keys)
    adapter_model.safetensors   compressor / temporal-adapter weights (+ the head when it trains)
    backbone_model.safetensors  only when the backbone itself was trained (full fine-tuning)
    peft/                       only with LoRA (or another peft tuner): peft's own files
    README.md                   a model card

Never pickle: tensors go through safetensors, everything else through JSON. Files are written
atomically (:mod:`inti_adapters._io`), so an interrupted save never leaves a half-written file
under the final name. Reading validates everything and names the file in every error.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ._io import atomic_write
from ._version import __version__

__all__ = [
    "ADAPTER_WEIGHTS_NAME",
    "BACKBONE_WEIGHTS_NAME",
    "CARD_NAME",
    "CONFIG_NAME",
    "FORMAT_VERSION",
    "PEFT_SUBFOLDER",
    "read_config",
    "read_tensors",
    "write_config",
    "write_tensors",
]

CONFIG_NAME = "inti_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
BACKBONE_WEIGHTS_NAME = "backbone_model.safetensors"
PEFT_SUBFOLDER = "peft"
CARD_NAME = "README.md"  # the model card (inti_adapters.card)
FORMAT_VERSION = 1  # the one version stamp of saved adapters


def write_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor]) -> None:
    """Write ``tensors`` (detached, on the CPU, contiguous) as safetensors, atomically."""
    plain = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    meta = {"format": "pt", "inti_adapters_version": __version__}
    atomic_write(path, lambda p: save_file(plain, p, metadata=meta))


def write_config(path: str | os.PathLike, config: dict[str, Any]) -> None:
    """Write the adapter config JSON (sorted keys, version stamp added), atomically."""
    stamped = {**config, "inti_adapters_version": __version__, "format_version": FORMAT_VERSION}
    atomic_write(path, json.dumps(stamped, indent=2, sort_keys=True) + "\n")


def _shape_problems(cfg: dict[str, Any]) -> list[str]:
    """What is wrong with the types of a config's top-level keys (each: key, value seen, expected)."""
    expect: dict[str, tuple[tuple[type, ...], str]] = {
        "embed_dim": ((int,), "an integer"), "depth": ((int,), "an integer"), "inject": ((dict,), "a JSON object"),
        "format_version": ((int,), "an integer"), "saved_backbone": ((bool,), "true or false"),
        "custom_head": ((bool,), "true or false"), "peft": ((dict, type(None)), "a JSON object or null"),
    }
    problems = []
    for key, (types, words) in expect.items():
        value = cfg.get(key)
        if key in cfg and (not isinstance(value, types) or (types == (int,) and isinstance(value, bool))):
            problems.append(f"{key} is {value!r} ({type(value).__name__}); expected {words}")
    peft = cfg.get("peft")
    if isinstance(peft, dict):
        if peft.get("order") not in ("before_inject", "after_inject"):
            problems.append(f"peft.order is {peft.get('order')!r}; expected 'before_inject' or 'after_inject'")
        if not isinstance(peft.get("subfolder", PEFT_SUBFOLDER), str):
            problems.append(f"peft.subfolder is {peft.get('subfolder')!r}; expected a folder name such as 'peft'")
    return problems


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """The config of a saved adapter (a directory or its ``inti_config.json``), checked for shape and types."""
    p = Path(path)
    cfg_path = p / CONFIG_NAME if p.is_dir() else p
    if not cfg_path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {p}; expected a directory written by save_pretrained")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg_path} is not valid JSON ({e}); the file is truncated or damaged") from None
    except RecursionError:
        raise ValueError(f"{cfg_path} is nested too deeply to be read; it was not written by save_pretrained") from None
    missing = [k for k in ("inject", "embed_dim", "depth") if not isinstance(cfg, dict) or k not in cfg]
    if missing:
        raise ValueError(f"{cfg_path} lacks {missing}: it was not written by inti_adapters' save_pretrained")
    problems = _shape_problems(cfg)
    if problems:
        raise ValueError(f"{cfg_path} has values of the wrong type: {'; '.join(problems)}")
    fmt = cfg.get("format_version", 0)
    if fmt > FORMAT_VERSION:
        warnings.warn(
            f"{cfg_path} was written by inti_adapters {cfg.get('inti_adapters_version')} (format {fmt}); "
            f"this is {__version__} (format {FORMAT_VERSION}). Loading what this version understands.",
            stacklevel=3,
        )
    return cfg


def read_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file, with an error that names the file when it is missing or damaged."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p} is missing: the saved adapter is incomplete")
    try:
        return load_file(str(p))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"cannot read {p}: {e}; the file is truncated or damaged") from None
