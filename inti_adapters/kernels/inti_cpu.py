"""The InTI layer's hand-fused CPU kernel: ``InTIConfig.kernel = "fused"`` (and ``"auto"`` in eager mode
on the CPU).

Computes exactly what :class:`inti_adapters.inti.InTILayer` defines in plain autograd operations (that
plain formulation is the definition; ``tests/test_inti_layer.py`` holds the two equal, outputs and
gradients, for every switch), from the layer's own parameters, with four ``torch.autograd.Function`` s
whose backward passes are written out. On a width-64 model on the CPU the per-operation overhead, not
the arithmetic, dominates the layer's time, and each Function replaces many autograd nodes by one:

- :class:`_ContextInputs` -- ``x`` and what the contexts read from it (pairs, patch tokens, one token
  per frame), whose gradients meet in one tensor of ``x``'s size in one pass;
- :class:`_GlobalConvs` -- the global context's convolutions and pooling as window sums;
- :class:`_AddParts` -- the 'sep' fusion's first linear layer applied part by part, added in place;
- :class:`_Interpolate` -- ``w_a a + w_b b + alpha E[t']`` in two multiply-adds.

The cube context's depth-wise 3-D convolution is the layer's ``cube_conv``
(:class:`inti_adapters.ops.DepthwiseConv3d`, its per-device formulation). Contexts other than the
paper's four have no fused form: ``"auto"`` then takes the plain layer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ..tokens import TokenLayout, even_frames, pair_concat, patch_volume

if TYPE_CHECKING:
    from ..inti import GlobalContext, InTILayer

CONTEXTS = ("token", "cube", "frame", "global")  # the contexts this kernel computes


def _with_prefix_rows(full: torch.Tensor | None, patches: torch.Tensor, p: int) -> torch.Tensor:
    """``full + [0 ; patches]`` over the token dim (``p`` prefix rows), the zeros never materialised.

    ``full`` (broadcastable to ``(B, T', p + HW, C')``, or None for zeros) gets ``patches``
    ``(B, T', HW, C')`` added to its patch rows.
    """
    if full is None:
        return F.pad(patches, (0, 0, p, 0)) if p else patches
    if not p:
        return full + patches
    b, t2, hw, c = patches.shape
    full = full.expand(b, t2, p + hw, c)
    return torch.cat([full[:, :, :p], full[:, :, p:] + patches], dim=2)


def _time_windows(z: torch.Tensor) -> torch.Tensor:
    """``(B, T, C) -> (B, T, C, 3)``: each frame's zero-padded neighbourhood (t - 1, t, t + 1), a view of a padded copy."""
    return torch.constant_pad_nd(z, (0, 0, 1, 1)).unfold(1, 3, 1)


def _gelu_grad(g: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten.gelu_backward(g, z)


class _GlobalConvs(torch.autograd.Function):
    """The global context before its projection, on class tokens ``(B, T, C)``: three depth-wise
    temporal convolutions (kernel 3, padding 1) with GELU, max pooling (kernel 2, ceil mode) halving
    the frames after the first two, a mean over the frames left, GELU: ``(B, C)``.

    Equal to ``nn.Conv1d(C, C, 3, padding=1, groups=C)`` and ``max_pool1d`` on ``(B, C, T)`` (ties send
    the gradient to the first frame, as max_pool1d does). On these few frames the cost is the number
    of operations, not the arithmetic (oneDNN's per-call setup alone outweighed it), so the
    convolutions are window sums on ``(B, T, C)`` and the backward is written out: one autograd node
    instead of ~25. Being element-wise, their multiply-adds (3 per channel and frame each) are not in
    FLOP counts: 1e-5 of a ViT-B/16 InTI layer's, 4e-4 of the demo model's.
    """

    @staticmethod
    def forward(ctx: Any, cls: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        weights, biases = params[0::2], params[1::2]  # (C, 1, 3), (C,) for each convolution
        saved, pools, z = [cls], [], cls
        for w, b in zip(weights[:2], biases[:2], strict=True):
            y = (_time_windows(z) * w[:, 0]).sum(-1).add_(b)
            if y.shape[1] > 1:  # pool; a single frame is left as it is
                pools.append((y.shape[1], True))
                v, idx = torch.constant_pad_nd(y, (0, 0, 0, y.shape[1] % 2), float("-inf")).unflatten(1, (-1, 2)).max(2)
            else:
                pools.append((1, False))
                v, idx = y, y.new_empty(0, dtype=torch.long)
            z = F.gelu(v)
            saved += [v, idx, z]
        m = (_time_windows(z) * weights[2][:, 0]).sum(-1).add_(biases[2]).mean(1)
        ctx.save_for_backward(*saved, m, *weights)
        ctx.pools = pools
        return F.gelu(m)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        cls, v1, i1, z1, v2, i2, z2, m, *weights = ctx.saved_tensors
        grads: list[torch.Tensor] = []  # (weight, bias) gradients, last convolution first

        def conv_backward(gy: torch.Tensor, z: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            grads.extend([gy.sum((0, 1)), (_time_windows(z) * gy.unsqueeze(-1)).sum((0, 1)).unsqueeze(1)])
            return (_time_windows(gy) * w[:, 0].flip(-1)).sum(-1)  # correlation with the flipped kernel

        def pool_backward(gv: torch.Tensor, idx: torch.Tensor, pool: tuple[int, bool]) -> torch.Tensor:
            t, pooled = pool
            if not pooled:
                return gv
            b, t2, c = gv.shape
            return gv.new_zeros(b, t2, 2, c).scatter_(2, idx.unsqueeze(2), gv.unsqueeze(2)).flatten(1, 2)[:, :t]

        gm = _gelu_grad(g, m)
        t3 = z2.shape[1]
        gz = conv_backward((gm / t3).unsqueeze(1).expand(-1, t3, -1), z2, weights[2])
        gz = conv_backward(pool_backward(_gelu_grad(gz, v2), i2, ctx.pools[1]), z1, weights[1])
        gcls = conv_backward(pool_backward(_gelu_grad(gz, v1), i1, ctx.pools[0]), cls, weights[0])
        gb3, gw3, gb2, gw2, gb1, gw1 = grads
        return gcls, gw1, gb1, gw2, gb2, gw3, gb3


def global_context(g: GlobalContext, cls: torch.Tensor) -> torch.Tensor:
    """``g(cls)`` (:class:`inti_adapters.inti.GlobalContext`) through :class:`_GlobalConvs`: ``(B, T, C) -> (B, C')``."""
    params = [t for conv in g.convs for t in (conv.weight, conv.bias)]
    return g.proj(_GlobalConvs.apply(cls, *params))


def _sum(tensors: list[torch.Tensor]) -> torch.Tensor:
    out = tensors[0]
    for t in tensors[1:]:
        out = out + t
    return out


def frame_tokens(x: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """One token per frame: the class token, or the mean of the patch tokens without one."""
    if layout.cls_index is not None:
        return x[:, :, layout.cls_index]
    p = layout.num_prefix_tokens
    patches = x[:, :, p:] if p else x
    # the mean as sum / count: the sum's backward is a broadcast view, not a full-size division
    return patches.sum(dim=2) / patches.shape[2]


class _ContextInputs(torch.autograd.Function):
    """``x`` itself (for the interpolation) and what the contexts read from it, in one node: the frame
    pairs ``[a ; b]`` (token context), the patch tokens (cube context) and one token per frame
    (frame / global contexts).

    Equal to ``x``, ``pair_concat(x)``, ``x[:, :, p:]`` and :func:`frame_tokens` (the last three
    contiguous copies). The backward sums all their gradients into one tensor of ``x``'s size in one
    pass; through autograd each slice would get its own zero-filled gradient of that size, and each
    of them would be added to the others.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, p: int, cls_index: int | None, odd_frames: str, pairs: bool,
                patches: bool, frame: bool) -> tuple[torch.Tensor, ...]:
        ctx.set_materialize_grads(False)
        ctx.shape, ctx.p, ctx.cls_index, ctx.wanted = x.shape, p, cls_index, (pairs, patches, frame)
        # one empty tensor per output not asked for: torch.compile's tracing fails on an output returned twice
        return (x.view_as(x),
                pair_concat(x, odd_frames).contiguous() if pairs else x.new_empty(0),
                x[:, :, p:].contiguous() if patches else x.new_empty(0),
                frame_tokens(x, TokenLayout(p, cls_index, None)).contiguous() if frame else x.new_empty(0))

    @staticmethod
    def _pairs_grad(g_x: torch.Tensor | None, g_pairs: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """``g_x + (the gradient of pair_concat(x))`` in one pass (a new tensor)."""
        b, t, n, c = shape
        t2 = g_pairs.shape[1]
        per_frame = g_pairs.unflatten(-1, (2, c)).movedim(-2, 2)  # (B, T', 2, N, C): frames 0, 1, 2, ...
        if 2 * t2 == t:
            gx = g_pairs.new_empty(b, t, n, c)
            if g_x is None:
                gx.view(b, t2, 2, n, c).copy_(per_frame)
            else:
                torch.add(g_x.reshape(b, t2, 2, n, c), per_frame, out=gx.view(b, t2, 2, n, c))
            return gx
        full = per_frame.reshape(b, 2 * t2, n, c)  # odd T: the last frame was paired with itself
        gx = full[:, :t] + g_x if g_x is not None else full[:, :t].clone()
        gx[:, -1] += full[:, t]
        return gx

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g_x: torch.Tensor | None, g_pairs: torch.Tensor | None, g_patches: torch.Tensor | None,
                 g_frame: torch.Tensor | None) -> tuple[torch.Tensor | None, None, None, None, None, None, None]:
        b, t, n, c = ctx.shape
        p, nones = ctx.p, (None,) * 6
        # an output not asked for is an empty tensor; torch.compile hands it a (zero, empty) gradient
        g_pairs, g_patches, g_frame = (g if want else None for g, want in zip((g_pairs, g_patches, g_frame),
                                                                              ctx.wanted, strict=True))
        if g_pairs is not None:
            gx = _ContextInputs._pairs_grad(g_x, g_pairs, ctx.shape)
        elif g_x is not None:
            gx = g_x.clone(memory_format=torch.contiguous_format)  # never write into autograd's own buffer
        elif g_patches is not None or g_frame is not None:
            gx = (g_patches if g_patches is not None else g_frame).new_zeros(b, t, n, c)
        else:
            return None, *nones
        if g_patches is not None:
            gx[:, :, p:] += g_patches
        if g_frame is not None:
            if ctx.cls_index is not None:
                gx[:, :, ctx.cls_index] += g_frame
            else:
                gx[:, :, p:] += (g_frame / (n - p))[:, :, None]
        return gx, *nones


class _AddParts(torch.autograd.Function):
    """``z += bcast`` (broadcast) and ``z[:, :, p:] += rows``, in place on the 2-D ``z`` (a product's
    fresh output, which no backward needs) seen as ``shape``; returns ``z``.

    In place: no new tensor in the forward, where the memory held for the backward keeps growing.
    Done through autograd instead, the in-place add into a slice of a view of ``z`` costs the backward
    several full-size copies and zero-fills (``CopySlices``, ``AsStrided``); here the backward hands
    each part its share of the gradient: ``g``, its sum over the broadcast dims, its slice.
    """

    @staticmethod
    def forward(ctx: Any, z: torch.Tensor, bcast: torch.Tensor | None, rows: torch.Tensor | None,
                shape: tuple[int, ...], p: int) -> torch.Tensor:
        ctx.mark_dirty(z)
        ctx.shape, ctx.bcast_shape, ctx.p = shape, (bcast.shape if bcast is not None else None), p
        full = z.view(shape)
        if bcast is not None:
            full += bcast
        if rows is not None:
            full[:, :, p:] += rows
        return z

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        _, need_bcast, need_rows, _, _ = ctx.needs_input_grad
        full = g.view(ctx.shape)
        return (g, full.sum_to_size(ctx.bcast_shape) if need_bcast else None,
                full[:, :, ctx.p:] if need_rows else None, None, None)


class _Interpolate(torch.autograd.Function):
    """``y = w_a * a + w_b * b (+ e)`` of each frame pair of ``x`` ``(B, 2T', N, C)`` with weights ``w``
    ``(B, T', N, 2)`` and an optional per-frame embedding ``e`` ``(T', C)``: one multiply-add into a
    new tensor and one in place (no ``(B, T', 2, N, C)`` product to sum, no separate pass to add the
    embedding), and a backward with ``x``'s gradient computed in ``x``'s own layout."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor, e: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, w)
        b, t, n, c = x.shape
        pairs = x.view(b, t // 2, 2, n, c)
        a_term = pairs[:, :, 0] * w[..., 0:1] if e is None else torch.addcmul(e[:, None], pairs[:, :, 0], w[..., 0:1])
        return a_term.addcmul_(pairs[:, :, 1], w[..., 1:2])

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, w = ctx.saved_tensors
        b, t, n, c = x.shape
        pairs = x.view(b, t // 2, 2, n, c)
        gx = gw = ge = None
        if ctx.needs_input_grad[0]:  # (B, T', 2, N, C) in x's layout: a view of it is x's gradient
            gx = (g.unsqueeze(2) * w.movedim(-1, 2).contiguous().unsqueeze(-1)).view(b, t, n, c)
        if ctx.needs_input_grad[1]:
            gw = (g.unsqueeze(2) * pairs).sum(-1).movedim(2, -1)
        if ctx.needs_input_grad[2]:
            ge = g.sum((0, 2))
        return gx, gw, ge


# -- the layer, from its parameters ---------------------------------------------------------------------
def _cube_feature(layer: InTILayer, patches: torch.Tensor) -> torch.Tensor:
    """``phi_cube`` of the paired cube-conv features of the patch volume ``(B, T, H, W, C)``: ``(B, T', HW, C')``."""
    b, t, gh, gw, c = patches.shape
    vol = layer.cube_conv(patches).reshape(b, t, gh * gw, c)  # channels-last: no NCTHW round trip
    return layer.cube_proj(pair_concat(vol, layer.config.odd_frames))


def fused_input(layer: InTILayer, feats: dict[str, torch.Tensor], full: tuple[int, int, int, int],
                p: int) -> torch.Tensor:
    """The head's input. ``feats['cube']`` covers the patch tokens only (prefix tokens: zero)."""
    cube = feats.get("cube")
    bcast = [feats[k] for k in ("frame", "global") if k in feats]  # (B, T', 1, C') / (B, 1, 1, C')
    fusion = layer.config.fusion
    if fusion == "cat":
        parts = [_with_prefix_rows(None, f, p) if k == "cube" else f.expand(full) for k, f in feats.items()]
        return torch.cat(parts, dim=-1)
    if fusion == "add":
        base = _sum([feats["token"], *bcast]) if "token" in feats else (_sum(bcast) if bcast else None)
        return _with_prefix_rows(base, cube, p) if cube is not None else base
    # sep: the token feature intact beside the sum of the others
    others = _sum(bcast) if bcast else None
    if cube is not None:
        others = _with_prefix_rows(others, cube, p)
    if "token" not in feats:
        return others
    tok = feats["token"]
    return tok if others is None else torch.cat([tok, others.expand(full)], dim=-1)


def _predict(layer: InTILayer, feats: dict[str, torch.Tensor], full: tuple[int, int, int, int],
             p: int) -> torch.Tensor:
    """``predictor(fused_input(feats))``. For 'sep' fusion with the token feature and others, the first
    linear layer is applied to each part on its own (``W [t ; o] = W_t t + W_o o``): the frame and
    global features once per frame, the cube feature on the patch rows only, with no
    concatenated (and expanded) input of width ``2C'``."""
    others = [k for k in ("cube", "frame", "global") if k in feats]
    if layer.config.fusion != "sep" or "token" not in feats or not others:
        return layer.predictor(fused_input(layer, feats, full, p))
    first, rest = layer.predictor[0], layer.predictor[1:]
    w_tok, w_other = first.weight.split(layer.hidden_dim, dim=1)
    bcast = [feats[k] for k in ("frame", "global") if k in feats]
    tok = feats["token"]
    z = torch.addmm(first.bias, tok.reshape(-1, tok.shape[-1]), w_tok.t())  # F.linear, as a 2-D base tensor
    others = F.linear(_sum(bcast), w_other) if bcast else None  # (B, T' or 1, 1, C'): broadcast over the tokens
    cube = F.linear(feats["cube"], w_other) if "cube" in feats else None  # the patch rows only
    shape = (*tok.shape[:-1], z.shape[-1])
    return rest(_AddParts.apply(z, others, cube, shape, p).view(shape))


def _tokens_and_weights(layer: InTILayer, x: torch.Tensor, layout: TokenLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` as the node that reads the contexts returns it (to be interpolated: its gradient then
    joins theirs in that node's backward) and the interpolation weights ``(B, T', N, 2)`` (or
    broadcastable over ``N``) of each frame pair."""
    odd = layer.config.odd_frames
    grid = None
    if layer.cube_proj is not None:  # checks the grid (a view of x, unused otherwise)
        grid = patch_volume(x, layout, who="InTI's 'cube' context",
                            hint="Drop 'cube' from contexts for hosts without a spatial grid.").shape
    per_frame = layer.frame_proj is not None or layer.global_ctx is not None
    x, pairs, patches, cls = _ContextInputs.apply(x, layout.num_prefix_tokens, layout.cls_index, odd,
                                                  layer.token_proj is not None, grid is not None, per_frame)
    feats: dict[str, torch.Tensor] = {}
    if layer.token_proj is not None:
        feats["token"] = layer.token_proj(pairs)
    if grid is not None:
        feats["cube"] = _cube_feature(layer, patches.view(grid))
    if per_frame:  # cls: (B, T, C)
        if layer.frame_proj is not None:
            feats["frame"] = layer.frame_proj(pair_concat(cls, odd))[:, :, None]
        if layer.global_ctx is not None:
            feats["global"] = global_context(layer.global_ctx, cls)[:, None, None]

    full = (x.shape[0], (x.shape[1] + 1) // 2, x.shape[2], layer.hidden_dim)
    return x, layer.pair_weights(_predict(layer, feats, full, layout.num_prefix_tokens))


def forward(layer: InTILayer, x: torch.Tensor, layout: TokenLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """``layer``'s output ``(B, T', N, C)`` and weights ``(B, T', N, 2)`` for checked tokens ``x``."""
    bsz, t, n, _ = x.shape
    t2 = (t + 1) // 2
    x, w = _tokens_and_weights(layer, x, layout)
    w = w.to(x.dtype).expand(bsz, t2, n, 2)
    embed = (layer.alpha * layer.time_embed[:t2]).to(x.dtype) if layer.time_embed is not None else None
    return _Interpolate.apply(even_frames(x, layer.config.odd_frames).contiguous(), w, embed), w  # w_a a + w_b b + e
