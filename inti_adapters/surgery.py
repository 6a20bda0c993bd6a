"""Model surgery: the one module that changes a backbone's forward.

Compressors and temporal adapters never touch the backbone themselves. They describe what
they need through a :class:`Site` (one per video model), which installs it, converts between
the host's block layout and clips ``(B, T, N, C)``, and removes it again:

===================================  ==============================================================
``on_block_output(i, fn)``           replace the output of ``blocks[i]`` by ``fn(tokens, ctx)``
``observe_block_output(i, fn)``      read it (not called again while checkpointing recomputes)
``before_block(i, fn)``              replace the token input of ``blocks[i]``
``after_attention(i, fn)``           add ``fn(stream)`` to the stream between attention and MLP
``attention_bias(i, fn)``            add ``fn(ctx, x)`` to the attention logits of ``blocks[i]``
``attention_keys(i, fn)``            read the attention keys ``(S, N, heads, head_dim)`` of ``blocks[i]``
``on_features(fn)``                  change the frame-averaged video feature before the head
``store(namespace)``                 a dict emptied at the start of every forward
===================================  ==============================================================

:func:`check_calls` puts a check before any module's forward (an exported program's input check).

What "attention", "the end of the attention branch" and "the qkv projection" are in a block is
a host fact (:class:`~inti_adapters.Host`); a host that lacks one gets a clear error naming it.

One mechanism: every change is an instance-level ``forward`` of the module concerned (a
:class:`_Patched` that runs ``pre`` functions on the call, the module's own forward, then
``post`` functions on the output). Not ``register_forward_hook``: ``torch.compile`` does not
guard on the hooks of submodules (``torch._dynamo.config.skip_nnmodule_hook_guards``), so a
block compiled without a hook could be silently reused for a block that has one; it does guard
on the instance attribute. Every handle is kept and :meth:`Site.remove` restores each module
exactly (the last removal deletes the override). Every site reads the batch size from the
per-forward context and the current frame count from its input, so it is safe to run twice
(activation checkpointing). :func:`probe` gives measuring code (planning, visualisation,
benchmarks) the same mechanism for a ``with`` block. The functions a site installs are instances of
module-level classes, not closures, so an injected model pickles (``pickle.dumps(model)``,
``torch.save(model)``) as long as the extensions' own functions do (bound methods, partials).
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from .context import ContextHolder, VideoContext, recomputing
from .hosts import Host

__all__ = ["Site", "probe"]

Pre = Callable[[tuple, dict], "tuple[tuple, dict] | None"]
Post = Callable[[Any], Any]
TokenFn = Callable[[torch.Tensor, VideoContext], torch.Tensor]
ObserveFn = Callable[[torch.Tensor, VideoContext], None]
_STREAM_KWARGS = ("x", "q_x", "hidden_states")


class _Patched:
    """Instance-level ``forward``: ``pre`` functions on the call, the module's forward, ``post`` on the output."""

    def __init__(self, module: nn.Module) -> None:
        self.previous = module.__dict__.get("forward")  # an earlier instance override, if any
        self.inner = module.forward
        self.pre: list[Pre] = []
        self.post: list[Post] = []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        for fn in self.pre:
            changed = fn(args, kwargs)
            if changed is not None:
                args, kwargs = changed
        out = self.inner(*args, **kwargs)
        for fn in self.post:
            out = fn(out)
        return out

    def __getstate__(self) -> dict[str, Any]:
        # the module's own forward is stored as "the class's forward of this module", not as a bound method
        # (which unpickles as getattr(module, 'forward'): this object itself once the module is restored)
        state = dict(self.__dict__)
        owner = getattr(self.inner, "__self__", None)
        if owner is not None and getattr(self.inner, "__func__", None) is type(owner).forward:
            del state["inner"]
            state["_owner"] = owner
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        owner = state.pop("_owner", None)
        self.__dict__.update(state)
        if owner is not None:
            self.inner = types.MethodType(type(owner).forward, owner)


class _Handle:
    """Removes one function from a module's :class:`_Patched`; the last one restores the module."""

    def __init__(self, module: nn.Module, where: str, fn: Callable) -> None:
        self.module, self.where, self.fn = module, where, fn

    def remove(self) -> None:
        patched = self.module.__dict__.get("forward")
        fns = getattr(patched, self.where, None) if isinstance(patched, _Patched) else None
        if fns is None or self.fn not in fns:
            return
        fns.remove(self.fn)
        if not patched.pre and not patched.post:
            if patched.previous is None:
                del self.module.forward
            else:
                self.module.forward = patched.previous


def _patch(module: nn.Module, where: str, fn: Callable, *, first: bool = False) -> _Handle:
    patched = module.__dict__.get("forward")
    if not isinstance(patched, _Patched):
        patched = _Patched(module)
        module.forward = patched
    fns = getattr(patched, where)
    fns.insert(0, fn) if first else fns.append(fn)
    return _Handle(module, where, fn)


def check_calls(module: nn.Module, check: Callable[[tuple, dict], None]) -> _Handle:
    """Run ``check(args, kwargs)`` before anything else on every call of ``module``; it refuses a call
    by raising (e.g. :mod:`inti_adapters.export` on an exported program's module). ``remove()`` on the
    returned handle undoes it."""
    return _patch(module, "pre", check, first=True)


@contextlib.contextmanager
def probe(modules: Iterable[nn.Module], *, before: Callable[[nn.Module, tuple, dict], Any] | None = None,
          after: Callable[[nn.Module, Any], Any] | None = None, outermost: bool = True) -> Iterator[None]:
    """Call ``before(module, args, kwargs)`` / ``after(module, output)`` around the modules' forwards.

    ``before`` may return new ``(args, kwargs)`` and ``after`` a new output (None keeps them).
    With ``outermost`` (default) they wrap the sites already installed on a module (what a
    measurement wants); otherwise ``before`` runs after them and sees the arguments they set.
    Everything is removed when the block ends, also on errors.
    """
    handles = []
    try:
        for m in modules:
            if before is not None:
                handles.append(_patch(m, "pre", lambda args, kwargs, m=m: before(m, args, kwargs), first=outermost))
            if after is not None:
                handles.append(_patch(m, "post", lambda out, m=m: _keep(after(m, out), out)))
        yield
    finally:
        for h in reversed(handles):
            h.remove()


def _keep(new: Any, old: Any) -> Any:
    return old if new is None else new


def _describe(module: nn.Module) -> str:
    return f"{type(module).__module__}.{type(module).__qualname__}"


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


class _BlockOutput:
    """``post`` of :meth:`Site.on_block_output`."""

    def __init__(self, site: Site, fn: TokenFn) -> None:
        self.site, self.fn = site, fn

    def __call__(self, out: torch.Tensor) -> torch.Tensor:
        if self.site._holder.disabled:
            return out
        tokens, ctx = self.site._clip(out)
        return self.site._unclip(self.fn(tokens, ctx), out)


class _ObserveOutput(_BlockOutput):
    """``post`` of :meth:`Site.observe_block_output`."""

    def __call__(self, out: torch.Tensor) -> torch.Tensor:
        if not self.site._holder.disabled and not recomputing():
            self.fn(*self.site._clip(out))
        return out


class _BeforeBlock:
    """``pre`` of :meth:`Site.before_block`."""

    def __init__(self, site: Site, block: nn.Module, fn: TokenFn) -> None:
        self.site, self.block, self.fn = site, block, fn

    def __call__(self, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if self.site._holder.disabled:
            return None
        x, put = _stream_arg(self.block, args, kwargs)
        tokens, ctx = self.site._clip(x)
        return put(self.site._unclip(self.fn(tokens, ctx), x))


class _StashStream:
    """``pre`` of a block for :meth:`Site.after_attention`: keeps the block's token input."""

    def __init__(self, site: Site, block: nn.Module) -> None:
        self.site, self.block = site, block
        self.slot: dict[str, torch.Tensor] = {}

    def __call__(self, args: tuple, kwargs: dict) -> None:
        if not self.site._holder.disabled:
            self.slot["x"] = _stream_arg(self.block, args, kwargs)[0]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "slot": {}}  # a forward's tensor is not part of the model


class _AfterAttention:
    """``post`` of the end of the attention branch for :meth:`Site.after_attention`."""

    def __init__(self, stash: _StashStream, i: int, anchor: nn.Module, fn: TokenFn) -> None:
        self.stash, self.i, self.anchor, self.fn = stash, i, anchor, fn

    def __call__(self, out: torch.Tensor) -> torch.Tensor:
        site = self.stash.site
        if site._holder.disabled:
            return out
        x = self.stash.slot.pop("x", None)
        if x is None:
            raise RuntimeError(f"blocks[{self.i}]: {type(self.anchor).__name__} ran outside "
                               f"{_describe(self.stash.block)}.forward")
        tokens, ctx = site._clip(x + out)
        return out + site._unclip(self.fn(tokens, ctx), out)


class _AttentionBias:
    """``pre`` of the attention module for :meth:`Site.attention_bias`."""

    def __init__(self, holder: ContextHolder, key: str, fn: Callable) -> None:
        self.holder, self.key, self.fn = holder, key, fn

    def __call__(self, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if self.holder.disabled:
            return None
        x = args[0] if args else kwargs["x"]
        bias = self.fn(self.holder.require(), x)
        if bias is None:
            return None
        mask = kwargs.get(self.key)
        if mask is not None:
            if mask.dtype == torch.bool:
                mask = torch.zeros_like(mask, dtype=x.dtype).masked_fill(~mask, float("-inf"))
            bias = mask + bias
        return args, {**kwargs, self.key: bias}


class _AttentionKeys:
    """``post`` of the qkv projection for :meth:`Site.attention_keys`."""

    def __init__(self, holder: ContextHolder, i: int, qkv: Any, fn: Callable) -> None:
        self.holder, self.i, self.qkv, self.fn = holder, i, qkv, fn
        self.width = 3 * qkv.num_heads * qkv.head_dim

    def __call__(self, out: torch.Tensor) -> torch.Tensor:
        if self.holder.disabled:
            return out
        qkv = self.qkv
        if out.shape[-1] != self.width:
            raise RuntimeError(f"blocks[{self.i}] qkv gave width {out.shape[-1]}, expected 3 * {qkv.num_heads} "
                               f"heads * {qkv.head_dim}")
        with torch.no_grad():
            k = out.detach().unflatten(-1, (3, qkv.num_heads, qkv.head_dim)).select(-3, 1)
            self.fn(qkv.k_norm(k) if qkv.k_norm is not None else k, self.holder.require())
        return out


class Site:
    """Where extensions may act on one backbone, and the owner of every change made there.

    Args:
        host: The backbone's host description.
        holder: The video model's per-forward context.
        compressor_layers: The blocks whose outputs a compressor shrinks (``inject``'s ``layers``).
    """

    def __init__(self, host: Host, holder: ContextHolder, compressor_layers: tuple[int, ...] = ()) -> None:
        self._host, self._holder = host, holder
        self.compressor_layers = tuple(compressor_layers)
        self._handles: list[_Handle] = []
        self._feature_fns: list[TokenFn] = []

    # -- facts an extension may ask ---------------------------------------------------------------
    @property
    def depth(self) -> int:
        return len(self._host.blocks)

    @property
    def embed_dim(self) -> int:
        return self._host.embed_dim

    @property
    def has_patch_grid(self) -> bool:
        """The host lays tokens out on a spatial patch grid."""
        return self._host.has_patch_grid

    @property
    def uses_rope(self) -> bool:
        """The blocks apply rotary embeddings over the full grid (token counts must not change)."""
        return self._host.uses_rope

    def store(self, namespace: str) -> dict[Any, Any]:
        """A dict shared by everything that names ``namespace``, emptied when a forward starts."""
        return self._holder.store(namespace)

    # -- layout conversion (the only place that does it) -------------------------------------------
    def _clip(self, x: torch.Tensor) -> tuple[torch.Tensor, VideoContext]:
        ctx = self._holder.require()
        tokens = self._host.to_bnc(x)
        bt, n, c = tokens.shape
        return tokens.reshape(ctx.batch_size, ctx.frames_of(bt), n, c), ctx

    def _unclip(self, y: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return self._host.from_bnc(y.flatten(0, 1)).to(like.dtype)

    def _block(self, i: int) -> nn.Module:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.depth:
            raise ValueError(f"block index must be an int in 0..{self.depth - 1} (the backbone has {self.depth} "
                             f"blocks), got {i!r}")
        return self._host.blocks[i]

    def _add(self, module: nn.Module, where: str, fn: Callable) -> None:
        self._handles.append(_patch(module, where, fn))

    # -- sites ---------------------------------------------------------------------------------------
    def on_block_output(self, i: int, fn: TokenFn) -> None:
        """Replace the output of ``blocks[i]`` by ``fn(tokens (B, T, N, C), ctx)``."""
        self._add(self._block(i), "post", _BlockOutput(self, fn))

    def observe_block_output(self, i: int, fn: ObserveFn) -> None:
        """Call ``fn(tokens, ctx)`` on the output of ``blocks[i]`` once per forward (not on recompute)."""
        self._add(self._block(i), "post", _ObserveOutput(self, fn))

    def before_block(self, i: int, fn: TokenFn) -> None:
        """Replace the token input of ``blocks[i]`` by ``fn(tokens, ctx)``."""
        block = self._block(i)
        self._add(block, "pre", _BeforeBlock(self, block, fn))

    def after_attention(self, i: int, fn: TokenFn) -> None:
        """Add ``fn(stream, ctx)`` to the attention branch's output of ``blocks[i]``.

        The block computes ``x_mid = x + attn_branch(x)``, then its MLP branch on ``x_mid``; with
        this site both see ``x_mid + fn(x_mid)``. Needs the host's ``attention_branch_end``.
        """
        block = self._block(i)
        anchor = self._host.attention_branch_end(block)
        if anchor is None:
            raise ValueError(
                f"blocks[{i}] has no module that ends its attention branch (its output is added to the stream "
                f"before the MLP; timm calls it 'drop_path1', OpenCLIP 'ls_1'): {_describe(block)} has none of "
                f"{list(self._host.attention_branch_ends)}, so nothing can run between attention and MLP there. "
                "Use placement='attn', or give the host an attention_branch_end(block) that returns that module."
            )
        stash = _StashStream(self, block)
        self._add(block, "pre", stash)
        self._add(anchor, "post", _AfterAttention(stash, i, anchor, fn))

    def attention_bias(self, i: int, fn: Callable[[VideoContext, torch.Tensor], torch.Tensor | None]) -> None:
        """Add ``fn(ctx, x)`` (broadcastable to the logits) to the attention logits of ``blocks[i]``.

        ``x`` is the attention module's token input; ``fn`` returns None for no bias.
        """
        block, holder = self._block(i), self._holder
        attn, key = self._host.attention(block), self._host.attention_mask_keyword(block)
        if attn is None or key is None:
            raise ValueError(
                f"blocks[{i}].attn ({type(attn).__name__}) takes no additive attention bias that inti_adapters "
                f"knows of (host {self._host.name!r}: attention_mask_keyword returns None; timm's "
                "vision_transformer.Attention takes attn_mask)"
            )
        self._add(attn, "pre", _AttentionBias(holder, key, fn))

    def attention_keys(self, i: int, fn: Callable[[torch.Tensor, VideoContext], None]) -> None:
        """Call ``fn(keys, ctx)`` with the attention keys ``(S, N, heads, head_dim)`` of ``blocks[i]`` (detached)."""
        block, holder = self._block(i), self._holder
        qkv = self._host.qkv_projection(block)
        if qkv is None:
            raise ValueError(
                f"cannot read the attention keys of blocks[{i}]: host {self._host.name!r} knows no fused qkv "
                f"projection in {type(self._host.attention(block)).__name__} (timm's vision_transformer.Attention "
                "has one)"
            )
        self._add(qkv.module, "post", _AttentionKeys(holder, i, qkv, fn))

    def on_features(self, fn: TokenFn) -> None:
        """Change the frame-averaged video feature ``(B, D)`` before the head: ``fn(features, ctx)``."""
        self._feature_fns.append(fn)

    def apply_features(self, features: torch.Tensor) -> torch.Tensor:
        """Run the :meth:`on_features` functions (the video model calls this before its head)."""
        if self._holder.disabled or not self._feature_fns:
            return features
        ctx = self._holder.latest
        if ctx is None:
            raise RuntimeError("the video feature was computed without a forward of the video model")
        for fn in self._feature_fns:
            features = fn(features, ctx)
        return features

    # -- lifecycle -------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def suspended(self) -> Iterator[None]:
        """Inside, the backbone's modules are exactly as before injection (e.g. to copy them)."""
        handles = list(self._handles)
        for h in reversed(handles):
            h.remove()
        try:
            yield
        finally:
            self._handles = [_patch(h.module, h.where, h.fn) for h in handles]

    def remove(self) -> None:
        """Undo every change, newest first: each module is as it was before."""
        for h in reversed(self._handles):
            h.remove()
        self._handles.clear()
        self._feature_fns.clear()
