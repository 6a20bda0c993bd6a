"""Accuracy parity: the built-in digits trained from frame shards and from video shards.

Both stores hold the same clips (same generator seed): ``store='video'`` encodes each clip as a
near-lossless H.264 MP4, ``store='frames'`` keeps every frame as a JPEG (quality 95). The
digits recipe (``recipes/digits_cpu.yaml``: a 4-block ViT from scratch, InTI [1, 2]) is trained
through the real engine (``inti_adapters.train.Trainer``, DeepSpeed over gloo) with the same
seeds on each store, and evaluated on the validation clips (2 temporal views). If the frame
path changed what the model sees, the accuracies would differ by more than the seed noise.

The schedule is short (default 2 epochs x 150 steps of 16 clips per run; the recipe trains 15
epochs) to keep the run to ~10-15 minutes on 2 cores: accuracies are far below the recipe's,
and what matters is the difference between the stores against the spread over seeds.

    python benchmarks/data_parity.py                 # writes benchmarks/results/data_parity.md
    python benchmarks/data_parity.py --seeds 0 1 --steps-per-epoch 50   # a quicker look
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


def train_once(store: str, seed: int, data_root: Path, run_dir: Path, args: argparse.Namespace) -> tuple[float, float]:
    """Top-1 (%) on the validation clips after the short schedule, and the training seconds."""
    from inti_adapters.train import Trainer, load_config

    overrides = [f"builtin_data.root={data_root}", f"builtin_data.store={store}", f"train.output_dir={run_dir}",
                 f"train.epochs={args.epochs}", f"train.steps_per_epoch={args.steps_per_epoch}",
                 "train.resume=never", f"train.eval_every_epochs={args.epochs}", f"train.save_every={10 ** 9}",
                 f"train.seed={seed}", f"data.seed={seed}", f"data.num_workers={args.workers}"]
    cfg = load_config(RECIPE, overrides)
    t0 = time.perf_counter()
    result = Trainer(cfg).fit()
    return float(result.eval.top1), time.perf_counter() - t0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--steps-per-epoch", type=int, default=150)
    p.add_argument("--workers", type=int, default=1, help="DataLoader workers (the recipe uses 1)")
    p.add_argument("--cache", default=None, help="where the two data sets are generated (default: a temporary folder)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    info = machine_info("cpu", packages=("av", "deepspeed"))
    results: dict[str, list[tuple[float, float]]] = {"video": [], "frames": []}
    with tempfile.TemporaryDirectory(prefix="inti_parity_") as tmp:
        cache = Path(args.cache) if args.cache else Path(tmp)
        for seed in args.seeds:
            for store in ("video", "frames"):  # interleaved, so that machine load drifts hit both alike
                log(f"training seed {seed} on {store} shards")
                top1, seconds = train_once(store, seed, cache / f"digits_{store}", Path(tmp) / f"run_{store}_{seed}",
                                           args)
                results[store].append((top1, seconds))
                log(f"  top-1 {top1:.2f}% in {seconds:.0f} s")
    rows = []
    for store, res in results.items():
        accs = [a for a, _ in res]
        rows.append([f"{store} shards", " / ".join(f"{a:.2f}" for a in accs), f"{statistics.mean(accs):.2f}",
                     f"{statistics.stdev(accs) if len(accs) > 1 else 0.0:.2f}",
                     f"{statistics.mean(s for _, s in res):.0f} s"])
    diffs = [f - v for (f, _), (v, _) in zip(results["frames"], results["video"], strict=True)]
    table = markdown_table(["data", f"top-1 % (seeds {', '.join(map(str, args.seeds))})", "mean", "std",
                            "train time / run"], rows, align="lrrrr")
    spread = max(statistics.stdev([a for a, _ in r]) if len(r) > 1 else 0.0 for r in results.values())
    verdict = (f"Mean difference frames - video: {statistics.mean(diffs):+.2f} points (per seed: "
               f"{', '.join(f'{d:+.2f}' for d in diffs)}); the larger seed std is {spread:.2f} points: "
               + ("**within seed noise**." if abs(statistics.mean(diffs)) <= max(spread, 0.5) else "**outside seed noise**."))
    print(table + "\n\n" + verdict)
    setup = (f"recipes/digits_cpu.yaml through the engine, short schedule: {args.epochs} epochs x "
             f"{args.steps_per_epoch} steps of 16 clips (the recipe: 15 epochs), {args.workers} DataLoader worker(s), "
             "same seeds for both stores (model init, data order and augmentation). Data: the built-in digits "
             "(4000 train / 800 val clips, 8 frames of 64x64), store='video' (H.264 crf 8) vs store='frames' "
             "(JPEG q95). Evaluation: every validation clip, 2 temporal views.")
    path = write_results("data_parity", "Accuracy parity: frame shards vs video shards",
                         [("Setup", setup), ("Top-1", table + "\n\n" + verdict)], info=info)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
