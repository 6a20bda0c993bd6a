"""peft facts the core needs, without depending on peft: is a model a ``PeftModel``, what is
inside it, which parameters did its tuners add. peft is optional; everything works without it."""

from __future__ import annotations

from torch import nn

__all__ = ["is_peft_model", "peft_adapter_parameters", "unwrap_peft"]


def is_peft_model(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is optional
        return False
    return isinstance(model, PeftModel)


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The user's model inside a ``PeftModel`` (``model.get_base_model()``), else ``model``."""
    return model.get_base_model() if is_peft_model(model) else model


def peft_adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters that peft tuner layers added (LoRA A/B, DoRA magnitudes, ...)."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # pragma: no cover
        return []
    out: dict[int, nn.Parameter] = {}
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            for name in module.adapter_layer_names:
                sub = getattr(module, name, None)
                if isinstance(sub, nn.Module):  # ModuleDict / ParameterDict of the adapters
                    out.update({id(p): p for p in sub.parameters()})
    return list(out.values())
