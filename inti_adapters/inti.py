"""The InTI layer: inter-frame token interpolation with predicted weights.

Pure tensor code with no knowledge of hosts: it takes the tokens of a clip ``(B, T, N, C)``,
pairs neighbouring frames (1,2), (3,4), ... and returns ``(B, ceil(T/2), N, C)`` where every
token is ``w_a * a_k + w_b * b_k`` with weights predicted per token from four contexts
(token, cube, frame, global), as defined in section 3.2 and appendix B of the paper
(*Dynamic and Compressive Adaptation of Transformers From Images to Videos*).

This file is the definition, in plain autograd operations, read top-down in
:meth:`InTILayer.forward`: pairing, the contexts (:meth:`~InTILayer.contexts`), fusion
(:meth:`~InTILayer.fuse`), the weight head (:meth:`~InTILayer.pair_weights`), interpolation and the
temporal position (:meth:`~InTILayer.interpolate`). ``InTIConfig.kernel`` picks how it is executed:
``"reference"`` runs this code, ``"fused"`` the hand-fused CPU kernel of
:mod:`inti_adapters.kernels.inti_cpu` (the same function from the same parameters, with written-out
backward passes); ``"auto"`` takes the fused kernel in eager mode on the CPU, this code under
``torch.compile`` and on other devices.

Adding a context (here "motion", the difference of the two frames of a pair) is a change to this
file only; the fusions and the head's input width follow, and ``"auto"`` runs the plain layer for it::

    register_context("motion")                                  # at module level: InTIConfig accepts it
    # InTILayer.__init__: its projection, when asked for
    self.motion_proj = _Proj(dim, h) if "motion" in ctx else None
    # InTILayer.contexts: its feature, (B, T', N, C') or broadcastable over the tokens
    if self.motion_proj is not None:
        feats["motion"] = self.motion_proj(b - a)

Example:
    >>> import torch
    >>> from inti_adapters import InTILayer, TokenLayout
    >>> layer = InTILayer(dim=32)
    >>> x = torch.randn(2, 8, 1 + 4 * 4, 32)           # 8 frames, class token + 4x4 grid
    >>> y = layer(x, TokenLayout(num_prefix_tokens=1, cls_index=0, grid=(4, 4)))
    >>> tuple(y.shape)
    (2, 4, 17, 32)
    >>> torch.allclose(y, (x[:, 0::2] + x[:, 1::2]) / 2)  # a fresh layer averages pairs
    True
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .compressors._base import Compressor, register_compressor
from .config import InTIConfig, register_context  # noqa: F401  (register_context: see "Adding a context")
from .kernels import inti_cpu
from .ops import DepthwiseConv3d, depthwise_conv3d
from .tokens import TokenLayout, pair_frames, patch_volume


class _Proj(nn.Sequential):
    """phi(z) = GELU(Linear(LayerNorm(z)))."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__(nn.LayerNorm(in_dim), nn.Linear(in_dim, out_dim), nn.GELU())


class GlobalContext(nn.Module):
    """Class tokens of all frames -> one global feature per clip (paper appendix B): three depth-wise
    temporal convolutions (kernel 3) with GELU, max pooling halving the frames after the first two
    (ceil mode; a single frame is left as it is), a mean over the frames left, GELU and a linear
    projection."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv1d(dim, dim, 3, padding=1, groups=dim) for _ in range(3))
        self.proj = nn.Linear(dim, hidden_dim)

    def forward(self, cls: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, C')
        z = cls.transpose(1, 2)  # (B, C, T)
        for conv in self.convs[:2]:
            z = conv(z)
            z = F.gelu(F.max_pool1d(z, 2, ceil_mode=True) if z.shape[-1] > 1 else z)
        return self.proj(F.gelu(self.convs[2](z).mean(-1)))


def frame_tokens(x: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """One token per frame ``(B, T, C)``: the class token, or the mean of the patch tokens without one."""
    if layout.cls_index is not None:
        return x[:, :, layout.cls_index]
    return x[:, :, layout.num_prefix_tokens:].mean(dim=2)


def _sum(tensors: list[torch.Tensor]) -> torch.Tensor:
    out = tensors[0]
    for t in tensors[1:]:
        out = out + t
    return out


@register_compressor("inti")
class InTILayer(Compressor):
    """Inter-frame token interpolation: halves the frame count with per-token weights.

    Args:
        dim: Embedding width ``C`` of the tokens.
        config: :class:`~inti_adapters.InTIConfig`; defaults to the paper's best setting.

    A fresh layer (zero-initialised last head layer, ``alpha = 0``) returns the plain average
    of each frame pair, so injecting it leaves a static video's features unchanged.
    """

    config_class = InTIConfig
    renamed_parameters = {"head.": "predictor."}  # adapters saved before 0.2 call the predictor 'head'

    def __init__(self, dim: int, config: InTIConfig | None = None) -> None:
        config = config or InTIConfig()
        super().__init__(dim, config)
        h = config.hidden_dim or dim
        self.hidden_dim = h
        ctx = set(config.contexts)
        unfused = sorted(ctx - set(inti_cpu.CONTEXTS))
        if config.kernel == "fused" and unfused:
            raise ValueError(f"kernel 'fused' computes the contexts {list(inti_cpu.CONTEXTS)}, not {unfused}; "
                             "use kernel 'auto' or 'reference' (the plain layer) for them")
        # one module per context: phi of the pair's concatenated inputs (2C -> C'), or the global one
        self.token_proj = _Proj(2 * dim, h) if "token" in ctx else None
        if "cube" in ctx:
            self.cube_conv = DepthwiseConv3d(dim, 3)  # = nn.Conv3d(dim, dim, 3, padding=1, groups=dim)
            self.cube_proj = _Proj(2 * dim, h)
        else:
            self.cube_conv = self.cube_proj = None
        self.frame_proj = _Proj(2 * dim, h) if "frame" in ctx else None
        self.global_ctx = GlobalContext(dim, h) if "global" in ctx else None
        self._build_weight_head(config, ctx, h)
        if config.temporal_embed:
            self.time_embed = nn.Parameter(torch.empty(config.max_frames, dim))
            nn.init.trunc_normal_(self.time_embed, std=config.embed_init_std)
            self.alpha = nn.Parameter(torch.zeros(1))
        else:
            self.time_embed = self.alpha = None

    def _build_weight_head(self, config: InTIConfig, ctx: set[str], h: int) -> None:
        """``predictor`` (the paper's 'head': fused contexts -> 2 logits, or 2 features for 'attention')
        and the attention head's ``query``; zero-initialised last layer (or normal, ``head_init_std``)."""
        others = len(ctx - {"token"})
        if config.fusion == "sep":
            in_dim = h * (int("token" in ctx) + int(others > 0))
        elif config.fusion == "add":
            in_dim = h
        else:  # cat
            in_dim = h * len(ctx)
        out = 2 * h if config.weight_head == "attention" else 2
        self.predictor = nn.Sequential(nn.Linear(in_dim, h), nn.GELU(), nn.Linear(h, out))
        std = config.head_init_std
        if config.weight_head == "attention":
            # zero query (default): equal logits for both frames, i.e. a plain average at init
            self.query = nn.Parameter(torch.zeros(h))
            if std:
                nn.init.normal_(self.query, std=std)
        else:
            self.query = None
            nn.init.zeros_(self.predictor[-1].bias)
            if std:
                nn.init.normal_(self.predictor[-1].weight, std=std)
            else:
                nn.init.zeros_(self.predictor[-1].weight)

    def output_frames(self, num_frames: int) -> int:
        return (num_frames + 1) // 2

    def no_weight_decay(self) -> set[str]:
        return {n for n in ("time_embed", "alpha", "query") if getattr(self, n, None) is not None}

    def extra_repr(self) -> str:
        c = self.config
        return (f"dim={self.dim}, hidden={self.hidden_dim}, contexts={list(c.contexts)}, fusion={c.fusion}, "
                f"weight_head={c.weight_head}, kernel={c.kernel}")

    # -- the layer, top-down ------------------------------------------------------------------
    def forward(
        self, x: torch.Tensor, layout: TokenLayout | None = None, *, return_weights: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Compress ``(B, T, N, C)`` tokens to ``(B, ceil(T/2), N, C)``.

        Args:
            x: Tokens of a clip, prefix tokens first then the patch grid row by row.
            layout: Prefix-token count, class-token index and patch grid; defaults to
                "no prefix tokens, no grid" (then the 'cube' context cannot be used).
            return_weights: Also return the interpolation weights ``(B, T', N, 2)``.
        """
        layout = self._check(x, layout)
        if self.uses_fused_kernel(x):
            y, w = inti_cpu.forward(self, x, layout)
            return (y, w) if return_weights else y
        bsz, _, n, _ = x.shape
        a, b = pair_frames(x, self.config.odd_frames)  # pairing: (B, T', N, C) each; odd T: the last frame twice
        feats = self.contexts(x, a, b, layout)  # token, cube, frame, global: width C' each
        logits = self.predictor(self.fuse(feats, (bsz, a.shape[1], n, self.hidden_dim)))  # fusion, head
        w = self.pair_weights(logits).to(x.dtype).expand(bsz, a.shape[1], n, 2)  # (w_a, w_b) per token
        y = self.interpolate(a, b, w)  # w_a a + w_b b + alpha E[t']
        return (y, w) if return_weights else y

    def contexts(self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, layout: TokenLayout) -> dict[str, torch.Tensor]:
        """Each context's feature of width ``C'``, ``(B, T', N, C')`` or broadcastable over the tokens
        (``N`` -> 1) and the frames, for the clip ``x`` and its frame pairs ``a``, ``b``."""
        odd = self.config.odd_frames
        feats: dict[str, torch.Tensor] = {}
        if self.token_proj is not None:  # token: [a_k ; b_k], per token position
            feats["token"] = self.token_proj(torch.cat([a, b], dim=-1))
        if self.cube_proj is not None:  # cube: the local spatio-temporal neighbourhood of each patch
            feats["cube"] = self.cube_context(x, layout)
        if self.frame_proj is not None or self.global_ctx is not None:
            cls = frame_tokens(x, layout)  # (B, T, C)
            if self.frame_proj is not None:  # frame: the pair's two class tokens, for every token of the pair
                cls_a, cls_b = pair_frames(cls, odd)
                feats["frame"] = self.frame_proj(torch.cat([cls_a, cls_b], dim=-1))[:, :, None]
            if self.global_ctx is not None:  # global: all frames' class tokens, once per clip
                feats["global"] = self.global_ctx(cls)[:, None, None]
        return feats

    def cube_context(self, x: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        """``f_cube`` ``(B, T', N, C')``: a depth-wise 3-D convolution (kernel 3, padding 1) over the patch
        tokens of all frames (on their channels-last volume ``(B, T, H, W, C)``), the results of a pair's
        two frames concatenated and projected; zero for the prefix tokens."""
        vol = patch_volume(x, layout, who="InTI's 'cube' context",
                           hint="Drop 'cube' from contexts for hosts without a spatial grid.")
        b, t, gh, gw, c = vol.shape
        # 'taps': depth-wise 2-D convolutions and shifted adds, plain autograd operations on every device
        conv = depthwise_conv3d(vol, self.cube_conv.weight, self.cube_conv.bias, "taps").reshape(b, t, gh * gw, c)
        ca, cb = pair_frames(conv, self.config.odd_frames)
        f = self.cube_proj(torch.cat([ca, cb], dim=-1))  # (B, T', HW, C')
        return F.pad(f, (0, 0, layout.num_prefix_tokens, 0))

    def fuse(self, feats: dict[str, torch.Tensor], full: tuple[int, int, int, int]) -> torch.Tensor:
        """The weight head's input (paper Table 5b): 'sep' ``[f_token ; sum of the others]``, 'add' the
        sum of all, 'cat' all side by side; ``full`` = ``(B, T', N, C')``."""
        fusion = self.config.fusion
        if fusion == "cat":
            return torch.cat([f.expand(full) for f in feats.values()], dim=-1)
        if fusion == "add":
            return _sum(list(feats.values()))
        others = [f for k, f in feats.items() if k != "token"]  # sep: the token feature beside the others' sum
        if "token" not in feats:
            return _sum(others)
        if not others:
            return feats["token"]
        return torch.cat([feats["token"], _sum(others).expand(full)], dim=-1)

    def pair_weights(self, logits: torch.Tensor) -> torch.Tensor:
        """The weight head: the predictor's output -> ``(w_a, w_b)`` on the last dim."""
        head = self.config.weight_head
        if head == "softmax":
            return logits.softmax(dim=-1)
        if head == "sigmoid":
            return logits.sigmoid()
        # attention: one feature per frame of the pair, dotted with a learnable query
        per_frame = logits.unflatten(-1, (2, self.hidden_dim))
        return (per_frame @ self.query.to(per_frame.dtype)).softmax(dim=-1)

    def interpolate(self, a: torch.Tensor, b: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """``y = w_a a + w_b b`` per token, plus the temporal position ``alpha * E[t']`` of each output frame."""
        y = w[..., 0:1] * a + w[..., 1:2] * b
        if self.time_embed is not None:
            y = y + (self.alpha * self.time_embed[: a.shape[1]]).to(y.dtype)[:, None]  # (T', 1, C)
        return y

    # -- checks and the kernel ----------------------------------------------------------------
    def _check(self, x: torch.Tensor, layout: TokenLayout | None) -> TokenLayout:
        if x.dim() != 4:
            raise ValueError(f"InTILayer expects tokens of shape (B, T, N, C), got shape {tuple(x.shape)}")
        if x.shape[-1] != self.dim:
            raise ValueError(f"InTILayer was built for width {self.dim}, got tokens of width {x.shape[-1]}")
        if x.shape[1] < 1:
            raise ValueError("InTILayer got a clip with 0 frames")
        t2 = (x.shape[1] + 1) // 2
        if self.time_embed is not None and t2 > self.time_embed.shape[0]:
            raise ValueError(
                f"{x.shape[1]} input frames give {t2} output frames, more than the {self.time_embed.shape[0]} "
                f"rows of this layer's temporal position table; build it with max_frames>={t2}"
            )
        return layout if layout is not None else TokenLayout(0, None, None)

    def uses_fused_kernel(self, x: torch.Tensor) -> bool:
        """Whether a call on ``x`` runs :mod:`inti_adapters.kernels.inti_cpu` (see ``InTIConfig.kernel``)."""
        kernel = self.config.kernel
        if kernel != "auto":
            return kernel == "fused"
        return (x.device.type == "cpu" and not torch.compiler.is_compiling()
                and set(self.config.contexts) <= set(inti_cpu.CONTEXTS))
