"""The per-forward video context that hooks read.

The wrapper (``InTIModel``) knows the batch size and frame count of the video; the hooks on
the backbone's blocks only see flattened ``(B*T, N, C)`` tokens. The wrapper sets a
:class:`VideoContext` for the duration of its forward and clears it afterwards. Hooks derive
the *current* frame count from the tensor they receive (``leading_dim // batch_size``), so they
hold no state that changes during the forward and are safe to run twice (activation
checkpointing recomputes blocks during backward, after the context was cleared: the last
context is kept for exactly that case).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import BareBackboneCallError


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


@dataclass(frozen=True)
class VideoContext:
    """What hooks need to know about the video being processed."""

    batch_size: int
    num_frames: int
    tokens: TokenLayout

    def frames_of(self, leading_dim: int) -> int:
        """Current frame count from the leading dimension ``B*T`` of a token tensor."""
        t, rem = divmod(leading_dim, self.batch_size)
        if rem or t < 1:
            raise RuntimeError(
                f"token tensor with leading dimension {leading_dim} does not hold whole videos of "
                f"batch size {self.batch_size}; was the backbone called with a different batch?"
            )
        return t


def in_backward() -> bool:
    """True while autograd runs a backward pass (where checkpointing recomputes blocks)."""
    return torch._C._current_graph_task_id() != -1


class ContextHolder:
    """Shared, mutable slot for the current context; one per ``InTIModel``."""

    def __init__(self) -> None:
        self.current: VideoContext | None = None
        self.last: VideoContext | None = None  # for recomputation during backward
        self.disabled: bool = False

    def enter(self, ctx: VideoContext) -> None:
        if self.current is not None:
            raise RuntimeError("InTIModel.forward is not re-entrant: a forward is already running")
        self.current = ctx
        if torch.is_grad_enabled():
            self.last = ctx

    def exit(self) -> None:
        self.current = None

    def require(self) -> VideoContext:
        ctx = self.current
        if ctx is not None:
            return ctx
        if self.last is not None and in_backward():
            return self.last
        raise BareBackboneCallError(
            "this backbone has inti_adapters hooks installed and was called directly with a batch "
            "of frames; the hooks need the video layout (batch size, frame count) that only the "
            "video model provides. Call the InTIModel with a (B, 3, T, H, W) video, wrap image "
            "inference in `with model.disable_adapters():`, or call `model.unload()` first."
        )
