"""Token-layout helpers shared by every compressor and temporal adapter (pure tensor code).

Tokens of a clip are ``(B, T, N, C)`` with ``N = P + H*W``: ``P`` prefix tokens (class,
distillation, register tokens) then the patch grid row by row. This module holds the few
operations that several layers need, each written once:

- :class:`TokenLayout`: prefix-token count, class-token index and patch grid of a frame;
- :func:`pair_frames` / :func:`pair_concat` / :func:`even_frames`: the frame pairs (1,2), (3,4), ...
  with the one odd-frame policy;
- :func:`patch_volume`: the patch tokens as a channels-last volume ``(B, T, H, W, C)`` with one
  grid check (and one set of error messages) for all layers;
- :func:`frame_schedule`: the frames each block sees, from the compressors' ``output_frames``.

Example:
    >>> import torch
    >>> layout = TokenLayout(num_prefix_tokens=1, cls_index=0, grid=(2, 3))
    >>> x = torch.randn(2, 5, 1 + 6, 8)
    >>> a, b = pair_frames(x)                      # odd T: the last frame is paired with itself
    >>> a.shape[1], torch.equal(b[:, -1], x[:, -1])
    (3, True)
    >>> patch_volume(x, layout, who="example").shape
    torch.Size([2, 5, 2, 3, 8])
    >>> frame_schedule(16, 12, {4: lambda t: (t + 1) // 2, 6: lambda t: (t + 1) // 2})
    [16, 16, 16, 16, 16, 8, 8, 4, 4, 4, 4, 4]
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

__all__ = ["ODD_FRAME_POLICIES", "TokenLayout", "even_frames", "frame_schedule", "pair_concat", "pair_frames",
           "patch_volume"]

ODD_FRAME_POLICIES = ("repeat_last", "error")


@dataclass(frozen=True)
class TokenLayout:
    """How the tokens of one frame are laid out: ``N = num_prefix_tokens + H*W``."""

    num_prefix_tokens: int
    cls_index: int | None  # index of the class token among the prefix tokens, None if absent
    grid: tuple[int, int] | None  # (H, W) of the patch grid, None if unknown

    def grid_for(self, num_tokens: int) -> tuple[int, int] | None:
        """The patch grid if ``num_tokens`` matches it, else None (tokens were merged/dropped)."""
        if self.grid is None:
            return None
        h, w = self.grid
        return self.grid if num_tokens == self.num_prefix_tokens + h * w else None


def _check_odd(num_frames: int, odd_frames: str) -> None:
    """The one odd-frame policy check: ``'repeat_last'`` pairs the last frame with itself, ``'error'`` refuses."""
    if num_frames % 2 and odd_frames != "repeat_last":
        if odd_frames == "error":
            raise ValueError(f"odd_frames='error' but the clip has an odd number of frames ({num_frames})")
        raise ValueError(f"odd_frames must be one of {list(ODD_FRAME_POLICIES)}, got {odd_frames!r}")


def pair_frames(x: torch.Tensor, odd_frames: str = "repeat_last") -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``(B, T, ...)`` into the first and the second frame of each pair, ``(B, ceil(T/2), ...)``.

    Args:
        x: A clip with frames on dimension 1.
        odd_frames: With odd ``T``, ``'repeat_last'`` pairs the last frame with itself (so any
            convex combination passes it unchanged); ``'error'`` refuses.
    """
    t = x.shape[1]
    _check_odd(t, odd_frames)
    a, b = x[:, 0::2], x[:, 1::2]
    if t % 2:
        b = torch.cat([b, x[:, -1:]], dim=1)
    return a, b


def even_frames(x: torch.Tensor, odd_frames: str = "repeat_last") -> torch.Tensor:
    """``x`` with the last frame repeated when ``T`` is odd, so frames pair up as ``(2i, 2i+1)``."""
    t = x.shape[1]
    _check_odd(t, odd_frames)
    return x if t % 2 == 0 else torch.cat([x, x[:, -1:]], dim=1)


def pair_concat(x: torch.Tensor, odd_frames: str = "repeat_last") -> torch.Tensor:
    """``[a ; b]`` of each frame pair on the last dim: ``(B, T, ..., C) -> (B, ceil(T/2), ..., 2C)``.

    Equals ``torch.cat(pair_frames(x), -1)`` in one copy, whose backward is a view (no zero-filled
    gradients of ``x[:, 0::2]`` and ``x[:, 1::2]`` to add up).
    """
    if torch.compiler.is_compiling():
        # the split of T into (T', 2) below becomes (T', T // T') in the graph of a clip length that
        # torch.compile keeps symbolic, whose strides inductor cannot order (TypeError in argsort)
        return torch.cat(pair_frames(x, odd_frames), dim=-1)
    x = even_frames(x, odd_frames)
    pairs = x.reshape(x.shape[0], x.shape[1] // 2, 2, *x.shape[2:])  # (B, T', 2, ..., C)
    return pairs.movedim(2, -2).flatten(-2)


def patch_volume(x: torch.Tensor, layout: TokenLayout, *, who: str, spatial: bool = True,
                 hint: str = "") -> torch.Tensor:
    """The patch tokens of ``x`` (``(B, T, N, C)``) as a channels-last volume ``(B, T, H, W, C)``.

    A view when ``x`` is contiguous (no copy). Without ``spatial`` (a layer that mixes only
    along time) a host without a patch grid is fine: the patches form an ``(N - P) x 1`` column.

    Args:
        x: Tokens of a clip, prefix tokens first.
        layout: The frame layout of the input video.
        who: The layer asking, for error messages.
        spatial: The caller mixes spatial neighbours and needs the real grid.
        hint: What the user can do instead, appended to the "no grid" error.

    Raises:
        ValueError: If the tokens no longer line up with the grid (merged or dropped before this
            layer), or if ``spatial`` and the host has no grid.
    """
    b, t, n, c = x.shape
    p = layout.num_prefix_tokens
    grid = layout.grid_for(n)
    if grid is None and layout.grid is not None:
        h, w = layout.grid
        raise ValueError(
            f"{who}: this layer gets {n} tokens per frame, not the {p} prefix + {h}x{w} patch tokens of the "
            "input (tokens were merged or dropped before this block); it needs the tokens of every frame at their "
            "grid positions. Place it before the token-reducing layer."
        )
    if grid is None and spatial:
        raise ValueError(
            f"{who} mixes spatial neighbours and needs the patch grid, but this host's tokens carry no grid "
            f"(TokenLayout.grid is None; the host's grid_size() returns None).{' ' + hint if hint else ''}"
        )
    h, w = grid if grid is not None else (n - p, 1)
    return x[:, :, p:].unflatten(2, (h, w))


def frame_schedule(num_frames: int, depth: int, compressors: Mapping[int, Callable[[int], int]]) -> list[int]:
    """Frames each of ``depth`` blocks sees for a clip of ``num_frames`` frames.

    Args:
        num_frames: Frames of the input clip (>= 1).
        depth: Number of blocks.
        compressors: Block index -> the ``output_frames`` function of the compressor on its output.
    """
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
        raise ValueError(f"num_frames must be a positive int, got {num_frames!r}")
    out, t = [], num_frames
    for i in range(depth):
        out.append(t)
        if i in compressors:
            t = compressors[i](t)
    return out
