"""Accuracy parity: the built-in digits trained from frame shards and from video shards.

Both stores hold the same clips (same generator seed): ``store='video'`` encodes each clip as a
near-lossless H.264 MP4, ``store='frames'`` keeps every frame as a JPEG (quality 95). The
digits recipe (``recipes/digits_cpu.yaml``: a 4-block ViT from scratch, InTI [1, 2]) is trained
through the real engine (``inti_adapters.train.Trainer``, DeepSpeed over gloo) with the same
seeds on each store, and evaluated on the validation clips (2 temporal views). If the frame
path changed what the model sees, the accuracies would differ by more than the seed noise.

The schedule is short (default 2 epochs x 150 steps of 16 clips per run; the recipe trains 15
epochs) to keep the run to ~10-15 minutes on 2 idle cores: accuracies are far below the recipe's,
and what matters is the difference between the stores against the spread over seeds. Because
the seeds fix the model init, the data order and every augmentation draw, the training losses
of the two stores can also be compared step by step: the mean |difference| between stores (same
seed) against the one between seeds (same store) shows whether the model saw the same clips,
even on a schedule too short for the accuracy to leave chance level.

    python benchmarks/data_parity.py                 # writes benchmarks/results/data_parity.md
    python benchmarks/data_parity.py --seeds 0 1 --steps-per-epoch 50   # a quicker look
    python benchmarks/data_parity.py --checkpoint ~/.cache/inti_adapters/demo/vit_digits_<key>.safetensors
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO_ROOT, log, machine_info, markdown_table, write_results  # noqa: E402

RECIPE = REPO_ROOT / "recipes" / "digits_cpu.yaml"


def train_once(store: str, seed: int, data_root: Path, run_dir: Path, args: argparse.Namespace) -> dict:
    """Validation top-1 / top-5 (%) and loss after the short schedule, the logged training losses, seconds."""
    from inti_adapters.train import Trainer, load_config

    overrides = [f"builtin_data.root={data_root}", f"builtin_data.store={store}", f"train.output_dir={run_dir}",
                 f"train.epochs={args.epochs}", f"train.steps_per_epoch={args.steps_per_epoch}",
                 "train.resume=never", f"train.eval_every_epochs={args.epochs}", f"train.save_every={10 ** 9}",
                 f"train.seed={seed}", f"data.seed={seed}", f"data.num_workers={args.workers}", "train.log_every=5",
                 f"optim.lr={args.lr}"]
    if args.checkpoint:  # start from an image-pretrained ViT (the demo's), so a short schedule leaves chance level
        overrides += [f"model.checkpoint={args.checkpoint}", "model.mean_std=imagenet"]
    cfg = load_config(RECIPE, overrides)
    t0 = time.perf_counter()
    result = Trainer(cfg).fit()
    return {"top1": float(result.eval.top1), "top5": float(result.eval.top5), "loss": float(result.eval.loss),
            "history": [loss for _, loss in result.history], "seconds": time.perf_counter() - t0}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--steps-per-epoch", type=int, default=150)
    p.add_argument("--workers", type=int, default=1, help="DataLoader workers (the recipe uses 1)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (the recipe's: 1e-3)")
    p.add_argument("--cache", default=None, help="where the two data sets are generated (default: a temporary folder)")
    p.add_argument("--checkpoint", default=None, help="image-pretrained weights to start from (safetensors), e.g. "
                   "the demo's ~/.cache/inti_adapters/demo/vit_digits_*.safetensors; default: from scratch")
    return p.parse_args(argv)


def _mean_abs(a: list[float], b: list[float]) -> float:
    return statistics.mean(abs(x - y) for x, y in zip(a, b, strict=False)) if a and b else float("nan")


def summarise(results: dict[str, list[dict]], seeds: list[int]) -> tuple[str, str]:
    """The accuracy table and the verdict (accuracy and loss-trajectory comparisons)."""
    rows = []
    for store, res in results.items():
        accs = [r["top1"] for r in res]
        rows.append([f"{store} shards", " / ".join(f"{a:.2f}" for a in accs), f"{statistics.mean(accs):.2f}",
                     f"{statistics.stdev(accs) if len(accs) > 1 else 0.0:.2f}",
                     f"{statistics.mean(r['top5'] for r in res):.2f}", f"{statistics.mean(r['loss'] for r in res):.4f}",
                     f"{statistics.mean(r['seconds'] for r in res):.0f} s"])
    table = markdown_table(["data", f"top-1 % (seeds {', '.join(map(str, seeds))})", "mean", "std", "top-5 mean",
                            "val loss mean", "time / run"], rows, align="lrrrrrr")
    diffs = [f["top1"] - v["top1"] for f, v in zip(results["frames"], results["video"], strict=True)]
    spread = max(statistics.stdev([r["top1"] for r in res]) if len(res) > 1 else 0.0 for res in results.values())
    within = abs(statistics.mean(diffs)) <= max(spread, 0.5)
    stores = statistics.mean(_mean_abs(f["history"], v["history"]) for f, v in
                             zip(results["frames"], results["video"], strict=True))
    seeds_gap = [_mean_abs(r[i]["history"], r[j]["history"]) for r in results.values()
                 for i in range(len(r)) for j in range(i + 1, len(r))]
    verdict = (f"Top-1 difference frames - video: {statistics.mean(diffs):+.2f} points on average (per seed: "
               f"{', '.join(f'{d:+.2f}' for d in diffs)}); the larger seed std is {spread:.2f} points: "
               + ("**within seed noise**" if within else "**outside seed noise**")
               + f". Training loss, logged every 5 steps: mean |difference| {stores:.4f} between the stores with "
               "the same seed" + (f", {statistics.mean(seeds_gap):.4f} between seeds on the same store" if seeds_gap
                                  else "") + ".")
    return table, verdict


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    info = machine_info("cpu", packages=("av", "deepspeed"))
    results: dict[str, list[dict]] = {"video": [], "frames": []}
    with tempfile.TemporaryDirectory(prefix="inti_parity_") as tmp:
        cache = Path(args.cache) if args.cache else Path(tmp)
        for seed in args.seeds:
            for store in ("video", "frames"):  # interleaved, so that machine load drifts hit both alike
                log(f"training seed {seed} on {store} shards")
                res = train_once(store, seed, cache / f"digits_{store}", Path(tmp) / f"run_{store}_{seed}", args)
                results[store].append(res)
                log(f"  top-1 {res['top1']:.2f}% in {res['seconds']:.0f} s")
    table, verdict = summarise(results, args.seeds)
    print(table + "\n\n" + verdict)
    start = f"from the image-pretrained ViT {Path(args.checkpoint).name}" if args.checkpoint else "from scratch"
    setup = (f"recipes/digits_cpu.yaml through the engine ({start}), short schedule: {args.epochs} epochs x "
             f"{args.steps_per_epoch} steps of 16 clips (the recipe: 15 epochs), peak lr {args.lr}, {args.workers} "
             "DataLoader worker(s), same seeds for both stores (model init, data order and augmentation). Data: the "
             "built-in digits (4000 train / 800 val clips, 8 frames of 64x64), store='video' (H.264 crf 8) vs "
             "store='frames' (JPEG q95). Evaluation: every validation clip, 2 temporal views. Chance: 2.5% top-1.")
    path = write_results("data_parity", "Accuracy parity: frame shards vs video shards",
                         [("Setup", setup), ("Result", table + "\n\n" + verdict)], info=info)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
