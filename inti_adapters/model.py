"""``InTIModel``: the video model around an image backbone. Build it with :func:`inject`.

``inject(backbone, layers=[4, 6])`` keeps the backbone's modules and state dict: the compressors
and temporal adapters live in the video model (``model.compressors``, ``model.temporal``) and
are wired into the backbone's forward by the surgery layer (:class:`~inti_adapters.surgery.Site`),
which overrides the ``forward`` of the blocks (and modules inside them) per instance.
``unload()`` removes every override and returns the backbone exactly as it was.

The life of one call ``model(video)``: the video is checked and flattened to frames; the context
(batch size, frame count, token layout) is set; the host runs the backbone on the frames, where
the sites run the temporal adapters and compressors on ``(B, T, N, C)`` clips; the remaining
frames are pooled by the host, averaged, changed by global adapters and classified.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._config import as_dict
from ._format import (
    ADAPTER_WEIGHTS_NAME,
    BACKBONE_WEIGHTS_NAME,
    CONFIG_NAME,
    PEFT_SUBFOLDER,
    write_config,
    write_tensors,
)
from ._io import give_default_modes
from ._peft import is_peft_model, peft_adapter_parameters, unwrap_peft
from .compressors import build_compressor, make_compressor_config
from .config import InjectConfig
from .context import ContextHolder, VideoContext
from .hosts import Host, resolve_host
from .hub import PushToHubMixin, check_save_options, finish_save
from .surgery import Site
from .temporal import PRESETS, attach_temporal_adapters, build_temporal_adapters
from .tokens import TokenLayout, frame_schedule
from .video import video_frames

__all__ = ["InTIModel", "build_video_model", "inject"]

logger = logging.getLogger(__name__)

_MARK = "_inti_adapters_injected"


def _added_module(build: Any, reference: nn.Module) -> nn.Module:
    """Build added modules on the CPU (the same init on every device) or, to count parameters
    without allocating them, on the meta device; then move them to the backbone's device and
    floating dtype."""
    ref = next(reference.parameters(), None)
    device = ref.device if ref is not None else torch.device("cpu")
    with torch.device("meta" if device.type == "meta" else "cpu"):
        module = build()
    return module.to(device=device, dtype=ref.dtype if ref is not None and ref.is_floating_point() else None)


def _resolve_temporal(spec: str | tuple[dict[str, Any], ...]) -> tuple[dict[str, Any], ...]:
    """A preset name of :data:`inti_adapters.temporal.PRESETS` -> its adapter specs; specs pass through."""
    if not isinstance(spec, str):
        return tuple(dict(s) for s in spec)
    if spec not in PRESETS:
        raise ValueError(f"temporal={spec!r} is not a preset of inti_adapters.temporal.PRESETS ({sorted(PRESETS)}); "
                         "give a preset name or a list of adapter specs")
    return tuple(dict(s) for s in PRESETS[spec])


class InTIModel(PushToHubMixin, nn.Module):
    """A video model around an image backbone. Build it with :func:`inject`.

    ``forward(video)`` takes ``(B, 3, T, H, W)`` float frames (or ``(B, T, 3, H, W)`` with
    ``input_layout='NTCHW'``), runs the backbone on the frames with compressors after the
    configured blocks, averages the per-frame features of the frames that remain and applies
    the backbone's head (or ``head`` given to ``inject``).
    """

    def __init__(self, backbone: nn.Module, config: InjectConfig, host: Host, head: nn.Module | None = None):
        super().__init__()
        config.check_depth(len(host.blocks))
        if config.layers and host.patch_dropout_active():
            raise ValueError(
                "the backbone uses patch dropout (timm: patch_drop_rate > 0; OpenCLIP: patch_dropout > 0): it "
                "drops different patches in every frame, which breaks the pairing of tokens at the same "
                "position. Create the backbone without patch dropout."
            )
        # validated options and resolved presets, in a copy: the caller's config is never changed
        options = as_dict(make_compressor_config(config.compressor, config.compressor_config))
        config = dataclasses.replace(config, compressor_config=options, temporal=_resolve_temporal(config.temporal))
        self.config = config
        self.backbone = backbone
        self.head = head
        self._host = host
        self._holder = ContextHolder()
        self._site = Site(host, self._holder, self.config.layers)
        self.compressors = _added_module(lambda: nn.ModuleDict(
            {str(i): build_compressor(config.compressor, host.embed_dim, options) for i in config.layers}), backbone)
        self.temporal = _added_module(lambda: build_temporal_adapters(
            config.temporal, host.embed_dim, host.num_features, len(host.blocks)), backbone)
        try:  # temporal adapters first: on a compressed block the adapter sees the frames before compression
            attach_temporal_adapters(self.temporal, self._site)
            for i in config.layers:
                self.compressors[str(i)].attach(self._site, i)
        except BaseException:  # a refused option must not leave hooks behind on the user's backbone
            self._site.remove()
            raise
        self._requires_grad = {n: p.requires_grad for n, p in backbone.named_parameters()}
        self._freeze(config)
        self._unloaded = False
        self._peft_checked = False
        self._frozen_added = False
        object.__setattr__(host.blocks, _MARK, True)

    def _freeze(self, config: InjectConfig) -> None:
        freeze = config.freeze_backbone if config.freeze_backbone is not None else is_peft_model(self.backbone)
        if not freeze:
            return
        peft_ids = {id(p) for p in peft_adapter_parameters(self.backbone)}
        head_ids = {id(p) for p in self._host.head_parameters()}
        for p in self.backbone.parameters():
            # peft's own adapters keep the flag peft gave them (inactive adapters stay frozen)
            p.requires_grad_(p.requires_grad if id(p) in peft_ids else config.train_head and id(p) in head_ids)

    # -- context ------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def disable_adapters(self) -> Iterator[None]:
        """Run without compressors and adapters: the backbone may then be called directly on images."""
        with self._holder.disable():
            yield

    # -- input ----------------------------------------------------------------------------------
    def _frames(self, video: Any, layout: str | None) -> tuple[torch.Tensor, int, int]:
        """Validate ``video`` (:func:`inti_adapters.video.video_frames`) and the frame size (host)."""
        weight = next((p.dtype for p in self.parameters() if p.is_floating_point()), None)
        frames, b, t = video_frames(video, layout or self.config.input_layout, self._host.in_chans, weight)
        self._host.check_image_size(*frames.shape[-2:])
        return frames, b, t

    def _check_alive(self) -> None:
        if self._unloaded:
            raise RuntimeError("this InTIModel was unloaded; inject the backbone again to use it as a video model")

    # -- forward --------------------------------------------------------------------------------
    def forward_features(self, video: torch.Tensor, *, layout: str | None = None) -> torch.Tensor:
        """Tokens after the backbone's final norm, ``(B, T', N, C)`` for the ``T'`` remaining frames."""
        self._check_alive()
        frames, b, t = self._frames(video, layout)
        host = self._host
        if not self._peft_checked and self.training and torch.is_grad_enabled():
            self._warn_if_peft_froze_added_modules()
        ctx = VideoContext(
            batch_size=b,
            num_frames=t,
            tokens=TokenLayout(host.num_prefix_tokens, host.cls_index, host.grid_size(*frames.shape[-2:])),
            grad_forward=torch.is_grad_enabled(),
        )
        with self._holder.forward(ctx):
            tokens = host.forward_features(frames)
        return tokens.unflatten(0, (b, -1))

    def forward_head(self, tokens: torch.Tensor, *, pre_logits: bool = False) -> torch.Tensor:
        """Pool each remaining frame, average over frames, apply the head: ``(B, T', N, C) -> (B, K)``."""
        b, t = tokens.shape[:2]
        feats = self._host.pool(tokens.flatten(0, 1)).unflatten(0, (b, t)).mean(dim=1)
        feats = self._site.apply_features(feats)  # e.g. a UniFormerV2-style global temporal module
        if pre_logits:
            return feats
        return self.head(feats) if self.head is not None else self._host.classify(feats)

    def forward(self, video: torch.Tensor, *, layout: str | None = None) -> torch.Tensor:
        return self.forward_head(self.forward_features(video, layout=layout))

    def _warn_if_peft_froze_added_modules(self) -> None:
        """``get_peft_model(inject(...), LoraConfig(...))`` freezes the InTI layers: say so, once."""
        self._peft_checked = True
        added = list(self.compressors.parameters()) + list(self.temporal.parameters())
        tuned = [p for p in peft_adapter_parameters(self) if p.requires_grad]
        if added and tuned and not any(p.requires_grad for p in added) and not self._frozen_added:
            warnings.warn(
                f"every parameter of the InTI layers / temporal adapters ({sum(p.numel() for p in added):,}) is "
                "frozen while peft adapters train: peft's get_peft_model freezes all modules it did not add. "
                "Use inti_adapters.add_lora(model, lora_config) instead of get_peft_model, or call "
                "model.mark_added_modules_trainable() and build the optimizer afterwards. If they are frozen "
                "on purpose, call model.freeze_added_modules() first.",
                stacklevel=3,
            )

    # -- introspection --------------------------------------------------------------------------
    @property
    def host(self) -> Host:
        return self._host

    @property
    def layers(self) -> tuple[int, ...]:
        return self.config.layers

    def frame_schedule(self, num_frames: int) -> list[int]:
        """Frames each block sees for a clip of ``num_frames`` (e.g. 16 -> [16]*5 + [8]*2 + [4]*5)."""
        fns = {int(i): c.output_frames for i, c in self.compressors.items()}
        return frame_schedule(num_frames, len(self._host.blocks), fns)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing of the backbone's blocks (every site is safe to recompute)."""
        self._host.set_grad_checkpointing(enable)

    def _names_of(self, params: Sequence[nn.Parameter]) -> list[str]:
        ids = {id(p) for p in params}
        return [n for n, p in self.named_parameters() if id(p) in ids]

    def head_parameter_names(self) -> list[str]:
        """Names (in this model's state dict) of the classifier head's parameters."""
        if self.head is not None:
            return [f"head.{n}" for n, _ in self.head.named_parameters()]
        return self._names_of(self._host.head_parameters())

    def no_weight_decay(self) -> set[str]:
        """Parameter names that never get weight decay (timm convention): the host's tokens and
        position tables and what the added modules declare; 1-D parameters never do either."""
        host_names = self._host.no_weight_decay_names()
        out = set(self._names_of([p for n, p in self._host.model.named_parameters() if n in host_names]))
        for prefix, tree in (("compressors", self.compressors), ("temporal", self.temporal)):
            for name, module in tree.named_modules():
                declare = getattr(module, "no_weight_decay", None)
                if callable(declare) and module is not tree:
                    out |= {f"{prefix}.{name}.{n}" for n in declare()}
        return out

    def layer_ids(self) -> dict[str, int]:
        """Depth of each parameter for layer-wise lr decay: 0 for the embeddings (host facts),
        ``i + 1`` inside ``blocks[i]``, ``depth + 1`` for everything after and for added modules."""
        depth = len(self._host.blocks)
        by_id: dict[int, int] = {}
        for i, block in enumerate(self._host.blocks):
            by_id.update({id(p): i + 1 for p in block.parameters()})
        embed = set(self._host.embedding_names())
        for name, p in self._host.model.named_parameters():
            if any(name == e or name.startswith(e + ".") for e in embed):
                by_id[id(p)] = 0
        return {n: by_id.get(id(p), depth + 1) for n, p in self.named_parameters()}

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
        self._frozen_added = False
        for p in list(self.compressors.parameters()) + list(self.temporal.parameters()):
            p.requires_grad_(True)
        if train_head:
            heads = set(self.head_parameter_names())
            for n, p in self.named_parameters():
                if n in heads:
                    p.requires_grad_(True)

    def freeze_added_modules(self) -> None:
        """Freeze the InTI layers and temporal adapters on purpose (e.g. to train only LoRA)."""
        self._frozen_added = True
        for p in list(self.compressors.parameters()) + list(self.temporal.parameters()):
            p.requires_grad_(False)

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

    # -- save / unload ------------------------------------------------------------------------
    def adapter_keys(self) -> list[str]:
        """State-dict keys that belong in the adapter file: compressors, temporal adapters, and the
        head when it is custom or trains."""
        sd_keys = list(self.state_dict())
        keys = [k for k in sd_keys if k.startswith(("compressors.", "temporal."))]
        params = dict(self.named_parameters())
        if self.head is not None:
            keys += [k for k in sd_keys if k.startswith("head.")]
        elif any(params[k].requires_grad for k in self.head_parameter_names()):
            keys += self.head_parameter_names()
        return sorted(keys)

    def backbone_trained(self) -> bool:
        """True if a backbone parameter (not the head, not peft's) is trainable: full fine-tuning."""
        skip = set(self.head_parameter_names()) | set(self._names_of(peft_adapter_parameters(self)))
        return any(p.requires_grad for n, p in self.named_parameters() if n.startswith("backbone.") and n not in skip)

    def save_pretrained(self, save_directory: str | Any, *, save_backbone: bool | None = None,
                        state_dict: dict[str, torch.Tensor] | None = None, peft_outer: nn.Module | None = None,
                        peft_state_dict: dict[str, torch.Tensor] | None = None, card: Any = None,
                        push_to_hub: bool = False, **hub_options: Any) -> Any:
        """Write ``inti_config.json`` + ``adapter_model.safetensors`` (and the backbone / peft parts) and
        the model card ``README.md``; with ``push_to_hub``, upload them (:mod:`inti_adapters.hub`).

        Args:
            save_directory: Created if missing.
            save_backbone: Also write the backbone weights; ``None`` does so only when the backbone
                trains (full fine-tuning), so that no trained weight is silently lost.
            state_dict: A full state dict of this model to save from (e.g. gathered from ZeRO-3).
            peft_outer: The ``PeftModel`` around this model (LoRA after ``inject``); use
                :func:`inti_adapters.save_pretrained`, which passes it.
            peft_state_dict: The state dict that feeds peft's own file (ZeRO-3 gathered).
            card: Model-card additions (:class:`inti_adapters.card.CardInfo` fields, e.g.
                ``{"num_frames": 16, "metrics": {"top1": 82.1}}``), or False for no card.
            push_to_hub, **hub_options: Upload to the Hub (``repo_id``, default the folder name;
                ``token``, ``private``, ``revision``, ``commit_message``, ``create_pr``).
        """
        self._check_alive()
        check_save_options(card, push_to_hub, hub_options)
        out = Path(save_directory)
        out.mkdir(parents=True, exist_ok=True)
        sd = self.state_dict() if state_dict is None else state_dict
        keys = self.adapter_keys()
        missing = [k for k in keys if k not in sd]
        if missing:
            raise KeyError(f"state_dict lacks adapter keys {missing[:5]}{'...' if len(missing) > 5 else ''}")
        save_backbone = self.backbone_trained() if save_backbone is None else save_backbone
        peft_model = peft_outer if peft_outer is not None else (self.backbone if is_peft_model(self.backbone) else None)
        peft_info = None
        if peft_model is not None:
            peft_info = {"order": "after_inject" if peft_outer is not None else "before_inject",
                         "subfolder": PEFT_SUBFOLDER}
            if peft_state_dict is None and state_dict is not None and peft_outer is None:
                peft_state_dict = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
            # peft's own method (the instance's may be routed back here: serialization.whole_model_methods)
            type(peft_model).save_pretrained(peft_model, str(out / PEFT_SUBFOLDER), state_dict=peft_state_dict)
            give_default_modes(out / PEFT_SUBFOLDER)  # peft's safetensors file comes from a 0600 temporary
        write_tensors(out / ADAPTER_WEIGHTS_NAME, {k: sd[k] for k in keys})
        if save_backbone:
            skip = set(keys) | set(self._names_of(peft_adapter_parameters(self)))
            write_tensors(out / BACKBONE_WEIGHTS_NAME,
                          {k: v for k, v in sd.items() if k.startswith("backbone.") and k not in skip})
            logger.info("saved the backbone's weights too, %.0f MB, since it trains (full fine-tuning; freeze_backbone="
                        "True or save_backbone=False leaves them out): %s",
                        (out / BACKBONE_WEIGHTS_NAME).stat().st_size / 1e6, out / BACKBONE_WEIGHTS_NAME)
        elif (out / BACKBONE_WEIGHTS_NAME).exists():
            (out / BACKBONE_WEIGHTS_NAME).unlink()  # stale file from an earlier save would mislead the loader
        write_config(out / CONFIG_NAME, self._saved_config(bool(save_backbone), peft_info))
        return finish_save(out, self, card=card, peft_model=peft_model, push_to_hub=push_to_hub,
                           peft_order=(peft_info or {}).get("order", ""), **hub_options)

    def _saved_config(self, saved_backbone: bool, peft_info: dict[str, str] | None) -> dict[str, Any]:
        return {
            "host": self._host.name,
            "backbone_class": f"{type(self.backbone).__module__}.{type(self.backbone).__qualname__}",
            "embed_dim": self._host.embed_dim,
            "depth": len(self._host.blocks),
            "inject": self.config.to_dict(),
            "custom_head": self.head is not None,
            "saved_backbone": saved_backbone,
            "peft": peft_info,
        }

    def __deepcopy__(self, memo: dict[int, Any]) -> InTIModel:
        """A working copy (e.g. for EMA): the backbone copied without this model's sites, then
        injected the same way, with the same weights, ``requires_grad`` flags and mode."""
        self._check_alive()
        with self._site.suspended():
            backbone = copy.deepcopy(self.backbone, memo)
        new = InTIModel(backbone, self.config, type(self._host)(unwrap_peft(backbone)), head=copy.deepcopy(self.head, memo))
        memo[id(self)] = new
        new.load_state_dict(self.state_dict())
        for (_, mine), (_, theirs) in zip(self.named_parameters(), new.named_parameters(), strict=True):
            theirs.requires_grad_(mine.requires_grad)
        new._requires_grad, new._frozen_added = dict(self._requires_grad), self._frozen_added
        return new.train(self.training)

    def unload(self) -> nn.Module:
        """Remove every hook and added module; return the backbone, bit-identical to before ``inject``."""
        self._check_alive()
        self._site.remove()
        for n, p in self.backbone.named_parameters():
            if n in self._requires_grad:
                p.requires_grad_(self._requires_grad[n])
        self.compressors = nn.ModuleDict()
        self.temporal = nn.ModuleDict()
        if hasattr(self._host.blocks, _MARK):
            object.__delattr__(self._host.blocks, _MARK)
        self._unloaded = True
        return self.backbone


def build_video_model(backbone: nn.Module, config: InjectConfig, *, head: nn.Module | None = None) -> InTIModel:
    """The one construction path of an :class:`InTIModel` (``inject`` and ``load_pretrained``), with its guards."""
    if isinstance(unwrap_peft(backbone), InTIModel):
        raise ValueError("this model is already an InTIModel; inject into its backbone only once")
    if isinstance(head, str):
        raise TypeError(
            f"head={head!r}: head is the classifier module applied to the video feature; the kind of InTI "
            "weight head is the compressor option weight_head (softmax | sigmoid | attention)"
        )
    host = resolve_host(unwrap_peft(backbone), config.host)
    if getattr(host.blocks, _MARK, False):  # the same blocks, maybe reached through another wrapper
        raise ValueError(
            f"{type(backbone).__name__} already has inti_adapters hooks installed on its blocks; call unload() on "
            "the existing InTIModel before injecting again"
        )
    return InTIModel(backbone, config, host, head=head)


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
    temporal: str | Sequence[dict[str, Any]] = (),
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
        train_head: With a frozen backbone, keep the classifier head trainable (default); False
            freezes it too. Ignored when the backbone trains (the head trains with it).
        head: Optional module replacing the backbone's head on the averaged video feature.
        host: Force a registered host description instead of detecting it.
        temporal: Temporal adapters to add, e.g. ``[{"name": "local_mhra", "blocks": "all"}]``, or a
            preset name of :data:`inti_adapters.temporal.PRESETS` such as ``"uniformerv2_b"``.
        **compressor_options: Options of the compressor, e.g. ``contexts=("token", "frame")``,
            ``fusion="add"``, ``weight_head="sigmoid"``, ``hidden_dim=256`` for InTI.

    Returns:
        The :class:`InTIModel`. The backbone's modules are not replaced; their ``forward`` is
        overridden per instance where a site is used (``unload()`` restores them).

    Example:
        >>> import timm, torch, inti_adapters as ia
        >>> vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=64)
        >>> model = ia.inject(vit, layers=[4, 6])
        >>> model(torch.randn(1, 3, 8, 64, 64)).shape
        torch.Size([1, 10])
    """
    config = InjectConfig(
        layers=tuple(layers) if isinstance(layers, (list, tuple)) else layers,
        compressor=compressor,
        compressor_config=compressor_options,
        input_layout=input_layout,
        freeze_backbone=freeze_backbone,
        train_head=train_head,
        host=host,
        temporal=temporal if isinstance(temporal, str) else tuple(temporal),
    )
    return build_video_model(model, config, head=head)
