"""The compressor interface and its registry.

A compressor runs between two transformer blocks on the tokens of a whole clip,
``(B, T, N, C) -> (B, T', N', C)``. InTI halves ``T``; token merging shrinks ``N``. The tensor
math lives in the compressor; the hooks that wire it into a backbone live in ``model.py``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

from .._registry import Registry
from ..context import TokenLayout


class Compressor(nn.Module):
    """Base class: subclasses set ``config_class`` and implement ``forward``."""

    config_class: ClassVar[type]

    def __init__(self, dim: int, config: Any) -> None:
        super().__init__()
        self.dim = dim
        self.config = config

    def forward(self, x: torch.Tensor, layout: TokenLayout) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def output_frames(self, num_frames: int) -> int:
        """Frames after this compressor for ``num_frames`` frames in (used by planners)."""
        return num_frames

    def attach(self, model: Any, block_index: int) -> list[Any]:
        """Called once by ``InTIModel`` after the compressor is built for ``blocks[block_index]``.

        Compressors that must also change later blocks (e.g. token merging's size-weighted
        attention) install their extra hooks here and return the handles; ``unload()`` removes
        them. The default installs nothing.
        """
        return []


_COMPRESSORS = Registry("compressor", Compressor, "register_compressor")


def register_compressor(name: str) -> Callable[[type[Compressor]], type[Compressor]]:
    """Class decorator: make a compressor available to ``inject(..., compressor=name)``."""

    def deco(cls: type[Compressor]) -> type[Compressor]:
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
    allowed = {f.name for f in dataclasses.fields(cls.config_class)}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise TypeError(f"unknown option(s) {unknown} for compressor {name!r}; its options are {sorted(allowed)}")
    return cls.config_class(**options)


def build_compressor(name: str, dim: int, config: dict[str, Any] | Any) -> Compressor:
    return get_compressor(name)(dim, make_compressor_config(name, config))
