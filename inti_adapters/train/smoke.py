"""``--smoke``: run a recipe for one step on a tiny backbone of the same family and fake data.

Everything that makes the recipe what it is stays: model family and depth, compressor layers,
temporal adapters, LoRA, ZeRO stage, DeepSpeed JSON, optimizer, evaluation views. What changes:
width 48, 32x32 frames in 8x8 patches, no pretrained weights, 4 synthetic frames, one step, and
the output folder: ``train.output_dir`` + ``.smoke`` (``runs/k400_vitb16_inti.smoke``), so that a
smoke run never touches the recipe's real output folder (whose checkpoints a real run would then
try to resume, and whose ``final/`` ``inti-export`` would read).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from .config import Config
from .engine import LoaderFactory
from .synthetic import SyntheticVideoLoader

FRAMES, SIZE, BATCH, CLASSES = 4, 32, 2, 5
WIDTH = 48  # divisible by the head counts of the temporal presets (12, 16)


def smoke_output_dir(output_dir: str) -> str:
    """Where a smoke run of a recipe with ``train.output_dir=output_dir`` writes: a sibling folder."""
    real = Path(output_dir).expanduser().absolute()
    return str(real.parent / f"{real.name or 'run'}.smoke")


def smoke_config(cfg: Config) -> Config:
    """The tiny version of ``cfg`` (see the module docstring)."""
    m = cfg.model
    if m.source == "timm":
        kwargs = {**m.model_kwargs, "img_size": SIZE, "patch_size": 8, "embed_dim": WIDTH, "num_heads": 2}
    else:
        import open_clip

        layers = (open_clip.get_model_config(m.name) or {}).get("vision_cfg", {}).get("layers", 12)
        kwargs = {**m.model_kwargs, "embed_dim": 16,
                  "vision_cfg": {"width": WIDTH, "layers": layers, "head_width": WIDTH // 2, "patch_size": 8, "image_size": SIZE},
                  "text_cfg": {"width": 32, "layers": 1, "heads": 2, "context_length": 8, "vocab_size": 100}}
    model = dataclasses.replace(m, pretrained=False, checkpoint=None, model_kwargs=kwargs,
                                num_classes=m.num_classes or CLASSES)
    train = dataclasses.replace(
        cfg.train, epochs=1, steps_per_epoch=1, grad_accum=1, global_batch_size=None, save_every=0,
        eval_every_epochs=1, resume="never", bf16=cfg.train.bf16 and torch.cuda.is_available(),
        output_dir=smoke_output_dir(cfg.train.output_dir),
    )
    data = {"batch_size": BATCH, "num_frames": FRAMES, "crop_size": SIZE,
            "num_clips": int(cfg.data.get("num_clips", 1)), "num_crops": int(cfg.data.get("num_crops", 1))}
    return dataclasses.replace(cfg, model=model, train=train, data=data, builtin_data=None,
                               eval=dataclasses.replace(cfg.eval, max_batches=1))


def smoke_loader_factory(cfg: Config) -> LoaderFactory:
    """Synthetic loaders for a :func:`smoke_config` (two train batches, one eval batch per rank)."""
    views = int(cfg.data.get("num_clips", 1)) * int(cfg.data.get("num_crops", 1))
    classes = cfg.model.num_classes or CLASSES

    def factory(train: bool, rank: int, world_size: int, epoch: int) -> Any:
        return SyntheticVideoLoader(num_samples=2 * BATCH * world_size, num_classes=classes, num_frames=FRAMES,
                                    size=SIZE, batch_size=BATCH, train=train, rank=rank, world_size=world_size,
                                    num_views=1 if train else views, seed=cfg.train.seed, epoch=epoch)

    return factory
