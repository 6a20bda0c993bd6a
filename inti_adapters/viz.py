"""Pictures of what InTI does: the paper's Figure 4 (the ``inti-viz`` command).

Every frame of a clip reaches the model's output through a path of InTI layers: frame ``t``'s
token ``k`` enters the pair ``t // 2`` of the first layer with weight ``w1``, the compressed frame
``t // 2`` enters the pair ``t // 4`` of the second layer with weight ``w2``, and so on. The
*cascaded weight* of the token is the product ``w1 * w2 * ...`` along that path. With a softmax
head the cascaded weights of the source frames of every output frame sum to 1 per token, so
``sum_t c[t, k] * frame_t`` (per patch) is the weighted mean the compressed frame stands for.

    >>> import timm, torch, inti_adapters as ia
    >>> from inti_adapters.viz import cascaded_weights
    >>> vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64)
    >>> model = ia.inject(vit, layers=[1, 2])
    >>> w = cascaded_weights(model, torch.randn(1, 3, 4, 64, 64))
    >>> tuple(w.shape), round(w.mean().item(), 4)     # a fresh model averages: 1/4 everywhere
    ((1, 4, 4, 4), 0.25)

Command line::

    $ inti-viz --checkpoint out/ --backbone vit_base_patch16_clip_224 --video clip.mp4 --frames 8 --out fig.png
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from ._format import ADAPTER_WEIGHTS_NAME
from ._io import atomic_write
from ._peft import unwrap_peft
from .hosts import resolve_host
from .inti import InTILayer
from .model import InTIModel
from .serialization import load_pretrained, read_config
from .surgery import probe
from .video import MEAN_STD, normalize_video

__all__ = ["cascaded_weights", "frame_groups", "main", "plot_cascaded_weights", "read_clip", "weighted_frames"]


# -- weights --------------------------------------------------------------------------------------
def frame_groups(num_frames: int, num_layers: int) -> list[list[int]]:
    """Source frames of each output frame after ``num_layers`` InTI layers (pairs ``(0,1), (2,3), ...``).

        >>> frame_groups(5, 2)
        [[0, 1, 2, 3], [4]]
    """
    if num_frames < 1 or num_layers < 0:
        raise ValueError(f"need num_frames >= 1 and num_layers >= 0, got {num_frames} and {num_layers}")
    step = 2**num_layers
    return [list(range(s, min(s + step, num_frames))) for s in range(0, num_frames, step)]


def _per_input_frame(w: torch.Tensor, num_in: int) -> torch.Tensor:
    """Pair weights ``(B, T', M, 2)`` -> the weight of each input frame ``(B, T, M)``.

    With odd ``T`` the last frame was paired with a copy of itself: its two weights add up.
    """
    b, t_out, m, _ = w.shape
    if t_out != (num_in + 1) // 2:
        raise RuntimeError(f"an InTI layer turned {num_in} frames into {t_out}, expected {(num_in + 1) // 2}")
    g = w.permute(0, 1, 3, 2).reshape(b, 2 * t_out, m)  # frame 2j <- slot 0 of pair j, 2j+1 <- slot 1
    if num_in % 2:
        g = torch.cat([g[:, : num_in - 1], g[:, num_in - 1 : num_in] + g[:, num_in:]], dim=1)
    return g


@torch.no_grad()
def cascaded_weights(model: InTIModel, video: torch.Tensor, *, layout: str | None = None) -> torch.Tensor:
    """Cascaded interpolation weight of every patch token of every frame: ``(B, T, H_grid, W_grid)``.

    Runs one forward of ``model`` (in eval mode, without gradients; the training mode is restored
    afterwards) and captures the weights of each InTI layer by probing
    ``model.compressors[str(i)]``. Output frame ``o`` is made from frames
    ``frame_groups(T, len(model.layers))[o]``; for a softmax head their weights sum to 1 per token.

    Args:
        model: An :class:`~inti_adapters.InTIModel` whose compressors are all InTI layers (or a
            ``PeftModel`` around one).
        video: A float video, ``(B, 3, T, H, W)`` (or the layout given / configured).
        layout: ``'NCTHW'`` or ``'NTCHW'``; defaults to the model's ``input_layout``.
    """
    model = unwrap_peft(model)  # a PeftModel around an InTIModel (LoRA after inject)
    if not isinstance(model, InTIModel):
        raise TypeError(f"cascaded_weights expects an InTIModel, got {type(model).__name__}")
    if not isinstance(video, torch.Tensor) or video.dim() != 5:
        shape = tuple(video.shape) if isinstance(video, torch.Tensor) else type(video).__name__
        raise ValueError(f"expected a 5-D video (B, 3, T, H, W), got {shape}")
    keys = sorted(model.compressors, key=int)
    for k in keys:
        if not isinstance(model.compressors[k], InTILayer):
            raise TypeError(
                f"cascaded_weights needs InTI layers, but the compressor after blocks[{k}] is "
                f"{type(model.compressors[k]).__name__}; interpolation weights exist only for compressor='inti'"
            )
    layout = layout or model.config.input_layout
    b = video.shape[0]
    t = video.shape[2] if layout == "NCTHW" else video.shape[1]
    captured = _capture_weights(model, video, keys, layout)
    grid = model.host.grid_size(*video.shape[-2:])
    if grid is None:
        raise ValueError(f"{model.host.name} has no patch grid for frames of size {tuple(video.shape[-2:])}")
    gh, gw = grid
    cascade = torch.ones(b, t, gh * gw, device=video.device)
    frames_in = t
    index = torch.arange(t, device=video.device)
    for level, k in enumerate(keys):
        if len(captured[k]) != 1:
            raise RuntimeError(f"the InTI layer after blocks[{k}] ran {len(captured[k])} times in one forward")
        w, tokens = captured[k][0]
        p = tokens.num_prefix_tokens if tokens is not None else 0
        if w.shape[2] != p + gh * gw:
            raise ValueError(
                f"the InTI layer after blocks[{k}] saw {w.shape[2]} tokens per frame, not {p} prefix tokens + "
                f"a {gh}x{gw} grid; cascaded weights need the full patch grid"
            )
        g = _per_input_frame(w[:, :, p:], frames_in)  # (B, frames_in, H*W)
        cascade = cascade * g[:, index // 2**level]
        frames_in = w.shape[1]
    return cascade.reshape(b, t, gh, gw)


def _capture_weights(model: InTIModel, video: torch.Tensor, keys: list[str],
                     layout: str) -> dict[str, list[tuple[torch.Tensor, Any]]]:
    """One eval forward; the pair weights ``(B, T', N, 2)`` and token layout each InTI layer saw."""
    captured: dict[str, list[tuple[torch.Tensor, Any]]] = {k: [] for k in keys}
    pending: dict[str, Any] = {}
    key_of = {id(model.compressors[k]): k for k in keys}

    def before(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple, dict]:
        pending[key_of[id(module)]] = args[1] if len(args) > 1 else kwargs.get("layout")
        return args, {**kwargs, "return_weights": True}  # ask the layer for its weights too

    def after(module: torch.nn.Module, output: Any) -> torch.Tensor:
        y, w = output  # keep the weights, hand only the tokens on to the model
        key = key_of[id(module)]
        captured[key].append((w.detach().float(), pending.pop(key, None)))
        return y

    was_training = model.training
    try:
        with probe([model.compressors[k] for k in keys], before=before, after=after):
            model.eval()
            model.forward_features(video, layout=layout)
    finally:
        model.train(was_training)
    return captured


def weighted_frames(frames: torch.Tensor, weights: torch.Tensor, groups: Sequence[Sequence[int]]) -> torch.Tensor:
    """Per-patch weighted mean of each group's frames: ``(3, T, H, W)`` float + ``(T, h, w)`` -> ``(3, O, H, W)``.

    The weights are upsampled to the frame size (nearest: one value per patch).
    """
    up = F.interpolate(weights[None].float(), size=frames.shape[-2:], mode="nearest")[0]  # (T, H, W)
    return torch.stack([(frames[:, g] * up[g][None]).sum(dim=1) for g in groups], dim=1)


def _infer_layers(weights: torch.Tensor, tol: float = 1e-3) -> int:
    """Smallest number of layers whose frame groups have weights summing to 1 per token."""
    t = weights.shape[0]
    for levels in range(0, max(1, math.ceil(math.log2(t))) + 1):
        sums = [weights[g].sum(0) for g in frame_groups(t, levels)]
        if all(torch.allclose(s, torch.ones_like(s), atol=tol) for s in sums):
            return levels
    raise ValueError(
        "these weights do not sum to 1 over the source frames of any output frame; pass num_layers explicitly"
    )


def _display_frames(video: torch.Tensor, mean_std: tuple[Sequence[float], Sequence[float]] | None) -> torch.Tensor:
    """``(3, T, H, W)`` uint8 or float -> float in [0, 1] for display."""
    if not video.is_floating_point():
        return video.float() / 255.0
    x = video.float()
    if mean_std is not None:
        mean = torch.tensor(mean_std[0], dtype=x.dtype).view(3, 1, 1, 1)
        std = torch.tensor(mean_std[1], dtype=x.dtype).view(3, 1, 1, 1)
        x = x * std + mean
    elif x.min() < 0 or x.max() > 1:  # normalised frames without their mean/std: stretch for display
        x = (x - x.min()) / (x.max() - x.min()).clamp_min(1e-8)
    return x.clamp(0, 1)


def plot_cascaded_weights(
    video: torch.Tensor,
    weights: torch.Tensor,
    path: str | Path,
    *,
    num_layers: int | None = None,
    sample: int = 0,
    mean_std: tuple[Sequence[float], Sequence[float]] | None = None,
    vmax: float | None = 1.0,
    cmap: str = "inferno",
    alpha: float = 0.55,
    title: str | None = None,
    dpi: int = 100,
) -> Path:
    """Draw Figure 4: each frame with its cascaded weights as a heat-map, beside the compressed frame.

    One row per output frame: its source frames (weights over the patch grid, on top of the frame)
    and the weighted reconstruction ``sum_t c_t * frame_t`` (per patch).

    Args:
        video: ``(3, T, H, W)`` or ``(B, 3, T, H, W)`` (NCTHW), uint8 or float. Float frames are
            de-normalised with ``mean_std`` when given, else shown as they are if in [0, 1], else
            stretched to [0, 1].
        weights: ``(T, H_grid, W_grid)`` or ``(B, T, H_grid, W_grid)`` from :func:`cascaded_weights`.
        path: PNG file to write (parent folders are created).
        num_layers: InTI layers the weights went through; ``None`` infers it from the weights.
        sample: Which clip of a batch to draw.
        vmax: Top of the colour scale (``None``: the largest weight).

    Returns:
        The path written.
    """
    if video.dim() == 5:
        video = video[sample]
    if weights.dim() == 4:
        weights = weights[sample]
    if video.dim() != 4 or video.shape[0] != 3:
        raise ValueError(f"expected a video (3, T, H, W) or (B, 3, T, H, W), got shape {tuple(video.shape)}")
    if weights.dim() != 3 or weights.shape[0] != video.shape[1]:
        raise ValueError(
            f"expected weights (T, H_grid, W_grid) with T={video.shape[1]} frames, got shape {tuple(weights.shape)}"
        )
    weights = weights.detach().float().cpu()
    frames = _display_frames(video.detach().cpu(), mean_std)
    t = frames.shape[1]
    levels = _infer_layers(weights) if num_layers is None else num_layers
    groups = frame_groups(t, levels)
    recon = weighted_frames(frames, weights, groups).clamp(0, 1)
    top = float(weights.max()) if vmax is None else vmax

    fig = _draw(frames, weights, recon, groups, top, cmap=cmap, alpha=alpha, title=title)
    if title:
        fig.suptitle(title, fontsize=10)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    return out


# -- command line ---------------------------------------------------------------------------------
def _draw(frames: torch.Tensor, weights: torch.Tensor, recon: torch.Tensor, groups: list[list[int]], top: float, *,
          cmap: str, alpha: float, title: str | None) -> Any:
    """The figure: one row per output frame, its source frames with weights, then the reconstruction."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    height, width = frames.shape[-2:]
    cols = max(len(g) for g in groups) + 1
    fig = Figure(figsize=(2.1 * cols + 0.8, 2.2 * len(groups) + (0.5 if title else 0.2)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(groups), cols, squeeze=False)
    image = None
    for row, group in enumerate(groups):
        for col in range(cols):
            ax = axes[row][col]
            ax.set_xticks([])
            ax.set_yticks([])
            if col < len(group):
                f = group[col]
                ax.imshow(frames[:, f].permute(1, 2, 0).numpy())
                image = ax.imshow(weights[f].numpy(), cmap=cmap, alpha=alpha, vmin=0.0, vmax=top,
                                  extent=(0, width, height, 0), interpolation="nearest")
                ax.set_title(f"frame {f}: mean {weights[f].mean():.2f}", fontsize=8)
            elif col == cols - 1:
                ax.imshow(recon[:, row].permute(1, 2, 0).numpy())
                ax.set_title(f"compressed frame {row}", fontsize=8)
            else:
                ax.axis("off")
    if image is not None:
        fig.colorbar(image, ax=[a for r in axes for a in r], fraction=0.02, pad=0.01, label="cascaded weight")
    return fig


def read_clip(path: str | Path, num_frames: int, size: int) -> torch.Tensor:
    """Decode ``num_frames`` uniformly spaced frames (segment centres) with PyAV, resize the short
    side to ``size`` and centre-crop: uint8 ``(3, num_frames, size, size)``."""
    import av

    if num_frames < 1 or size < 1:
        raise ValueError(f"num_frames and size must be >= 1, got {num_frames} and {size}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no video file at {path}")
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError(f"{path} has no video stream")
        total = int(container.streams.video[0].frames or 0)
        if total <= 0:  # no count in the header: count by decoding
            total = sum(1 for _ in container.decode(video=0))
    if total <= 0:
        raise ValueError(f"{path} has no decodable frames")
    wanted = [min(total - 1, int((i + 0.5) * total / num_frames)) for i in range(num_frames)]
    got: dict[int, np.ndarray] = {}
    with av.open(str(path)) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i in wanted:
                got[i] = frame.to_ndarray(format="rgb24")
            if i >= max(wanted):
                break
    if not got:
        raise ValueError(f"{path} has no decodable frames")
    last = got[max(got)]  # the header may over-count: repeat the last decoded frame
    clip = torch.from_numpy(np.stack([got.get(i, last) for i in wanted])).permute(0, 3, 1, 2).float()
    h, w = clip.shape[-2:]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    clip = F.interpolate(clip, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
    top, left = (nh - size) // 2, (nw - size) // 2
    clip = clip[..., top : top + size, left : left + size].round().clamp(0, 255).to(torch.uint8)
    return clip.permute(1, 0, 2, 3).contiguous()


def _head_classes(checkpoint: Path, backbone_name: str, img_size: int) -> int | None:
    """Classes of the head saved in an adapter directory, if one was saved (its names: the host's)."""
    import timm

    file = checkpoint / ADAPTER_WEIGHTS_NAME
    if not file.is_file():
        return None
    with torch.device("meta"):
        heads = resolve_host(timm.create_model(backbone_name, img_size=img_size)).head_module_names()
    with safe_open(str(file), framework="pt") as f:
        for key in (f"backbone.{h}.weight" for h in heads):
            if key in f.keys():
                return int(f.get_slice(key).get_shape()[0])
    return None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="inti-viz",
        description="Draw the cascaded InTI interpolation weights of a video (the paper's Figure 4) as a PNG.",
    )
    p.add_argument("--checkpoint", required=True, help="adapter directory written by save_pretrained")
    p.add_argument("--backbone", required=True, help="timm model name of the backbone, e.g. vit_base_patch16_clip_224")
    p.add_argument("--video", required=True, help="video file to decode with PyAV")
    p.add_argument("--frames", type=int, default=8, help="frames sampled uniformly from the video (default: 8)")
    p.add_argument("--size", type=int, default=224, help="short-side resize and centre crop size (default: 224)")
    p.add_argument("--img-size", type=int, default=None,
                   help="img_size passed to timm.create_model (default: --size)")
    p.add_argument("--num-classes", type=int, default=None,
                   help="classes of the backbone's head (default: read from the saved head, else timm's default)")
    p.add_argument("--pretrained", action="store_true",
                   help="load timm's pretrained backbone weights (must be available locally)")
    p.add_argument("--mean-std", default="auto",
                   help="normalisation: clip, imagenet, inception, or auto = the backbone's pretrained_cfg")
    p.add_argument("--out", default="inti_weights.png", help="PNG to write (default: inti_weights.png)")
    p.add_argument("--save-weights", default=None,
                   help="also write the cascaded weights (1, T, H_grid, W_grid) and the uint8 clip (3, T, S, S) "
                        "to this .safetensors file, to redraw or analyse them")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """The ``inti-viz`` command."""
    args = _parser().parse_args(argv)
    import timm

    try:
        ckpt = Path(args.checkpoint)
        cfg = read_config(ckpt)
        if cfg.get("custom_head"):
            raise ValueError(f"{ckpt} was saved with a custom head; load it in Python and call "
                             "inti_adapters.viz.cascaded_weights / plot_cascaded_weights")
        kwargs: dict[str, Any] = {"img_size": args.img_size or args.size}
        num_classes = args.num_classes if args.num_classes is not None else _head_classes(
            ckpt, args.backbone, kwargs["img_size"])
        if num_classes is not None:
            kwargs["num_classes"] = num_classes
        backbone = timm.create_model(args.backbone, pretrained=args.pretrained, **kwargs)
        model = load_pretrained(backbone, ckpt, is_trainable=False)
        if args.mean_std == "auto":
            mean_std = resolve_host(backbone).mean_std() or MEAN_STD["clip"]
        elif args.mean_std in MEAN_STD:
            mean_std = MEAN_STD[args.mean_std]
        else:
            raise ValueError(f"--mean-std must be auto, {', '.join(sorted(MEAN_STD))}; got {args.mean_std!r}")
        clip = read_clip(args.video, args.frames, args.size)
        video = normalize_video(clip[None], mean_std)
        weights = cascaded_weights(model, video, layout="NCTHW")
        model = unwrap_peft(model)
        title = (f"{args.backbone}, InTI after blocks {list(model.layers)}: {Path(args.video).name}, "
                 f"{args.frames} frames")
        out = plot_cascaded_weights(clip, weights, args.out, num_layers=len(model.layers), title=title)
        if args.save_weights:
            Path(args.save_weights).parent.mkdir(parents=True, exist_ok=True)
            meta = {"layers": json.dumps(list(model.layers)), "video": str(args.video)}
            atomic_write(args.save_weights, lambda p: save_file(
                {"weights": weights.contiguous(), "clip": clip}, p, metadata=meta))
    except (ValueError, TypeError, FileNotFoundError, json.JSONDecodeError) as exc:
        print(f"inti-viz: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out} (cascaded weights of {args.frames} frames, InTI after blocks {list(model.layers)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
