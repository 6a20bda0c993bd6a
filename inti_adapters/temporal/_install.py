"""Wiring temporal adapters into a backbone with hooks (the model surgery; the math is elsewhere).

Placements of a per-block adapter ``A`` on ``blocks[i]``:

- ``"attn"``: a forward pre-hook on the block replaces its input ``x`` by ``A(x)``, i.e. the
  residual stream before the attention branch.
- ``"mlp"``: the stream between the attention and MLP branches. A block computes
  ``x_mid = x + branch(x)`` and then ``x_mid + mlp(norm(x_mid))``; the output of the last module
  of the attention branch (timm ``drop_path1``, OpenCLIP ``ls_1``) gets ``A(x_mid,
  return_residual=True)`` added, where the block's input ``x`` was stashed by a pre-hook. The
  MLP branch and the stream then see ``x_mid + A.residual(x_mid)``. That module's ``forward`` is
  wrapped per instance rather than hooked, because ``torch.compile`` guards on the former and
  not on submodule hooks (see :func:`inti_adapters._hooks.after_forward`); its handle restores it.

On one block all ``"attn"`` adapters run first (in spec order), then the attention branch, then
the ``"mlp"`` adapters. A global adapter collects block outputs with forward hooks into a
per-forward store keyed by block index (a recompute during backward never adds to it) and
enters through ``Installed.fuse``. Every hook reads the batch size from the model's context and
the *current* frame count from its input's leading dimension, so it is safe to run twice.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .._hooks import after_forward
from ..context import ContextHolder, in_backward
from ..hosts import Host
from ._base import GlobalTemporalAdapter, TemporalAdapter, TemporalSpec, parse_spec

if TYPE_CHECKING:
    from ..model import InTIModel

# modules that end a block's attention branch, by host family (timm, OpenCLIP)
ATTENTION_BRANCH_ENDS = ("drop_path1", "ls_1")
_STREAM_KWARGS = ("x", "q_x", "hidden_states")


@dataclass
class Installed:
    """What :func:`install_temporal_adapters` hands to ``InTIModel``."""

    modules: nn.ModuleDict
    handles: list[Any] = field(default_factory=list)
    fuse: Callable[[torch.Tensor], torch.Tensor] | None = None


def _describe(block: nn.Module) -> str:
    return f"{type(block).__module__}.{type(block).__qualname__}"


def _stream_arg(block: nn.Module, args: tuple, kwargs: dict) -> tuple[torch.Tensor, Callable]:
    """The token input of a block call, and a function building the call's new (args, kwargs)."""
    if args:
        x = args[0]

        def put(y: torch.Tensor) -> tuple[tuple, dict]:
            return (y, *args[1:]), kwargs
    else:
        key = next((k for k in _STREAM_KWARGS if k in kwargs), None)
        if key is None:
            raise TypeError(
                f"cannot find the token input of {_describe(block)}: it was called without positional "
                f"arguments and without any of {list(_STREAM_KWARGS)} as keyword"
            )
        x = kwargs[key]

        def put(y: torch.Tensor) -> tuple[tuple, dict]:
            return args, {**kwargs, key: y}
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        raise TypeError(f"expected the tokens of {_describe(block)} as a 3-D tensor, got {type(x).__name__}")
    return x, put


def _apply(fn: Callable, x: torch.Tensor, holder: ContextHolder, host: Host, dtype: torch.dtype) -> torch.Tensor:
    """Run ``fn((B, T, N, C), layout)`` on block-layout tokens ``x``; back to block layout."""
    ctx = holder.require()
    tokens = host.to_bnc(x)
    bt, n, c = tokens.shape
    t = ctx.frames_of(bt)
    out = fn(tokens.reshape(ctx.batch_size, t, n, c), ctx.tokens)
    return host.from_bnc(out.reshape(bt, n, c)).to(dtype)


def attention_branch_end(host: Host, block: nn.Module, index: int) -> nn.Module:
    """The module whose output is the attention branch's contribution to the stream."""
    custom = getattr(host, "attention_branch_end", None)
    if callable(custom):
        found = custom(block)
        if found is not None:
            return found
    for name in ATTENTION_BRANCH_ENDS:
        m = getattr(block, name, None)
        if isinstance(m, nn.Module):
            return m
    raise ValueError(
        f"placement 'mlp' on block {index} needs the module that ends the block's attention branch (its "
        f"output is added to the stream before the MLP branch): timm blocks call it 'drop_path1', OpenCLIP "
        f"blocks 'ls_1'; {_describe(block)} has none of {list(ATTENTION_BRANCH_ENDS)}. Use placement='attn', "
        "or give the host an attention_branch_end(block) method returning that module."
    )


def _attn_hooks(block: nn.Module, adapter: TemporalAdapter, holder: ContextHolder, host: Host) -> list[Any]:
    def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if holder.disabled:
            return None
        x, put = _stream_arg(module, args, kwargs)
        return put(_apply(adapter, x, holder, host, x.dtype))

    return [block.register_forward_pre_hook(pre_hook, with_kwargs=True)]


def _mlp_hooks(block: nn.Module, index: int, adapter: TemporalAdapter, holder: ContextHolder,
               host: Host) -> list[Any]:
    anchor = attention_branch_end(host, block, index)
    slot: dict[str, torch.Tensor] = {}

    def stash(module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not holder.disabled:
            slot["x"] = _stream_arg(module, args, kwargs)[0]

    def after_attention(out: torch.Tensor) -> torch.Tensor:
        if holder.disabled:
            return out
        x = slot.pop("x", None)
        if x is None:
            raise RuntimeError(
                f"the 'mlp' temporal adapter of block {index} ran without the block's input: "
                f"{type(anchor).__name__} was called outside {_describe(block)}.forward"
            )
        residual = _apply(partial(adapter, return_residual=True), x + out, holder, host, out.dtype)
        return out + residual

    return [block.register_forward_pre_hook(stash, with_kwargs=True), after_forward(anchor, after_attention)]


def _recomputing() -> bool:
    """True while activation checkpointing re-runs a block during backward (never in a compiled graph)."""
    return not torch.compiler.is_compiling() and in_backward()


def _global_hooks(adapter: GlobalTemporalAdapter, name: str, holder: ContextHolder,
                  host: Host) -> tuple[list[Any], Callable[[torch.Tensor], torch.Tensor]]:
    # block index -> (context, (B, T_i, N, C) tokens, produced without autograd inside a grad forward)
    store: dict[int, tuple[Any, torch.Tensor, bool]] = {}

    def collect(index: int) -> Callable:
        def hook(module: nn.Module, args: Any, out: torch.Tensor) -> None:
            if holder.disabled or _recomputing():  # the forward's tokens are stored already
                return
            ctx = holder.require()
            tokens = host.to_bnc(out)
            bt, n, c = tokens.shape
            t = ctx.frames_of(bt)
            detached = holder.last is ctx and not torch.is_grad_enabled()  # re-entrant checkpointing
            store[index] = (ctx, tokens.reshape(ctx.batch_size, t, n, c), detached)

        return hook

    def fuse(features: torch.Tensor) -> torch.Tensor:
        if holder.disabled:
            return features
        entries = [store.get(i) for i in adapter.blocks]
        store.clear()  # each forward's tokens are used once; frees them
        missing = [i for i, e in zip(adapter.blocks, entries, strict=True) if e is None]
        if missing:
            raise RuntimeError(
                f"{name} has no tokens of blocks {missing} from this forward: forward_head must follow "
                "forward_features of the same video (the collected tokens are used once)"
            )
        ctx = entries[0][0]
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

    handles = [host.blocks[i].register_forward_hook(collect(i)) for i in adapter.blocks]
    return handles, fuse


def _build(spec: TemporalSpec, host: Host) -> nn.Module:
    cls = spec.adapter_class
    if issubclass(cls, GlobalTemporalAdapter):
        return cls(host.embed_dim, host.num_features, spec.blocks, spec.config)
    return nn.ModuleDict(
        {str(i): nn.ModuleDict({spec.placement: cls(host.embed_dim, spec.config)}) for i in spec.blocks}
    )


def _merge(into: nn.ModuleDict, key: str, tree: nn.Module, where: str) -> None:
    if key not in into:
        into[key] = tree
        return
    have = into[key]
    if not (isinstance(have, nn.ModuleDict) and isinstance(tree, nn.ModuleDict)):
        raise ValueError(f"temporal adapter {where} is configured twice; give each adapter once")
    for k, sub in tree.items():
        _merge(have, k, sub, f"{where}.{k}")


def _device_of(model: InTIModel) -> tuple[torch.device, torch.dtype | None]:
    ref = next(model.backbone.parameters(), None)
    if ref is None:
        return torch.device("cpu"), None
    return ref.device, ref.dtype if ref.is_floating_point() else None


def _check_grid(spec: TemporalSpec, module: nn.Module, host: Host) -> None:
    first = module if isinstance(module, GlobalTemporalAdapter) else next(iter(module.values()))[spec.placement]
    if first.needs_grid and type(host).grid_size is Host.grid_size:
        raise ValueError(
            f"temporal adapter {spec.name!r} ({first.config}) needs the spatial patch grid, but host "
            f"{host.name!r} has none (its grid_size returns None). Choose options without spatial mixing."
        )


def install_temporal_adapters(model: InTIModel, specs: Sequence[dict[str, Any]]) -> Installed:
    """Build the adapters of ``specs`` on the backbone's device and dtype, and hook them in.

    Args:
        model: The ``InTIModel`` being built (its ``host``, ``backbone`` and ``_holder`` are used).
        specs: ``{"name": ..., "blocks": [..] | "all" | {"last": k}, "placement": "attn" | "mlp",
            **options}`` dicts (see :func:`inti_adapters.temporal.list_temporal_adapters`).

    Returns:
        :class:`Installed`: the modules (``model.temporal``; state-dict keys such as
        ``temporal.local_mhra.3.attn.up.weight``), the hook handles and the feature fuser.
    """
    host, holder = model.host, model._holder
    parsed = [parse_spec(s, len(host.blocks)) for s in specs]
    device, dtype = _device_of(model)
    modules = nn.ModuleDict()
    built: list[tuple[TemporalSpec, nn.Module]] = []
    for spec in parsed:
        # built on the CPU (same init on every device, as the compressors) or, to count parameters
        # without allocating them, directly on the meta device
        with torch.device("meta" if device.type == "meta" else "cpu"):
            tree = _build(spec, host)
        tree.to(device=device, dtype=dtype)
        _check_grid(spec, tree, host)
        where = spec.name if isinstance(tree, GlobalTemporalAdapter) else f"{spec.name!r} at placement {spec.placement!r}"
        _merge(modules, spec.name, tree, where)
        built.append((spec, tree))

    handles: list[Any] = []
    fuses: list[Callable[[torch.Tensor], torch.Tensor]] = []
    try:
        for phase in ("attn", "mlp", None):
            for spec, tree in built:
                if spec.placement != phase:
                    continue
                if isinstance(tree, GlobalTemporalAdapter):
                    hs, fuse = _global_hooks(tree, spec.name, holder, host)
                    handles += hs
                    fuses.append(fuse)
                    continue
                for i in spec.blocks:
                    adapter = tree[str(i)][spec.placement]
                    if phase == "attn":
                        handles += _attn_hooks(host.blocks[i], adapter, holder, host)
                    else:
                        handles += _mlp_hooks(host.blocks[i], i, adapter, holder, host)
    except BaseException:
        for h in handles:
            h.remove()
        raise
    return Installed(modules=modules, handles=handles, fuse=_chain(fuses))


def _chain(fuses: list[Callable[[torch.Tensor], torch.Tensor]]) -> Callable[[torch.Tensor], torch.Tensor] | None:
    if not fuses:
        return None
    if len(fuses) == 1:
        return fuses[0]

    def fuse(features: torch.Tensor) -> torch.Tensor:
        for f in fuses:
            features = f(features)
        return features

    return fuse
