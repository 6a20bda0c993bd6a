"""peft facts the core needs, without depending on peft: is a model a ``PeftModel``, what is
inside it, which parameters did its tuners add. peft is optional; everything works without it.

peft is never imported here: a model can only hold peft objects if peft was imported already,
so the checks read ``sys.modules`` (importing peft costs seconds per process).
"""

from __future__ import annotations

import sys
from typing import Any

from torch import nn

__all__ = ["is_peft_model", "peft_adapter_parameters", "unwrap_peft"]


def _peft_class(module: str, name: str) -> Any:
    """``peft.<module>.<name>`` if peft is already imported, else None."""
    if "peft" not in sys.modules:
        return None
    return getattr(sys.modules.get(module), name, None)


def is_peft_model(model: nn.Module) -> bool:
    cls = _peft_class("peft.peft_model", "PeftModel")
    return cls is not None and isinstance(model, cls)


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The user's model inside a ``PeftModel`` (``model.get_base_model()``), else ``model``."""
    return model.get_base_model() if is_peft_model(model) else model


def peft_adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters that peft tuner layers added (LoRA A/B, DoRA magnitudes, ...)."""
    tuner_layer = _peft_class("peft.tuners.tuners_utils", "BaseTunerLayer")
    if tuner_layer is None:
        return []
    out: dict[int, nn.Parameter] = {}
    for module in model.modules():
        if isinstance(module, tuner_layer):
            for name in module.adapter_layer_names:
                sub = getattr(module, name, None)
                if isinstance(sub, nn.Module):  # ModuleDict / ParameterDict of the adapters
                    out.update({id(p): p for p in sub.parameters()})
    return list(out.values())
