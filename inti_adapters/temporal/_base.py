"""The temporal-adapter interfaces, their registry and the parsing of ``temporal=[...]`` specs.

Two kinds of adapters exist:

- :class:`TemporalAdapter` runs inside one block on the tokens of the whole clip,
  ``(B, T, N, C) -> (B, T, N, C)``, at a *placement*: ``"attn"`` (on the residual stream before
  the attention branch) or ``"mlp"`` (on the stream between the attention and MLP branches).
  One instance is built per selected block.
- :class:`GlobalTemporalAdapter` reads the outputs of several blocks and changes the
  frame-averaged video feature ``(B, D)`` before the head (UniFormerV2's global module).

Both are pure tensor code plus an ``attach`` that asks the :class:`~inti_adapters.surgery.Site`
for the sites they need (the default ``attach`` of each kind is what almost every adapter
wants). A new adapter is a subclass with a ``config_class`` (a
:class:`~inti_adapters._config.Config` dataclass), decorated with
:func:`register_temporal_adapter`; ``no_weight_decay()`` names its parameters that must not be
decayed. It never reads the video model's attributes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar

import torch
from torch import nn

from .._registry import Registry
from ..context import VideoContext
from ..surgery import Site
from ..tokens import TokenLayout

PLACEMENTS = ("attn", "mlp")


class TemporalAdapter(nn.Module):
    """Per-block adapter on the tokens of a clip, ``(B, T, N, C)``; ``T`` is read from the input.

    Subclasses set ``config_class`` and implement :meth:`residual` (the change to the stream;
    zero for a fresh adapter), or override :meth:`forward` for a non-residual map. The hooks
    call the module (so module hooks fire): ``adapter(x, layout)`` for placement ``"attn"``,
    ``adapter(x, layout, return_residual=True)`` for ``"mlp"``.
    """

    config_class: ClassVar[type]
    registered_name: ClassVar[str] = ""  # set by register_temporal_adapter
    placements: ClassVar[tuple[str, ...]] = PLACEMENTS
    default_blocks: ClassVar[Any] = "all"

    def __init__(self, dim: int, config: Any) -> None:
        super().__init__()
        self.dim = dim
        self.config = config

    @property
    def needs_grid(self) -> bool:
        """True if the adapter mixes spatial neighbours and so needs the patch grid."""
        return False

    def residual(self, x: torch.Tensor, layout: TokenLayout) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def no_weight_decay(self) -> set[str]:
        """Names (relative to this module) of parameters that never get weight decay; 1-D ones never do."""
        return set()

    def attach(self, site: Site, block_index: int, placement: str) -> None:
        """Run on the stream of ``blocks[block_index]`` before attention (``'attn'``) or between
        attention and MLP (``'mlp'``)."""
        _check_grid(self, site)
        if placement == "attn":
            site.before_block(block_index, self._on_stream)
        else:
            site.after_attention(block_index, self._on_branch)

    def _on_stream(self, tokens: torch.Tensor, ctx: VideoContext) -> torch.Tensor:
        return self(tokens, ctx.tokens)

    def _on_branch(self, tokens: torch.Tensor, ctx: VideoContext) -> torch.Tensor:
        return self(tokens, ctx.tokens, return_residual=True)

    def forward(self, x: torch.Tensor, layout: TokenLayout, *, return_residual: bool = False) -> torch.Tensor:
        """The new stream ``x + residual(x)``, or only the residual with ``return_residual=True``."""
        d = self.residual(x, layout).to(x.dtype)
        return d if return_residual else x + d


class GlobalTemporalAdapter(nn.Module):
    """Reads the tokens of ``blocks`` and maps the video feature ``(B, D)`` to ``(B, D)``.

    ``forward(tokens, layout, features)`` receives one ``(B, T_i, N, C)`` tensor per block (in
    ascending block order, each with the frame count of that block) and the frame-averaged
    pre-logit feature.
    """

    config_class: ClassVar[type]
    registered_name: ClassVar[str] = ""
    placements: ClassVar[tuple[str, ...]] = ()
    default_blocks: ClassVar[Any] = "all"

    def __init__(self, dim: int, out_dim: int, blocks: Sequence[int], config: Any) -> None:
        super().__init__()
        self.dim = dim
        self.out_dim = out_dim
        self.blocks = tuple(blocks)
        self.config = config

    @property
    def needs_grid(self) -> bool:
        return False

    def forward(
        self, tokens: Sequence[torch.Tensor], layout: TokenLayout, features: torch.Tensor
    ) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def no_weight_decay(self) -> set[str]:
        """Names (relative to this module) of parameters that never get weight decay; 1-D ones never do."""
        return set()

    def attach(self, site: Site) -> None:
        """Collect the outputs of ``blocks`` in the per-forward store; fuse them into the feature."""
        _check_grid(self, site)
        store = site.store(f"temporal.{self.registered_name or type(self).__name__}")
        for i in self.blocks:
            site.observe_block_output(i, partial(_collect, store, i))
        site.on_features(partial(_fuse, self, store))


def _collect(store: dict, index: int, tokens: torch.Tensor, ctx: VideoContext) -> None:
    # a grad forward whose tokens come without autograd: re-entrant activation checkpointing
    store[index] = (ctx, tokens, ctx.grad_forward and not torch.is_grad_enabled())


def _fuse(adapter: GlobalTemporalAdapter, store: dict, features: torch.Tensor, ctx: VideoContext) -> torch.Tensor:
    name = adapter.registered_name or type(adapter).__name__
    entries = [store.get(i) for i in adapter.blocks]
    store.clear()  # each forward's tokens are used once; frees them
    missing = [i for i, e in zip(adapter.blocks, entries, strict=True) if e is None]
    if missing:
        raise RuntimeError(
            f"{name} has no tokens of blocks {missing} from this forward: forward_head must follow "
            "forward_features of the same video (the collected tokens are used once)"
        )
    if any(e[0] is not ctx for e in entries) or features.shape[0] != ctx.batch_size:
        raise RuntimeError(
            f"{name}: the collected tokens do not all come from the forward of these features "
            f"(batch {features.shape[0]}); call forward_features and forward_head on the same video"
        )
    if torch.is_grad_enabled() and any(e[2] for e in entries):
        raise RuntimeError(
            f"{name} collected block outputs without autograd inside a training forward: re-entrant "
            "activation checkpointing (e.g. TIMM_REENTRANT_CKPT=1 or timm.layers.set_reentrant_ckpt(True)) "
            "hides them from the backward pass. Use non-reentrant checkpointing (timm's default)."
        )
    return adapter([e[1] for e in entries], ctx.tokens, features)


def _check_grid(adapter: nn.Module, site: Site) -> None:
    if adapter.needs_grid and not site.has_patch_grid:
        raise ValueError(
            f"temporal adapter {adapter.registered_name!r} ({adapter.config}) needs the spatial patch grid, but "
            "this host has none (its grid_size returns None). Choose options without spatial mixing."
        )


AdapterClass = type[TemporalAdapter] | type[GlobalTemporalAdapter]
_ADAPTERS = Registry("temporal adapter", (TemporalAdapter, GlobalTemporalAdapter), "register_temporal_adapter")


def register_temporal_adapter(name: str) -> Callable[[AdapterClass], AdapterClass]:
    """Class decorator: make an adapter available as ``{"name": name, ...}`` in ``temporal=[...]``."""

    def deco(cls: AdapterClass) -> AdapterClass:
        if not isinstance(name, str) or not name or "." in name:
            raise ValueError(f"a temporal adapter name must be a non-empty string without '.', got {name!r}")
        _ADAPTERS.add(name, cls)
        if not dataclasses.is_dataclass(getattr(cls, "config_class", None)):
            del _ADAPTERS[name]
            raise TypeError(f"{cls.__name__}.config_class must be a dataclass of the adapter's options")
        cls.registered_name = name
        return cls

    return deco


def list_temporal_adapters() -> list[str]:
    return sorted(_ADAPTERS)


def get_temporal_adapter(name: str) -> AdapterClass:
    return _ADAPTERS.lookup(name, list_temporal_adapters())


@dataclass(frozen=True)
class TemporalSpec:
    """One parsed entry of ``temporal=[...]``: which adapter, on which blocks, where, with what options."""

    name: str
    blocks: tuple[int, ...]
    placement: str | None
    config: Any

    @property
    def adapter_class(self) -> AdapterClass:
        return get_temporal_adapter(self.name)


def _parse_blocks(name: str, blocks: Any, depth: int) -> tuple[int, ...]:
    expected = "a list of block indices, 'all' or {'last': k}"
    if blocks == "all":
        return tuple(range(depth))
    if isinstance(blocks, dict):
        if set(blocks) != {"last"}:
            raise ValueError(f"{name}: blocks as a dict must be {{'last': k}}, got {blocks!r}")
        k = blocks["last"]
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= depth:
            raise ValueError(
                f"{name}: blocks={{'last': k}} needs 1 <= k <= {depth} (the backbone has {depth} blocks), got {k!r}"
            )
        return tuple(range(depth - k, depth))
    if isinstance(blocks, str) or not isinstance(blocks, Sequence):
        raise TypeError(f"{name}: blocks must be {expected}, got {blocks!r}")
    if not blocks:
        raise ValueError(f"{name}: blocks is empty; give {expected}")
    for i in blocks:
        if isinstance(i, bool) or not isinstance(i, int):
            raise TypeError(f"{name}: blocks must hold ints, got {list(blocks)!r} (entry {i!r})")
    bad = [i for i in blocks if not 0 <= i < depth]
    if bad:
        raise ValueError(
            f"{name}: blocks {list(blocks)} out of range: the backbone has {depth} blocks "
            f"(valid indices 0..{depth - 1}), got {bad}"
        )
    if len(set(blocks)) != len(blocks):
        raise ValueError(f"{name}: blocks has duplicates: {list(blocks)}")
    return tuple(sorted(blocks))


def make_adapter_config(name: str, options: dict[str, Any]) -> Any:
    """The validated config dataclass of adapter ``name`` from a dict of options."""
    cls = get_temporal_adapter(name)
    allowed = {f.name for f in dataclasses.fields(cls.config_class)}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise TypeError(
            f"unknown option(s) {unknown} for temporal adapter {name!r}; its options are {sorted(allowed)} "
            "(plus 'name', 'blocks', 'placement')"
        )
    return cls.config_class(**options)


def parse_spec(spec: Any, depth: int) -> TemporalSpec:
    """Validate one ``{"name": ..., "blocks": ..., "placement": ..., **options}`` dict."""
    if not isinstance(spec, dict):
        raise TypeError(
            f"each temporal adapter spec must be a dict such as {{'name': 'local_mhra', 'blocks': 'all'}}, "
            f"got {type(spec).__name__}: {spec!r}"
        )
    if "name" not in spec:
        raise ValueError(f"each temporal adapter spec needs a 'name', got {spec!r}")
    options = dict(spec)
    name = options.pop("name")
    cls = get_temporal_adapter(name)
    blocks = _parse_blocks(name, options.pop("blocks", cls.default_blocks), depth)
    placement = options.pop("placement", None)
    if cls.placements:
        placement = cls.placements[0] if placement is None else placement
        if placement not in cls.placements:
            raise ValueError(f"{name}: placement must be one of {list(cls.placements)}, got {placement!r}")
    elif placement is not None:
        raise ValueError(
            f"{name} reads the outputs of its blocks and takes no placement; got placement={placement!r}"
        )
    return TemporalSpec(name=name, blocks=blocks, placement=placement, config=make_adapter_config(name, options))
