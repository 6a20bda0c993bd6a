"""The compressor interface and its registry.

A compressor runs between two transformer blocks on the tokens of a whole clip,
``(B, T, N, C) -> (B, T', N', C)``. InTI halves ``T``; token merging shrinks ``N``.

The contract of a new compressor (everything the library relies on):

- ``config_class``: a :class:`~inti_adapters._config.Config` dataclass of its options (the
  ``**options`` of ``inject(..., compressor=name)``); ``__init__(dim, config)``.
- ``forward(x, layout)``: pure tensor code on ``(B, T, N, C)`` tokens; ``layout`` is the
  :class:`~inti_adapters.TokenLayout` of the input video (prefix tokens, class token, grid).
- ``output_frames(t)``: frames out for ``t`` frames in (the frame schedule and ``plan()`` use it).
- ``attach(site, block_index)``: called once when injected after ``blocks[block_index]``; the
  default runs the compressor on that block's output. A compressor that needs more (token
  merging: the attention keys, a bias on later blocks' attention, sizes shared between its
  layers) asks the :class:`~inti_adapters.surgery.Site` for it there, and keeps state only in
  ``site.store(...)``. It never reads the video model or other modules' attributes.
- ``no_weight_decay()``: names of its own parameters that must not be decayed.
- ``renamed_parameters``: old -> new parameter-name prefixes, so weights saved by an older
  version keep loading (``load_state_dict`` and ``load_pretrained`` apply them).
- ``exportable``: False when its forward cannot be captured by ``torch.export`` (e.g. shapes that
  depend on the data); :mod:`inti_adapters.export` then refuses it with a clear error. Every
  built-in compressor exports (token merging too: it merges a fixed ``r`` tokens per layer).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

from .._config import with_current_names
from .._registry import Registry
from ..context import VideoContext
from ..surgery import Site
from ..tokens import TokenLayout


class Compressor(nn.Module):
    """Base class: subclasses set ``config_class`` and implement ``forward``."""

    config_class: ClassVar[type]
    renamed_parameters: ClassVar[dict[str, str]] = {}  # old name prefix -> new, for older saved weights
    exportable: ClassVar[bool] = True  # torch.export / ONNX can capture its forward

    def __init__(self, dim: int, config: Any) -> None:
        super().__init__()
        self.dim = dim
        self.config = config
        self._register_load_state_dict_pre_hook(self._upgrade_hook)

    def upgrade_state_dict(self, state_dict: dict[str, torch.Tensor], prefix: str = "") -> None:
        """Rename, in place, parameters saved under older names (``renamed_parameters``)."""
        for old, new in self.renamed_parameters.items():
            for key in [k for k in state_dict if k.startswith(prefix + old)]:
                state_dict[prefix + new + key[len(prefix + old):]] = state_dict.pop(key)

    def _upgrade_hook(self, state_dict: dict[str, torch.Tensor], prefix: str, *args: Any) -> None:
        self.upgrade_state_dict(state_dict, prefix)

    def forward(self, x: torch.Tensor, layout: TokenLayout) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def output_frames(self, num_frames: int) -> int:
        """Frames after this compressor for ``num_frames`` frames in (frame schedule, ``plan()``)."""
        return num_frames

    def attach(self, site: Site, block_index: int) -> None:
        """Wire this compressor in after ``blocks[block_index]``: by default, run it on the block's output."""
        site.on_block_output(block_index, self._on_tokens)

    def _on_tokens(self, tokens: torch.Tensor, ctx: VideoContext) -> torch.Tensor:
        return self(tokens, ctx.tokens)

    def no_weight_decay(self) -> set[str]:
        """Names (relative to this module) of parameters that never get weight decay; 1-D ones never do."""
        return set()


_COMPRESSORS = Registry("compressor", Compressor, "register_compressor")


def register_compressor(name: str) -> Callable[[type[Compressor]], type[Compressor]]:
    """Class decorator: make a compressor available to ``inject(..., compressor=name)``."""

    def deco(cls: type[Compressor]) -> type[Compressor]:
        if not dataclasses.is_dataclass(getattr(cls, "config_class", None)):
            raise TypeError(f"{getattr(cls, '__name__', cls)}.config_class must be a dataclass of the compressor's "
                            "options (e.g. deriving from inti_adapters.config.Config)")
        return _COMPRESSORS.add(name, cls)

    return deco


def list_compressors() -> list[str]:
    return sorted(_COMPRESSORS)


def get_compressor(name: str) -> type[Compressor]:
    return _COMPRESSORS.lookup(name, list_compressors())


def make_compressor_config(name: str, options: dict[str, Any] | Any) -> Any:
    """The validated config object of compressor ``name`` from a dict of options."""
    cls = get_compressor(name)
    if not isinstance(options, dict):
        return options
    options = with_current_names(cls.config_class, options)
    allowed = {f.name for f in dataclasses.fields(cls.config_class)}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise TypeError(f"unknown option(s) {unknown} for compressor {name!r}; its options are {sorted(allowed)}")
    return cls.config_class(**options)


def build_compressor(name: str, dim: int, config: dict[str, Any] | Any) -> Compressor:
    return get_compressor(name)(dim, make_compressor_config(name, config))
