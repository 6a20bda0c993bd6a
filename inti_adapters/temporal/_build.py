"""Building the temporal adapters of ``inject(..., temporal=[...])`` and attaching them in order.

Placements of a per-block adapter ``A`` on ``blocks[i]`` (see :class:`~inti_adapters.surgery.Site`):

- ``"attn"``: on the residual stream before the attention branch (``Site.before_block``);
- ``"mlp"``: on the stream between the attention and MLP branches (``Site.after_attention``).

On one block all ``"attn"`` adapters run first (in spec order), then the attention branch, then
the ``"mlp"`` adapters. A global adapter collects block outputs (``Site.observe_block_output``)
and changes the video feature before the head (``Site.on_features``). Temporal adapters are
attached before the compressors, so an adapter on a compressing block sees its frames before
compression.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from ..surgery import Site
from ._base import GlobalTemporalAdapter, TemporalSpec, parse_spec

__all__ = ["attach_temporal_adapters", "build_temporal_adapters"]


def _build(spec: TemporalSpec, embed_dim: int, num_features: int) -> nn.Module:
    cls = spec.adapter_class
    if issubclass(cls, GlobalTemporalAdapter):
        return cls(embed_dim, num_features, spec.blocks, spec.config)
    return nn.ModuleDict({str(i): nn.ModuleDict({spec.placement: cls(embed_dim, spec.config)}) for i in spec.blocks})


def _merge(into: nn.ModuleDict, key: str, tree: nn.Module, where: str) -> None:
    if key not in into:
        into[key] = tree
        return
    have = into[key]
    if not (isinstance(have, nn.ModuleDict) and isinstance(tree, nn.ModuleDict)):
        raise ValueError(f"temporal adapter {where} is configured twice; give each adapter once")
    for k, sub in tree.items():
        _merge(have, k, sub, f"{where}.{k}")


def build_temporal_adapters(specs: Sequence[dict[str, Any]], embed_dim: int, num_features: int,
                            depth: int) -> nn.ModuleDict:
    """The adapters of ``specs`` as one module tree (state-dict keys such as
    ``local_mhra.3.attn.up.weight``; a global adapter sits directly under its name).

    Args:
        specs: ``{"name": ..., "blocks": [..] | "all" | {"last": k}, "placement": "attn" | "mlp",
            **options}`` dicts (see :func:`inti_adapters.temporal.list_temporal_adapters`).
        embed_dim: Token width of the backbone.
        num_features: Width of the pooled video feature (global adapters map it).
        depth: Number of blocks of the backbone.
    """
    modules = nn.ModuleDict()
    for spec in (parse_spec(s, depth) for s in specs):
        tree = _build(spec, embed_dim, num_features)
        where = spec.name if isinstance(tree, GlobalTemporalAdapter) else f"{spec.name!r} at placement {spec.placement!r}"
        _merge(modules, spec.name, tree, where)
    return modules


def attach_temporal_adapters(modules: nn.ModuleDict, site: Site) -> None:
    """Attach every adapter of :func:`build_temporal_adapters`: ``attn`` placements, then ``mlp``, then global."""
    for phase in ("attn", "mlp"):
        for tree in modules.values():
            if isinstance(tree, GlobalTemporalAdapter):
                continue
            for i, per_block in tree.items():
                if phase in per_block:
                    per_block[phase].attach(site, int(i), phase)
    for tree in modules.values():
        if isinstance(tree, GlobalTemporalAdapter):
            tree.attach(site)
