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

Metric (``metric``): ``'keys'`` (default, ToMe's choice) reads the keys of ``blocks[i]``'s
attention (``Site.attention_keys``) and averages them over heads; it needs a host that knows the
block's fused ``qkv`` projection (timm's ``vision_transformer.Attention``; refused clearly
otherwise, e.g. for Eva or OpenCLIP).
``'tokens'`` uses the block's output tokens themselves, which works on any host. Either is
L2-normalised, so the similarity is the cosine similarity.

FLOPs: per frame, a ViT block with ``N`` tokens of width ``C`` (MLP ratio 4) costs about
``12 N C^2 + 2 N^2 C`` multiply-adds. Merging ``r`` tokens after ``blocks[i]`` removes, from every
later block, ``12 r C^2 + 2 (N^2 - (N - r)^2) C``; the matching itself costs
``ceil(M/2) * floor(M/2) * D`` (a matmul, counted by :func:`inti_adapters.count_gflops`, ``D`` the
head width for keys). Use :func:`inti_adapters.r_for_budget` to find the ``r`` that meets a GFLOPs
target.

Activation checkpointing: token sizes live in the video model's per-forward store
(``Site.store('tome')``), keyed by the merging layer; a recompute writes the same values again,
so recomputation in any order sees the sizes of the forward being differentiated. As with the
video context, run the backward of a forward before the next forward of the same model.

Example:
    >>> import timm, torch, inti_adapters as ia
    >>> vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=4).eval()
    >>> model = ia.inject(vit, layers=[1], compressor="tome", r=6)
    >>> model(torch.randn(1, 3, 2, 64, 64)).shape
    torch.Size([1, 1000])
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F

from .._config import Config, check_choice
from ..surgery import Site
from ..tokens import TokenLayout
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
class _Sizes:
    """Token sizes and captured keys of one model's merging layers, in its per-forward store."""

    def __init__(self, store: dict, layers: tuple[int, ...]) -> None:
        self.store, self.layers = store, layers

    def before(self, block_index: int) -> torch.Tensor | None:
        """Sizes of the tokens entering ``blocks[block_index]`` (None: nothing merged before it)."""
        earlier = [layer for layer in self.layers if layer < block_index]
        if not earlier:
            return None
        if ("sizes", earlier[-1]) not in self.store:
            raise RuntimeError(
                f"token sizes of merging layer {earlier[-1]} are missing at blocks[{block_index}]; "
                "was the backbone run without the video model's forward?"
            )
        return self.store[("sizes", earlier[-1])]


@register_compressor("tome")
class TokenMerging(Compressor):
    """Per-frame bipartite soft matching token merging (ToMe) with proportional attention.

    Args:
        dim: Embedding width ``C`` of the tokens.
        config: :class:`ToMeConfig`.

    Used standalone (not injected), it needs ``metric='tokens'`` and an int ``r``; the keys and
    the proportional attention of later blocks need :meth:`attach` (which ``inject`` calls).
    Its state (token sizes, keys) lives in the video model's per-forward store.
    """

    config_class = ToMeConfig

    def __init__(self, dim: int, config: ToMeConfig | None = None) -> None:
        super().__init__(dim, config or ToMeConfig())
        self._sizes: _Sizes | None = None
        self._layer: int | None = None
        self._r: int | None = None

    def extra_repr(self) -> str:
        c = self.config
        return f"dim={self.dim}, r={c.r}, metric={c.metric}, prop_attn={c.prop_attn}"

    @property
    def token_sizes(self) -> torch.Tensor | None:
        """Token sizes ``(B*T, N')`` after this layer in the last forward (None: nothing merged yet)."""
        if self._sizes is None:
            return None
        return self._sizes.store.get(("sizes", self._layer))

    def merge_count(self) -> int:
        """``r`` of this layer."""
        if self._r is not None:
            return self._r
        if isinstance(self.config.r, int):
            return self.config.r
        raise ValueError(
            f"r={list(self.config.r)} gives one value per merging layer, but this layer is not attached to a "
            "model; use an int r standalone"
        )

    def forward(self, x: torch.Tensor, layout: TokenLayout | None = None) -> torch.Tensor:
        """``(B, T, N, C) -> (B, T, N - r, C)``; prefix tokens (``layout``) are never merged."""
        if x.dim() != 4 or x.shape[-1] != self.dim:
            raise ValueError(f"TokenMerging expects tokens of shape (B, T, N, {self.dim}), got {tuple(x.shape)}")
        b, t, n, _ = x.shape
        p = layout.num_prefix_tokens if layout is not None else 0
        r = self.merge_count()
        where = f"blocks[{self._layer}]" if self._layer is not None else "this layer"
        if r > max_merge(n - p):
            raise ValueError(
                f"tome got r={r} at {where}, but the frames there have {n - p} patch tokens (+{p} prefix), "
                f"so at most r={max_merge(n - p)} can be merged (the size of the alternate set A)"
            )
        sizes = self._sizes.before(self._layer) if self._sizes is not None else None
        if sizes is not None and tuple(sizes.shape) != (b * t, n):
            raise RuntimeError(f"tome state holds sizes {tuple(sizes.shape)} for tokens {(b * t, n)} at {where}")
        keys = self._take_keys(where)
        keys = keys[:, p:] if keys is not None else None
        if r == 0:
            new_sizes, y = sizes, x
        else:
            y, new_sizes = merge_frames(x.flatten(0, 1), r, p, sizes=sizes, metric=keys)
            y = y.unflatten(0, (b, t))
        if self._sizes is not None:
            self._sizes.store[("sizes", self._layer)] = new_sizes
        return y

    def _take_keys(self, where: str) -> torch.Tensor | None:
        if self.config.metric != "keys":
            return None
        if self._sizes is None:
            raise ValueError("tome metric='keys' needs the compressor injected into a model; use metric='tokens'")
        keys = self._sizes.store.pop(("keys", self._layer), None)
        if keys is None:
            raise RuntimeError(
                f"tome metric='keys' found no keys from {where}.attn.qkv: was attn.qkv replaced after "
                "inject (apply peft/LoRA before inject)? Otherwise use metric='tokens'"
            )
        return keys

    # -- wiring through the surgery layer ------------------------------------------------------------
    def attach(self, site: Site, block_index: int) -> None:
        """Merge after ``blocks[block_index]``; read its keys; bias later blocks' attention by size."""
        layers = site.compressor_layers
        r = self.config.r
        if isinstance(r, tuple) and len(r) != len(layers):
            raise ValueError(
                f"tome got r={list(r)} ({len(r)} values) for {len(layers)} merging layers {list(layers)}; "
                "give one r per layer or a single int"
            )
        self._layer = block_index
        self._r = r[layers.index(block_index)] if isinstance(r, tuple) else r
        self._sizes = sizes = _Sizes(site.store("tome"), layers)
        if self.config.metric == "keys":
            with _hint("pass metric='tokens' to match on the block's output tokens"):
                site.attention_keys(block_index, partial(_keep_keys, sizes.store, block_index))
        super().attach(site, block_index)
        if self.config.prop_attn:  # the blocks that see this layer's sizes: up to and with the next merge
            later = [layer for layer in layers if layer > block_index]
            with _hint("pass prop_attn=False to merge without proportional attention"):
                for j in range(block_index + 1, (later[0] + 1) if later else site.depth):
                    site.attention_bias(j, partial(_size_bias_at, sizes, j))
        if site.uses_rope:
            raise ValueError(
                "tome changes the token count, but this backbone applies rotary position embeddings (rope) "
                "over the full patch grid in every block; create it without rope"
            )


@contextlib.contextmanager
def _hint(text: str) -> Iterator[None]:
    """Re-raise a site's refusal with what tome's user can do about it."""
    try:
        yield
    except ValueError as e:
        raise ValueError(f"tome: {e}; {text}") from None


def _keep_keys(store: dict, block_index: int, keys: torch.Tensor, ctx: Any) -> None:
    store[("keys", block_index)] = keys.mean(dim=-2)  # averaged over heads, as in ToMe


def _size_bias_at(sizes: _Sizes, block_index: int, ctx: Any, x: torch.Tensor) -> torch.Tensor | None:
    current = sizes.before(block_index)
    if current is None:
        return None
    if tuple(x.shape[:2]) != tuple(current.shape):
        raise RuntimeError(
            f"blocks[{block_index}].attn got tokens {tuple(x.shape[:2])} but tome sizes are {tuple(current.shape)}"
        )
    return size_bias(current, x.dtype)
