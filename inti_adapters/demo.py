"""`make demo`: the main job on the built-in moving-digits data set, in under 10 minutes on 2 CPU cores.

1. Generate the data set to WebDataset frame shards (cached): 8-frame 64x64 clips of a handwritten
   digit moving right/left/down/up; 40 classes = digit x direction. Train and validation use
   disjoint scans.
2. "Image pre-training": a small ViT learns the digit from single frames (:mod:`.demo_pretrain`;
   cached after the first run). Its still-frame digit accuracy on the held-out scans is printed.
3. Adapt it to video three ways with the same budget (steps, learning rate, seed) through the
   training engine (``inti_adapters.train``, DeepSpeed over gloo): naive frame averaging, InTI,
   and InTI + a temporal adapter (UniFormerV2-style local module in every block).
4. Print top-1, digit and direction accuracy, GFLOPs per clip and the measured training time per step.

The naive frame average is order-blind and (with a class token) position-blind: its direction
and axis accuracies stay at chance (25% and 50%). InTI merges frames position by position and
learns some of the axis and the direction.

    python -m inti_adapters.demo [--steps-per-epoch N] [--epochs E] [--cache DIR] [--seed S]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

import inti_adapters as ia

from .data import build_dataloader, ensure_builtin_dataset, label_accuracies
from .demo_pretrain import ImageRecipe, Pretrained, pretrain_image_model
from .recipes import recipe_path
from .train import Trainer, load_config

RECIPE = recipe_path("digits_cpu")  # package data: found in a source checkout and in an installed wheel
# a class token and 4 heads: +4 points of still-frame accuracy over mean-pooled tokens at the same budget
MODEL_KWARGS = dict(img_size=64, patch_size=8, depth=4, embed_dim=64, num_heads=4, class_token=True,
                    global_pool="token")
VARIANTS = {
    "naive": dict(layers=[], temporal=[]),
    "InTI [1, 2]": dict(layers=[1, 2], temporal=[]),
    "InTI [1, 2] + local temporal": dict(layers=[1, 2], temporal=[{"name": "local_mhra", "blocks": "all"}]),
}
MEAN_STD = "imagenet"
DATA_OPTIONS = dict(store="frames")  # JPEG frame shards: decoded several times faster than the H.264 clips
# (the recipe, ``builtin_data.store: frames``, says the same; the demo passes it to the generator)
IMAGE_RECIPE = ImageRecipe()


def _cache_root(arg: str | None) -> Path:
    return Path(arg or os.environ.get("INTI_CACHE", "~/.cache/inti_adapters")).expanduser()


def _vit(num_classes: int) -> torch.nn.Module:
    import timm

    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=num_classes, **MODEL_KWARGS)


class PhaseProgress:
    """A tqdm bar on a terminal; otherwise one line at each quarter of the phase (a log stays short)."""

    def __init__(self, total: int, desc: str) -> None:
        self.total, self.desc, self.n, self.t0 = total, desc, 0, time.perf_counter()
        self.bar = tqdm(total=total, desc=desc, dynamic_ncols=True) if sys.stderr.isatty() else None

    def update(self, **postfix: Any) -> None:
        self.n += 1
        if self.bar is not None:
            self.bar.update()
            self.bar.set_postfix({k: f"{v:.3f}" if isinstance(v, float) else v for k, v in postfix.items()},
                                 refresh=False)
        elif self.n * 4 // self.total != (self.n - 1) * 4 // self.total:
            shown = "  ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in postfix.items())
            print(f"{self.desc}: {self.n}/{self.total}  {shown}  {time.perf_counter() - self.t0:.0f} s", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def pretrained_image_model(ds: Any, root: Path, recipe: ImageRecipe = IMAGE_RECIPE) -> Pretrained:
    """The demo's image-pretrained ViT (cached under ``root/demo``), with its still-frame accuracy printed."""
    progress = PhaseProgress(recipe.steps, "image pre-training")
    try:
        result = pretrain_image_model(_vit, ds, root / "demo", recipe=recipe, model_kwargs=MODEL_KWARGS,
                                      mean_std=MEAN_STD, progress=progress)
    finally:
        progress.close()
    how = f"cached ({result.seconds:.0f} s when trained)" if result.cached else f"trained in {result.seconds:.0f} s"
    print(f"image pre-training: {how}; still-frame digit accuracy {result.accuracy:.1%} on the "
          f"{result.frames} frames of the validation clips (held-out scans)")
    return result


@torch.no_grad()
def evaluate_digits(model: torch.nn.Module, ds: Any) -> dict[str, float]:
    """Top-1 / digit / direction / axis accuracy on the validation clips (one view each)."""
    model.eval()
    preds, labels = [], []
    for video, label in build_dataloader(ds.to_data_config(batch_size=50, num_clips=1, num_crops=1), train=False):
        preds.append(model(ia.normalize_video(video[:, 0], MEAN_STD)).argmax(-1))
        labels.append(label)
    return label_accuracies(torch.cat(preds), torch.cat(labels))


def variant_config(spec: dict, *, checkpoint: Path, data_root: str | Path, run_dir: Path, epochs: int,
                   steps_per_epoch: int, lr: float, seed: int = 0, overrides: Sequence[str] = ()) -> Any:
    """The engine config of one demo variant: the CPU recipe with the variant's overrides, then
    ``overrides`` (``section.key=value`` strings, e.g. ``optim.added_lr_scale=10``)."""
    base = [
        f"model.checkpoint={checkpoint}", f"model.layers={json.dumps(spec['layers'])}",
        f"model.temporal={json.dumps(spec['temporal'])}", f"model.model_kwargs={json.dumps(MODEL_KWARGS)}",
        f"model.mean_std={MEAN_STD}", f"builtin_data.root={data_root}", f"train.output_dir={run_dir}",
        f"train.epochs={epochs}", f"train.steps_per_epoch={steps_per_epoch}", "train.resume=never",
        "train.eval_every_epochs=0", f"train.save_every={10 ** 9}", f"optim.lr={lr}", f"train.seed={seed}",
        f"model.compressor={spec.get('compressor', 'inti')}",
        f"model.compressor_config={json.dumps(spec.get('compressor_config', {}))}",
    ] + [f"builtin_data.{k}={v}" for k, v in DATA_OPTIONS.items()]
    return load_config(RECIPE, [*base, *overrides])


def adapt(name: str, spec: dict, *, checkpoint: Path, ds: Any, run_dir: Path, epochs: int, steps_per_epoch: int,
          lr: float, seed: int = 0, overrides: Sequence[str] = ()) -> dict[str, float]:
    """Train one video variant with the engine from the CPU recipe; evaluate; count GFLOPs.

    Reports ``seconds`` (the whole run: setup, training, export), ``train_seconds`` (the steps
    alone, data waits included) and ``step_ms`` (their median).
    """
    cfg = variant_config(spec, checkpoint=checkpoint, data_root=ds.root, run_dir=run_dir, epochs=epochs,
                         steps_per_epoch=steps_per_epoch, lr=lr, seed=seed, overrides=overrides)
    t0 = time.perf_counter()
    result = Trainer(cfg).fit()
    seconds = time.perf_counter() - t0
    model = ia.load_pretrained(_vit(ds.num_classes), result.export_dir, is_trainable=False)
    if model.config.compressor != spec.get("compressor", "inti"):  # never report one variant as another
        raise RuntimeError(f"{name}: trained with compressor {model.config.compressor!r}, "
                           f"asked for {spec.get('compressor', 'inti')!r}")
    step_ms = 1000 * statistics.median(result.step_seconds) if result.step_seconds else float("nan")
    print(f"{name}: {result.step} steps in {seconds:.0f} s (median step {step_ms:.0f} ms); evaluating", flush=True)
    acc = evaluate_digits(model, ds)
    gflops = ia.count_gflops(model, torch.zeros(1, 3, ds.num_frames, ds.image_size, ds.image_size))
    loss = result.history[-1][1] if result.history else float("nan")
    return {**acc, "gflops": gflops, "seconds": seconds, "train_seconds": sum(result.step_seconds),
            "engine_step_ms": step_ms, "step_ms": step_ms, "final_loss": loss, "export_dir": result.export_dir}


def _train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> float:
    t0 = time.perf_counter()
    loss = torch.nn.functional.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return time.perf_counter() - t0


def time_steps_side_by_side(export_dirs: dict[str, Path], ds: Any, rounds: int = 7) -> dict[str, float]:
    """Median ms of one training step (forward, backward, AdamW) of each trained variant on the same batch.

    The variants take turns (round-robin, one warm-up round), so a machine that speeds up or slows down
    during the demo moves them alike; the engine's own step times come from runs minutes apart.
    """
    cfg = ds.to_data_config(batch_size=16, num_clips=1, num_crops=1)
    video, label = next(iter(build_dataloader(cfg, train=False)))
    x = ia.normalize_video(video[:, 0], MEAN_STD)
    models = {name: ia.load_pretrained(_vit(ds.num_classes), d, is_trainable=True).train()
              for name, d in export_dirs.items()}
    for m in models.values():  # full fine-tuning, as the recipe trains
        m.requires_grad_(True)
    opts = {name: torch.optim.AdamW(m.parameters(), lr=1e-6) for name, m in models.items()}
    times: dict[str, list[float]] = {name: [] for name in models}
    for r in range(rounds + 1):
        for name in list(models)[r % len(models):] + list(models)[:r % len(models)]:
            seconds = _train_step(models[name], opts[name], x, label)
            if r:
                times[name].append(seconds)
    return {name: 1000 * statistics.median(t) for name, t in times.items()}


def results_table(rows: dict[str, dict[str, float]]) -> str:
    """The demo's markdown table; ratios are relative to the ``naive`` row."""
    naive = rows["naive"]
    lines = ["| variant | top-1 | digit | direction | axis | GFLOPs/clip | vs naive | ms/step | vs naive | engine ms/step |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['accuracy']:.1%} | {r['digit']:.1%} | {r['direction']:.1%} | {r['axis']:.1%} | "
            f"{r['gflops']:.3f} | {100 * (r['gflops'] / naive['gflops'] - 1):+.0f}% | {r['step_ms']:.0f} | "
            f"{100 * (r['step_ms'] / naive['step_ms'] - 1):+.0f}% | {r['engine_step_ms']:.0f} |")
    return "\n".join(lines)


def verdict(rows: dict[str, dict[str, float]]) -> list[str]:
    """Plain statements of the claim, each checked against the table (true or false as measured)."""
    naive, inti = rows["naive"], rows["InTI [1, 2]"]
    temporal = rows["InTI [1, 2] + local temporal"]
    checks = [
        ("InTI has fewer GFLOPs than naive", inti["gflops"] < naive["gflops"]),
        ("InTI's measured time per training step is below naive's", inti["step_ms"] < naive["step_ms"]),
        ("InTI's top-1 is at least naive's", inti["accuracy"] >= naive["accuracy"]),
        ("InTI + temporal adapter is best on direction",
         temporal["direction"] >= max(r["direction"] for r in rows.values())),
    ]
    return [f"{'yes' if ok else 'NO '}  {text}" for text, ok in checks]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="inti-demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", default=None, help="cache folder (default $INTI_CACHE or ~/.cache/inti_adapters)")
    ap.add_argument("--epochs", type=int, default=2, help="video adaptation epochs per variant")
    ap.add_argument("--steps-per-epoch", type=int, default=50, help="optimizer steps per epoch (batch 16)")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0, help="seed of the video adaptation (same for every variant)")
    ap.add_argument("--out", default=None, help="also write the table as markdown here")
    args = ap.parse_args(argv)

    start = time.perf_counter()
    root = _cache_root(args.cache)
    print(f"inti_adapters {ia.__version__} demo; cache: {root}", flush=True)
    t0 = time.perf_counter()
    ds = ensure_builtin_dataset(root / "data" / "digits", **DATA_OPTIONS)
    print(f"data: {len(ds.train_shards)} train / {len(ds.val_shards)} val shards, {ds.num_classes} classes, "
          f"{ds.num_frames} frames of {ds.image_size}x{ds.image_size} ({time.perf_counter() - t0:.0f} s)", flush=True)
    image = pretrained_image_model(ds, root)

    rows = {}
    for name, spec in VARIANTS.items():
        print(f"\n== {name}: layers={spec['layers']} temporal={[t['name'] for t in spec['temporal']]}", flush=True)
        run_dir = root / "demo" / "runs" / name.replace(" ", "_").replace("[", "").replace("]", "").replace(",", "")
        rows[name] = adapt(name, spec, checkpoint=image.path, ds=ds, run_dir=run_dir, epochs=args.epochs,
                           steps_per_epoch=args.steps_per_epoch, lr=args.lr, seed=args.seed)

    print("\ntiming one training step of each trained variant side by side", flush=True)
    for name, ms in time_steps_side_by_side({n: r["export_dir"] for n, r in rows.items()}, ds).items():
        rows[name]["step_ms"] = ms
    table = results_table(rows)
    steps = args.epochs * args.steps_per_epoch
    print(f"\nSame budget for every variant: {steps} steps of 16 clips, lr {args.lr}, seed {args.seed}, from the "
          f"same image-pretrained ViT (still-frame digit accuracy {image.accuracy:.1%}). ms/step: median of 7 "
          f"training steps (forward, backward, AdamW) of the trained variants taking turns on one batch of 16 "
          f"clips; engine ms/step: median step of each variant's own training run (data included, runs minutes "
          f"apart). Chance: top-1 2.5%, direction 25%, axis 50%.\n")
    print(table)
    print("\n" + "\n".join(verdict(rows)))
    print(f"\ntotal demo time {time.perf_counter() - start:.0f} s")
    if args.out:
        Path(args.out).write_text(table + "\n")


if __name__ == "__main__":
    main()
