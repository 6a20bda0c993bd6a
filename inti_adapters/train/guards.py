"""The non-finite guard: a NaN / infinite loss or gradient norm stops the run naming the step.

``train.max_nonfinite_steps`` (default 0) lets a run skip that many steps with a non-finite loss, as
mixed-precision trainers skip overflowing steps: the bad micro-batches back-propagate an exact zero
(``0 * weights``) instead of their loss, so the step applies the other micro-batches' gradients only.
A non-finite gradient norm after a step cannot be undone (the weights moved): it always stops.
The stop raises :class:`NonFiniteLossError` before anything is saved: the last complete checkpoint
stays the latest and nothing is exported.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import torch

from .distributed import all_reduce_max
from .failures import NonFiniteLossError

logger = logging.getLogger(__name__)


class NonFiniteGuard:
    """Counts steps with a non-finite loss; ``latest()`` names the checkpoint that stays the latest."""

    def __init__(self, max_steps: int, *, rank: int, latest: Callable[[], str | None]) -> None:
        self.max_steps, self.rank, self.latest = max_steps, rank, latest
        self.bad_steps = 0
        self._in_bad_step = False

    def step_done(self) -> None:
        self._in_bad_step = False

    def message(self, step: int, epoch: int, what: str) -> str:
        latest = self.latest()
        kept = f"the latest complete checkpoint stays {latest}" if latest else "no checkpoint was written"
        return (f"step {step} (epoch {epoch + 1}): {what}; training stopped (train.max_nonfinite_steps="
                f"{self.max_steps}), {kept}, nothing was exported. Lower optim.lr, check the data, or raise "
                f"train.max_nonfinite_steps")

    def loss(self, loss: torch.Tensor, module: Any, *, step: int, epoch: int) -> torch.Tensor:
        """Collective: the loss to back-propagate (``loss``, or the zero of a skipped micro-batch)."""
        bad_here = not bool(torch.isfinite(loss.detach()))
        if not all_reduce_max([int(bad_here)])[0]:
            return loss
        if not self._in_bad_step:
            self.bad_steps += 1
            self._in_bad_step = True
        if self.bad_steps > self.max_steps:
            who = f"{float(loss.detach())} on rank {self.rank}" if bad_here else "non-finite on another rank"
            raise NonFiniteLossError(self.message(step, epoch, f"the loss is {who}"))
        if self.rank == 0:
            logger.warning("step %d (epoch %d): non-finite loss, the micro-batch is skipped (%d of "
                           "train.max_nonfinite_steps=%d)", step, epoch + 1, self.bad_steps, self.max_steps)
        return sum((p * 0.0).sum() for p in module.parameters() if p.requires_grad)

    def grad_norm(self, engine: Any, *, step: int, epoch: int) -> None:
        """After a step: a non-finite gradient norm (when DeepSpeed computed one) stops the run."""
        norm = engine.get_global_grad_norm() if hasattr(engine, "get_global_grad_norm") else None
        norm = float(norm) if norm is not None else 0.0
        if not math.isfinite(norm):
            raise NonFiniteLossError(self.message(step, epoch, f"the gradient norm is {norm}"))
