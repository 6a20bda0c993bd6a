"""The per-forward video context that the surgery layer hands to extensions.

The video model knows the batch size and frame count of the video; the backbone's blocks only
see flattened ``(B*T, N, C)`` tokens. The model sets a :class:`VideoContext` for the duration of
its forward (:meth:`ContextHolder.forward`) and clears it afterwards. The current frame count is
derived from the tensor a block receives (``leading_dim // batch_size``), so nothing that changes
during the forward is held, and every site is safe to run twice: activation checkpointing
recomputes blocks during backward, after the context was cleared, so the last context of a
training forward is kept for exactly that case.

Per-forward stores (:meth:`ContextHolder.store`) are the one place where extensions keep state
between sites (token sizes of token merging, block outputs a global module collects): they are
emptied when the next forward starts, never during a recompute.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from .errors import BareBackboneCallError
from .tokens import TokenLayout

__all__ = ["ContextHolder", "TokenLayout", "VideoContext", "in_backward", "recomputing"]


@dataclass(frozen=True)
class VideoContext:
    """What the sites need to know about the video being processed."""

    batch_size: int
    num_frames: int
    tokens: TokenLayout
    grad_forward: bool = False  # the forward was started with autograd enabled

    def frames_of(self, leading_dim: int) -> int:
        """Current frame count from the leading dimension ``B*T`` of a token tensor."""
        t, rem = leading_dim // self.batch_size, leading_dim % self.batch_size  # SymInt-safe (torch.export)
        if rem or t < 1:
            raise RuntimeError(
                f"token tensor with leading dimension {leading_dim} does not hold whole videos of "
                f"batch size {self.batch_size}; was the backbone called with a different batch?"
            )
        return t


def in_backward() -> bool:
    """True while autograd runs a backward pass (where checkpointing recomputes blocks)."""
    return torch._C._current_graph_task_id() != -1


def recomputing() -> bool:
    """True while activation checkpointing re-runs a block during backward (never in a compiled graph)."""
    return not torch.compiler.is_compiling() and in_backward()


class ContextHolder:
    """The current video context, the disabled flag and the per-forward stores of one model."""

    def __init__(self) -> None:
        self.current: VideoContext | None = None
        self.last: VideoContext | None = None  # of the last training forward, for recomputation in backward
        self.latest: VideoContext | None = None  # of the last forward (the head runs after the blocks' context)
        self.disabled: bool = False
        self._stores: dict[str, dict[Any, Any]] = {}

    @contextlib.contextmanager
    def forward(self, ctx: VideoContext) -> Iterator[None]:
        """Make ``ctx`` current for one forward; the stores start empty."""
        if self.current is not None:
            raise RuntimeError("InTIModel.forward is not re-entrant: a forward is already running")
        for store in self._stores.values():
            store.clear()
        self.current = self.latest = ctx
        if ctx.grad_forward:
            self.last = ctx
        try:
            yield
        finally:
            self.current = None

    @contextlib.contextmanager
    def disable(self) -> Iterator[None]:
        """Inside, every site passes its input through unchanged."""
        prev, self.disabled = self.disabled, True
        try:
            yield
        finally:
            self.disabled = prev

    def store(self, namespace: str) -> dict[Any, Any]:
        """The per-forward store of ``namespace`` (shared by every extension that names it)."""
        return self._stores.setdefault(namespace, {})

    def require(self) -> VideoContext:
        """The context of the running forward (or of the forward being differentiated)."""
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
