"""FLOP counting in the paper's convention: one multiply-add = one FLOP (fvcore's).

Counts matrix multiplies, convolutions and attention through ``torch.utils.flop_counter``,
including fused ``scaled_dot_product_attention`` on CPU, which torch's counter (and fvcore)
miss: without it a ViT-B/16 total is ~4% low. Element-wise ops, norms and softmax are not
counted (under 0.2% of a ViT), nor the InTI global context's tiny depth-wise temporal
convolutions, which run as element-wise window sums (1e-5 of an InTI layer on ViT-B/16). Works
on any ``nn.Module``, also on the ``meta`` device, so large configurations can be counted
without allocating their weights.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

aten = torch.ops.aten


def _sdpa_flops(query_shape, key_shape, value_shape, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    # q @ k^T and attn @ v, each 2 * b * h * s_q * s_k * d FLOPs in torch's (2 per MAC) convention
    b, h, s_q, d = query_shape
    s_k = key_shape[-2]
    d_v = value_shape[-1]
    return 2 * b * h * s_q * s_k * d + 2 * b * h * s_q * s_k * d_v


def _custom_mapping() -> dict[Any, Any]:
    mapping: dict[Any, Any] = {}
    for name in ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_fused_attention_overrideable"):
        op = getattr(aten, name, None)
        if op is not None:
            mapping[op] = _sdpa_flops
    return mapping


class FlopCounter(FlopCounterMode):
    """``FlopCounterMode`` that also counts CPU-fused attention.

    ``gflops`` gives the total in the paper's convention (billions of multiply-adds), the unit of
    :func:`count_gflops`; torch's own ``get_total_flops()`` counts 2 FLOPs per multiply-add.
    """

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("display", False)
        mapping = _custom_mapping()
        mapping.update(kwargs.pop("custom_mapping", None) or {})
        super().__init__(custom_mapping=mapping, **kwargs)

    @property
    def gflops(self) -> float:
        """Total so far, paper convention (billions of multiply-adds)."""
        return self.get_total_flops() / 2 / 1e9

    def gflops_by_module(self) -> dict[str, float]:
        """Per module path, paper convention."""
        return {k: sum(v.values()) / 2 / 1e9 for k, v in self.get_flop_counts().items()}


def _on_meta(t: torch.Tensor) -> torch.Tensor:
    """A meta tensor of ``t``'s shape and dtype (the full shape of a ZeRO-3 partitioned parameter)."""
    return torch.empty(tuple(getattr(t, "ds_shape", t.shape)), dtype=t.dtype, device="meta")


def count_gflops(model: nn.Module, inputs: torch.Tensor | tuple[Any, ...], *, meta: bool = False,
                 **kwargs: Any) -> float:
    """GFLOPs of one forward pass, paper convention (multiply-adds, in billions).

    Args:
        model: An ``InTIModel`` (give a video ``(B, 3, T, H, W)``) or any module, e.g. a plain timm
            ViT (give an image batch ``(B, 3, H, W)``).
        inputs: The input tensor, or a tuple of positional inputs.
        meta: Count on the meta device: every parameter, buffer and input tensor is replaced by a
            meta tensor of the same shape for the call (``torch.func.functional_call``), so nothing
            is computed or copied and a model of any size is counted in about a second.
        **kwargs: Keyword arguments for ``model``.

    Returns:
        Billions of multiply-adds for the whole batch (divide by ``B`` for per-clip figures).

    Example:
        >>> import timm, torch, inti_adapters as ia
        >>> with torch.device("meta"):
        ...     vit = timm.create_model("vit_base_patch16_clip_224", pretrained=False)
        ...     video = torch.empty(1, 3, 16, 224, 224)
        >>> round(ia.count_gflops(ia.inject(vit, layers=[]), video))
        281
    """
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    counter = FlopCounter()
    if not meta:
        with torch.no_grad(), counter:
            model(*args, **kwargs)
        return counter.gflops
    state = {n: _on_meta(t) for n, t in [*model.named_parameters(), *model.named_buffers()]}
    args = tuple(_on_meta(a) if isinstance(a, torch.Tensor) else a for a in args)
    with torch.no_grad(), counter:
        torch.func.functional_call(model, state, args, kwargs)
    return counter.gflops
