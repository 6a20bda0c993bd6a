"""Token merging (ToMe) per frame, as a compressor: the paper's token-merging baseline (Table 2).

Written from the ToMe paper (Bolya et al., "Token Merging: Your ViT but Faster", ICLR 2023),
section 3, not from its code. At each merging layer, in every frame independently:

1. The prefix tokens (class, distillation, register tokens) are protected: never merged.
2. The ``M`` patch tokens are split alternately into set A (positions 0, 2, 4, ...) and set B
   (positions 1, 3, 5, ...).
3. Every A token is joined by an edge to its most similar B token (cosine similarity of the
   attention keys, see ``metric``).
4. The ``r`` edges with the highest similarity are kept; their A tokens are merged into their B
   partners (several A tokens may join one B token). A merged token is the size-weighted mean
   of the tokens it absorbs, and its size is the sum of their sizes (every token starts with
   size 1, so the size counts the original patches it stands for).
5. Output per frame: prefix tokens, the unmerged A tokens in their original order, then B.

``r`` tokens per frame disappear at each merging layer; the frame count is unchanged. With
``prop_attn`` every later block adds ``log(size)`` of each key token to the attention logits
(proportional attention), so a token of size ``s`` weighs as much as ``s`` identical copies.

Differences from the ToMe paper's own placement: ToMe merges *inside* a block, between the
attention and the MLP, so the MLP of a merging block already runs on fewer tokens. Here the
merge runs on the block's output (the compressor interface), so ``layers=[i]`` first shrinks
the tokens of ``blocks[i + 1]``; the keys used for matching are still those computed by
``blocks[i].attn``, as in ToMe.

Metric (``metric``): ``'keys'`` (default, ToMe's choice) captures the keys of ``blocks[i].attn``
by wrapping the forward of its ``qkv`` projection and averages them over heads; it needs timm's
``vision_transformer.Attention`` (refused clearly otherwise, e.g. for Eva or OpenCLIP).
``'tokens'`` uses the block's output tokens themselves, which works on any host. Either is
L2-normalised, so the similarity is the cosine similarity.

FLOPs: per frame, a ViT block with ``N`` tokens of width ``C`` (MLP ratio 4) costs about
``12 N C^2 + 2 N^2 C`` multiply-adds. Merging ``r`` tokens after ``blocks[i]`` removes, from every
later block, ``12 r C^2 + 2 (N^2 - (N - r)^2) C``; the matching itself costs
``ceil(M/2) * floor(M/2) * D`` (a matmul, counted by :func:`inti_adapters.count_gflops`, ``D`` the
head width for keys). Use :func:`r_for_budget` to find the ``r`` that meets a GFLOPs target.

Activation checkpointing: token sizes live in a per-model state keyed by the merging layer,
written during the forward and only read (never reset) while autograd recomputes blocks, so
recomputation in any order sees the sizes of the forward being differentiated. As with the
video context, run the backward of a forward before the next forward of the same model.

Example:
    >>> import timm, torch, inti_adapters as ia
    >>> vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=4).eval()
    >>> model = ia.inject(vit, layers=[1], compressor="tome", r=6)
    >>> model(torch.randn(1, 3, 2, 64, 64)).shape
    torch.Size([1, 1000])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._config import Config, check_choice
from .._hooks import after_forward
from ..context import TokenLayout, in_backward
from ._base import Compressor, register_compressor

METRICS = ("keys", "tokens")


@dataclass
class ToMeConfig(Config):
    """Options of the ``tome`` compressor."""

    r: int | tuple[int, ...] = field(
        default=8,
        metadata={
            "help": "Tokens merged away per frame at each merging layer: one int for every layer, "
            "or one int per entry of inject's `layers`. Too large an r is an error."
        },
    )
    metric: str = field(
        default="keys",
        metadata={
            "help": "Similarity used for matching: 'keys' (the block's attention keys, averaged "
            "over heads; timm-style attention) or 'tokens' (the block's output tokens)."
        },
    )
    prop_attn: bool = field(
        default=True,
        metadata={
            "help": "Proportional attention: add log(token size) to the attention logits of every "
            "later block (timm vision_transformer.Attention)."
        },
    )

    def __post_init__(self) -> None:
        r = self.r
        if isinstance(r, Sequence) and not isinstance(r, str):
            r = tuple(r)
            if not r:
                raise ValueError("r must be an int or a non-empty list of ints, got an empty list")
        for v in r if isinstance(r, tuple) else (r,):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"r must be a non-negative int or a list of them, got {self.r!r}")
        self.r = r
        check_choice("metric", self.metric, METRICS)
        if not isinstance(self.prop_attn, bool):
            raise TypeError(f"prop_attn must be a bool, got {self.prop_attn!r}")


# -- tensor math (no hooks, no model) ---------------------------------------------------------------
def max_merge(num_patch_tokens: int) -> int:
    """Most tokens one merge can remove from ``M`` patch tokens: ``|A| = ceil(M/2)`` (0 if M < 2)."""
    return (num_patch_tokens + 1) // 2 if num_patch_tokens >= 2 else 0


def bipartite_matching(metric: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bipartite soft matching of ``M`` tokens ``(S, M, D)``: which A tokens merge into which B tokens.

    Returns:
        ``src`` ``(S, r)``: positions in A of the merged tokens; ``dst`` ``(S, r)``: their partners'
        positions in B; ``keep`` ``(S, ceil(M/2) - r)``: positions in A of the kept tokens, ascending.
    """
    num_a = (metric.shape[1] + 1) // 2
    if not 0 <= r <= max_merge(metric.shape[1]):
        raise ValueError(
            f"r={r} but at most {max_merge(metric.shape[1])} of {metric.shape[1]} tokens can merge"
        )
    with torch.no_grad():
        m = F.normalize(metric, dim=-1)
        scores = m[:, 0::2] @ m[:, 1::2].transpose(-1, -2)  # (S, |A|, |B|) cosine similarities
        best, match = scores.max(dim=-1)
        order = torch.sort(best, dim=-1, descending=True, stable=True).indices
        src = order[:, :r]
        keep = order[:, r:].sort(dim=-1).values if r < num_a else order[:, :0]
        dst = match.gather(1, src)
    return src, dst, keep


def merge_bipartite(
    x: torch.Tensor, sizes: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, keep: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge A tokens ``src`` into B tokens ``dst`` by size-weighted averaging.

    Args:
        x: Tokens ``(S, M, C)`` (A = even positions, B = odd positions).
        sizes: Their sizes ``(S, M)`` (float).
        src, dst, keep: From :func:`bipartite_matching`.

    Returns:
        Tokens ``(S, M - r, C)`` ordered as kept A tokens then B tokens, and their sizes.
        Tokens that absorb nothing are returned bit-identical.
    """
    c = x.shape[-1]
    xa, xb = x[:, 0::2], x[:, 1::2]
    sa, sb = sizes[:, 0::2], sizes[:, 1::2]
    wa = sa.to(x.dtype)[..., None]
    wb = sb.to(x.dtype)[..., None]
    moved = (xa * wa).gather(1, src[..., None].expand(-1, -1, c))
    summed = (xb * wb).scatter_add(1, dst[..., None].expand(-1, -1, c), moved)
    sb_new = sb.scatter_add(1, dst, sa.gather(1, src))
    grown = (sb_new > sb)[..., None]
    xb_new = torch.where(grown, summed / sb_new.to(x.dtype)[..., None], xb)
    xa_keep = xa.gather(1, keep[..., None].expand(-1, -1, c))
    return torch.cat([xa_keep, xb_new], dim=1), torch.cat([sa.gather(1, keep), sb_new], dim=1)


def merge_frames(
    x: torch.Tensor,
    r: int,
    num_prefix_tokens: int,
    *,
    sizes: torch.Tensor | None = None,
    metric: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ToMe on a batch of frames: ``(S, N, C) -> (S, N - r, C)``, prefix tokens untouched.

    Args:
        x: Tokens of ``S`` frames, prefix tokens first.
        r: Patch tokens to merge away per frame.
        num_prefix_tokens: Leading tokens that are never merged.
        sizes: Token sizes ``(S, N)``; None = all 1.
        metric: Matching features of the patch tokens ``(S, N - P, D)``; None = the patch tokens.

    Returns:
        The merged tokens and their sizes ``(S, N - r)`` (float32 unless ``sizes`` was given).
    """
    s, n, _ = x.shape
    p = num_prefix_tokens
    if sizes is None:
        sizes = torch.ones(s, n, device=x.device, dtype=torch.float32)
    patches = x[:, p:]
    if metric is None:
        metric = patches
    src, dst, keep = bipartite_matching(metric, r)
    merged, merged_sizes = merge_bipartite(patches, sizes[:, p:], src, dst, keep)
    return torch.cat([x[:, :p], merged], dim=1), torch.cat([sizes[:, :p], merged_sizes], dim=1)


def size_bias(sizes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive attention bias of proportional attention: ``log(size)`` per key, ``(S, 1, 1, N)``."""
    return sizes.log().to(dtype)[:, None, None, :]


# -- wiring ----------------------------------------------------------------------------------------
class _MergeState:
    """Token sizes and captured keys of one model, keyed by merging block index."""

    def __init__(self, layers: tuple[int, ...]) -> None:
        self.layers = layers
        self.sizes: dict[int, torch.Tensor | None] = {}  # sizes after merging layer l (None: all 1)
        self.keys: dict[int, torch.Tensor] = {}

    def clear(self) -> None:
        self.sizes.clear()
        self.keys.clear()

    def sizes_before(self, block_index: int) -> torch.Tensor | None:
        """Sizes of the tokens entering ``blocks[block_index]`` (None: no merge yet)."""
        earlier = [layer for layer in self.layers if layer < block_index]
        if not earlier:
            return None
        if earlier[-1] not in self.sizes:
            raise RuntimeError(
                f"token sizes of merging layer {earlier[-1]} are missing at blocks[{block_index}]; "
                "was the backbone run without the video model's forward?"
            )
        return self.sizes[earlier[-1]]


def _timm_attention_class() -> type | None:
    try:
        from timm.models.vision_transformer import Attention
    except ImportError:  # pragma: no cover
        return None
    return Attention


@register_compressor("tome")
class TokenMerging(Compressor):
    """Per-frame bipartite soft matching token merging (ToMe) with proportional attention.

    Args:
        dim: Embedding width ``C`` of the tokens.
        config: :class:`ToMeConfig`.

    Used standalone (not injected), it needs ``metric='tokens'`` and an int ``r``; the keys and
    the proportional attention of later blocks need :meth:`attach` (which ``inject`` calls).
    """

    config_class = ToMeConfig

    def __init__(self, dim: int, config: ToMeConfig | None = None) -> None:
        super().__init__(dim, config or ToMeConfig())
        self._state: _MergeState | None = None
        self._layer: int | None = None

    def extra_repr(self) -> str:
        c = self.config
        return f"dim={self.dim}, r={c.r}, metric={c.metric}, prop_attn={c.prop_attn}"

    @property
    def token_sizes(self) -> torch.Tensor | None:
        """Token sizes ``(B*T, N')`` after this layer in the last forward (None: nothing merged yet)."""
        if self._state is None or self._layer not in self._state.sizes:
            return None
        return self._state.sizes[self._layer]

    def merge_count(self) -> int:
        """``r`` of this layer."""
        r = self.config.r
        if isinstance(r, int):
            return r
        if self._state is None or self._layer is None:
            raise ValueError(
                f"r={list(r)} gives one value per merging layer, but this layer is not attached to a model; "
                "use an int r standalone"
            )
        return r[self._state.layers.index(self._layer)]

    def forward(self, x: torch.Tensor, layout: TokenLayout | None = None) -> torch.Tensor:
        """``(B, T, N, C) -> (B, T, N - r, C)``; prefix tokens (``layout``) are never merged."""
        if x.dim() != 4 or x.shape[-1] != self.dim:
            raise ValueError(
                f"TokenMerging expects tokens of shape (B, T, N, {self.dim}), got {tuple(x.shape)}"
            )
        b, t, n, c = x.shape
        p = layout.num_prefix_tokens if layout is not None else 0
        r = self.merge_count()
        where = f"blocks[{self._layer}]" if self._layer is not None else "this layer"
        if r > max_merge(n - p):
            raise ValueError(
                f"tome got r={r} at {where}, but the frames there have {n - p} patch tokens (+{p} prefix), "
                f"so at most r={max_merge(n - p)} can be merged (the size of the alternate set A)"
            )
        state, layer = self._state, self._layer
        sizes = state.sizes_before(layer) if state is not None else None
        if sizes is not None and tuple(sizes.shape) != (b * t, n):
            raise RuntimeError(
                f"tome state holds sizes {tuple(sizes.shape)} for tokens {(b * t, n)} at {where}"
            )
        keys = None
        if self.config.metric == "keys":
            if state is None:
                raise ValueError(
                    "tome metric='keys' needs the compressor injected into a model; use metric='tokens'"
                )
            keys = state.keys.pop(layer, None)
            if keys is None:
                raise RuntimeError(
                    f"tome metric='keys' found no keys from {where}.attn.qkv: was attn.qkv replaced after "
                    "inject (apply peft/LoRA before inject)? Otherwise use metric='tokens'"
                )
            keys = keys[:, p:]
        if r == 0:
            if state is not None:
                state.sizes[layer] = sizes
            return x
        y, new_sizes = merge_frames(x.flatten(0, 1), r, p, sizes=sizes, metric=keys)
        if state is not None:
            state.sizes[layer] = new_sizes
        return y.unflatten(0, (b, t))

    # -- hooks on the host ------------------------------------------------------------------------
    def attach(self, model: Any, block_index: int) -> list[Any]:
        """Share one size state among the model's ``tome`` layers; the first installs the hooks."""
        merging = {int(k): c for k, c in model.compressors.items() if isinstance(c, TokenMerging)}
        layers = tuple(sorted(merging))
        if isinstance(self.config.r, tuple) and len(self.config.r) != len(layers):
            raise ValueError(
                f"tome got r={list(self.config.r)} ({len(self.config.r)} values) for {len(layers)} merging "
                f"layers {list(layers)}; give one r per layer or a single int"
            )
        self._layer = block_index
        if block_index != layers[0]:
            return []
        blocks = model.host.blocks
        holder = model.context
        self._check_host(blocks, layers)
        if getattr(model.host.model, "rope", None) is not None:
            raise ValueError(
                f"tome changes the token count, but {type(model.host.model).__name__} applies rotary position "
                "embeddings (rope) over the full patch grid in every block; create it without rope"
            )
        state = _MergeState(layers)
        for c in merging.values():
            c._state = state

        def reset(module: nn.Module, args: Any) -> None:
            if not holder.disabled and not in_backward():
                state.clear()

        handles = [blocks[0].register_forward_pre_hook(reset)]
        if self.config.metric == "keys":
            for layer in layers:
                attn = blocks[layer].attn
                # wrapped, not hooked: torch.compile may skip hooks of submodules (see _hooks.after_forward)
                handles.append(after_forward(attn.qkv, _keys_hook(attn, layer, state, holder)))
        if self.config.prop_attn:
            for i in range(layers[0] + 1, len(blocks)):
                hook = _prop_attn_hook(i, state, holder)
                handles.append(blocks[i].attn.register_forward_pre_hook(hook, with_kwargs=True))
        return handles

    def _check_host(self, blocks: Any, layers: tuple[int, ...]) -> None:
        timm_attention = _timm_attention_class()

        def supported(i: int) -> bool:
            attn = getattr(blocks[i], "attn", None)
            return timm_attention is not None and isinstance(attn, timm_attention)

        if self.config.metric == "keys":
            for i in layers:
                if not supported(i):
                    raise ValueError(
                        "tome metric='keys' reads the keys from the qkv projection of timm's "
                        f"vision_transformer.Attention, but blocks[{i}].attn is "
                        f"{type(getattr(blocks[i], 'attn', None)).__name__}; pass metric='tokens'"
                    )
        if self.config.prop_attn:
            for i in range(layers[0] + 1, len(blocks)):
                if not supported(i):
                    raise ValueError(
                        "tome prop_attn=True adds log(token size) to the attention logits through the "
                        f"attn_mask argument of timm's vision_transformer.Attention, but blocks[{i}].attn is "
                        f"{type(getattr(blocks[i], 'attn', None)).__name__}; pass prop_attn=False"
                    )


def _keys_hook(attn: nn.Module, layer: int, state: _MergeState, holder: Any):
    heads, head_dim = int(attn.num_heads), int(attn.head_dim)
    k_norm = getattr(attn, "k_norm", None)

    def hook(out: torch.Tensor) -> torch.Tensor:
        if holder.disabled:
            return out
        if out.shape[-1] != 3 * heads * head_dim:
            raise RuntimeError(
                f"blocks[{layer}].attn.qkv gave width {out.shape[-1]}, "
                f"expected 3 * {heads} heads * {head_dim}"
            )
        with torch.no_grad():
            k = out.detach().unflatten(-1, (3, heads, head_dim)).select(-3, 1)  # (S, N, H, D)
            if k_norm is not None:
                k = k_norm(k)
            state.keys[layer] = k.mean(dim=-2)
        return out

    return hook


def _prop_attn_hook(block_index: int, state: _MergeState, holder: Any):
    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any] | None:
        if holder.disabled:
            return None
        sizes = state.sizes_before(block_index)
        if sizes is None:
            return None
        x = args[0] if args else kwargs["x"]
        if tuple(x.shape[:2]) != tuple(sizes.shape):
            raise RuntimeError(
                f"blocks[{block_index}].attn got tokens {tuple(x.shape[:2])} "
                f"but tome sizes are {tuple(sizes.shape)}"
            )
        bias = size_bias(sizes, x.dtype)
        mask = kwargs.get("attn_mask")
        if mask is not None:
            if mask.dtype == torch.bool:
                mask = torch.zeros_like(mask, dtype=x.dtype).masked_fill(~mask, float("-inf"))
            bias = mask + bias
        return args, {**kwargs, "attn_mask": bias}

    return hook


def r_for_budget(
    backbone: nn.Module, video: torch.Tensor, layers: Sequence[int], target_gflops: float, **options: Any
) -> int:
    """The smallest ``r`` (the same at every merging layer) whose clip cost is at most ``target_gflops``.

    Injects ``tome`` into ``backbone`` for each candidate, counts with
    :func:`inti_adapters.count_gflops` and unloads again (the backbone is left as it was). Works on
    the ``meta`` device for large models.

    Args:
        backbone: A host not already injected.
        video: An input of the size to budget for, ``(B, 3, T, H, W)``.
        layers: Merging block indices, as for ``inject``.
        target_gflops: Budget for the whole ``video`` batch.
        **options: Other ``tome`` options (``metric``, ``prop_attn``).

    Raises:
        ValueError: If even the largest feasible ``r`` exceeds the budget.
    """
    from ..flops import count_gflops
    from ..model import inject

    if "r" in options:
        raise TypeError("r_for_budget chooses r itself; do not pass r")

    def cost(r: int) -> float | None:
        model = inject(backbone, layers, compressor="tome", r=r, **options)
        try:
            return count_gflops(model, video)
        except ValueError as e:  # r larger than the tokens allow is infeasible; any other error is real
            if r == 0 or "can be merged" not in str(e):
                raise
            return None
        finally:
            model.unload()

    if cost(0) <= target_gflops:
        return 0
    lo, hi = 1, 1  # find the feasible range, then bisect (cost falls as r grows)
    while (c := cost(hi)) is not None and c > target_gflops:
        lo, hi = hi + 1, hi * 2
    if c is None:  # hi is infeasible: bisect for the largest feasible r first
        top_lo, top_hi = lo - 1, hi
        while top_hi - top_lo > 1:
            mid = (top_lo + top_hi) // 2
            if cost(mid) is None:
                top_hi = mid
            else:
                top_lo = mid
        best = cost(top_lo) if top_lo >= 1 else None
        if best is None or best > target_gflops:
            raise ValueError(
                f"no r reaches {target_gflops} GFLOPs with layers {list(layers)}: "
                f"the largest feasible r={top_lo} "
                f"costs {best} GFLOPs"
            )
        hi = top_lo
    while lo < hi:
        mid = (lo + hi) // 2
        c = cost(mid)
        if c is not None and c <= target_gflops:
            hi = mid
        else:
            lo = mid + 1
    return lo
