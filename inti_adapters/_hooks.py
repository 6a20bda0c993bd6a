"""Hook helpers shared by compressors and temporal adapters."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn


class _ForwardThen:
    """Instance-level ``forward`` of a block's attention-branch end: its own forward, then ``fns``.

    Not a forward hook on purpose: ``torch.compile`` does not guard on the hooks of submodules
    (``torch._dynamo.config.skip_nnmodule_hook_guards``), so a block compiled without the hook
    would be silently reused for a block that has one. It does guard on this attribute.
    """

    def __init__(self, module: nn.Module) -> None:
        self.previous = module.__dict__.get("forward")  # an earlier instance override, if any
        self.forward = module.forward
        self.fns: list[Callable[[torch.Tensor], torch.Tensor]] = []

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.forward(*args, **kwargs)
        for fn in self.fns:
            out = fn(out)
        return out


class _ForwardThenHandle:
    """Removes one function from a :class:`_ForwardThen`; the last one restores the module."""

    def __init__(self, module: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.module, self.fn = module, fn

    def remove(self) -> None:
        over = self.module.__dict__.get("forward")
        if not isinstance(over, _ForwardThen) or self.fn not in over.fns:
            return
        over.fns.remove(self.fn)
        if not over.fns:
            if over.previous is None:
                del self.module.forward
            else:
                self.module.forward = over.previous


def after_forward(module: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]) -> _ForwardThenHandle:
    """Run ``fn`` on ``module``'s output, like a forward hook that torch.compile cannot skip.

    Returns a handle whose ``remove()`` undoes it (the last removal restores the module exactly).
    """
    over = module.__dict__.get("forward")
    if not isinstance(over, _ForwardThen):
        over = _ForwardThen(module)
        module.forward = over
    over.fns.append(fn)
    return _ForwardThenHandle(module, fn)
