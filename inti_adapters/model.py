"""``InTIModel``: the video model that owns the hooks, the per-forward context, save/load/unload.

``inject(backbone, layers=[4, 6])`` leaves the backbone's own modules and state dict untouched:
the compressors live in the wrapper and run from forward hooks on ``backbone.blocks[i]``.
``unload()`` removes every hook and returns the backbone exactly as it was.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from .compressors import build_compressor, make_compressor_config
from .config import InjectConfig
from .context import ContextHolder, TokenLayout, VideoContext
from .hosts import Host, resolve_host
from .lora import is_peft_model, peft_adapter_parameters, unwrap_peft

logger = logging.getLogger(__name__)

_MARK = "_inti_adapters_injected"


class InTIModel(nn.Module):
    """A video model around an image backbone. Build it with :func:`inject`.

    ``forward(video)`` takes ``(B, 3, T, H, W)`` float frames (or ``(B, T, 3, H, W)`` with
    ``input_layout='NTCHW'``), runs the backbone on the frames with compressors after the
    configured blocks, averages the per-frame features of the frames that remain and applies
    the backbone's head (or ``head`` given to ``inject``).
    """

    def __init__(self, backbone: nn.Module, config: InjectConfig, host: Host, head: nn.Module | None = None):
        super().__init__()
        depth = len(host.blocks)
        config.check_depth(depth)
        if config.layers and host.patch_dropout_active():
            raise ValueError(
                "the backbone uses patch dropout (timm: patch_drop_rate > 0; OpenCLIP: patch_dropout > 0): it "
                "drops different patches in every frame, which breaks the pairing of tokens at the same "
                "position. Create the backbone without patch dropout."
            )
        self.backbone = backbone
        self.config = config
        self.head = head
        self._host = host
        self._holder = ContextHolder()
        # validate the compressor options even when no layer uses them (layers=[])
        config.compressor_config = make_compressor_config(config.compressor, config.compressor_config).to_dict()
        self.compressors = nn.ModuleDict(
            {str(i): build_compressor(config.compressor, host.embed_dim, config.compressor_config)
             for i in config.layers}
        )
        ref = next(backbone.parameters(), None)
        if ref is not None:  # match the backbone: device (cuda, meta, ...) and floating dtype
            self.compressors.to(device=ref.device, dtype=ref.dtype if ref.is_floating_point() else None)
        self._handles: list[Any] = []
        # temporal adapters first: on a compressed block the adapter sees the frames before compression
        self.temporal = nn.ModuleDict()
        self._feature_fuser = None
        try:
            if config.temporal:
                from .temporal import install_temporal_adapters

                installed = install_temporal_adapters(self, config.temporal)
                self.temporal, self._feature_fuser = installed.modules, installed.fuse
                self._handles += installed.handles
            for i in config.layers:
                self._handles.append(host.blocks[i].register_forward_hook(self._compress_hook(str(i))))
                self._handles += self.compressors[str(i)].attach(self, i)
        except BaseException:  # a refused option must not leave hooks behind on the user's backbone
            for h in self._handles:
                h.remove()
            raise
        self._requires_grad = {n: p.requires_grad for n, p in backbone.named_parameters()}
        freeze = config.freeze_backbone if config.freeze_backbone is not None else is_peft_model(backbone)
        if freeze:
            peft_ids = {id(p) for p in peft_adapter_parameters(backbone)}
            head_ids = {id(p) for p in host.head_parameters()}
            for p in backbone.parameters():
                # peft's own adapters keep the flag peft gave them (inactive adapters stay frozen)
                p.requires_grad_(p.requires_grad if id(p) in peft_ids else config.train_head and id(p) in head_ids)
        self._unloaded = False
        object.__setattr__(host.blocks, _MARK, True)

    # -- hooks ----------------------------------------------------------------------------------
    def _compress_hook(self, key: str):
        compressors, holder, host = self.compressors, self._holder, self._host

        def hook(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor | None:
            if holder.disabled:
                return None
            ctx = holder.require()
            x = host.to_bnc(output)
            bt, n, c = x.shape
            t = ctx.frames_of(bt)
            y = compressors[key](x.reshape(ctx.batch_size, t, n, c), ctx.tokens)
            return host.from_bnc(y.flatten(0, 1))

        return hook

    @property
    def adapters_disabled(self) -> bool:
        """True inside ``disable_adapters()``: hooks must pass their input through unchanged."""
        return self._holder.disabled

    @property
    def context(self) -> ContextHolder:
        """The per-forward context slot the hooks read (for compressors and adapters)."""
        return self._holder

    @contextlib.contextmanager
    def disable_adapters(self) -> Iterator[None]:
        """Run without compressors: the backbone may then be called directly on images."""
        prev = self._holder.disabled
        self._holder.disabled = True
        try:
            yield
        finally:
            self._holder.disabled = prev

    # -- input ----------------------------------------------------------------------------------
    def _frames(self, video: Any, layout: str | None) -> tuple[torch.Tensor, int, int]:
        """Validate ``video`` and return ``(B*T, C, H, W)`` frames, ``B`` and ``T``."""
        layout = layout or self.config.input_layout
        if layout not in ("NCTHW", "NTCHW"):
            raise ValueError(f"layout must be 'NCTHW' or 'NTCHW', got {layout!r}")
        expected = "(B, 3, T, H, W)" if layout == "NCTHW" else "(B, T, 3, H, W)"
        if not isinstance(video, torch.Tensor):
            raise TypeError(f"expected a video tensor of shape {expected}, got {type(video).__name__}")
        if video.dim() != 5:
            hint = " For a single image use video.unsqueeze(2) (one frame)." if video.dim() == 4 else ""
            raise ValueError(
                f"expected a 5-D video of shape {expected} (layout {layout}), got a {video.dim()}-D tensor "
                f"of shape {tuple(video.shape)}.{hint}"
            )
        if not video.is_floating_point():
            raise TypeError(
                f"expected a float video (normalised frames), got dtype {video.dtype}. Convert uint8 clips "
                "on the device with inti_adapters.normalize_video(video, 'clip') (or your own mean/std)."
            )
        b = video.shape[0]
        c, t = (video.shape[1], video.shape[2]) if layout == "NCTHW" else (video.shape[2], video.shape[1])
        h, w = video.shape[3], video.shape[4]
        if c != self._host.in_chans:
            other = "NTCHW" if layout == "NCTHW" else "NCTHW"
            raise ValueError(
                f"expected {self._host.in_chans} channels in a {expected} video (layout {layout}), got shape "
                f"{tuple(video.shape)} with {c} channels; is the video {other}? Pass input_layout='{other}'."
            )
        if b == 0:
            raise ValueError(f"got an empty batch: video of shape {tuple(video.shape)}")
        if t == 0:
            raise ValueError(f"got a video with 0 frames: shape {tuple(video.shape)}")
        self._host.check_image_size(h, w)
        frames = video.transpose(1, 2) if layout == "NCTHW" else video
        return frames.reshape(b * t, c, h, w), b, t

    def _check_alive(self) -> None:
        if self._unloaded:
            raise RuntimeError("this InTIModel was unloaded; inject the backbone again to use it as a video model")

    # -- forward --------------------------------------------------------------------------------
    def forward_features(self, video: torch.Tensor, *, layout: str | None = None) -> torch.Tensor:
        """Tokens after the backbone's final norm, ``(B, T', N, C)`` for the ``T'`` remaining frames."""
        self._check_alive()
        frames, b, t = self._frames(video, layout)
        host = self._host
        ctx = VideoContext(
            batch_size=b,
            num_frames=t,
            tokens=TokenLayout(host.num_prefix_tokens, host.cls_index, host.grid_size(*frames.shape[-2:])),
        )
        self._holder.enter(ctx)
        try:
            tokens = host.forward_features(frames)
        finally:
            self._holder.exit()
        return tokens.unflatten(0, (b, -1))

    def forward_head(self, tokens: torch.Tensor, *, pre_logits: bool = False) -> torch.Tensor:
        """Pool each remaining frame, average over frames, apply the head: ``(B, T', N, C) -> (B, K)``."""
        b, t = tokens.shape[:2]
        feats = self._host.pool(tokens.flatten(0, 1)).unflatten(0, (b, t)).mean(dim=1)
        if self._feature_fuser is not None:  # e.g. a UniFormerV2-style global temporal module
            feats = self._feature_fuser(feats)
        if pre_logits:
            return feats
        return self.head(feats) if self.head is not None else self._host.head(feats)

    def forward(self, video: torch.Tensor, *, layout: str | None = None) -> torch.Tensor:
        return self.forward_head(self.forward_features(video, layout=layout))

    # -- introspection --------------------------------------------------------------------------
    @property
    def host(self) -> Host:
        return self._host

    @property
    def layers(self) -> tuple[int, ...]:
        return self.config.layers

    def frame_schedule(self, num_frames: int) -> list[int]:
        """Frames each block sees for a clip of ``num_frames`` (e.g. 16 -> [16]*5 + [8]*2 + [4]*5)."""
        out, t = [], num_frames
        for i in range(len(self._host.blocks)):
            out.append(t)
            if str(i) in self.compressors:
                t = self.compressors[str(i)].output_frames(t)
        return out

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing of the backbone's blocks (hooks are safe to recompute)."""
        self._host.set_grad_checkpointing(enable)

    def head_parameter_names(self) -> list[str]:
        """Names (in this model's state dict) of the classifier head's parameters."""
        if self.head is not None:
            return [f"head.{n}" for n, _ in self.head.named_parameters()]
        ids = {id(p) for p in self._host.head_parameters()}
        return [n for n, p in self.named_parameters() if id(p) in ids]

    def _param_groups(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """Parameters by role: compressors, temporal adapters, peft adapters, head, backbone."""
        heads = set(self.head_parameter_names())
        peft_ids = {id(p) for p in peft_adapter_parameters(self)}
        groups: dict[str, list[tuple[str, nn.Parameter]]] = {
            "compressors": [], "temporal": [], "peft": [], "head": [], "backbone": []
        }
        for n, p in self.named_parameters():
            if n.startswith("compressors."):
                groups["compressors"].append((n, p))
            elif n.startswith("temporal."):
                groups["temporal"].append((n, p))
            elif id(p) in peft_ids:
                groups["peft"].append((n, p))
            elif n in heads:
                groups["head"].append((n, p))
            else:
                groups["backbone"].append((n, p))
        return groups

    def mark_added_modules_trainable(self, *, train_head: bool = True) -> None:
        """Make the InTI layers and temporal adapters (and the head) trainable, e.g. after peft
        froze them (see :func:`inti_adapters.add_lora`)."""
        for p in list(self.compressors.parameters()) + list(self.temporal.parameters()):
            p.requires_grad_(True)
        if train_head:
            heads = set(self.head_parameter_names())
            for n, p in self.named_parameters():
                if n in heads:
                    p.requires_grad_(True)

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """``(trainable, total)`` parameter counts, as in peft."""
        params = list(self.parameters())
        return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        parts = ", ".join(
            f"{name}: {sum(p.numel() for _, p in ps if p.requires_grad):,}/{sum(p.numel() for _, p in ps):,}"
            for name, ps in self._param_groups().items() if ps or name in ("compressors", "head", "backbone")
        )
        print(
            f"trainable params: {trainable:,} || all params: {total:,} || "
            f"trainable%: {100 * trainable / max(total, 1):.4f} ({parts})"
        )

    # -- save / load / unload -------------------------------------------------------------------
    def adapter_state_dict(self, state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Added weights (compressors) plus the head when it trains or is a custom head."""
        from .serialization import adapter_keys

        sd = self.state_dict() if state_dict is None else state_dict
        keys = adapter_keys(self)
        return {k: sd[k] for k in keys}

    def save_pretrained(self, save_directory: str, *, save_backbone: bool | None = None,
                        state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Write ``inti_config.json`` + ``adapter_model.safetensors`` (see :mod:`.serialization`)."""
        from .serialization import save_pretrained

        save_pretrained(self, save_directory, save_backbone=save_backbone, state_dict=state_dict)

    def unload(self) -> nn.Module:
        """Remove every hook and added module; return the backbone, bit-identical to before ``inject``."""
        self._check_alive()
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for n, p in self.backbone.named_parameters():
            if n in self._requires_grad:
                p.requires_grad_(self._requires_grad[n])
        self.compressors = nn.ModuleDict()
        self.temporal = nn.ModuleDict()
        self._feature_fuser = None
        if hasattr(self._host.blocks, _MARK):
            object.__delattr__(self._host.blocks, _MARK)
        self._unloaded = True
        return self.backbone


def inject(
    model: nn.Module,
    layers: Sequence[int] = (),
    *,
    compressor: str = "inti",
    input_layout: str = "NCTHW",
    freeze_backbone: bool | None = None,
    train_head: bool = True,
    head: nn.Module | None = None,
    host: str | None = None,
    temporal: Sequence[dict[str, Any]] = (),
    **compressor_options: Any,
) -> InTIModel:
    """Turn an image ViT into a video model with compressors after ``blocks[i]`` for ``i in layers``.

    Args:
        model: A supported backbone (timm ``VisionTransformer``, ``Eva``, ``Beit``, OpenCLIP, ...),
            possibly wrapped by peft (``get_peft_model``).
        layers: 0-based block indices; InTI runs on the output of each. ``[4, 6]`` on ViT-B is the
            paper's "after the 5th and 7th blocks". ``[]`` gives the naive frame-average baseline.
        compressor: Registered compressor name (``inti`` by default).
        input_layout: ``NCTHW`` (default) or ``NTCHW``.
        freeze_backbone: Train only added modules (and the head, if ``train_head``). ``None``: False for
            a plain backbone (full fine-tuning, as in the paper), True for a peft model (LoRA + InTI).
        head: Optional module replacing the backbone's head on the averaged video feature.
        host: Force a registered host description instead of detecting it.
        temporal: Temporal adapters to add, e.g. ``[{"name": "local_mhra", "blocks": "all"}]``.
        **compressor_options: Options of the compressor, e.g. ``contexts=("token", "frame")``,
            ``fusion="add"``, ``head="sigmoid"``, ``hidden_dim=256`` for InTI.

    Returns:
        The :class:`InTIModel`. The backbone's modules are not replaced; hooks are added to its
        blocks (``unload()`` removes them).

    Example:
        >>> import timm, torch, inti_adapters as ia
        >>> vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=64)
        >>> model = ia.inject(vit, layers=[4, 6])
        >>> model(torch.randn(1, 3, 8, 64, 64)).shape
        torch.Size([1, 10])
    """
    if isinstance(unwrap_peft(model), InTIModel):
        raise ValueError("this model is already an InTIModel; inject into its backbone only once")
    config = InjectConfig(
        layers=tuple(layers) if isinstance(layers, (list, tuple)) else layers,
        compressor=compressor,
        compressor_config=compressor_options,
        input_layout=input_layout,
        freeze_backbone=freeze_backbone,
        train_head=train_head,
        host=host,
        temporal=tuple(temporal),
    )
    resolved = resolve_host(unwrap_peft(model), host)
    if getattr(resolved.blocks, _MARK, False):  # the same blocks, maybe reached through another wrapper
        raise ValueError(
            f"{type(model).__name__} already has inti_adapters hooks installed on its blocks; call unload() on "
            "the existing InTIModel before injecting again"
        )
    return InTIModel(model, config, resolved, head=head)
