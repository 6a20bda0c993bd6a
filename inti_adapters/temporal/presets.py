"""Named configurations of temporal adapters, usable as ``inject(vit, temporal=PRESET)``.

UniFormerV2's released Kinetics-400 models (``no_lmhra=True``) use *only* its global module:
``return_list`` = the last 4 blocks, ``n_layers=4`` decoder layers of width ``n_dim = C`` with
``n_head = 12`` (B/16) or 16 (L/14), ``mlp_factor=4.0``, decoder MLP dropout 0.5, and the dynamic
position embedding. That is what the 115 M (B/16) and 354 M (L/14) of UniFormerV2's K400
tables count (here 114.6 M and 354.1 M; 296 and 1331 GFLOPs at 16x224², the paper's 297 and 1332),
and the InTI paper's "temporal modules of [18]" on ViT-B: 115 M, 126 M with two InTI layers (its
Table 2; here 125.3 M and 183 GFLOPs with ``layers=[4, 6]``):

    >>> import timm, torch, inti_adapters as ia
    >>> from inti_adapters.temporal import UNIFORMERV2_B
    >>> with torch.device("meta"):
    ...     vit = timm.create_model("vit_base_patch16_clip_224", pretrained=False, num_classes=400)
    >>> model = ia.inject(vit, layers=[4, 6], temporal=UNIFORMERV2_B)
    >>> round(sum(p.numel() for p in model.parameters()) / 1e6)
    125

UniFormerV2's full design also has a local temporal module (local MHRA) in every block, before
the attention and before the MLP (``double_lmhra``), hidden width ``C // 1.5``: that is
:data:`UNIFORMERV2_B_LOCAL` (+19.0 M parameters on ViT-B/16, 133.5 M in all). The local modules
here use LayerNorm where UniFormerV2 uses BatchNorm (pass ``norm="batch"`` for that).
"""

from __future__ import annotations

from typing import Any

_GLOBAL = {"name": "global_mhra", "blocks": {"last": 4}, "mlp_ratio": 4.0, "mlp_dropout": 0.5, "dpe": True}

#: UniFormerV2-B/16 as trained on Kinetics-400: global MHRA on the last 4 blocks (115 M with ViT-B/16).
UNIFORMERV2_B: tuple[dict[str, Any], ...] = ({**_GLOBAL, "num_heads": 12},)

#: UniFormerV2-L/14 as trained on Kinetics-400 (354 M with ViT-L/14).
UNIFORMERV2_L: tuple[dict[str, Any], ...] = ({**_GLOBAL, "num_heads": 16},)

#: UniFormerV2-B/16 with local MHRA before attention and before the MLP of every block.
UNIFORMERV2_B_LOCAL: tuple[dict[str, Any], ...] = (
    {"name": "local_mhra", "blocks": "all", "placement": "attn", "reduction": 1.5, "kernel_size": 3},
    {"name": "local_mhra", "blocks": "all", "placement": "mlp", "reduction": 1.5, "kernel_size": 3},
    {**_GLOBAL, "num_heads": 12},
)

PRESETS: dict[str, tuple[dict[str, Any], ...]] = {
    "uniformerv2_b": UNIFORMERV2_B,
    "uniformerv2_l": UNIFORMERV2_L,
    "uniformerv2_b_local": UNIFORMERV2_B_LOCAL,
}
