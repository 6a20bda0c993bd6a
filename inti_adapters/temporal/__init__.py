"""Temporal adapters: extra temporal modules injected with hooks, composable with InTI.

Selected by name in ``inject(..., temporal=[spec, ...])``; each spec is a dict
``{"name": ..., "blocks": [indices] | "all" | {"last": k}, "placement": "attn" | "mlp", **options}``:

- ``local_mhra``: UniFormerV2-style local temporal module (per block).
- ``st_adapter``: ST-Adapter, depth-wise 3-D convolution bottleneck (per block).
- ``temporal_shift``: TSM-style channel shift, no parameters (per block; not the identity at init).
- ``global_mhra``: UniFormerV2-style global module, fused into the video feature before the head.

Every adapter except ``temporal_shift`` starts as the identity. Adapters read the *current*
frame count, which halves after each InTI layer. Presets: :data:`UNIFORMERV2_B` and friends.

Example:
    >>> import timm, torch, inti_adapters as ia
    >>> vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=64)
    >>> model = ia.inject(vit, layers=[4, 6], temporal=[
    ...     {"name": "local_mhra", "blocks": "all"},
    ...     {"name": "global_mhra", "blocks": {"last": 2}}])
    >>> model(torch.randn(1, 3, 8, 64, 64)).shape
    torch.Size([1, 10])
"""

from . import conv as _conv  # noqa: F401  (registers local_mhra, st_adapter)
from . import global_mhra as _global_mhra  # noqa: F401  (registers global_mhra)
from . import shift as _shift  # noqa: F401  (registers temporal_shift)
from ._base import (
    GlobalTemporalAdapter,
    TemporalAdapter,
    TemporalSpec,
    get_temporal_adapter,
    list_temporal_adapters,
    parse_spec,
    register_temporal_adapter,
)
from ._build import attach_temporal_adapters, build_temporal_adapters
from .conv import LocalMHRA, LocalMHRAConfig, STAdapter, STAdapterConfig
from .global_mhra import GlobalMHRA, GlobalMHRAConfig
from .presets import PRESETS, UNIFORMERV2_B, UNIFORMERV2_B_LOCAL, UNIFORMERV2_L
from .shift import TemporalShift, TemporalShiftConfig

__all__ = [
    "PRESETS",
    "UNIFORMERV2_B",
    "UNIFORMERV2_B_LOCAL",
    "UNIFORMERV2_L",
    "GlobalMHRA",
    "GlobalMHRAConfig",
    "GlobalTemporalAdapter",
    "LocalMHRA",
    "LocalMHRAConfig",
    "STAdapter",
    "STAdapterConfig",
    "TemporalAdapter",
    "TemporalShift",
    "TemporalShiftConfig",
    "TemporalSpec",
    "get_temporal_adapter",
    "attach_temporal_adapters",
    "build_temporal_adapters",
    "list_temporal_adapters",
    "parse_spec",
    "register_temporal_adapter",
]
